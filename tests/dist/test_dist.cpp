// tests/dist/test_dist.cpp: expert and data parallelism on the CPU backend against one process.
//
// Under `mpirun -np W` (tests/dist.cmake registers W = 2, 4 and 8; and W = 4 over TCP with
// tools/launch_local.sh): every layout ep x dp of the
// W ranks gives the logits, loss, aux loss and every gradient of one process on the same (tiled)
// Transformers fixture batch, and the loss curve of one process with W times the micro-batch
// over 20 fine-tuning steps of the built-in tiny-moe; checkpoints resume bit-identically.
// Run directly (world size 1, as ctest's per-test entries do) it checks the CLI launched with
// mpirun and with torchrun's variables (the TCP backend, tools/launch_local.sh): the forward
// contract, finetune outputs, that one failing, killed or stalled rank stops all of them, and the
// TCP rendezvous's errors.
// The end-of-run replica check (dist::check_replicas) finds one changed element.
// ZeRO (train.zero) is checked in test_zero.cpp, the collectives in test_comm.cpp, the EP
// load-balance plan and block in test_ep_balance.cpp; main() here starts the backend (MPI or
// TCP) for all of them.
#include <gtest/gtest.h>

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "dist/data_parallel.h"
#include "dist/expert_parallel.h"
#include "dist/process_group.h"
#include "io/safetensors.h"
#include "model/qwen3_moe.h"
#include "ops/ops.h"
#include "model/weights.h"
#include "train/builtin.h"
#include "train/trainer.h"
#include "dist/dist_testing.h"

using namespace automoe;
using namespace automoe::dist_test;
namespace fs = std::filesystem;

namespace {

const std::string kFix = std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/hf/";

// ---- helpers -------------------------------------------------------------------------------------

// A fixture's model and its reference batch tiled `reps` times along the rows.
struct Fx {
  std::string dir;
  ModelConfig cfg;
  Batch batch;
};

Fx load_fixture(const std::string& name, int64_t rows_multiple_of) {
  Fx f;
  f.dir = kFix + name + "/model";
  f.cfg = load_model_config(f.dir + "/config.json");
  SafetensorsFile ref(kFix + name + "/reference.safetensors");
  Tensor ids = ref.view("input_ids"), labels = ref.view("labels");
  int64_t B = ids.shape[0], reps = 1;
  while ((B * reps) % rows_multiple_of) ++reps;
  f.batch.B = B * reps;
  f.batch.T = ids.shape[1];
  for (int64_t r = 0; r < reps; ++r) {
    f.batch.ids.insert(f.batch.ids.end(), ids.i64(), ids.i64() + ids.numel());
    f.batch.labels.insert(f.batch.labels.end(), labels.i64(), labels.i64() + labels.numel());
  }
  return f;
}

Batch rows(const Batch& b, int64_t r0, int64_t n) {
  Batch out{n, b.T, {b.ids.begin() + r0 * b.T, b.ids.begin() + (r0 + n) * b.T},
            {b.labels.begin() + r0 * b.T, b.labels.begin() + (r0 + n) * b.T}, {}, {}};
  return out;
}

double max_abs(const float* a, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i])));
  return m;
}

