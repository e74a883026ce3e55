// tests/ops/op_harness.cpp: gradient mode of the op harness (see op_harness.h).
#include "op_harness.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace automoe::optest {

float sentinel_f() {
  float f;
  std::memcpy(&f, &kSentinelF, 4);
  return f;
}

float nan_f() {
  const uint32_t u = 0x7fc00bad;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace {
template <class T>
T sentinel();
template <>
float sentinel<float>() {
  return sentinel_f();
}
template <>
int32_t sentinel<int32_t>() {
  return kSentinelI;
}
}  // namespace

template <class T>
Guarded<T>::Guarded(int64_t n_) : mem(size_t(n_ + 2 * kGuard), sentinel<T>()), n(n_) {}

template <class T>
void Guarded<T>::fill(T v) {
  for (int64_t i = 0; i < n; ++i) data()[i] = v;
}

template <class T>
void Guarded<T>::assign(const std::vector<T>& v) {
  std::memcpy(data(), v.data(), size_t(n) * sizeof(T));
}

template <class T>
bool Guarded<T>::guards_ok() const {
  const T s = sentinel<T>();
  for (int64_t i = 0; i < kGuard; ++i) {
    if (std::memcmp(&mem[size_t(i)], &s, sizeof(T)) != 0) return false;
    if (std::memcmp(&mem[size_t(kGuard + n + i)], &s, sizeof(T)) != 0) return false;
  }
  return true;
}

template struct Guarded<float>;
template struct Guarded<int32_t>;

std::vector<float> randn(Rng& r, int64_t n, double scale, double mean) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = float(mean + scale * r.normal());
  return v;
}

std::vector<float> randu(Rng& r, int64_t n, double lo, double hi) {
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = float(lo + (hi - lo) * r.uniform());
  return v;
}

uint64_t seed_of(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

std::vector<int32_t> iota32(int64_t E) {
  std::vector<int32_t> v(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) v[size_t(e)] = int32_t(e);
  return v;
}

std::vector<int32_t> random_topk(Rng& r, int64_t N, int64_t K, std::vector<int32_t> allowed) {
  std::vector<int32_t> idx;
  for (int64_t n = 0; n < N; ++n) {
    for (size_t i = allowed.size(); i > 1; --i) std::swap(allowed[i - 1], allowed[r.below(i)]);
    for (int64_t j = 0; j < K; ++j) idx.push_back(allowed[size_t(j)]);
  }
  return idx;
}

Layout ref_layout(const std::vector<int32_t>& topk_idx, int64_t E) {
  std::vector<int64_t> order(topk_idx.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return topk_idx[size_t(a)] < topk_idx[size_t(b)]; });
  Layout L;
  L.offsets.assign(size_t(E + 1), 0);
  for (int32_t e : topk_idx) L.offsets[size_t(e + 1)]++;
  for (int64_t e = 0; e < E; ++e) L.offsets[size_t(e + 1)] += L.offsets[size_t(e)];
  L.slot_row.assign(topk_idx.size(), -1);
  for (size_t r = 0; r < order.size(); ++r) L.slot_row[size_t(order[r])] = int32_t(r);
  return L;
}

namespace {

bool bits_equal(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, size_t(n) * sizeof(float)) == 0;
}

int64_t first_nonfinite(const float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(a[i])) return i;
  return -1;
}

// Every buffer of one case, and the Ctx pointing into them.
struct Bufs {
  std::vector<Guarded<float>> in, out, grad;
  std::vector<Guarded<int32_t>> iout;
  std::vector<std::vector<float>> G;  // upstream gradient per output (empty: not differentiable)

  explicit Bufs(const OpCase& c) {
    for (const auto& x : c.in) {
      in.emplace_back(int64_t(x.val.size()));
      in.back().assign(x.val);
      grad.emplace_back(x.rule == GradRule::none ? 0 : int64_t(x.val.size()));
    }
    for (const auto& o : c.out) out.emplace_back(o.n);
    for (const auto& o : c.iout) iout.emplace_back(o.n);
  }

  Ctx ctx(const OpCase& c) {
    Ctx x;
    for (auto& b : in) x.in.push_back(b.data());
    for (auto& b : out) x.out.push_back(b.data());
    for (auto& b : iout) x.iout.push_back(b.data());
    for (size_t i = 0; i < c.out.size(); ++i)
      x.dout.push_back(G.empty() || G[i].empty() ? nullptr : G[i].data());
    for (size_t i = 0; i < c.in.size(); ++i)
      x.grad.push_back(c.in[i].rule == GradRule::none ? nullptr : grad[i].data());
    return x;
  }

  // L = sum over differentiable outputs of G * out, in double.
  double loss() const {
    double L = 0.0;
    for (size_t i = 0; i < out.size(); ++i)
      if (!G[i].empty())
        for (int64_t j = 0; j < out[i].n; ++j) L += double(G[i][size_t(j)]) * out[i][j];
    return L;
  }
};

