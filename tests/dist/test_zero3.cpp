// tests/dist/test_zero3.cpp: ZeRO-3's schedule (dist/zero3.h) on the model's block hooks, at any
// world size (tests/dist.cmake: also under mpirun -np 2 and 4): the windows reduce every tensor
// once; a forward and backward with the parameters sharded give the full model's loss bit for
// bit and the all-reduced gradients in the shards (tied embeddings too), leaving the parameter
// arena all NaN; and skipping one gather makes the loss or the gradients NaN, so the poison can
// fail a test. The trainer's ZeRO-3 against ZeRO-2 and its resume: test_zero.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "dist/data_parallel.h"
#include "dist/dist_testing.h"
#include "dist/process_group.h"
#include "dist/zero.h"
#include "dist/zero3.h"
#include "model/qwen3_moe.h"
#include "train/builtin.h"

using namespace automoe;
using namespace automoe::dist_test;

namespace {

std::vector<int> layouts() { return g_world % 2 == 0 ? std::vector<int>{1, 2} : std::vector<int>{1}; }

ModelConfig tiny(bool tied) {
  ModelConfig c = builtin_model_config("tiny-moe");
  c.tie_word_embeddings = tied;
  return c;
}

// This rank's micro-batch: random tokens, every position labelled.
Batch rank_batch(int64_t vocab, uint64_t seed) {
  Batch b{2, 16, {}, {}, {}, {}};
  Rng rng(seed + uint64_t(g_rank));
  for (int64_t i = 0; i < b.B * b.T; ++i) b.ids.push_back(int64_t(rng.next() % uint64_t(vocab)));
  b.labels = b.ids;
  return b;
}

bool all_nan(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float v) { return std::isnan(v); });
}

}  // namespace

// In one process the partition is one shard per group; the windows are the same at any world
// size (flat coordinates). Every tensor's gradient is reduced exactly once, after the backward
// of the last block that writes it: wte after the embedding's (tied: the head writes it first).
TEST(Zero3Windows, EveryGradientReducedOnceAfterItsLastWriter) {
  dist::Groups one = dist::single_process_groups();
  for (bool tied : {false, true}) {
    Qwen3Moe m(tiny(tied), &one);
    dist::Zero z(3, m.layout(), one);
    dist::Zero3 z3(m, z);
    const int64_t head = m.num_blocks() - 1;
    for (int g = 0; g < 2; ++g) {
      const dist::ZeroGroup& gr = g == 0 ? z.partition().replicated() : z.partition().experts();
      std::vector<std::pair<int64_t, int64_t>> ranges;
      for (int64_t b = 0; b < m.num_blocks(); ++b)
        for (const dist::ZeroWindow& w : z3.reduces(b))
          if (w.group == g) ranges.push_back({w.lo, w.hi});
      std::sort(ranges.begin(), ranges.end());
      int64_t next = 0;
      for (auto [lo, hi] : ranges) {
        EXPECT_EQ(lo, next) << "tied " << tied << " group " << g << ": no gap, no overlap";
        next = hi;
      }
      EXPECT_EQ(next, gr.numel) << "tied " << tied << " group " << g;
    }
    const int64_t wte = 0;  // flat [0, V*H) of the replicated group
    const int64_t vh = m.layout().find("wte").numel;
    EXPECT_TRUE(z3.reads(0, Pass::kBackward).empty()) << "the embedding's backward reads no weight";
    ASSERT_FALSE(z3.reduces(0).empty());
    EXPECT_EQ(z3.reduces(0)[0].lo, wte);
    EXPECT_EQ(z3.reduces(0)[0].hi, vh);
    auto reads_wte = [&](int64_t b) {
      for (const dist::ZeroWindow& w : z3.reads(b, Pass::kForward))
        if (w.group == 0 && w.lo == 0) return true;
      return false;
    };
    EXPECT_EQ(reads_wte(head), tied) << "the head reads wte when tied";
    for (int64_t b = 1; b < head; ++b) {  // a layer reads and reduces the same tensors
      const auto& r = z3.reads(b, Pass::kForward);
      const auto& d = z3.reduces(b);
      ASSERT_EQ(r.size(), d.size()) << "block " << b;
      for (size_t i = 0; i < r.size(); ++i)
        EXPECT_TRUE(r[i].group == d[i].group && r[i].lo == d[i].lo && r[i].hi == d[i].hi) << "block " << b;
      EXPECT_EQ(r.size(), 2u) << "a MoE layer: its replicated tensors and its experts, one window each";
    }
  }
}

