// dist/zero_partition.cpp: the ZeRO partition (dist/zero_partition.h).
#include "dist/zero_partition.h"

#include "core/check.h"
#include "dist/process_group.h"

namespace automoe::dist {

namespace {

void build(ZeroGroup& gr, const ParamLayout& layout, bool expert, int ranks, int rank) {
  AM_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "internal: ZeRO group rank {} of {}", rank,
           ranks);
  gr.ranks = ranks;
  gr.rank = rank;
  for (size_t k = 0; k < layout.params.size(); ++k) {
    const ParamSpec& p = layout.params[k];
    if (p.expert != expert) continue;
    gr.segs.push_back({int64_t(k), p.offset, gr.numel, p.numel});
    gr.numel += p.numel;
  }
  gr.shard = (gr.numel + ranks - 1) / ranks;
  gr.begin = rank * gr.shard;
}

}  // namespace

ZeroPartition::ZeroPartition(int level, const ParamLayout& layout, int world_size, int world_rank,
                             int dp_size, int dp_rank)
    : level_(level) {
  AM_CHECK(level >= 1 && level <= 3, "train.zero must be 0, 1, 2 or 3, got {}", level);
  build(dense_, layout, false, world_size, world_rank);
  build(experts_, layout, true, dp_size, dp_rank);
  experts_.at = dense_.shard;
}

ZeroPartition::ZeroPartition(int level, const ParamLayout& layout, const Groups& g)
    : ZeroPartition(level, layout, g.world.size(), g.world.rank(), g.dp.size(), g.dp.rank()) {}

}  // namespace automoe::dist