uint64_t fnv(const float* x, int64_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = reinterpret_cast<const unsigned char*>(x);
  for (int64_t i = 0; i < n * 4; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

}  // namespace

// ---- dispatch and combine on their own ----------------------------------------------------------------

// Correctness visible in the data: token n of rank s carries s*1000 + n in every column.
TEST(EpDispatch, EachTokenReachesEachRankOnceAndComesBack) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(g_world);
  const int P = g_world, me = g.ep.rank();
  const int64_t N = 7, K = 3, H = 4, E = 2 * P;
  dist::ExpertShard sh = dist::expert_shard(E, me, P);
  std::vector<int32_t> idx(N * K);
  std::vector<float> x(N * H), w(N * K);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < K; ++j) {  // K distinct experts (K <= E), spread over the ranks
      idx[n * K + j] = int32_t((me * 5 + n * 3 + j) % E);
      w[n * K + j] = float(j + 1) / 8;
    }
    for (int64_t c = 0; c < H; ++c) x[n * H + c] = float(me * 1000 + n);
  }
  dist::EpLayout lay;
  dist::ep_layout(lay, idx.data(), N, K, sh, g.ep);
  std::vector<float> xr(lay.R * H), wr(lay.R * K);
  std::vector<int32_t> ir(lay.R * K);
  dist::ep_dispatch_fwd(xr.data(), ir.data(), wr.data(), x.data(), idx.data(), w.data(), lay, H, sh, g.ep);
  // every received row: a token with at least one pick here, its picks remapped, once per source
  int64_t here_slots = 0;
  for (int64_t r = 0; r < lay.R; ++r) {
    int src = int(xr[r * H]) / 1000;
    int64_t n = int64_t(xr[r * H]) % 1000, local = 0;
    for (int64_t j = 0; j < K; ++j) {
      int32_t e = ir[r * K + j];
      if (e >= 0) {
        ++local;
        EXPECT_LT(e, sh.count);
        EXPECT_FLOAT_EQ(wr[r * K + j], float(j + 1) / 8);
      } else {
        EXPECT_EQ(wr[r * K + j], 0.f);
      }
    }
    EXPECT_GT(local, 0) << "row from rank " << src << " token " << n << " has no expert here";
    here_slots += local;
  }
  std::vector<int64_t> per_rank(P, 0);  // picks of every rank's tokens landing on each rank
  for (int64_t i = 0; i < N * K; ++i) per_rank[idx[i] / sh.count]++;
  g.ep.allreduce_sum(per_rank.data(), P);
  EXPECT_EQ(here_slots, per_rank[me]) << "every (token, pick) on this rank's experts arrived";
  // combine: the receiver sends back (1 + its rank) * x; the sender sums over the ranks it used
  std::vector<float> yr(lay.R * H), out(N * H);
  for (int64_t i = 0; i < lay.R * H; ++i) yr[i] = xr[i] * float(1 + me);
  dist::ep_combine_fwd(out.data(), yr.data(), lay, H, g.ep);
  for (int64_t n = 0; n < N; ++n) {
    float want = 0;
    for (int d = 0; d < P; ++d) {
      bool used = false;
      for (int64_t j = 0; j < K; ++j) used |= idx[n * K + j] / sh.count == d;
      if (used) want += float(me * 1000 + n) * float(1 + d);
    }
    EXPECT_EQ(out[n * H], want) << "token " << n;
  }
  // the backward passes are the adjoints: <A x, h> summed over ranks == <x, A^T h>
  Rng rng(17 + me);
  std::vector<float> h(lay.R * H), dwr(lay.R * K), gx(N * H), gw(N * K), hy(N * H), gy(lay.R * H);
  for (auto& v : h) v = float(rng.normal());
  for (auto& v : dwr) v = float(rng.normal());
  for (auto& v : hy) v = float(rng.normal());
  for (int64_t i = 0; i < lay.R * K; ++i)
    if (ir[i] < 0) dwr[i] = 0;  // no weight gradient for a pick that is not here
  dist::ep_dispatch_bwd(gx.data(), gw.data(), h.data(), dwr.data(), lay, H, g.ep);
  dist::ep_combine_bwd(gy.data(), hy.data(), lay, H, g.ep);
  double dots[4] = {0, 0, 0, 0};  // <dispatch(x,w), (h,dwr)>, <(x,w), dispatch^T>, <combine(y), hy>, <y, combine^T>
  for (int64_t i = 0; i < lay.R * H; ++i) dots[0] += double(xr[i]) * h[i];
  for (int64_t i = 0; i < lay.R * K; ++i) dots[0] += double(wr[i]) * dwr[i];
  for (int64_t i = 0; i < N * H; ++i) dots[1] += double(x[i]) * gx[i];
  for (int64_t i = 0; i < N * K; ++i) dots[1] += double(w[i]) * gw[i];
  for (int64_t i = 0; i < N * H; ++i) dots[2] += double(out[i]) * hy[i];
  for (int64_t i = 0; i < lay.R * H; ++i) dots[3] += double(yr[i]) * gy[i];
  g.world.allreduce_sum(dots, 4);
  EXPECT_NEAR(dots[0], dots[1], 1e-6 * std::fabs(dots[0])) << "dispatch backward is its adjoint";
  EXPECT_NEAR(dots[2], dots[3], 1e-6 * std::fabs(dots[2])) << "combine backward is its adjoint";
}

// ---- one forward/backward: every layout of the world against one process --------------------------

