// backend/cpu/rmsnorm.cpp: RMSNorm over the last dimension, statistics in fp32 (double sums).
// HF order: h = x * rsqrt(mean(x^2) + eps), then h * w.
#include <cmath>

#include "ops/ops.h"

namespace automoe::cpu {

void rmsnorm_fwd(float* out, float* rstd, const float* x, const float* w, int64_t N, int64_t C,
                 float eps) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    float r = 1.0f / std::sqrt(ss / float(C) + eps);
    rstd[n] = r;
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = (xr[c] * r) * w[c];
  }
}

// y = w * x * r, r = (mean(x^2)+eps)^-1/2:  dx = r * (w*dy) - x * r^3 / C * sum(w*dy*x)
void rmsnorm_bwd(float* dx, float* dw, const float* dout, const float* x, const float* w,
                 const float* rstd, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {  // dw accumulates over rows: serial
    const float* xr = x + n * C;
    const float* g = dout + n * C;
    float r = rstd[n];
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      dot += double(g[c]) * w[c] * xr[c];
      dw[c] += g[c] * xr[c] * r;
    }
    float k = float(dot) * r * r * r / float(C);
    for (int64_t c = 0; c < C; ++c) dx[n * C + c] = r * w[c] * g[c] - xr[c] * k;
  }
}

}  // namespace automoe::cpu
