// backend/cpu/grouped_linear.cpp: one linear per expert over its contiguous block of rows.
#include "ops/ops.h"

namespace automoe::cpu {

void grouped_linear_fwd(float* out, const float* x, const float* w, const int32_t* offsets,
                        int64_t E, int64_t I, int64_t O) {
  for (int64_t e = 0; e < E; ++e) {
    int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    linear_fwd(out + r0 * O, x + r0 * I, w + e * O * I, nullptr, rows, I, O);
  }
}

void grouped_linear_bwd(float* dx, float* dw, const float* dout, const float* x, const float* w,
                        const int32_t* offsets, int64_t E, int64_t I, int64_t O) {
  for (int64_t e = 0; e < E; ++e) {
    int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    linear_bwd(dx ? dx + r0 * I : nullptr, 0.0f, dw + e * O * I, nullptr, dout + r0 * O,
               x + r0 * I, w + e * O * I, rows, I, O);
  }
}

}  // namespace automoe::cpu
