// backend/cuda/cross_entropy.cu: softmax cross-entropy over bf16 logits, -100 ignored. The
// forward streams each row once with an online max/sum (no fp32 copy of the logits); the
// backward writes the bf16 gradient element-wise (in place allowed); cross_entropy_fwd_bwd does
// both in one kernel when the gradient is wanted right away (training).
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kIgnore = -100;

// A row moves 8 elements at a time (16-byte accesses) when V is a multiple of 8 and the rows
// are 16-byte aligned, else one at a time.
__device__ __forceinline__ bool rows_vec(int64_t V, const void* a, const void* b) {
  return V % 8 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// Thread i's (max, sum exp) over its elements of the row: v = i, i + 256, ... (or its 8-wide
// vectors j = i, i + 256, ..., one rescale per vector).
__device__ __forceinline__ MaxSum row_maxsum(const bf16* l, int64_t V, bool vec) {
  MaxSum st{-INFINITY, 0.f};
  if (vec) {
    for (int64_t j = threadIdx.x; j < V / 8; j += kThreads) {
      float x[8];
      load8(l + j * 8, x);
      float m = x[0];
#pragma unroll
      for (int k = 1; k < 8; ++k) m = fmaxf(m, x[k]);
      if (m > st.m) {
        st.s *= expf(st.m - m);  // st.m = -inf at first: exp(-inf) = 0
        st.m = m;
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) st.s += expf(x[k] - st.m);
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const float x = to_f(l[v]);
      if (x > st.m) {
        st.s = st.s * expf(st.m - x) + 1.f;
        st.m = x;
      } else {
        st.s += expf(x - st.m);
      }
    }
  }
  return st;
}

// The block's (max, sum exp) merged: warp shuffles, then the warps in order; every thread gets
// lse = max + log(sum). `red` is __shared__ MaxSum[32], `out` __shared__ float.
__device__ __forceinline__ float block_lse(MaxSum st, MaxSum* red, float* out) {
  for (int o = 16; o > 0; o >>= 1)
    st = maxsum_merge(
        st, {__shfl_xor_sync(kFullMask, st.m, o), __shfl_xor_sync(kFullMask, st.s, o)});
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum all = red[0];
    for (int w = 1; w < kThreads / 32; ++w) all = maxsum_merge(all, red[w]);
    *out = all.m + logf(all.s);
  }
  __syncthreads();
  return *out;
}

// d = s * (exp(l - z) - [v == t]) over the row (s = 0 on an ignored row: all zeros). Each
// element is read before the same thread writes it, so d == l is safe.
__device__ __forceinline__ void row_grad(bf16* d, const bf16* l, int64_t V, int64_t t, float z,
                                         float s, bool vec) {
  const bool ignored = t == kIgnore;
  if (vec) {
    for (int64_t j = threadIdx.x; j < V / 8; j += kThreads) {
      float x[8], g[8];
      load8(l + j * 8, x);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        g[k] = ignored ? 0.f : s * expf(x[k] - z);
        if (j * 8 + k == t) g[k] -= s;
      }
      store8(d + j * 8, g);
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      float g = ignored ? 0.f : s * expf(to_f(l[v]) - z);
      if (v == t) g -= s;
      d[v] = to_bf(g);
    }
  }
}

// Block per row: lse and the loss (a target outside [0, V) other than -100 gives a NaN loss:
// visible, never an out-of-range read); with kGrad the row's gradient too, written over the
// logits (dlogits may be logits): one kernel, the row read twice (the second time mostly from
// L2) and written once, instead of a forward pass and a backward pass over it.
template <bool kGrad>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(float* losses, float* lse, bf16* dlogits, const bf16* logits,
                         const int64_t* targets, float scale, int64_t V) {
  __shared__ MaxSum red[32];
  __shared__ float z_sh;
  const int64_t n = blockIdx.x, t = targets[n];
  const bf16* l = logits + n * V;
  bf16* d = kGrad ? dlogits + n * V : nullptr;
  const bool vec = rows_vec(V, l, kGrad ? static_cast<const void*>(d) : l);
  // the target's logit before any thread overwrites the row (block_lse syncs in between)
  const float lt = t >= 0 && t < V ? to_f(l[t]) : NAN;
  const float z = block_lse(row_maxsum(l, V, vec), red, &z_sh);
  if (threadIdx.x == 0) {
    lse[n] = z;
    losses[n] = t == kIgnore ? 0.f : z - lt;
  }
  if constexpr (kGrad) row_grad(d, l, V, t, z, t == kIgnore ? 0.f : scale, vec);
}

// The backward alone (lse from a forward): block per row.
__global__ void __launch_bounds__(kThreads)
    cross_entropy_bwd_kernel(bf16* dlogits, const bf16* logits, const float* lse,
                             const int64_t* targets, float scale, int64_t V) {
  const int64_t n = blockIdx.x, t = targets[n];
  const bf16* l = logits + n * V;
  bf16* d = dlogits + n * V;
  row_grad(d, l, V, t, t == kIgnore ? 0.f : lse[n], t == kIgnore ? 0.f : scale,
           rows_vec(V, l, d));
}

}  // namespace

void cross_entropy_fwd(float* losses, float* lse, const bf16* logits, const int64_t* targets,
                       int64_t N, int64_t V, const Ctx& ctx) {
  AM_CHECK(V > 0, "[cross_entropy_fwd] empty vocabulary");
  if (N == 0) return;
  AM_CHECK(N < (int64_t(1) << 31), "[cross_entropy_fwd] {} rows: at most 2^31 - 1", N);
  cross_entropy_kernel<false><<<unsigned(N), kThreads, 0, ctx.stream>>>(
      losses, lse, nullptr, logits, targets, 0.f, V);
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_fwd_bwd(float* losses, float* lse, bf16* dlogits, const bf16* logits,
                           const int64_t* targets, float scale, int64_t N, int64_t V,
                           const Ctx& ctx) {
  AM_CHECK(V > 0, "[cross_entropy_fwd_bwd] empty vocabulary");
  if (N == 0) return;
  AM_CHECK(N < (int64_t(1) << 31), "[cross_entropy_fwd_bwd] {} rows: at most 2^31 - 1", N);
  cross_entropy_kernel<true><<<unsigned(N), kThreads, 0, ctx.stream>>>(
      losses, lse, dlogits, logits, targets, scale, V);
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_bwd(bf16* dlogits, const bf16* logits, const float* lse,
                       const int64_t* targets, float scale, int64_t N, int64_t V,
                       const Ctx& ctx) {
  if (N == 0 || V == 0) return;
  AM_CHECK(N < (int64_t(1) << 31), "[cross_entropy_bwd] {} rows: at most 2^31 - 1", N);
  cross_entropy_bwd_kernel<<<unsigned(N), kThreads, 0, ctx.stream>>>(dlogits, logits, lse,
                                                                     targets, scale, V);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
