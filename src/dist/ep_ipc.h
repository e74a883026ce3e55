// dist/ep_ipc.h: the EP transport over CUDA IPC buffers (dist/ep_transport.h), one rank per
// process, all ranks of the EP group on ONE node. Each rank owns a receive staging buffer in its
// GPU memory; every peer maps it (cudaIpcOpenMemHandle) and writes its rows straight into it
// with cudaMemcpyAsync (the copy engine; peer-to-peer over NVLink when the GPUs differ), then the
// owner copies them out into the caller's receive buffers. DeepEP's normal mode is the design
// reference (a registered buffer per rank that peers write into), done with copies, not kernels.
//
// Why: no host round trip (MpiStagedTransport) and no NCCL kernels on the SMs; two processes
// on one GPU also work (CUDA IPC within a device), which is how a single GPU checks it.
// Status: auto's choice within a node (dist/gpu_rank.h); checked with two processes on one GPU
// (bench/RESULTS.md), not yet between two GPUs.
//
// Staging layout of rank p (cap_ bytes, the same on every rank; one call at a time):
//   for source s != p in rank order, for tensor k in call order: cnt[s][p] rows of tensor k
// where cnt[s][p] = rows rank s sends to p in this call. The writer s needs the offset of its
// region in p's staging, sum_{s' < s, s' != p} cnt[s'][p] * (bytes of one row of every tensor):
// every call starts with one small MPI all-gather of every rank's send counts (P x (P+1) int64,
// with each rank's reservation), so every rank knows every region and takes the same capacity
// decision (below). Fixed worst-case regions per source would need no exchange, but P times
// the memory. Rows to itself go straight from send to recv, never through the staging.
//
// Ordering of one call on rank r (stream = the caller's; every rank runs the same steps):
//   1 host: all-gather the send counts. When any rank returns, every rank has entered this
//     call, so every rank's host calls of the previous call (its step 7 record) are done.
//   2 stream: wait on done[p] of every peer p it writes to: p finished copying out of its
//     staging in the previous call (write-after-read). cudaStreamWaitEvent waits on the most
//     recent record at the time of the wait; step 1 made that the previous call's.
//   3 stream: copy the rows for each peer into the peer's staging; rows to itself, send -> recv.
//   4 stream: record ready[r].
//   5 host: MPI barrier: every rank has recorded its ready event of THIS call (step 4).
//   6 stream: wait on ready[s] of every peer s that sends to r, then copy the staging out into
//     recv (read-after-write).
//   7 stream: record done[r].
// A peer re-records ready[s] only after step 1 of the next call, which needs r there, after
// r's step 6 waits; it re-records done[p] only after step 5 of the next call, after r's step 2
// waits. So every wait sees the record it means. Nothing waits on the device from the host.
// One stream per transport is assumed (EpMoeCuda passes ctx.stream every time): done[p]
// covers p's copy-out only when p records it on the stream that copied.
//
// Capacity: reserve() is local (ranks may plan at different times); each call all-gathers
// every rank's reservation with its counts, so all ranks see the same largest reservation and
// the same largest need of this call, and grow together when it exceeds the staging: device
// synchronize, barrier, close, reallocate, exchange the handles again. EpMoeCuda reserves its
// worst case up front, so that happens at its first call, once, not on the hot path.
//
// Refused with a sentence (on every rank of the group): ranks on different nodes, two GPUs
// without peer access (a PCIe machine without P2P), a cudaIpc call that fails (containers
// without a shared IPC namespace, MPS setups): use AUTOMOE_EP_TRANSPORT=nccl or mpi there.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dist/ep_transport.h"
#include "dist/process_group.h"

namespace automoe::dist {

class IpcTransport final : public EpTransport {
 public:
  // Collective over `ep`, on the current device (place_on_gpu made it current).
  explicit IpcTransport(const Comm& ep);
  ~IpcTransport() override;  // local: closes the peers' mappings, frees its own (no collective)
  IpcTransport(const IpcTransport&) = delete;
  IpcTransport& operator=(const IpcTransport&) = delete;

  const char* name() const override { return "ipc"; }
  int size() const override { return ep_.size(); }
  int num_local() const override { return 1; }
  int rank_of(int) const override { return ep_.rank(); }
  // Local: remembers recv_bytes; the next call (collective) sizes every rank's staging to the
  // largest reservation over the group, once.
  void reserve(size_t send_bytes, size_t recv_bytes) override;
  void alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                 cudaStream_t stream) override;
  void sync(cudaStream_t stream) override;

 private:
  // Collective (inside a call, every rank with the same `bytes`): every rank's staging becomes
  // `bytes` (after a device synchronize and a barrier), the handles are exchanged again and the
  // peers' opened.
  void grow(size_t bytes);
  void close_peers();  // local: the peers' staging mappings

  Comm ep_;
  int device_ = 0;
  unsigned char* own_ = nullptr;         // [cap_] this rank's receive staging (cudaMalloc)
  size_t cap_ = 0;                       // bytes, the same on every rank
  std::vector<unsigned char*> peer_;     // [P] the peers' staging, mapped here; [rank] = own_
  cudaEvent_t ready_ = nullptr;          // recorded after this rank's writes into the peers
  cudaEvent_t done_ = nullptr;           // recorded after this rank's copy-out of own_
  std::vector<cudaEvent_t> peer_ready_;  // [P] the peers' events, opened here; [rank] = own
  std::vector<cudaEvent_t> peer_done_;   // [P]
  size_t want_ = 0;                      // the largest recv_bytes reserve() was asked here
  std::vector<int64_t> mine_;            // [P+1] this call's send counts, then want_
  std::vector<int64_t> all_;             // [P][P+1] every rank's mine_ (rows s -> p at [s][p])
};

}  // namespace automoe::dist
