// dist/expert_parallel.cpp: layout, dispatch and combine over the EP group (MPI all-to-all-v on
// the CPU backend) and the receiver-side expert block. Plain loops: this is the reference.
#include "dist/expert_parallel.h"

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

void ep_layout(EpLayout& lay, const int32_t* topk_idx, int64_t N, int64_t K,
               const ExpertShard& shard, const Comm& ep) {
  const int P = ep.size();
  lay.N = N;
  lay.K = K;
  // token-in-rank mask [N,P]
  std::vector<uint8_t> in_rank(size_t(N * P), 0);
  for (int64_t i = 0; i < N * K; ++i) {
    int64_t d = topk_idx[i] / shard.count;
    AM_CHECK(topk_idx[i] >= 0 && d < P, "internal: expert index {} outside [0, {})", topk_idx[i], shard.E);
    in_rank[(i / K) * P + d] = 1;
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
                     const ExpertShard& shard, const Comm& ep) {
  const int64_t K = lay.K, row = H + 2 * K;  // in 4-byte words
  std::vector<float> send(size_t(lay.S * row)), recv(size_t(lay.R * row));
  for (int64_t s = 0; s < lay.S; ++s) {
    const int64_t n = lay.send_token[s], first = lay.send_rank[s] * shard.count;
    float* r = send.data() + s * row;
    std::memcpy(r, x + n * H, H * sizeof(float));
    for (int64_t j = 0; j < K; ++j) {
      int64_t e = topk_idx[n * K + j] - first;
      bool here = e >= 0 && e < shard.count;
      int32_t li = here ? int32_t(e) : -1;
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

void ep_moe_fwd(float* out, EpMoeActs& a, const float* x, const int32_t* topk_idx,
                const float* topk_w, const float* w_gu, const float* w_down, int64_t N, int64_t H,
                int64_t I, int64_t K, const ExpertShard& shard, const Comm& ep) {
  using namespace automoe::cpu;
  const int64_t El = shard.count;
  ep_layout(a.lay, topk_idx, N, K, shard, ep);
  const int64_t R = a.lay.R;
  std::vector<float> x_recv(size_t(R * H)), y_recv;  // [R,H]
  a.idx_recv.resize(R * K);
  a.w_recv.resize(R * K);
  ep_dispatch_fwd(x_recv.data(), a.idx_recv.data(), a.w_recv.data(), x, topk_idx, topk_w, a.lay, H,
                  shard, ep);
  a.offsets.resize(El + 1);
  a.slot_row.resize(R * K);
  ep_local_layout(a.offsets.data(), a.slot_row.data(), a.idx_recv.data(), R, El, K);
  const int64_t M = a.offsets[El];
  a.xs.resize(M * H);
  a.gu.resize(M * 2 * I);
  a.act.resize(M * I);
  a.ys.resize(M * H);
  ep_permute_fwd(a.xs.data(), x_recv.data(), a.slot_row.data(), R, K, H);
  grouped_linear_fwd(a.gu.data(), a.xs.data(), w_gu, a.offsets.data(), El, H, 2 * I);
  swiglu_fwd(a.act.data(), a.gu.data(), M, I);
  grouped_linear_fwd(a.ys.data(), a.act.data(), w_down, a.offsets.data(), El, I, H);
  y_recv = std::move(x_recv);  // [R,H], reused
  ep_unpermute_fwd(y_recv.data(), a.ys.data(), a.w_recv.data(), a.slot_row.data(), R, K, H);
  ep_combine_fwd(out, y_recv.data(), a.lay, H, ep);
}

void ep_moe_bwd(float* dx, float* dtopk_w, float* g_gu, float* g_down, const float* dout,
                const EpMoeActs& a, const float* w_gu, const float* w_down, int64_t H, int64_t I,
                const ExpertShard& shard, const Comm& ep) {
  using namespace automoe::cpu;
  const int64_t El = shard.count, R = a.lay.R, K = a.lay.K, M = a.offsets[El];
  std::vector<float> dy_recv(size_t(R * H)), dw_recv(size_t(R * K));
  ep_combine_bwd(dy_recv.data(), dout, a.lay, H, ep);
  std::vector<float> dys(size_t(M * H)), dact(size_t(M * I)), dgu(size_t(M * 2 * I));
  ep_unpermute_bwd(dys.data(), dw_recv.data(), dy_recv.data(), a.ys.data(), a.w_recv.data(),
                   a.slot_row.data(), R, K, H);
  grouped_linear_bwd(dact.data(), g_down, dys.data(), a.act.data(), w_down, a.offsets.data(), El, I, H);
  swiglu_bwd(dgu.data(), dact.data(), a.gu.data(), M, I);
  std::vector<float>& dxs = dys;  // [M,H], reused
  grouped_linear_bwd(dxs.data(), g_gu, dgu.data(), a.xs.data(), w_gu, a.offsets.data(), El, H, 2 * I);
  std::vector<float>& dx_recv = dy_recv;  // [R,H], reused
  ep_permute_bwd(dx_recv.data(), dxs.data(), a.slot_row.data(), R, K, H);
  ep_dispatch_bwd(dx, dtopk_w, dx_recv.data(), dw_recv.data(), a.lay, H, ep);
}

}  // namespace automoe::dist