namespace {

// Relative errors: logits by the largest |logit|; gradients three ways: the whole model's
// gradient (L2), each element by the model's largest gradient, each tensor by its own largest.
struct Errs {
  double logits = 0, loss = 0, aux = 0, grad_l2 = 0, grad_elem = 0, grad_tensor = 0;
};

// Runs `name` on the world with expert parallelism `ep`; every rank compares its share.
Errs compare_forward_backward(const std::string& name, int ep) {
  Fx f = load_fixture(name, g_world);
  const int64_t V = f.cfg.vocab_size, T = f.batch.T, Bl = f.batch.B / g_world;
  // one process, the whole batch (every rank computes it: no communication)
  Qwen3Moe ref(f.cfg);
  load_hf_weights(ref, f.dir);
  LossParts lr = ref.forward(f.batch);
  ref.zero_grad();
  ref.backward();
  // the layout under test
  dist::Groups g = dist::make_groups(ep);
  Qwen3Moe m(f.cfg, &g);
  load_hf_weights(m, f.dir);
  EXPECT_EQ(m.local_experts(), f.cfg.num_experts / ep);
  LossParts lp = m.forward(rows(f.batch, g_rank * Bl, Bl));
  m.zero_grad();
  m.backward();
  dist::allreduce_grads(m.grads(), m.layout(), g);

  Errs e;
  const float* ref_logits = ref.logits().data() + g_rank * Bl * T * V;
  double dl = 0;
  for (int64_t i = 0; i < Bl * T * V; ++i) dl = std::max(dl, double(std::fabs(m.logits()[i] - ref_logits[i])));
  e.logits = dl / max_abs(ref.logits().data(), int64_t(ref.logits().size()));
  e.loss = std::fabs(lp.loss - lr.loss) / std::fabs(lr.loss);
  EXPECT_EQ(lp.labelled, lr.labelled) << "labelled tokens of the global batch";
  EXPECT_EQ(lp.has_aux, lr.has_aux);
  if (lr.has_aux) e.aux = std::fabs(lp.aux - lr.aux) / std::fabs(lr.aux);

  // gradients (and parameters: each rank loaded the right experts) by HF name
  std::map<std::string, Tensor> want, want_p;
  for (auto& [n, t] : hf_tensors(ref, ref.grads())) want[n] = t;
  for (auto& [n, t] : hf_tensors(ref, ref.params())) want_p[n] = t;
  double num = 0, den = 0, dmax_all = 0;
  const double gmax_all = max_abs(ref.grads().data(), int64_t(ref.grads().size()));
  int64_t compared = 0;
  uint64_t dense_hash = 1469598103934665603ull;
  for (auto& [n, t] : hf_tensors(m, m.grads())) {
    const bool expert = n.find(".mlp.experts.") != std::string::npos;
    EXPECT_TRUE(want.count(n)) << n;
    if (!want.count(n)) continue;
    const Tensor& r = want[n];
    EXPECT_EQ(r.shape, t.shape) << n;
    Tensor mp = Tensor::borrow(DType::F32, t.shape, m.params().data() + (t.f32() - m.grads().data()));
    EXPECT_EQ(0, std::memcmp(mp.f32(), want_p[n].f32(), mp.nbytes())) << n << ": loaded parameters differ";
    double d2 = 0, r2 = 0, dmax = 0;
    for (int64_t i = 0; i < r.numel(); ++i) {
      double d = double(t.f32()[i]) - r.f32()[i];
      d2 += d * d;
      r2 += double(r.f32()[i]) * r.f32()[i];
      dmax = std::max(dmax, std::fabs(d));
    }
    double rmax = max_abs(r.f32(), r.numel());
    dmax_all = std::max(dmax_all, dmax);
    if (rmax == 0) EXPECT_EQ(dmax, 0) << n << " should be zero";  // an expert nobody picked
    else e.grad_tensor = std::max(e.grad_tensor, dmax / rmax);
    // the whole model's gradient once: dense tensors from world rank 0, experts from DP rank 0
    if (expert ? g.dp.rank() == 0 : g_rank == 0) {
      num += d2;
      den += r2;
    }
    if (!expert) dense_hash = fnv(t.f32(), t.numel(), dense_hash);
    ++compared;
  }
  const int64_t moe = f.cfg.num_moe_layers(), El = f.cfg.num_experts / ep;
  EXPECT_EQ(compared, int64_t(want.size()) - 3 * moe * (f.cfg.num_experts - El)) << "every tensor this rank holds";
  double nd[2] = {num, den};
  g.world.allreduce_sum(nd, 2);
  e.grad_l2 = std::sqrt(nd[0] / nd[1]);
  e.grad_elem = dmax_all / gmax_all;
  // replicated gradients are bit-identical on every rank (AdamW keeps the replicas equal)
  std::vector<uint64_t> hashes(g_world);
  g.world.allgather(hashes.data(), &dense_hash, sizeof dense_hash);
  for (int r = 0; r < g_world; ++r) EXPECT_EQ(hashes[r], hashes[0]) << "dense gradients of rank " << r;
  double worst[6] = {e.logits, e.loss, e.aux, e.grad_l2, e.grad_elem, e.grad_tensor};
  g.world.allreduce_max(worst, 6);
  return {worst[0], worst[1], worst[2], worst[3], worst[4], worst[5]};
}

void check_every_layout(const std::string& name) {
  ModelConfig c = load_model_config(kFix + name + "/model/config.json");
  for (int ep = 1; ep <= g_world; ep *= 2) {
    if (g_world % ep || c.num_experts % ep) continue;
    Errs e = compare_forward_backward(name, ep);
    if (g_rank == 0)
      std::printf("[dist] %s ep %d x dp %d: rel err logits %.2e loss %.2e aux %.2e | grads: whole model (L2) "
                  "%.2e, worst element / largest gradient %.2e, worst tensor (own scale) %.2e\n",
                  name.c_str(), ep, g_world / ep, e.logits, e.loss, e.aux, e.grad_l2, e.grad_elem, e.grad_tensor);
    // fp32 with another summation order: 1e-6 relative (an element by the largest gradient: 2e-6,
    // measured up to 8e-7 where a sum over 74 rows is split in two). Judged by its own (tiny) scale, a tensor
    // may differ more: a norm weight's gradient sums hundreds of cancelling rows serially on one
    // process, whose own rounding is up to ~1e-5 of it; a wrong or missing expert would be O(1).
    EXPECT_LE(e.logits, 1e-6) << name << " ep " << ep;
    EXPECT_LE(e.loss, 1e-6) << name << " ep " << ep;
    EXPECT_LE(e.aux, 1e-6) << name << " ep " << ep;
    EXPECT_LE(e.grad_l2, 1e-6) << name << " ep " << ep;
    EXPECT_LE(e.grad_elem, 2e-6) << name << " ep " << ep;  // measured up to 8e-7
    EXPECT_LE(e.grad_tensor, 1e-4) << name << " ep " << ep;
  }
}

}  // namespace

TEST(EpParity, TinyA_FourExperts) {
  NEEDS_RANKS();
  check_every_layout("tiny_a");
}
TEST(EpParity, TinyD_EightExperts) {
  NEEDS_RANKS();
  check_every_layout("tiny_d");
}
TEST(EpParity, TinyB_TinyC_DataParallel) {  // 5 and 7 experts: ep 1 (data parallel) only
  NEEDS_RANKS();
  check_every_layout("tiny_b");
  check_every_layout("tiny_c");
}

TEST(EpParity, FusedExpertKeysLoadTheSameShards) {
  NEEDS_RANKS();
  int ep = 4 % g_world == 0 ? g_world : 1;
  dist::Groups g = dist::make_groups(ep);
  ModelConfig c = load_model_config(kFix + "tiny_a/model/config.json");
  Qwen3Moe a(c, &g), b(c, &g);
  load_hf_weights(a, kFix + "tiny_a/model");
  load_hf_weights(b, kFix + "tiny_a/model_fused");
  EXPECT_TRUE(a.params() == b.params());
}

TEST(EpParity, ExpertsThatDoNotSplitAreAClearError) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(g_world);
  ModelConfig c = load_model_config(kFix + "tiny_c/model/config.json");  // 7 experts
  try {
    Qwen3Moe m(c, &g);
    FAIL() << "7 experts over " << g_world << " ranks";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be split evenly"), std::string::npos) << e.what();
  }
}

// ---- training: the loss curve of one process ----------------------------------------------------

