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
// the backward, reduces each tensor as its gradient completes: same sums, same roundings);
// allreduce_async() a group of adjacent tensors on the reducer's own stream, overlapped with the
// rest of the backward (the default mode; join() ends it). Buffers, the stream and its events
// are allocated once, in the constructor.
//
// The overlapped reduce and NCCL's rules for several communicators. Its NCCL calls go to the
// world and DP communicators on the comm stream, while the EP transport's go to the EP
// communicator on the compute stream. NCCL allows operations of different communicators to run
// at the same time when every rank issues them in the same order: here one host thread issues
// every NCCL call of a step (grad buckets and EP all-to-alls alike) in an order fixed by the
// layout and the layer loop, the same on every rank, and each communicator's calls are on one
// stream. The dependency is one-way: the comm stream waits on events of the compute stream,
// which never waits on the comm stream before join(); so a bucket's kernels on every rank can
// start once each rank's compute stream has passed the bucket's event, which needs no later
// host action and no progress of the comm stream. What NCCL's documentation still warns about
// is a GPU that cannot run the kernels of both communicators at once (each takes a few SMs, far
// from an H200's 132; the compute kernels around them always finish) or a device
// synchronisation inside NCCL (it would wait for kernels that finish by the argument above);
// the comm stream has the highest priority, so its kernels get SMs first. Were it to stall
// anyway, the timed waits end the job with an error rather than a hang, and
// AUTOMOE_GRAD_OVERLAP=0 reduces after the backward instead.
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
  // Sums tensors [k0, k1) of the bf16 arena `grads` (adjacent in it, as the layout orders them;
  // the caller has just completed their gradients on `stream`) over their groups, in place, on
  // the reducer's comm stream after the work enqueued on `stream` so far: each run of adjacent
  // replicated tensors is one range over the world (with the zero padding between them), each run
  // of expert shards one over the DP group; the same sums and rounding as allreduce() (with 2
  // ranks the same bits). NCCL: enqueued, no host wait. MPI staging: host-staged on the comm
  // stream, one host sync per bucket (which waits for `stream` up to here: correct, not
  // overlapped). Collective: every rank calls it with the same [k0, k1) in the same order.
  void allreduce_async(size_t k0, size_t k1, cuda::bf16* grads, cudaStream_t stream);
  // `stream` waits (on the device) for everything allreduce_async() enqueued; no host wait. A
  // no-op when nothing is in flight.
  void join(cudaStream_t stream);
  // NCCL: waits (with the communicators' timeout) for what allreduce_tensor() enqueued on
  // `stream` (after join(stream): also allreduce_async()'s); over MPI staging nothing is left in
  // flight, so it returns at once.
  void wait(cudaStream_t stream);
  // sumsq[t] (device, f64, one per tensor, after the all-reduce) -> the global sum of squares:
  // replicated tensors once, expert shards summed over the EP group. Waits for the stream.
  // Collective over the EP group.
  double global_sumsq(const double* sumsq, cudaStream_t stream);
  // x[n] f64 on the device summed over `c` in place (the aux loss statistics). Waits for the
  // stream; the upload is enqueued on it.
  void allreduce_small(double* x, int64_t n, const Comm& c, cudaStream_t stream);
  // The host's waits on the step's work (the model's loss, grad norm and upload waits, and the
  // two above). Over NCCL timed like every NCCL wait (AUTOMOE_NCCL_TIMEOUT_S): a stream stuck
  // behind an NCCL kernel whose peer stopped makes every communicator abort and this throw,
  // where cudaEventSynchronize would block forever. Without NCCL the plain CUDA waits (the
  // host collectives that follow are timed on their own).
  void host_sync(cudaStream_t stream, const char* what);
  void host_wait(cudaEvent_t ev, const char* what);

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
  cudaStream_t comm_ = nullptr;  // allreduce_async's stream (highest priority)
  cudaEvent_t ready_ = nullptr;  // recorded on the caller's stream; comm_ waits on it
  cudaEvent_t done_ = nullptr;   // recorded on comm_ by join(); the caller's stream waits on it
  bool pending_ = false;         // allreduce_async() work not yet joined
};

}  // namespace automoe::dist
