// dist/expert_parallel.cpp: layout, dispatch and combine over the EP group (MPI all-to-all-v on
// the CPU backend) and the receiver-side expert block. Plain loops: this is the reference.
#include "dist/expert_parallel.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"
#include "ops/ops.h"

namespace automoe::dist {

ExpertShard expert_shard(int64_t E, int ep_rank, int ep_size) {
  AM_CHECK(ep_size >= 1 && E % ep_size == 0,
           "the model has {} experts per MoE layer, which cannot be split evenly over {} expert-parallel "
           "ranks; choose an expert-parallel size that divides {}",
           E, ep_size, E);
  int64_t count = E / ep_size;
  return {E, ep_rank * count, count};
}

namespace {

// The rank running this rank's picks of expert e: its owner, or the plan's host of (e, rank).
int64_t run_rank(int64_t e, const ExpertShard& shard, const Comm& ep, const EpBalance* bal) {
  return bal ? bal->host[size_t(e * ep.size() + ep.rank())] : e / shard.count;
}

}  // namespace

void ep_layout(EpLayout& lay, const int32_t* topk_idx, int64_t N, int64_t K,
               const ExpertShard& shard, const Comm& ep, const EpBalance* bal) {
  const int P = ep.size();
  lay.N = N;
  lay.K = K;
  AM_CHECK(!bal || (bal->P == P && bal->E == shard.E),
           "internal: [ep_layout] a plan for {} ranks and {} experts, here {} and {}",
           bal ? bal->P : 0, bal ? bal->E : 0, P, shard.E);
  // token-in-rank mask [N,P]
  std::vector<uint8_t> in_rank(size_t(N * P), 0);
  for (int64_t i = 0; i < N * K; ++i) {
    AM_CHECK(topk_idx[i] >= 0 && topk_idx[i] < shard.E, "internal: expert index {} outside [0, {})",
             topk_idx[i], shard.E);
    in_rank[(i / K) * P + run_rank(topk_idx[i], shard, ep, bal)] = 1;
  }
  lay.send_counts.assign(P, 0);
  lay.send_token.clear();
  lay.send_rank.clear();
  for (int d = 0; d < P; ++d)
    for (int64_t n = 0; n < N; ++n)
      if (in_rank[n * P + d]) {
        lay.send_token.push_back(int32_t(n));
        lay.send_rank.push_back(d);
        ++lay.send_counts[d];
      }
  lay.S = int64_t(lay.send_token.size());
  lay.recv_counts.assign(P, 0);
  ep.alltoall(lay.recv_counts.data(), lay.send_counts.data());
  lay.R = 0;
  for (int64_t c : lay.recv_counts) lay.R += c;
}

// Dispatch row on the wire: x[H] f32 | w[K] f32 | idx[K] i32.
void ep_dispatch_fwd(float* x_recv, int32_t* idx_recv, float* w_recv, const float* x,
                     const int32_t* topk_idx, const float* topk_w, const EpLayout& lay, int64_t H,
                     const ExpertShard& shard, const Comm& ep, const EpBalance* bal) {
  const int64_t K = lay.K, row = H + 2 * K;  // in 4-byte words
  std::vector<float> send(size_t(lay.S * row)), recv(size_t(lay.R * row));
  for (int64_t s = 0; s < lay.S; ++s) {
    const int64_t n = lay.send_token[s], d = lay.send_rank[s];
    float* r = send.data() + s * row;
    std::memcpy(r, x + n * H, H * sizeof(float));
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = topk_idx[n * K + j];
      const bool here = run_rank(e, shard, ep, bal) == d;
      const int32_t li = !here ? -1
                         : bal ? bal->local_index(int(d), e)
                               : int32_t(e - d * shard.count);
      r[H + j] = here ? topk_w[n * K + j] : 0.f;
      std::memcpy(r + H + K + j, &li, sizeof li);
    }
  }
  ep.alltoallv(recv.data(), lay.recv_counts.data(), send.data(), lay.send_counts.data(), row * 4);
  for (int64_t r = 0; r < lay.R; ++r) {
    const float* q = recv.data() + r * row;
    std::memcpy(x_recv + r * H, q, H * sizeof(float));
    std::memcpy(w_recv + r * K, q + H, K * sizeof(float));
    std::memcpy(idx_recv + r * K, q + H + K, K * sizeof(int32_t));
  }
}