namespace {

// 20 steps of tiny-moe at 4 rows per rank against one process with 4 * world rows.
void check_curve(int ep, int64_t steps, int64_t rows_per_rank) {
  dist::Groups g = dist::make_groups(ep), one = dist::single_process_groups();
  std::string dir = shared_tmpdir(g.world, "curve_ep" + std::to_string(ep));
  std::vector<float> ref(2 * steps);  // losses | grad norms
  if (g_rank == 0) {
    auto h = run_finetune(tiny_recipe(dir + "/one", steps, rows_per_rank * g_world, 1), nullptr, &one).history;
    for (int64_t i = 0; i < steps; ++i) {
      ref[i] = h[i].loss;
      ref[steps + i] = h[i].grad_norm;
    }
  }
  g.world.broadcast(ref.data(), int64_t(ref.size() * sizeof(float)), 0);
  TrainConfig c = tiny_recipe(dir + "/ep", steps, rows_per_rank, ep);
  c.export_hf = true;  // rank 0 writes it; every rank loads it back and must find its exact weights
  auto h = run_finetune(c, nullptr, &g).history;
  ASSERT_EQ(int64_t(h.size()), steps);
  double worst = 0, worst_norm = 0;
  for (int64_t i = 0; i < steps; ++i) {
    double e = std::fabs(h[i].loss - ref[i]) / std::fabs(ref[i]);
    worst = std::max(worst, e);
    worst_norm = std::max(worst_norm, double(std::fabs(h[i].grad_norm - ref[steps + i]) / ref[steps + i]));
    EXPECT_LE(e, 1e-5) << "ep " << ep << " step " << i + 1 << ": " << h[i].loss << " vs " << ref[i];
  }
  EXPECT_LT(h.back().loss, h.front().loss) << "the loss should fall";
  if (g_rank == 0)
    std::printf("[dist] tiny-moe ep %d x dp %d, %lld steps: loss %.5f -> %.5f, max rel err loss %.2e, grad norm %.2e\n",
                ep, g_world / ep, (long long)steps, h.front().loss, h.back().loss, worst, worst_norm);
  g.world.barrier();
  if (g_rank == 0) fs::remove_all(dir);
}

}  // namespace

TEST(EpTrain, LossCurveMatchesOneProcess) {
  NEEDS_RANKS();
  if (g_world == 8) GTEST_SKIP() << "the 8-rank run checks EP 8 only (Ep8)";
  for (int ep = 2; ep <= g_world; ep *= 2) check_curve(ep, 20, 4);  // EP w; with 4 ranks also EP 2 x DP 2
}

TEST(EpTrain, DataParallelOnlyMatchesOneProcess) {
  NEEDS_RANKS();
  if (g_world == 8) GTEST_SKIP() << "the 8-rank run checks EP 8 only (Ep8)";
  check_curve(1, 6, 4);
}

TEST(EpTrain, ResumeAfterInterruptionIsBitIdentical) {
  NEEDS_RANKS();
  if (g_world == 8) GTEST_SKIP() << "the 8-rank run checks EP 8 only (Ep8)";
  const int ep = g_world;
  dist::Groups g = dist::make_groups(ep);
  std::string dir = shared_tmpdir(g.world, "resume");
  auto full = run_finetune(tiny_recipe(dir + "/full", 10, 2, ep), nullptr, &g).history;
  TrainConfig c = tiny_recipe(dir + "/run", 10, 2, ep);
  c.checkpoint_every = 4;
  EXPECT_THROW(run_finetune(c, [](const StepMetrics& m) {
                 if (m.step == 6) throw std::runtime_error("simulated crash");  // on every rank
               }, &g),
               std::runtime_error);
  // each EP rank's expert shard beside the replicated parameters
  fs::path ck = fs::path(dir) / "run/checkpoints/step-0000004";
  for (int r = 0; r < ep; ++r) {
    EXPECT_TRUE(fs::exists(ck / fmt::format("model-rank-{}.safetensors", r))) << ck;
    EXPECT_TRUE(fs::exists(ck / fmt::format("optimizer-rank-{}.safetensors", r))) << ck;
  }
  if (g_rank == 0) {
    SafetensorsFile dense((ck / "model.safetensors").string()), shard((ck / "model-rank-0.safetensors").string());
    EXPECT_FALSE(dense.has("layers.0.moe.experts_gate_up"));
    EXPECT_EQ(shard.info("layers.0.moe.experts_gate_up").shape, (Shape{8 / ep, 128, 64}));
  }
  c.resume = true;
  auto resumed = run_finetune(c, nullptr, &g).history;
  ASSERT_EQ(resumed.size(), 6u) << "steps 5..10 run after resuming from step 4";
  for (size_t i = 0; i < resumed.size(); ++i)
    EXPECT_EQ(bits(resumed[i].loss), bits(full[4 + i].loss)) << "step " << resumed[i].step;
  if (g_rank == 0) {  // metrics.jsonl: one line per step, written by rank 0 alone
    std::ifstream f(fs::path(dir) / "run/metrics.jsonl");
    std::string line;
    int64_t n = 0;
    while (std::getline(f, line)) EXPECT_EQ(nlohmann::json::parse(line)["step"].get<int64_t>(), ++n);
    EXPECT_EQ(n, 10);
  }
  // a resume with another layout is refused with a reason
  if (ep > 1) {
    dist::Groups other = dist::make_groups(ep / 2);
    TrainConfig o = c;
    o.ep = ep / 2;
    o.steps = 12;
    try {
      run_finetune(o, nullptr, &other);
      ADD_FAILURE() << "resuming an EP " << ep << " checkpoint with EP " << ep / 2;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("expert parallelism"), std::string::npos) << e.what();
    }
  }
  g.world.barrier();
  if (g_rank == 0) fs::remove_all(dir);
}

