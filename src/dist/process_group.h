// dist/process_group.h: ranks and communicators. One process per device; ranks come from MPI
// (mpirun, or srun with PMI/PMIx). A process started without an MPI launcher is world size 1 and
// never touches MPI, so the single-process paths (and their tests) run exactly as before.
//
// Layout of a job (world = ep * dp):
//   EP group g  = world ranks [g*ep, (g+1)*ep)      experts split contiguously over its ranks;
//                                                   consecutive ranks, so a group stays in a node
//   DP group e  = world ranks {e, e+ep, e+2*ep, ...} the ranks holding the same experts
// Every world rank trains on its own micro-batch (data parallel over tokens).
//
// Collectives run on MPI here (the CPU backend); the GPU path will run NCCL on the same groups.
// Failure: a rank that throws must not leave the others blocked in a collective. The CLI catches
// every error at the top level and calls abort_all(), which prints the message with the rank and
// calls MPI_Abort: mpirun/srun then stop every rank and exit non-zero.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace automoe::dist {

// What the launcher told this process (from its environment). Only MPI launchers start MPI;
// the rest is informational (local_rank will pick the GPU).
struct LaunchInfo {
  std::string launcher = "none";  // "mpirun" (Open MPI), "pmi" (srun --mpi=pmix/pmi2, MPICH), "none"
  int world_size = 1, rank = 0, local_rank = 0;
  // torchrun / Slurm variables seen without an MPI launcher (RANK/WORLD_SIZE/LOCAL_RANK or
  // SLURM_PROCID/SLURM_NTASKS): automoe cannot bootstrap from them and says so.
  int foreign_world_size = 1;
  std::string foreign_launcher;
};
LaunchInfo detect_launch();

// Starts MPI (MPI_Init_thread, funneled: only the main thread communicates) when an MPI launcher
// started this process; safe to call many times. Throws when a non-MPI launcher asks for more
// than one process.
void init();
bool mpi_active();           // init() started MPI
void finalize();             // MPI_Finalize when init() started MPI; call once at the end of main
// Prints "automoe: error (rank R of W): msg" and stops every rank (MPI_Abort), or exits 1.
[[noreturn]] void abort_all(const std::string& msg);

// One communicator. A default Comm is size 1, rank 0: every collective is a local copy.
// Counts are int64 on the API; the MPI calls check they fit.
class Comm {
 public:
  Comm() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }

  void barrier() const;
  void allreduce_sum(float* x, int64_t n) const;
  void allreduce_sum(double* x, int64_t n) const;
  void allreduce_sum(int64_t* x, int64_t n) const;
  void allreduce_max(int64_t* x, int64_t n) const;
  void allreduce_max(double* x, int64_t n) const;
  // recv[n] (=) <- the sum over ranks of block `rank` of every rank's send[size * n]
  // (MPI_Reduce_scatter_block; recv and send must not overlap). ZeRO's gradient reduce.
  void reduce_scatter_sum(float* recv, const float* send, int64_t n) const;
  void broadcast(void* data, int64_t bytes, int root) const;
  // recv[size * bytes] (root only; may be null elsewhere) <- every rank's `bytes` in rank order.
  void gather(void* recv, const void* send, int64_t bytes, int root) const;
  // recv[size * bytes] <- every rank's `bytes`, in rank order, on every rank.
  void allgather(void* recv, const void* send, int64_t bytes) const;
  // recv[size] <- send[size]: one int64 to and from every rank.
  void alltoall(int64_t* recv, const int64_t* send) const;
  // Variable all-to-all of rows of `row_bytes`: send holds send_counts[d] rows for rank d, in
  // rank order; recv gets recv_counts[s] rows from rank s, in rank order.
  void alltoallv(void* recv, const int64_t* recv_counts, const void* send,
                 const int64_t* send_counts, int64_t row_bytes) const;

 private:
  friend Comm split_world(int color, int key);  // process_group.cpp: MPI_Comm_split of the world
  struct Impl;                  // the MPI communicator
  std::shared_ptr<Impl> impl_;  // null: size 1
  int rank_ = 0, size_ = 1;
};

struct Groups {
  Comm world, ep, dp;
  int ep_size() const { return ep.size(); }
  int dp_size() const { return dp.size(); }
  bool distributed() const { return world.size() > 1; }
};

// The groups of this job for expert-parallel size `ep` (calls init()). Throws when `ep` does not
// divide the world size. make_groups(1) in a single process is the trivial layout.
Groups make_groups(int ep);
// World size 1 whatever the launcher (a reference run inside an MPI job, tests).
Groups single_process_groups();

}  // namespace automoe::dist
