// dist/ep_ipc_cuda.cpp: IpcTransport (dist/ep_ipc.h): EP all-to-all-v rows written by
// cudaMemcpyAsync into fixed per-source regions of the peers' CUDA IPC staging, ordered by
// flags in IPC-shared device memory (stream waits on the local flags, stream writes into the
// peers'); the header says why that ordering is correct and deadlock-free.
#include "dist/ep_ipc.h"

#include <cuda.h>  // types and enums of the stream memory operations only: libcuda is not linked
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "backend/cuda/common.cuh"
#include "backend/cuda/copy_many.h"
#include "core/check.h"
#include "dist/comm_backend.h"

namespace automoe::dist {

namespace {

using Clock = std::chrono::steady_clock;

using MemOp = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using BatchOp = CUresult (*)(CUstream, unsigned int, CUstreamBatchMemOpParams*, unsigned int);
constexpr size_t kBatchWords = 6;  // IpcTransport::batch_'s words per operation
static_assert(sizeof(CUstreamBatchMemOpParams) == kBatchWords * sizeof(uint64_t));

// A call's copies: with `sm`, as few kernels as cuda::kCopyManyMax spans allow (one for
// P <= 8; the SMs store into the peers); else a copy-engine cudaMemcpyAsync each.
class Copies {
 public:
  Copies(cudaStream_t s, bool sm) : s_(s), sm_(sm) {}
  void add(void* dst, const void* src, size_t bytes) {
    if (!sm_) {
      if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s_));
      return;
    }
    if (c_.n == cuda::kCopyManyMax) flush();
    c_.add(dst, src, int64_t(bytes));
  }
  void flush() {
    if (!sm_) return;
    cuda::copy_many(c_, s_);
    c_.n = 0;
  }

 private:
  cuda::CopyMany c_;
  cudaStream_t s_;
  bool sm_;
};

size_t row_bytes(const EpA2aTensor& t) { return size_t(t.row_elems) * ep_dtype_bytes(t.dtype); }

// The flags allocation's words (ep_ipc.h): ready[P] | done[P] | mailed[P] | mail[P][kEpMailWords]
size_t flag_words(int P) { return size_t(P) * (3 + EpTransport::kEpMailWords); }
uint32_t* mail_of(uint32_t* flags, int P, int s) {
  return flags + 3 * size_t(P) + size_t(s) * EpTransport::kEpMailWords;
}

// What a rank tells the others at construction (raw bytes through Comm::allgather).
struct RankInfo {
  char host[256];             // gethostname
  char bus[32];               // PCI bus id of its GPU (cudaDeviceGetPCIBusId)
  cudaIpcMemHandle_t flags;   // its flags allocation
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

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Polls `ev` for at most `seconds` (dist::poll_pause between polls): cudaSuccess when it completed,
// cudaErrorNotReady when the time ran out, else the error (never throws: destructors use it).
cudaError_t poll_event(cudaEvent_t ev, double seconds) {
  const auto t0 = Clock::now();
  for (;;) {
    const cudaError_t e = cudaEventQuery(ev);
    const double waited = seconds_since(t0);
    if (e != cudaErrorNotReady || waited > seconds) return e;
    poll_pause(waited);
  }
}

// A driver function by name, for CUDA 12.0's ABI (the _v2 stream memory operations), without
// linking libcuda. Null when the driver has none.
void* driver_fn(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &q);
#else
  const cudaError_t e = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &q);
#endif
  if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return fn;
}

std::string cu_error(const char* what, int r) {
  const char* s = nullptr;
  using ErrFn = CUresult (*)(CUresult, const char**);
  if (auto* f = reinterpret_cast<ErrFn>(driver_fn("cuGetErrorString"))) f(CUresult(r), &s);
  return std::string(what) + " failed: " + (s ? s : "CUresult " + std::to_string(r));
}

}  // namespace