// The end-of-run replica check (run_finetune calls it under mpirun): equal weights pass, one
// replicated element changed on the last rank stops every rank, an expert element only when the
// shard has DP replicas (with dp = 1 the EP ranks hold different experts by design).
TEST(Replicas, ADriftedReplicaIsFoundOnEveryRank) {
  NEEDS_RANKS();
  for (int ep = 1; ep <= g_world; ep *= 2) {
    dist::Groups g = dist::make_groups(ep);
    Qwen3Moe m(builtin_model_config("tiny-moe"), &g);
    std::vector<float>& p = m.params();
    std::fill(p.begin(), p.end(), 0.5f);
    EXPECT_NO_THROW(dist::check_replicas(p, m.layout(), g)) << "ep " << ep;
    auto drift = [&](const std::string& name) {  // +1 ulp of one element on the last rank
      std::fill(p.begin(), p.end(), 0.5f);
      if (g_rank == g_world - 1)
        p[size_t(m.layout().find(name).offset)] = std::nextafter(0.5f, 1.f);
      try {
        dist::check_replicas(p, m.layout(), g);
        return std::string();
      } catch (const Error& e) {
        return std::string(e.what());
      }
    };
    EXPECT_NE(drift("layers.1.moe.router").find("replicated parameters"), std::string::npos)
        << "ep " << ep;
    const std::string ex = drift("layers.0.moe.experts_down");
    if (g.dp_size() > 1) EXPECT_NE(ex.find("expert shards"), std::string::npos) << "ep " << ep;
    else EXPECT_EQ(ex, "") << "ep " << ep;
  }
}

TEST(Ep8, TinyMoeOneExpertPerRankFewSteps) {
  if (g_world != 8) GTEST_SKIP() << "runs under mpirun -np 8";
  dist::Groups g = dist::make_groups(8);
  Qwen3Moe m(builtin_model_config("tiny-moe"), &g);
  EXPECT_EQ(m.local_experts(), 1);
  EXPECT_EQ(m.expert_first(), g_rank);
  check_curve(8, 4, 1);
}

// ---- the CLI under mpirun (from a plain process) ------------------------------------------------

namespace {

int run(const std::string& cmd, std::string* out) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  char buf[4096];
  out->clear();
  while (size_t n = fread(buf, 1, sizeof buf, p)) out->append(buf, n);
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string cli() { return AUTOMOE_CLI; }
bool have_mpirun() { return std::system("command -v mpirun > /dev/null 2>&1") == 0; }
std::string mpirun(int np) {
  return "timeout 300 mpirun --oversubscribe --allow-run-as-root -np " + std::to_string(np) + " " + cli();
}
// np local ranks with torchrun's variables (tools/launch_local.sh): the TCP backend. `env` goes
// before the launcher (e.g. "AUTOMOE_DIST_TIMEOUT=5 "); the command follows.
std::string tcp_launch(int np, const std::string& env = "", int limit_s = 300) {
  return "timeout " + std::to_string(limit_s) + " env " + env + "AUTOMOE_THREADS=1 bash " + AUTOMOE_SOURCE_DIR +
         "/tools/launch_local.sh " + std::to_string(np) + " ";
}
std::string tcprun(int np) { return tcp_launch(np) + cli(); }
std::string tmp(const std::string& name) {
  return (fs::temp_directory_path() / ("automoe_distcli_" + std::to_string(::getpid()) + "_" + name)).string();
}

// metrics.jsonl's loss per step (rank 0 alone writes it).
std::vector<double> losses(const std::string& dir) {
  std::vector<double> v;
  std::ifstream f(dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) v.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return v;
}

// The largest relative difference of two loss curves of the same length.
double worst_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double w = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) w = std::max(w, std::fabs(a[i] - b[i]) / std::fabs(b[i]));
  return w;
}

// The forward file of a multi-rank run against one process's: outputs within 1e-6 of their
// scale, gradients within 1e-6 over the whole model and 1e-4 in the worst tensor.
void expect_forward_files_agree(const std::string& one, const std::string& many, const std::string& how) {
  SafetensorsFile a(one), b(many);
  ASSERT_EQ(a.names(), b.names()) << how;
  double num = 0, den = 0, worst = 0;
  for (auto& n : a.names()) {
    Tensor x = a.load_f32(n), y = b.load_f32(n);
    ASSERT_EQ(x.shape, y.shape) << n;
    double m = max_abs(x.f32(), x.numel()), d = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      double e = double(y.f32()[i]) - x.f32()[i];
      d = std::max(d, std::fabs(e));
      if (n.rfind("grad.", 0) == 0) {
        num += e * e;
        den += double(x.f32()[i]) * x.f32()[i];
      }
    }
    if (n.rfind("grad.", 0) != 0) EXPECT_LE(d, 1e-6 * m) << how << ": " << n;
    else if (m > 0) worst = std::max(worst, d / m);
  }
  EXPECT_LE(std::sqrt(num / den), 1e-6) << how << ": gradients, whole model";
  EXPECT_LE(worst, 1e-4) << how << ": gradients, worst tensor by its own scale";
  EXPECT_TRUE(a.has("grad.model.layers.1.mlp.experts.7.down_proj.weight"));
  std::printf("[distcli] forward %s: gradients rel. rms err %.2e, worst tensor %.2e\n", how.c_str(),
              std::sqrt(num / den), worst);
}

}  // namespace

