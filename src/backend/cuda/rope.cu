// backend/cuda/rope.cu: rotary position embedding, HF half rotation:
// out = x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]); angles in fp32
// exactly as HF computes them (inv_freq = 1/theta^(2i/D), angle = pos * inv_freq).
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

// Grid-stride over the N*H*(D/2) rotation pairs: thread i rotates (x[i], x[i + D/2]) of one
// (token, head). sign = +1 forward, -1 backward (the transpose rotates by -angle). Each pair is
// read before it is written by the same thread, so out == x is safe.
__global__ void rope_kernel(bf16* out, const bf16* x, const int32_t* pos, int64_t N, int64_t H,
                            int64_t D, float theta, float sign) {
  const int64_t h2 = D / 2;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < N * H * h2;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % h2, nh = idx / h2, n = nh / H;
    const float inv_freq = 1.0f / powf(theta, float(2 * i) / float(D));
    const float ang = float(pos[n]) * inv_freq;
    float s, c;
    sincosf(ang, &s, &c);
    s *= sign;
    const int64_t base = nh * D;
    const float a = to_f(x[base + i]), b = to_f(x[base + i + h2]);
    out[base + i] = to_bf(rot_lo(a, b, c, s));
    out[base + i + h2] = to_bf(rot_hi(a, b, c, s));
  }
}

// Thread per (token, pair i): the angle's powf and sincosf once, then the pair rotated in every
// head (the same fp32 arithmetic as rope_kernel, H times fewer transcendentals; consecutive
// threads take consecutive i, so each head's half-rows are read coalesced).
__global__ void rope_heads_kernel(bf16* out, const bf16* x, const int32_t* pos, int64_t N,
                                  int64_t H, int64_t D, float theta, float sign) {
  const int64_t h2 = D / 2;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < N * h2;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % h2, n = idx / h2;
    const float inv_freq = 1.0f / powf(theta, float(2 * i) / float(D));
    const float ang = float(pos[n]) * inv_freq;
    float s, c;
    sincosf(ang, &s, &c);
    s *= sign;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = (n * H + h) * D;
      const float a = to_f(x[base + i]), b = to_f(x[base + i + h2]);
      out[base + i] = to_bf(rot_lo(a, b, c, s));
      out[base + i + h2] = to_bf(rot_hi(a, b, c, s));
    }
  }
}

void rope_run(bf16* out, const bf16* x, const int32_t* pos, int64_t N, int64_t H, int64_t D,
              float theta, float sign, const Ctx& ctx, const char* op) {
  AM_CHECK(D % 2 == 0, "[{}] head dim must be even for the half rotation, got {}", op, D);
  if (N == 0 || H == 0 || D == 0) return;
  constexpr int kThreads = 256;
  if (H >= 4 && D >= 64)  // enough pairs per token for full warps, heads to share the angle
    rope_heads_kernel<<<grid_for(N * (D / 2), kThreads, ctx), kThreads, 0, ctx.stream>>>(
        out, x, pos, N, H, D, theta, sign);
  else
    rope_kernel<<<grid_for(N * H * (D / 2), kThreads, ctx), kThreads, 0, ctx.stream>>>(
        out, x, pos, N, H, D, theta, sign);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void rope_fwd(bf16* out, const bf16* x, const int32_t* pos, int64_t N, int64_t H, int64_t D,
              float theta, const Ctx& ctx) {
  rope_run(out, x, pos, N, H, D, theta, 1.0f, ctx, "rope_fwd");
}

void rope_bwd(bf16* dx, const bf16* dout, const int32_t* pos, int64_t N, int64_t H, int64_t D,
              float theta, const Ctx& ctx) {
  rope_run(dx, dout, pos, N, H, D, theta, -1.0f, ctx, "rope_bwd");
}

}  // namespace automoe::cuda
