// backend/cuda/device.cuh: device helpers shared by the kernels (.cu files only): bf16
// conversion, warp and block reductions, grid sizing, and the column-sum reduction that
// parameter gradients (RMSNorm weight, linear bias, aux-loss probabilities) are made of.
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "backend/cuda/common.cuh"

namespace automoe::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ bf16 to_bf(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sum over the block, result in every thread. `red` is __shared__ T[32]; blockDim.x is a
// multiple of 32. Fixed order, so the result is deterministic. T = float or double.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : T(0);
  return warp_sum(v);
}

// Exclusive prefix sum over the block (one value per thread); `total` gets the sum.
// `tmp` is __shared__ int[32]; the caller syncs before reusing it.
__device__ __forceinline__ int block_exclusive_scan(int v, int* tmp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int x = v;  // inclusive scan within the warp
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) tmp[warp] = x;
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the warp totals
    int w = lane < nwarps ? tmp[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nwarps) tmp[lane] = w;
  }
  __syncthreads();
  total = tmp[nwarps - 1];
  return (warp > 0 ? tmp[warp - 1] : 0) + x - v;
}

// Online softmax state: running max m and sum s of exp(x - m). Merging is associative.
struct MaxSum {
  float m, s;
};
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
  float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// RoPE's rotation of the pair (a, b) by the angle with cos c, sin s: (a c - b s, b c + a s),
// each product rounded before the sum (no FMA contraction), so every kernel that rotates (rope,
// qk_norm_rope) gets the same bits whatever the compiler fuses around it.
__device__ __forceinline__ float rot_lo(float a, float b, float c, float s) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
__device__ __forceinline__ float rot_hi(float a, float b, float c, float s) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// 8 bf16 packed in one uint4 <-> 8 floats (rounded to nearest when packing).
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}
// 8 consecutive bf16 <-> 8 floats through one 16-byte access (p 16-byte aligned).
__device__ __forceinline__ void load8(const bf16* p, float (&f)[8]) {
  unpack8(*reinterpret_cast<const uint4*>(p), f);
}
__device__ __forceinline__ void store8(bf16* p, const float (&f)[8]) {
  *reinterpret_cast<uint4*>(p) = pack8(f);
}
inline bool aligned_16b(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Rows of C bf16 can move as 16-byte chunks (uint4) between these buffers.
inline bool rows_16b(int64_t C, const void* a, const void* b) {
  return C % 8 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

// Blocks for a grid-stride loop over n items: enough to fill the device, never more than needed.
inline unsigned grid_for(int64_t n, int threads, const Ctx& ctx) {
  int64_t need = (n + threads - 1) / threads;
  int64_t cap = int64_t(ctx.num_sms) * 16;
  return unsigned(std::max<int64_t>(1, std::min(need, cap)));
}

// ---- column sums: out[c] += sum_n a[n,c] * (b ? b[n,c] : 1) * (rs ? rs[n] : 1) ----------------
// Deterministic two-stage reduction (no atomics): row chunks write partial sums to the
// workspace, then one pass adds them in chunk order. In colsum.cu.
int64_t colsum_chunks(int64_t N);
inline size_t colsum_workspace_bytes(int64_t N, int64_t C) {
  return size_t(colsum_chunks(N)) * size_t(C) * sizeof(float);
}
void colsum_accumulate(float* out, const bf16* a, const bf16* b, const float* rs, int64_t N,
                       int64_t C, const Ctx& ctx, const char* op);
void colsum_accumulate(float* out, const float* a, int64_t N, int64_t C, const Ctx& ctx,
                       const char* op);
// The second stage alone, for kernels that write their own partial rows: out[c] += sum over
// r < chunks of part[r, c], in a fixed order.
void colsum_finish(float* out /*[C] +=*/, const float* part /*[chunks,C]*/, int64_t chunks,
                   int64_t C, const Ctx& ctx);

}  // namespace automoe::cuda