// Under mpirun and under torchrun's variables (the TCP backend, issue 4).
TEST(DistCli, ForwardUnderMpirunAndTcpWritesTheFileOfOneProcess) {
  if (g_world != 1) GTEST_SKIP() << "starts its ranks itself";
  std::string one = tmp("one.safetensors"), two = tmp("two.safetensors"), log;
  std::string args = " forward --model " + kFix + "tiny_d/model --batch " + kFix + "tiny_d/reference.safetensors --grads --out ";
  ASSERT_EQ(run(cli() + args + one, &log), 0) << log;
  if (have_mpirun()) {
    ASSERT_EQ(run(mpirun(2) + args + two + " --ep 2", &log), 0) << log;
    expect_forward_files_agree(one, two, "mpirun -np 2, ep 2");
  }
  // as under torchrun, whose agent holds MASTER_PORT (here this process does): automoe takes the next
  const int agent = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(agent, reinterpret_cast<sockaddr*>(&a), len), 0);
  ASSERT_EQ(::listen(agent, 4), 0);
  ::getsockname(agent, reinterpret_cast<sockaddr*>(&a), &len);
  const std::string env = "MASTER_PORT=" + std::to_string(ntohs(a.sin_port)) + " TORCHELASTIC_USE_AGENT_STORE=True ";
  const int rc = run(tcp_launch(2, env) + cli() + args + two + " --ep 2", &log);
  ::close(agent);
  ASSERT_EQ(rc, 0) << log;
  expect_forward_files_agree(one, two, "TCP 2 ranks, ep 2");
  fs::remove(one);
  fs::remove(two);
}

TEST(DistCli, FinetuneUnderMpirunWritesOneRunAndExpertShards) {
  if (g_world != 1) GTEST_SKIP() << "starts mpirun itself";
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
  std::string d1 = tmp("ft1"), d2 = tmp("ft2"), log;
  std::string args = " finetune --model.builtin tiny-moe --data.builtin addition --data.examples 300 --data.seq_len 32 "
                     "--train.steps 4 --train.lr 2e-3 --train.warmup 1 --train.checkpoint_every 2 ";
  ASSERT_EQ(run(cli() + args + "--data.micro_batch 8 --output.dir " + d1, &log), 0) << log;
  ASSERT_EQ(run(mpirun(2) + args + "--data.micro_batch 4 --train.ep 2 --output.dir " + d2, &log), 0) << log;
  EXPECT_NE(log.find("2 ranks: expert parallel 2 (4 of 8 experts per rank)"), std::string::npos) << log;
  auto l1 = losses(d1), l2 = losses(d2);
  ASSERT_EQ(l1.size(), 4u);
  ASSERT_EQ(l2.size(), 4u) << "rank 0 alone writes metrics.jsonl";
  for (size_t i = 0; i < l1.size(); ++i) EXPECT_NEAR(l2[i], l1[i], 1e-5 * l1[i]) << "step " << i + 1;
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "model-rank-0.safetensors",
                        "model-rank-1.safetensors", "optimizer-rank-1.safetensors", "state.json"})
    EXPECT_TRUE(fs::exists(fs::path(d2) / "checkpoints/step-0000004" / f)) << f;
  // the export: the files of one process, every expert under its per-expert name
  SafetensorsModel h1(d1 + "/hf"), h2(d2 + "/hf");
  ASSERT_EQ(h1.names(), h2.names());
  double worst = 0;
  for (auto& n : h1.names()) {
    Tensor x = h1.load_f32(n), y = h2.load_f32(n);
    for (int64_t i = 0; i < x.numel(); ++i) worst = std::max(worst, double(std::fabs(x.f32()[i] - y.f32()[i])));
  }
  EXPECT_LE(worst, 1e-5) << "exported weights after 4 steps";
  EXPECT_TRUE(h2.has("model.layers.1.mlp.experts.7.gate_proj.weight"));
  fs::remove_all(d1);
  fs::remove_all(d2);
}

// torchrun's variables (the TCP backend) against mpirun and one process: 2 ranks (ep 2) and 4
// ranks (ep 2 x dp 2), one process's 8 rows split over the ranks.
TEST(DistCli, FinetuneOverTcpMatchesMpirunAndOneProcess) {
  if (g_world != 1) GTEST_SKIP() << "starts its ranks itself";
  const std::string args = " finetune --model.builtin tiny-moe --data.builtin addition --data.examples 300 "
                           "--data.seq_len 32 --train.steps 4 --train.lr 2e-3 --train.warmup 1 "
                           "--train.checkpoint_every 0 --output.dir ";
  std::string log, d1 = tmp("tcp_ft_one");
  ASSERT_EQ(run(cli() + args + d1 + " --data.micro_batch 8", &log), 0) << log;
  const std::vector<double> one = losses(d1);
  ASSERT_EQ(one.size(), 4u);
  fs::remove_all(d1);
  for (int np : {2, 4}) {
    const std::string dt = tmp("tcp_ft_tcp"), dm = tmp("tcp_ft_mpi");
    const std::string layout = " --train.ep 2 --data.micro_batch " + std::to_string(8 / np);
    ASSERT_EQ(run(tcprun(np) + args + dt + layout, &log), 0) << log;
    if (np == 2) {
      EXPECT_NE(log.find("2 ranks: expert parallel 2 (4 of 8 experts per rank)"), std::string::npos) << log;
    }
    const std::vector<double> tcp = losses(dt);
    ASSERT_EQ(tcp.size(), 4u) << "rank 0 alone writes metrics.jsonl\n" << log;
    for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(tcp[i], one[i], 1e-5 * one[i]) << np << " ranks, step " << i + 1;
    double vs_mpi = -1;
    if (have_mpirun()) {
      ASSERT_EQ(run(mpirun(np) + args + dm + layout, &log), 0) << log;
      const std::vector<double> mpi = losses(dm);
      ASSERT_EQ(mpi.size(), 4u);
      for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(tcp[i], mpi[i], 1e-5 * mpi[i]) << np << " ranks, step " << i + 1;
      vs_mpi = worst_rel(tcp, mpi);
    }
    std::printf("[distcli] finetune over TCP, %d ranks: losses %.6f .. %.6f, max rel diff %.2e vs one process, %.2e vs mpirun\n",
                np, tcp.front(), tcp.back(), worst_rel(tcp, one), vs_mpi);
    fs::remove_all(dt);
    fs::remove_all(dm);
  }
}

