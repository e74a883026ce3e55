// backend/cpu/rope.cpp: rotary position embedding, HF half rotation:
// out = x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]); angles in fp32.
#include <cmath>

#include "ops/ops.h"

namespace automoe::cpu {

namespace {
// sign = +1 forward, -1 backward (the rotation's transpose is the rotation by -angle).
void rope_apply(float* out, const float* x, const int32_t* pos, int64_t N, int64_t H, int64_t D,
                float theta, float sign) {
  int64_t h2 = D / 2;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < h2; ++i) {
      // as HF: inv_freq = 1 / theta^(arange(0, D, 2)/D) in fp32, freqs = pos * inv_freq in fp32
      float inv_freq = 1.0f / std::pow(theta, float(2 * i) / float(D));
      float ang = float(pos[n]) * inv_freq;
      float c = std::cos(ang), s = sign * std::sin(ang);
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = x + (n * H + h) * D;
        float* o = out + (n * H + h) * D;
        float a = xr[i], b = xr[i + h2];
        o[i] = a * c - b * s;
        o[i + h2] = b * c + a * s;
      }
    }
  }
}
}  // namespace

void rope_fwd(float* out, const float* x, const int32_t* pos, int64_t N, int64_t H, int64_t D,
              float theta) {
  rope_apply(out, x, pos, N, H, D, theta, 1.0f);
}

void rope_bwd(float* dx, const float* dout, const int32_t* pos, int64_t N, int64_t H, int64_t D,
              float theta) {
  rope_apply(dx, dout, pos, N, H, D, theta, -1.0f);
}

}  // namespace automoe::cpu