IpcTransport::IpcTransport(const Comm& ep)
    : ep_(ep), peer_(size_t(ep.size()), nullptr), peer_flags_(size_t(ep.size()), nullptr) {
  const int P = ep_.size(), me = ep_.rank();
  timeout_s_ = dist_timeout_s();
  // Every failure up to fail_together() below goes into `why`, never a throw of its own: under
  // `auto` GpuComms catches this constructor's exception and falls back to NCCL, so a rank that
  // threw alone (a CUDA_CHECK) would go on to NCCL's bootstrap (a host broadcast over the world)
  // while the others still sit in this constructor's all-gather: mismatched host collectives.
  std::string why;
  auto cuda_ok = [&](cudaError_t err, const char* what) {
    if (err != cudaSuccess && why.empty()) why = cuda_error(what, err);
    return why.empty();
  };
  auto cu_ok = [&](int r, const char* what) {
    if (r != CUDA_SUCCESS && why.empty()) why = cu_error(what, r);
    return why.empty();
  };
  cudaStream_t probe = nullptr;  // the stream memory operations tried once, here
  RankInfo mine{};
  if (cuda_ok(cudaGetDevice(&device_), "cudaGetDevice") &&
      cuda_ok(cudaEventCreateWithFlags(&done_ev_, cudaEventDisableTiming), "cudaEventCreate") &&
      cuda_ok(cudaStreamCreateWithFlags(&probe, cudaStreamNonBlocking), "cudaStreamCreate")) {
    wait_op_ = driver_fn("cuStreamWaitValue32");
    write_op_ = driver_fn("cuStreamWriteValue32");
    batch_op_ = driver_fn("cuStreamBatchMemOp");  // optional: single operations without it
    if (!wait_op_ || !write_op_)
      why = "the driver has no stream memory operations (cuStreamWaitValue32, "
            "cuStreamWriteValue32 of CUDA 12.0; an older driver?)";
  }
  sm_copies_ = env_on("AUTOMOE_IPC_SM_COPY");
  flag_ptr_.assign(size_t(P), nullptr);
  batch_.assign(size_t(P) * kBatchWords, 0);
  if (why.empty() &&
      cuda_ok(cudaMalloc(reinterpret_cast<void**>(&flags_), flag_words(P) * sizeof(uint32_t)),
              "cudaMalloc of the IPC flags") &&
      cuda_ok(cudaMallocHost(reinterpret_cast<void**>(&host_word_), size_t(2 * P) * sizeof(uint32_t)),
              "cudaMallocHost") &&
      cuda_ok(cudaMemset(flags_, 0, flag_words(P) * sizeof(uint32_t)), "cudaMemset") &&
      cuda_ok(cudaStreamCreateWithFlags(&mail_s_, cudaStreamNonBlocking), "cudaStreamCreate") &&
      cuda_ok(cudaEventCreateWithFlags(&mail_ev_, cudaEventDisableTiming), "cudaEventCreate") &&
      cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize") &&
      // a write and a wait on this rank's own ready slot: stream memory ops work here
      cu_ok(reinterpret_cast<MemOp>(write_op_)(probe, reinterpret_cast<uintptr_t>(flags_ + me), 0,
                                               CU_STREAM_WRITE_VALUE_DEFAULT),
            "cuStreamWriteValue32 (local)") &&
      cu_ok(reinterpret_cast<MemOp>(wait_op_)(probe, reinterpret_cast<uintptr_t>(flags_ + me), 0,
                                              CU_STREAM_WAIT_VALUE_GEQ),
            "cuStreamWaitValue32 (GEQ, local)") &&
      cuda_ok(cudaStreamSynchronize(probe), "the stream memory operations' probe")) {
    // the batch entry point, tried on the same slot; where it fails, single operations
    if (batch_op_) {
      uint32_t* own[1] = {flags_ + me};
      if (!flags_batch(probe, false, own, 1, 0) || !flags_batch(probe, true, own, 1, 0) ||
          cudaStreamSynchronize(probe) != cudaSuccess) {
        cudaGetLastError();
        batch_op_ = nullptr;
      }
    }
    cuda_ok(cudaIpcGetMemHandle(&mine.flags, flags_), "cudaIpcGetMemHandle (flags)");
  }
  peer_flags_[size_t(me)] = flags_;

  if (gethostname(mine.host, sizeof(mine.host) - 1) != 0 && why.empty()) why = "gethostname failed";
  if (why.empty()) cuda_ok(cudaDeviceGetPCIBusId(mine.bus, int(sizeof(mine.bus)), device_),
                           "cudaDeviceGetPCIBusId");
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
    const cudaError_t e = cudaDeviceEnablePeerAccess(dev, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();
    else if (e != cudaSuccess) why = cuda_error("cudaDeviceEnablePeerAccess", e);
  }
  // The peers' flags, and a write into each (its own done slot, never used): stream writes
  // into IPC-mapped memory work from here.
  for (int p = 0; p < P && why.empty(); ++p) {
    if (p == me) continue;
    void* ptr = nullptr;
    if (!cuda_ok(cudaIpcOpenMemHandle(&ptr, all[size_t(p)].flags, cudaIpcMemLazyEnablePeerAccess),
                 "cudaIpcOpenMemHandle (flags)"))
      break;
    peer_flags_[size_t(p)] = static_cast<uint32_t*>(ptr);
    cu_ok(reinterpret_cast<MemOp>(write_op_)(
              probe, reinterpret_cast<uintptr_t>(peer_flags_[size_t(p)] + P + p), 0,
              CU_STREAM_WRITE_VALUE_DEFAULT),
          "cuStreamWriteValue32 into a peer's IPC-mapped flags");
  }
  if (why.empty()) cuda_ok(cudaStreamSynchronize(probe), "the peer writes' probe");
  if (probe) cudaStreamDestroy(probe);
  try {
    fail_together(ep_, why.empty() ? why : why + "; " + kInstead);
  } catch (...) {  // auto falls back to another transport: leave nothing mapped or allocated
    for (int p = 0; p < P; ++p)
      if (p != me && peer_flags_[size_t(p)]) cudaIpcCloseMemHandle(peer_flags_[size_t(p)]);
    if (flags_) cudaFree(flags_);
    if (host_word_) cudaFreeHost(host_word_);
    if (done_ev_) cudaEventDestroy(done_ev_);
    if (mail_ev_) cudaEventDestroy(mail_ev_);
    if (mail_s_) cudaStreamDestroy(mail_s_);
    cudaGetLastError();
    throw;
  }
}

