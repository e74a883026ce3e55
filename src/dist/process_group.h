// dist/process_group.h: ranks and communicators. One process per device. Ranks come from the
// launcher: mpirun, or srun with PMI/PMIx, run on MPI (dist/comm_mpi.cpp); torchrun and srun
// without --mpi run on automoe's own TCP mesh (dist/comm_tcp.cpp). A process started without a
// launcher is world size 1 and never touches MPI or sockets, so the single-process paths (and
// their tests) run exactly as before.
//
// Layout of a job (world = ep * dp):
//   EP group g  = world ranks [g*ep, (g+1)*ep)      experts split contiguously over its ranks;
//                                                   consecutive ranks, so a group stays in a node
//   DP group e  = world ranks {e, e+ep, e+2*ep, ...} the ranks holding the same experts
// Every world rank trains on its own micro-batch (data parallel over tokens).
//
// These host collectives carry the CPU backend's traffic and bootstrap the GPU path (NCCL ids,
// IPC handles); the GPU data paths run on NCCL or CUDA IPC over the same groups.
// Failure: a rank that throws must not leave the others blocked in a collective. Every wait has
// a deadline (AUTOMOE_DIST_TIMEOUT seconds, default 600) and then throws, naming the collective;
// a peer that died is an error at once under TCP. The CLI catches every error at the top level
// and calls abort_all(), which prints the message with the rank and stops this rank: MPI_Abort
// (mpirun/srun stop every rank), or under TCP closing every connection, so each peer's next
// collective fails and it stops too.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace automoe::dist {

// What the launcher told this process (from its environment).
struct LaunchInfo {
  // "mpirun" (Open MPI), "pmi" (srun --mpi=pmix/pmi2, MPICH): MPI.
  // "torchrun" (RANK/WORLD_SIZE/LOCAL_RANK), "slurm" (srun without --mpi: SLURM_PROCID,
  // SLURM_STEP_NUM_TASKS, SLURM_LOCALID): TCP. "none": one process.
  std::string launcher = "none";
  int world_size = 1, rank = 0, local_rank = 0;  // local_rank picks the GPU (place_on_gpu)
};
LaunchInfo detect_launch();

// Starts the job's backend when a launcher started more than one process (or MPI under
// mpirun/PMI); safe to call many times. AUTOMOE_DIST_BACKEND=tcp takes the TCP mesh under any
// launcher (MASTER_ADDR and MASTER_PORT then name rank 0's host and port), =mpi insists on MPI.
// MPI: MPI_Init_thread, funneled (only the main thread communicates).
void init();
bool backend_active();       // init() started a backend (MPI or TCP), or the host program runs MPI
const char* backend_name();  // "mpi", "tcp" or "none"
void finalize();             // MPI_Finalize or closes the mesh; call once at the end of main
// Prints "automoe: error (rank R of W): msg" and stops every rank (MPI_Abort; under TCP: closes
// the connections, which ends the peers' collectives, and exits 1), or exits 1. A message that
// collective_failed() already printed is not printed again.
[[noreturn]] void abort_all(const std::string& msg);

// A collective of this rank failed (a host collective timed out or lost a peer, an NCCL wait
// failed or timed out): the job is over. Prints msg at once, in abort_all's words, and stops
// this process's device collectives (stop_device_collectives); the caller then throws as usual
// and the top level calls abort_all. Why at once: the error unwinds through destructors that
// wait on the GPU (stream synchronizes, cudaFree), and a wait on a kernel whose peer is stopped
// never returns; printed only at the top level, the message would be lost in that hang.
void collective_failed(const std::string& msg);
// Device collectives (NCCL, dist/nccl_group.cpp) register how to stop them: fn aborts every
// communicator of the process, so that their kernels end and every later wait on a stream
// returns (or, if they cannot be stopped, ends the process through abort_all). fn must be
// idempotent. stop_device_collectives() runs every registered fn: collective_failed() calls it,
// and so does Qwen3MoeCuda's destructor when an exception unwinds it (any error mid-step).
void add_device_collective_stopper(void (*fn)());
void stop_device_collectives();

// One communicator. A default Comm is size 1, rank 0: every collective is a local copy.
// Counts are int64 on the API; the MPI calls check they fit. Every collective waits at most
// AUTOMOE_DIST_TIMEOUT seconds (TCP: without data moving) and then throws.
class Comm {
 public:
  struct Impl;  // a backend's communicator (dist/comm_backend.h)
  Comm() = default;
  explicit Comm(std::shared_ptr<Impl> impl);  // null: size 1
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
  std::shared_ptr<Impl> impl_;  // null: size 1
  int rank_ = 0, size_ = 1;
};

// An on/off switch from the environment (AUTOMOE_GRAD_OVERLAP, AUTOMOE_EP_PUSH, ...): on unless
// `name` is "0".
bool env_on(const char* name);
// The same, for a switch that changes which collectives a rank issues, so it must agree over
// `c` (collective): every rank throws, naming the switch, when some ranks have it off.
bool env_on_everywhere(const char* name, const Comm& c);

struct Groups {
  Comm world, ep, dp;
  int ep_size() const { return ep.size(); }
  int dp_size() const { return dp.size(); }
  bool distributed() const { return world.size() > 1; }
};

// The groups of this job for expert-parallel size `ep` (calls init()). Throws when `ep` does not
// divide the world size. make_groups(1) in a single process is the trivial layout.
Groups make_groups(int ep);
// World size 1 whatever the launcher (a reference run inside a multi-rank job, tests).
Groups single_process_groups();

}  // namespace automoe::dist
