// tests/ops/op_cases.cpp: the gradient-mode cases, odd shapes (5, 7, 11, 13), every op of
// ops/ops.h that has a backward. Inputs are drawn from a seed derived from the case's name and
// kept away from kinks: router logits have gaps so top-k cannot flip under a perturbation,
// rmsnorm rows are far from zero, the top-k mask of the aux loss and all integer inputs (ids,
// positions, documents, targets, layouts) are constants of the case.
#include <algorithm>
#include <cmath>
#include <string>

#include "op_harness.h"
#include "ops/ops.h"

namespace automoe::optest {
namespace {

using namespace automoe::cpu;

std::string x(std::initializer_list<int64_t> d) {
  std::string s;
  for (int64_t v : d) s += (s.empty() ? "" : "x") + std::to_string(v);
  return s;
}

OpCase make(const std::string& name) {
  OpCase c;
  c.name = name;
  c.seed = seed_of(name);
  return c;
}

// ---- embedding ---------------------------------------------------------------------------
void embedding(std::vector<OpCase>& R, int64_t N, int64_t V, int64_t C) {
  OpCase c = make("embedding_" + x({N, V, C}));
  Rng r(c.seed);
  std::vector<int64_t> ids(static_cast<size_t>(N));
  for (auto& id : ids) id = int64_t(r.below(uint64_t(V / 2 + 1)));  // many repeats
  ids[0] = ids[N - 1] = ids[N / 2];                                 // one id three times
  ids[1] = V - 1;                                                   // the last row
  c.in = {{"wte", randn(r, V * C), GradRule::accumulate}};
  c.out = {{"out", N * C}};
  c.fwd = [=](const Ctx& t) { embedding_fwd(t.out[0], ids.data(), t.in[0], N, C); };
  c.bwd = [=](const Ctx& t) { embedding_bwd(t.grad[0], t.dout[0], ids.data(), N, C); };
  R.push_back(std::move(c));
}

// ---- rmsnorm -----------------------------------------------------------------------------
void rmsnorm(std::vector<OpCase>& R, const std::string& name, int64_t N, int64_t C) {
  OpCase c = make(name);
  Rng r(c.seed);
  const float eps = 1e-6f;
  c.in = {{"x", randn(r, N * C, 1.5, 0.2), GradRule::assign},
          {"w", randn(r, C, 0.3, 1.0), GradRule::accumulate}};
  c.out = {{"out", N * C}, {"rstd", N, false}};
  c.fwd = [=](const Ctx& t) { rmsnorm_fwd(t.out[0], t.out[1], t.in[0], t.in[1], N, C, eps); };
  c.bwd = [=](const Ctx& t) {
    rmsnorm_bwd(t.grad[0], t.grad[1], t.dout[0], t.in[0], t.in[1], t.out[1], N, C);
  };
  R.push_back(std::move(c));
}

// ---- linear ------------------------------------------------------------------------------
enum class Dx { assign, beta1, none };  // dx_beta 0, dx_beta 1 (accumulates), dx = nullptr

void linear(std::vector<OpCase>& R, int64_t N, int64_t I, int64_t O, bool bias, Dx dx) {
  OpCase c = make("linear_" + x({N, I, O}) + (bias ? "_bias" : "") +
                  (dx == Dx::beta1  ? "_beta1"
                   : dx == Dx::none ? "_nodx"
                                    : "_beta0"));
  Rng r(c.seed);
  const GradRule xr = dx == Dx::assign  ? GradRule::assign
                      : dx == Dx::beta1 ? GradRule::accumulate
                                        : GradRule::none;
  c.in = {{"x", randn(r, N * I), xr}, {"w", randn(r, O * I, 0.5), GradRule::accumulate}};
  if (bias) c.in.push_back({"b", randn(r, O, 0.5), GradRule::accumulate});
  c.out = {{"out", N * O}};
  const float beta = dx == Dx::beta1 ? 1.0f : 0.0f;
  c.fwd = [=](const Ctx& t) {
    linear_fwd(t.out[0], t.in[0], t.in[1], bias ? t.in[2] : nullptr, N, I, O);
  };
  c.bwd = [=](const Ctx& t) {
    linear_bwd(t.grad[0], beta, t.grad[1], bias ? t.grad[2] : nullptr, t.dout[0], t.in[0], t.in[1],
               N, I, O);
  };
  R.push_back(std::move(c));
}

// ---- rope --------------------------------------------------------------------------------
void rope(std::vector<OpCase>& R, int64_t N, int64_t H, int64_t D, float theta,
          const std::string& theta_name) {
  OpCase c = make("rope_" + x({N, H, D}) + "_theta" + theta_name);
  Rng r(c.seed);
  const int32_t some[] = {0, 1, 2, 5, 13, 100, 4095, 32767, 7, 11, 12345, 3, 40000};
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) pos[size_t(n)] = some[n % 13];
  c.in = {{"x", randn(r, N * H * D), GradRule::assign}};
  c.out = {{"out", N * H * D}};
  c.fwd = [=](const Ctx& t) { rope_fwd(t.out[0], t.in[0], pos.data(), N, H, D, theta); };
  c.bwd = [=](const Ctx& t) { rope_bwd(t.grad[0], t.dout[0], pos.data(), N, H, D, theta); };
  R.push_back(std::move(c));
}

// ---- attention ---------------------------------------------------------------------------
void attention(std::vector<OpCase>& R, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
               bool docs) {
  OpCase c = make("attention_" + x({B, T, nH, nKV, D}) + (docs ? "_docs" : ""));
  Rng r(c.seed);
  std::vector<int32_t> doc;
  if (docs)  // two documents per sequence, split at a different place in each
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) doc.push_back(t < (b % 2 ? T - 2 : 3) ? 0 : 1);
  c.in = {{"q", randn(r, B * T * nH * D), GradRule::assign},
          {"k", randn(r, B * T * nKV * D), GradRule::assign},
          {"v", randn(r, B * T * nKV * D), GradRule::assign}};
  c.out = {{"out", B * T * nH * D}, {"att", B * nH * T * T, false}};
  c.fwd = [=](const Ctx& t) {
    attention_fwd(t.out[0], t.out[1], t.in[0], t.in[1], t.in[2], docs ? doc.data() : nullptr, B, T,
                  nH, nKV, D);
  };
  c.bwd = [=](const Ctx& t) {
    attention_bwd(t.grad[0], t.grad[1], t.grad[2], t.dout[0], t.out[1], t.in[0], t.in[1], t.in[2],
                  B, T, nH, nKV, D);
  };
  R.push_back(std::move(c));
}

