// dist/nccl_group.h: an NCCL communicator over an existing dist::Comm (one process per GPU), and
// the EP transport over it. Only in builds with NCCL (the automoe_nccl target; AUTOMOE_HAVE_NCCL).
//
// Bootstrap: rank 0 makes the ncclUniqueId, broadcast over the host Comm (MPI or TCP). The
// communicator is non-blocking (ncclConfig blocking = 0), so no NCCL call can hang the host:
// init, group launches and the waits poll ncclCommGetAsyncError (and the stream) until done, an
// error, or AUTOMOE_NCCL_TIMEOUT_S seconds (default 300). On error or timeout the message is
// printed at once (which rank, what and what to do), every communicator of the process is
// aborted (ncclCommAbort, which also stops its kernels; all of them together, see
// nccl_group.cpp), and an automoe::Error carries the message to the caller's top level, which
// stops the job (dist::abort_all). A failed host collective aborts them too
// (dist::collective_failed).
#pragma once
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <string>

#include "backend/cuda/common.cuh"
#include "dist/ep_transport.h"
#include "dist/process_group.h"

namespace automoe::dist {

class NcclGroup {
 public:
  // Collective over `comm`; `device` is this process's GPU (made current here).
  NcclGroup(const Comm& comm, int device);
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  ncclComm_t comm() const { return comm_; }
  double timeout_s() const { return timeout_s_; }

  // ncclGroupStart / ncclGroupEnd; end() waits (with the timeout) until the group is enqueued.
  void group_start();
  void group_end(const char* what);
  // Point-to-point inside a group: `count` elements of `type`.
  void send(const void* buf, size_t count, ncclDataType_t type, int peer, cudaStream_t stream);
  void recv(void* buf, size_t count, ncclDataType_t type, int peer, cudaStream_t stream);

  // All-to-all-v of rows of row_elems elements (T = bf16, float, int32_t): send rows
  // [send_off[p], +send_cnt[p]) to rank p, receive recv_cnt[p] rows from p at recv_off[p].
  // Host arrays [size()], in rows. One NCCL group.
  template <class T>
  void alltoallv(T* recv, const int64_t* recv_off, const int64_t* recv_cnt, const T* send,
                 const int64_t* send_off, const int64_t* send_cnt, int64_t row_elems,
                 cudaStream_t stream);
  // ncclAlltoAll: `count` elements of `type` to and from every rank (the bandwidth baseline).
  void alltoall(void* recv, const void* send, size_t count, ncclDataType_t type,
                cudaStream_t stream);

  // In-place sums over the group: buffer i holds counts[i] elements of `type` (gradient
  // tensors); ncclAllReduce calls grouped (at most 256 per NCCL group), enqueued on `stream`.
  void allreduce_sum(void* const* bufs, const size_t* counts, int n, ncclDataType_t type,
                     cudaStream_t stream);

  // In place, enqueued on `stream` (ZeRO, dist/zero_cuda.h): buf holds size() blocks of `count`
  // elements. reduce_scatter_sum: block rank() <- the sum over the group of every rank's block
  // rank() (ncclReduceScatter). allgather: block r <- rank r's block r (ncclAllGather).
  void reduce_scatter_sum(void* buf, size_t count, ncclDataType_t type, cudaStream_t stream);
  void allgather(void* buf, size_t count, ncclDataType_t type, cudaStream_t stream);
  // ZeRO-3 (dist/zero3_cuda.h), enqueued on `stream`: recv[count] <- root's send[count]
  // (ncclBroadcast; send is read on root only); root's recv[count] <- the sum over the group of
  // every rank's send[count] (ncclReduce; recv is written on root only; may alias send).
  void broadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                 cudaStream_t stream);
  void reduce_sum(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                  cudaStream_t stream);

  // Waits for `stream` to drain, polling the communicator: throws (after aborting it) on an
  // NCCL error or when the timeout passes.
  void wait(cudaStream_t stream, const char* what);
  // The same for an event already recorded (on any stream of this device).
  void wait_event(cudaEvent_t ev, const char* what);
  // Prints the error (dist::collective_failed), aborts the communicator and every other
  // NcclGroup alive in this process (the job is ending; see nccl_group.cpp), and throws an Error
  // naming this rank, `what` and `why`.
  [[noreturn]] void fail(const char* what, const std::string& why);
  // Aborts every live communicator of the process at once, each on a thread of its own, and
  // waits for them (bounded: else dist::abort_all ends the process). The stopper that
  // dist::stop_device_collectives runs; idempotent.
  static void abort_every_live();

 private:
  void check(ncclResult_t r, const char* what);  // ncclSuccess / ncclInProgress, else fail()
  void poll_ready(const char* what);             // until the async state leaves ncclInProgress
  void unregister();                             // leaves the process's list of live groups

  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1, device_ = 0;
  double timeout_s_ = 300;
  bool aborted_ = false;
  cudaEvent_t done_ = nullptr;  // wait(): recorded on the stream, then polled
};

ncclDataType_t nccl_type(EpDtype t);

// EpTransport over an NcclGroup: this process is one rank of the group.
class NcclTransport final : public EpTransport {
 public:
  explicit NcclTransport(NcclGroup& g) : g_(g) {}
  const char* name() const override { return "nccl"; }
  int size() const override { return g_.size(); }
  int num_local() const override { return 1; }
  int rank_of(int) const override { return g_.rank(); }
  void alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                 cudaStream_t stream) override;
  void sync(cudaStream_t stream) override { g_.wait(stream, "EP dispatch/combine"); }
  void wait_event(cudaEvent_t ev) override { g_.wait_event(ev, "EP counts"); }

 private:
  NcclGroup& g_;
};

}  // namespace automoe::dist