// Dispatch-backward row on the wire: dx[H] | dw[K], sent back along the dispatch's path.
void ep_dispatch_bwd(float* dx, float* dw, const float* dx_recv, const float* dw_recv,
                     const EpLayout& lay, int64_t H, const Comm& ep) {
  const int64_t K = lay.K, row = H + K;
  std::vector<float> send(size_t(lay.R * row)), recv(size_t(lay.S * row));
  for (int64_t r = 0; r < lay.R; ++r) {
    std::memcpy(send.data() + r * row, dx_recv + r * H, H * sizeof(float));
    std::memcpy(send.data() + r * row + H, dw_recv + r * K, K * sizeof(float));
  }
  ep.alltoallv(recv.data(), lay.send_counts.data(), send.data(), lay.recv_counts.data(), row * 4);
  std::memset(dx, 0, size_t(lay.N * H) * sizeof(float));
  std::memset(dw, 0, size_t(lay.N * K) * sizeof(float));
  for (int64_t s = 0; s < lay.S; ++s) {  // rows grouped by rank: each token sums in rank order
    const float* q = recv.data() + s * row;
    float* d = dx + int64_t(lay.send_token[s]) * H;
    for (int64_t c = 0; c < H; ++c) d[c] += q[c];
    float* g = dw + int64_t(lay.send_token[s]) * K;
    for (int64_t j = 0; j < K; ++j) g[j] += q[H + j];  // 0 from ranks not holding pick j
  }
}

void ep_combine_fwd(float* out, const float* y_recv, const EpLayout& lay, int64_t H, const Comm& ep) {
  std::vector<float> recv(size_t(lay.S * H));
  ep.alltoallv(recv.data(), lay.send_counts.data(), y_recv, lay.recv_counts.data(), H * 4);
  std::memset(out, 0, size_t(lay.N * H) * sizeof(float));
  for (int64_t s = 0; s < lay.S; ++s) {
    const float* q = recv.data() + s * H;
    float* o = out + int64_t(lay.send_token[s]) * H;
    for (int64_t c = 0; c < H; ++c) o[c] += q[c];
  }
}

void ep_combine_bwd(float* dy_recv, const float* dout, const EpLayout& lay, int64_t H, const Comm& ep) {
  std::vector<float> send(size_t(lay.S * H));
  for (int64_t s = 0; s < lay.S; ++s)
    std::memcpy(send.data() + s * H, dout + int64_t(lay.send_token[s]) * H, H * sizeof(float));
  ep.alltoallv(dy_recv, lay.recv_counts.data(), send.data(), lay.send_counts.data(), H * 4);
}

// ---- receiver side ------------------------------------------------------------------------------

void ep_local_layout(int32_t* offsets, int32_t* slot_row, const int32_t* idx_recv, int64_t R,
                     int64_t El, int64_t K) {
  std::vector<int32_t> count(El + 1, 0);
  for (int64_t i = 0; i < R * K; ++i)
    if (idx_recv[i] >= 0) count[idx_recv[i] + 1]++;
  offsets[0] = 0;
  for (int64_t e = 0; e < El; ++e) offsets[e + 1] = offsets[e] + count[e + 1];
  std::vector<int32_t> next(offsets, offsets + El);
  for (int64_t i = 0; i < R * K; ++i)  // stable in (row, pick) order, as moe_layout
    slot_row[i] = idx_recv[i] >= 0 ? next[idx_recv[i]]++ : -1;
}

void ep_permute_fwd(float* xs, const float* x_recv, const int32_t* slot_row, int64_t R, int64_t K,
                    int64_t H) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < K; ++j)
      if (slot_row[r * K + j] >= 0)
        std::memcpy(xs + int64_t(slot_row[r * K + j]) * H, x_recv + r * H, H * sizeof(float));
}

void ep_permute_bwd(float* dx_recv, const float* dxs, const int32_t* slot_row, int64_t R,
                    int64_t K, int64_t H) {
  for (int64_t r = 0; r < R; ++r) {
    float* d = dx_recv + r * H;
    for (int64_t c = 0; c < H; ++c) d[c] = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      if (slot_row[r * K + j] < 0) continue;
      const float* g = dxs + int64_t(slot_row[r * K + j]) * H;
      for (int64_t c = 0; c < H; ++c) d[c] += g[c];
    }
  }
}

