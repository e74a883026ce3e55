// dist/ep_ipc_cuda.cpp: IpcTransport (dist/ep_ipc.h): EP all-to-all-v rows written by
// cudaMemcpyAsync into the peers' CUDA IPC staging buffers, ordered by interprocess events and
// two host collectives per call (the header says why that ordering is correct).
#include "dist/ep_ipc.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "backend/cuda/common.cuh"
#include "core/check.h"

namespace automoe::dist {

namespace {

size_t row_bytes(const EpA2aTensor& t) { return size_t(t.row_elems) * ep_dtype_bytes(t.dtype); }

// What a rank tells the others at construction (raw bytes through Comm::allgather).
struct RankInfo {
  char host[256];              // gethostname
  char bus[32];                // PCI bus id of its GPU (cudaDeviceGetPCIBusId)
  cudaIpcEventHandle_t ready;  // its interprocess events
  cudaIpcEventHandle_t done;
};

const char* kInstead = "use AUTOMOE_EP_TRANSPORT=nccl (a GPU per rank) or mpi (any placement)";

// Every rank learns whether any rank failed, and throws together with it (a rank that threw
// alone would leave the others blocked in the next collective). `why` is empty where it went
// well here.
void fail_together(const Comm& ep, const std::string& why) {
  int64_t bad = why.empty() ? 0 : 1;
  ep.allreduce_max(&bad, 1);
  if (bad == 0) return;
  if (!why.empty()) AM_FAIL("[ep ipc] rank {}: {}", ep.rank(), why);
  AM_FAIL("[ep ipc] another rank of the EP group cannot use CUDA IPC (its message says why); {}",
          kInstead);
}

std::string cuda_error(const char* what, cudaError_t e) {
  cudaGetLastError();  // the cudaIpc and peer errors are not sticky: clear the last error
  return std::string(what) + " failed: " + cudaGetErrorString(e);
}

}  // namespace

IpcTransport::IpcTransport(const Comm& ep)
    : ep_(ep),
      peer_(size_t(ep.size()), nullptr),
      peer_ready_(size_t(ep.size()), nullptr),
      peer_done_(size_t(ep.size()), nullptr),
      mine_(size_t(ep.size()) + 1, 0),
      all_(size_t(ep.size()) * (size_t(ep.size()) + 1), 0) {
  const int P = ep_.size(), me = ep_.rank();
  // Every failure up to fail_together() below goes into `why`, never a throw of its own: under
  // `auto` GpuComms catches this constructor's exception and falls back to NCCL, so a rank that
  // threw alone (a CUDA_CHECK) would go on to NCCL's bootstrap (a host broadcast over the world)
  // while the others still sit in this constructor's all-gather: mismatched host collectives.
  std::string why;
  auto cuda_ok = [&](cudaError_t err, const char* what) {
    if (err != cudaSuccess && why.empty()) why = cuda_error(what, err);
    return why.empty();
  };
  const unsigned flags = cudaEventInterprocess | cudaEventDisableTiming;
  if (cuda_ok(cudaGetDevice(&device_), "cudaGetDevice") &&
      cuda_ok(cudaEventCreateWithFlags(&ready_, flags), "cudaEventCreateWithFlags (interprocess)") &&
      cuda_ok(cudaEventCreateWithFlags(&done_, flags), "cudaEventCreateWithFlags (interprocess)") &&
      // recorded once, so a peer's first wait finds a completed record
      cuda_ok(cudaEventRecord(ready_, nullptr), "cudaEventRecord") &&
      cuda_ok(cudaEventRecord(done_, nullptr), "cudaEventRecord"))
    cuda_ok(cudaEventSynchronize(done_), "cudaEventSynchronize");
  peer_ready_[size_t(me)] = ready_;
  peer_done_[size_t(me)] = done_;

  RankInfo mine{};
  if (gethostname(mine.host, sizeof(mine.host) - 1) != 0 && why.empty()) why = "gethostname failed";
  if (why.empty()) cuda_ok(cudaDeviceGetPCIBusId(mine.bus, int(sizeof(mine.bus)), device_),
                           "cudaDeviceGetPCIBusId");
  cudaError_t e = cudaSuccess;
  if (why.empty()) {
    e = cudaIpcGetEventHandle(&mine.ready, ready_);
    if (e == cudaSuccess) e = cudaIpcGetEventHandle(&mine.done, done_);
    cuda_ok(e, "cudaIpcGetEventHandle");
  }
  std::vector<RankInfo> all(static_cast<size_t>(P));
  ep_.allgather(all.data(), &mine, int64_t(sizeof(RankInfo)));

  // One node (every rank sees the same gathered names, so every rank decides the same).
  for (int p = 0; p < P && why.empty(); ++p)
    if (std::strncmp(all[size_t(p)].host, all[0].host, sizeof(mine.host)) != 0)
      why = std::string("ranks 0 and ") + std::to_string(p) + " run on different nodes (" +
            all[0].host + ", " + all[size_t(p)].host + "); CUDA IPC works within a node only";
  // Peer access between different GPUs (the same GPU needs none).
  for (int p = 0; p < P && why.empty(); ++p) {
    if (p == me || std::strcmp(all[size_t(p)].bus, mine.bus) == 0) continue;
    int dev = -1;
    if (cudaDeviceGetByPCIBusId(&dev, all[size_t(p)].bus) != cudaSuccess) {
      // rank p's GPU is hidden from this process (per-rank CUDA_VISIBLE_DEVICES): the IPC
      // open below still maps it, but peer access cannot be checked or enabled from here
      cudaGetLastError();
      continue;
    }
    int can = 0;
    if (!cuda_ok(cudaDeviceCanAccessPeer(&can, device_, dev), "cudaDeviceCanAccessPeer")) break;
    if (!can) {
      why = std::string("GPU ") + mine.bus + " has no peer access to rank " + std::to_string(p) +
            "'s GPU " + all[size_t(p)].bus + " (cudaDeviceCanAccessPeer: no; a PCIe machine " +
            "without P2P)";
      break;
    }
    e = cudaDeviceEnablePeerAccess(dev, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
    else if (e != cudaSuccess) why = cuda_error("cudaDeviceEnablePeerAccess", e);
  }
  for (int p = 0; p < P && why.empty(); ++p) {
    if (p == me) continue;
    e = cudaIpcOpenEventHandle(&peer_ready_[size_t(p)], all[size_t(p)].ready);
    if (e == cudaSuccess) e = cudaIpcOpenEventHandle(&peer_done_[size_t(p)], all[size_t(p)].done);
    if (e != cudaSuccess) why = cuda_error("cudaIpcOpenEventHandle", e);
  }
  fail_together(ep_, why.empty() ? why : why + "; " + kInstead);
}

IpcTransport::~IpcTransport() {
  // Local, never collective (it runs while an error unwinds, too). A peer's writes into own_
  // precede this rank's last copy-out (it waited on them), so after the synchronize nothing
  // of this rank's calls is in flight; the peers map own_ until they close it themselves.
  cudaDeviceSynchronize();
  close_peers();
  const int me = ep_.rank();
  for (size_t p = 0; p < peer_ready_.size(); ++p) {
    if (int(p) == me) continue;
    if (peer_ready_[p]) cudaEventDestroy(peer_ready_[p]);
    if (peer_done_[p]) cudaEventDestroy(peer_done_[p]);
  }
  if (own_) cudaFree(own_);
  if (ready_) cudaEventDestroy(ready_);
  if (done_) cudaEventDestroy(done_);
}

void IpcTransport::close_peers() {
  for (size_t p = 0; p < peer_.size(); ++p) {
    if (int(p) != ep_.rank() && peer_[p]) cudaIpcCloseMemHandle(peer_[p]);
    peer_[p] = nullptr;
  }
}

void IpcTransport::grow(size_t bytes) {
  const int P = ep_.size(), me = ep_.rank();
  // Nothing of this rank's may touch any staging now (its writes into the peers, its
  // copy-outs), and no rank may free before every rank has closed its mapping.
  CUDA_CHECK(cudaDeviceSynchronize());
  ep_.barrier();
  close_peers();
  ep_.barrier();
  if (own_) CUDA_CHECK(cudaFree(own_));
  own_ = nullptr;
  cap_ = 0;
  std::string why;
  cudaIpcMemHandle_t mine{};
  cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&own_), bytes);
  if (e != cudaSuccess) {
    own_ = nullptr;
    why = cuda_error("cudaMalloc of the IPC staging", e) + " (" + std::to_string(bytes) +
          " bytes: the largest all-to-all this rank receives)";
  } else {
    e = cudaIpcGetMemHandle(&mine, own_);
    if (e != cudaSuccess) why = cuda_error("cudaIpcGetMemHandle", e);
  }
  std::vector<cudaIpcMemHandle_t> all(static_cast<size_t>(P));
  ep_.allgather(all.data(), &mine, int64_t(sizeof(mine)));
  fail_together(ep_, why.empty() ? why : why + "; " + kInstead);
  peer_[size_t(me)] = own_;
  for (int p = 0; p < P && why.empty(); ++p) {
    if (p == me) continue;
    void* ptr = nullptr;
    e = cudaIpcOpenMemHandle(&ptr, all[size_t(p)], cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) why = cuda_error("cudaIpcOpenMemHandle", e);
    else peer_[size_t(p)] = static_cast<unsigned char*>(ptr);
  }
  fail_together(ep_, why.empty() ? why : why + "; " + kInstead);
  cap_ = bytes;
}