IpcTransport::~IpcTransport() {
  // Local, never collective (it runs while an error unwinds, too). Calls left in flight (an
  // error elsewhere) may wait on peers that never come: release them first, so the synchronize
  // and the frees (which synchronize) return. The peers map own_ and flags_ until they close
  // them themselves, and each peer's last call still writes its done[] into flags_ after it
  // copied this rank's rows out: finished() also waits (bounded) for those writes, so flags_
  // is not freed under a peer's pending write.
  if (epoch_ != 0 && !released_ && !finished(10.0)) release();
  if (stuck_) return;  // a release that did not finish: freeing would wait forever
  cudaDeviceSynchronize();
  close_peers();
  for (size_t p = 0; p < peer_flags_.size(); ++p)
    if (int(p) != ep_.rank() && peer_flags_[p]) cudaIpcCloseMemHandle(peer_flags_[p]);
  if (own_) cudaFree(own_);
  if (flags_) cudaFree(flags_);
  if (host_word_) cudaFreeHost(host_word_);
  if (done_ev_) cudaEventDestroy(done_ev_);
  if (mail_ev_) cudaEventDestroy(mail_ev_);
  if (mail_s_) cudaStreamDestroy(mail_s_);
}

void IpcTransport::close_peers() {
  for (size_t p = 0; p < peer_.size(); ++p) {
    if (int(p) != ep_.rank() && peer_[p]) cudaIpcCloseMemHandle(peer_[p]);
    peer_[p] = nullptr;
  }
}

