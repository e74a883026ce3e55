// dist/ep_mpi_staged_cuda.cpp: MpiStagedTransport (dist/ep_mpi_staged.h): EP all-to-all-v rows
// device -> pinned host -> MPI_Alltoallv (dist::Comm) -> pinned host -> device.
#include "dist/ep_mpi_staged.h"

#include "backend/cuda/common.cuh"
#include "core/check.h"

namespace automoe::dist {

namespace {
constexpr size_t kUnit = 2;  // MPI counts in 2-byte units (rows are whole bf16 / 4-byte elements)

size_t row_bytes(const EpA2aTensor& t) { return size_t(t.row_elems) * ep_dtype_bytes(t.dtype); }
}  // namespace

MpiStagedTransport::MpiStagedTransport(const Comm& ep)
    : ep_(ep), send_units_(size_t(ep.size())), recv_units_(size_t(ep.size())) {}

MpiStagedTransport::~MpiStagedTransport() {
  if (send_host_) cudaFreeHost(send_host_);
  if (recv_host_) cudaFreeHost(recv_host_);
}

void MpiStagedTransport::reserve(size_t send_bytes, size_t recv_bytes, size_t /*pair_bytes*/) {
  if (send_bytes > send_cap_) {
    if (send_host_) CUDA_CHECK(cudaFreeHost(send_host_));
    send_host_ = nullptr;
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&send_host_), send_bytes));
    send_cap_ = send_bytes;
  }
  if (recv_bytes > recv_cap_) {
    if (recv_host_) CUDA_CHECK(cudaFreeHost(recv_host_));
    recv_host_ = nullptr;
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&recv_host_), recv_bytes));
    recv_cap_ = recv_bytes;
  }
}

void MpiStagedTransport::alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                                   cudaStream_t stream) {
  const int P = ep_.size();
  size_t rb_all = 0;  // bytes of one row of every tensor together
  for (int k = 0; k < nt; ++k) {
    AM_CHECK(row_bytes(t[k]) % kUnit == 0, "internal: EP row of {} bytes is not a whole number "
             "of 2-byte units",
             row_bytes(t[k]));
    rb_all += row_bytes(t[k]);
  }
  size_t send_total = 0, recv_total = 0;
  for (int p = 0; p < P; ++p) {
    send_total += size_t(rows.send_cnt[p]) * rb_all;
    recv_total += size_t(rows.recv_cnt[p]) * rb_all;
    send_units_[size_t(p)] = int64_t(size_t(rows.send_cnt[p]) * rb_all / kUnit);
    recv_units_[size_t(p)] = int64_t(size_t(rows.recv_cnt[p]) * rb_all / kUnit);
  }
  // Not reserved (a caller without EpMoeCuda's reserve): grow once, never shrink, after the
  // previous call's uploads from recv_host_ are done.
  if (send_total > send_cap_ || recv_total > recv_cap_) {
    CUDA_CHECK(cudaStreamSynchronize(stream));
    reserve(send_total, recv_total, 0);
  }
  // device -> host: peer by peer, tensor by tensor, as the staging layout says
  size_t at = 0;
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < nt; ++k) {
      const size_t rb = row_bytes(t[k]), n = size_t(rows.send_cnt[p]) * rb;
      if (n == 0) continue;
      const auto* src = static_cast<const unsigned char*>(t[k].send[0]) + rows.send_off[p] * rb;
      CUDA_CHECK(cudaMemcpyAsync(send_host_ + at, src, n, cudaMemcpyDeviceToHost, stream));
      at += n;
    }
  CUDA_CHECK(cudaStreamSynchronize(stream));  // the rows are on the host; the previous
                                              // call's uploads from recv_host_ are done too
  ep_.alltoallv(recv_host_, recv_units_.data(), send_host_, send_units_.data(), int64_t(kUnit));
  // host -> device (pinned: asynchronous; the next call's synchronize protects recv_host_)
  at = 0;
  for (int p = 0; p < P; ++p)
    for (int k = 0; k < nt; ++k) {
      const size_t rb = row_bytes(t[k]), n = size_t(rows.recv_cnt[p]) * rb;
      if (n == 0) continue;
      auto* dst = static_cast<unsigned char*>(t[k].recv[0]) + rows.recv_off[p] * rb;
      CUDA_CHECK(cudaMemcpyAsync(dst, recv_host_ + at, n, cudaMemcpyHostToDevice, stream));
      at += n;
    }
}

void MpiStagedTransport::sync(cudaStream_t stream) { CUDA_CHECK(cudaStreamSynchronize(stream)); }

}  // namespace automoe::dist
