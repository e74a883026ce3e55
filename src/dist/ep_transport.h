// dist/ep_transport.h: how expert-parallel dispatch/combine moves rows between the ranks of an EP
// group on the device. One interface, several transports, so the same EpMoeCuda code runs on all:
//   NcclTransport      (dist/nccl_group.h)         one process per GPU, ncclSend/ncclRecv
//   LoopbackTransport  (dist/ep_loopback_cuda.cpp) all P ranks in ONE process on ONE GPU; the
//                      all-to-all is cudaMemcpyAsync between the ranks' buffers. It exists so a
//                      single GPU can check the EP kernels and layout logic against one GPU.
//   MpiStagedTransport (dist/ep_mpi_staged.h)      one rank per process, rows staged through
//                      pinned host memory and MPI_Alltoallv: several processes on one GPU, or
//                      no NCCL.
//   IpcTransport       (dist/ep_ipc.h)             one rank per process, the ranks of one node:
//                      rows copied into fixed regions of the peers' CUDA IPC staging buffers
//                      (NVLink P2P between GPUs, or several processes on one GPU), ordered by
//                      flags on the device: no host collective or host wait per call. auto's
//                      choice within a node.
// A process drives num_local() ranks (1 over NCCL, P in loopback); every call below is collective
// over the group and takes the buffers of all the ranks this process drives, in local order.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "core/check.h"

namespace automoe::dist {

enum class EpDtype { kBf16, kF32, kI32 };
inline size_t ep_dtype_bytes(EpDtype t) { return t == EpDtype::kBf16 ? 2 : 4; }

// One tensor of an all-to-all-v: rows of row_elems elements of dtype.
struct EpA2aTensor {
  EpDtype dtype = EpDtype::kBf16;
  int64_t row_elems = 0;
  const void* const* send = nullptr;  // [num_local] device buffers
  void* const* recv = nullptr;        // [num_local] device buffers
};

// Which rows move, on the host, at [i*P + p] for local rank i and peer p (rows, not bytes):
// rows [send_off, send_off + send_cnt) of send[i] go to peer p and land at rows
// [recv_off, recv_off + recv_cnt) of peer p's recv buffer, where p's recv_cnt from i must equal
// i's send_cnt to p.
struct EpA2aRows {
  const int64_t* send_off = nullptr;
  const int64_t* send_cnt = nullptr;
  const int64_t* recv_off = nullptr;
  const int64_t* recv_cnt = nullptr;
};

class EpTransport {
 public:
  virtual ~EpTransport() = default;
  virtual const char* name() const = 0;
  virtual int size() const = 0;              // P, ranks in the EP group
  virtual int num_local() const = 0;         // ranks this process drives
  virtual int rank_of(int local) const = 0;  // the EP rank of local rank `local`
  // The largest bytes one alltoallv() call will send and receive (all tensors, all peers), and
  // the largest bytes one rank sends to ONE peer in one call (all tensors): a transport that
  // stages rows allocates for them here, once (EpMoeCuda's constructor calls it). Collective
  // for IpcTransport (its peers' regions are pair_bytes each, the same on every rank): every
  // rank of the group calls it the same number of times in the same order, i.e. every rank
  // builds the same EpMoeCuda blocks in the same order. NCCL and loopback ignore it; MPI
  // staging allocates locally.
  virtual void reserve(size_t send_bytes, size_t recv_bytes, size_t pair_bytes) {}
  // The all-to-all-v of nt tensors sharing one row plan, enqueued on `stream` (one group of
  // sends and receives over NCCL). Does not wait for the host.
  virtual void alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                         cudaStream_t stream) = 0;
  // Waits until everything enqueued on `stream` has finished (the one host sync of the counts
  // mode, and the end of a step). Over NCCL and IPC, with a timeout; throws on a failed or lost
  // peer.
  virtual void sync(cudaStream_t stream) = 0;

