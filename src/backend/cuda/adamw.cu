// backend/cuda/adamw.cu: torch.optim.AdamW's update over one flat range of the parameter arena
// (all tensors at once: the multi-tensor launch of a contiguous arena is one grid-stride loop),
// the helpers for the global gradient norm, and the memory-saving mode's fused form: AdamW on one
// tensor that also sums its gradient's squares (the optimizer step runs inside the backward, one
// tensor at a time, so there is no whole-arena gradient to take the norm of afterwards).
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

// With the gradient scaled by gscale[0] (the clip coefficient, on the device). bf16 weights,
// gradients and moments; fp32 arithmetic, one rounding each. Memory-bound over the whole
// arena: with `vec` (every pointer 16-byte aligned) a thread moves 8 elements per 16-byte
// access, the last n % 8 elements go one by one.
// part (nullable): block b writes the sum of the unscaled g^2 of its share to part[b] (every
// thread of the block reaches the reduction).
__global__ void adamw_bf16_state_kernel(bf16* p, const bf16* g, bf16* m, bf16* v, int64_t n,
                                        AdamHyper h, const float* gscale, bool vec, double* part) {
  __shared__ double red[32];
  double ss = 0.0;
  const float gs = gscale[0];
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t n8 = n / 8;
    for (int64_t i = tid; i < n8; i += stride) {
      float fp[8], fg[8], fm[8], fv[8];
      load8(p + 8 * i, fp);
      load8(g + 8 * i, fg);
      load8(m + 8 * i, fm);
      load8(v + 8 * i, fv);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        ss += double(fg[k]) * double(fg[k]);
        fp[k] = adam_update(fp[k], fg[k] * gs, fm[k], fv[k], h);
      }
      store8(p + 8 * i, fp);
      store8(m + 8 * i, fm);
      store8(v + 8 * i, fv);
    }
    done = n8 * 8;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    float mi = to_f(m[i]), vi = to_f(v[i]);
    const float gi = to_f(g[i]);
    ss += double(gi) * double(gi);
    p[i] = to_bf(adam_update(to_f(p[i]), gi * gs, mi, vi, h));
    m[i] = to_bf(mi);
    v[i] = to_bf(vi);
  }
  if (part) {
    ss = block_sum(ss, red);
    if (threadIdx.x == 0) part[blockIdx.x] = ss;
  }
}


__global__ void adamw_master_kernel(float* p, bf16* p16, const float* g, float* m, float* v,
                                    int64_t n, AdamHyper h, const float* gscale) {
  const float gs = gscale[0];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float mi = m[i], vi = v[i];
    const float pi = adam_update(p[i], g[i] * gs, mi, vi, h);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (p16) p16[i] = to_bf(pi);
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

__global__ void sum_squares_partial_bf16_kernel(double* part, const bf16* x, int64_t n, bool vec) {
  __shared__ double red[32];
  double s = 0.0;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vec) {
    for (int64_t i = tid; i < n / 8; i += stride) {
      float f[8];
      load8(x + 8 * i, f);
#pragma unroll
      for (int k = 0; k < 8; ++k) s += double(f[k]) * double(f[k]);
    }
    done = n / 8 * 8;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const double xi = double(to_f(x[i]));
    s += xi * xi;
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void clip_coef_kernel(float* coef, float* norm, const double* sumsq, float max_norm) {
  const float nrm = float(sqrt(sumsq[0]));
  norm[0] = nrm;
  coef[0] = (max_norm > 0.0f && nrm > max_norm) ? max_norm / (nrm + 1e-6f) : 1.0f;
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

void adamw_step(bf16* p, const bf16* g, bf16* m, bf16* v, int64_t n, float lr, float b1,
                float b2, float eps, float wd, int64_t t, const float* gscale, const Ctx& ctx) {
  const AdamHyper h = hyper(lr, b1, b2, eps, wd, t);
  if (n == 0) return;
  const bool vec = aligned_16b(p) && aligned_16b(g) && aligned_16b(m) && aligned_16b(v);
  adamw_bf16_state_kernel<<<grid_for(vec ? n / 8 + 1 : n, kThreads, ctx), kThreads, 0,
                            ctx.stream>>>(p, g, m, v, n, h, gscale, vec, nullptr);
  CUDA_CHECK_LAUNCH();
}

void adamw_step_sumsq(bf16* p, const bf16* g, bf16* m, bf16* v, int64_t n, float lr, float b1,
                      float b2, float eps, float wd, int64_t t, const float* gscale,
                      double* sumsq, const Ctx& ctx) {
  const AdamHyper h = hyper(lr, b1, b2, eps, wd, t);
  if (n == 0) {
    CUDA_CHECK(cudaMemsetAsync(sumsq, 0, sizeof(double), ctx.stream));
    return;
  }
  double* part =
      static_cast<double*>(workspace_for(ctx, sum_squares_workspace_bytes(), "adamw_step_sumsq"));
  const bool vec = aligned_16b(p) && aligned_16b(g) && aligned_16b(m) && aligned_16b(v);
  const unsigned blocks =
      std::min<unsigned>(kMaxPartials, grid_for(vec ? n / 8 + 1 : n, kThreads, ctx));
  adamw_bf16_state_kernel<<<blocks, kThreads, 0, ctx.stream>>>(p, g, m, v, n, h, gscale, vec,
                                                               part);
  CUDA_CHECK_LAUNCH();
  sum_squares_final_kernel<<<1, kThreads, 0, ctx.stream>>>(sumsq, part, int(blocks));
  CUDA_CHECK_LAUNCH();
}

void sum_f64(double* out, const double* x, int64_t n, const Ctx& ctx) {
  AM_CHECK(n >= 0 && n <= (int64_t(1) << 30), "[sum_f64] n = {} out of range", n);
  sum_squares_final_kernel<<<1, kThreads, 0, ctx.stream>>>(out, x, int(n));
  CUDA_CHECK_LAUNCH();
}

void adamw_step(float* p, bf16* p_bf16, const float* g, float* m, float* v, int64_t n, float lr,
                float b1, float b2, float eps, float wd, int64_t t, const float* gscale,
                const Ctx& ctx) {
  const AdamHyper h = hyper(lr, b1, b2, eps, wd, t);
  if (n == 0) return;
  adamw_master_kernel<<<grid_for(n, kThreads, ctx), kThreads, 0, ctx.stream>>>(p, p_bf16, g, m, v,
                                                                              n, h, gscale);
  CUDA_CHECK_LAUNCH();
}

void sum_squares(double* out, const bf16* x, int64_t n, const Ctx& ctx) {
  double* part =
      static_cast<double*>(workspace_for(ctx, sum_squares_workspace_bytes(), "sum_squares"));
  const bool vec = aligned_16b(x);
  const unsigned blocks =
      std::min<unsigned>(kMaxPartials, grid_for(vec ? n / 8 + 1 : n, kThreads, ctx));
  sum_squares_partial_bf16_kernel<<<blocks, kThreads, 0, ctx.stream>>>(part, x, n, vec);
  CUDA_CHECK_LAUNCH();
  sum_squares_final_kernel<<<1, kThreads, 0, ctx.stream>>>(out, part, int(blocks));
  CUDA_CHECK_LAUNCH();
}

void clip_coef(float* coef, float* norm, const double* sumsq, float max_norm, const Ctx& ctx) {
  clip_coef_kernel<<<1, 1, 0, ctx.stream>>>(coef, norm, sumsq, max_norm);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
