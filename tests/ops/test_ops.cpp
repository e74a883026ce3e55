// tests/ops/test_ops.cpp: every CPU op of ops/ops.h.
//   OpGrad.<case>   gradient mode of the harness (op_harness.h) on each case of op_cases.cpp;
//   OpExact.<case>  ops without a backward, against plain reimplementations: moe_layout
//                   (counts, offsets, stable order), adamw_step (torch.optim.AdamW in double
//                   for 3 steps), sum_squares, scale_inplace. Guard zones around every output.
//                   And attention split in two halves (attention_fwd over the first T0
//                   positions, attention_tail_fwd for the rest) against the unsplit attention.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>

#include "op_harness.h"
#include "ops/ops.h"

using namespace automoe;
using namespace automoe::optest;

namespace {

// ---- OpGrad: one GoogleTest per registered case ------------------------------------------
class OpGradTest : public ::testing::Test {
 public:
  explicit OpGradTest(const OpCase* c) : c_(c) {}
  void TestBody() override {
    for (const auto& f : run_grad_case(*c_)) ADD_FAILURE() << f;
  }

 private:
  const OpCase* c_;
};

[[maybe_unused]] const bool kRegistered = [] {
  cpu::set_num_threads_from_env();  // AUTOMOE_THREADS, default 1
  for (const OpCase& c : grad_cases())
    ::testing::RegisterTest("OpGrad", c.name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
                            [&c]() -> OpGradTest* { return new OpGradTest(&c); });
  return true;
}();

}  // namespace

TEST(OpRegistry, NamesAreUniqueAndEveryOpIsCovered) {
  std::set<std::string> names;
  for (const OpCase& c : grad_cases()) EXPECT_TRUE(names.insert(c.name).second) << c.name;
  for (const char* op :
       {"embedding_", "rmsnorm_", "rmsnorm_qk_", "linear_", "rope_", "attention_", "router_",
        "permute_", "unpermute_", "grouped_linear_", "swiglu_", "cross_entropy_", "aux_loss_",
        "attention_tail_"}) {
    bool found = false;
    for (const auto& n : names) found |= n.rfind(op, 0) == 0;
    EXPECT_TRUE(found) << "no gradient case for " << op;
  }
}

// ---- moe_layout ------------------------------------------------------------------------------
namespace {

void check_layout(const std::vector<int32_t>& topk, int64_t N, int64_t E, int64_t K) {
  ASSERT_EQ(int64_t(topk.size()), N * K);
  const Layout ref = ref_layout(topk, E);
  Guarded<int32_t> offsets(E + 1), slot_row(N * K);
  offsets.fill(-7);
  slot_row.fill(-7);
  cpu::moe_layout(offsets.data(), slot_row.data(), topk.data(), N, E, K);
  EXPECT_TRUE(offsets.guards_ok()) << "moe_layout wrote outside offsets[E+1]";
  EXPECT_TRUE(slot_row.guards_ok()) << "moe_layout wrote outside slot_row[N*K]";
  // counts and offsets
  EXPECT_EQ(offsets.vec(), ref.offsets);
  std::vector<int32_t> count(static_cast<size_t>(E), 0);
  for (int32_t e : topk) count[size_t(e)]++;
  for (int64_t e = 0; e < E; ++e)
    EXPECT_EQ(offsets[e + 1] - offsets[e], count[size_t(e)]) << "tokens of expert " << e;
  // slot_row: a permutation of [0, N*K), each slot inside its expert's block, stable order
  EXPECT_EQ(slot_row.vec(), ref.slot_row);
  std::vector<int> seen(size_t(N * K), 0);
  for (int64_t i = 0; i < N * K; ++i) {
    const int32_t r = slot_row[i], e = topk[size_t(i)];
    ASSERT_TRUE(r >= 0 && r < N * K) << "slot " << i << " -> row " << r;
    EXPECT_EQ(seen[size_t(r)]++, 0) << "row " << r << " used twice";
    EXPECT_TRUE(r >= offsets[e] && r < offsets[e + 1]) << "slot " << i << " outside expert " << e;
  }
  for (int64_t i = 0; i < N * K; ++i)
    for (int64_t j = i + 1; j < N * K; ++j)
      if (topk[size_t(i)] == topk[size_t(j)]) {
        EXPECT_LT(slot_row[i], slot_row[j]) << "slots " << i << " and " << j << " out of order";
      }
}

}  // namespace

TEST(OpExact, moe_layout_13x7_k3) {
  Rng r(1);
  check_layout(random_topk(r, 13, 3, iota32(7)), 13, 7, 3);
}