TEST(DistCli, ARankThatFailsEndsEveryRank) {
  if (g_world != 1) GTEST_SKIP() << "starts mpirun itself";
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
  // Row 1 (rank 1's) holds an id outside tiny_a's vocabulary: rank 1 throws before its first
  // collective while rank 0 runs on into the MoE dispatch and waits there.
  std::string batch = tmp("bad.safetensors"), log;
  Tensor ids = Tensor::zeros(DType::I64, {2, 8});
  ids.i64()[8 + 3] = 100000;
  save_safetensors(batch, {{"input_ids", ids}, {"labels", ids}});
  int rc = run(mpirun(2) + " forward --model " + kFix + "tiny_a/model --batch " + batch + " --out " + tmp("x") + " --ep 2", &log);
  EXPECT_NE(rc, 0) << log;
  EXPECT_NE(rc, 124) << "timed out: a rank hung\n" << log;
  EXPECT_NE(log.find("automoe: error (rank 1 of 2): input id 100000"), std::string::npos) << log;
  fs::remove(batch);
}

namespace {

// bench/kill_rank.sh around every rank: rank 1 gets the signal after 3 s.
std::string kill_wrap() { return "bash " + std::string(AUTOMOE_SOURCE_DIR) + "/bench/kill_rank.sh 1 3 "; }

// A fine-tune (ep 2) that would run for hours, started by `launch` (the launcher and the wrap, up
// to the CLI): its exit status, its output and how long it ran.
struct Drill {
  int rc = 0;
  std::string log;
  double secs = 0;
};
Drill long_finetune(const std::string& launch, const std::string& dir) {
  Drill d;
  const auto t0 = std::chrono::steady_clock::now();
  d.rc = run(launch + cli() + " finetune --model.builtin tiny-moe --data.builtin addition --train.ep 2 "
                              "--train.steps 1000000 --train.checkpoint_every 0 --output.dir " + dir,
             &d.log);
  d.secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fs::remove_all(dir);
  return d;
}

// The pid kill_rank.sh printed for the rank it signalled ("(pid N)"), or -1.
long signalled_pid(const std::string& log) {
  const size_t at = log.find("(pid ");
  return at == std::string::npos ? -1 : std::atol(log.c_str() + at + 5);
}

// A stopped rank must not outlive its test: SIGCONT then SIGKILL if it is still there.
void reap_stopped(long pid) {
  if (pid <= 0) return;
  std::string comm;
  std::ifstream(fmt::format("/proc/{}/comm", pid)) >> comm;
  if (comm.rfind("automoe", 0) != 0) return;  // gone (or the pid was reused)
  ::kill(pid_t(pid), SIGCONT);
  ::kill(pid_t(pid), SIGKILL);
}

}  // namespace

TEST(DistCli, AKilledRankEndsTheJob) {
  if (g_world != 1) GTEST_SKIP() << "starts mpirun itself";
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
  // Rank 1 of a long fine-tune gets SIGKILL after 3 s (bench/kill_rank.sh: a crash, no
  // MPI_Finalize) while rank 0 computes or waits in a collective: the job must end non-zero,
  // and soon, not hang until the timeout (124).
  const Drill d = long_finetune("timeout 120 mpirun --oversubscribe --allow-run-as-root -np 2 " + kill_wrap(), tmp("killed"));
  EXPECT_NE(d.rc, 0) << d.log;
  EXPECT_NE(d.rc, 124) << "timed out: rank 0 hung after rank 1 died\n" << d.log;
  EXPECT_NE(d.log.find("SIGKILL to rank 1"), std::string::npos) << d.log;
  EXPECT_LT(d.secs, 60.0) << d.log;
}

// Rank 1 of a TCP job gets SIGKILL after 3 s. The launcher is told not to stop rank 0 (as if it
// did not notice): rank 0's backend must see the closed connection and end at once, naming it.
TEST(DistCli, AKilledRankEndsTheTcpJob) {
  if (g_world != 1) GTEST_SKIP() << "starts its ranks itself";
  const Drill d = long_finetune(tcp_launch(2, "LAUNCH_LOCAL_KEEP=1 ", 120) + kill_wrap(), tmp("tcp_killed"));
  EXPECT_NE(d.rc, 0) << d.log;
  EXPECT_NE(d.rc, 124) << "timed out: rank 0 hung after rank 1 died\n" << d.log;
  EXPECT_NE(d.log.find("SIGKILL to rank 1"), std::string::npos) << d.log;
  EXPECT_NE(d.log.find("automoe: error (rank 0 of 2): rank 1 closed its connection during TCP"), std::string::npos) << d.log;
  EXPECT_LT(d.secs, 30.0) << d.log;
  std::printf("[distcli] TCP job with rank 1 killed at 3 s ended after %.1f s (exit %d)\n", d.secs, d.rc);
}

