// dist/expert_parallel.h: expert parallelism on the CPU backend, DeepEP's normal mode as the
// reference design (shared/design/GPU.md, "Expert-parallel dispatch and combine").
//
// The E experts of a MoE layer are split contiguously over the EP group: rank r holds experts
// [r*E/ep, (r+1)*E/ep). Each rank routes its own tokens (router weights are replicated), then
//   layout    which ranks each token goes to (a token goes ONCE per destination rank, however
//             many of its top-k experts live there); rows per rank exchanged (MPI_Alltoall)
//   dispatch  each sent row carries the token's hidden state, its top-k indices remapped to the
//             destination's local experts (-1 = not here) and the routing weights (MPI_Alltoallv)
//   experts   grouped linear -> SwiGLU -> grouped linear over the received rows, per local expert
//   combine   the RECEIVER weights each expert output and sums over its local picks, so one row
//             per (token, rank) travels back; the sender sums the rows of its token in rank order
// Backward is the mirror image reusing the layout: combine's gradient is a dispatch of d(out),
// dispatch's gradient is a combine of d(x) and d(weights).
//
// Gradient rule as in ops.h: activation gradients assign (=), parameter gradients accumulate (+=).
// Legend: N local tokens, K top-k, H hidden, I expert width, El local experts, R rows received,
// M received (row, pick) slots on local experts, P EP ranks.
#pragma once
#include <cstdint>
#include <vector>

#include "dist/ep_balance.h"
#include "dist/process_group.h"