TEST(OpExact, moe_layout_11x7_k2_empty_experts) {  // experts 0, 2, 5, 6 get no tokens
  Rng r(2);
  check_layout(random_topk(r, 11, 2, {1, 3, 4}), 11, 7, 2);
}

TEST(OpExact, moe_layout_13x7_k1_one_expert) {  // every token to expert 4
  check_layout(std::vector<int32_t>(13, 4), 13, 7, 1);
}

TEST(OpExact, moe_layout_5x7_k3_one_expert_every_token) {  // expert 2 in every token, any slot
  Rng r(3);
  std::vector<int32_t> topk = random_topk(r, 5, 2, {0, 1, 3, 4, 5, 6});
  std::vector<int32_t> idx;
  for (int64_t n = 0; n < 5; ++n) {
    std::vector<int32_t> row = {topk[size_t(2 * n)], topk[size_t(2 * n + 1)]};
    row.insert(row.begin() + n % 3, 2);
    idx.insert(idx.end(), row.begin(), row.end());
  }
  check_layout(idx, 5, 7, 3);
}

TEST(OpExact, moe_layout_0x7_k2_no_tokens) { check_layout({}, 0, 7, 2); }

// ---- adamw_step: torch.optim.AdamW (single tensor, non-fused), reimplemented in double -------
namespace {

void check_adamw(int64_t n, uint64_t seed) {
  const float lr = 3e-2f, b1 = 0.8f, b2 = 0.95f, eps = 1e-3f, wd = 0.1f;
  Rng r(seed);
  Guarded<float> p(n), m(n), v(n), g(n);
  p.assign(randn(r, n));
  m.fill(0.f);
  v.fill(0.f);
  std::vector<double> P(static_cast<size_t>(n));
  std::vector<double> M(static_cast<size_t>(n), 0.0), V(static_cast<size_t>(n), 0.0);
  for (int64_t i = 0; i < n; ++i) P[size_t(i)] = p[i];
  for (int64_t t = 1; t <= 3; ++t) {
    // gradients of mixed magnitude: some near eps, some large, some exactly 0 at a step
    std::vector<float> gv = randn(r, n);
    for (int64_t i = 0; i < n; ++i) {
      if (i % 4 == 1) gv[size_t(i)] *= 1e-3f;
      if (i % 4 == 2) gv[size_t(i)] *= 30.f;
      if (i % 5 == 3 && t == 2) gv[size_t(i)] = 0.f;
    }
    g.assign(gv);
    cpu::adamw_step(p.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, t);
    const double bc1 = 1.0 - std::pow(double(b1), double(t));
    const double bc2 = 1.0 - std::pow(double(b2), double(t));
    for (int64_t i = 0; i < n; ++i) {
      const size_t k = size_t(i);
      const double gi = gv[k];
      P[k] *= 1.0 - double(lr) * double(wd);
      M[k] = double(b1) * M[k] + (1.0 - double(b1)) * gi;
      V[k] = double(b2) * V[k] + (1.0 - double(b2)) * gi * gi;
      const double denom = std::sqrt(V[k]) / std::sqrt(bc2) + double(eps);
      P[k] -= double(lr) / bc1 * M[k] / denom;
      // fp32 against double: a few ulp of each operand's magnitude
      EXPECT_NEAR(m[i], M[k], 2e-6 * (std::fabs(M[k]) + std::fabs(gi)))
          << "m[" << i << "] step " << t;
      EXPECT_NEAR(v[i], V[k], 2e-6 * (V[k] + gi * gi)) << "v[" << i << "] step " << t;
      EXPECT_NEAR(p[i], P[k], 2e-6 * (std::fabs(P[k]) + double(lr))) << "p[" << i << "] step " << t;
    }
    EXPECT_TRUE(p.guards_ok() && m.guards_ok() && v.guards_ok() && g.guards_ok())
        << "adamw_step wrote outside its buffers";
  }
}

}  // namespace

TEST(OpExact, adamw_13_3steps) { check_adamw(13, 11); }
TEST(OpExact, adamw_4099_3steps) { check_adamw(4099, 12); }

// ---- sum_squares / scale_inplace -------------------------------------------------------------
TEST(OpExact, sum_squares) {
  Rng r(5);
  for (int64_t n : {0, 1, 13, 100003}) {
    std::vector<float> x = randn(r, n);
    for (int64_t i = 0; i < n; i += 7) x[size_t(i)] *= 1e4f;  // mixed magnitudes
    long double ref = 0;
    for (float f : x) ref += (long double)f * f;
    const double got = cpu::sum_squares(x.data(), n);
    EXPECT_NEAR(got, double(ref), 1e-13 * double(ref)) << "n = " << n;
  }
}

