// backend/cuda/copy_many.cu: many device-to-device copies in one launch (copy_many.h).
// Grid: blockIdx.y is the span, blockIdx.x strides over its chunks; each thread keeps four
// 16-byte loads in flight before it stores them (NVLink stores need bytes in flight).
#include "backend/cuda/copy_many.h"
#include "backend/cuda/device.cuh"

namespace automoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <class V>
__device__ __forceinline__ void copy_vec(V* dst, const V* src, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

__global__ void copy_many_kernel(CopyMany c) {
  const CopySpan s = c.span[blockIdx.y];
  const auto d = reinterpret_cast<uintptr_t>(s.dst), r = reinterpret_cast<uintptr_t>(s.src);
  const uint64_t all = uint64_t(d) | uint64_t(r) | uint64_t(s.bytes);
  if (all % 16 == 0)
    copy_vec(static_cast<uint4*>(s.dst), static_cast<const uint4*>(s.src), s.bytes / 16);
  else if (all % 4 == 0)
    copy_vec(static_cast<uint32_t*>(s.dst), static_cast<const uint32_t*>(s.src), s.bytes / 4);
  else
    copy_vec(static_cast<unsigned char*>(s.dst), static_cast<const unsigned char*>(s.src), s.bytes);
}

}  // namespace

void CopyMany::add(void* dst, const void* src, int64_t bytes) {
  AM_CHECK(bytes >= 0, "internal: [copy_many] a span of {} bytes", bytes);
  if (bytes == 0) return;
  AM_CHECK(n < kCopyManyMax, "internal: [copy_many] more than {} spans in one launch", kCopyManyMax);
  span[n++] = CopySpan{dst, src, bytes};
}

void copy_many(const CopyMany& c, cudaStream_t stream) {
  if (c.n == 0) return;
  int64_t most = 0;
  for (int i = 0; i < c.n; ++i) most = std::max(most, c.span[i].bytes);
  // enough blocks that the largest span's threads each move about kUnroll vectors per pass,
  // at most 64 per span (a few thousand blocks over a call's spans)
  const int64_t per_block = int64_t(kThreads) * 16 * kUnroll;
  const unsigned bx = unsigned(std::clamp<int64_t>((most + per_block - 1) / per_block, 1, 64));
  copy_many_kernel<<<dim3(bx, unsigned(c.n)), kThreads, 0, stream>>>(c);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
