// tests/dist/test_zero.cpp: ZeRO-1/2 (train.zero, dist/zero.h) under mpirun -np 2 and 4 against
// train.zero 0 on the same ranks, and ZeRO-3 (dist/zero3.h) against ZeRO-2: the bucketed
// reduce-scatter / all-gather against the gradient all-reduce, 20-step curves and final weights of
// tiny-moe in every ep x dp layout with ep <= 2, gradient accumulation, bit-identical resume with
// sharded optimizer files, and the error for a resume with another zero level or world size. Each
// prints its measured agreement ([zero] lines). ZeRO-3's schedule itself: test_zero3.cpp.
// Also the partition on its own (dist/zero_partition.h; any world size, no MPI) and the trainer's
// device branch with train.zero 1 and 3 (what the CUDA model's ZeRO-1 and ZeRO-3 plug into)
// through CPU stand-ins.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/rng.h"
#include "dist/data_parallel.h"
#include "dist/dist_testing.h"
#include "dist/process_group.h"
#include "dist/zero.h"
#include "dist/zero3.h"
#include "dist/zero_partition.h"
#include "io/safetensors.h"
#include "model/qwen3_moe.h"
#include "train/builtin.h"
#include "train/trainer.h"

using namespace automoe;
using namespace automoe::dist_test;
namespace fs = std::filesystem;

namespace {

// Layouts ep x dp of the world with ep in {1, 2}: ep 1 x dp W, and ep 2 x dp W/2.
std::vector<int> small_eps() { return g_world % 2 == 0 ? std::vector<int>{1, 2} : std::vector<int>{1}; }

// How two float sequences agree: elements with other bits, the largest relative difference of
// an element, the largest difference by the largest |reference| (parameters: some are near 0).
struct Agree {
  int64_t differ = 0, n = 0;
  double rel = 0, diff = 0, scale = 0;
  void add(float a, float b) {
    ++n;
    if (bits(a) != bits(b)) ++differ;
    scale = std::max(scale, double(std::fabs(b)));
    if (a != b) {
      diff = std::max(diff, double(std::fabs(a - b)));
      rel = std::max(rel, double(std::fabs(a - b)) / std::max(std::fabs(double(b)), 1e-30));
    }
  }
  double by_scale() const { return scale > 0 ? diff / scale : 0; }
};

// Every parameter this rank's checkpoint files hold (model.safetensors, and its EP rank's
// experts), read back from a run's last checkpoint.
std::vector<float> checkpoint_params(const std::string& run, int64_t step, int ep_rank, bool ep) {
  fs::path ck = fs::path(run) / fmt::format("checkpoints/step-{:07d}", step);
  std::vector<float> out;
  std::vector<std::string> files = {"model.safetensors"};
  if (ep) files.push_back(fmt::format("model-rank-{}.safetensors", ep_rank));
  for (auto& f : files) {
    SafetensorsFile st((ck / f).string());
    for (auto& n : st.names()) {
      Tensor t = st.load_f32(n);
      out.insert(out.end(), t.f32(), t.f32() + t.numel());
    }
  }
  return out;
}

}  // namespace

// The partition on its own: a reduce-scatter in many small buckets, then the shards all-gathered,
// gives every rank the all-reduced gradient arena; ZeRO-2 leaves the arena zeroed.
TEST(ZeroCollectives, BucketedReduceScatterAndAllGatherGiveTheAllReduce) {
  NEEDS_RANKS();
  for (int ep : small_eps()) {
    dist::Groups g = dist::make_groups(ep);
    Qwen3Moe m(builtin_model_config("tiny-moe"), &g);
    Rng rng(100 + g_rank);
    std::vector<float> grads(m.grads().size());
    for (auto& x : grads) x = float(rng.normal());
    std::vector<float> want = grads;
    dist::allreduce_grads(want, m.layout(), g);
    for (int64_t bucket : {int64_t(37), int64_t(1) << 22}) {  // many rounds (odd size), one round
      dist::Zero z(2, m.layout(), g, bucket);
      std::vector<float> arena = grads, gathered(grads.size(), -1.f);
      z.reduce_grads(arena, true);
      EXPECT_TRUE(std::all_of(arena.begin(), arena.end(), [](float x) { return x == 0.f; }))
          << "ZeRO-2 zeroes the reduced gradient arena";
      z.param_shard() = z.grad_shard();
      z.allgather_params(gathered);
      Agree a;
      for (size_t i = 0; i < want.size(); ++i) a.add(gathered[i], want[i]);
      int64_t differ[2] = {a.differ, a.n};
      double rel = a.by_scale();
      g.world.allreduce_sum(differ, 2);
      g.world.allreduce_max(&rel, 1);
      EXPECT_LE(rel, 1e-6) << "ep " << ep << " bucket " << bucket;
      if (g_rank == 0)
        std::printf("[zero] reduce-scatter vs all-reduce, ep %d x dp %d, bucket %lld: %lld of %lld elements with "
                    "other bits, max diff / max |grad| %.2e\n",
                    ep, g_world / ep, (long long)bucket, (long long)differ[0], (long long)differ[1], rel);
    }
  }
}