void ep_unpermute_fwd(float* y_recv, const float* ys, const float* w_recv, const int32_t* slot_row,
                      int64_t R, int64_t K, int64_t H) {
  for (int64_t r = 0; r < R; ++r) {
    float* o = y_recv + r * H;
    for (int64_t c = 0; c < H; ++c) o[c] = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      if (slot_row[r * K + j] < 0) continue;
      const float* y = ys + int64_t(slot_row[r * K + j]) * H;
      float wj = w_recv[r * K + j];
      for (int64_t c = 0; c < H; ++c) o[c] += wj * y[c];
    }
  }
}

void ep_unpermute_bwd(float* dys, float* dw_recv, const float* dy_recv, const float* ys,
                      const float* w_recv, const int32_t* slot_row, int64_t R, int64_t K, int64_t H) {
  for (int64_t r = 0; r < R; ++r) {
    const float* g = dy_recv + r * H;
    for (int64_t j = 0; j < K; ++j) {
      int64_t s = slot_row[r * K + j];
      if (s < 0) {
        dw_recv[r * K + j] = 0.f;
        continue;
      }
      const float* y = ys + s * H;
      float* dy = dys + s * H;
      float wj = w_recv[r * K + j], dot = 0.f;
      for (int64_t c = 0; c < H; ++c) {
        dy[c] = wj * g[c];
        dot += g[c] * y[c];
      }
      dw_recv[r * K + j] = dot;
    }
  }
}

// ---- the expert block ---------------------------------------------------------------------------

namespace {

// Every rank's picks per expert ([P,E], rank s's row at s*E), the same on every rank.
std::vector<int64_t> picks_per_expert(const int32_t* topk_idx, int64_t N, int64_t K, int64_t E,
                                      const Comm& ep) {
  std::vector<int64_t> mine(size_t(E), 0), all(size_t(ep.size() * E));
  for (int64_t i = 0; i < N * K; ++i) ++mine[size_t(topk_idx[i])];
  ep.allgather(all.data(), mine.data(), E * int64_t(sizeof(int64_t)));
  return all;
}

// The experts rank `helper` borrows from rank `owner`, ascending (a run of bal.borrowed[helper]).
std::vector<int32_t> lent(const EpBalance& bal, int owner, int helper) {
  std::vector<int32_t> out;
  for (int32_t e : bal.borrowed[size_t(helper)])
    if (bal.owner(e) == owner) out.push_back(e);
  return out;
}

// Weights of the experts this rank runs: its own El, then the borrowed ones, in one array each
// [Er, ...] (the own ones alone when nothing is borrowed: no copy).
struct RunWeights {
  std::vector<float> gu_cat, down_cat;
  const float* gu = nullptr;
  const float* down = nullptr;
};
RunWeights run_weights(const EpMoeActs& a, const float* w_gu, const float* w_down, int64_t El,
                       int64_t H, int64_t I) {
  RunWeights w;
  if (a.Er == El) {
    w.gu = w_gu;
    w.down = w_down;
    return w;
  }
  const size_t ngu = size_t(El * 2 * I * H), ndown = size_t(El * H * I);
  w.gu_cat.assign(w_gu, w_gu + ngu);
  w.gu_cat.insert(w.gu_cat.end(), a.wb_gu.begin(), a.wb_gu.end());
  w.down_cat.assign(w_down, w_down + ndown);
  w.down_cat.insert(w.down_cat.end(), a.wb_down.begin(), a.wb_down.end());
  w.gu = w.gu_cat.data();
  w.down = w.down_cat.data();
  return w;
}

}  // namespace

