// backend/cpu/aux_loss.cpp: the Switch-style load-balancing loss as HF's load_balancing_loss_func
// computes it over the router outputs of every MoE layer concatenated along tokens.
#include <vector>

#include "ops/ops.h"

namespace automoe::cpu {

float aux_loss_fwd(const float* probs, const int32_t* topk_idx, int64_t N, int64_t E, int64_t K) {
  if (N == 0) return 0.f;
  std::vector<double> f(K * E, 0.0), P(E, 0.0);  // f[k,e] token fractions, P[e] mean prob
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < K; ++j) f[j * E + topk_idx[n * K + j]] += 1.0;
    for (int64_t e = 0; e < E; ++e) P[e] += probs[n * E + e];
  }
  double s = 0.0;
  for (int64_t j = 0; j < K; ++j)
    for (int64_t e = 0; e < E; ++e) s += (f[j * E + e] / N) * (P[e] / N);
  return float(s * E);
}

void aux_loss_bwd(float* dprobs, float daux, const int32_t* topk_idx, int64_t N, int64_t E,
                  int64_t K) {
  if (N == 0) return;
  std::vector<double> fsum(E, 0.0);  // sum_k f[k,e]
  for (int64_t i = 0; i < N * K; ++i) fsum[topk_idx[i]] += 1.0 / N;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) dprobs[n * E + e] = float(daux * E * fsum[e] / N);
}

}  // namespace automoe::cpu
