// backend/cuda/rmsnorm.cu: RMSNorm over the last dim, bf16 in/out, fp32 statistics. Also the
// per-head q/k norm (N = tokens*heads, C = head dim), and add_rmsnorm_fwd (the residual add
// fused with the norm that follows it). HF order: (x * rstd) then * w.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;  // rows per block

// Thread mapping: one warp per row (row = blockIdx.x * 4 + warp); lane handles the columns
// c = lane, lane+32, ...; the sum of squares is a warp reduction. kAdd (add_rmsnorm_fwd): the row
// is first x + b, rounded to bf16 and stored to `sum` (the residual stream), then normed: the
// same code, so the same bits as add() followed by rmsnorm_fwd().
template <bool kAdd>
__global__ void rmsnorm_fwd_kernel(bf16* out, float* rstd, bf16* sum, const bf16* x,
                                   const bf16* b, const bf16* w, int64_t N, int64_t C,
                                   float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16* xr = x + n * C;
  if constexpr (kAdd) {
    const bf16* br = b + n * C;
    bf16* sr = sum + n * C;
    for (int64_t c = lane; c < C; c += 32) sr[c] = to_bf(to_f(xr[c]) + to_f(br[c]));
    xr = sr;  // the lane reads back only what it wrote
  }
  float ss = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    float v = to_f(xr[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(C) + eps);
  if (lane == 0) rstd[n] = r;
  bf16* o = out + n * C;
  for (int64_t c = lane; c < C; c += 32) o[c] = to_bf((to_f(xr[c]) * r) * to_f(w[c]));
}

// dx = r * w * g - x * r^3 / C * sum(w * g * x). Same mapping as the forward.
__global__ void rmsnorm_bwd_dx_kernel(bf16* dx, const bf16* dout, const bf16* x, const bf16* w,
                                      const float* rstd, int64_t N, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16* xr = x + n * C;
  const bf16* g = dout + n * C;
  float dot = 0.f;
  for (int64_t c = lane; c < C; c += 32) dot += to_f(g[c]) * to_f(w[c]) * to_f(xr[c]);
  dot = warp_sum(dot);
  const float r = rstd[n];
  const float k = dot * r * r * r / float(C);
  bf16* d = dx + n * C;
  for (int64_t c = lane; c < C; c += 32)
    d[c] = to_bf(r * to_f(w[c]) * to_f(g[c]) - to_f(xr[c]) * k);
}

}  // namespace

void rmsnorm_fwd(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t C,
                 float eps, const Ctx& ctx) {
  if (N == 0) return;
  rmsnorm_fwd_kernel<false><<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0,
                               ctx.stream>>>(out, rstd, nullptr, x, nullptr, w, N, C, eps);
  CUDA_CHECK_LAUNCH();
}

void add_rmsnorm_fwd(bf16* sum, bf16* out, float* rstd, const bf16* a, const bf16* b,
                     const bf16* w, int64_t N, int64_t C, float eps, const Ctx& ctx) {
  if (N == 0) return;
  rmsnorm_fwd_kernel<true><<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0,
                              ctx.stream>>>(out, rstd, sum, a, b, w, N, C, eps);
  CUDA_CHECK_LAUNCH();
}

size_t rmsnorm_bwd_workspace_bytes(int64_t N, int64_t C) { return colsum_workspace_bytes(N, C); }

void rmsnorm_bwd(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w,
                 const float* rstd, int64_t N, int64_t C, const Ctx& ctx) {
  if (N == 0) return;
  rmsnorm_bwd_dx_kernel<<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0, ctx.stream>>>(
      dx, dout, x, w, rstd, N, C);
  CUDA_CHECK_LAUNCH();
  // dw[c] += sum_n dout[n,c] * x[n,c] * rstd[n]
  colsum_accumulate(dw, dout, x, rstd, N, C, ctx, "rmsnorm_bwd");
}

}  // namespace automoe::cuda
