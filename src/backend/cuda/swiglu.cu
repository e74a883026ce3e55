// backend/cuda/swiglu.cu: out = silu(gate) * up on a fused [gate | up] row, bf16 in/out, fp32 math.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

// The rows to compute: N, or min(N, *n_rows) (the device-side count; see ops_cuda.h).
__device__ __forceinline__ int64_t rows_of(int64_t N, const int32_t* n_rows) {
  return n_rows ? min(N, int64_t(*n_rows)) : N;
}

// Grid-stride over the rows_of(N) * F outputs; thread i reads gate and up of (n, f) =
// (i / F, i % F). With a count the grid stays sized for N: the threads past it exit at once.
__global__ void swiglu_fwd_kernel(bf16* out, const bf16* gu, int64_t N, int64_t F,
                                  const int32_t* n_rows) {
  const int64_t total = rows_of(N, n_rows) * F;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / F, f = i % F;
    const float g = to_f(gu[n * 2 * F + f]), u = to_f(gu[n * 2 * F + F + f]);
    out[i] = to_bf(g / (1.0f + expf(-g)) * u);
  }
}

// Same mapping: d gate = dout * up * s * (1 + g (1 - s)), d up = dout * silu(g), s = sigmoid(g).
__global__ void swiglu_bwd_kernel(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N,
                                  int64_t F, const int32_t* n_rows) {
  const int64_t total = rows_of(N, n_rows) * F;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / F, f = i % F;
    const float g = to_f(gu[n * 2 * F + f]), u = to_f(gu[n * 2 * F + F + f]), d = to_f(dout[i]);
    const float s = 1.0f / (1.0f + expf(-g));
    dgu[n * 2 * F + f] = to_bf(d * u * s * (1.0f + g * (1.0f - s)));
    dgu[n * 2 * F + F + f] = to_bf(d * g * s);
  }
}

// 16-byte versions (F % 8 == 0, buffers 16-byte aligned): thread i owns outputs 8i..8i+7 of
// one row; the same arithmetic per element.
__global__ void swiglu_fwd_vec_kernel(bf16* out, const bf16* gu, int64_t N, int64_t F,
                                      const int32_t* n_rows) {
  const int64_t F8 = F / 8;
  const int64_t total = rows_of(N, n_rows) * F8;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / F8, f = (i % F8) * 8;
    float g[8], u[8], o[8];
    load8(gu + n * 2 * F + f, g);
    load8(gu + n * 2 * F + F + f, u);
#pragma unroll
    for (int q = 0; q < 8; ++q) o[q] = g[q] / (1.0f + expf(-g[q])) * u[q];
    store8(out + n * F + f, o);
  }
}

__global__ void swiglu_bwd_vec_kernel(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N,
                                      int64_t F, const int32_t* n_rows) {
  const int64_t F8 = F / 8;
  const int64_t total = rows_of(N, n_rows) * F8;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / F8, f = (i % F8) * 8;
    float g[8], u[8], d[8], dg[8], du[8];
    load8(gu + n * 2 * F + f, g);
    load8(gu + n * 2 * F + F + f, u);
    load8(dout + n * F + f, d);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float s = 1.0f / (1.0f + expf(-g[q]));
      dg[q] = d[q] * u[q] * s * (1.0f + g[q] * (1.0f - s));
      du[q] = d[q] * g[q] * s;
    }
    store8(dgu + n * 2 * F + f, dg);
    store8(dgu + n * 2 * F + F + f, du);
  }
}

constexpr int kThreads = 256;

}  // namespace

void swiglu_fwd(bf16* out, const bf16* gu, int64_t N, int64_t F, const Ctx& ctx,
                const int32_t* n_rows) {
  if (N == 0 || F == 0) return;
  if (F % 8 == 0 && aligned_16b(out) && aligned_16b(gu))
    swiglu_fwd_vec_kernel<<<grid_for(N * F / 8, kThreads, ctx), kThreads, 0, ctx.stream>>>(
        out, gu, N, F, n_rows);
  else
    swiglu_fwd_kernel<<<grid_for(N * F, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, gu, N, F,
                                                                                 n_rows);
  CUDA_CHECK_LAUNCH();
}

void swiglu_bwd(bf16* dgu, const bf16* dout, const bf16* gu, int64_t N, int64_t F,
                const Ctx& ctx, const int32_t* n_rows) {
  if (N == 0 || F == 0) return;
  if (F % 8 == 0 && aligned_16b(dgu) && aligned_16b(dout) && aligned_16b(gu))
    swiglu_bwd_vec_kernel<<<grid_for(N * F / 8, kThreads, ctx), kThreads, 0, ctx.stream>>>(
        dgu, dout, gu, N, F, n_rows);
  else
    swiglu_bwd_kernel<<<grid_for(N * F, kThreads, ctx), kThreads, 0, ctx.stream>>>(dgu, dout, gu,
                                                                                  N, F, n_rows);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
