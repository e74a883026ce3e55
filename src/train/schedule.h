// train/schedule.h: learning-rate schedules with linear warmup: constant, linear decay, cosine.
#pragma once
#include <cstdint>
#include <string>

namespace automoe {

struct Schedule {
  std::string kind = "cosine";  // constant | linear | cosine
  float lr = 1e-4f;             // peak
  int64_t warmup = 0;           // steps of linear warmup from 0
  int64_t total = 1;            // total optimizer steps
  float min_lr_ratio = 0.f;     // floor of the decay, as a fraction of lr

  // LR for optimizer step `step` (0-based), as transformers' get_*_schedule_with_warmup.
  float at(int64_t step) const;
  void validate() const;  // throws on an unknown kind or bad values
};

}  // namespace automoe
