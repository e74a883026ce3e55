// backend/cuda/elementwise.cu: the model's elementwise glue: residual adds, fp32 -> bf16
// gradient folding, dtype conversion and device-side random init. Grid-stride loops, fp32
// arithmetic, one rounding per output.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kThreads = 256;

#define GRID_STRIDE(i, n)                                                          \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);       \
       i += int64_t(gridDim.x) * blockDim.x)

__global__ void add_inplace_kernel(bf16* y, const bf16* x, int64_t n) {
  GRID_STRIDE(i, n) y[i] = to_bf(to_f(y[i]) + to_f(x[i]));
}
__global__ void add_kernel(bf16* out, const bf16* a, const bf16* b, int64_t n) {
  GRID_STRIDE(i, n) out[i] = to_bf(to_f(a[i]) + to_f(b[i]));
}
__global__ void accumulate_grad_kernel(bf16* g, const float* s, float beta, int64_t n) {
  GRID_STRIDE(i, n) g[i] = to_bf((beta == 0.0f ? 0.0f : beta * to_f(g[i])) + s[i]);
}
__global__ void to_bf16_kernel(bf16* out, const float* in, int64_t n) {
  GRID_STRIDE(i, n) out[i] = to_bf(in[i]);
}
__global__ void to_f32_kernel(float* out, const bf16* in, int64_t n) {
  GRID_STRIDE(i, n) out[i] = to_f(in[i]);
}

// splitmix64: a counter-based generator, so every element is independent of the grid.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float normal_at(uint64_t seed, int64_t i) {
  const uint64_t r = mix64(seed ^ mix64(uint64_t(i)));
  const float u1 = (float(uint32_t(r >> 40)) + 1.0f) / 16777217.0f;  // (0, 1]
  const float u2 = float(uint32_t(r) & 0xffffffu) / 16777216.0f;
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}
template <class T>
__global__ void fill_normal_kernel(T* p, int64_t n, float std, uint64_t seed) {
  GRID_STRIDE(i, n) p[i] = T(normal_at(seed, i) * std);
}
template <class T>
__global__ void fill_kernel(T* p, float v, int64_t n) {
  GRID_STRIDE(i, n) p[i] = T(v);
}

}  // namespace

void add_inplace(bf16* y, const bf16* x, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  add_inplace_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(y, x, n);
  CUDA_CHECK_LAUNCH();
}

void add(bf16* out, const bf16* a, const bf16* b, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  add_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, a, b, n);
  CUDA_CHECK_LAUNCH();
}

void accumulate_grad(bf16* g, const float* s, float beta, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  accumulate_grad_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(g, s, beta, n);
  CUDA_CHECK_LAUNCH();
}

void convert(bf16* out, const float* in, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  to_bf16_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, in, n);
  CUDA_CHECK_LAUNCH();
}

void convert(float* out, const bf16* in, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  to_f32_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(out, in, n);
  CUDA_CHECK_LAUNCH();
}

void fill_normal(bf16* p, int64_t n, float std, uint64_t seed, const Ctx& ctx) {
  if (n == 0) return;
  fill_normal_kernel<bf16><<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, n, std,
                                                                                   seed);
  CUDA_CHECK_LAUNCH();
}

void fill_normal(float* p, int64_t n, float std, uint64_t seed, const Ctx& ctx) {
  if (n == 0) return;
  fill_normal_kernel<float><<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, n, std,
                                                                                    seed);
  CUDA_CHECK_LAUNCH();
}

void fill(bf16* p, float value, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  fill_kernel<bf16><<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, value, n);
  CUDA_CHECK_LAUNCH();
}

void fill(float* p, float value, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  fill_kernel<float><<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, value, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
