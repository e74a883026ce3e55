// backend/cuda/adamw.cu: torch.optim.AdamW's update over one flat range of the parameter arena
// (all tensors at once: the multi-tensor launch of a contiguous arena is one grid-stride loop),
// and the helpers for the global gradient norm.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxPartials = 1024;  // blocks of the sum-of-squares pass

struct AdamHyper {
  float lr, b1, b2, eps, wd, step /*lr / bias correction 1*/, bc2_sqrt;
};

// The CPU op's arithmetic, in its order: p *= 1 - lr wd; m += (g - m)(1 - b1);
// v = v b2 + (1 - b2) g^2; p -= step * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
__device__ __forceinline__ float adam_update(float p, float g, float& m, float& v,
                                             const AdamHyper& h) {
  p *= 1.0f - h.lr * h.wd;
  m += (g - m) * (1.0f - h.b1);
  v = v * h.b2 + (1.0f - h.b2) * g * g;
  const float denom = sqrtf(v) / h.bc2_sqrt + h.eps;
  return p - h.step * (m / denom);
}

// Grid-stride, one element per thread per step. fp32 weights; p16 (nullable) gets the bf16 copy.
__global__ void adamw_f32_kernel(float* p, bf16* p16, const float* g, float* m, float* v,
                                 int64_t n, AdamHyper h) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float mi = m[i], vi = v[i];
    const float pi = adam_update(p[i], g[i], mi, vi, h);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (p16) p16[i] = to_bf(pi);
  }
}

// Same, bf16 weights: updated in fp32, rounded to nearest.
__global__ void adamw_bf16_kernel(bf16* p, const float* g, float* m, float* v, int64_t n,
                                  AdamHyper h) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float mi = m[i], vi = v[i];
    p[i] = to_bf(adam_update(to_f(p[i]), g[i], mi, vi, h));
    m[i] = mi;
    v[i] = vi;
  }
}

// Pass 1: block b sums x^2 (double) over its grid-stride share into part[b].
__global__ void sum_squares_partial_kernel(double* part, const float* x, int64_t n) {
  __shared__ double red[32];
  double s = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    s += double(x[i]) * double(x[i]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// Pass 2: one block adds the partials in a fixed order.
__global__ void sum_squares_final_kernel(double* out, const double* part, int nparts) {
  __shared__ double red[32];
  double s = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += part[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[0] = s;
}

__global__ void scale_kernel(float* x, float s, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] *= s;
}

// Bias corrections on the host, in fp32 as the CPU op computes them.
AdamHyper hyper(float lr, float b1, float b2, float eps, float wd, int64_t t) {
  AM_CHECK(t >= 1, "[adamw_step] step t starts at 1, got {}", t);
  const float bc1 = 1.0f - std::pow(b1, float(t));
  const float bc2_sqrt = std::sqrt(1.0f - std::pow(b2, float(t)));
  return {lr, b1, b2, eps, wd, lr / bc1, bc2_sqrt};
}

}  // namespace

void adamw_step(float* p, bf16* p_bf16, const float* g, float* m, float* v, int64_t n, float lr,
                float b1, float b2, float eps, float wd, int64_t t, const Ctx& ctx) {
  const AdamHyper h = hyper(lr, b1, b2, eps, wd, t);
  if (n == 0) return;
  adamw_f32_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, p_bf16, g, m, v,
                                                                           n, h);
  CUDA_CHECK_LAUNCH();
}

void adamw_step(bf16* p, const float* g, float* m, float* v, int64_t n, float lr, float b1,
                float b2, float eps, float wd, int64_t t, const Ctx& ctx) {
  const AdamHyper h = hyper(lr, b1, b2, eps, wd, t);
  if (n == 0) return;
  adamw_bf16_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, g, m, v, n, h);
  CUDA_CHECK_LAUNCH();
}

size_t sum_squares_workspace_bytes() { return kMaxPartials * sizeof(double); }

void sum_squares(double* out, const float* x, int64_t n, const Ctx& ctx) {
  double* part =
      static_cast<double*>(workspace_for(ctx, sum_squares_workspace_bytes(), "sum_squares"));
  const unsigned blocks = std::min<unsigned>(kMaxPartials, grid_for(n, kThreads, ctx));
  sum_squares_partial_kernel<<<blocks, kThreads, 0, ctx.stream>>>(part, x, n);
  CUDA_CHECK_LAUNCH();
  sum_squares_final_kernel<<<1, kThreads, 0, ctx.stream>>>(out, part, int(blocks));
  CUDA_CHECK_LAUNCH();
}

void scale_inplace(float* x, float s, int64_t n, const Ctx& ctx) {
  if (n == 0) return;
  scale_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(x, s, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