unsigned char* IpcTransport::region(int p, int s) const {
  return peer_[size_t(p)] + size_t(s < p ? s : s - 1) * pair_cap_;
}

void IpcTransport::wait_geq(cudaStream_t s, const uint32_t* addr, uint32_t v) {
  const CUresult r = reinterpret_cast<MemOp>(wait_op_)(s, reinterpret_cast<uintptr_t>(addr), v,
                                                        CU_STREAM_WAIT_VALUE_GEQ);
  AM_CHECK(r == CUDA_SUCCESS, "[ep ipc] rank {}: {}", ep_.rank(), cu_error("cuStreamWaitValue32", r));
}

void IpcTransport::write(cudaStream_t s, uint32_t* addr, uint32_t v) {
  // default flags: a memory fence before the write (the copies before it are visible first)
  const CUresult r = reinterpret_cast<MemOp>(write_op_)(s, reinterpret_cast<uintptr_t>(addr), v,
                                                         CU_STREAM_WRITE_VALUE_DEFAULT);
  AM_CHECK(r == CUDA_SUCCESS, "[ep ipc] rank {}: {}", ep_.rank(),
           cu_error("cuStreamWriteValue32", r));
}

bool IpcTransport::flags_batch(cudaStream_t s, bool wait, uint32_t* const* addr, int n,
                               uint32_t v) {
  auto* ops = reinterpret_cast<CUstreamBatchMemOpParams*>(batch_.data());
  for (int i = 0; i < n; ++i) {
    CUstreamBatchMemOpParams& p = ops[i];
    p = CUstreamBatchMemOpParams{};
    if (wait) {
      p.waitValue.operation = CU_STREAM_MEM_OP_WAIT_VALUE_32;
      p.waitValue.address = reinterpret_cast<uintptr_t>(addr[i]);
      p.waitValue.value = v;
      p.waitValue.flags = CU_STREAM_WAIT_VALUE_GEQ;
    } else {
      p.writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
      p.writeValue.address = reinterpret_cast<uintptr_t>(addr[i]);
      p.writeValue.value = v;
      p.writeValue.flags = CU_STREAM_WRITE_VALUE_DEFAULT;  // fenced, as write()
    }
  }
  return reinterpret_cast<BatchOp>(batch_op_)(s, unsigned(n), ops, 0) == CUDA_SUCCESS;
}

void IpcTransport::check_live() const {
  AM_CHECK(!released_, "[ep ipc] rank {}: the transport stopped after an earlier timeout",
           ep_.rank());
}

void IpcTransport::flags(cudaStream_t s, bool wait, int n, uint32_t v) {
  if (n == 0) return;
  if (batch_op_) {
    AM_CHECK(flags_batch(s, wait, flag_ptr_.data(), n, v), "[ep ipc] rank {}: {}", ep_.rank(),
             "cuStreamBatchMemOp of the flags failed");
    return;
  }
  for (int i = 0; i < n; ++i) {
    if (wait) wait_geq(s, flag_ptr_[size_t(i)], v);
    else write(s, flag_ptr_[size_t(i)], v);
  }
}

bool IpcTransport::release() {
  released_ = true;
  // Every flag past the epoch (cyclically: epoch_ + 1 meets every wait enqueued so far), from
  // a stream of its own. Bounded: where it does not finish either, nothing is freed.
  cudaStream_t s = nullptr;
  bool ok = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess;
  for (int i = 0; ok && i < 3 * ep_.size(); ++i)  // ready, done, mailed
    ok = reinterpret_cast<MemOp>(write_op_)(s, reinterpret_cast<uintptr_t>(flags_ + i),
                                            epoch_ + 1, CU_STREAM_WRITE_VALUE_DEFAULT) ==
         CUDA_SUCCESS;
  if (ok) ok = cudaEventRecord(done_ev_, s) == cudaSuccess;
  if (ok) ok = poll_event(done_ev_, 10.0) == cudaSuccess;
  if (s) cudaStreamDestroy(s);
  cudaGetLastError();
  stuck_ = !ok;
  return ok;
}

