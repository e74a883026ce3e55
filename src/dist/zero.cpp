// dist/zero.cpp: ZeRO-1/2 partition, bucketed reduce-scatter / all-gather and the sharded
// gradient norm on MPI (dist/zero.h has the layout).
#include "dist/zero.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/check.h"
#include "ops/ops.h"

namespace automoe::dist {

Zero::Zero(int level, const ParamLayout& layout, const Groups& g, int64_t bucket)
    : level_(level), world_(&g.world), bucket_(bucket) {
  AM_CHECK(level == 1 || level == 2, "train.zero must be 0, 1 or 2, got {}", level);
  AM_CHECK(bucket > 0, "internal: ZeRO bucket size {}", bucket);
  build(dense_, layout, false, g.world);
  build(experts_, layout, true, g.dp);
  experts_.at = dense_.shard;
  grad_.assign(size_t(shard_numel()), 0.f);
  param_.assign(size_t(shard_numel()), 0.f);
  int64_t send = 0, recv = 0;
  for (const Group* gr : {&dense_, &experts_}) {
    const int64_t b = std::min(bucket_, gr->shard);
    send = std::max(send, gr->comm->size() * b);
    recv = std::max(recv, b);
  }
  send_.assign(size_t(send), 0.f);
  recv_.assign(size_t(recv), 0.f);
}

void Zero::build(Group& gr, const ParamLayout& layout, bool expert, const Comm& comm) {
  gr.comm = &comm;
  for (auto& p : layout.params)
    if (p.expert == expert) {
      gr.segs.push_back({p.offset, gr.numel, p.numel});
      gr.numel += p.numel;
    }
  const int64_t ranks = comm.size();
  gr.shard = (gr.numel + ranks - 1) / ranks;
  gr.begin = comm.rank() * gr.shard;
}

void Zero::pack(float* dst, const Group& gr, const float* arena, int64_t lo, int64_t hi) {
  // the first tensor ending after lo
  auto it = std::upper_bound(gr.segs.begin(), gr.segs.end(), lo,
                             [](int64_t x, const Seg& s) { return x < s.flat + s.numel; });
  for (int64_t i = lo; i < hi;) {
    if (it == gr.segs.end()) {  // padding
      std::fill(dst + (i - lo), dst + (hi - lo), 0.f);
      return;
    }
    const int64_t a = i - it->flat, n = std::min(hi, it->flat + it->numel) - i;
    std::memcpy(dst + (i - lo), arena + it->arena + a, size_t(n) * sizeof(float));
    i += n;
    ++it;
  }
}

void Zero::unpack(float* arena, const Group& gr, const float* src, int64_t lo, int64_t hi) {
  auto it = std::upper_bound(gr.segs.begin(), gr.segs.end(), lo,
                             [](int64_t x, const Seg& s) { return x < s.flat + s.numel; });
  for (int64_t i = lo; i < hi && it != gr.segs.end(); ++it) {
    const int64_t a = i - it->flat, n = std::min(hi, it->flat + it->numel) - i;
    if (src) std::memcpy(arena + it->arena + a, src + (i - lo), size_t(n) * sizeof(float));
    else std::fill(arena + it->arena + a, arena + it->arena + a + n, 0.f);
    i += n;
  }
}

void Zero::reduce_grads(std::vector<float>& grads, bool first) {
  for (Group* gr : {&dense_, &experts_}) {
    const int ranks = gr->comm->size();
    for (int64_t j = 0; j < gr->shard; j += bucket_) {  // round: sub-block [j, j+b) of every shard
      const int64_t b = std::min(bucket_, gr->shard - j);
      for (int r = 0; r < ranks; ++r) pack(send_.data() + r * b, *gr, grads.data(), r * gr->shard + j, r * gr->shard + j + b);
      gr->comm->reduce_scatter_sum(recv_.data(), send_.data(), b);
      float* dst = grad_.data() + gr->at + j;
      if (first) std::memcpy(dst, recv_.data(), size_t(b) * sizeof(float));
      else for (int64_t i = 0; i < b; ++i) dst[i] += recv_[i];
    }
    if (level_ == 2) unpack(grads.data(), *gr, nullptr, 0, gr->numel);  // the arena is scratch again
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
  for (const Group* gr : {&dense_, &experts_})
    pack(param_.data() + gr->at, *gr, params.data(), gr->begin, gr->begin + gr->shard);
}

void Zero::allgather_params(std::vector<float>& params) {
  for (const Group* gr : {&dense_, &experts_}) {
    const int ranks = gr->comm->size();
    for (int64_t j = 0; j < gr->shard; j += bucket_) {
      const int64_t b = std::min(bucket_, gr->shard - j);
      gr->comm->allgather(send_.data(), param_.data() + gr->at + j, b * int64_t(sizeof(float)));
      for (int r = 0; r < ranks; ++r)
        unpack(params.data(), *gr, send_.data() + r * b, r * gr->shard + j, r * gr->shard + j + b);
    }
  }
}

}  // namespace automoe::dist
