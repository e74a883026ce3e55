// train/schedule.cpp: learning-rate schedules.
#include "train/schedule.h"

#include <cmath>

#include "core/check.h"

namespace automoe {

void Schedule::validate() const {
  AM_CHECK(kind == "constant" || kind == "linear" || kind == "cosine",
           "train.schedule '{}' is unknown; use constant, linear or cosine", kind);
  AM_CHECK(lr >= 0 && warmup >= 0 && total > 0 && min_lr_ratio >= 0 && min_lr_ratio <= 1,
           "bad schedule: lr {} warmup {} steps {} min_lr_ratio {}", lr, warmup, total, min_lr_ratio);
}

float Schedule::at(int64_t step) const {
  if (step < warmup) return lr * float(step) / float(warmup);  // HF: step 0 runs at lr 0
  if (kind == "constant") return lr;
  double progress = total > warmup ? double(step - warmup) / double(total - warmup) : 1.0;
  progress = std::min(1.0, std::max(0.0, progress));
  double f = kind == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return float(lr * (min_lr_ratio + (1.0 - min_lr_ratio) * f));
}

}  // namespace automoe
