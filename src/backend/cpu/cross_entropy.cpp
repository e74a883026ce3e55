// backend/cpu/cross_entropy.cpp: softmax cross-entropy over the vocabulary, -100 ignored.
#include <cmath>

#include "ops/ops.h"

namespace automoe::cpu {

void cross_entropy_fwd(float* losses, float* lse, const float* logits, const int64_t* targets,
                       int64_t N, int64_t V) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* l = logits + n * V;
    float mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(double(l[v] - mx));
    lse[n] = mx + float(std::log(s));
    losses[n] = targets[n] == -100 ? 0.f : lse[n] - l[targets[n]];
  }
}

void cross_entropy_bwd(float* dlogits, const float* logits, const float* lse,
                       const int64_t* targets, float scale, int64_t N, int64_t V) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    float* d = dlogits + n * V;
    if (targets[n] == -100) {
      for (int64_t v = 0; v < V; ++v) d[v] = 0.f;
      continue;
    }
    const float* l = logits + n * V;
    for (int64_t v = 0; v < V; ++v) d[v] = scale * std::exp(l[v] - lse[n]);
    d[targets[n]] -= scale;
  }
}

}  // namespace automoe::cpu
