// dist/process_group.cpp: the front of dist::Comm: what launched this process, which backend
// runs its collectives (MPI: comm_mpi.cpp, TCP: comm_tcp.cpp), the EP x DP groups, and the
// size-1 communicator's local copies.
#include "dist/process_group.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "dist/comm_backend.h"

namespace automoe::dist {

namespace {

std::unique_ptr<Backend> g_backend;  // null: world size 1 (or not started yet)
bool g_init_done = false;
std::string g_printed;                // the error collective_failed() printed (abort_all skips it)
std::vector<void (*)()> g_stoppers;   // add_device_collective_stopper()
std::mutex g_stop_mu;

// "automoe: error (rank R of W): msg" (or without the rank in one process), both streams flushed.
void print_error(const std::string& msg) {
  const int rank = g_backend ? g_backend->rank() : 0, size = g_backend ? g_backend->size() : 1;
  std::fflush(stdout);
  if (size > 1) std::fprintf(stderr, "automoe: error (rank %d of %d): %s\n", rank, size, msg.c_str());
  else std::fprintf(stderr, "automoe: error: %s\n", msg.c_str());
  std::fflush(stderr);
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return end && *end == 0 ? int(x) : fallback;
}

}  // namespace

double env_seconds(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const double s = std::strtod(v, &end);
  AM_CHECK(end && *end == 0 && s > 0,
           "{}={} is not a positive number of seconds; unset it (default {}) or set e.g. {}={}", name,
           v, fallback, name, 2 * fallback);
  return s;
}

double dist_timeout_s() { return env_seconds("AUTOMOE_DIST_TIMEOUT", 600); }

bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::strcmp(v, "0") == 0);
}

bool env_on_everywhere(const char* name, const Comm& c) {
  const int64_t on = env_on(name);
  int64_t ranks_on = on;
  c.allreduce_sum(&ranks_on, 1);
  AM_CHECK(ranks_on == 0 || ranks_on == c.size(),
           "{} is 0 on {} of {} ranks; set it the same on every rank (mpirun -x {}=0)", name,
           c.size() - ranks_on, c.size(), name);
  return on;
}

void poll_pause(double waited_s) {
  if (waited_s < 2e-3) std::this_thread::yield();
  else std::this_thread::sleep_for(std::chrono::microseconds(50));
}

LaunchInfo detect_launch() {
  LaunchInfo li;
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) {
    li.launcher = "mpirun";
    li.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    li.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    li.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
  } else if (std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK")) {
    li.launcher = "pmi";
    li.world_size = env_int("PMI_SIZE", env_int("SLURM_STEP_NUM_TASKS", 1));
    li.rank = env_int("PMI_RANK", env_int("PMIX_RANK", 0));
    li.local_rank = env_int("MPI_LOCALRANKID", env_int("SLURM_LOCALID", 0));
  } else if (std::getenv("RANK") && std::getenv("WORLD_SIZE")) {
    li.launcher = "torchrun";
    li.world_size = env_int("WORLD_SIZE", 1);
    li.rank = env_int("RANK", 0);
    li.local_rank = env_int("LOCAL_RANK", 0);
  } else if (std::getenv("SLURM_PROCID") && std::getenv("SLURM_STEP_NUM_TASKS")) {
    // srun without --mpi: the step's task count. Not SLURM_NTASKS: a batch script's own process
    // (and salloc's shell) sees the allocation's task count, SLURM_PROCID=0 and no step count,
    // and is one process.
    li.launcher = "slurm";
    li.world_size = env_int("SLURM_STEP_NUM_TASKS", 1);
    li.rank = env_int("SLURM_PROCID", 0);
    li.local_rank = env_int("SLURM_LOCALID", 0);
  }
  return li;
}

void init() {
  if (g_init_done) return;
  const char* forced = std::getenv("AUTOMOE_DIST_BACKEND");
  const std::string want = forced && *forced ? forced : "";
  AM_CHECK(want.empty() || want == "tcp" || want == "mpi",
           "AUTOMOE_DIST_BACKEND={} is not known; use tcp, mpi, or leave it unset (MPI under "
           "mpirun/srun --mpi, TCP under torchrun/srun)",
           want);
  if (mpi_running()) {  // a host program started MPI: use it, leave finalisation to it
    AM_CHECK(want != "tcp", "AUTOMOE_DIST_BACKEND=tcp, but this program already started MPI");
    g_backend = start_mpi(/*own=*/false);
    g_init_done = true;
    return;
  }
  const LaunchInfo li = detect_launch();
  const bool mpi_launcher = li.launcher == "mpirun" || li.launcher == "pmi";
  AM_CHECK(want != "mpi" || mpi_launcher || li.world_size == 1,
           "AUTOMOE_DIST_BACKEND=mpi, but {} started this process without MPI; launch with "
           "`mpirun -np {} automoe ...` or `srun --mpi=pmix automoe ...`, or unset it",
           li.launcher, li.world_size);
  AM_CHECK(li.rank >= 0 && li.rank < li.world_size,
           "{} says this is rank {} of {}, which is not a rank of that world", li.launcher, li.rank,
           li.world_size);
  if (want == "tcp" ? li.world_size > 1 : mpi_launcher) {
    g_backend = want == "tcp" ? start_tcp(li) : start_mpi(/*own=*/true);
  } else if (li.world_size > 1) {
    g_backend = start_tcp(li);
  }  // else world size 1: no backend
  g_init_done = true;
}

bool backend_active() { return g_backend != nullptr; }
const char* backend_name() { return g_backend ? g_backend->name() : "none"; }

void finalize() {
  if (g_backend) g_backend->finalize();
  g_backend.reset();
  g_init_done = false;
}

