// dist/nccl_group.cpp: NCCL communicator bootstrap over the host Comm (MPI or TCP), non-blocking
// with a timeout and abort, point-to-point all-to-all-v, and the EP transport over it (see
// nccl_group.h).
#include "dist/nccl_group.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "core/check.h"
#include "dist/comm_backend.h"

namespace automoe::dist {

namespace {

using Clock = std::chrono::steady_clock;

// AUTOMOE_NCCL_TIMEOUT_S, else AUTOMOE_DIST_TIMEOUT when that is set (one variable raises every
// timeout of the job), else 300 s.
double env_timeout_s() {
  return env_seconds("AUTOMOE_NCCL_TIMEOUT_S", std::getenv("AUTOMOE_DIST_TIMEOUT") ? dist_timeout_s() : 300);
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Every live NcclGroup of this process. A failure aborts all of them, not only the one that
// noticed: the error unwinds through destructors that synchronise streams (the model's compute
// stream, DeviceGradReducer's comm stream, IpcTransport's device synchronize) before the top level
// reaches dist::abort_all, and a kernel of a communicator still alive whose peer is gone (the
// world's gradient all-reduce on the comm stream while the EP communicator timed out, or the
// reverse) would keep such a synchronize, and with it the whole job, waiting forever.
// ncclCommAbort stops a communicator's kernels, so those synchronizes return. All of them at
// once (NcclGroup::abort_every_live): one after the other, the first abort's frees (cudaFree and
// cudaFreeHost synchronise the whole device) would wait forever on the next communicator's
// kernel, still spinning for the stopped peer (the ep_model_stall_nccl2 hang: two
// communicators, world and EP, over the same two ranks; ep_check's drill has only one).
std::mutex g_live_mu;
std::vector<NcclGroup*>& live_groups() {
  static std::vector<NcclGroup*> v;
  return v;
}
// ncclGroupStart/ncclGroupEnd nest per host thread (NCCL's group depth is thread-local).
thread_local int g_group_depth = 0;

// How long the aborts of every communicator may take together. ncclCommAbort returns in well
// under a second when NCCL can stop its kernels and proxy threads; longer means it is stuck
// (on a peer, or on the device), and waiting on it would be the hang again.
constexpr double kAbortWaitS = 20;

template <class T>
ncclDataType_t nccl_dt();
template <>
ncclDataType_t nccl_dt<cuda::bf16>() { return ncclBfloat16; }
template <>
ncclDataType_t nccl_dt<float>() { return ncclFloat32; }
template <>
ncclDataType_t nccl_dt<int32_t>() { return ncclInt32; }

}  // namespace

ncclDataType_t nccl_type(EpDtype t) {
  switch (t) {
    case EpDtype::kBf16: return ncclBfloat16;
    case EpDtype::kF32: return ncclFloat32;
    case EpDtype::kI32: return ncclInt32;
  }
  return ncclInt8;
}

NcclGroup::NcclGroup(const Comm& comm, int device)
    : rank_(comm.rank()), size_(comm.size()), device_(device) {
  // NVLink multicast (NVLS) must stay off on the machines this runs on (NCCL would otherwise
  // set up multicast objects at init). Forced to 0, overwriting whatever the environment says:
  // a setenv without overwrite would let an inherited NCCL_NVLS_ENABLE=1 through.
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  timeout_s_ = env_timeout_s();
  CUDA_CHECK(cudaSetDevice(device));
  ncclUniqueId id{};
  if (rank_ == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    AM_CHECK(r == ncclSuccess, "ncclGetUniqueId failed on rank 0: {}; check that NCCL can open a "
             "socket on this host (NCCL_SOCKET_IFNAME, NCCL_DEBUG=INFO says more)",
             ncclGetErrorString(r));
  }
  comm.broadcast(&id, sizeof id, 0);
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;  // no NCCL call may block the host: we poll, time out and abort instead
  const ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &cfg);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm_) ncclCommAbort(comm_);
    aborted_ = true;
    AM_FAIL("ncclCommInitRankConfig failed on rank {} of {} (GPU {}): {}; run with NCCL_DEBUG=INFO "
            "for NCCL's reason",
            rank_, size_, device_, ncclGetErrorString(r));
  }
  {
    std::lock_guard<std::mutex> lk(g_live_mu);
    live_groups().push_back(this);
  }
  // a host collective that fails (MPI or TCP: a timed-out rank) aborts the communicators too
  static const bool registered = (dist::add_device_collective_stopper(&abort_every_live), true);
  (void)registered;
  try {
    poll_ready("communicator init");
    CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  } catch (...) {  // no destructor runs for a throwing constructor: leave the registry here
    unregister();
    throw;
  }
}

