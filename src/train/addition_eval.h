// train/addition_eval.h: evaluates a model on held-out addition problems by greedy decoding
// (the demo's proof that the exported checkpoint loads back and learned something).
#pragma once
#include <cstdint>
#include <string>

#include "model/qwen3_moe.h"

namespace automoe {

struct AdditionScore {
  int64_t correct = 0, total = 0;
};

// Decodes `count` problems (seeded apart from the training set) and prints the first `show`.
AdditionScore addition_eval(Qwen3Moe& model, int64_t count, int digits, uint64_t seed, int64_t show);

}  // namespace automoe