namespace {

// `steps` of zero `ref` and zero `level` on the same ranks: losses, grad norms and final weights.
void check_against(int ref, int ep, int level, int64_t steps, int64_t accum, int64_t rows_per_rank) {
  dist::Groups g = dist::make_groups(ep);
  std::string dir = shared_tmpdir(g.world, fmt::format("zero{}_vs{}_ep{}_acc{}", level, ref, ep, accum));
  TrainConfig c0 = tiny_recipe(dir + "/z0", steps, rows_per_rank, ep), cz = tiny_recipe(dir + "/z", steps, rows_per_rank, ep);
  c0.grad_accum = cz.grad_accum = accum;
  c0.zero = ref;
  cz.zero = level;
  auto h0 = run_finetune(c0, nullptr, &g).history;
  auto hz = run_finetune(cz, nullptr, &g).history;
  ASSERT_EQ(hz.size(), size_t(steps));
  Agree loss, norm, params;
  for (int64_t i = 0; i < steps; ++i) {
    loss.add(hz[i].loss, h0[i].loss);
    norm.add(hz[i].grad_norm, h0[i].grad_norm);
  }
  auto p0 = checkpoint_params(c0.output_dir, steps, g.ep.rank(), ep > 1),
       pz = checkpoint_params(cz.output_dir, steps, g.ep.rank(), ep > 1);
  ASSERT_EQ(p0.size(), pz.size());
  for (size_t i = 0; i < p0.size(); ++i) params.add(pz[i], p0[i]);
  EXPECT_LE(loss.rel, 1e-6) << "ep " << ep;
  EXPECT_LE(norm.rel, 1e-5) << "ep " << ep;
  EXPECT_LE(params.by_scale(), 1e-5) << "ep " << ep << ": parameters after " << steps << " steps";
  EXPECT_LT(hz.back().loss, hz.front().loss) << "the loss should fall";
  // Two ranks add two numbers, whatever the algorithm: bit-identical unless only one of the two
  // runs (ZeRO-2 and 3) sums each micro-batch over the ranks first ((a1+b1)+(a2+b2) instead of
  // (a1+a2)+(b1+b2)). On more ranks Open MPI's reduce-scatter may pick another order than its
  // all-reduce, and another one for other message sizes (docs/DISTRIBUTED.md).
  if (g_world == 2 && (accum == 1 || (level >= 2) == (ref >= 2))) {
    EXPECT_EQ(loss.differ + norm.differ + params.differ, 0) << "ep " << ep << " zero " << level << " vs " << ref;
  }
  double worst[3] = {loss.rel, norm.rel, params.by_scale()};
  int64_t differ[2] = {params.differ, params.n};
  g.world.allreduce_max(worst, 3);
  g.world.allreduce_sum(differ, 2);
  if (g_rank == 0)
    std::printf("[zero] tiny-moe ep %d x dp %d, zero %d vs zero %d, %lld steps x %lld micro-batches: loss %.5f -> %.5f; "
                "losses %lld/%lld bit-identical (max rel %.2e), grad norms %lld/%lld (max rel %.2e), final parameters "
                "%lld/%lld elements bit-identical (max diff / max |param| %.2e)\n",
                ep, g_world / ep, level, ref, (long long)steps, (long long)accum, hz.front().loss, hz.back().loss,
                (long long)(loss.n - loss.differ), (long long)loss.n, worst[0], (long long)(norm.n - norm.differ),
                (long long)norm.n, worst[1], (long long)(differ[1] - differ[0]), (long long)differ[1], worst[2]);
  g.world.barrier();
  if (g_rank == 0) fs::remove_all(dir);
}

}  // namespace

