// dist/gpu_rank.h: where a GPU rank runs and how its expert-parallel rows travel.
//   place_on_gpu         this process's GPU: local_rank, round-robin over the GPUs of the node
//                        when there are more ranks than GPUs (said once, by world rank 0)
//   choose_ep_transport  AUTOMOE_EP_TRANSPORT = mpi | nccl | ipc | auto (default auto)
//   GpuComms             owns what the choice gives a rank: the EP group's transport (ep > 1),
//                        and, where NCCL is built in and every rank has a GPU of its own, the
//                        NCCL communicators of the world and the DP group that the gradient
//                        all-reduce uses (dist/data_parallel_cuda.h; MPI staging otherwise)
// auto, resolved by GpuComms (collectively, so every rank takes the same transport):
//   1 ipc  (CUDA IPC buffers, dist/ep_ipc.h) when the EP group is on one node and its GPUs are
//          the same or have peer access (NVLink or PCIe P2P): the intra-node path;
//   2 else nccl when built with NCCL and every rank has a GPU of its own (NCCL refuses two
//          ranks of one communicator on one GPU): other nodes, or GPUs without P2P;
//   3 else MPI staging through host memory (any placement).
// IpcTransport refuses on every rank at once, with the reason, so the fall back is the same on
// every rank; rank 0 prints the reason and what was taken instead.
// Only in builds with CUDA (automoe_cuda_model); collective over the world where it says so.
#pragma once
#include <memory>
#include <string>

#include "dist/ep_transport.h"
#include "dist/process_group.h"

namespace automoe::dist {

struct GpuPlacement {
  int device = 0;          // this process's GPU (made current by place_on_gpu)
  int devices = 0;         // GPUs this process sees
  int ranks_per_node = 1;  // the largest local_rank + 1 of the job
  bool shared() const { return ranks_per_node > devices; }  // some GPU runs several ranks
};
// Collective over `world`. `who` names the program in the one message about shared GPUs.
GpuPlacement place_on_gpu(const Comm& world, const LaunchInfo& li, const char* who);

// kAuto only comes out of choose_ep_transport; GpuComms::kind() is never kAuto.
enum class EpTransportKind { kMpiStaged, kNccl, kIpc, kAuto };
const char* ep_transport_kind_name(EpTransportKind k);
bool built_with_nccl();
// `request`: "mpi", "nccl", "ipc" or "auto"; empty = the AUTOMOE_EP_TRANSPORT environment
// variable (default auto). Throws, saying what to do, for nccl without NCCL or on a shared GPU.
// ipc is checked where the transport is made (GpuComms: one node, peer access, cudaIpc).
EpTransportKind choose_ep_transport(const std::string& request, const GpuPlacement& pl);

class NcclGroup;
// Collective over the world (each communicator over its group). The gradient communicators
// (NCCL, each only where its group has more than one rank) exist when NCCL is built in and no
// GPU is shared, with kinds nccl, ipc and auto; `gradients` false: the EP transport only
// (ep_check). kind kAuto is resolved here (above); kind() says what was taken.
class GpuComms {
 public:
  GpuComms(const Groups& g, const GpuPlacement& pl, EpTransportKind kind, bool gradients = true);
  ~GpuComms();
  GpuComms(const GpuComms&) = delete;
  GpuComms& operator=(const GpuComms&) = delete;
  EpTransportKind kind() const { return kind_; }
  // One line for rank 0's log: the EP transport and what the gradients travel over.
  std::string describe(const Groups& g) const;
  EpTransport* ep_transport() { return t_.get(); }  // null when the EP group is one rank
  // A second transport of the same kind over the same EP group, made at the first call
  // (collective over the EP group: every rank calls it at the same point): the two-half
  // overlap's half B (train.ep_halves). IPC only (its buffers and flags are per transport);
  // null for the other kinds and a one-rank EP group.
  EpTransport* second_ep_transport();
  NcclGroup* nccl_ep() { return ep_.get(); }
  NcclGroup* nccl_world() { return world_.get(); }
  NcclGroup* nccl_dp() { return dp_.get(); }

 private:
  EpTransportKind kind_;
  std::string fallback_;  // auto: why ipc was not taken (empty: it was, or not tried)
  // shared_ptr: NcclGroup is complete only in NCCL builds
  std::shared_ptr<NcclGroup> ep_, world_, dp_;
  std::unique_ptr<EpTransport> t_, t2_;
  const Comm* ep_comm_ = nullptr;
};

}  // namespace automoe::dist