void NcclGroup::unregister() {
  std::lock_guard<std::mutex> lk(g_live_mu);
  auto& v = live_groups();
  v.erase(std::remove(v.begin(), v.end(), this), v.end());
}

void NcclGroup::abort_every_live() {
  // An error inside ncclGroupStart/End (ncclSend on a communicator already in an error state
  // returns that error) would leave this thread's NCCL group open: every later NCCL call of the
  // thread would then only be queued until a group end that never comes. Close it first (its
  // result no longer matters).
  if (g_group_depth > 0) {
    g_group_depth = 0;
    ncclGroupEnd();
  }
  struct Todo {
    ncclComm_t comm;
    int device;
  };
  std::vector<Todo> todo;
  {
    std::lock_guard<std::mutex> lk(g_live_mu);
    for (NcclGroup* g : live_groups()) {
      if (g->comm_ && !g->aborted_) todo.push_back({g->comm_, g->device_});
      g->aborted_ = true;  // no later wait, finalize or destroy touches it
    }
  }
  if (todo.empty()) return;
  // One thread per communicator (see live_groups above); each raises its abort flag first, so
  // together every kernel ends and every abort's frees can finish. Detached: if NCCL never
  // returns, the process ends below instead of joining them.
  struct Count {
    std::mutex mu;
    std::condition_variable cv;
    size_t left = 0;
  };
  auto count = std::make_shared<Count>();
  count->left = todo.size();
  for (const Todo& t : todo)
    std::thread([t, count] {
      cudaSetDevice(t.device);
      ncclCommAbort(t.comm);
      std::lock_guard<std::mutex> lk(count->mu);
      if (--count->left == 0) count->cv.notify_all();
    }).detach();
  std::unique_lock<std::mutex> lk(count->mu);
  if (!count->cv.wait_for(lk, std::chrono::duration<double>(kAbortWaitS),
                          [&] { return count->left == 0; })) {
    lk.unlock();
    // Unwinding from here would reach the destructors' stream waits on kernels nobody stopped.
    dist::abort_all(fmt::format(
        "ncclCommAbort of {} NCCL communicator(s) did not return within {} s after the error "
        "above; ending this process instead of waiting on its GPU work (NCCL_DEBUG=INFO shows "
        "where NCCL waits)",
        count->left, kAbortWaitS));
  }
}

NcclGroup::~NcclGroup() {
  unregister();
  // No throwing here: flush and destroy when healthy, abort when anything looks wrong.
  if (comm_ && !aborted_) {
    const ncclResult_t r = ncclCommFinalize(comm_);
    bool ok = r == ncclSuccess || r == ncclInProgress;
    const auto t0 = Clock::now();
    while (ok) {
      ncclResult_t st = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess || (st != ncclSuccess && st != ncclInProgress)) {
        ok = false;
        break;
      }
      if (st == ncclSuccess) break;
      const double waited = seconds_since(t0);
      if (waited > timeout_s_) {
        ok = false;
        break;
      }
      poll_pause(waited);
    }
    if (ok) ncclCommDestroy(comm_);
    else ncclCommAbort(comm_);
  }
  if (done_) cudaEventDestroy(done_);
}