void ep_moe_fwd(float* out, EpMoeActs& a, const float* x, const int32_t* topk_idx,
                const float* topk_w, const float* w_gu, const float* w_down, int64_t N, int64_t H,
                int64_t I, int64_t K, const ExpertShard& shard, const Comm& ep,
                const EpBalanceOptions& balance) {
  using namespace automoe::cpu;
  const int64_t El = shard.count, E = shard.E;
  const int P = ep.size(), me = ep.rank();
  if (balance.on) {  // the plan: every rank's counts, the same verdict everywhere
    const std::vector<int64_t> counts = picks_per_expert(topk_idx, N, K, E, ep);
    a.bal = ep_balance_plan(counts.data(), P, E, balance.tol, balance.max_borrowed);
  } else {  // every unit at its owner (no counts exchanged: the plan's loads stay 0)
    const std::vector<int64_t> zero(size_t(P * E), 0);
    a.bal = ep_balance_none(zero.data(), P, E);
  }
  const EpBalance* bal = a.bal.moved() ? &a.bal : nullptr;
  const int64_t B = int64_t(a.bal.borrowed[size_t(me)].size());
  a.Er = El + B;
  // the borrowed experts' weights, from their owners (rows: one expert's w_gu then w_down)
  const int64_t wrow = 2 * I * H + H * I;
  a.wb_gu.resize(size_t(B * 2 * I * H));
  a.wb_down.resize(size_t(B * H * I));
  if (bal) {
    std::vector<int64_t> send_n(P, 0), recv_n(P, 0);
    std::vector<float> send, recv(size_t(B * wrow));
    for (int d = 0; d < P; ++d) {
      const std::vector<int32_t> es = lent(a.bal, me, d);
      send_n[size_t(d)] = int64_t(es.size());
      for (int32_t e : es) {
        const int64_t le = e - shard.first;
        send.insert(send.end(), w_gu + le * 2 * I * H, w_gu + (le + 1) * 2 * I * H);
        send.insert(send.end(), w_down + le * H * I, w_down + (le + 1) * H * I);
      }
      recv_n[size_t(d)] = int64_t(lent(a.bal, d, me).size());
    }
    ep.alltoallv(recv.data(), recv_n.data(), send.data(), send_n.data(), wrow * 4);
    for (int64_t b = 0; b < B; ++b) {  // sources in rank order = borrowed[me] ascending
      const float* q = recv.data() + b * wrow;
      std::memcpy(a.wb_gu.data() + b * 2 * I * H, q, size_t(2 * I * H) * sizeof(float));
      std::memcpy(a.wb_down.data() + b * H * I, q + 2 * I * H, size_t(H * I) * sizeof(float));
    }
  }
  const RunWeights w = run_weights(a, w_gu, w_down, El, H, I);
  const int64_t Er = a.Er;
  ep_layout(a.lay, topk_idx, N, K, shard, ep, bal);
  const int64_t R = a.lay.R;
  std::vector<float> x_recv(size_t(R * H)), y_recv;  // [R,H]
  a.idx_recv.resize(R * K);
  a.w_recv.resize(R * K);
  ep_dispatch_fwd(x_recv.data(), a.idx_recv.data(), a.w_recv.data(), x, topk_idx, topk_w, a.lay, H,
                  shard, ep, bal);
  a.offsets.resize(Er + 1);
  a.slot_row.resize(R * K);
  ep_local_layout(a.offsets.data(), a.slot_row.data(), a.idx_recv.data(), R, Er, K);
  const int64_t M = a.offsets[Er];
  a.xs.resize(M * H);
  a.gu.resize(M * 2 * I);
  a.act.resize(M * I);
  a.ys.resize(M * H);
  ep_permute_fwd(a.xs.data(), x_recv.data(), a.slot_row.data(), R, K, H);
  grouped_linear_fwd(a.gu.data(), a.xs.data(), w.gu, a.offsets.data(), Er, H, 2 * I);
  swiglu_fwd(a.act.data(), a.gu.data(), M, I);
  grouped_linear_fwd(a.ys.data(), a.act.data(), w.down, a.offsets.data(), Er, I, H);
  y_recv = std::move(x_recv);  // [R,H], reused
  ep_unpermute_fwd(y_recv.data(), a.ys.data(), a.w_recv.data(), a.slot_row.data(), R, K, H);
  ep_combine_fwd(out, y_recv.data(), a.lay, H, ep);
}