void abort_all(const std::string& msg) {
  const int size = g_backend ? g_backend->size() : 1;
  // collective_failed() printed it when it happened (the thrown text may add the file:line)
  if (g_printed.empty() || msg.rfind(g_printed, 0) != 0) print_error(msg);
  std::fflush(stdout);
  if (g_backend && size > 1) g_backend->abort();  // stops every rank; does not return
  finalize();
  std::_Exit(1);
}

void collective_failed(const std::string& msg) {
  if (g_printed.empty()) {  // the first failure is the one to read; the rest follow from it
    g_printed = msg;
    print_error(msg);
  }
  stop_device_collectives();
}

void add_device_collective_stopper(void (*fn)()) {
  std::lock_guard<std::mutex> lk(g_stop_mu);
  if (std::find(g_stoppers.begin(), g_stoppers.end(), fn) == g_stoppers.end()) g_stoppers.push_back(fn);
}

void stop_device_collectives() {
  std::vector<void (*)()> fns;
  {
    std::lock_guard<std::mutex> lk(g_stop_mu);
    fns = g_stoppers;
  }
  for (auto fn : fns) fn();
}

// ---- collectives: the backend's, or local copies in a communicator of one --------------------

namespace {

// A host collective that throws (timed out, a peer gone, or refused) leaves the ranks out of
// step: the job is over. collective_failed() says so at once and stops the device collectives
// before the error unwinds through destructors that wait on the GPU.
template <class F>
void guarded(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    collective_failed(e.what());
    throw;
  }
}

}  // namespace

Comm::Comm(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {
  if (impl_) {
    rank_ = impl_->rank;
    size_ = impl_->size;
  }
}

void Comm::barrier() const {
  if (impl_) guarded([&] { impl_->barrier(); });
}

void Comm::allreduce_sum(float* x, int64_t n) const {
  if (impl_) guarded([&] { impl_->allreduce(x, n, Elem::kF32, Reduce::kSum); });
}
void Comm::allreduce_sum(double* x, int64_t n) const {
  if (impl_) guarded([&] { impl_->allreduce(x, n, Elem::kF64, Reduce::kSum); });
}
void Comm::allreduce_sum(int64_t* x, int64_t n) const {
  if (impl_) guarded([&] { impl_->allreduce(x, n, Elem::kI64, Reduce::kSum); });
}
void Comm::allreduce_max(int64_t* x, int64_t n) const {
  if (impl_) guarded([&] { impl_->allreduce(x, n, Elem::kI64, Reduce::kMax); });
}
void Comm::allreduce_max(double* x, int64_t n) const {
  if (impl_) guarded([&] { impl_->allreduce(x, n, Elem::kF64, Reduce::kMax); });
}

void Comm::reduce_scatter_sum(float* recv, const float* send, int64_t n) const {
  if (impl_) guarded([&] { impl_->reduce_scatter_sum(recv, send, n); });
  else if (n) std::memcpy(recv, send, size_t(n) * sizeof(float));
}

void Comm::broadcast(void* data, int64_t bytes, int root) const {
  if (impl_) guarded([&] { impl_->broadcast(data, bytes, root); });
}

void Comm::gather(void* recv, const void* send, int64_t bytes, int root) const {
  if (impl_) guarded([&] { impl_->gather(recv, send, bytes, root); });
  else if (bytes) std::memcpy(recv, send, size_t(bytes));
}

void Comm::allgather(void* recv, const void* send, int64_t bytes) const {
  if (impl_) guarded([&] { impl_->allgather(recv, send, bytes); });
  else if (bytes) std::memcpy(recv, send, size_t(bytes));
}

void Comm::alltoall(int64_t* recv, const int64_t* send) const {
  if (impl_) guarded([&] { impl_->alltoall(recv, send); });
  else recv[0] = send[0];
}

void Comm::alltoallv(void* recv, const int64_t* recv_counts, const void* send,
                     const int64_t* send_counts, int64_t row_bytes) const {
  if (impl_) guarded([&] { impl_->alltoallv(recv, recv_counts, send, send_counts, row_bytes); });
  else if (send_counts[0] > 0) std::memcpy(recv, send, size_t(send_counts[0] * row_bytes));
}

// ---- groups -----------------------------------------------------------------------------------

namespace {

// The communicator of `members` (a group of one needs no backend).
Comm group_of(const std::vector<int>& members) {
  auto impl = g_backend->group(members);
  return Comm(members.size() > 1 ? std::move(impl) : nullptr);
}

}  // namespace

Groups make_groups(int ep) {
  init();
  AM_CHECK(ep >= 1, "the expert-parallel size must be at least 1, got {}", ep);
  const int world = g_backend ? g_backend->size() : 1, rank = g_backend ? g_backend->rank() : 0;
  AM_CHECK(world % ep == 0,
           "expert parallelism {} needs a multiple of {} ranks, but this job has {}; launch {} "
           "processes (ep x data-parallel ranks), e.g. `mpirun -np {} ...` or "
           "`torchrun --nproc-per-node {} --no-python automoe ...`",
           ep, ep, world, ep, ep, ep);
  Groups g;
  if (world == 1) return g;
  std::vector<int> all(static_cast<size_t>(world)), ep_ranks, dp_ranks;
  for (int r = 0; r < world; ++r) {
    all[size_t(r)] = r;
    if (r / ep == rank / ep) ep_ranks.push_back(r);  // consecutive ranks share the experts
    if (r % ep == rank % ep) dp_ranks.push_back(r);  // same EP rank: the same experts
  }
  g.world = group_of(all);  // a private copy of the world
  g.ep = group_of(ep_ranks);
  g.dp = group_of(dp_ranks);
  return g;
}

Groups single_process_groups() { return Groups{}; }

}  // namespace automoe::dist