// The second half of a split sequence: Tq queries at the end of Tkv keys (dk, dv accumulate).
void attention_tail(std::vector<OpCase>& R, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                    int64_t nKV, int64_t D) {
  OpCase c = make("attention_tail_" + x({B, Tq, Tkv, nH, nKV, D}));
  Rng r(c.seed);
  c.in = {{"q", randn(r, B * Tq * nH * D), GradRule::assign},
          {"k", randn(r, B * Tkv * nKV * D), GradRule::accumulate},
          {"v", randn(r, B * Tkv * nKV * D), GradRule::accumulate}};
  c.out = {{"out", B * Tq * nH * D}, {"att", B * nH * Tq * Tkv, false}};
  c.fwd = [=](const Ctx& t) {
    attention_tail_fwd(t.out[0], t.out[1], t.in[0], t.in[1], t.in[2], B, Tq, Tkv, nH, nKV, D);
  };
  c.bwd = [=](const Ctx& t) {
    attention_tail_bwd(t.grad[0], t.grad[1], t.grad[2], t.dout[0], t.out[1], t.in[0], t.in[1],
                       t.in[2], B, Tq, Tkv, nH, nKV, D);
  };
  R.push_back(std::move(c));
}

// ---- router ------------------------------------------------------------------------------
// extra: an upstream gradient on probs too (router_bwd's dprobs_extra, the aux loss's path).
void router(std::vector<OpCase>& R, int64_t N, int64_t E, int64_t K, bool norm, bool extra) {
  OpCase c = make("router_" + x({N, E}) + "_k" + std::to_string(K) + (norm ? "_norm" : "") +
                  (extra ? "_extra" : ""));
  Rng r(c.seed);
  // Each row: a shuffled ladder with steps of 0.4 (+-0.05 jitter): every pair of logits is at
  // least 0.3 apart, so no perturbation of 1e-3 can reorder the top-k.
  std::vector<float> logits;
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int32_t> rank = random_topk(r, 1, E, iota32(E));
    for (int64_t e = 0; e < E; ++e)
      logits.push_back(float(0.4 * (rank[size_t(e)] - 0.5 * E) + 0.1 * (r.uniform() - 0.5)));
  }
  c.in = {{"logits", logits, GradRule::assign}};
  c.out = {{"probs", N * E, extra}, {"topk_w", N * K}};
  c.iout = {{"topk_idx", N * K}};
  c.fwd = [=](const Ctx& t) { router_fwd(t.out[0], t.iout[0], t.out[1], t.in[0], N, E, K, norm); };
  c.bwd = [=](const Ctx& t) {
    router_bwd(t.grad[0], t.dout[1], extra ? t.dout[0] : nullptr, t.out[0], t.iout[0], N, E, K,
               norm);
  };
  R.push_back(std::move(c));
}

