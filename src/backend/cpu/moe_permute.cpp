// backend/cpu/moe_permute.cpp: routing layout (slots sorted by expert), permute of token rows
// into expert order and the weighted unpermute (combine) back to tokens.
#include <cstring>
#include <vector>

#include "ops/ops.h"

namespace automoe::cpu {

void moe_layout(int32_t* offsets, int32_t* slot_row, const int32_t* topk_idx, int64_t N,
                int64_t E, int64_t K) {
  std::vector<int32_t> count(E + 1, 0);
  for (int64_t i = 0; i < N * K; ++i) count[topk_idx[i] + 1]++;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + count[e + 1];
  std::vector<int32_t> next(offsets, offsets + E);
  for (int64_t i = 0; i < N * K; ++i) slot_row[i] = next[topk_idx[i]]++;  // stable in slot order
}

void permute_fwd(float* xs, const float* x, const int32_t* slot_row, int64_t N, int64_t K,
                 int64_t C) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K; ++j)
      std::memcpy(xs + int64_t(slot_row[n * K + j]) * C, x + n * C, C * sizeof(float));
}

void permute_bwd(float* dx, const float* dxs, const int32_t* slot_row, int64_t N, int64_t K,
                 int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    float* d = dx + n * C;
    for (int64_t c = 0; c < C; ++c) d[c] = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      const float* g = dxs + int64_t(slot_row[n * K + j]) * C;
      for (int64_t c = 0; c < C; ++c) d[c] += g[c];
    }
  }
}

void unpermute_fwd(float* out, const float* ys, const float* w, const int32_t* slot_row,
                   int64_t N, int64_t K, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    float* o = out + n * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      const float* y = ys + int64_t(slot_row[n * K + j]) * C;
      float wj = w[n * K + j];
      for (int64_t c = 0; c < C; ++c) o[c] += wj * y[c];
    }
  }
}

void unpermute_bwd(float* dys, float* dw, const float* dout, const float* ys, const float* w,
                   const int32_t* slot_row, int64_t N, int64_t K, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const float* g = dout + n * C;
    for (int64_t j = 0; j < K; ++j) {
      int64_t r = slot_row[n * K + j];
      const float* y = ys + r * C;
      float* dy = dys + r * C;
      float wj = w[n * K + j], dot = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        dy[c] = wj * g[c];
        dot += g[c] * y[c];
      }
      dw[n * K + j] = dot;
    }
  }
}

}  // namespace automoe::cpu
