// dist/zero3.h: ZeRO-3 (train.zero 3) on the CPU backend: beyond ZeRO-2 the parameters are
// sharded too. Each rank's parameters are its param_shard() of dist::Zero (the ZeRO-1/2
// partition, dist/zero_partition.h); the model's full-size parameter arena is only a workspace.
//
// The schedule, driven by the model's block hooks (BlockHooks in model/qwen3_moe.h; blocks in
// forward order: 0 embedding, 1..L layers, L+1 final norm and lm_head):
//   before(fwd, b)  gather block b's parameters into the arena (all-gather of each rank's part)
//   after(fwd, b)   release them: fill with NaN
//   before(bwd, b)  gather them again (the embedding's backward reads none)
//   after(bwd, b)   release them; reduce-scatter the gradients whose last writer is b into
//                   grad_shard() (=, or += after the step's first micro-batch, as ZeRO-2) and
//                   zero them in the gradient arena
// After the micro-batches: the gradient norm and AdamW on the shards (the trainer, as ZeRO-1/2),
// and no all-gather of the whole model: the next forward gathers block by block.
// Poison: outside a gathered window every parameter of the arena is NaN, so a read outside the
// schedule makes the loss or the gradients NaN (tests/dist/test_zero3.cpp skips a gather to
// prove it). Checkpoints and the HF export need the full parameters: gather_all() first.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "dist/zero.h"
#include "model/qwen3_moe.h"

namespace automoe::dist {

// Flat elements [lo, hi) of one ZeRO group (0 replicated, 1 experts: dist::Zero's windows).
struct ZeroWindow {
  int group;
  int64_t lo, hi;
};

// The model's blocks as runs of consecutive layout tensors [first, second), block by block (the
// GPU's ZeRO-3 windows, dist/zero3_cuda.h: one device range per block). Throws for tied
// embeddings, whose head block reads wte, far from ln_f and lm_head.
std::vector<std::pair<int64_t, int64_t>> block_tensor_ranges(const Qwen3Moe& model);

class Zero3 final : public BlockHooks {
 public:
  // `zero`: level 3 over `model`'s layout. Installs itself as the model's hooks until destroyed;
  // both must outlive it.
  Zero3(Qwen3Moe& model, Zero& zero);
  ~Zero3() override;
  Zero3(const Zero3&) = delete;
  Zero3& operator=(const Zero3&) = delete;

  // The next backward's reduces assign (first micro-batch of a step) or add to grad_shard().
  void begin_micro_batch(bool first) { first_ = first; }
  // param_shard() <- this rank's elements of the arena (the full model, the same on every rank:
  // after init, HF load or a checkpoint), then release_all(): from here the shard is the truth.
  void shard_params();
  // The arena <- the whole model from every rank's shard (checkpoints, the HF export).
  void gather_all();
  // The arena <- NaN.
  void release_all();

  void before(Pass pass, int64_t b) override;
  void after(Pass pass, int64_t b) override;

  // What block b gathers in `pass` and reduces after its backward (merged, in flat order).
  const std::vector<ZeroWindow>& reads(int64_t b, Pass pass) const { return reads_[int(pass)][size_t(b)]; }
  const std::vector<ZeroWindow>& reduces(int64_t b) const { return reduces_[size_t(b)]; }

 private:
  Qwen3Moe& model_;
  Zero& zero_;
  bool first_ = true;
  std::vector<std::vector<ZeroWindow>> reads_[2];  // [pass][block]
  std::vector<std::vector<ZeroWindow>> reduces_;   // [block]: tensors whose last writer it is
};

}  // namespace automoe::dist