// ---- permute / unpermute -------------------------------------------------------------------
void permute(std::vector<OpCase>& R, int64_t N, int64_t K, int64_t C, int64_t E) {
  OpCase c = make("permute_" + x({N, K, C}) + "_e" + std::to_string(E));
  Rng r(c.seed);
  const Layout L = ref_layout(random_topk(r, N, K, iota32(E)), E);
  c.in = {{"x", randn(r, N * C), GradRule::assign}};
  c.out = {{"xs", N * K * C}};
  c.fwd = [=](const Ctx& t) { permute_fwd(t.out[0], t.in[0], L.slot_row.data(), N, K, C); };
  c.bwd = [=](const Ctx& t) { permute_bwd(t.grad[0], t.dout[0], L.slot_row.data(), N, K, C); };
  R.push_back(std::move(c));
}

void unpermute(std::vector<OpCase>& R, int64_t N, int64_t K, int64_t C, int64_t E) {
  OpCase c = make("unpermute_" + x({N, K, C}) + "_e" + std::to_string(E));
  Rng r(c.seed);
  const Layout L = ref_layout(random_topk(r, N, K, iota32(E)), E);
  c.in = {{"ys", randn(r, N * K * C), GradRule::assign},
          {"w", randu(r, N * K, 0.05, 1.0), GradRule::assign}};
  c.out = {{"out", N * C}};
  c.fwd = [=](const Ctx& t) {
    unpermute_fwd(t.out[0], t.in[0], t.in[1], L.slot_row.data(), N, K, C);
  };
  c.bwd = [=](const Ctx& t) {
    unpermute_bwd(t.grad[0], t.grad[1], t.dout[0], t.in[0], t.in[1], L.slot_row.data(), N, K, C);
  };
  R.push_back(std::move(c));
}

