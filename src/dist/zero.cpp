// dist/zero.cpp: ZeRO-1/2 bucketed reduce-scatter / all-gather and the sharded gradient norm on
// MPI, and ZeRO-3's windowed ones (dist/zero.h; the partition is dist/zero_partition.h).
#include "dist/zero.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/check.h"
#include "ops/ops.h"

namespace automoe::dist {

Zero::Zero(int level, const ParamLayout& layout, const Groups& g, int64_t bucket)
    : part_(level, layout, g), world_(&g.world), dp_(&g.dp), bucket_(bucket) {
  AM_CHECK(bucket > 0, "internal: ZeRO bucket size {}", bucket);
  grad_.assign(size_t(shard_numel()), 0.f);
  param_.assign(size_t(shard_numel()), 0.f);
  int64_t send = 0, recv = 0;
  for (int i = 0; i < 2; ++i) {
    auto [gr, comm] = group(i);
    const int64_t b = std::min(bucket_, gr->shard);
    send = std::max(send, comm->size() * b);
    recv = std::max(recv, b);
  }
  send_.assign(size_t(send), 0.f);
  recv_.assign(size_t(recv), 0.f);
}

void Zero::pack(float* dst, const ZeroGroup& gr, const float* arena, int64_t lo, int64_t hi) {
  const int64_t end = std::clamp(gr.numel, lo, hi);  // padding from here
  gr.for_each_piece(lo, hi, [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
    std::memcpy(dst + pos, arena + s.arena + off, size_t(n) * sizeof(float));
  });
  std::fill(dst + (end - lo), dst + (hi - lo), 0.f);
}

void Zero::unpack(float* arena, const ZeroGroup& gr, const float* src, int64_t lo, int64_t hi) {
  gr.for_each_piece(lo, hi, [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
    std::memcpy(arena + s.arena + off, src + pos, size_t(n) * sizeof(float));
  });
}

void Zero::fill(float* arena, const ZeroGroup& gr, float value, int64_t lo, int64_t hi) {
  gr.for_each_piece(lo, hi, [&](const ZeroSeg& s, int64_t off, int64_t, int64_t n) {
    std::fill(arena + s.arena + off, arena + s.arena + off + n, value);
  });
}

void Zero::reduce_grads(std::vector<float>& grads, bool first) {
  for (int g = 0; g < 2; ++g) {
    auto [gr, comm] = group(g);
    const int ranks = comm->size();
    for (int64_t j = 0; j < gr->shard; j += bucket_) {  // round: sub-block [j, j+b) of every shard
      const int64_t b = std::min(bucket_, gr->shard - j);
      for (int r = 0; r < ranks; ++r) pack(send_.data() + r * b, *gr, grads.data(), r * gr->shard + j, r * gr->shard + j + b);
      comm->reduce_scatter_sum(recv_.data(), send_.data(), b);
      float* dst = grad_.data() + gr->at + j;
      if (first) std::memcpy(dst, recv_.data(), size_t(b) * sizeof(float));
      else for (int64_t i = 0; i < b; ++i) dst[i] += recv_[i];
    }
    if (level() == 2) fill(grads.data(), *gr, 0.f, 0, gr->numel);  // the arena is scratch again
  }
}

float Zero::clip_grad_norm(float max_norm) {
  // each element of the model is in exactly one rank's shard: replicated ones over the world,
  // each EP rank's experts over its DP group
  double sq = cpu::sum_squares(grad_.data(), int64_t(grad_.size()));
  world_->allreduce_sum(&sq, 1);
  const float norm = float(std::sqrt(sq));
  if (max_norm > 0 && norm > max_norm)  // as clip_grad_norm (train/adamw.cpp) and torch
    cpu::scale_inplace(grad_.data(), max_norm / (norm + 1e-6f), int64_t(grad_.size()));
  return norm;
}

void Zero::load_param_shard(const std::vector<float>& params) {
  for (int g = 0; g < 2; ++g) {
    const ZeroGroup& gr = *group(g).first;
    pack(param_.data() + gr.at, gr, params.data(), gr.begin, gr.begin + gr.shard);
  }
}

void Zero::allgather_params(std::vector<float>& params) {
  for (int g = 0; g < 2; ++g) {
    auto [gr, comm] = group(g);
    const int ranks = comm->size();
    for (int64_t j = 0; j < gr->shard; j += bucket_) {
      const int64_t b = std::min(bucket_, gr->shard - j);
      comm->allgather(send_.data(), param_.data() + gr->at + j, b * int64_t(sizeof(float)));
      for (int r = 0; r < ranks; ++r)
        unpack(params.data(), *gr, send_.data() + r * b, r * gr->shard + j, r * gr->shard + j + b);
    }
  }
}

namespace {

// Rank r's part of the window [lo, hi): flat [first, first + n), its overlap with r's shard.
struct Part {
  int64_t first, n;
};
Part part_of(const ZeroGroup& gr, int r, int64_t lo, int64_t hi) {
  const int64_t a = std::max(lo, r * gr.shard), e = std::min(hi, (r + 1) * gr.shard);
  return {a, std::max<int64_t>(0, e - a)};
}
// The rounds cover the longest part: every rank's block of a round has the same size.
int64_t longest_part(const ZeroGroup& gr, int64_t lo, int64_t hi) {
  int64_t n = 0;
  for (int r = 0; r < gr.ranks; ++r) n = std::max(n, part_of(gr, r, lo, hi).n);
  return n;
}

}  // namespace

void Zero::gather_window(std::vector<float>& params, int g, int64_t lo, int64_t hi) {
  auto [gr, comm] = group(g);
  const Part mine = part_of(*gr, gr->rank, lo, hi);
  const int64_t len = longest_part(*gr, lo, hi);
  for (int64_t j = 0; j < len; j += bucket_) {  // round: elements [j, j+b) of every rank's part
    const int64_t b = std::min(bucket_, len - j), n = std::clamp<int64_t>(mine.n - j, 0, b);
    if (n > 0) std::memcpy(recv_.data(), param_.data() + gr->at + (mine.first - gr->begin) + j, size_t(n) * sizeof(float));
    std::fill(recv_.data() + n, recv_.data() + b, 0.f);
    comm->allgather(send_.data(), recv_.data(), b * int64_t(sizeof(float)));
    for (int r = 0; r < gr->ranks; ++r) {
      const Part p = part_of(*gr, r, lo, hi);
      const int64_t m = std::clamp<int64_t>(p.n - j, 0, b);
      unpack(params.data(), *gr, send_.data() + r * b, p.first + j, p.first + j + m);
    }
  }
}

void Zero::reduce_window(std::vector<float>& grads, int g, int64_t lo, int64_t hi, bool first) {
  auto [gr, comm] = group(g);
  const Part mine = part_of(*gr, gr->rank, lo, hi);
  const int64_t len = longest_part(*gr, lo, hi);
  for (int64_t j = 0; j < len; j += bucket_) {
    const int64_t b = std::min(bucket_, len - j);
    for (int r = 0; r < gr->ranks; ++r) {
      const Part p = part_of(*gr, r, lo, hi);
      const int64_t m = std::clamp<int64_t>(p.n - j, 0, b);
      pack(send_.data() + r * b, *gr, grads.data(), p.first + j, p.first + j + m);
      std::fill(send_.data() + r * b + m, send_.data() + (r + 1) * b, 0.f);
    }
    comm->reduce_scatter_sum(recv_.data(), send_.data(), b);
    const int64_t n = std::clamp<int64_t>(mine.n - j, 0, b);
    if (n == 0) continue;
    float* dst = grad_.data() + gr->at + (mine.first - gr->begin) + j;
    if (first) std::memcpy(dst, recv_.data(), size_t(n) * sizeof(float));
    else for (int64_t i = 0; i < n; ++i) dst[i] += recv_[i];
  }
  fill(grads.data(), *gr, 0.f, lo, hi);  // the arena is scratch again, as ZeRO-2's
}

void Zero::poison_window(std::vector<float>& params, int g, int64_t lo, int64_t hi) {
  fill(params.data(), *group(g).first, std::numeric_limits<float>::quiet_NaN(), lo, hi);
}

}  // namespace automoe::dist
