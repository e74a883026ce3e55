// dist/process_group.cpp: MPI bootstrap, the EP x DP communicators and the CPU collectives.
#include "dist/process_group.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/check.h"

namespace automoe::dist {

namespace {

bool g_started = false;  // init() called MPI_Init_thread (so finalize() must call MPI_Finalize)
bool g_active = false;   // MPI is usable (started here or by the host program)

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return end && *end == 0 ? int(x) : fallback;
}

bool mpi_finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f != 0;
}

// Collectives take int counts: large arrays go in chunks.
constexpr int64_t kChunk = int64_t(1) << 28;

int as_int(int64_t v, const char* what) {
  AM_CHECK(v >= 0 && v <= INT_MAX, "{} of {} does not fit an MPI count; this CPU collective is limited to 2^31", what, v);
  return int(v);
}

}  // namespace

struct Comm::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  ~Impl() {
    if (comm != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm);
  }
};

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
  }
  // Launchers that start processes without MPI: torchrun, and srun without --mpi. (salloc alone
  // sets SLURM_NTASKS for the allocation, not a step: a single process there is fine.)
  if (env_int("WORLD_SIZE", 1) > 1 && std::getenv("RANK")) {
    li.foreign_launcher = "torchrun (RANK/WORLD_SIZE)";
    li.foreign_world_size = env_int("WORLD_SIZE", 1);
    if (li.launcher == "none") li.local_rank = env_int("LOCAL_RANK", 0);
  } else if (env_int("SLURM_STEP_NUM_TASKS", 1) > 1 && std::getenv("SLURM_PROCID")) {
    li.foreign_launcher = "srun (SLURM_PROCID/SLURM_STEP_NUM_TASKS)";
    li.foreign_world_size = env_int("SLURM_STEP_NUM_TASKS", 1);
    if (li.launcher == "none") li.local_rank = env_int("SLURM_LOCALID", 0);
  }
  return li;
}

void init() {
  if (g_active) return;
  int already = 0;
  MPI_Initialized(&already);
  if (already) {  // a host program started MPI: use it, leave finalisation to it
    g_active = true;
    return;
  }
  LaunchInfo li = detect_launch();
  if (li.launcher == "none") {
    AM_CHECK(li.foreign_world_size <= 1,
             "this process was started by {} as one of {} processes, but automoe's ranks come from "
             "MPI; launch with `mpirun -np {} automoe ...` or `srun --mpi=pmix automoe ...` (docs/DISTRIBUTED.md)",
             li.foreign_launcher, li.foreign_world_size, li.foreign_world_size);
    return;  // world size 1 without MPI
  }
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  g_started = g_active = true;
  AM_CHECK(provided >= MPI_THREAD_FUNNELED, "the MPI library gives thread level {}; automoe needs MPI_THREAD_FUNNELED", provided);
}

bool mpi_active() { return g_active; }

void finalize() {
  if (g_started && !mpi_finalized()) MPI_Finalize();
  g_started = g_active = false;
}

