// backend/cuda/cross_entropy.cu: softmax cross-entropy over bf16 logits, -100 ignored. The
// forward streams each row once with an online max/sum (no fp32 copy of the logits); the
// backward writes the bf16 gradient element-wise (in place allowed).
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kIgnore = -100;

// Block per row: thread i keeps (max, sum exp) over v = i, i+256, ...; the block merges the
// states (warp shuffles, then warp 0 over the warp results) and thread 0 writes lse and loss.
// A target outside [0, V) other than -100 gives a NaN loss (visible, never an out-of-range read).
__global__ void cross_entropy_fwd_kernel(float* losses, float* lse, const bf16* logits,
                                         const int64_t* targets, int64_t V) {
  __shared__ MaxSum red[32];
  const int64_t n = blockIdx.x;
  const bf16* l = logits + n * V;
  MaxSum st{-INFINITY, 0.f};
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float x = to_f(l[v]);
    if (x > st.m) {
      st.s = st.s * expf(st.m - x) + 1.f;
      st.m = x;
    } else {
      st.s += expf(x - st.m);
    }
  }
  for (int o = 16; o > 0; o >>= 1)
    st = maxsum_merge(
        st, {__shfl_xor_sync(kFullMask, st.m, o), __shfl_xor_sync(kFullMask, st.s, o)});
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (threadIdx.x != 0) return;
  MaxSum all = red[0];
  for (int w = 1; w < kThreads / 32; ++w) all = maxsum_merge(all, red[w]);
  const float z = all.m + logf(all.s);
  lse[n] = z;
  const int64_t t = targets[n];
  losses[n] = t == kIgnore ? 0.f : (t >= 0 && t < V) ? z - to_f(l[t]) : NAN;
}

// Block per row: d = scale * (exp(l - lse) - [v == target]); ignored rows get 0. The row's
// target and lse are read once; elements move 8 at a time (16-byte loads and stores) when V is a
// multiple of 8 and both rows are 16-byte aligned, else one at a time. Each element is read
// before the same thread writes it, so dlogits == logits is safe.
__global__ void cross_entropy_bwd_kernel(bf16* dlogits, const bf16* logits, const float* lse,
                                         const int64_t* targets, float scale, int64_t V) {
  const int64_t n = blockIdx.x, t = targets[n];
  const bf16* l = logits + n * V;
  bf16* d = dlogits + n * V;
  const float z = t == kIgnore ? 0.f : lse[n];
  const float s = t == kIgnore ? 0.f : scale;  // an ignored row: exp(..) * 0 = 0
  const bool vec = V % 8 == 0 && reinterpret_cast<uintptr_t>(l) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(d) % 16 == 0;
  if (vec) {
    for (int64_t j = threadIdx.x; j < V / 8; j += blockDim.x) {
      const uint4 in = reinterpret_cast<const uint4*>(l)[j];
      const bf16* x = reinterpret_cast<const bf16*>(&in);
      uint4 out;
      bf16* o = reinterpret_cast<bf16*>(&out);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float g = t == kIgnore ? 0.f : s * expf(to_f(x[k]) - z);
        if (j * 8 + k == t) g -= s;
        o[k] = to_bf(g);
      }
      reinterpret_cast<uint4*>(d)[j] = out;
    }
  } else {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      float g = t == kIgnore ? 0.f : s * expf(to_f(l[v]) - z);
      if (v == t) g -= s;
      d[v] = to_bf(g);
    }
  }
}

}  // namespace

void cross_entropy_fwd(float* losses, float* lse, const bf16* logits, const int64_t* targets,
                       int64_t N, int64_t V, const Ctx& ctx) {
  AM_CHECK(V > 0, "[cross_entropy_fwd] empty vocabulary");
  if (N == 0) return;
  cross_entropy_fwd_kernel<<<unsigned(N), kThreads, 0, ctx.stream>>>(losses, lse, logits,
                                                                     targets, V);
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
