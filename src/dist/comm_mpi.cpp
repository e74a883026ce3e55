// dist/comm_mpi.cpp: the MPI backend of dist::Comm (mpirun, srun --mpi=pmix/pmi2). Every
// collective is nonblocking (MPI_I*) and waited on with MPI_Test until AUTOMOE_DIST_TIMEOUT, so
// a stalled rank ends the job with an error instead of a hang in a blocking call.
#include <mpi.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <vector>

#include "core/check.h"
#include "dist/comm_backend.h"

namespace automoe::dist {

namespace {

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

// Waits for `req` until the deadline. MPI progresses a transfer only inside MPI_Test, so the
// first second polls back to back, yielding the core between tests (oversubscribed ranks on few
// cores must let the others run, as mpi_yield_when_idle does for blocking calls); a wait longer
// than that is a late peer, not a transfer, and naps 20 us between tests.
void wait_for(MPI_Request& req, const char* what, int size) {
  const double limit = dist_timeout_s();
  const auto t0 = std::chrono::steady_clock::now();
  double waited = 0;
  for (int polls = 0;; ++polls) {
    int done = 0;
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (done) return;
    if ((polls & 63) == 0) {
      waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (waited > limit)
        AM_FAIL("MPI {} on a group of {} ranks did not complete within {} s: a rank stalled, hangs, "
                "or is far behind (it did not reach the same collective); raise "
                "AUTOMOE_DIST_TIMEOUT (seconds) if a rank legitimately needs longer",
                what, size, limit);
    }
    if (waited < 1.0) {
      sched_yield();
    } else {
      const timespec nap{0, 20000};
      nanosleep(&nap, nullptr);
    }
  }
}

MPI_Datatype mpi_type(Elem e) {
  switch (e) {
    case Elem::kF32: return MPI_FLOAT;
    case Elem::kF64: return MPI_DOUBLE;
    case Elem::kI64: break;
  }
  return MPI_INT64_T;
}

struct MpiComm final : Comm::Impl {
  MPI_Comm comm = MPI_COMM_NULL;

  ~MpiComm() override {
    if (comm != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm);
  }

  void barrier() override {
    MPI_Request r;
    MPI_Ibarrier(comm, &r);
    wait_for(r, "barrier", size);
  }

  void allreduce(void* x, int64_t n, Elem elem, Reduce op) override {
    const char* what = op == Reduce::kSum ? "all-reduce (sum)" : "all-reduce (max)";
    auto* p = static_cast<char*>(x);
    for (int64_t i = 0; i < n; i += kChunk) {
      MPI_Request r;
      MPI_Iallreduce(MPI_IN_PLACE, p + i * elem_bytes(elem), int(std::min(kChunk, n - i)),
                     mpi_type(elem), op == Reduce::kSum ? MPI_SUM : MPI_MAX, comm, &r);
      wait_for(r, what, size);
    }
  }

  void reduce_scatter_sum(float* recv, const float* send, int64_t n) override {
    MPI_Request r;
    MPI_Ireduce_scatter_block(send, recv, as_int(n, "reduce-scatter block size"), MPI_FLOAT,
                              MPI_SUM, comm, &r);
    wait_for(r, "reduce-scatter", size);
  }

  void broadcast(void* data, int64_t bytes, int root) override {
    auto* p = static_cast<char*>(data);
    for (int64_t i = 0; i < bytes; i += kChunk) {
      MPI_Request r;
      MPI_Ibcast(p + i, int(std::min(kChunk, bytes - i)), MPI_BYTE, root, comm, &r);
      wait_for(r, "broadcast", size);
    }
  }

  void gather(void* recv, const void* send, int64_t bytes, int root) override {
    MPI_Request r;
    MPI_Igather(send, as_int(bytes, "gather size"), MPI_BYTE, recv, int(bytes), MPI_BYTE, root,
                comm, &r);
    wait_for(r, "gather", size);
  }

  void allgather(void* recv, const void* send, int64_t bytes) override {
    MPI_Request r;
    MPI_Iallgather(send, as_int(bytes, "all-gather size"), MPI_BYTE, recv, int(bytes), MPI_BYTE,
                   comm, &r);
    wait_for(r, "all-gather", size);
  }

  void alltoall(int64_t* recv, const int64_t* send) override {
    MPI_Request r;
    MPI_Ialltoall(send, 1, MPI_INT64_T, recv, 1, MPI_INT64_T, comm, &r);
    wait_for(r, "all-to-all", size);
  }

  void alltoallv(void* recv, const int64_t* recv_counts, const void* send,
                 const int64_t* send_counts, int64_t row_bytes) override {
    std::vector<int> sc(size), sd(size), rc(size), rd(size);
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size; ++r) {
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
    MPI_Request r;
    MPI_Ialltoallv(send, sc.data(), sd.data(), row, recv, rc.data(), rd.data(), row, comm, &r);
    wait_for(r, "all-to-all-v", size);
    MPI_Type_free(&row);
  }
};

struct MpiBackend final : Backend {
  bool own = false;  // MPI_Init_thread was called here: finalize() ends MPI
  int rank_ = 0, size_ = 1;

  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  std::shared_ptr<Comm::Impl> group(const std::vector<int>& members) override {
    // the groups partition the world: a group's first member names it
    MPI_Comm c;
    MPI_Comm_split(MPI_COMM_WORLD, members.front(), rank_, &c);
    auto out = std::make_shared<MpiComm>();
    out->comm = c;
    MPI_Comm_size(c, &out->size);
    MPI_Comm_rank(c, &out->rank);
    return out;
  }

  void abort() override {
    MPI_Abort(MPI_COMM_WORLD, 1);  // stops every rank
    std::_Exit(1);
  }

  void finalize() override {
    if (own && !mpi_finalized()) MPI_Finalize();
  }
};

}  // namespace

bool mpi_running() {
  int already = 0;
  MPI_Initialized(&already);
  return already != 0 && !mpi_finalized();
}

std::unique_ptr<Backend> start_mpi(bool own) {
  auto b = std::make_unique<MpiBackend>();
  b->own = own;
  if (own) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    AM_CHECK(provided >= MPI_THREAD_FUNNELED, "the MPI library gives thread level {}; automoe needs MPI_THREAD_FUNNELED", provided);
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &b->rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &b->size_);
  return b;
}

}  // namespace automoe::dist