TEST(OpExact, scale_inplace_13) {
  Rng r(6);
  Guarded<float> x(13);
  const std::vector<float> x0 = randn(r, 13);
  x.assign(x0);
  cpu::scale_inplace(x.data(), 0.37f, 13);
  for (int64_t i = 0; i < 13; ++i) EXPECT_EQ(x[i], x0[size_t(i)] * 0.37f) << i;
  EXPECT_TRUE(x.guards_ok());
}

// ---- a sequence split in two: attention_fwd over [0, T0), attention_tail_fwd over [T0, T) -------
namespace {

// rows [t0, t1) of every sequence of x[B,T,W]
std::vector<float> rows(const std::vector<float>& x, int64_t B, int64_t T, int64_t W, int64_t t0,
                        int64_t t1) {
  std::vector<float> out;
  for (int64_t b = 0; b < B; ++b)
    out.insert(out.end(), x.begin() + (b * T + t0) * W, x.begin() + (b * T + t1) * W);
  return out;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

void check_split(int64_t B, int64_t T, int64_t T0, int64_t nH, int64_t nKV, int64_t D) {
  Rng r(uint64_t(B * 1000 + T * 10 + T0));
  const int64_t Wq = nH * D, Wk = nKV * D, T1 = T - T0;
  const auto q = randn(r, B * T * Wq), k = randn(r, B * T * Wk), v = randn(r, B * T * Wk),
             dout = randn(r, B * T * Wq);
  // unsplit
  std::vector<float> out(q.size()), att(size_t(B * nH * T * T)), dq(q.size()), dk(k.size()),
      dv(v.size());
  cpu::attention_fwd(out.data(), att.data(), q.data(), k.data(), v.data(), nullptr, B, T, nH, nKV, D);
  cpu::attention_bwd(dq.data(), dk.data(), dv.data(), dout.data(), att.data(), q.data(), k.data(),
                     v.data(), B, T, nH, nKV, D);
  // head: its own T0 keys
  const auto qh = rows(q, B, T, Wq, 0, T0), kh = rows(k, B, T, Wk, 0, T0),
             vh = rows(v, B, T, Wk, 0, T0), gh = rows(dout, B, T, Wq, 0, T0);
  std::vector<float> oh(qh.size()), ah(size_t(B * nH * T0 * T0)), dqh(qh.size()), dkh(kh.size()),
      dvh(vh.size());
  cpu::attention_fwd(oh.data(), ah.data(), qh.data(), kh.data(), vh.data(), nullptr, B, T0, nH, nKV, D);
  cpu::attention_bwd(dqh.data(), dkh.data(), dvh.data(), gh.data(), ah.data(), qh.data(), kh.data(),
                     vh.data(), B, T0, nH, nKV, D);
  // tail: its T1 queries over all T keys; dk, dv accumulate into zeros, then the head's added
  const auto qt = rows(q, B, T, Wq, T0, T), gt = rows(dout, B, T, Wq, T0, T);
  std::vector<float> ot(qt.size()), at(size_t(B * nH * T1 * T)), dqt(qt.size()), dks(k.size(), 0.f),
      dvs(v.size(), 0.f);
  cpu::attention_tail_fwd(ot.data(), at.data(), qt.data(), k.data(), v.data(), B, T1, T, nH, nKV, D);
  cpu::attention_tail_bwd(dqt.data(), dks.data(), dvs.data(), gt.data(), at.data(), qt.data(),
                          k.data(), v.data(), B, T1, T, nH, nKV, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T0 * Wk; ++i) {
      dks[size_t(b * T * Wk + i)] += dkh[size_t(b * T0 * Wk + i)];
      dvs[size_t(b * T * Wk + i)] += dvh[size_t(b * T0 * Wk + i)];
    }
  // each query's own sums run in the same order: out and dq bit for bit; a key's gradient
  // adds the same terms in another order
  EXPECT_EQ(oh, rows(out, B, T, Wq, 0, T0));
  EXPECT_EQ(ot, rows(out, B, T, Wq, T0, T));
  EXPECT_EQ(dqh, rows(dq, B, T, Wq, 0, T0));
  EXPECT_EQ(dqt, rows(dq, B, T, Wq, T0, T));
  EXPECT_LT(rel_diff(dks, dk), 1e-6);
  EXPECT_LT(rel_diff(dvs, dv), 1e-6);
}

}  // namespace

TEST(OpExact, attention_split_2x9_at4_gqa) { check_split(2, 9, 4, 6, 2, 8); }
TEST(OpExact, attention_split_1x8_at1) { check_split(1, 8, 1, 4, 4, 5); }
TEST(OpExact, attention_split_3x7_at6_mqa) { check_split(3, 7, 6, 4, 1, 8); }
