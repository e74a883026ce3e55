// tests/dist/test_ep_balance.cpp: moving expert work to the less loaded EP ranks (dist/ep_balance.h).
// The plan on its own (any world size): a worked example, and on skewed counts the invariants
// every rank relies on. Under mpirun (tests/dist.cmake: 2 and 4 ranks, and 4 over TCP): the CPU
// expert block with the plan on gives the block without it (outputs, input and routing-weight
// gradients, every expert weight gradient) within fp32 rounding, on routing skewed so that the
// plan moves work; and the CPU model (train.ep_balance) gives the same loss and gradients.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rng.h"
#include "dist/dist_testing.h"
#include "dist/ep_balance.h"
#include "dist/expert_parallel.h"
#include "dist/process_group.h"
#include "model/qwen3_moe.h"
#include "train/builtin.h"

using namespace automoe;
using namespace automoe::dist_test;

namespace {

// The invariants of a plan for counts[P*E]: loads are the hosted units' sums, moved units sit at
// helpers that list their expert as borrowed (sorted, at most max_borrowed), and local indices
// cover each rank's own experts then its borrowed ones.
void expect_consistent(const dist::EpBalance& b, const std::vector<int64_t>& counts,
                       int max_borrowed) {
  const int P = b.P;
  const int64_t E = b.E;
  std::vector<int64_t> load(static_cast<size_t>(P), 0);
  std::vector<std::vector<int32_t>> hosted(static_cast<size_t>(P));  // experts a rank runs but does not own
  for (int64_t e = 0; e < E; ++e)
    for (int s = 0; s < P; ++s) {
      const int h = b.host[size_t(e * P + s)];
      ASSERT_GE(h, 0);
      ASSERT_LT(h, P);
      load[size_t(h)] += counts[size_t(s * E + e)];
      if (h != b.owner(e) && (hosted[size_t(h)].empty() || hosted[size_t(h)].back() != e))
        hosted[size_t(h)].push_back(int32_t(e));
    }
  EXPECT_EQ(load, b.load);
  for (int d = 0; d < P; ++d) {
    EXPECT_EQ(b.borrowed[size_t(d)], hosted[size_t(d)]) << "rank " << d;
    EXPECT_LE(int(b.borrowed[size_t(d)].size()), max_borrowed);
    for (int64_t e = 0; e < E; ++e) {
      const int32_t li = b.local_index(d, e);
      if (b.owner(e) == d) {
        EXPECT_EQ(li, e - d * b.El);
      } else {
        const auto& bd = b.borrowed[size_t(d)];
        const auto it = std::find(bd.begin(), bd.end(), int32_t(e));
        EXPECT_EQ(li, it == bd.end() ? -1 : int32_t(b.El + (it - bd.begin())));
      }
    }
  }
}

double max_over_mean(const std::vector<int64_t>& load) {
  int64_t total = 0, most = 0;
  for (int64_t l : load) {
    total += l;
    most = std::max(most, l);
  }
  return total ? double(most) * double(load.size()) / double(total) : 1.0;
}

}  // namespace

TEST(EpBalancePlan, AWorkedExample) {
  // 2 ranks, 4 experts: rank 0 owns experts 0, 1 and runs 300 picks; rank 1 owns 2, 3 and 40.
  // Moves, by the rule (nearest half the gap, smaller than it; lower e, then lower s): (0, 0)
  // to rank 1 (200 / 140), (1, 0) to rank 1 (150 / 190), then rank 1 is the busiest: (2, 0)
  // (160 / 180) and (2, 1) (170 / 170) to rank 0.
  const std::vector<int64_t> counts = {100, 50, 10, 10,   // routed by rank 0
                                       100, 50, 10, 10};  // routed by rank 1
  const dist::EpBalance b = dist::ep_balance_plan(counts.data(), 2, 4, 0.05, 8);
  EXPECT_TRUE(b.moved());
  EXPECT_EQ(b.host, (std::vector<int32_t>{1, 0, 1, 0, 0, 0, 1, 1}));  // [e*P + s]
  EXPECT_EQ(b.load, (std::vector<int64_t>{170, 170}));
  EXPECT_EQ(b.borrowed[0], (std::vector<int32_t>{2}));
  EXPECT_EQ(b.borrowed[1], (std::vector<int32_t>{0, 1}));
  expect_consistent(b, counts, 8);
}