TEST(ZeroTrain, Zero2FollowsZero0For20Steps) {
  NEEDS_RANKS();
  for (int ep : small_eps()) check_against(0, ep, 2, 20, 1, 4);
}

TEST(ZeroTrain, GradientAccumulationZero1AndZero2) {  // ZeRO-1 reduces once, ZeRO-2 per micro-batch
  NEEDS_RANKS();
  check_against(0, 1, 1, 4, 2, 2);
  check_against(0, 1, 2, 4, 2, 2);
}

// ZeRO-3 moves the same sums as ZeRO-2, per block instead of per shard: every ep x dp layout,
// with and without gradient accumulation.
TEST(ZeroTrain, Zero3FollowsZero2) {
  NEEDS_RANKS();
  for (int ep : small_eps()) {
    check_against(2, ep, 3, 20, 1, 4);
    check_against(2, ep, 3, 4, 2, 2);
  }
}

namespace {

// A zero `level` run crashed after step 6 resumes from its step-4 checkpoint with the
// uninterrupted run's bits; a resume with another level or world size is refused by name.
void check_resume(int level) {
  const int ep = g_world / 2;  // -np 2: ep 1 x dp 2; -np 4: ep 2 x dp 2 (experts sharded too)
  dist::Groups g = dist::make_groups(ep);
  std::string dir = shared_tmpdir(g.world, fmt::format("zero{}_resume", level));
  TrainConfig full_cfg = tiny_recipe(dir + "/full", 10, 2, ep);
  full_cfg.zero = level;
  auto full = run_finetune(full_cfg, nullptr, &g).history;
  TrainConfig c = tiny_recipe(dir + "/run", 10, 2, ep);
  c.zero = level;
  c.checkpoint_every = 4;
  EXPECT_THROW(run_finetune(c, [](const StepMetrics& m) {
                 if (m.step == 6) throw std::runtime_error("simulated crash");  // on every rank
               }, &g),
               std::runtime_error);
  fs::path ck = fs::path(dir) / "run/checkpoints/step-0000004";
  for (int r = 0; r < g_world; ++r)
    EXPECT_TRUE(fs::exists(ck / fmt::format("optimizer-zero-{}.safetensors", r))) << "rank " << r << "'s shard";
  EXPECT_FALSE(fs::exists(ck / "optimizer.safetensors")) << "no full optimizer file with ZeRO";
  EXPECT_TRUE(fs::exists(ck / "model.safetensors"));
  if (g_rank == 0) {
    std::ifstream f(ck / "state.json");
    auto j = nlohmann::json::parse(f);
    EXPECT_EQ(j["zero"].get<int64_t>(), level);
    EXPECT_EQ(j["world_size"].get<int64_t>(), g_world);
    // the shard files together hold exactly one copy of every moment
    int64_t moments = 0;
    for (int r = 0; r < g_world; ++r) {
      SafetensorsFile s((ck / fmt::format("optimizer-zero-{}.safetensors", r)).string());
      EXPECT_EQ(s.metadata().at("zero"), std::to_string(level));
      moments += s.info("exp_avg.replicated").shape[0] + (s.has("exp_avg.experts") ? s.info("exp_avg.experts").shape[0] : 0);
    }
    const int64_t total = j["num_params"].get<int64_t>();
    EXPECT_GE(moments, total);
    EXPECT_LT(moments, total + 2 * g_world) << "padding only: fewer than `ranks` elements per group";
  }
  c.resume = true;
  auto resumed = run_finetune(c, nullptr, &g).history;
  ASSERT_EQ(resumed.size(), 6u) << "steps 5..10 run after resuming from step 4";
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(bits(resumed[i].loss), bits(full[4 + i].loss)) << "step " << resumed[i].step;
    EXPECT_EQ(bits(resumed[i].grad_norm), bits(full[4 + i].grad_norm)) << "step " << resumed[i].step;
  }
  const auto pr = checkpoint_params(c.output_dir, 10, g.ep.rank(), ep > 1),
             pf = checkpoint_params(full_cfg.output_dir, 10, g.ep.rank(), ep > 1);
  ASSERT_EQ(pr.size(), pf.size());
  EXPECT_EQ(std::memcmp(pr.data(), pf.data(), pr.size() * sizeof(float)), 0)
      << "the final parameters of the resumed run and the uninterrupted one, bit for bit";
  // another zero level: refused on every rank, naming both
  TrainConfig o = c;
  o.zero = level - 1;
  o.steps = 12;
  try {
    run_finetune(o, nullptr, &g);
    ADD_FAILURE() << "resuming a zero " << level << " checkpoint with zero " << level - 1;
  } catch (const Error& e) {
    std::string w = e.what();
    EXPECT_NE(w.find(fmt::format("written with train.zero {} on {} ranks, this run has train.zero {} on {} ranks", level,
                                 g_world, level - 1, g_world)),
              std::string::npos) << w;
  }
  // another world size: one process on its own
  if (g_rank == 0) {
    dist::Groups one = dist::single_process_groups();
    TrainConfig s = c;
    s.ep = 1;
    s.steps = 12;
    try {
      run_finetune(s, nullptr, &one);
      ADD_FAILURE() << "resuming a " << g_world << "-rank zero checkpoint in one process";
    } catch (const Error& e) {
      std::string w = e.what();
      EXPECT_NE(w.find(fmt::format("written with train.zero {} on {} ranks, this run has train.zero {} on 1 rank;", level,
                                   g_world, level)),
                std::string::npos) << w;
      EXPECT_NE(w.find(fmt::format("mpirun -np {} ... --train.zero {}", g_world, level)), std::string::npos) << w;
    }
  }
  g.world.barrier();
  if (g_rank == 0) fs::remove_all(dir);
}

}  // namespace

