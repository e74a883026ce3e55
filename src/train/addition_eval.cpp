// train/addition_eval.cpp: greedy decoding of addition answers with the CPU forward.
#include "train/addition_eval.h"

#include <cstdio>

#include "train/builtin.h"

namespace automoe {

AdditionScore addition_eval(Qwen3Moe& model, int64_t count, int digits, uint64_t seed, int64_t show,
                            const std::set<std::vector<int64_t>>& train) {
  AdditionScore s;
  const int64_t V = model.config().vocab_size;
  for (const Example& ex : addition_examples(4 * count, digits, seed)) {
    if (s.total == count) break;
    if (train.count(ex.ids)) continue;  // held out: never seen in training
    // prompt = everything up to and including '='
    int64_t eq = 0;
    while (ex.ids[eq] != 14) ++eq;
    std::vector<int64_t> seq(ex.ids.begin(), ex.ids.begin() + eq + 1);
    std::vector<int64_t> want(ex.ids.begin() + eq + 1, ex.ids.end());
    std::vector<int64_t> got;
    while (got.size() < want.size() + 1 && (got.empty() || got.back() != 2)) {
      Batch b;
      b.B = 1;
      b.T = int64_t(seq.size());
      b.ids = seq;
      model.forward(b);
      const float* last = model.logits().data() + (b.T - 1) * V;
      int64_t best = 0;
      for (int64_t v = 1; v < V; ++v)
        if (last[v] > last[best]) best = v;
      got.push_back(best);
      seq.push_back(best);
    }
    bool ok = got == want;
    s.correct += ok;
    ++s.total;
    if (s.total <= show)
      std::printf("  %s  model: %-12s %s\n", addition_detokenize(std::vector<int64_t>(ex.ids.begin() + 1, ex.ids.begin() + eq + 1)).c_str(),
                  addition_detokenize(got).c_str(), ok ? "ok" : "wrong");
  }
  return s;
}

}  // namespace automoe
