// backend/cpu/swiglu.cpp: out = silu(gate) * up on a fused [gate | up] row.
#include <cmath>

#include "ops/ops.h"

namespace automoe::cpu {

void swiglu_fwd(float* out, const float* gu, int64_t N, int64_t F) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      float g = gu[n * 2 * F + f], u = gu[n * 2 * F + F + f];
      out[n * F + f] = g / (1.0f + std::exp(-g)) * u;
    }
}

void swiglu_bwd(float* dgu, const float* dout, const float* gu, int64_t N, int64_t F) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t f = 0; f < F; ++f) {
      float g = gu[n * 2 * F + f], u = gu[n * 2 * F + F + f], d = dout[n * F + f];
      float s = 1.0f / (1.0f + std::exp(-g));
      dgu[n * 2 * F + f] = d * u * s * (1.0f + g * (1.0f - s));
      dgu[n * 2 * F + F + f] = d * g * s;
    }
}

}  // namespace automoe::cpu