bool IpcTransport::finished(double seconds) {
  cudaStream_t s = nullptr;
  bool done = false;
  const auto t0 = Clock::now();
  if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess) {
    const int P = ep_.size(), me = ep_.rank();
    while (!done && seconds_since(t0) < seconds) {
      if (cudaMemcpyAsync(host_word_, flags_, size_t(2 * P) * sizeof(uint32_t),
                          cudaMemcpyDeviceToHost, s) != cudaSuccess ||
          cudaEventRecord(done_ev_, s) != cudaSuccess ||
          poll_event(done_ev_, seconds - seconds_since(t0)) != cudaSuccess)
        break;
      // my ready[me] (my last call finished) and every peer's done[p] (its last copy-out of my
      // rows, written into my flags) at the current epoch; cyclic, as the waits
      done = int32_t(host_word_[me] - epoch_) >= 0;
      for (int p = 0; done && p < P; ++p)
        if (p != me) done = int32_t(host_word_[P + p] - epoch_) >= 0;
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    cudaStreamDestroy(s);
  }
  cudaGetLastError();
  return done;
}

void IpcTransport::reserve(size_t /*send_bytes*/, size_t /*recv_bytes*/, size_t pair_bytes) {
  const int P = ep_.size(), me = ep_.rank();
  check_live();
  int64_t want = int64_t((pair_bytes + 255) / 256 * 256);  // regions 256-byte aligned
  ep_.allreduce_max(&want, 1);  // the collective (the header's "Sizing" says when it is safe)
  if (size_t(want) <= pair_cap_) return;
  // Every rank reallocates. Nothing of this rank's may touch any staging now (its writes into
  // the peers, its copy-outs: every rank has enqueued every earlier call, so its waits are
  // met), and no rank may free before every rank has closed its mapping.
  CUDA_CHECK(cudaDeviceSynchronize());
  ep_.barrier();
  close_peers();
  ep_.barrier();
  if (own_) CUDA_CHECK(cudaFree(own_));
  own_ = nullptr;
  pair_cap_ = 0;
  const size_t bytes = size_t(want) * size_t(P - 1);
  std::string why;
  cudaIpcMemHandle_t mine{};
  cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&own_), bytes);
  if (e != cudaSuccess) {
    own_ = nullptr;
    why = cuda_error("cudaMalloc of the IPC staging", e) + " (" + std::to_string(bytes) +
          " bytes: " + std::to_string(P - 1) + " peers x " + std::to_string(want) +
          " bytes, the most one rank sends another in one call)";
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
  pair_cap_ = size_t(want);
}

void IpcTransport::check_fits(const EpA2aTensor* t, int nt, const EpA2aRows& rows) const {
  const int P = ep_.size(), me = ep_.rank();
  size_t rb_all = 0;  // bytes of one row of every tensor together
  for (int k = 0; k < nt; ++k) rb_all += row_bytes(t[k]);
  for (int p = 0; p < P; ++p) {
    if (p == me) continue;
    const size_t out = size_t(rows.send_cnt[p]) * rb_all, in = size_t(rows.recv_cnt[p]) * rb_all;
    AM_CHECK(out <= pair_cap_ && in <= pair_cap_,
             "internal: [ep ipc] rank {} sends {} bytes to rank {} and receives {} from it in "
             "one call, but a region holds {} (the largest pair_bytes reserved over the group)",
             me, out, p, in, pair_cap_);
  }
}

void IpcTransport::alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                             cudaStream_t stream) {
  check_live();
  // Everything checked before anything is enqueued: a rank that throws here leaves the others
  // waiting on its flags, until their sync() times out (an internal error: EpMoeCuda reserves
  // what its calls need).
  check_fits(t, nt, rows);
  ++epoch_;
  in_flight_ = true;
  scatter(t, nt, rows, stream);
  copy_out(t, nt, rows, stream);
}

