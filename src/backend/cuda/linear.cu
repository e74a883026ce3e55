// backend/cuda/linear.cu: out = x @ w^T (+ b) and its backward through cuBLASLt: bf16 operands,
// fp32 compute; dW accumulates into an fp32 buffer (beta = 1 on an fp32 output). Plans
// (descriptors, layouts and the heuristic's algorithm) are built once per shape and cached.
//
// cuBLASLt is column-major and our buffers are row-major: a row-major [R,C] buffer is a
// column-major [C,R] matrix, so each product below is written for its transpose.
#include <array>
#include <map>
#include <mutex>

#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

// Largest power of two (<= 256) dividing the address: cuBLASLt's heuristic must only offer
// algorithms that work at this alignment (it assumes 256 bytes unless told).
int64_t alignment_of(const void* p) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int64_t al = 256;
  while (al > 1 && a % uintptr_t(al)) al >>= 1;
  return al;
}

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// device, transa, transb, m, n, k, lda, ldb, ldc, C type, bias, align A/B/C/bias, workspace
using PlanKey = std::array<int64_t, 16>;

std::mutex g_mu;                    // guards the cache and the bias pointer of cached descs
std::map<PlanKey, Plan> g_plans;    // lives for the process: a few hundred bytes per shape

Plan build_plan(const Ctx& ctx, cublasOperation_t ta, cublasOperation_t tb,
                int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                cudaDataType_t ctype, bool bias, const int64_t align[4]) {
  Plan p;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (bias) {
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    cudaDataType_t bt = CUDA_R_16BF;
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt,
                                                sizeof(bt)));
  }
  // Stored shapes: A is m x k (k x m when transposed), B is k x n (n x k when transposed).
  const bool tA = ta == CUBLAS_OP_T, tB = tb == CUBLAS_OP_T;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, tA ? k : m, tA ? m : k, lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, tB ? n : k, tB ? k : n, ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, ctype, m, n, ldc));

  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = ctx.workspace_bytes;
  uint32_t al[4] = {uint32_t(align[0]), uint32_t(align[1]), uint32_t(align[2]),
                    uint32_t(align[3])};
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], sizeof(al[0])));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], sizeof(al[1])));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], sizeof(al[2])));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], sizeof(al[2])));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(ctx.lt, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  AM_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0,
           "[linear] cuBLASLt has no algorithm for m={} n={} k={} (lda {}, ldb {}, ldc {}, "
           "C {}, alignments {}/{}/{} bytes, workspace {} bytes): {}",
           m, n, k, lda, ldb, ldc, ctype == CUDA_R_32F ? "f32" : "bf16", al[0], al[1], al[2],
           ws, cublasLtGetStatusString(st));
  p.algo = res.algo;
  return p;
}

// D = C = alpha * op(A) @ op(B) + beta * C (+ bias[m]), column-major, A/B bf16, C bf16 or f32.
void matmul(const Ctx& ctx, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n,
            int64_t k, const bf16* A, int64_t lda, const bf16* B, int64_t ldb, void* C,
            cudaDataType_t ctype, int64_t ldc, float beta, const bf16* bias) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const int64_t align[4] = {alignment_of(A), alignment_of(B), alignment_of(C),
                            bias ? alignment_of(bias) : 256};
  const PlanKey key = {device, int64_t(ta), int64_t(tb), m, n, k, lda, ldb, ldc,
                       int64_t(ctype), bias != nullptr, align[0], align[1], align[2], align[3],
                       int64_t(ctx.workspace_bytes)};
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_plans.find(key);
  if (it == g_plans.end())
    it = g_plans.emplace(key, build_plan(ctx, ta, tb, m, n, k, lda, ldb, ldc, ctype,
                                         bias != nullptr, align))
             .first;
  Plan& p = it->second;
  if (bias)
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)));
  const float alpha = 1.0f;
  CUBLAS_CHECK(cublasLtMatmul(ctx.lt, p.op, &alpha, A, p.a, B, p.b, &beta, C, p.c, C, p.c,
                              &p.algo, ctx.workspace, ctx.workspace ? ctx.workspace_bytes : 0,
                              ctx.stream));
}

}  // namespace

// NVIDIA's recommendation for Hopper: 32 MiB lets cuBLASLt pick its fastest kernels.
size_t linear_workspace_bytes() { return size_t(32) << 20; }

void linear_fwd(bf16* out, const bf16* x, const bf16* w, const bf16* b, int64_t N, int64_t I,
                int64_t O, const Ctx& ctx) {
  if (N == 0 || O == 0) return;
  AM_CHECK(I > 0, "[linear_fwd] input features must be positive, got {}", I);
  // out^T[O,N] = (w as col-major [I,O])^T @ (x as col-major [I,N])
  matmul(ctx, CUBLAS_OP_T, CUBLAS_OP_N, O, N, I, w, I, x, I, out, CUDA_R_16BF, O, 0.0f, b);
}

size_t linear_bwd_workspace_bytes(int64_t N, int64_t O) {
  return std::max(linear_workspace_bytes(), colsum_workspace_bytes(N, O));
}

void linear_bwd(bf16* dx, float dx_beta, float* dw, float* db, const bf16* dout, const bf16* x,
                const bf16* w, int64_t N, int64_t I, int64_t O, const Ctx& ctx) {
  if (N == 0 || I == 0 || O == 0) return;
  // db first: its partial sums use the workspace the GEMMs reuse next (stream order).
  if (db) colsum_accumulate(db, dout, nullptr, nullptr, N, O, ctx, "linear_bwd");
  // dx^T[I,N] = (w as col-major [I,O]) @ (dout as col-major [O,N])
  if (dx)
    matmul(ctx, CUBLAS_OP_N, CUBLAS_OP_N, I, N, O, w, I, dout, O, dx, CUDA_R_16BF, I, dx_beta,
           nullptr);
  // dw^T[I,O] += (x as col-major [I,N]) @ (dout as col-major [O,N])^T, fp32 output
  if (dw)
    matmul(ctx, CUBLAS_OP_N, CUBLAS_OP_T, I, O, N, x, I, dout, O, dw, CUDA_R_32F, I, 1.0f,
           nullptr);
}

// The same with a bf16 dW (bf16 C/D, fp32 compute): dw^T = dw_beta * dw^T + x^T-product.
void linear_bwd(bf16* dx, float dx_beta, bf16* dw, float dw_beta, float* db, const bf16* dout,
                const bf16* x, const bf16* w, int64_t N, int64_t I, int64_t O, const Ctx& ctx) {
  if (I == 0 || O == 0) return;
  if (N == 0) {  // nothing to add: an overwrite still has to clear dW
    if (dw && dw_beta == 0.0f)
      CUDA_CHECK(cudaMemsetAsync(dw, 0, size_t(O) * size_t(I) * sizeof(bf16), ctx.stream));
    return;
  }
  if (db) colsum_accumulate(db, dout, nullptr, nullptr, N, O, ctx, "linear_bwd");
  if (dx)
    matmul(ctx, CUBLAS_OP_N, CUBLAS_OP_N, I, N, O, w, I, dout, O, dx, CUDA_R_16BF, I, dx_beta,
           nullptr);
  if (dw)
    matmul(ctx, CUBLAS_OP_N, CUBLAS_OP_T, I, O, N, x, I, dout, O, dw, CUDA_R_16BF, I, dw_beta,
           nullptr);
}

}  // namespace automoe::cuda
