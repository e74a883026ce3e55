// backend/cpu/router.cpp: MoE router: softmax over experts (fp32), top-k, optional renorm.
#include <cmath>

#include "ops/ops.h"

namespace automoe::cpu {

void router_fwd(float* probs, int32_t* topk_idx, float* topk_w, const float* logits, int64_t N,
                int64_t E, int64_t K, bool norm_topk) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* l = logits + n * E;
    float* p = probs + n * E;
    float mx = l[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    // selection: k passes of argmax, ties to the lower index (as torch.topk in practice)
    int32_t* idx = topk_idx + n * K;
    float* w = topk_w + n * K;
    float wsum = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      int32_t best = -1;
      for (int64_t e = 0; e < E; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken |= idx[i] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = int32_t(e);
      }
      idx[j] = best;
      w[j] = p[best];
      wsum += w[j];
    }
    if (norm_topk)
      for (int64_t j = 0; j < K; ++j) w[j] /= wsum;
  }
}

void router_bwd(float* dlogits, const float* dtopk_w, const float* dprobs_extra, const float* probs,
                const int32_t* topk_idx, int64_t N, int64_t E, int64_t K, bool norm_topk) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* p = probs + n * E;
    const int32_t* idx = topk_idx + n * K;
    const float* gw = dtopk_w + n * K;
    float* dl = dlogits + n * E;
    // dprobs: first the extra term, then the top-k picks
    for (int64_t e = 0; e < E; ++e) dl[e] = dprobs_extra ? dprobs_extra[n * E + e] : 0.f;
    if (norm_topk) {
      // w_j = p_j / S, S = sum_i p_i: dp_j = (gw_j - sum_i gw_i w_i) / S
      float S = 0.f, gww = 0.f;
      for (int64_t j = 0; j < K; ++j) S += p[idx[j]];
      for (int64_t j = 0; j < K; ++j) gww += gw[j] * p[idx[j]] / S;
      for (int64_t j = 0; j < K; ++j) dl[idx[j]] += (gw[j] - gww) / S;
    } else {
      for (int64_t j = 0; j < K; ++j) dl[idx[j]] += gw[j];
    }
    // softmax backward in place: dlogit_e = p_e (dp_e - sum p dp)
    float dot = 0.f;
    for (int64_t e = 0; e < E; ++e) dot += p[e] * dl[e];
    for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dl[e] - dot);
  }
}

}  // namespace automoe::cpu
