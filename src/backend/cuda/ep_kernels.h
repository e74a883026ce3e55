// backend/cuda/ep_kernels.h: the device side of expert-parallel dispatch and combine (DeepEP's
// normal mode as the design; dist/expert_parallel_cuda.h drives them). The layout is computed on
// the device from the top-k indices, so nothing here waits for the host.
//
// Send buffer layout (one per rank; S rows): rows for destination rank d are contiguous and in
// token order, destination after destination. Two placements:
//   packed  (region = 0)  destination d starts at sum_{d' < d} send_cnt[d'] (counts mode)
//   regions (region = R)  destination d starts at d * R, R >= N rows each (padded mode)
// send_pos[n*P + d] is the row of token n's copy for rank d, -1 when n has no pick on d.
// A token goes ONCE per destination rank, however many of its top-k experts live there.
//
// Legend: N local tokens, K top-k, H hidden, P EP ranks, El experts per rank (expert e lives on
// rank e / El, local index e % El), S send rows, Rr received rows. Outputs first; `=` assigns.
#pragma once
#include <cstdint>

#include "backend/cuda/common.cuh"

namespace automoe::cuda {

// send_pos[N,P] (=), send_cnt[P] (=, tokens per destination) and send_picks[P] (=, nullable:
// their picks on each destination, i.e. the expert rows it will run) from topk_idx[N,K] (global
// experts in [0, P*El)).
void ep_layout(int32_t* send_pos /*[N,P] i32 =*/, int32_t* send_cnt /*[P] i32 =*/,
               int32_t* send_picks /*[P] i32 =, nullable*/, const int32_t* topk_idx /*[N,K] i32*/,
               int64_t N, int64_t K, int64_t El, int P,
               int64_t region /*0: packed, else rows per destination*/, const Ctx& ctx);

// The broadcast layout: every token to every destination (send_pos[n,d] = d*N + n, packed;
// send_cnt[d] = N), whatever its picks; send_picks[d] (nullable) as ep_layout's. A row with no
// pick on d carries idx -1 only: d's experts skip it and d returns a zero row, so the combine's
// sums are ep_layout's bit for bit. Its rows' places do not depend on the routing, so they can
// move before it is known (dist::EpMoeCuda's rows ahead, opt-in). Few extra rows where a token
// has a pick on nearly every rank anyway (P = 2 at K = 8: 99.6% of tokens).
void ep_layout_all(int32_t* send_pos /*[N,P] i32 =*/, int32_t* send_cnt /*[P] i32 =*/,
                   int32_t* send_picks /*[P] i32 =, nullable*/, const int32_t* topk_idx /*[N,K] i32*/,
                   int64_t N, int64_t K, int64_t El, int P, const Ctx& ctx);

// Dispatch: x_send[send_pos[n,d]] = x[n]; idx_send row = the token's picks remapped to rank d's
// local experts (-1 = not on d); w_send row = their weights (0 where -1). idx_send and w_send
// may be null (the backward of combine dispatches d(out) rows only).
void ep_dispatch_pack(bf16* x_send /*[S,H] bf16 =*/, int32_t* idx_send /*[S,K] i32 =, nullable*/,
                      float* w_send /*[S,K] f32 =, nullable*/, const bf16* x /*[N,H] bf16*/,
                      const int32_t* topk_idx /*[N,K] i32*/, const float* topk_w /*[N,K] f32*/,
                      const int32_t* send_pos /*[N,P] i32*/, int64_t N, int64_t H, int64_t K,
                      int64_t El, int P, const Ctx& ctx);

// Combine: out[n] = sum over d in rank order of y_back[send_pos[n,d]] (fp32 sum, one rounding);
// dw_out[n,j] (nullable) = sum over d of dw_back[send_pos[n,d], j] (exact: only the rank holding
// pick j sends a non-zero). Also the backward of dispatch (dx, dtopk_w).
void ep_combine_unpack(bf16* out /*[N,H] bf16 =*/, float* dw_out /*[N,K] f32 =, nullable*/,
                       const bf16* y_back /*[S,H] bf16*/, const float* dw_back /*[S,K], nullable*/,
                       const int32_t* send_pos /*[N,P] i32*/, int64_t N, int64_t H, int64_t K,
                       int P, const Ctx& ctx);

// Dispatch straight into the peers (ep_push.cu): the pack above, except that the rows for a
// peer d != me are stored by this kernel into d's receive region for this rank (a CUDA IPC
// mapping: NVLink stores from the SMs), laid out as dist::IpcTransport's regions are: the
// send_cnt[d] x rows first, then their idx rows, then their w rows, each in token order. The
// rows for `me` go to x_send/idx_send/w_send at send_pos, as the pack puts them. send_pos is the
// packed layout (ep_layout, region 0) and send_cnt the counts it wrote: the relative row on d is
// send_pos - sum_{d' < d} send_cnt[d'], all on the device, so nothing waits for the host. A
// destination whose rows would not fit `cap` bytes gets none (the transport's host check of the
// counts throws before anyone reads them). idx_send, w_send, topk_idx and topk_w may all be null:
// rows only (the backward's d(out) rows; a region then holds the x rows alone). rows_there: the
// peers' x rows are in their regions already (the broadcast layout's rows ahead), so only the
// picks go to the peers (and every row to x_send for `me`).
constexpr int kEpPushMaxRanks = 8;
struct EpPushDst {
  unsigned char* region[kEpPushMaxRanks] = {};  // [P] peer d's region for this rank ([me]: unused)
  int64_t cap = 0;                              // bytes of one region
};
void ep_dispatch_push(const EpPushDst& dst, bf16* x_send /*[S,H] bf16 =, own rows*/,
                      int32_t* idx_send /*[S,K] i32 =, own rows, nullable*/,
                      float* w_send /*[S,K] f32 =, nullable*/, const bf16* x /*[N,H] bf16*/,
                      const int32_t* topk_idx /*[N,K] i32, nullable*/,
                      const float* topk_w /*[N,K] f32, nullable*/, const int32_t* send_pos /*[N,P] i32*/,
                      const int32_t* send_cnt /*[P] i32*/, int64_t N, int64_t H, int64_t K,
                      int64_t El, int P, int me, const Ctx& ctx, bool rows_there = false);

// The combine without its gather (dist::EpTransport::alltoallv_inplace): rank d's returned rows
// lie at rows[d] (row 0 there = row first[d] of the packed layout) instead of in one buffer,
// so the row of send_pos r on rank d is rows[d] + (r - first[d]) rows; otherwise
// ep_combine_unpack, the same sums in the same order (the same bits). P <= kEpPushMaxRanks, H a
// multiple of 8 and every y source 16-byte aligned.
struct EpRowSources {
  const void* rows[kEpPushMaxRanks] = {};
  int64_t first[kEpPushMaxRanks] = {};
};
void ep_combine_unpack_sources(bf16* out /*[N,H] bf16 =*/, float* dw_out /*[N,K] f32 =, nullable*/,
                               const EpRowSources& y /*bf16 rows of H*/,
                               const EpRowSources* dw /*f32 rows of K, nullable*/,
                               const int32_t* send_pos /*[N,P] i32*/, int64_t N, int64_t H,
                               int64_t K, int P, const Ctx& ctx);

}  // namespace automoe::cuda