void ep_moe_bwd(float* dx, float* dtopk_w, float* g_gu, float* g_down, const float* dout,
                const EpMoeActs& a, const float* w_gu, const float* w_down, int64_t H, int64_t I,
                const ExpertShard& shard, const Comm& ep) {
  using namespace automoe::cpu;
  const int64_t El = shard.count, Er = a.Er, R = a.lay.R, K = a.lay.K, M = a.offsets[Er];
  const int P = ep.size(), me = ep.rank();
  const RunWeights w = run_weights(a, w_gu, w_down, El, H, I);
  // the weight gradients of every expert run here: this rank's own accumulate in place; the
  // borrowed ones' shares start at zero in [El, Er) of a copy
  const size_t ngu = size_t(El * 2 * I * H), ndown = size_t(El * H * I);
  std::vector<float> gcat_gu, gcat_down;
  float* gg = g_gu;
  float* gd = g_down;
  if (Er > El) {
    gcat_gu.assign(size_t(Er * 2 * I * H), 0.f);
    gcat_down.assign(size_t(Er * H * I), 0.f);
    std::memcpy(gcat_gu.data(), g_gu, ngu * sizeof(float));
    std::memcpy(gcat_down.data(), g_down, ndown * sizeof(float));
    gg = gcat_gu.data();
    gd = gcat_down.data();
  }
  std::vector<float> dy_recv(size_t(R * H)), dw_recv(size_t(R * K));
  ep_combine_bwd(dy_recv.data(), dout, a.lay, H, ep);
  std::vector<float> dys(size_t(M * H)), dact(size_t(M * I)), dgu(size_t(M * 2 * I));
  ep_unpermute_bwd(dys.data(), dw_recv.data(), dy_recv.data(), a.ys.data(), a.w_recv.data(),
                   a.slot_row.data(), R, K, H);
  grouped_linear_bwd(dact.data(), gd, dys.data(), a.act.data(), w.down, a.offsets.data(), Er, I, H);
  swiglu_bwd(dgu.data(), dact.data(), a.gu.data(), M, I);
  std::vector<float>& dxs = dys;  // [M,H], reused
  grouped_linear_bwd(dxs.data(), gg, dgu.data(), a.xs.data(), w.gu, a.offsets.data(), Er, H, 2 * I);
  std::vector<float>& dx_recv = dy_recv;  // [R,H], reused
  ep_permute_bwd(dx_recv.data(), dxs.data(), a.slot_row.data(), R, K, H);
  ep_dispatch_bwd(dx, dtopk_w, dx_recv.data(), dw_recv.data(), a.lay, H, ep);
  if (!a.bal.moved()) return;
  // the shares of borrowed experts' weight gradients back to their owners, who add them after
  // their own, helper by helper in rank order
  if (Er > El) {
    std::memcpy(g_gu, gcat_gu.data(), ngu * sizeof(float));
    std::memcpy(g_down, gcat_down.data(), ndown * sizeof(float));
  }
  const int64_t wrow = 2 * I * H + H * I;
  std::vector<int64_t> send_n(P, 0), recv_n(P, 0);
  std::vector<float> send;
  int64_t recv_rows = 0;
  for (int d = 0; d < P; ++d) {
    const std::vector<int32_t> mine = lent(a.bal, d, me);  // borrowed here from owner d
    send_n[size_t(d)] = int64_t(mine.size());
    for (int32_t e : mine) {
      const std::vector<int32_t>& b = a.bal.borrowed[size_t(me)];
      const int64_t slot = El + (std::lower_bound(b.begin(), b.end(), e) - b.begin());
      const auto gu0 = gcat_gu.begin() + slot * 2 * I * H;
      const auto down0 = gcat_down.begin() + slot * H * I;
      send.insert(send.end(), gu0, gu0 + 2 * I * H);
      send.insert(send.end(), down0, down0 + H * I);
    }
    recv_n[size_t(d)] = int64_t(lent(a.bal, me, d).size());  // lent by this rank to helper d
    recv_rows += recv_n[size_t(d)];
  }
  std::vector<float> recv(size_t(recv_rows * wrow));
  ep.alltoallv(recv.data(), recv_n.data(), send.data(), send_n.data(), wrow * 4);
  int64_t r = 0;
  for (int h = 0; h < P; ++h)
    for (int32_t e : lent(a.bal, me, h)) {
      const int64_t le = e - shard.first;
      const float* q = recv.data() + r++ * wrow;
      float* pg = g_gu + le * 2 * I * H;
      for (int64_t i = 0; i < 2 * I * H; ++i) pg[i] += q[i];
      float* pd = g_down + le * H * I;
      for (int64_t i = 0; i < H * I; ++i) pd[i] += q[2 * I * H + i];
    }
}

}  // namespace automoe::dist