TEST(EpBalancePlan, BalancedCountsMoveNothing) {
  const std::vector<int64_t> counts(size_t(4 * 16), 37);
  const dist::EpBalance b = dist::ep_balance_plan(counts.data(), 4, 16, 0.0, 8);
  EXPECT_FALSE(b.moved());
  EXPECT_EQ(b.load, (std::vector<int64_t>(4, 16 / 4 * 4 * 37)));
}

TEST(EpBalancePlan, SkewedCountsGetCloserToTheMeanWithinTheLimits) {
  for (int P : {2, 3, 4, 8}) {
    const int64_t E = 8 * P;
    for (int max_borrowed : {1, 2, 8}) {
      Rng rng(uint64_t(P * 100 + max_borrowed));
      std::vector<int64_t> counts(size_t(P * E));
      for (int s = 0; s < P; ++s)
        for (int64_t e = 0; e < E; ++e)  // rank 0's experts 3x as popular
          counts[size_t(s * E + e)] = int64_t(rng.uniform() * 200) * (e < E / P ? 3 : 1);
      const dist::EpBalance none = dist::ep_balance_none(counts.data(), P, E);
      const dist::EpBalance b = dist::ep_balance_plan(counts.data(), P, E, 0.05, max_borrowed);
      SCOPED_TRACE("P " + std::to_string(P) + ", max_borrowed " + std::to_string(max_borrowed));
      expect_consistent(b, counts, max_borrowed);
      EXPECT_TRUE(b.moved());
      EXPECT_LT(max_over_mean(b.load), max_over_mean(none.load));
      if (max_borrowed == 8) {
        EXPECT_LE(max_over_mean(b.load), 1.05 + 1e-9);
      }
      // the same counts, the same plan (every rank computes it on its own)
      const dist::EpBalance again = dist::ep_balance_plan(counts.data(), P, E, 0.05, max_borrowed);
      EXPECT_EQ(again.host, b.host);
    }
  }
}