void NcclGroup::fail(const char* what, const std::string& why) {
  const std::string msg = fmt::format(
      "NCCL {} failed on rank {} of {} (GPU {}): {}. The communicator (and every other NCCL "
      "communicator of this process) is aborted. Usually another rank failed, exited or stopped "
      "communicating first: look for the first error of the other ranks; if a rank is just slow "
      "(a long first step), raise AUTOMOE_NCCL_TIMEOUT_S (now {} s)",
      what, rank_, size_, device_, why, timeout_s_);
  // Printed now, then every communicator aborted (abort_every_live, this group's stopper), and
  // only then the throw: see dist::collective_failed.
  dist::collective_failed(msg);
  abort_every_live();  // (done already by the stopper; a no-op then)
  AM_FAIL("{}", msg);
}

void NcclGroup::check(ncclResult_t r, const char* what) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  fail(what, fmt::format("{} ({})", ncclGetErrorString(r), comm_ ? ncclGetLastError(comm_) : ""));
}

void NcclGroup::poll_ready(const char* what) {
  const auto t0 = Clock::now();
  for (;;) {
    ncclResult_t st = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &st);
    if (r != ncclSuccess) fail(what, fmt::format("ncclCommGetAsyncError: {}", ncclGetErrorString(r)));
    if (st == ncclSuccess) return;
    if (st != ncclInProgress)
      fail(what, fmt::format("{} ({})", ncclGetErrorString(st), ncclGetLastError(comm_)));
    const double waited = seconds_since(t0);
    if (waited > timeout_s_) fail(what, fmt::format("not done after {} s", timeout_s_));
    poll_pause(waited);  // every group end of a non-blocking communicator polls here
  }
}

void NcclGroup::wait(cudaStream_t stream, const char* what) {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error; it cannot "
           "be used again",
           rank_);
  CUDA_CHECK(cudaEventRecord(done_, stream));
  wait_event(done_, what);
}

void NcclGroup::wait_event(cudaEvent_t ev, const char* what) {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error; it cannot "
           "be used again",
           rank_);
  const auto t0 = Clock::now();
  for (;;) {
    const cudaError_t e = cudaEventQuery(ev);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) CUDA_CHECK(e);
    ncclResult_t st = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess || (st != ncclSuccess && st != ncclInProgress))
      fail(what, fmt::format("{} ({})", ncclGetErrorString(st), ncclGetLastError(comm_)));
    const double waited = seconds_since(t0);
    if (waited > timeout_s_)
      fail(what, fmt::format("the GPU work did not finish within {} s (AUTOMOE_NCCL_TIMEOUT_S)",
                             timeout_s_));
    poll_pause(waited);
  }
}

void NcclGroup::group_start() {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error; it cannot "
           "be used again",
           rank_);
  check(ncclGroupStart(), "group start");
  ++g_group_depth;
}

void NcclGroup::group_end(const char* what) {
  --g_group_depth;  // ncclGroupEnd closes the group whatever it returns
  check(ncclGroupEnd(), what);
  poll_ready(what);
}

void NcclGroup::send(const void* buf, size_t count, ncclDataType_t type, int peer,
                     cudaStream_t stream) {
  check(ncclSend(buf, count, type, peer, comm_, stream), "send");
}

void NcclGroup::recv(void* buf, size_t count, ncclDataType_t type, int peer,
                     cudaStream_t stream) {
  check(ncclRecv(buf, count, type, peer, comm_, stream), "recv");
}

template <class T>
void NcclGroup::alltoallv(T* recv, const int64_t* recv_off, const int64_t* recv_cnt,
                          const T* send, const int64_t* send_off, const int64_t* send_cnt,
                          int64_t row_elems, cudaStream_t stream) {
  group_start();
  for (int p = 0; p < size_; ++p) {
    if (send_cnt[p] > 0)
      this->send(send + send_off[p] * row_elems, size_t(send_cnt[p] * row_elems), nccl_dt<T>(), p,
                 stream);
    if (recv_cnt[p] > 0)
      this->recv(recv + recv_off[p] * row_elems, size_t(recv_cnt[p] * row_elems), nccl_dt<T>(), p,
                 stream);
  }
  group_end("all-to-all-v");
}

template void NcclGroup::alltoallv<cuda::bf16>(cuda::bf16*, const int64_t*, const int64_t*,
                                               const cuda::bf16*, const int64_t*, const int64_t*,
                                               int64_t, cudaStream_t);
