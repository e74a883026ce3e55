// backend/cuda/add_rmsnorm.cu: the residual add and the next RMSNorm in one pass:
// sum = a + b (bf16, one rounding: the residual stream), out = (sum * rstd) * w. The same bits
// as add() then rmsnorm_fwd() (the norm reads the rounded sum, with rmsnorm_fwd's mapping and
// order of sums), one read of a and b instead of a, b and sum.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;  // rows per block

// One warp per row, lane handles c = lane, lane+32, ... (rmsnorm_fwd_kernel's mapping).
__global__ void add_rmsnorm_fwd_kernel(bf16* sum, bf16* out, float* rstd, const bf16* a,
                                       const bf16* b, const bf16* w, int64_t N, int64_t C,
                                       float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16* ar = a + n * C;
  const bf16* br = b + n * C;
  bf16* sr = sum + n * C;
  float ss = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const bf16 s = to_bf(to_f(ar[c]) + to_f(br[c]));
    sr[c] = s;
    const float v = to_f(s);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(C) + eps);
  if (lane == 0) rstd[n] = r;
  bf16* o = out + n * C;
  for (int64_t c = lane; c < C; c += 32) o[c] = to_bf((to_f(sr[c]) * r) * to_f(w[c]));
}

}  // namespace

void add_rmsnorm_fwd(bf16* sum, bf16* out, float* rstd, const bf16* a, const bf16* b,
                     const bf16* w, int64_t N, int64_t C, float eps, const Ctx& ctx) {
  if (N == 0) return;
  add_rmsnorm_fwd_kernel<<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0, ctx.stream>>>(
      sum, out, rstd, a, b, w, N, C, eps);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
