// train/adamw.h: AdamW over a parameter arena (torch.optim.AdamW semantics, one group, weight
// decay on every parameter), with its moments in arenas of the same layout.
#pragma once
#include <cstdint>
#include <vector>

namespace automoe {

struct AdamWConfig {
  float lr = 1e-4f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.01f;
};

struct AdamW {
  AdamWConfig cfg;
  std::vector<float> m, v;  // same layout as the parameters
  int64_t t = 0;            // steps taken

  void init(int64_t n) { m.assign(n, 0.f); v.assign(n, 0.f); t = 0; }
  // One update of params with grads at learning rate lr.
  void step(std::vector<float>& params, const std::vector<float>& grads, float lr);
};

// Global L2 norm of the gradient arena; scales it in place to max_norm when above (max_norm > 0).
// Returns the norm before clipping (as torch.nn.utils.clip_grad_norm_).
float clip_grad_norm(std::vector<float>& grads, float max_norm);

}  // namespace automoe
