// tests/ops/test_harness.cpp: the harness catches what it claims to. A toy op
// out[n,c] = w[c] * x[n,c] (dx assigns, dw accumulates) passes, and each deliberately broken
// variant fails with the matching message: out-of-bounds writes and reads, unwritten outputs,
// += where = is due and the reverse, a gradient 2% off (the limit is 1%), a backward that
// writes a saved forward output. AUTOMOE_OPS_VERBOSE=1 prints the messages.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "op_harness.h"

using namespace automoe;
using namespace automoe::optest;

namespace {

constexpr int64_t N = 5, C = 7;

enum class Bug {
  none,
  fwd_write_past_end,
  fwd_write_before_start,
  fwd_skip_element,
  fwd_read_past_end,
  bwd_dx_accumulates,
  bwd_dw_assigns,
  bwd_dx_skips_element,
  bwd_dw_write_past_end,
  bwd_grad_2pct_off,
  bwd_writes_saved_output,
};

OpCase toy(Bug bug) {
  OpCase c;
  c.name = "toy";
  c.seed = 42;
  Rng r(7);
  c.in = {{"x", randn(r, N * C), GradRule::assign},
          {"w", randn(r, C, 0.5, 1.0), GradRule::accumulate}};
  c.out = {{"out", N * C}, {"saved", 1, false}};
  c.fwd = [bug](const Ctx& t) {
    const float* x = t.in[0];
    const float* w = t.in[1];
    float* out = t.out[0];
    for (int64_t i = 0; i < N * C; ++i) {
      if (bug == Bug::fwd_skip_element && i == 17) continue;
      out[i] = w[i % C] * x[i];
    }
    if (bug == Bug::fwd_read_past_end) out[N * C - 1] += x[N * C];
    if (bug == Bug::fwd_write_past_end) out[N * C] = 0.f;
    if (bug == Bug::fwd_write_before_start) out[-1] = 0.f;
    t.out[1][0] = 1.0f;
  };
  c.bwd = [bug](const Ctx& t) {
    const float* x = t.in[0];
    const float* w = t.in[1];
    const float* g = t.dout[0];
    float* dx = t.grad[0];
    float* dw = t.grad[1];
    for (int64_t i = 0; i < N * C; ++i) {
      const float s = bug == Bug::bwd_grad_2pct_off ? 1.02f : 1.0f;
      if (!(bug == Bug::bwd_dx_skips_element && i == 9))
        dx[i] = (bug == Bug::bwd_dx_accumulates ? dx[i] : 0.f) + s * w[i % C] * g[i];
    }
    if (bug == Bug::bwd_dw_assigns)
      for (int64_t k = 0; k < C; ++k) dw[k] = 0.f;
    for (int64_t i = 0; i < N * C; ++i) dw[i % C] += g[i] * x[i];
    if (bug == Bug::bwd_dw_write_past_end) dw[C] = 1.f;
    if (bug == Bug::bwd_writes_saved_output) t.out[1][0] = 2.0f;
  };
  return c;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& l : v) s += l + "\n";
  return s;
}

void expect_caught(Bug bug, const std::string& needle) {
  const auto f = run_grad_case(toy(bug));
  if (std::getenv("AUTOMOE_OPS_VERBOSE")) std::printf("%s", joined(f).c_str());
  EXPECT_FALSE(f.empty()) << "the harness missed a bug (" << needle << ")";
  EXPECT_NE(joined(f).find(needle), std::string::npos) << joined(f);
}

}  // namespace

TEST(OpHarness, CorrectToyOpPasses) { EXPECT_TRUE(run_grad_case(toy(Bug::none)).empty()); }

TEST(OpHarness, CatchesForwardOutOfBounds) {
  expect_caught(Bug::fwd_write_past_end, "guard zone of output out");
  expect_caught(Bug::fwd_write_before_start, "guard zone of output out");
  expect_caught(Bug::fwd_read_past_end, "NaN/Inf");  // the input's NaN guard leaks into out
}

TEST(OpHarness, CatchesUnwrittenOutputs) {
  expect_caught(Bug::fwd_skip_element, "forward output out[17]");
  expect_caught(Bug::bwd_dx_skips_element, "dx[9]");
}

TEST(OpHarness, CatchesWrongGradientRule) {
  expect_caught(Bug::bwd_dx_accumulates, "dx[0]");
  expect_caught(Bug::bwd_dw_assigns, "should accumulate");
}

TEST(OpHarness, CatchesWrongGradient) {
  expect_caught(Bug::bwd_grad_2pct_off, "dx vs central differences");
}

TEST(OpHarness, CatchesBackwardSideEffects) {
  expect_caught(Bug::bwd_dw_write_past_end, "guard zone of dw");
  expect_caught(Bug::bwd_writes_saved_output, "modified forward output saved");
}
