// dist/gpu_rank.h: where a GPU rank runs and how its expert-parallel rows travel.
//   place_on_gpu         this process's GPU: local_rank, round-robin over the GPUs of the node
//                        when there are more ranks than GPUs (said once, by world rank 0)
//   choose_ep_transport  AUTOMOE_EP_TRANSPORT = mpi | nccl | ipc | auto (default auto): auto takes
//                        NCCL when automoe was built with it and every rank has a GPU of its own
//                        (NCCL refuses two ranks of one communicator on one GPU), else MPI staging;
//                        ipc (CUDA IPC buffers, dist/ep_ipc.h: the ranks of one node, the same GPU
//                        or P2P-capable GPUs) only when asked for, until it has run on GPUs
//   GpuComms             owns what the choice gives a rank: the EP group's transport (ep > 1),
//                        and with NCCL the communicators of the world and the DP group that the
//                        gradient all-reduce uses (dist/data_parallel_cuda.h; MPI staging
//                        otherwise)
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

enum class EpTransportKind { kMpiStaged, kNccl, kIpc };
const char* ep_transport_kind_name(EpTransportKind k);
bool built_with_nccl();
// `request`: "mpi", "nccl", "ipc" or "auto"; empty = the AUTOMOE_EP_TRANSPORT environment
// variable (default auto). Throws, saying what to do, for nccl without NCCL or on a shared GPU.
// ipc is checked where the transport is made (GpuComms: one node, peer access, cudaIpc).
EpTransportKind choose_ep_transport(const std::string& request, const GpuPlacement& pl);

class NcclGroup;
// Collective over the world (each communicator over its group). NCCL communicators exist only
// with kind kNccl, each only where its group has more than one rank (with kIpc the gradients go
// through MPI staging); `gradients` false: the EP transport only (ep_check).
class GpuComms {
 public:
  GpuComms(const Groups& g, const GpuPlacement& pl, EpTransportKind kind, bool gradients = true);
  ~GpuComms();
  GpuComms(const GpuComms&) = delete;
  GpuComms& operator=(const GpuComms&) = delete;
  EpTransportKind kind() const { return kind_; }
  EpTransport* ep_transport() { return t_.get(); }  // null when the EP group is one rank
  NcclGroup* nccl_ep() { return ep_.get(); }
  NcclGroup* nccl_world() { return world_.get(); }
  NcclGroup* nccl_dp() { return dp_.get(); }

 private:
  EpTransportKind kind_;
  // shared_ptr: NcclGroup is complete only in NCCL builds
  std::shared_ptr<NcclGroup> ep_, world_, dp_;
  std::unique_ptr<EpTransport> t_;
};

}  // namespace automoe::dist