void IpcTransport::scatter(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                           cudaStream_t stream) {
  const int P = ep_.size(), me = ep_.rank();
  // a) into every peer's region, after its copy-out of the previous call (one batch of waits,
  // one copy kernel for every peer and tensor); then the peers' ready flags (one batch)
  wait_peers(stream);
  Copies copies(stream, sm_copies_);
  for (int p = 0; p < P; ++p) {
    if (p == me) continue;
    unsigned char* dst = region(p, me);
    for (int k = 0; k < nt; ++k) {
      const size_t rb = row_bytes(t[k]), bytes = size_t(rows.send_cnt[p]) * rb;
      copies.add(dst, static_cast<const unsigned char*>(t[k].send[0]) + rows.send_off[p] * rb, bytes);
      dst += bytes;
    }
  }
  copies.flush();
  signal_peers(stream);
}

void IpcTransport::wait_peers(cudaStream_t stream) {
  const int P = ep_.size();
  flags(stream, true, peer_flags([&](int p) { return flags_ + P + p; }), epoch_ - 1);  // my done[p]
}

void IpcTransport::signal_peers(cudaStream_t stream) {
  const int me = ep_.rank();
  // fenced after the copies before them on this stream; p's ready[me]
  flags(stream, false, peer_flags([&](int p) { return peer_flags_[size_t(p)] + me; }), epoch_);
}

void IpcTransport::alltoallv_inplace(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                                     cudaStream_t stream, const void** src) {
  const int P = ep_.size(), me = ep_.rank();
  check_live();
  AM_CHECK(!inplace_open_, "internal: [ep ipc] rank {}: alltoallv_inplace before the last one's "
           "inplace_end", me);
  check_fits(t, nt, rows);
  ++epoch_;
  in_flight_ = true;
  scatter(t, nt, rows, stream);
  wait_sources(stream);
  for (int k = 0; k < nt; ++k) {
    const size_t rb = row_bytes(t[k]);
    size_t before = 0;  // bytes of the tensors before k in each region
    for (int j = 0; j < k; ++j) before += row_bytes(t[j]);
    for (int s = 0; s < P; ++s)
      src[k * P + s] = s == me ? static_cast<const unsigned char*>(t[k].send[0]) + rows.send_off[me] * rb
                               : region(me, s) + size_t(rows.recv_cnt[s]) * before;
  }
  inplace_open_ = true;
}

void IpcTransport::inplace_end(cudaStream_t stream) {
  AM_CHECK(inplace_open_, "internal: [ep ipc] rank {}: inplace_end without alltoallv_inplace",
           ep_.rank());
  inplace_open_ = false;
  release_sources(stream);
}

void IpcTransport::wait_sources(cudaStream_t stream) {
  // c)'s waits: every source's rows of call epoch_ are in its region (one batch)
  flags(stream, true, peer_flags([&](int s) { return flags_ + s; }), epoch_);  // my ready[s]
}

void IpcTransport::release_sources(cudaStream_t stream) {
  const int P = ep_.size(), me = ep_.rank();
  // c)'s writes: the sources may write their regions again (one batch); s's done[me]
  int n = peer_flags([&](int s) { return peer_flags_[size_t(s)] + P + me; });
  flag_ptr_[size_t(n++)] = flags_ + me;  // this call finished here (the destructor reads it)
  flags(stream, false, n, epoch_);
}

void IpcTransport::copy_out(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                            cudaStream_t stream) {
  const int P = ep_.size(), me = ep_.rank();
  wait_sources(stream);
  // b) to itself, send -> recv, and c) out of every source's region: one copy kernel
  Copies copies(stream, sm_copies_);
  for (int k = 0; k < nt; ++k) {
    const size_t rb = row_bytes(t[k]);
    copies.add(static_cast<unsigned char*>(t[k].recv[0]) + rows.recv_off[me] * rb,
               static_cast<const unsigned char*>(t[k].send[0]) + rows.send_off[me] * rb,
               size_t(rows.send_cnt[me]) * rb);
  }
  for (int s = 0; s < P; ++s) {
    if (s == me) continue;
    const unsigned char* src = region(me, s);
    for (int k = 0; k < nt; ++k) {
      const size_t rb = row_bytes(t[k]), bytes = size_t(rows.recv_cnt[s]) * rb;
      copies.add(static_cast<unsigned char*>(t[k].recv[0]) + rows.recv_off[s] * rb, src, bytes);
      src += bytes;
    }
  }
  copies.flush();
  release_sources(stream);
}

