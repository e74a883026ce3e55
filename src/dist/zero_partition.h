// dist/zero_partition.h: the ZeRO partition on its own (no buffers, no collectives): which flat
// elements of the parameters each rank owns. The CPU's dist::Zero (dist/zero.h), the GPU's
// dist::DeviceZero (dist/zero_cuda.h) and the checkpoint's per-rank moment files
// (train/checkpoint.h) all use it, so a shard means the same elements everywhere.
//
// The parameters form two groups, each flattened in layout order (the order of
// ParamLayout::params, skipping the other group's tensors) and cut into equal contiguous shards:
//   replicated  (every non-expert tensor) over the world, W ranks
//   experts     (this EP rank's expert shards) over the DP group, dp ranks (dp = 1: one shard)
//   shard = ceil(numel / ranks); rank r owns flat elements [r*shard, (r+1)*shard); the last shard
//   is padded with zeros up to ranks*shard (padding has zero gradient and stays zero under AdamW).
// A rank's optimizer arena is [replicated shard | expert shard] (shard_numel() elements).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "model/params.h"

namespace automoe::dist {

struct Groups;

// One tensor of a group: its index in ParamLayout::params, its offset in the layout's (host)
// arena, its first flat element in the group, its size.
struct ZeroSeg {
  int64_t param, arena, flat, numel;
};

struct ZeroGroup {
  std::vector<ZeroSeg> segs;  // layout order
  int ranks = 1, rank = 0;
  int64_t numel = 0, shard = 0, begin = 0;  // begin = rank * shard
  int64_t at = 0;                           // offset of this group's shard in the optimizer arena

  // f(const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) for each tensor piece of flat
  // elements [lo, hi): elements [off, off + n) of tensor s are flat [lo + pos, lo + pos + n).
  // Padding (flat >= numel) has no piece.
  template <class F>
  void for_each_piece(int64_t lo, int64_t hi, F&& f) const {
    auto it = std::upper_bound(segs.begin(), segs.end(), lo,  // the first tensor ending after lo
                               [](int64_t x, const ZeroSeg& s) { return x < s.flat + s.numel; });
    for (int64_t i = lo; i < hi && it != segs.end(); ++it) {
      const int64_t n = std::min(hi, it->flat + it->numel) - i;
      f(*it, i - it->flat, i - lo, n);
      i += n;
    }
  }
  // The flat range [lo, hi) of this group's tensors among layout tensors [k0, k1) (a block of
  // consecutive tensors: its tensors of one group are consecutive in the group's flat order);
  // lo == hi when it has none.
  std::pair<int64_t, int64_t> flat_range(int64_t k0, int64_t k1) const;
};

// Rank `rank`'s part [lo, hi) of some flat elements of a group (its shard's intersection).
struct ZeroOwnerPart {
  int rank;
  int64_t lo, hi;
};
// The non-empty parts of flat elements [lo, hi) of `gr`, in rank order (ZeRO-3 on the GPU moves
// a block's range owner by owner: dist/zero3_cuda.h). Padding (past numel) belongs to no part.
std::vector<ZeroOwnerPart> owner_parts(const ZeroGroup& gr, int64_t lo, int64_t hi);

class ZeroPartition {
 public:
  // level: train.zero (1, 2 or 3; recorded by checkpoints, the partition is the same).
  ZeroPartition(int level, const ParamLayout& layout, int world_size, int world_rank, int dp_size,
                int dp_rank);
  ZeroPartition(int level, const ParamLayout& layout, const Groups& g);

  int level() const { return level_; }
  const ZeroGroup& replicated() const { return dense_; }  // over the world
  const ZeroGroup& experts() const { return experts_; }   // over the DP group
  // This rank's optimizer arena: [replicated shard | expert shard] elements.
  int64_t shard_numel() const { return dense_.shard + experts_.shard; }
  int64_t replicated_numel() const { return dense_.numel; }
  int64_t replicated_shard() const { return dense_.shard; }
  int64_t expert_numel() const { return experts_.numel; }  // this EP rank's experts
  int64_t expert_shard() const { return experts_.shard; }

 private:
  int level_;
  ZeroGroup dense_, experts_;
};

}  // namespace automoe::dist
