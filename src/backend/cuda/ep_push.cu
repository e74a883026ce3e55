// backend/cuda/ep_push.cu: the EP dispatch that stores each token's rows straight into the peers'
// receive regions (declaration and layout in ep_kernels.h; dist::IpcTransport owns the regions
// and the flags that order them). Deterministic: every row has one writer, no atomics.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ep_kernels.h"

namespace automoe::cuda {

namespace {

constexpr int kRowThreads = 128;

// Block per token n: its row to every destination d it has picks on, with its picks remapped to
// d's local experts; 16-byte chunks (Hc of them per row). Peers' rows go to their regions at the
// row relative to d's first; own rows to the send buffers at send_pos.
__global__ void ep_dispatch_push_kernel(EpPushDst dst, uint4* x_send, int32_t* idx_send,
                                        float* w_send, const uint4* x, const int32_t* topk_idx,
                                        const float* topk_w, const int32_t* send_pos,
                                        const int32_t* send_cnt, int64_t Hc, int K, int El, int P,
                                        int me, bool rows_there) {
  const int64_t n = blockIdx.x;
  const uint4* src = x + n * Hc;
  const int64_t row_b = Hc * 16, pick_b = int64_t(K) * 4;
  int64_t first = 0;  // d's first row in the packed layout
  for (int d = 0; d < P; first += send_cnt[d], ++d) {
    const int64_t r = send_pos[n * P + d];
    if (r < 0) continue;  // uniform over the block
    uint4* xd;
    int32_t* id;
    float* wd;
    if (d == me) {
      xd = x_send + r * Hc;
      id = idx_send + r * K;
      wd = w_send + r * K;
    } else {
      const int64_t cnt = send_cnt[d], rel = r - first;
      if (cnt * (row_b + (idx_send ? 2 * pick_b : 0)) > dst.cap) continue;  // the host's check throws
      unsigned char* base = nullptr;  // dst.region[d], without indexing the parameter by a
#pragma unroll                        // variable (that copies it to local memory per thread)
      for (int e = 0; e < kEpPushMaxRanks; ++e)
        if (e == d) base = dst.region[e];
      xd = reinterpret_cast<uint4*>(base + rel * row_b);
      id = reinterpret_cast<int32_t*>(base + cnt * row_b + rel * pick_b);
      wd = reinterpret_cast<float*>(base + cnt * (row_b + pick_b) + rel * pick_b);
    }
    if (d == me || !rows_there)  // uniform over the block
      for (int64_t c = threadIdx.x; c < Hc; c += blockDim.x) xd[c] = src[c];
    if (!idx_send) continue;  // rows only (the backward's d(out))
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const int le = topk_idx[n * K + j] - d * El;
      const bool here = le >= 0 && le < El;
      id[j] = here ? le : -1;
      wd[j] = here ? topk_w[n * K + j] : 0.f;
    }
  }
}

}  // namespace

void ep_dispatch_push(const EpPushDst& dst, bf16* x_send, int32_t* idx_send, float* w_send,
                      const bf16* x, const int32_t* topk_idx, const float* topk_w,
                      const int32_t* send_pos, const int32_t* send_cnt, int64_t N, int64_t H,
                      int64_t K, int64_t El, int P, int me, const Ctx& ctx, bool rows_there) {
  if (N == 0) return;
  AM_CHECK(!rows_there || idx_send,
           "internal: [ep_dispatch_push] rows already in the peers leaves only the picks to "
           "send; pass idx_send");
  AM_CHECK((idx_send == nullptr) == (w_send == nullptr) && (idx_send == nullptr) == (topk_idx == nullptr),
           "[ep_dispatch_push] idx_send, w_send and topk_idx go together (all or none)");
  AM_CHECK(P >= 1 && P <= kEpPushMaxRanks && me >= 0 && me < P,
           "[ep_dispatch_push] rank {} of {}: at most {} ranks", me, P, kEpPushMaxRanks);
  // 16-byte rows everywhere: the regions are 256-byte aligned and a row is H * 2 bytes
  AM_CHECK(rows_16b(H, x_send, x),
           "[ep_dispatch_push] hidden size {} (or a buffer) is not 16-byte aligned; use the "
           "packed dispatch (AUTOMOE_EP_PUSH=0)",
           H);
  for (int d = 0; d < P; ++d)
    AM_CHECK(d == me || (dst.region[d] && reinterpret_cast<uintptr_t>(dst.region[d]) % 16 == 0),
             "internal: [ep_dispatch_push] rank {}'s region on rank {} is null or unaligned", me, d);
  ep_dispatch_push_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
      dst, reinterpret_cast<uint4*>(x_send), idx_send, w_send, reinterpret_cast<const uint4*>(x),
      topk_idx, topk_w, send_pos, send_cnt, H / 8, int(K), int(El), P, me, rows_there);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
