// dist/zero.h: ZeRO-1/2 sharded data parallelism (train.zero 1 or 2) on the CPU backend:
// gradients reduce-scattered, AdamW on this rank's shard only, the updated shard all-gathered.
// ZeRO-3 (dist/zero3.h) keeps the parameters sharded too and moves one window of the flat order
// at a time (gather_window, reduce_window, poison_window below) with the same workspaces.
//
// Partition (dist/zero_partition.h, shared with the GPU path and the checkpoints): replicated
// tensors over the world, this EP rank's experts over the DP group, each group flattened in
// layout order and cut into equal contiguous shards, the last padded. Each rank's optimizer arena
// is [replicated shard | expert shard] (shard_numel() elements): the AdamW moments exist for those
// elements only, which is the memory saving.
//
// A step (the trainer calls these in order, each collective over the groups above):
//   reduce_grads   (ZeRO-1: once after the last micro-batch; ZeRO-2: after every micro-batch)
//                  the model's gradient arena -> grad_shard() (=, or += for later micro-batches)
//   clip_grad_norm the global L2 norm: sum of squares of the shards, all-reduced over the world
//   load_param_shard, AdamW on (param_shard(), grad_shard()), allgather_params
// Collectives go in buckets: a round moves `bucket` elements of every rank's shard (the same
// sub-block of each), packed from the arena into a fixed workspace of ranks*bucket floats
// allocated once here; nothing is allocated per step.
//
// ZeRO-2: after each micro-batch's reduce the groups' elements of the model's gradient arena are
// zeroed, so the full-size buffer is only a per-micro-batch workspace and the accumulated
// gradient lives in the shard. The CPU model keeps that arena allocated (its backward writes at
// fixed offsets); the GPU path reduces each bucket as the backward produces it and frees it.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "dist/process_group.h"
#include "dist/zero_partition.h"
#include "model/params.h"

namespace automoe::dist {

class Zero {
 public:
  // level 1, 2 or 3; `bucket`: elements per rank per collective round (the workspace is
  // ranks * bucket floats). The groups must outlive this object.
  Zero(int level, const ParamLayout& layout, const Groups& g, int64_t bucket = int64_t(1) << 22);

  const ZeroPartition& partition() const { return part_; }
  int level() const { return part_.level(); }
  // This rank's optimizer arena: [replicated shard | expert shard] elements.
  int64_t shard_numel() const { return part_.shard_numel(); }
  int64_t replicated_numel() const { return part_.replicated_numel(); }
  int64_t replicated_shard() const { return part_.replicated_shard(); }
  int64_t expert_numel() const { return part_.expert_numel(); }  // this EP rank's experts
  int64_t expert_shard() const { return part_.expert_shard(); }

  // grads[layout.total] summed over each group's ranks, this rank's shards into grad_shard():
  // assigned when `first` (the step's first reduce), added otherwise. ZeRO-2 then zeroes the
  // reduced elements of `grads` (the next micro-batch accumulates from zero).
  void reduce_grads(std::vector<float>& grads, bool first);
  // The whole model's gradient norm (each element counted once over the world); scales
  // grad_shard() to max_norm (> 0) as torch.nn.utils.clip_grad_norm_. Returns the norm before.
  float clip_grad_norm(float max_norm);
  // param_shard() <- this rank's elements of params (the replicas are identical).
  void load_param_shard(const std::vector<float>& params);
  // params <- every rank's param_shard(), over each group.
  void allgather_params(std::vector<float>& params);

  // ZeRO-3: a window, flat elements [lo, hi) of group `g` (0 replicated over the world, 1 experts
  // over the DP group; inside [0, numel)). Each rank's part of it is the window's overlap with
  // that rank's shard; a round moves `bucket` elements of every part (zeros past a shorter
  // part). Collective over the group: every rank calls these with the same window.
  // params' window <- every rank's part of param_shard() (all-gathered).
  void gather_window(std::vector<float>& params, int g, int64_t lo, int64_t hi);
  // This rank's part of grad_shard() <- (= when `first`, else +=) the sum over the group of
  // grads' window (reduce-scattered), as reduce_grads sums; grads' window is zeroed after.
  void reduce_window(std::vector<float>& grads, int g, int64_t lo, int64_t hi, bool first);
  // params' window <- NaN: ZeRO-3's release, so a read outside a gathered window poisons the loss.
  void poison_window(std::vector<float>& params, int g, int64_t lo, int64_t hi);

  std::vector<float>& grad_shard() { return grad_; }    // [shard_numel()]
  std::vector<float>& param_shard() { return param_; }  // [shard_numel()]

 private:
  // dst[hi-lo] <- flat elements [lo, hi) of the group from `arena` (zero past numel).
  static void pack(float* dst, const ZeroGroup& gr, const float* arena, int64_t lo, int64_t hi);
  // arena <- src for flat [lo, hi) (padding dropped).
  static void unpack(float* arena, const ZeroGroup& gr, const float* src, int64_t lo, int64_t hi);
  // arena <- `value` for flat [lo, hi).
  static void fill(float* arena, const ZeroGroup& gr, float value, int64_t lo, int64_t hi);
  // the groups with their communicators: replicated over the world, experts over dp
  std::pair<const ZeroGroup*, const Comm*> group(int i) const {
    return i == 0 ? std::pair{&part_.replicated(), world_} : std::pair{&part_.experts(), dp_};
  }

  ZeroPartition part_;
  const Comm *world_, *dp_;
  int64_t bucket_;
  std::vector<float> grad_, param_;  // [shard_numel()] this rank's gradient and parameter shards
  std::vector<float> send_;          // [ranks * bucket] a round's packed blocks (rank order)
  std::vector<float> recv_;          // [bucket] a round's reduced block
};

}  // namespace automoe::dist