TEST(ZeroTrain, ResumeIsBitIdenticalAndNeedsTheSameLayout) {
  NEEDS_RANKS();
  check_resume(2);
}

// ZeRO-3 saves the full parameters (gathered at the checkpoint) and resumes from its shard.
TEST(ZeroTrain, Zero3ResumeIsBitIdenticalAndNeedsTheSameLayout) {
  NEEDS_RANKS();
  check_resume(3);
}

// The partition without MPI: for every rank of odd and even world sizes, each group's shards
// cover every element exactly once, in layout order, padding only at the end of the last shard;
// dist::Zero cuts the same shards (the GPU's DeviceZero and the checkpoints use this partition).
TEST(ZeroPartition, ShardsCoverEveryElementOnceInLayoutOrder) {
  Qwen3Moe m(builtin_model_config("tiny-moe"));
  const ParamLayout& L = m.layout();
  for (int world : {1, 2, 3, 4, 7}) {
    for (int dp : {1, world}) {
      std::vector<int> seen(size_t(L.total), 0);
      for (int r = 0; r < world; ++r) {
        dist::ZeroPartition p(1, L, world, r, dp, r % dp);
        EXPECT_EQ(p.experts().at, p.replicated_shard());
        EXPECT_EQ(p.shard_numel(), p.replicated_shard() + p.expert_shard());
        for (const dist::ZeroGroup* gr : {&p.replicated(), &p.experts()}) {
          EXPECT_GE(gr->shard * gr->ranks, gr->numel);
          EXPECT_LT(gr->shard * gr->ranks - gr->numel, gr->ranks) << "padding is less than one element per rank";
          if (gr == &p.experts() && r >= dp) continue;  // the other DP replicas hold the same experts
          int64_t next = gr->begin, last_arena = -1;
          gr->for_each_piece(gr->begin, gr->begin + gr->shard, [&](const dist::ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
            EXPECT_EQ(gr->begin + pos, next) << "pieces are contiguous in flat order";
            EXPECT_GT(s.arena + off, last_arena) << "pieces follow the layout";
            EXPECT_EQ(L.params[size_t(s.param)].offset, s.arena);
            EXPECT_EQ(L.params[size_t(s.param)].expert, gr == &p.experts());
            EXPECT_LE(off + n, s.numel);
            for (int64_t i = 0; i < n; ++i) ++seen[size_t(s.arena + off + i)];
            next += n;
            last_arena = s.arena + off + n - 1;
          });
          EXPECT_EQ(next, std::min(gr->begin + gr->shard, std::max(gr->numel, gr->begin))) << "padding has no piece";
        }
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }))
          << "world " << world << " dp " << dp << ": every element in exactly one shard";
    }
  }
  dist::Groups one = dist::single_process_groups();
  dist::Zero z(1, L, one);
  dist::ZeroPartition p(1, L, one);
  EXPECT_EQ(z.partition().shard_numel(), p.shard_numel());
  EXPECT_EQ(z.partition().replicated().segs.size(), p.replicated().segs.size());
  EXPECT_EQ(z.partition().experts().segs.size(), p.experts().segs.size());
}

