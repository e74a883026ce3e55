// backend/cpu/linear.cpp: out = x @ w^T (+ b) through OpenBLAS sgemm, fp32.
#include <cblas.h>

#include "ops/ops.h"

namespace automoe::cpu {

void linear_fwd(float* out, const float* x, const float* w, const float* b, int64_t N, int64_t I,
                int64_t O) {
  if (N == 0) return;
  // out[N,O] = x[N,I] * w[O,I]^T
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, O, I, 1.0f, x, I, w, I, 0.0f, out, O);
  if (b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < O; ++o) out[n * O + o] += b[o];
}

void linear_bwd(float* dx, float dx_beta, float* dw, float* db, const float* dout, const float* x,
                const float* w, int64_t N, int64_t I, int64_t O) {
  if (N == 0) return;
  // dx[N,I] = dout[N,O] * w[O,I]
  if (dx)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, I, O, 1.0f, dout, O, w, I, dx_beta,
                dx, I);
  // dw[O,I] += dout^T[O,N] * x[N,I]
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, O, I, N, 1.0f, dout, O, x, I, 1.0f, dw, I);
  if (db)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < O; ++o) db[o] += dout[n * O + o];
}

}  // namespace automoe::cpu
