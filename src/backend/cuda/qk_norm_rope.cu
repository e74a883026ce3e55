// backend/cuda/qk_norm_rope.cu: the per-head q/k RMSNorm and RoPE in one pass:
// out[n,h,:] = rope(bf16((x[n,h,:] * rstd) * w), pos[n]). The same bits as rmsnorm_fwd() on
// N*H rows of D then rope_fwd() (the normed value is rounded to bf16 before the rotation, as
// the two-op path stores it), one read and one write of the head instead of two each.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;  // (token, head) rows per block

// One warp per (token, head) row; the sum of squares with rmsnorm_fwd_kernel's mapping (lane
// handles c = lane, lane+32, ...); then lane rotates the pairs (i, i + D/2), i = lane, lane+32..
// with rope's fp32 angle arithmetic.
__global__ void qk_norm_rope_fwd_kernel(bf16* out, float* rstd, const bf16* x, const bf16* w,
                                        const int32_t* pos, int64_t N, int64_t H, int64_t D,
                                        float eps, float theta) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N * H) return;
  const int64_t n = row / H, h2 = D / 2;
  const bf16* xr = x + row * D;
  float ss = 0.f;
  for (int64_t c = lane; c < D; c += 32) {
    const float v = to_f(xr[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (lane == 0) rstd[row] = r;
  const float p = float(pos[n]);
  bf16* o = out + row * D;
  for (int64_t i = lane; i < h2; i += 32) {
    const float a = to_f(to_bf((to_f(xr[i]) * r) * to_f(w[i])));
    const float b = to_f(to_bf((to_f(xr[i + h2]) * r) * to_f(w[i + h2])));
    const float inv_freq = 1.0f / powf(theta, float(2 * i) / float(D));
    float s, c;
    sincosf(p * inv_freq, &s, &c);
    o[i] = to_bf(a * c - b * s);
    o[i + h2] = to_bf(b * c + a * s);
  }
}

}  // namespace

void qk_norm_rope_fwd(bf16* out, float* rstd, const bf16* x, const bf16* w, const int32_t* pos,
                      int64_t N, int64_t H, int64_t D, float eps, float theta, const Ctx& ctx) {
  AM_CHECK(D % 2 == 0, "[qk_norm_rope_fwd] head dim must be even for the half rotation, got {}",
           D);
  AM_CHECK(static_cast<const void*>(out) != static_cast<const void*>(x),
           "[qk_norm_rope_fwd] out must not alias x (lanes read pairs other lanes write)");
  if (N == 0 || H == 0) return;
  const int64_t rows = N * H;
  qk_norm_rope_fwd_kernel<<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0,
                            ctx.stream>>>(out, rstd, x, w, pos, N, H, D, eps, theta);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
