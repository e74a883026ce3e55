// train/adamw.cpp: the optimizer step and global gradient clipping on the CPU backend.
#include "train/adamw.h"

#include <cmath>

#include "core/check.h"
#include "ops/ops.h"

namespace automoe {

void AdamW::step(std::vector<float>& params, const std::vector<float>& grads, float lr) {
  AM_CHECK(params.size() == grads.size() && m.size() == params.size(),
           "optimizer state does not match the parameters ({} vs {}); was init() called?",
           m.size(), params.size());
  ++t;
  cpu::adamw_step(params.data(), grads.data(), m.data(), v.data(), int64_t(params.size()), lr,
                  cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, t);
}

float clip_grad_norm(std::vector<float>& grads, float max_norm) {
  float norm = float(std::sqrt(cpu::sum_squares(grads.data(), int64_t(grads.size()))));
  if (max_norm > 0 && norm > max_norm) {
    // torch: clip_coef = max_norm / (total_norm + 1e-6), applied when < 1
    cpu::scale_inplace(grads.data(), max_norm / (norm + 1e-6f), int64_t(grads.size()));
  }
  return norm;
}

}  // namespace automoe