// One micro-batch with the parameters sharded (many small rounds: bucket 37) against the full
// model with the gradients all-reduced.
TEST(Zero3Schedule, ShardedForwardBackwardMatchesTheFullModel) {
  for (int ep : layouts()) {
    for (bool tied : {false, true}) {
      dist::Groups g = dist::make_groups(ep);
      Qwen3Moe full(tiny(tied), &g), sharded(tiny(tied), &g);
      Rng r1(5), r2(5);
      full.init_random(r1);
      sharded.init_random(r2);
      const std::vector<float> params = full.params();
      Batch b = rank_batch(full.config().vocab_size, 11);
      const LossParts want = full.forward(b);
      full.backward();
      dist::allreduce_grads(full.grads(), full.layout(), g);

      dist::Zero z(3, sharded.layout(), g, 37);
      dist::Zero3 z3(sharded, z);
      z3.shard_params();
      EXPECT_TRUE(all_nan(sharded.params())) << "released: the shard is the truth";
      z3.begin_micro_batch(true);
      const LossParts got = sharded.forward(b);
      EXPECT_EQ(bits(got.loss), bits(want.loss)) << "ep " << ep << " tied " << tied;
      EXPECT_EQ(bits(got.aux), bits(want.aux)) << "ep " << ep << " tied " << tied;
      EXPECT_TRUE(all_nan(sharded.params())) << "every block released after the forward";
      sharded.backward();
      EXPECT_TRUE(all_nan(sharded.params())) << "every block released after the backward";
      EXPECT_TRUE(std::all_of(sharded.grads().begin(), sharded.grads().end(), [](float x) { return x == 0.f; }))
          << "every gradient reduced and its arena window zeroed";
      // the gradient shard against the all-reduced gradients cut by the same partition
      dist::Zero ref(1, full.layout(), g);
      ref.load_param_shard(full.grads());
      int64_t differ[2] = {0, int64_t(z.grad_shard().size())};
      double diff = 0, scale = 0;
      for (size_t i = 0; i < z.grad_shard().size(); ++i) {
        const float a = z.grad_shard()[i], e = ref.param_shard()[i];
        differ[0] += bits(a) != bits(e);
        diff = std::max(diff, double(std::fabs(a - e)));
        scale = std::max(scale, double(std::fabs(e)));
      }
      double rel = scale > 0 ? diff / scale : 0;
      g.world.allreduce_sum(differ, 2);
      g.world.allreduce_max(&rel, 1);
      // two ranks add a + b in either collective; more ranks may add in another order
      if (g_world <= 2) {
        EXPECT_EQ(differ[0], 0) << "ep " << ep << " tied " << tied;
      }
      EXPECT_LE(rel, 1e-6) << "ep " << ep << " tied " << tied;
      if (g_rank == 0)
        std::printf("[zero3] one micro-batch, ep %d x dp %d, %s: loss bit-identical; gradient shards %lld of %lld "
                    "elements with other bits than the all-reduce, max diff / max |grad| %.2e\n",
                    ep, g_world / ep, tied ? "tied embeddings" : "untied", (long long)differ[0],
                    (long long)differ[1], rel);
      z3.gather_all();
      EXPECT_TRUE(sharded.params() == params) << "gathered back, the shards hold the whole model";
    }
  }
}

namespace {

// Forwards every hook to ZeRO-3 except one gather: the schedule with one window missing.
class SkipOneGather final : public BlockHooks {
 public:
  SkipOneGather(dist::Zero3& z, Pass pass, int64_t block) : z_(z), pass_(pass), block_(block) {}
  void before(Pass p, int64_t b) override {
    if (p != pass_ || b != block_) z_.before(p, b);
  }
  void after(Pass p, int64_t b) override { z_.after(p, b); }

 private:
  dist::Zero3& z_;
  Pass pass_;
  int64_t block_;
};

}  // namespace

