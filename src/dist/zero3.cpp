// dist/zero3.cpp: ZeRO-3's block windows and its gather / release / reduce schedule on the
// model's hooks (dist/zero3.h).
#include "dist/zero3.h"

#include <algorithm>

#include "core/check.h"

namespace automoe::dist {

namespace {

// The windows of a set of tensors: each tensor's flat range in its group, sorted, adjacent
// ranges merged (a layer's tensors of one group are adjacent in that group's flat order).
std::vector<ZeroWindow> windows_of(const ZeroPartition& part, const std::vector<int64_t>& tensors) {
  std::vector<ZeroWindow> w;
  for (int g = 0; g < 2; ++g)
    for (const ZeroSeg& s : (g == 0 ? part.replicated() : part.experts()).segs)
      if (std::find(tensors.begin(), tensors.end(), s.param) != tensors.end())
        w.push_back({g, s.flat, s.flat + s.numel});
  std::vector<ZeroWindow> out;  // segs are in flat order within a group
  for (const ZeroWindow& x : w) {
    if (!out.empty() && out.back().group == x.group && out.back().hi == x.lo) out.back().hi = x.hi;
    else out.push_back(x);
  }
  return out;
}

}  // namespace

std::vector<std::pair<int64_t, int64_t>> block_tensor_ranges(const Qwen3Moe& model) {
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t next = 0;
  for (int64_t b = 0; b < model.num_blocks(); ++b) {
    const std::vector<int64_t> t = model.block_params(b, Pass::kForward);  // sorted
    const bool run = !t.empty() && t.front() == next && t.back() - t.front() + 1 == int64_t(t.size());
    AM_CHECK(run, "train.zero 3 on the GPU needs each block's tensors consecutive in the layout "
             "(block {} is not: tied embeddings put wte in the head's block); use untied "
             "embeddings, train.zero 1, or train.device cpu", b);
    out.push_back({t.front(), t.back() + 1});
    next = t.back() + 1;
  }
  AM_CHECK(size_t(next) == model.layout().params.size(), "internal: the blocks cover {} of {} tensors",
           next, model.layout().params.size());
  return out;
}

Zero3::Zero3(Qwen3Moe& model, Zero& zero) : model_(model), zero_(zero) {
  AM_CHECK(zero.level() == 3, "internal: Zero3 needs a level-3 dist::Zero, got level {}", zero.level());
  const int64_t blocks = model.num_blocks();
  const size_t tensors = model.layout().params.size();
  // A gradient is complete after the backward of the last block that writes it: the lowest
  // block whose forward reads the tensor (the backward runs blocks in reverse; tied embeddings:
  // the head writes wte's gradient, then the embedding).
  std::vector<int64_t> last_writer(tensors, -1);
  for (int64_t b = blocks - 1; b >= 0; --b)
    for (int64_t t : model.block_params(b, Pass::kForward)) last_writer[size_t(t)] = b;
  for (size_t t = 0; t < tensors; ++t)
    AM_CHECK(last_writer[t] >= 0, "internal: ZeRO-3: parameter '{}' is in no block", model.layout().params[t].name);
  for (int p = 0; p < 2; ++p)
    for (int64_t b = 0; b < blocks; ++b)
      reads_[p].push_back(windows_of(zero.partition(), model.block_params(b, Pass(p))));
  for (int64_t b = 0; b < blocks; ++b) {
    std::vector<int64_t> mine;
    for (size_t t = 0; t < tensors; ++t)
      if (last_writer[t] == b) mine.push_back(int64_t(t));
    reduces_.push_back(windows_of(zero.partition(), mine));
  }
  model_.set_hooks(this);
}

Zero3::~Zero3() { model_.set_hooks(nullptr); }

void Zero3::shard_params() {
  zero_.load_param_shard(model_.params());
  release_all();
}

void Zero3::gather_all() {
  for (int g = 0; g < 2; ++g) {
    const ZeroGroup& gr = g == 0 ? zero_.partition().replicated() : zero_.partition().experts();
    zero_.gather_window(model_.params(), g, 0, gr.numel);
  }
}

void Zero3::release_all() {
  for (int g = 0; g < 2; ++g) {
    const ZeroGroup& gr = g == 0 ? zero_.partition().replicated() : zero_.partition().experts();
    zero_.poison_window(model_.params(), g, 0, gr.numel);
  }
}

void Zero3::before(Pass pass, int64_t b) {
  for (const ZeroWindow& w : reads(b, pass)) zero_.gather_window(model_.params(), w.group, w.lo, w.hi);
}

void Zero3::after(Pass pass, int64_t b) {
  for (const ZeroWindow& w : reads(b, pass)) zero_.poison_window(model_.params(), w.group, w.lo, w.hi);
  if (pass == Pass::kBackward)
    for (const ZeroWindow& w : reduces(b)) zero_.reduce_window(model_.grads(), w.group, w.lo, w.hi, first_);
}

}  // namespace automoe::dist
