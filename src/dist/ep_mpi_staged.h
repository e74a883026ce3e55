// dist/ep_mpi_staged.h: the EP transport through host memory and MPI (dist/ep_transport.h):
// rows are copied device -> pinned host, exchanged with one MPI_Alltoallv over the EP Comm, and
// copied host -> device. One rank per process, any number of processes per GPU.
//
// Why it exists: NCCL refuses two ranks of one communicator on the same GPU, so this is how
// `mpirun -np 2` runs the multi-process EP path on ONE GPU (checking the real multi-process code
// where only one GPU is lent), and it is the fallback where NCCL is absent. It is slow (two
// PCIe copies and a host sync per all-to-all); use NCCL when every rank has its own GPU.
//
// Staging layout of one call (pinned, allocated once by reserve(), grown only if a call needs
// more; EpMoeCuda reserves its worst case up front so nothing is allocated per step):
//   send_host: for peer p in rank order, for tensor k in call order: send_cnt[p] rows of tensor k
//   recv_host: the same for what arrives from each peer (recv_cnt[p] rows of each tensor)
// MPI counts are in 2-byte units (every row is a whole number of bf16 or 4-byte elements), so a
// call moves at most 4 GiB per peer.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dist/ep_transport.h"
#include "dist/process_group.h"

namespace automoe::dist {

class MpiStagedTransport final : public EpTransport {
 public:
  explicit MpiStagedTransport(const Comm& ep);
  ~MpiStagedTransport() override;
  MpiStagedTransport(const MpiStagedTransport&) = delete;
  MpiStagedTransport& operator=(const MpiStagedTransport&) = delete;

  const char* name() const override { return "mpi-staged"; }
  int size() const override { return ep_.size(); }
  int num_local() const override { return 1; }
  int rank_of(int) const override { return ep_.rank(); }
  void reserve(size_t send_bytes, size_t recv_bytes, size_t pair_bytes) override;  // local
  // Synchronises `stream` (the rows must be on the host), then MPI, then enqueues the uploads.
  void alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                 cudaStream_t stream) override;
  void sync(cudaStream_t stream) override;

 private:
  Comm ep_;
  unsigned char *send_host_ = nullptr, *recv_host_ = nullptr;  // cudaMallocHost
  size_t send_cap_ = 0, recv_cap_ = 0;
  std::vector<int64_t> send_units_, recv_units_;  // [P] 2-byte units per peer
};

}  // namespace automoe::dist
