// backend/cpu/embedding.cpp: token embedding lookup (fwd) and scatter-add of row gradients (bwd).
#include <cstring>

#include "ops/ops.h"

namespace automoe::cpu {

void embedding_fwd(float* out, const int64_t* ids, const float* wte, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) std::memcpy(out + n * C, wte + ids[n] * C, C * sizeof(float));
}

void embedding_bwd(float* dwte, const float* dout, const int64_t* ids, int64_t N, int64_t C) {
  for (int64_t n = 0; n < N; ++n) {  // serial: rows may repeat
    float* d = dwte + ids[n] * C;
    const float* g = dout + n * C;
    for (int64_t c = 0; c < C; ++c) d[c] += g[c];
  }
}

}  // namespace automoe::cpu