void abort_all(const std::string& msg) {
  int rank = 0, size = 1;
  if (g_active && !mpi_finalized()) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  if (size > 1) std::fprintf(stderr, "automoe: error (rank %d of %d): %s\n", rank, size, msg.c_str());
  else std::fprintf(stderr, "automoe: error: %s\n", msg.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  if (size > 1) MPI_Abort(MPI_COMM_WORLD, 1);  // stops every rank; does not return
  finalize();
  std::_Exit(1);
}

// ---- collectives ------------------------------------------------------------------------------

void Comm::barrier() const {
  if (impl_) MPI_Barrier(impl_->comm);
}

template <class T>
static void allreduce_chunks(MPI_Comm c, T* x, int64_t n, MPI_Datatype t, MPI_Op op) {
  for (int64_t i = 0; i < n; i += kChunk)
    MPI_Allreduce(MPI_IN_PLACE, x + i, int(std::min(kChunk, n - i)), t, op, c);
}

void Comm::allreduce_sum(float* x, int64_t n) const {
  if (impl_) allreduce_chunks(impl_->comm, x, n, MPI_FLOAT, MPI_SUM);
}
void Comm::allreduce_sum(double* x, int64_t n) const {
  if (impl_) allreduce_chunks(impl_->comm, x, n, MPI_DOUBLE, MPI_SUM);
}
void Comm::allreduce_sum(int64_t* x, int64_t n) const {
  if (impl_) allreduce_chunks(impl_->comm, x, n, MPI_INT64_T, MPI_SUM);
}
void Comm::allreduce_max(int64_t* x, int64_t n) const {
  if (impl_) allreduce_chunks(impl_->comm, x, n, MPI_INT64_T, MPI_MAX);
}
void Comm::allreduce_max(double* x, int64_t n) const {
  if (impl_) allreduce_chunks(impl_->comm, x, n, MPI_DOUBLE, MPI_MAX);
}

void Comm::reduce_scatter_sum(float* recv, const float* send, int64_t n) const {
  if (!impl_) {
    if (n) std::memcpy(recv, send, size_t(n) * sizeof(float));
    return;
  }
  MPI_Reduce_scatter_block(send, recv, as_int(n, "reduce-scatter block size"), MPI_FLOAT, MPI_SUM, impl_->comm);
}

void Comm::broadcast(void* data, int64_t bytes, int root) const {
  if (!impl_) return;
  auto* p = static_cast<char*>(data);
  for (int64_t i = 0; i < bytes; i += kChunk)
    MPI_Bcast(p + i, int(std::min(kChunk, bytes - i)), MPI_BYTE, root, impl_->comm);
}

void Comm::gather(void* recv, const void* send, int64_t bytes, int root) const {
  if (!impl_) {
    if (bytes) std::memcpy(recv, send, size_t(bytes));
    return;
  }
  MPI_Gather(send, as_int(bytes, "gather size"), MPI_BYTE, recv, int(bytes), MPI_BYTE, root, impl_->comm);
}

void Comm::allgather(void* recv, const void* send, int64_t bytes) const {
  if (!impl_) {
    if (bytes) std::memcpy(recv, send, size_t(bytes));
    return;
  }
  MPI_Allgather(send, as_int(bytes, "all-gather size"), MPI_BYTE, recv, int(bytes), MPI_BYTE, impl_->comm);
}

void Comm::alltoall(int64_t* recv, const int64_t* send) const {
  if (!impl_) {
    recv[0] = send[0];
    return;
  }
  MPI_Alltoall(send, 1, MPI_INT64_T, recv, 1, MPI_INT64_T, impl_->comm);
}

void Comm::alltoallv(void* recv, const int64_t* recv_counts, const void* send,
                     const int64_t* send_counts, int64_t row_bytes) const {
  if (!impl_) {
    if (send_counts[0] > 0) std::memcpy(recv, send, size_t(send_counts[0] * row_bytes));
    return;
  }
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t so = 0, ro = 0;
  for (int r = 0; r < size_; ++r) {
    sc[r] = as_int(send_counts[r], "all-to-all row count");
    rc[r] = as_int(recv_counts[r], "all-to-all row count");
    sd[r] = as_int(so, "all-to-all offset");
    rd[r] = as_int(ro, "all-to-all offset");
    so += send_counts[r];
    ro += recv_counts[r];
  }
  MPI_Datatype row;
  MPI_Type_contiguous(as_int(row_bytes, "all-to-all row size"), MPI_BYTE, &row);
  MPI_Type_commit(&row);
  MPI_Alltoallv(send, sc.data(), sd.data(), row, recv, rc.data(), rd.data(), row, impl_->comm);
  MPI_Type_free(&row);
}

// ---- groups -----------------------------------------------------------------------------------

Comm split_world(int color, int key) {
  Comm out;
  MPI_Comm c;
  MPI_Comm_split(MPI_COMM_WORLD, color, key, &c);
  int size = 1, rank = 0;
  MPI_Comm_size(c, &size);
  MPI_Comm_rank(c, &rank);
  if (size == 1) {  // a group of one needs no MPI
    MPI_Comm_free(&c);
    return out;
  }
  out.impl_ = std::make_shared<Comm::Impl>();
  out.impl_->comm = c;
  out.rank_ = rank;
  out.size_ = size;
  return out;
}

Groups make_groups(int ep) {
  init();
  AM_CHECK(ep >= 1, "the expert-parallel size must be at least 1, got {}", ep);
  int world = 1, rank = 0;
  if (g_active) {
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  }
  AM_CHECK(world % ep == 0,
           "expert parallelism {} needs a multiple of {} ranks, but this job has {}; launch with "
           "`mpirun -np {} ...` (ep x data-parallel ranks)",
           ep, ep, world, ep);
  Groups g;
  if (world == 1) return g;
  g.world = split_world(0, rank);               // a private copy of the world
  g.ep = split_world(rank / ep, rank);          // consecutive ranks share the experts
  g.dp = split_world(rank % ep, rank);          // same EP rank: the same experts
  return g;
}

Groups single_process_groups() { return Groups{}; }

}  // namespace automoe::dist