void IpcTransport::reserve(size_t /*send_bytes*/, size_t recv_bytes) {
  want_ = std::max(want_, recv_bytes);  // local: the next call's all-gather shares it
}

void IpcTransport::alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                             cudaStream_t stream) {
  const int P = ep_.size(), me = ep_.rank();
  size_t rb_all = 0;  // bytes of one row of every tensor together
  for (int k = 0; k < nt; ++k) rb_all += row_bytes(t[k]);
  const size_t W = size_t(P) + 1;  // a rank's all-gathered int64s: send counts, reserved bytes
  auto cnt = [&](int s, int p) { return size_t(all_[size_t(s) * W + size_t(p)]); };  // s -> p

  // 1: every rank's send counts and reservation; from here on every rank is in this call
  std::copy(rows.send_cnt, rows.send_cnt + P, mine_.begin());
  mine_[size_t(P)] = int64_t(want_);
  ep_.allgather(all_.data(), mine_.data(), int64_t(W * sizeof(int64_t)));
  size_t need = 0;  // the largest reservation, or staging any rank needs in this call
  for (int s = 0; s < P; ++s) need = std::max(need, size_t(all_[size_t(s) * W + size_t(P)]));
  for (int p = 0; p < P; ++p) {
    size_t in = 0;
    for (int s = 0; s < P; ++s)
      if (s != p) in += cnt(s, p) * rb_all;
    need = std::max(need, in);
  }
  for (int s = 0; s < P; ++s)
    AM_CHECK(int64_t(cnt(s, me)) == rows.recv_cnt[s], "internal: [ep ipc] rank {} expects {} "
             "rows from rank {}, which sends {}",
             me, rows.recv_cnt[s], s, cnt(s, me));
  if (need > cap_) grow(need);  // every rank computed the same need: all grow, or none
                                // (the first call after a larger reserve(): once)

  // 2-3: into every peer's staging, after its previous copy-out; to itself, send -> recv
  for (int p = 0; p < P; ++p) {
    if (cnt(me, p) == 0) continue;
    if (p != me) CUDA_CHECK(cudaStreamWaitEvent(stream, peer_done_[size_t(p)], 0));
    size_t at = 0;  // this rank's region in p's staging
    for (int s = 0; s < me; ++s)
      if (s != p) at += cnt(s, p) * rb_all;
    for (int k = 0; k < nt; ++k) {
      const size_t rb = row_bytes(t[k]), n = cnt(me, p) * rb;
      const auto* src = static_cast<const unsigned char*>(t[k].send[0]) + rows.send_off[p] * rb;
      if (p == me) {
        auto* dst = static_cast<unsigned char*>(t[k].recv[0]) + rows.recv_off[me] * rb;
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream));
      } else {
        CUDA_CHECK(cudaMemcpyAsync(peer_[size_t(p)] + at, src, n, cudaMemcpyDefault, stream));
        at += n;
      }
    }
  }
  // 4-5: this rank's writes of THIS call are recorded before any peer waits on them
  CUDA_CHECK(cudaEventRecord(ready_, stream));
  ep_.barrier();
  // 6: out of the own staging, each source after its writes
  size_t at = 0;
  for (int s = 0; s < P; ++s) {
    if (s == me || cnt(s, me) == 0) continue;
    CUDA_CHECK(cudaStreamWaitEvent(stream, peer_ready_[size_t(s)], 0));
    for (int k = 0; k < nt; ++k) {
      const size_t rb = row_bytes(t[k]), n = cnt(s, me) * rb;
      auto* dst = static_cast<unsigned char*>(t[k].recv[0]) + rows.recv_off[s] * rb;
      CUDA_CHECK(cudaMemcpyAsync(dst, own_ + at, n, cudaMemcpyDeviceToDevice, stream));
      at += n;
    }
  }
  // 7: the peers' next writes into own_ wait on this
  CUDA_CHECK(cudaEventRecord(done_, stream));
}

void IpcTransport::sync(cudaStream_t stream) { CUDA_CHECK(cudaStreamSynchronize(stream)); }

}  // namespace automoe::dist
