// dist/gpu_rank_cuda.cpp: GPU placement, the EP transport choice and its owner (dist/gpu_rank.h).
#include "dist/gpu_rank.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

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
  switch (k) {
    case EpTransportKind::kNccl: return "nccl";
    case EpTransportKind::kIpc: return "ipc";
    case EpTransportKind::kAuto: return "auto";
    case EpTransportKind::kMpiStaged: break;
  }
  return "mpi-staged";
}

bool built_with_nccl() { return AUTOMOE_GPU_RANK_NCCL != 0; }

EpTransportKind choose_ep_transport(const std::string& request, const GpuPlacement& pl) {
  std::string r = request;
  if (r.empty()) {
    const char* v = std::getenv("AUTOMOE_EP_TRANSPORT");
    r = v && *v ? v : "auto";
  }
  if (r == "mpi") return EpTransportKind::kMpiStaged;
  if (r == "ipc") return EpTransportKind::kIpc;  // IpcTransport checks node and P2P
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
  return EpTransportKind::kAuto;  // resolved by GpuComms (collective: the IPC probe)
}

GpuComms::GpuComms(const Groups& g, const GpuPlacement& pl, EpTransportKind kind, bool gradients)
    : kind_(kind), ep_comm_(&g.ep) {
  const bool nccl_ok = built_with_nccl() && !pl.shared();
  if (kind_ == EpTransportKind::kAuto) {
    kind_ = nccl_ok ? EpTransportKind::kNccl : EpTransportKind::kMpiStaged;
    if (g.ep.size() > 1) {
      // IpcTransport's checks end on every rank with the same verdict (it throws on all of
      // them together), so every rank falls back the same way.
      try {
        t_ = std::make_unique<IpcTransport>(g.ep);
        kind_ = EpTransportKind::kIpc;
      } catch (const std::exception& e) {
        fallback_ = e.what();
      }
    }
  }
  // The gradient communicators: NCCL wherever it can run, whatever moves the EP rows (the same
  // order on every rank: world, DP group, then the EP group below).
#if AUTOMOE_GPU_RANK_NCCL
  if (nccl_ok && gradients && kind_ != EpTransportKind::kMpiStaged) {
    if (g.world.size() > 1) world_ = std::make_shared<NcclGroup>(g.world, pl.device);
    if (g.dp.size() > 1) dp_ = std::make_shared<NcclGroup>(g.dp, pl.device);
  }
#endif
  if (kind_ == EpTransportKind::kNccl) {
#if AUTOMOE_GPU_RANK_NCCL
    if (g.ep.size() > 1) {
      ep_ = std::make_shared<NcclGroup>(g.ep, pl.device);
      t_ = std::make_unique<NcclTransport>(*ep_);
    }
#else
    AM_FAIL("internal: NCCL chosen in a build without NCCL");
#endif
  } else if (kind_ == EpTransportKind::kIpc && g.ep.size() > 1) {
    if (!t_) t_ = std::make_unique<IpcTransport>(g.ep);
  } else if (g.ep.size() > 1) {
    t_ = std::make_unique<MpiStagedTransport>(g.ep);
  }
}

std::string GpuComms::describe(const Groups& g) const {
  std::string s = g.ep.size() > 1 ? std::string("EP rows over ") + ep_transport_kind_name(kind_)
                                  : std::string("no EP rows");
  if (kind_ == EpTransportKind::kIpc) s += " (CUDA IPC buffers within the node)";
  if (kind_ == EpTransportKind::kMpiStaged && g.ep.size() > 1) s += " (staged through host memory)";
  s += world_ ? ", gradients over NCCL"
              : ", gradients staged through host memory (NCCL needs a GPU per rank and a build "
                "with NCCL)";
  if (!fallback_.empty()) s += "; auto did not take ipc: " + fallback_;
  return s;
}

EpTransport* GpuComms::second_ep_transport() {
  if (kind_ != EpTransportKind::kIpc || !t_) return nullptr;
  if (!t2_) t2_ = std::make_unique<IpcTransport>(*ep_comm_);
  return t2_.get();
}

GpuComms::~GpuComms() {
  t2_.reset();
  t_.reset();  // the transport refers to the EP communicator: it goes first
  ep_.reset();
  dp_.reset();
  world_.reset();
}

}  // namespace automoe::dist
