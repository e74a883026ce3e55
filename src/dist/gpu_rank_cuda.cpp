// dist/gpu_rank_cuda.cpp: GPU placement, the EP transport choice and its owner (dist/gpu_rank.h).
#include "dist/gpu_rank.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "backend/cuda/common.cuh"
#include "core/check.h"
#include "dist/ep_ipc.h"
#include "dist/ep_mpi_staged.h"
#if defined(AUTOMOE_HAVE_NCCL) && AUTOMOE_HAVE_NCCL
#include "dist/nccl_group.h"
#define AUTOMOE_GPU_RANK_NCCL 1
#else
#define AUTOMOE_GPU_RANK_NCCL 0
#endif

namespace automoe::dist {

GpuPlacement place_on_gpu(const Comm& world, const LaunchInfo& li, const char* who) {
  GpuPlacement pl;
  const cudaError_t e = cudaGetDeviceCount(&pl.devices);
  AM_CHECK(e == cudaSuccess && pl.devices > 0,
           "{}: rank {} sees no CUDA device ({}); check CUDA_VISIBLE_DEVICES and the driver, or "
           "use the CPU backend",
           who, world.rank(), e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
  int64_t local = li.local_rank + 1;
  world.allreduce_max(&local, 1);
  pl.ranks_per_node = int(local);
  pl.device = li.local_rank % pl.devices;
  CUDA_CHECK(cudaSetDevice(pl.device));
  if (pl.shared() && world.rank() == 0) {
    std::printf("%s: %d ranks per node share %d GPU%s round-robin (local rank r uses GPU r %% %d); "
                "fine for checking, slow for training\n",
                who, pl.ranks_per_node, pl.devices, pl.devices > 1 ? "s" : "", pl.devices);
    std::fflush(stdout);
  }
  return pl;
}

const char* ep_transport_kind_name(EpTransportKind k) {
  return k == EpTransportKind::kNccl ? "nccl" : k == EpTransportKind::kIpc ? "ipc" : "mpi-staged";
}

bool built_with_nccl() { return AUTOMOE_GPU_RANK_NCCL != 0; }

EpTransportKind choose_ep_transport(const std::string& request, const GpuPlacement& pl) {
  std::string r = request;
  if (r.empty()) {
    const char* v = std::getenv("AUTOMOE_EP_TRANSPORT");
    r = v && *v ? v : "auto";
  }
  if (r == "mpi") return EpTransportKind::kMpiStaged;
  if (r == "ipc") return EpTransportKind::kIpc;  // opt-in: IpcTransport checks node and P2P
  if (r == "nccl") {
    AM_CHECK(built_with_nccl(), "AUTOMOE_EP_TRANSPORT=nccl, but automoe was built without NCCL "
             "(cmake/nccl.cmake found none); use AUTOMOE_EP_TRANSPORT=mpi or rebuild with NCCL");
    AM_CHECK(!pl.shared(), "AUTOMOE_EP_TRANSPORT=nccl, but {} ranks per node share {} GPU(s) and "
             "NCCL refuses two ranks on one GPU; use AUTOMOE_EP_TRANSPORT=mpi (or auto), or one "
             "rank per GPU",
             pl.ranks_per_node, pl.devices);
    return EpTransportKind::kNccl;
  }
  AM_CHECK(r == "auto", "AUTOMOE_EP_TRANSPORT={} is not known; use mpi, nccl, ipc or auto", r);
  return built_with_nccl() && !pl.shared() ? EpTransportKind::kNccl : EpTransportKind::kMpiStaged;
}

GpuComms::GpuComms(const Groups& g, const GpuPlacement& pl, EpTransportKind kind, bool gradients)
    : kind_(kind) {
  if (kind == EpTransportKind::kNccl) {
#if AUTOMOE_GPU_RANK_NCCL
    // the same order on every rank: world, DP group, EP group
    if (gradients && g.world.size() > 1) world_ = std::make_shared<NcclGroup>(g.world, pl.device);
    if (gradients && g.dp.size() > 1) dp_ = std::make_shared<NcclGroup>(g.dp, pl.device);
    if (g.ep.size() > 1) {
      ep_ = std::make_shared<NcclGroup>(g.ep, pl.device);
      t_ = std::make_unique<NcclTransport>(*ep_);
    }
#else
    AM_FAIL("internal: NCCL chosen in a build without NCCL");
#endif
  } else if (kind == EpTransportKind::kIpc && g.ep.size() > 1) {
    t_ = std::make_unique<IpcTransport>(g.ep);
  } else if (g.ep.size() > 1) {
    t_ = std::make_unique<MpiStagedTransport>(g.ep);
  }
}

GpuComms::~GpuComms() {
  t_.reset();  // the transport refers to the EP communicator: it goes first
  ep_.reset();
  dp_.reset();
  world_.reset();
}

}  // namespace automoe::dist
