// dist/data_parallel_cuda.h: the device twin of dist/data_parallel.h for GPU ranks: the gradient
// arena's all-reduce (replicated tensors summed over the world, expert shards over their DP
// group) and the global gradient norm (each expert counted once: shard sums added over the EP
// group), on any device arena laid out as a list of tensors.
//
// With NCCL communicators (use_nccl; given when the ranks run over NCCL): one ncclAllReduce per
// tensor in place, grouped, on the stream (bf16 arenas: each of NCCL's additions is rounded to
// bf16; with 2 ranks that is one rounding, as below; every rank gets the same bits), then a
// timed wait.
// Otherwise (MPI staging, the first version and the fallback): a bucket of at most kBucket
// elements is copied device -> pinned host, widened to fp32, summed with one MPI_Allreduce
// (dist::Comm) and rounded back once (bf16 arenas) before the copy host -> device. Every rank
// receives the same sum, so replicated weights stay bit-identical after AdamW. It synchronises
// the host once per bucket: correct and simple, not fast. allreduce() reduces a whole arena after
// the backward; allreduce_tensor() one tensor now (the memory-saving mode, whose AdamW runs in
// the backward, reduces each tensor as its gradient completes: same sums, same roundings).
// Buffers are allocated once, in the constructor.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/common.cuh"
#include "dist/process_group.h"

namespace automoe::dist {

// One tensor of a device arena: elements [off, off + n); expert = an expert shard.
struct DeviceTensor {
  int64_t off = 0, n = 0;
  bool expert = false;
};

class NcclGroup;

class DeviceGradReducer {
 public:
  static constexpr int64_t kBucket = int64_t(1) << 24;  // elements per MPI_Allreduce
  DeviceGradReducer(const Groups& g, std::vector<DeviceTensor> tensors);
  ~DeviceGradReducer();
  DeviceGradReducer(const DeviceGradReducer&) = delete;
  DeviceGradReducer& operator=(const DeviceGradReducer&) = delete;

  // NCCL communicators of the world and the DP group (null: that group is one rank, or MPI).
  void use_nccl(NcclGroup* world, NcclGroup* dp) {
    nccl_world_ = world;
    nccl_dp_ = dp;
  }
  // Sums the arena's gradients over the ranks (=, in place); work enqueued on `stream` before
  // the call is waited for, the uploads are enqueued on it. Collective over world and dp.
  void allreduce(cuda::bf16* grads, cudaStream_t stream);
  void allreduce(float* grads, cudaStream_t stream);
  // Sums tensor k's gradient (tensors()[k]: its size and group), held at `g` (its place in an
  // arena or a scratch of its size), now and in place: over the world, or over the DP group for an
  // expert shard. The same sum and rounding as allreduce(). Over NCCL it is enqueued on `stream`
  // without a host wait (wait() waits); over MPI staging it synchronises like allreduce().
  // Collective: every rank calls it for the same k in the same order.
  void allreduce_tensor(size_t k, cuda::bf16* g, cudaStream_t stream);
  // NCCL: waits (with the communicators' timeout) for what allreduce_tensor() enqueued; over MPI
  // staging nothing is left in flight, so it returns at once.
  void wait(cudaStream_t stream);
  // sumsq[t] (device, f64, one per tensor, after the all-reduce) -> the global sum of squares:
  // replicated tensors once, expert shards summed over the EP group. Waits for the stream.
  // Collective over the EP group.
  double global_sumsq(const double* sumsq, cudaStream_t stream);
  // x[n] f64 on the device summed over `c` in place (the aux loss statistics). Waits for the
  // stream; the upload is enqueued on it.
  void allreduce_small(double* x, int64_t n, const Comm& c, cudaStream_t stream);

  const std::vector<DeviceTensor>& tensors() const { return t_; }

 private:
  struct Range {  // one tensor's elements on the device
    void* p;
    int64_t n;
  };
  template <class T>
  void reduce(T* grads, cudaStream_t stream);  // allreduce(): every tensor, grouped
  // ranges_ summed over the world (replicated) or the DP group (expert shards)
  template <class T>
  void reduce_ranges(bool expert, bool wait, cudaStream_t stream);
  template <class T>
  void reduce_mpi(const Comm& c, cudaStream_t stream);
  template <class T>
  void reduce_nccl(NcclGroup& g, bool wait, cudaStream_t stream);

  Groups g_;  // copies share the communicators
  std::vector<DeviceTensor> t_;
  void* pin_ = nullptr;        // cudaMallocHost, kBucket * 4 bytes: the bucket as it moves
  std::vector<float> sum_;     // [kBucket] fp32 bucket for MPI
  std::vector<double> small_;  // allreduce_small / global_sumsq staging
  NcclGroup *nccl_world_ = nullptr, *nccl_dp_ = nullptr;
  std::vector<Range> ranges_;     // the tensors of one reduce (reused: no allocation per step)
  std::vector<void*> bufs_;       // NCCL: the same as pointers and counts
  std::vector<size_t> counts_;
};

}  // namespace automoe::dist