struct Failures {
  std::string case_name;
  std::vector<std::string> lines;
  template <class... A>
  void add(const A&... a) {
    std::ostringstream s;
    s << case_name << ": ";
    (s << ... << a);
    lines.push_back(s.str());
  }
};

}  // namespace

std::vector<std::string> run_grad_case(const OpCase& c) {
  Failures F{c.name, {}};
  const bool verbose = std::getenv("AUTOMOE_OPS_VERBOSE") != nullptr;
  Bufs b(c);
  Rng rng(c.seed * 0x9e3779b97f4a7c15ull + 12345);

  auto check_guards = [&](const char* when) {
    for (size_t i = 0; i < b.in.size(); ++i)
      if (!b.in[i].guards_ok()) F.add("guard zone of input ", c.in[i].name, " overwritten ", when);
    for (size_t i = 0; i < b.out.size(); ++i)
      if (!b.out[i].guards_ok())
        F.add("guard zone of output ", c.out[i].name, " overwritten ", when);
    for (size_t i = 0; i < b.iout.size(); ++i)
      if (!b.iout[i].guards_ok())
        F.add("guard zone of output ", c.iout[i].name, " overwritten ", when);
    for (size_t i = 0; i < b.grad.size(); ++i)
      if (c.in[i].rule != GradRule::none && !b.grad[i].guards_ok())
        F.add("guard zone of d", c.in[i].name, " overwritten ", when);
  };

  // ---- forward: every output written, finite, inside its bounds, deterministic --------------
  b.G.assign(c.out.size(), {});
  auto forward = [&](int32_t int_fill) {  // two int pre-fills: an unwritten element shows
    for (auto& o : b.out) o.fill(nan_f());
    for (auto& o : b.iout) o.fill(int_fill);
    c.fwd(b.ctx(c));
  };
  forward(-kSentinelI);
  check_guards("by the forward");
  for (size_t i = 0; i < b.out.size(); ++i)
    if (int64_t j = first_nonfinite(b.out[i].data(), b.out[i].n); j >= 0)
      F.add("forward output ", c.out[i].name, "[", j, "] = ", b.out[i][j],
            " (NaN/Inf, or not written)");
  std::vector<std::vector<float>> out0;
  std::vector<std::vector<int32_t>> iout0;
  for (auto& o : b.out) out0.push_back(o.vec());
  for (auto& o : b.iout) iout0.push_back(o.vec());
  forward(0x11111111);
  for (size_t i = 0; i < b.out.size(); ++i)
    if (!bits_equal(out0[i].data(), b.out[i].data(), b.out[i].n))
      F.add("a second forward changed output ", c.out[i].name, " (nondeterministic)");
  for (size_t i = 0; i < b.iout.size(); ++i)
    if (iout0[i] != b.iout[i].vec())
      F.add("a second forward changed output ", c.iout[i].name,
            " (nondeterministic, or not every element written)");
  if (!F.lines.empty()) return F.lines;

  // ---- upstream gradient ------------------------------------------------------------------
  for (size_t i = 0; i < c.out.size(); ++i) {
    if (!c.out[i].diff) continue;
    b.G[i].resize(size_t(c.out[i].n));
    if (c.out[i].make_grad)
      c.out[i].make_grad(rng, b.G[i]);
    else
      b.G[i] = randn(rng, c.out[i].n);
  }

  // ---- backward, three times: the gradient rule -------------------------------------------
  // round 0: assign <- NaN, accumulate <- 0  => the gradient itself (g)
  // round 1: assign <- 7.25 garbage (bit-identical to round 0), accumulate <- P (P + g)
  // round 2: assign <- NaN again, accumulate continues (P + 2g)
  auto backward = [&](const char* when) {
    c.bwd(b.ctx(c));
    check_guards(when);
    for (size_t i = 0; i < b.in.size(); ++i)
      if (!bits_equal(b.in[i].data(), c.in[i].val.data(), b.in[i].n))
        F.add("the backward modified input ", c.in[i].name);
    for (size_t i = 0; i < b.out.size(); ++i)
      if (!bits_equal(out0[i].data(), b.out[i].data(), b.out[i].n))
        F.add("the backward modified forward output ", c.out[i].name);
    for (size_t i = 0; i < b.iout.size(); ++i)
      if (iout0[i] != b.iout[i].vec()) F.add("the backward modified output ", c.iout[i].name);
    for (size_t i = 0; i < b.grad.size(); ++i)
      if (c.in[i].rule != GradRule::none)
        if (int64_t j = first_nonfinite(b.grad[i].data(), b.grad[i].n); j >= 0)
          F.add("d", c.in[i].name, "[", j, "] = ", b.grad[i][j], " ", when,
                c.in[i].rule == GradRule::assign ? " (NaN/Inf: a NaN pre-fill was read, or an "
                                                   "element was not written)"
                                                 : " (NaN/Inf)");
  };
  const size_t nin = c.in.size();
  std::vector<std::vector<float>> g(nin), prefill(nin), first(nin);
  for (size_t i = 0; i < nin; ++i) {
    if (c.in[i].rule == GradRule::assign) b.grad[i].fill(nan_f());
    if (c.in[i].rule == GradRule::accumulate) b.grad[i].fill(0.f);
  }
  backward("after the backward (pre-filled with NaN / 0)");
  for (size_t i = 0; i < nin; ++i) g[i] = b.grad[i].vec();
  for (size_t i = 0; i < nin; ++i) {
    if (c.in[i].rule == GradRule::assign) b.grad[i].fill(7.25f);
    if (c.in[i].rule == GradRule::accumulate) {
      prefill[i] = randn(rng, b.grad[i].n);
      b.grad[i].assign(prefill[i]);
    }
  }
  backward("after the backward on a pre-filled buffer");
  for (size_t i = 0; i < nin; ++i) first[i] = b.grad[i].vec();
  for (size_t i = 0; i < nin; ++i)
    if (c.in[i].rule == GradRule::assign) b.grad[i].fill(nan_f());
  backward("after a second backward");
  if (!F.lines.empty()) return F.lines;

  for (size_t i = 0; i < nin; ++i) {
    const int64_t n = b.grad[i].n;
    if (c.in[i].rule == GradRule::assign) {
      if (!bits_equal(g[i].data(), first[i].data(), n))
        F.add("d", c.in[i].name,
              " depends on the buffer's previous contents (it should "
              "assign, =)");
    } else if (c.in[i].rule == GradRule::accumulate) {
      // first = prefill + g, second = first + g, up to fp32 rounding of the additions.
      for (int64_t j = 0; j < n; ++j) {
        const double p = prefill[i][size_t(j)], gj = g[i][size_t(j)];
        const double f = first[i][size_t(j)], s = b.grad[i][j];
        const double tol1 = 1e-6 * (std::fabs(p) + std::fabs(gj)) + 1e-30;
        const double tol2 = 1e-6 * (std::fabs(f) + std::fabs(gj)) + 1e-30;
        if (std::fabs(f - (p + gj)) > tol1) {
          F.add("d", c.in[i].name, "[", j, "] should accumulate (+=): pre-filled ", p,
                ", gradient ", gj, ", got ", f);
          break;
        }
        if (std::fabs(s - (f + gj)) > tol2) {
          F.add("d", c.in[i].name, "[", j,
                "] should accumulate (+=) on a second backward: ", "first ", f, ", gradient ", gj,
                ", got ", s);
          break;
        }
      }
    }
  }

  // ---- central differences ----------------------------------------------------------------
  Ctx ctx = b.ctx(c);
  for (size_t i = 0; i < nin; ++i) {
    if (c.in[i].rule == GradRule::none) continue;
    const int64_t n = b.in[i].n;
    float* x = b.in[i].data();
    std::vector<double> fd(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      const float x0 = x[j];
      const double h = c.tol.step * std::max(1.0, std::fabs(double(x0)));
      const float xp = float(x0 + h), xm = float(x0 - h);
      x[j] = xp;
      c.fwd(ctx);
      const double Lp = b.loss();
      x[j] = xm;
      c.fwd(ctx);
      const double Lm = b.loss();
      x[j] = x0;
      fd[size_t(j)] = (Lp - Lm) / (double(xp) - double(xm));
    }
    double fd_max = 0, err_max = 0, g_max = 0, se = 0, s2 = 0;
    int64_t worst = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double a = g[i][size_t(j)], e = fd[size_t(j)];
      fd_max = std::max(fd_max, std::fabs(e));
      g_max = std::max(g_max, std::fabs(a));
      if (std::fabs(a - e) > err_max) err_max = std::fabs(a - e), worst = j;
      se += (a - e) * (a - e);
      s2 += e * e;
    }
    if (fd_max == 0.0) {
      if (verbose)
        std::printf("  %-40s d%-8s zero gradient, max|g| %.2e\n", c.name.c_str(),
                    c.in[i].name.c_str(), g_max);
      if (g_max > c.tol.zero_abs)
        F.add("d", c.in[i].name, ": central differences give 0 but max|g| = ", g_max);
      continue;
    }
    const double rel = err_max / fd_max, nmse = se / s2;
    if (verbose)
      std::printf("  %-40s d%-8s n %5lld  max_err %.2e  nmse %.2e\n", c.name.c_str(),
                  c.in[i].name.c_str(), (long long)n, rel, nmse);
    if (rel > c.tol.max_err || nmse > c.tol.nmse)
      F.add("d", c.in[i].name, " vs central differences: max_err ", rel, " (limit ", c.tol.max_err,
            "), nmse ", nmse, " (limit ", c.tol.nmse, "); worst at [", worst, "]: backward ",
            g[i][size_t(worst)], ", central differences ", fd[size_t(worst)]);
  }
  check_guards("by the central-difference forwards");
  return F.lines;
}

}  // namespace automoe::optest
