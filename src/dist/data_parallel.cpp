// dist/data_parallel.cpp: global aux loss, gradient all-reduce and global norm on MPI.
#include "dist/data_parallel.h"

#include <cmath>
#include <cstring>

#include "core/check.h"

#include "ops/ops.h"

namespace automoe::dist {

float aux_loss_global_fwd(double* fsum, double* n_global, const float* probs,
                          const int32_t* topk_idx, int64_t N, int64_t E, int64_t K,
                          const Comm& world) {
  // buf: counts[K,E] | prob sums[E] | rows
  std::vector<double> buf(size_t(K * E + E + 1), 0.0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < K; ++j) buf[j * E + topk_idx[n * K + j]] += 1.0;
    for (int64_t e = 0; e < E; ++e) buf[K * E + e] += probs[n * E + e];
  }
  buf[K * E + E] = double(N);
  world.allreduce_sum(buf.data(), int64_t(buf.size()));
  const double Ng = buf[K * E + E];
  *n_global = Ng;
  for (int64_t e = 0; e < E; ++e) fsum[e] = 0.0;
  if (Ng == 0) return 0.f;
  double s = 0.0;
  for (int64_t j = 0; j < K; ++j)
    for (int64_t e = 0; e < E; ++e) {
      s += (buf[j * E + e] / Ng) * (buf[K * E + e] / Ng);
      fsum[e] += buf[j * E + e] / Ng;
    }
  return float(s * E);
}

void aux_loss_global_bwd(float* dprobs, float daux, const double* fsum, double n_global, int64_t N,
                         int64_t E) {
  if (n_global == 0) return;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) dprobs[n * E + e] = float(daux * E * fsum[e] / n_global);
}

void allreduce_grads(std::vector<float>& grads, const ParamLayout& layout, const Groups& g) {
  for (bool expert : {false, true}) {
    const Comm& c = expert ? g.dp : g.world;
    if (c.size() == 1) continue;
    std::vector<float> buf;  // the group's parameters packed: one all-reduce
    for (auto& p : layout.params)
      if (p.expert == expert) buf.insert(buf.end(), grads.begin() + p.offset, grads.begin() + p.offset + p.numel);
    c.allreduce_sum(buf.data(), int64_t(buf.size()));
    int64_t at = 0;
    for (auto& p : layout.params)
      if (p.expert == expert) {
        std::copy(buf.begin() + at, buf.begin() + at + p.numel, grads.begin() + p.offset);
        at += p.numel;
      }
  }
}

float clip_grad_norm_global(std::vector<float>& grads, const ParamLayout& layout, const Groups& g,
                            float max_norm) {
  double dense = 0.0, experts = 0.0;  // dense: the same on every rank; experts: this shard
  for (auto& p : layout.params)
    (p.expert ? experts : dense) += cpu::sum_squares(grads.data() + p.offset, p.numel);
  g.ep.allreduce_sum(&experts, 1);
  float norm = float(std::sqrt(dense + experts));
  if (max_norm > 0 && norm > max_norm)  // as clip_grad_norm (train/adamw.cpp) and torch
    cpu::scale_inplace(grads.data(), max_norm / (norm + 1e-6f), int64_t(grads.size()));
  return norm;
}

uint64_t check_replicas(const std::vector<float>& params, const ParamLayout& layout,
                        const Groups& g) {
  uint64_t h[2] = {1469598103934665603ull, 1469598103934665603ull};  // replicated, experts
  for (const ParamSpec& p : layout.params) {
    uint64_t& x = h[p.expert ? 1 : 0];
    for (int64_t i = 0; i < p.numel; ++i) {
      uint32_t u;
      std::memcpy(&u, &params[size_t(p.offset + i)], 4);
      x = (x ^ u) * 1099511628211ull;
    }
  }
  // per group: the first rank whose hash differs from the group's rank 0 (world ranks, 1-based
  // in `bad`: 0 = all equal); then every rank learns of any group's mismatch, so all throw
  int64_t bad[4] = {0, 0, 0, 0};  // replicated: rank a, rank b; experts: rank a, rank b
  auto compare = [&](uint64_t mine, const Comm& c, int64_t* out) {
    const uint64_t me[2] = {mine, uint64_t(g.world.rank())};
    std::vector<uint64_t> all(2 * size_t(c.size()));
    c.allgather(all.data(), me, sizeof(me));
    for (int r = 1; r < c.size(); ++r)
      if (all[2 * size_t(r)] != all[0]) {
        out[0] = int64_t(all[1]) + 1;
        out[1] = int64_t(all[2 * size_t(r) + 1]) + 1;
        return;
      }
  };
  compare(h[0], g.world, bad);
  compare(h[1], g.dp, bad + 2);
  g.world.allreduce_max(bad, 4);
  AM_CHECK(bad[0] == 0,
           "the replicated parameters (everything but the experts) differ between world ranks {} "
           "and {} after training: a gradient was not summed over the ranks, or the ranks applied "
           "different updates; this is a bug in automoe's distributed step",
           bad[0] - 1, bad[1] - 1);
  AM_CHECK(bad[2] == 0,
           "the expert shards differ between world ranks {} and {} (data-parallel replicas of the "
           "same experts) after training: an expert gradient was not summed over the replicas; "
           "this is a bug in automoe's distributed step",
           bad[2] - 1, bad[3] - 1);
  return h[0];
}

}  // namespace automoe::dist