namespace {

// What the CPU stand-ins of the trainer's device branch share: a host model, its ZeRO partition
// (dist::Zero), AdamW moments of this rank's flat shard, which the trainer uploads and downloads.
class ShardedCpuDevice : public DeviceTrainModel {
 public:
  ShardedCpuDevice(const ModelConfig& mc, const dist::Groups& g, int level)
      : model_(mc, &g), zero_(level, model_.layout(), g) {
    opt_.init(zero_.shard_numel());
  }
  void begin_step(const AdamWConfig&, float, float) override {}
  int64_t peak_mem_bytes() override { return 1; }

 protected:
  void take_moments(const AdamW* opt) {
    if (!opt) return;
    EXPECT_EQ(int64_t(opt->m.size()), zero_.shard_numel()) << "the trainer hands over the shard";
    opt_.m = opt->m;
    opt_.v = opt->v;
    opt_.t = opt->t;
  }
  void give_moments(AdamW* opt) const {
    if (!opt) return;
    opt->m = opt_.m;
    opt->v = opt_.v;
    opt->t = opt_.t;
  }
  // the global norm of the gradient shards, clipping, AdamW on the parameter shard
  float step_shard(const AdamWConfig& c, float lr, float max_grad_norm) {
    const float n = zero_.clip_grad_norm(max_grad_norm);
    opt_.cfg = c;
    opt_.step(zero_.param_shard(), zero_.grad_shard(), lr);
    return n;
  }

  Qwen3Moe model_;
  dist::Zero zero_;
  AdamW opt_;
};

// The trainer's device branch with train.zero 1, through a CPU stand-in that shards its AdamW
// moments as the CUDA model does (dist::Zero here, dist::DeviceZero there).
class ZeroCpuDevice final : public ShardedCpuDevice {
 public:
  ZeroCpuDevice(const ModelConfig& mc, const TrainConfig& cfg, const dist::Groups& g)
      : ShardedCpuDevice(mc, g, int(cfg.zero)) {}
  void upload(const Qwen3Moe& host, const AdamW* opt) override {
    model_.params() = host.params();
    take_moments(opt);
  }
  void download(Qwen3Moe& host, AdamW* opt) override {
    host.params() = model_.params();
    give_moments(opt);
  }
  void zero_grad() override { model_.zero_grad(); }
  LossParts forward_backward(const Batch& b, float denom, float aux_scale) override {
    LossParts lp = model_.forward(b, denom, aux_scale);
    model_.backward();
    return lp;
  }
  float clip_and_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    zero_.reduce_grads(model_.grads(), true);
    zero_.load_param_shard(model_.params());
    const float n = step_shard(c, lr, max_grad_norm);
    zero_.allgather_params(model_.params());
    return n;
  }
};

// The trainer's device branch with train.zero 3, through a CPU stand-in that keeps only shards as
// the CUDA model does (dist::Zero3's hooks on its host model here, dist::DeviceZero3's windows
// there): the weights uploaded whole and kept as this rank's shard, downloaded whole (gathered,
// a collective); micro-batches accumulate in the shard.
class Zero3CpuDevice final : public ShardedCpuDevice {
 public:
  Zero3CpuDevice(const ModelConfig& mc, const TrainConfig&, const dist::Groups& g)
      : ShardedCpuDevice(mc, g, 3) {}
  ~Zero3CpuDevice() override { z3_.reset(); }  // unhooks before the model goes
  void upload(const Qwen3Moe& host, const AdamW* opt) override {
    z3_.reset();
    model_.params() = host.params();
    z3_ = std::make_unique<dist::Zero3>(model_, zero_);
    z3_->shard_params();
    take_moments(opt);
  }
  void download(Qwen3Moe& host, AdamW* opt) override {
    z3_->gather_all();
    host.params() = model_.params();
    z3_->release_all();
    give_moments(opt);
  }
  void zero_grad() override {
    model_.zero_grad();
    first_ = true;
  }
  LossParts forward_backward(const Batch& b, float denom, float aux_scale) override {
    z3_->begin_micro_batch(first_);
    first_ = false;
    LossParts lp = model_.forward(b, denom, aux_scale);
    model_.backward();
    return lp;
  }
  float clip_and_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    return step_shard(c, lr, max_grad_norm);
  }

 private:
  bool first_ = true;
  std::unique_ptr<dist::Zero3> z3_;
};

