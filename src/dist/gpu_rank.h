// dist/gpu_rank.h: where a GPU rank runs and how its expert-parallel rows travel.
//   place_on_gpu         this process's GPU: local_rank, round-robin over the GPUs of the node
//                        when there are more ranks than GPUs (said once, by world rank 0)
//   choose_ep_transport  AUTOMOE_EP_TRANSPORT = mpi | nccl | auto (default auto): auto takes NCCL
//                        when automoe was built with it and every rank has a GPU of its own
//                        (NCCL refuses two ranks of one communicator on one GPU), else MPI staging
//   GpuEpComm            owns the chosen transport of this rank's EP group (and the NCCL
//                        communicator behind it)
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

enum class EpTransportKind { kMpiStaged, kNccl };
const char* ep_transport_kind_name(EpTransportKind k);
bool built_with_nccl();
// `request`: "mpi", "nccl" or "auto"; empty = the AUTOMOE_EP_TRANSPORT environment variable
// (default auto). Throws, saying what to do, for nccl without NCCL or on a shared GPU.
EpTransportKind choose_ep_transport(const std::string& request, const GpuPlacement& pl);

class NcclGroup;
// The transport of this rank's EP group (collective over groups.ep).
class GpuEpComm {
 public:
  GpuEpComm(const Groups& g, const GpuPlacement& pl, EpTransportKind kind);
  ~GpuEpComm();
  GpuEpComm(const GpuEpComm&) = delete;
  GpuEpComm& operator=(const GpuEpComm&) = delete;
  EpTransport& transport() { return *t_; }
  EpTransportKind kind() const { return kind_; }
  NcclGroup* nccl() { return nccl_.get(); }  // null with MPI staging

 private:
  EpTransportKind kind_;
  std::shared_ptr<NcclGroup> nccl_;  // shared_ptr: complete only in NCCL builds
  std::unique_ptr<EpTransport> t_;
};

}  // namespace automoe::dist