// ---- grouped linear ----------------------------------------------------------------------
void grouped_linear(std::vector<OpCase>& R, const std::string& tag,
                    const std::vector<int32_t>& rows, int64_t I, int64_t O) {
  const int64_t E = int64_t(rows.size());
  std::vector<int32_t> off(size_t(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] = off[size_t(e)] + rows[size_t(e)];
  const int64_t Rn = off[size_t(E)];
  OpCase c = make("grouped_linear_" + x({Rn, E, I, O}) + "_" + tag);
  Rng r(c.seed);
  c.in = {{"x", randn(r, Rn * I), GradRule::assign},
          {"w", randn(r, E * O * I, 0.5), GradRule::accumulate}};
  c.out = {{"out", Rn * O}};
  c.fwd = [=](const Ctx& t) {
    grouped_linear_fwd(t.out[0], t.in[0], t.in[1], off.data(), E, I, O);
  };
  c.bwd = [=](const Ctx& t) {
    grouped_linear_bwd(t.grad[0], t.grad[1], t.dout[0], t.in[0], t.in[1], off.data(), E, I, O);
  };
  R.push_back(std::move(c));
}

// ---- swiglu ------------------------------------------------------------------------------
void swiglu(std::vector<OpCase>& R, int64_t N, int64_t F) {
  OpCase c = make("swiglu_" + x({N, F}));
  Rng r(c.seed);
  c.in = {{"gu", randn(r, N * 2 * F, 2.0), GradRule::assign}};
  c.out = {{"out", N * F}};
  c.fwd = [=](const Ctx& t) { swiglu_fwd(t.out[0], t.in[0], N, F); };
  c.bwd = [=](const Ctx& t) { swiglu_bwd(t.grad[0], t.dout[0], t.in[0], N, F); };
  R.push_back(std::move(c));
}

// ---- cross-entropy -----------------------------------------------------------------------
// The backward takes one scale instead of a gradient per row: G on the losses is that scale.
void cross_entropy(std::vector<OpCase>& R, int64_t N, int64_t V, int64_t ignored, float scale,
                   const std::string& scale_name) {
  OpCase c =
      make("cross_entropy_" + x({N, V}) + "_ign" + std::to_string(ignored) + "_scale" + scale_name);
  Rng r(c.seed);
  std::vector<int64_t> tgt(static_cast<size_t>(N));
  for (auto& t : tgt) t = int64_t(r.below(uint64_t(V)));
  tgt[0] = 0;
  tgt[N - 1] = V - 1;
  for (int64_t i = 0; i < ignored; ++i) tgt[size_t(1 + 2 * i)] = -100;
  c.in = {{"logits", randn(r, N * V, 2.0), GradRule::assign}};
  c.out = {{"losses", N}, {"lse", N, false}};
  c.out[0].make_grad = [scale](Rng&, std::vector<float>& G) {
    std::fill(G.begin(), G.end(), scale);
  };
  c.fwd = [=](const Ctx& t) { cross_entropy_fwd(t.out[0], t.out[1], t.in[0], tgt.data(), N, V); };
  c.bwd = [=](const Ctx& t) {
    cross_entropy_bwd(t.grad[0], t.in[0], t.out[1], tgt.data(), scale, N, V);
  };
  R.push_back(std::move(c));
}

// ---- aux loss ----------------------------------------------------------------------------
// The gradient w.r.t. probs through aux_loss_fwd; the top-k mask is a constant of the case.
void aux_loss(std::vector<OpCase>& R, int64_t N, int64_t E, int64_t K) {
  OpCase c = make("aux_loss_" + x({N, E}) + "_k" + std::to_string(K));
  Rng r(c.seed);
  std::vector<float> probs = randu(r, N * E, 0.05, 1.0);
  for (int64_t n = 0; n < N; ++n) {
    float s = 0;
    for (int64_t e = 0; e < E; ++e) s += probs[size_t(n * E + e)];
    for (int64_t e = 0; e < E; ++e) probs[size_t(n * E + e)] /= s;
  }
  // experts 0 and E-1 never picked: their gradient is zero
  std::vector<int32_t> allowed;
  for (int32_t e = 1; e < E - 1; ++e) allowed.push_back(e);
  const std::vector<int32_t> idx = random_topk(r, N, K, allowed);
  c.in = {{"probs", probs, GradRule::assign}};
  c.out = {{"aux", 1}};
  c.fwd = [=](const Ctx& t) { t.out[0][0] = aux_loss_fwd(t.in[0], idx.data(), N, E, K); };
  c.bwd = [=](const Ctx& t) { aux_loss_bwd(t.grad[0], t.dout[0][0], idx.data(), N, E, K); };
  R.push_back(std::move(c));
}

std::vector<OpCase> build() {
  std::vector<OpCase> R;
  embedding(R, 13, 11, 7);
  embedding(R, 5, 7, 13);

  rmsnorm(R, "rmsnorm_13x7", 13, 7);
  rmsnorm(R, "rmsnorm_5x11", 5, 11);
  rmsnorm(R, "rmsnorm_qk_7x3x8", 7 * 3, 8);  // per-head q/k norm: N = tokens*heads, C = D
  rmsnorm(R, "rmsnorm_qk_5x2x13", 5 * 2, 13);

  for (bool bias : {false, true})
    for (Dx dx : {Dx::assign, Dx::beta1}) linear(R, 7, 13, 5, bias, dx);
  linear(R, 11, 5, 13, true, Dx::assign);
  linear(R, 5, 11, 7, true, Dx::none);
  linear(R, 13, 7, 11, false, Dx::none);

  rope(R, 7, 3, 8, 1e4f, "1e4");
  rope(R, 7, 3, 8, 1e6f, "1e6");
  rope(R, 13, 5, 10, 1e4f, "1e4");
  rope(R, 11, 1, 6, 1e6f, "1e6");

  for (int64_t nKV : {2, 1, 6})
    for (int64_t D : {5, 8})
      for (bool docs : {false, true}) attention(R, 2, 7, 6, nKV, D, docs);
  attention_tail(R, 2, 3, 7, 6, 2, 8);
  attention_tail(R, 1, 7, 7, 4, 1, 5);  // Tq = Tkv: attention_fwd
  attention_tail(R, 2, 1, 9, 2, 2, 8);  // the last query alone

  for (int64_t K : {1, 3})
    for (bool norm : {false, true})
      for (bool extra : {false, true}) router(R, 13, 7, K, norm, extra);

  permute(R, 7, 3, 5, 7);
  permute(R, 13, 1, 11, 5);
  unpermute(R, 7, 3, 5, 7);
  unpermute(R, 11, 2, 13, 5);

  grouped_linear(R, "some_empty", {3, 0, 7, 0, 1}, 7, 5);
  grouped_linear(R, "one_expert_all", {0, 0, 13, 0, 0}, 5, 11);
  grouped_linear(R, "all_nonempty", {2, 5, 1, 3, 2, 1, 1}, 11, 7);

  swiglu(R, 7, 11);
  swiglu(R, 13, 5);

  cross_entropy(R, 13, 11, 3, 1.0f / 10, "0p1");
  cross_entropy(R, 7, 13, 2, 1.0f, "1");
  cross_entropy(R, 5, 7, 0, 2.5f, "2p5");

  aux_loss(R, 13, 7, 1);
  aux_loss(R, 11, 7, 3);
  aux_loss(R, 5, 13, 2);
  return R;
}

}  // namespace

const std::vector<OpCase>& grad_cases() {
  static const std::vector<OpCase> cases = build();
  return cases;
}

}  // namespace automoe::optest
