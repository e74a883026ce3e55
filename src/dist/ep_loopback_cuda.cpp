// dist/ep_loopback_cuda.cpp: the loopback EP transport (dist/ep_transport.h): P virtual ranks in
// one process on one GPU, the all-to-all-v as device-to-device copies on the caller's stream.
#include "backend/cuda/common.cuh"
#include "core/check.h"
#include "dist/ep_transport.h"

namespace automoe::dist {

LoopbackTransport::LoopbackTransport(int P) : P_(P) {
  AM_CHECK(P >= 1, "the loopback EP transport needs at least one rank, got {}", P);
}

void LoopbackTransport::alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                                  cudaStream_t stream) {
  const int P = P_;
  for (int src = 0; src < P; ++src)
    for (int dst = 0; dst < P; ++dst) {
      const int64_t n = rows.send_cnt[src * P + dst];
      AM_CHECK(n == rows.recv_cnt[dst * P + src],
               "internal: loopback all-to-all: rank {} sends {} rows to rank {}, which expects {}",
               src, n, dst, rows.recv_cnt[dst * P + src]);
      if (n == 0) continue;
      for (int k = 0; k < nt; ++k) {
        const size_t rb = size_t(t[k].row_elems) * ep_dtype_bytes(t[k].dtype);
        const auto* s = static_cast<const char*>(t[k].send[src]) + rows.send_off[src * P + dst] * rb;
        auto* d = static_cast<char*>(t[k].recv[dst]) + rows.recv_off[dst * P + src] * rb;
        CUDA_CHECK(cudaMemcpyAsync(d, s, size_t(n) * rb, cudaMemcpyDeviceToDevice, stream));
      }
    }
}

void LoopbackTransport::sync(cudaStream_t stream) { CUDA_CHECK(cudaStreamSynchronize(stream)); }

}  // namespace automoe::dist