// Rank 1 stops (SIGSTOP) after 3 s and stays stopped: rank 0 waits in a collective and must end
// the job on AUTOMOE_DIST_TIMEOUT (5 s here), naming the collective, under TCP and under mpirun.
TEST(DistCli, AStalledRankEndsTheJobOnTheTimeout) {
  if (g_world != 1) GTEST_SKIP() << "starts its ranks itself";
  struct Launch {
    const char* name;
    std::string launch;
    const char* message;
  };
  std::vector<Launch> launches = {{"TCP", tcp_launch(2, "AUTOMOE_DIST_TIMEOUT=5 KILL_RANK_SIGNAL=STOP ", 120) + kill_wrap(),
                                   "waited 5 s with no data moving, for rank(s) 1"}};
  if (have_mpirun())
    launches.push_back({"mpirun",
                        "env AUTOMOE_DIST_TIMEOUT=5 KILL_RANK_SIGNAL=STOP AUTOMOE_THREADS=1 timeout 120 mpirun "
                        "--oversubscribe --allow-run-as-root -x AUTOMOE_DIST_TIMEOUT -x KILL_RANK_SIGNAL -np 2 " +
                            kill_wrap(),
                        "did not complete within 5 s"});
  for (const Launch& l : launches) {
    const Drill d = long_finetune(l.launch, tmp("stalled"));
    reap_stopped(signalled_pid(d.log));
    EXPECT_NE(d.rc, 0) << l.name << "\n" << d.log;
    EXPECT_NE(d.rc, 124) << l.name << ": timed out: the job hung on a stalled rank\n" << d.log;
    EXPECT_NE(d.log.find("SIGSTOP to rank 1"), std::string::npos) << l.name << "\n" << d.log;
    EXPECT_NE(d.log.find(l.message), std::string::npos) << l.name << "\n" << d.log;
    EXPECT_NE(d.log.find("raise AUTOMOE_DIST_TIMEOUT"), std::string::npos) << l.name << "\n" << d.log;
    EXPECT_LT(d.secs, 40.0) << l.name << "\n" << d.log;
    std::printf("[distcli] %s job with rank 1 stopped at 3 s, timeout 5 s, ended after %.1f s (exit %d)\n", l.name,
                d.secs, d.rc);
  }
}

// The TCP rendezvous refuses what cannot work, with a sentence: srun without MASTER_ADDR, and
// ranks that disagree on the world size (both of them say so, at once).
TEST(DistCli, TcpRendezvousErrorsAreClear) {
  if (g_world != 1) GTEST_SKIP() << "starts its ranks itself";
  std::string log;
  const std::string fwd = " forward --model " + kFix + "tiny_d/model --batch " + kFix +
                          "tiny_d/reference.safetensors --out " + tmp("rdv.safetensors");
  EXPECT_NE(run("env -u MASTER_ADDR -u RANK -u WORLD_SIZE SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=2 " + cli() + fwd, &log), 0);
  EXPECT_NE(log.find("export MASTER_ADDR=$(scontrol show hostnames"), std::string::npos) << log;
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(20000 + ::getpid() % 12000) +
                          " AUTOMOE_DIST_TIMEOUT=30 ";
  EXPECT_NE(run("timeout 60 bash -c 'env " + env + "RANK=0 WORLD_SIZE=2 " + cli() + fwd + " & env " + env +
                    "RANK=1 WORLD_SIZE=3 " + cli() + fwd + "; r=$?; wait $! && exit $r; exit 1'",
                &log),
            0);
  EXPECT_NE(log.find("automoe: error: rank 1 was started as one of 3 processes, but rank 0 as one of 2"),
            std::string::npos) << log;
  EXPECT_NE(log.find("automoe: error: this rank was started as one of 3 processes, but rank 0 as one of 2"),
            std::string::npos) << log;
}

TEST(DistCli, LayoutsThatDoNotFitAreClearErrors) {
  if (g_world != 1) GTEST_SKIP() << "starts mpirun itself";
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
  std::string log;
  EXPECT_NE(run(mpirun(2) + " forward --model " + kFix + "tiny_b/model --batch " + kFix +
                    "tiny_b/reference.safetensors --out " + tmp("x") + " --ep 2", &log), 0);
  EXPECT_NE(log.find("5 experts per MoE layer, which cannot be split evenly over 2"), std::string::npos) << log;
  EXPECT_NE(run(mpirun(2) + " forward --model " + kFix + "tiny_c/model --batch " + kFix +
                    "tiny_c/reference.safetensors --out " + tmp("x"), &log), 0);
  EXPECT_NE(log.find("has 3 rows, which cannot be split evenly over 2 ranks"), std::string::npos) << log;
  EXPECT_NE(run(mpirun(3) + " finetune --model.builtin tiny-moe --data.builtin addition --train.ep 2", &log), 0);
  EXPECT_NE(log.find("expert parallelism 2 needs a multiple of 2 ranks, but this job has 3"), std::string::npos) << log;
  EXPECT_NE(run(cli() + " finetune --model.builtin tiny-moe --data.builtin addition --train.ep 2", &log), 0);
  EXPECT_NE(log.find("but this job has 1"), std::string::npos) << log;
}

// The backend starts (under mpirun or launch_local.sh) before the tests and ends after them. With
// several ranks an exception escaping a test would leave the others waiting in a collective: it
// stops every rank instead.
int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  cpu::set_num_threads_from_env();  // one thread per rank unless AUTOMOE_THREADS says otherwise
  dist::init();
  dist::Groups world = dist::make_groups(1);
  g_world = world.world.size();
  g_rank = world.world.rank();
  if (g_world > 1) {
    GTEST_FLAG_SET(catch_exceptions, false);
    std::set_terminate([] {
      std::string what = "uncaught exception";
      try {
        if (auto e = std::current_exception()) std::rethrow_exception(e);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      dist::abort_all("test: " + what);
    });
  }
  int rc = RUN_ALL_TESTS();
  int64_t worst = rc;
  world.world.allreduce_max(&worst, 1);  // every rank reports a failure anywhere
  world = dist::Groups{};
  dist::finalize();
  return int(worst);
}
