// backend/cpu/adamw.cpp: torch.optim.AdamW's update (decoupled weight decay, bias correction),
// and the helpers for the global gradient norm.
#include <cmath>

#include "ops/ops.h"

namespace automoe::cpu {

void adamw_step(float* p, const float* g, float* m, float* v, int64_t n, float lr, float b1,
                float b2, float eps, float wd, int64_t t) {
  const float bc1 = 1.0f - std::pow(b1, float(t));
  const float bc2_sqrt = std::sqrt(1.0f - std::pow(b2, float(t)));
  const float step = lr / bc1;
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    p[i] *= 1.0f - lr * wd;
    m[i] += (g[i] - m[i]) * (1.0f - b1);  // torch: exp_avg.lerp_(grad, 1 - beta1)
    v[i] = v[i] * b2 + (1.0f - b2) * g[i] * g[i];
    float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
    p[i] -= step * (m[i] / denom);
  }
}

double sum_squares(const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
  return s;
}

void scale_inplace(float* x, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

}  // namespace automoe::cpu
