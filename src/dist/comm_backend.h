// dist/comm_backend.h: what a host-collective backend provides to dist::Comm (process_group.cpp,
// the front): a communicator (Comm::Impl) and the world (Backend). Two backends: MPI
// (comm_mpi.cpp) and automoe's TCP mesh (comm_tcp.cpp). Internal to src/dist.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dist/process_group.h"

namespace automoe::dist {

enum class Elem { kF32, kF64, kI64 };
enum class Reduce { kSum, kMax };

// A communicator of size > 1. Every call is collective over its ranks and throws on a peer's
// death (TCP) or when AUTOMOE_DIST_TIMEOUT passes, naming the collective.
struct Comm::Impl {
  int rank = 0, size = 1;
  virtual ~Impl() = default;
  virtual void barrier() = 0;
  // x[n] of `elem` <- the reduction over ranks, the same bits on every rank.
  virtual void allreduce(void* x, int64_t n, Elem elem, Reduce op) = 0;
  virtual void reduce_scatter_sum(float* recv, const float* send, int64_t n) = 0;
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void gather(void* recv, const void* send, int64_t bytes, int root) = 0;
  virtual void allgather(void* recv, const void* send, int64_t bytes) = 0;
  virtual void alltoall(int64_t* recv, const int64_t* send) = 0;
  virtual void alltoallv(void* recv, const int64_t* recv_counts, const void* send,
                         const int64_t* send_counts, int64_t row_bytes) = 0;
};

// The job's world, started by init().
struct Backend {
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The communicator of the world ranks `members` (ascending, holding this rank). Collective over
  // the world: every rank calls it, each with its own group, and the groups partition the world.
  virtual std::shared_ptr<Comm::Impl> group(const std::vector<int>& members) = 0;
  // Stops this rank so that the others stop too (MPI_Abort, or closing the mesh); no return.
  [[noreturn]] virtual void abort() = 0;
  virtual void finalize() = 0;
};

// MPI started by a host program (MPI_Initialized before init()): use it, never finalize it.
bool mpi_running();
// MPI_Init_thread here (own = true) or the host program's MPI (own = false).
std::unique_ptr<Backend> start_mpi(bool own);
// The TCP mesh of `li.world_size` ranks (rendezvous at MASTER_ADDR:MASTER_PORT).
std::unique_ptr<Backend> start_tcp(const LaunchInfo& li);

// A positive number of seconds from the environment variable `name`, or `fallback` when unset.
double env_seconds(const char* name, double fallback);
// AUTOMOE_DIST_TIMEOUT in seconds (default 600): how long any collective may wait.
double dist_timeout_s();
// The pause between two polls of a host wait that has waited `waited_s` seconds so far: a yield
// for the first 2 ms (the EP counts sync and the step's waits usually end within tens of
// microseconds, and a 50 us nap, which the kernel stretches to 60-110 us, would then be most of
// the wait; the GPU idles until the host enqueues again), then a 50 us nap (a wait that long is
// a slow peer, and the core is better given back).
void poll_pause(double waited_s);
// The element size of `e` in bytes.
inline int64_t elem_bytes(Elem e) { return e == Elem::kF32 ? 4 : 8; }

}  // namespace automoe::dist
