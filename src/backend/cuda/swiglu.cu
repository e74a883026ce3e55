// backend/cuda/swiglu.cu: out = silu(gate) * up on a fused [gate | up] row, bf16 in/out, fp32 math.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

// Grid-stride over the N*F outputs; thread i reads gate and up of (n, f) = (i / F, i % F).
__global__ void swiglu_fwd_kernel(bf16* out, const bf16* gu, int64_t N, int64_t F) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * F;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / F, f = i % F;
    const float g = to_f(gu[n * 2 * F + f]), u = to_f(gu[n * 2 * F + F + f]);
    out[i] = to_bf(g / (1.0f + expf(-g)) * u);
  }
}

// Same mapping: d gate = dout * up * s * (1 + g (1 - s)), d up = dout * silu(g), s = sigmoid(g).
__global__ void swiglu_bwd_kernel(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N,
                                  int64_t F) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * F;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / F, f = i % F;
    const float g = to_f(gu[n * 2 * F + f]), u = to_f(gu[n * 2 * F + F + f]), d = to_f(dout[i]);
    const float s = 1.0f / (1.0f + expf(-g));
    dgu[n * 2 * F + f] = to_bf(d * u * s * (1.0f + g * (1.0f - s)));
    dgu[n * 2 * F + F + f] = to_bf(d * g * s);
  }
}

constexpr int kThreads = 256;

}  // namespace

void swiglu_fwd(bf16* out, const bf16* gu, int64_t N, int64_t F, const Ctx& ctx) {
  if (N == 0 || F == 0) return;
  swiglu_fwd_kernel<<<grid_for(N * F, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, gu, N, F);
  CUDA_CHECK_LAUNCH();
}

void swiglu_bwd(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N, int64_t F,
                const Ctx& ctx) {
  if (N == 0 || F == 0) return;
  swiglu_bwd_kernel<<<grid_for(N * F, kThreads, ctx), kThreads, 0, ctx.stream>>>(dgu, dout, gu,
                                                                                N, F);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
