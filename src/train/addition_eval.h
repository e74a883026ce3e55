// train/addition_eval.h: evaluates a model on held-out addition problems by greedy decoding
// (the demo's proof that the exported checkpoint loads back and learned something).
#pragma once
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "model/qwen3_moe.h"

namespace automoe {

struct AdditionScore {
  int64_t correct = 0, total = 0;
};

// Decodes `count` problems none of which is in `train` (the training sequences), and prints the
// first `show`.
AdditionScore addition_eval(Qwen3Moe& model, int64_t count, int digits, uint64_t seed, int64_t show,
                            const std::set<std::vector<int64_t>>& train);

}  // namespace automoe
