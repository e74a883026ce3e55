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

std::pair<int64_t, int64_t> ZeroGroup::flat_range(int64_t k0, int64_t k1) const {
  int64_t lo = -1, hi = -1;
  for (const ZeroSeg& s : segs) {
    if (s.param < k0 || s.param >= k1) continue;
    AM_CHECK(lo < 0 || s.flat == hi, "internal: ZeRO tensors [{}, {}) are not consecutive", k0, k1);
    if (lo < 0) lo = s.flat;
    hi = s.flat + s.numel;
  }
  return lo < 0 ? std::pair<int64_t, int64_t>{0, 0} : std::pair<int64_t, int64_t>{lo, hi};
}

std::vector<ZeroOwnerPart> owner_parts(const ZeroGroup& gr, int64_t lo, int64_t hi) {
  std::vector<ZeroOwnerPart> out;
  hi = std::min(hi, gr.numel);
  if (lo >= hi || gr.shard == 0) return out;
  for (int r = int(lo / gr.shard); r < gr.ranks && int64_t(r) * gr.shard < hi; ++r) {
    const int64_t a = std::max(lo, int64_t(r) * gr.shard), b = std::min(hi, int64_t(r + 1) * gr.shard);
    if (a < b) out.push_back({r, a, b});
  }
  return out;
}

}  // namespace automoe::dist
