// train/builtin.h: what the demo needs without any download: a tiny Qwen3-MoE config and a
// generated task (multi-digit addition) over a 16-symbol character vocabulary.
#pragma once
#include <string>
#include <vector>

#include "model/config.h"
#include "text/dataset.h"

namespace automoe {

// Names accepted by `model.builtin`; throws listing them for an unknown name.
ModelConfig builtin_model_config(const std::string& name);

// Vocabulary of the addition task: 0 <pad>, 1 <bos>, 2 <eos>, 3..12 digits, 13 '+', 14 '='.
constexpr int64_t kAdditionVocab = 16;
std::string addition_detokenize(const std::vector<int64_t>& ids);

// `count` problems "a+b=" with a, b < 10^digits, zero-padded to `digits`; the answer has
// digits+1 digits written least-significant first (so a tiny model can learn carries left to
// right); labels only on the answer and <eos>.
std::vector<Example> addition_examples(int64_t count, int digits, uint64_t seed);

}  // namespace automoe