template void NcclGroup::alltoallv<float>(float*, const int64_t*, const int64_t*, const float*,
                                          const int64_t*, const int64_t*, int64_t, cudaStream_t);
template void NcclGroup::alltoallv<int32_t>(int32_t*, const int64_t*, const int64_t*,
                                            const int32_t*, const int64_t*, const int64_t*, int64_t,
                                            cudaStream_t);

void NcclGroup::alltoall(void* recv, const void* send, size_t count, ncclDataType_t type,
                         cudaStream_t stream) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error", rank_);
  check(ncclAlltoAll(send, recv, count, type, comm_, stream), "all-to-all");
  poll_ready("all-to-all");
#else  // before ncclAlltoAll: the same exchange as one group of sends and receives
  size_t es = type == ncclBfloat16 ? 2 : 4;
  group_start();
  for (int p = 0; p < size_; ++p) {
    this->send(static_cast<const char*>(send) + p * count * es, count, type, p, stream);
    this->recv(static_cast<char*>(recv) + p * count * es, count, type, p, stream);
  }
  group_end("all-to-all");
#endif
}

void NcclGroup::allreduce_sum(void* const* bufs, const size_t* counts, int n, ncclDataType_t type,
                              cudaStream_t stream) {
  constexpr int kPerGroup = 256;  // keep each NCCL group modest
  for (int i0 = 0; i0 < n; i0 += kPerGroup) {
    group_start();
    for (int i = i0; i < std::min(n, i0 + kPerGroup); ++i)
      if (counts[i] > 0)
        check(ncclAllReduce(bufs[i], bufs[i], counts[i], type, ncclSum, comm_, stream),
              "all-reduce");
    group_end("all-reduce");
  }
}

void NcclGroup::reduce_scatter_sum(void* buf, size_t count, ncclDataType_t type,
                                   cudaStream_t stream) {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error", rank_);
  const size_t es = type == ncclBfloat16 ? 2 : 4;
  void* mine = static_cast<char*>(buf) + size_t(rank_) * count * es;
  check(ncclReduceScatter(buf, mine, count, type, ncclSum, comm_, stream), "reduce-scatter");
  poll_ready("reduce-scatter");
}

void NcclGroup::allgather(void* buf, size_t count, ncclDataType_t type, cudaStream_t stream) {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error", rank_);
  const size_t es = type == ncclBfloat16 ? 2 : 4;
  const void* mine = static_cast<const char*>(buf) + size_t(rank_) * count * es;
  check(ncclAllGather(mine, buf, count, type, comm_, stream), "all-gather");
  poll_ready("all-gather");
}

void NcclGroup::broadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                          int root, cudaStream_t stream) {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error", rank_);
  check(ncclBroadcast(send, recv, count, type, root, comm_, stream), "broadcast");
  poll_ready("broadcast");
}

void NcclGroup::reduce_sum(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, cudaStream_t stream) {
  AM_CHECK(!aborted_, "NCCL communicator of rank {} was aborted after an earlier error", rank_);
  check(ncclReduce(send, recv, count, type, ncclSum, root, comm_, stream), "reduce");
  poll_ready("reduce");
}

void NcclTransport::alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                              cudaStream_t stream) {
  const int P = g_.size();
  g_.group_start();
  for (int k = 0; k < nt; ++k) {
    const size_t rb = size_t(t[k].row_elems) * ep_dtype_bytes(t[k].dtype);
    const ncclDataType_t type = nccl_type(t[k].dtype);
    for (int p = 0; p < P; ++p) {
      if (rows.send_cnt[p] > 0)
        g_.send(static_cast<const char*>(t[k].send[0]) + rows.send_off[p] * rb,
                size_t(rows.send_cnt[p] * t[k].row_elems), type, p, stream);
      if (rows.recv_cnt[p] > 0)
        g_.recv(static_cast<char*>(t[k].recv[0]) + rows.recv_off[p] * rb,
                size_t(rows.recv_cnt[p] * t[k].row_elems), type, p, stream);
    }
  }
  g_.group_end("EP all-to-all-v");
}

}  // namespace automoe::dist