TEST(EpBalance, BlockWithMovedWorkMatchesTheBlockWithout) {
  NEEDS_RANKS();
  const dist::Groups g = dist::make_groups(g_world);
  const int P = g.ep.size(), me = g.ep.rank();
  const int64_t El = 3, E = El * P, K = 2, N = 24, H = 16, I = 8;
  const dist::ExpertShard sh = dist::expert_shard(E, me, P);
  Rng rng(uint64_t(1000 + me));
  auto fill = [&](std::vector<float>& v, double scale) {
    for (float& x : v) x = float(rng.normal() * scale);
  };
  std::vector<float> x(size_t(N * H)), w_gu(size_t(El * 2 * I * H)), w_down(size_t(El * H * I)),
      dout(size_t(N * H)), topk_w(size_t(N * K));
  fill(x, 1.0);
  fill(w_gu, 0.3);
  fill(w_down, 0.3);
  fill(dout, 1.0);
  std::vector<int32_t> idx(size_t(N * K));
  for (int64_t n = 0; n < N; ++n) {  // 3 of 4 tokens pick rank 0's experts: the plan must move
    const bool hot = n % 4 != 3;
    const int64_t a = hot ? int64_t(rng.uniform() * El) : int64_t(rng.uniform() * E);
    int64_t b = hot ? int64_t(rng.uniform() * E) : int64_t(rng.uniform() * E);
    if (b == a) b = (a + 1) % E;
    idx[size_t(n * K)] = int32_t(a);
    idx[size_t(n * K + 1)] = int32_t(b);
    topk_w[size_t(n * K)] = float(0.3 + rng.uniform() * 0.4);
    topk_w[size_t(n * K + 1)] = 1.f - topk_w[size_t(n * K)];
  }
  struct Run {
    std::vector<float> out, dx, dw, g_gu, g_down;
    dist::EpMoeActs a;
  };
  auto run = [&](bool on) {
    Run r;
    r.out.resize(size_t(N * H));
    r.dx.resize(size_t(N * H));
    r.dw.resize(size_t(N * K));
    r.g_gu.assign(w_gu.size(), 0.25f);  // gradients accumulate (+=) onto what is there
    r.g_down.assign(w_down.size(), -0.5f);
    dist::EpBalanceOptions opt;
    opt.on = on;
    opt.tol = 0.0;
    dist::ep_moe_fwd(r.out.data(), r.a, x.data(), idx.data(), topk_w.data(), w_gu.data(),
                     w_down.data(), N, H, I, K, sh, g.ep, opt);
    dist::ep_moe_bwd(r.dx.data(), r.dw.data(), r.g_gu.data(), r.g_down.data(), dout.data(), r.a,
                     w_gu.data(), w_down.data(), H, I, sh, g.ep);
    return r;
  };
  const Run off = run(false), on = run(true);
  EXPECT_FALSE(off.a.bal.moved());
  ASSERT_TRUE(on.a.bal.moved()) << "the skewed routing should have moved work";
  int64_t most = 0, total = 0;
  for (int64_t l : on.a.bal.load) {
    most = std::max(most, l);
    total += l;
  }
  std::vector<int64_t> runs{on.a.offsets[size_t(on.a.Er)]};  // the picks this rank ran
  g.ep.allreduce_max(runs.data(), 1);
  EXPECT_EQ(runs[0], most) << "the busiest rank runs the plan's largest load";
  EXPECT_LT(double(most) * P, 1.5 * double(total)) << "the plan balanced the skew";
  auto expect_close = [&](const std::vector<float>& want, const std::vector<float>& got,
                          const char* what) {
    ASSERT_EQ(want.size(), got.size()) << what;
    double scale = 0;
    for (float v : want) scale = std::max(scale, double(std::fabs(v)));
    for (size_t i = 0; i < want.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-5 * std::max(scale, 1.0)) << what << " [" << i << "]";
  };
  expect_close(off.out, on.out, "out");
  expect_close(off.dx, on.dx, "dx");
  expect_close(off.dw, on.dw, "dtopk_w");
  expect_close(off.g_gu, on.g_gu, "g_gu");
  expect_close(off.g_down, on.g_down, "g_down");
}

TEST(EpBalance, ModelLossAndGradientsMatchWithoutIt) {
  NEEDS_RANKS();
  const ModelConfig mc = builtin_model_config("tiny-moe");
  if (mc.num_experts % g_world) GTEST_SKIP() << mc.num_experts << " experts over " << g_world;
  const dist::Groups g = dist::make_groups(g_world);
  Qwen3Moe m(mc, &g);
  Rng init(7);
  m.init_random(init, 0.2f);  // a wide init: the router's picks spread unevenly
  Batch b;
  b.B = 2;
  b.T = 24;
  Rng rng(uint64_t(31 + g_rank));
  for (int64_t i = 0; i < b.B * b.T; ++i) b.ids.push_back(int64_t(rng.uniform() * 15));
  b.labels = b.ids;
  auto step = [&](bool on) {
    m.set_ep_balance(on, 0.0, 8);
    m.zero_grad();
    const float loss = m.forward(b).loss;
    m.backward();
    return std::make_pair(loss, m.grads());
  };
  const auto [loss0, g0] = step(false);
  EXPECT_EQ(m.ep_balance_moves(), 0);
  const auto [loss1, g1] = step(true);
  ASSERT_GT(m.ep_balance_moves(), 0) << "the plan moved no work in either MoE layer";
  EXPECT_NEAR(loss1, loss0, 1e-6 * std::fabs(loss0));
  ASSERT_EQ(g0.size(), g1.size());
  double scale = 0;
  for (float v : g0) scale = std::max(scale, double(std::fabs(v)));
  for (size_t i = 0; i < g0.size(); ++i)
    ASSERT_NEAR(g1[i], g0[i], 1e-5 * scale) << "gradient element " << i;
}