// A CPU run at ZeRO level `level`, and the device branch through `make`'s stand-in, crashed at
// step 6 and resumed from step 4: its shard files are the CPU run's, its resumed steps too.
void device_branch_writes_cpu_shards(int level, int64_t grad_accum, DeviceModelFactory make) {
  NEEDS_RANKS();
  const int ep = g_world / 2;
  dist::Groups g = dist::make_groups(ep);
  std::string dir = shared_tmpdir(g.world, fmt::format("zero{}_device", level));
  TrainConfig cpu = tiny_recipe(dir + "/cpu", 8, 2, ep);
  cpu.zero = level;
  cpu.grad_accum = grad_accum;
  cpu.checkpoint_every = 4;
  auto hc = run_finetune(cpu, nullptr, &g).history;
  register_device_model("cuda", std::move(make));
  TrainConfig dev = tiny_recipe(dir + "/dev", 8, 2, ep);
  dev.zero = level;
  dev.grad_accum = grad_accum;
  dev.device = "cuda";
  dev.checkpoint_every = 4;
  EXPECT_THROW(run_finetune(dev, [](const StepMetrics& m) {
                 if (m.step == 6) throw std::runtime_error("simulated crash");  // on every rank
               }, &g),
               std::runtime_error);
  // the shard files of step 4 hold the CPU run's moments, bit for bit
  for (const char* key : {"exp_avg.replicated", "exp_avg_sq.replicated", "exp_avg.experts"}) {
    const std::string f = fmt::format("checkpoints/step-0000004/optimizer-zero-{}.safetensors", g_rank);
    SafetensorsFile a((fs::path(cpu.output_dir) / f).string()), b((fs::path(dev.output_dir) / f).string());
    ASSERT_EQ(a.has(key), b.has(key)) << key;
    if (!a.has(key)) continue;
    Tensor ta = a.load_f32(key), tb = b.load_f32(key);
    ASSERT_EQ(ta.numel(), tb.numel()) << key;
    EXPECT_EQ(std::memcmp(ta.f32(), tb.f32(), size_t(ta.numel()) * 4), 0) << key << " rank " << g_rank;
    EXPECT_EQ(b.metadata().at("zero"), std::to_string(level));
  }
  dev.resume = true;
  auto hd = run_finetune(dev, nullptr, &g).history;
  register_device_model("cuda", nullptr);
  ASSERT_EQ(hd.size(), 4u) << "steps 5..8 run after resuming from step 4";
  for (size_t i = 0; i < hd.size(); ++i) {
    EXPECT_EQ(bits(hd[i].loss), bits(hc[4 + i].loss)) << "step " << hd[i].step;
    EXPECT_EQ(bits(hd[i].grad_norm), bits(hc[4 + i].grad_norm)) << "step " << hd[i].step;
  }
  g.world.barrier();
  if (g_rank == 0) fs::remove_all(dir);
}

}  // namespace

TEST(ZeroTrain, DeviceBranchWritesTheCpuShardsAndResumes) {
  device_branch_writes_cpu_shards(1, 1, [](const ModelConfig& mc, const TrainConfig& cfg, const dist::Groups& gr) {
    return std::unique_ptr<DeviceTrainModel>(new ZeroCpuDevice(mc, cfg, gr));
  });
}

// ZeRO-3 (the GPU's train.zero 3 plugs in here), with two micro-batches per step
TEST(ZeroTrain, Zero3DeviceBranchWritesTheCpuShardsAndResumes) {
  device_branch_writes_cpu_shards(3, 2, [](const ModelConfig& mc, const TrainConfig& cfg, const dist::Groups& gr) {
    return std::unique_ptr<DeviceTrainModel>(new Zero3CpuDevice(mc, cfg, gr));
  });
}