  // Direct dispatch (IpcTransport; can_push() says): one call in the transport's order, in three
  // steps, so that a kernel stores the rows into the peers itself, from counts that are only on
  // the device (cuda::ep_dispatch_push), while the host still waits for them.
  //   push_begin  opens the call: `stream` waits until every peer has copied this rank's rows of
  //               the previous call out; region[p] (p != rank) gets peer p's region for this
  //               rank, `cap` bytes, to be filled as alltoallv() fills it (tensor after tensor,
  //               send_cnt rows each).
  //   push_end    after the kernel, on the same stream: the peers are told the rows are there.
  //   push_recv   the rest of the call, the row plan now on the host: this rank's rows to
  //               itself (send -> recv) and every source's region out into recv, as alltoallv();
  //               t: the tensors the kernel wrote, in region order.
  //   push_mail   between push_begin and the kernel, on the same stream: `words` int32 of this
  //               rank (words_dev, on the device; at most kEpMailWords) go to every rank ahead
  //               of the rows, and every rank's words come back to the host: host[s * words + j]
  //               is word j of rank s (this rank's own included), once `done` (recorded here,
  //               on a stream of the transport's) has completed; wait_event(done) waits for it.
  //               The rows' kernel is queued right after, so they travel while the host waits
  //               for the words (the dispatch's counts) and plans.
  // One process drives one rank here. No host wait in any of them.
  static constexpr int kEpMailWords = 32;
  virtual bool can_push() const { return false; }
  virtual void push_begin(cudaStream_t /*stream*/, unsigned char** /*region [P]*/, size_t* /*cap*/) {
    no_push();
  }
  virtual void push_mail(cudaStream_t /*stream*/, const int32_t* /*words_dev*/, int /*words*/,
                         int32_t* /*host [P x words], pinned*/, cudaEvent_t /*done*/) {
    no_push();
  }
  virtual void push_end(cudaStream_t /*stream*/) { no_push(); }
  virtual void push_recv(const EpA2aTensor* /*t*/, int /*nt*/, const EpA2aRows& /*rows*/,
                         cudaStream_t /*stream*/) {
    no_push();
  }
  // In-place receive: alltoallv() without gathering the rows into recv, for a reader that takes
  // them from wherever they are (cuda::ep_combine_unpack_sources). Afterwards, in `stream`'s
  // order, the rows that alltoallv() would put at rows [recv_off[s], recv_off[s] + recv_cnt[s])
  // of t[k].recv[0] are at src[k * P + s] (row 0 there the first of them), and stay there until
  // inplace_end() is enqueued on the reader's stream after its last read. One process drives
  // one rank here (num_local() == 1). The default is alltoallv() with src pointing into recv;
  // IpcTransport points src into its staging regions (s == rank: into t[k].send) and holds them
  // until inplace_end, so the gather's copy never happens.
  virtual void alltoallv_inplace(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                                 cudaStream_t stream, const void** src) {
    AM_CHECK(num_local() == 1, "internal: [ep {}] alltoallv_inplace drives one rank", name());
    alltoallv(t, nt, rows, stream);
    const int P = size();
    for (int k = 0; k < nt; ++k)
      for (int s = 0; s < P; ++s)
        src[k * P + s] = static_cast<const unsigned char*>(t[k].recv[0]) +
                         rows.recv_off[s] * t[k].row_elems * int64_t(ep_dtype_bytes(t[k].dtype));
  }
  virtual void inplace_end(cudaStream_t /*stream*/) {}

  // Waits until `ev` (recorded on a stream of this group's calls) has completed: with sync()'s
  // timeout and failure; the default waits without one (loopback, MPI staging).
  virtual void wait_event(cudaEvent_t ev) {
    const cudaError_t e = cudaEventSynchronize(ev);
    AM_CHECK(e == cudaSuccess, "[ep {}] the wait for the EP counts failed: {}", name(),
             cudaGetErrorString(e));
  }

 private:
  void no_push() const {
    AM_FAIL("internal: the {} EP transport has no direct dispatch (check can_push())", name());
  }
};

// All P ranks of the group in this process, on the current device.
class LoopbackTransport final : public EpTransport {
 public:
  explicit LoopbackTransport(int P);
  const char* name() const override { return "loopback"; }
  int size() const override { return P_; }
  int num_local() const override { return P_; }
  int rank_of(int local) const override { return local; }
  void alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                 cudaStream_t stream) override;
  void sync(cudaStream_t stream) override;

 private:
  int P_;
};

}  // namespace automoe::dist
