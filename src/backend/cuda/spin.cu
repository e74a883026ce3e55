// backend/cuda/spin.cu: gpu_spin (declaration and purpose in spin.h).
#include "backend/cuda/common.cuh"
#include "backend/cuda/spin.h"

namespace automoe::cuda {

namespace {

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void spin_kernel(int64_t ns) {
  const uint64_t t0 = global_ns();
  while (global_ns() - t0 < uint64_t(ns)) {
  }
}

}  // namespace

void gpu_spin(int64_t ns, cudaStream_t stream) {
  if (ns <= 0) return;
  spin_kernel<<<1, 1, 0, stream>>>(ns);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
