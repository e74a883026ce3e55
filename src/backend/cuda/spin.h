// backend/cuda/spin.h: holds a stream busy for a fixed GPU time (one thread reading the global
// nanosecond timer). For benchmarks only: ep_check's --queued-start puts one before each timed
// call, so the host has enqueued the call's work before the GPU reaches it, as in a training
// step where the host runs ahead of the GPU; without it an idle GPU times the host's launches.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace automoe::cuda {

// Enqueues a one-thread kernel that returns `ns` nanoseconds (of %globaltimer) after it starts.
void gpu_spin(int64_t ns, cudaStream_t stream);

}  // namespace automoe::cuda