namespace automoe::dist {

// The experts one rank holds: [first, first + count) of E.
struct ExpertShard {
  int64_t E = 0, first = 0, count = 0;
};
// Rank `ep_rank` of `ep_size`; throws when E is not a multiple of ep_size.
ExpertShard expert_shard(int64_t E, int ep_rank, int ep_size);

// The routing of one MoE layer across the EP group, built from the top-k indices once per
// forward and reused by the four passes.
struct EpLayout {
  int64_t N = 0, K = 0;   // local tokens, picks per token
  int64_t S = 0, R = 0;   // rows sent ((token, destination) pairs), rows received
  std::vector<int64_t> send_counts, recv_counts;  // [P] rows to / from each rank
  std::vector<int32_t> send_token;                // [S] token of each sent row, grouped by
                                                  //     destination rank, tokens ascending
  std::vector<int32_t> send_rank;                 // [S] destination of each sent row
};

// Layout step: token-in-rank mask, rows per destination rank, and the counts exchange. `bal`
// (nullable: every pick to its expert's owner) sends this rank's picks of expert e to
// bal->host[e*P + rank] instead (ep_balance.h).
void ep_layout(EpLayout& lay, const int32_t* topk_idx /*[N,K] global experts*/, int64_t N,
               int64_t K, const ExpertShard& shard, const Comm& ep,
               const EpBalance* bal = nullptr);

// dispatch: x_recv[R,H] = x[token], idx_recv[R,K] local expert or -1, w_recv[R,K] (0 where -1).
// With `bal`, the destination's local index of each pick it runs (its own experts, then the
// ones it borrows: EpBalance::local_index).
void ep_dispatch_fwd(float* x_recv, int32_t* idx_recv, float* w_recv, const float* x /*[N,H]*/,
                     const int32_t* topk_idx /*[N,K]*/, const float* topk_w /*[N,K]*/,
                     const EpLayout& lay, int64_t H, const ExpertShard& shard, const Comm& ep,
                     const EpBalance* bal = nullptr);
// dispatch backward (a combine): dx[N,H] (=) sums the rows of each token over ranks;
// dw[N,K] (=) the weight gradients (each pick's from the rank holding its expert).
void ep_dispatch_bwd(float* dx, float* dw, const float* dx_recv /*[R,H]*/,
                     const float* dw_recv /*[R,K]*/, const EpLayout& lay, int64_t H,
                     const Comm& ep);
// combine: out[N,H] (=) = sum over the token's destination ranks of y_recv (rows already
// weighted and summed over the receiver's local picks), in rank order.
void ep_combine_fwd(float* out, const float* y_recv /*[R,H]*/, const EpLayout& lay, int64_t H,
                    const Comm& ep);
// combine backward (a dispatch): dy_recv[R,H] (=) = dout of the row's token.
void ep_combine_bwd(float* dy_recv, const float* dout /*[N,H]*/, const EpLayout& lay, int64_t H,
                    const Comm& ep);

// ---- receiver side: moe_layout / permute / unpermute over received rows, picks of -1 skipped --
// offsets[El+1] rows of each local expert; slot_row[R*K] row in expert order, -1 when not here.
void ep_local_layout(int32_t* offsets, int32_t* slot_row, const int32_t* idx_recv, int64_t R,
                     int64_t El, int64_t K);
// xs[M,H]: the received rows in local-expert order.
void ep_permute_fwd(float* xs, const float* x_recv, const int32_t* slot_row, int64_t R, int64_t K,
                    int64_t H);
void ep_permute_bwd(float* dx_recv /*[R,H] =*/, const float* dxs, const int32_t* slot_row,
                    int64_t R, int64_t K, int64_t H);
// y_recv[R,H] = sum over local picks j of w_recv[r,j] * ys[slot_row[r,j]] (pre-weighted).
void ep_unpermute_fwd(float* y_recv, const float* ys, const float* w_recv, const int32_t* slot_row,
                      int64_t R, int64_t K, int64_t H);
void ep_unpermute_bwd(float* dys /*[M,H] =*/, float* dw_recv /*[R,K] =, 0 where not here*/,
                      const float* dy_recv, const float* ys, const float* w_recv,
                      const int32_t* slot_row, int64_t R, int64_t K, int64_t H);

// ---- the whole expert block of one MoE layer, what the model calls -----------------------------
// Moving expert work to the less loaded ranks within the step (ep_balance.h): off by default.
struct EpBalanceOptions {
  bool on = false;
  double tol = 0.05;      // stop once the busiest rank runs at most (1 + tol) x the mean
  int max_borrowed = 8;   // experts one rank may borrow per layer (their weights travel)
};

// What the backward needs, sized per forward (R and M depend on the routing). Er: the experts
// this rank ran, its El own then the B it borrowed (bal.borrowed[rank], whose weights came in
// wb_gu [B,2I,H] and wb_down [B,H,I]).
struct EpMoeActs {
  EpLayout lay;
  EpBalance bal;                                     // the plan (balance off: nothing moved)
  int64_t Er = 0;
  std::vector<float> wb_gu, wb_down;                 // the borrowed experts' weights
  std::vector<int32_t> idx_recv, offsets, slot_row;  // [R,K], [Er+1], [R*K]
  std::vector<float> w_recv;                         // [R,K]
  std::vector<float> xs, gu, act, ys;                // [M,H], [M,2I], [M,I], [M,H]
};
// out[N,H] (=) = sum_j topk_w[n,j] * expert_{topk_idx[n,j]}(x[n]) with the experts spread over
// the EP group. w_gu[El,2I,H] and w_down[El,H,I] are this rank's experts. With balance.on,
// every rank's per-expert counts are exchanged, the plan moves units of work off the busiest
// ranks, and each helper fetches the weights of the experts it borrows.
void ep_moe_fwd(float* out, EpMoeActs& a, const float* x, const int32_t* topk_idx,
                const float* topk_w, const float* w_gu, const float* w_down, int64_t N,
                int64_t H, int64_t I, int64_t K, const ExpertShard& shard, const Comm& ep,
                const EpBalanceOptions& balance = {});
// dx[N,H] (=), dtopk_w[N,K] (=), g_gu/g_down (+=) from dout[N,H]. A helper's share of a
// borrowed expert's weight gradient goes back to the owner, who adds the shares after its own
// in rank order (two sums where the unbalanced block has one: equal within fp32 rounding).
void ep_moe_bwd(float* dx, float* dtopk_w, float* g_gu, float* g_down, const float* dout,
                const EpMoeActs& a, const float* w_gu, const float* w_down, int64_t H, int64_t I,
                const ExpertShard& shard, const Comm& ep);

}  // namespace automoe::dist