// The poison proves the schedule test can fail: a block that runs without its gather reads NaN,
// in the forward (the loss is NaN) or in the backward (the gradient norm is NaN).
TEST(Zero3Schedule, SkippingOneGatherPoisonsTheLossOrTheGradients) {
  dist::Groups g = dist::make_groups(1);
  const int64_t head = builtin_model_config("tiny-moe").num_hidden_layers + 1;
  struct Case {
    Pass pass;
    int64_t block;  // -1: skip nothing (the control)
  };
  for (Case c : {Case{Pass::kForward, -1}, Case{Pass::kForward, 0}, Case{Pass::kForward, 2},
                 Case{Pass::kForward, head}, Case{Pass::kBackward, head}, Case{Pass::kBackward, 1}}) {
    Qwen3Moe m(tiny(false), &g);
    Rng rng(5);
    m.init_random(rng);
    dist::Zero z(3, m.layout(), g);
    dist::Zero3 z3(m, z);
    z3.shard_params();
    SkipOneGather skip(z3, c.pass, c.block);
    m.set_hooks(&skip);
    z3.begin_micro_batch(true);
    const float loss = m.forward(rank_batch(m.config().vocab_size, 11)).loss;
    m.backward();
    const float norm = z.clip_grad_norm(0.f);
    const std::string what = fmt::format("{} gather of block {} skipped", c.pass == Pass::kForward ? "forward" : "backward", c.block);
    if (c.block < 0) {
      EXPECT_TRUE(std::isfinite(loss) && std::isfinite(norm)) << "the full schedule: loss " << loss << ", norm " << norm;
    } else if (c.pass == Pass::kForward) {
      EXPECT_TRUE(std::isnan(loss)) << what << ": loss " << loss;
    } else {
      EXPECT_TRUE(std::isfinite(loss)) << what;
      EXPECT_TRUE(std::isnan(norm)) << what << ": grad norm " << norm;
    }
  }
}

// The GPU's ZeRO-3 (dist/zero3_cuda.h) moves each block as one flat range per group, owner part
// by owner part; its block ranges must be the CPU schedule's windows, and the owner parts of all
// blocks must tile every rank's shard (what keep_own stores and reduce fills), at any world size
// (ranks simulated here: the partition alone needs no communication).
TEST(Zero3GpuBlocks, RangesAreTheCpuWindowsAndPartsTileTheShards) {
  dist::Groups one = dist::single_process_groups();
  {
    Qwen3Moe tied(tiny(true), &one);
    EXPECT_THROW(dist::block_tensor_ranges(tied), Error) << "tied embeddings are refused";
  }
  Qwen3Moe m(tiny(false), &one);
  const auto blocks = dist::block_tensor_ranges(m);
  ASSERT_EQ(int64_t(blocks.size()), m.num_blocks());
  dist::Zero z(3, m.layout(), one);
  dist::Zero3 z3(m, z);
  for (int64_t b = 0; b < m.num_blocks(); ++b)
    for (int g = 0; g < 2; ++g) {
      const dist::ZeroGroup& gr = g == 0 ? z.partition().replicated() : z.partition().experts();
      const auto [lo, hi] = gr.flat_range(blocks[size_t(b)].first, blocks[size_t(b)].second);
      std::pair<int64_t, int64_t> want{0, 0};
      for (const dist::ZeroWindow& w : z3.reads(b, Pass::kForward))
        if (w.group == g) want = {w.lo, w.hi};
      EXPECT_EQ(lo, want.first) << "block " << b << " group " << g;
      EXPECT_EQ(hi, want.second) << "block " << b << " group " << g;
    }
  for (int world = 1; world <= 5; ++world)
    for (int r = 0; r < world; ++r) {
      dist::ZeroPartition part(3, m.layout(), world, r, world, r);
      for (int g = 0; g < 2; ++g) {
        const dist::ZeroGroup& gr = g == 0 ? part.replicated() : part.experts();
        int64_t mine = 0;
        for (const auto& [k0, k1] : blocks) {
          const auto [lo, hi] = gr.flat_range(k0, k1);
          int64_t next = lo;
          for (const dist::ZeroOwnerPart& p : dist::owner_parts(gr, lo, hi)) {
            EXPECT_EQ(p.lo, next) << "world " << world << ": parts in order, no gap";
            EXPECT_LT(p.lo, p.hi);
            EXPECT_GE(p.lo, p.rank * gr.shard);
            EXPECT_LE(p.hi, (p.rank + 1) * gr.shard) << "a part lies in its owner's shard";
            next = p.hi;
            if (p.rank == r) mine += p.hi - p.lo;
          }
          EXPECT_EQ(next, std::min(hi, gr.numel)) << "world " << world << " group " << g;
        }
        EXPECT_EQ(mine, std::clamp(gr.numel - r * gr.shard, int64_t(0), gr.shard))
            << "world " << world << " rank " << r << " group " << g << ": its shard, once";
      }
    }
}