void IpcTransport::push_begin(cudaStream_t stream, unsigned char** region_out, size_t* cap) {
  const int P = ep_.size(), me = ep_.rank();
  check_live();
  ++epoch_;
  in_flight_ = true;
  for (int p = 0; p < P; ++p) region_out[p] = p == me ? nullptr : region(p, me);
  wait_peers(stream);  // every peer p is done with my region of the previous call
  *cap = pair_cap_;
}

void IpcTransport::push_mail(cudaStream_t stream, const int32_t* words_dev, int words,
                             int32_t* host, cudaEvent_t done) {
  const int P = ep_.size(), me = ep_.rank();
  check_live();
  AM_CHECK(words > 0 && words <= kEpMailWords,
           "internal: [ep ipc] push_mail of {} words (1 to {})", words, kEpMailWords);
  // my words into every rank's mail[me] (mine too: the read-back below takes every row at once)
  cuda::CopyMany c;
  for (int p = 0; p < P; ++p)
    c.add(mail_of(peer_flags_[size_t(p)], P, me), words_dev, int64_t(words) * 4);
  cuda::copy_many(c, stream);
  // p's mailed[me], fenced after the copies
  flags(stream, false, peer_flags([&](int p) { return peer_flags_[size_t(p)] + 2 * P + me; }),
        epoch_);
  // beside the rows: every source's mail of this call, then all of it back to the host
  CUDA_CHECK(cudaEventRecord(mail_ev_, stream));
  CUDA_CHECK(cudaStreamWaitEvent(mail_s_, mail_ev_, 0));
  flags(mail_s_, true, peer_flags([&](int s) { return flags_ + 2 * P + s; }), epoch_);
  CUDA_CHECK(cudaMemcpy2DAsync(host, size_t(words) * 4, mail_of(flags_, P, 0),
                               size_t(kEpMailWords) * 4, size_t(words) * 4, size_t(P),
                               cudaMemcpyDeviceToHost, mail_s_));
  CUDA_CHECK(cudaEventRecord(done, mail_s_));
}

void IpcTransport::push_end(cudaStream_t stream) {
  signal_peers(stream);  // after the kernel's stores into the peers
}

void IpcTransport::push_recv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                             cudaStream_t stream) {
  check_live();
  // the kernel skipped a destination whose rows would not fit (ep_dispatch_push): this throws
  // for it here, before any copy-out reads its region
  check_fits(t, nt, rows);
  copy_out(t, nt, rows, stream);
}

void IpcTransport::wait_or_fail(cudaEvent_t ev) {
  const cudaError_t e = poll_event(ev, timeout_s_);
  if (e == cudaSuccess) return;
  if (e != cudaErrorNotReady) CUDA_CHECK(e);
  release();  // so the unwinding's synchronizes and frees return
  AM_FAIL("[ep ipc] rank {}: the EP group's device waits did not finish within {} s (all-to-all "
          "{}): a peer stalled or died before its part of it. If a step can legitimately take "
          "that long, raise AUTOMOE_DIST_TIMEOUT (seconds, default 600)",
          ep_.rank(), timeout_s_, epoch_);
}

void IpcTransport::sync(cudaStream_t stream) {
  check_live();
  CUDA_CHECK(cudaEventRecord(done_ev_, stream));
  wait_or_fail(done_ev_);
  in_flight_ = false;
}

void IpcTransport::wait_event(cudaEvent_t ev) {
  check_live();
  wait_or_fail(ev);
}

}  // namespace automoe::dist
