// tests/ops/op_harness.h: the op test harness, after ggml's test-backend-ops, in its CPU
// gradient mode. A registry of op cases with odd shapes; each case owns its inputs (seeded,
// kept away from kinks, ties and masks that would flip under a perturbation), runs the forward
// into output buffers and the backward from an upstream gradient. For each case the harness:
//
//   - surrounds every float input, output and gradient buffer (and every int32 output) with
//     guard zones filled with a sentinel, and checks them after every fwd and bwd call
//     (out-of-bounds writes); NaN guards around the inputs also turn out-of-bounds reads into
//     NaN outputs;
//   - fills outputs with NaN before the forward and requires every output finite afterwards
//     (no NaN/Inf, every element written), and a second forward to be bit-identical;
//   - draws a random upstream gradient G for the differentiable outputs, L = sum(G * out), and
//     checks every gradient the backward produces against central differences of L
//     (see GradTol for the step and the tolerances);
//   - checks the gradient rule of ops/ops.h: activation gradients ASSIGN (=): pre-filled with
//     NaN the result has no NaN, and pre-filled with other garbage it is bit-identical;
//     parameter gradients ACCUMULATE (+=): on a pre-filled buffer one backward gives
//     prefill + grad and a second backward gives first + grad;
//   - checks that the backward leaves the inputs and the saved forward outputs untouched.
//
// The cases call automoe::cpu ops through closures; a CUDA compare mode can reuse the registry
// (inputs, shapes, upstream gradients) and run its own closures against these.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"

namespace automoe::optest {

// How the backward treats the gradient buffer of an input (ops/ops.h's rule).
enum class GradRule {
  none,        // the backward produces no gradient for it (the op gets nullptr)
  assign,      // activation gradient: dx = ...
  accumulate,  // parameter gradient (or linear's dx with dx_beta = 1): dw += ...
};

// A float input of the op.
struct In {
  std::string name;
  std::vector<float> val;
  GradRule rule = GradRule::assign;
};

// A float output of the forward.
struct Out {
  Out(std::string name_, int64_t n_, bool diff_ = true)
      : name(std::move(name_)), n(n_), diff(diff_) {}
  std::string name;
  int64_t n = 0;
  bool diff = true;  // part of L = sum(G * out); false: a saved statistic (rstd, lse, att)
  // The upstream gradient G for this output; default: N(0, 1) per element. Ops whose backward
  // takes a scalar instead of a per-element gradient (cross_entropy's scale) set a constant.
  std::function<void(Rng&, std::vector<float>&)> make_grad;
};

// An int32 output of the forward (router's top-k indices): guarded, not differentiated.
struct IntOut {
  std::string name;
  int64_t n = 0;
};

// What the case's closures see. fwd reads `in` and writes `out` and `iout`. bwd reads `in`,
// `out`, `iout` (as the forward left them) and `dout` (G for differentiable outputs, nullptr
// for the others) and writes `grad` (nullptr for inputs whose rule is none).
struct Ctx {
  std::vector<const float*> in;
  std::vector<float*> out;
  std::vector<int32_t*> iout;
  std::vector<const float*> dout;
  std::vector<float*> grad;
};

// Central differences: each element x is moved to fl(x +- step*max(1,|x|)) and the derivative
// is (L+ - L-) / (x+ - x-) with the actual (float) x+ and x-; L is summed in double from the fp32
// outputs. With step 1e-3 the truncation error is O(1e-6) and the fp32 rounding of the outputs
// gives O(1e-5) relative noise, so:
//   max_err = max|g - g_fd| / max|g_fd|          < 1e-2
//   nmse    = sum (g - g_fd)^2 / sum g_fd^2       < 1e-4
// (a gradient that central differences see as all zero must have max|g| < zero_abs).
struct GradTol {
  double step = 1e-3;
  double max_err = 1e-2;
  double nmse = 1e-4;
  double zero_abs = 1e-6;
};

struct OpCase {
  std::string name;  // the GoogleTest name: OpGrad.<name>
  std::vector<In> in;
  std::vector<Out> out;
  std::vector<IntOut> iout;
  std::function<void(const Ctx&)> fwd, bwd;
  GradTol tol;
  uint64_t seed = 0;  // for G and the accumulate pre-fill
};

// Gradient mode on one case: an empty result means it passed; otherwise one line per failure.
// With AUTOMOE_OPS_VERBOSE set, prints max_err and nmse per gradient.
std::vector<std::string> run_grad_case(const OpCase& c);

// The registry (filled by op_cases.cpp).
const std::vector<OpCase>& grad_cases();

// ---- guarded buffers, shared with the exact tests ------------------------------------------
inline constexpr int64_t kGuard = 16;                // sentinel elements before and after
inline constexpr uint32_t kSentinelF = 0x7fc5a5a5u;  // a quiet NaN with a payload
inline constexpr int32_t kSentinelI = 0x5a5a5a5a;

template <class T>
struct Guarded {
  std::vector<T> mem;
  int64_t n = 0;
  explicit Guarded(int64_t n_ = 0);
  T* data() { return mem.data() + kGuard; }
  const T* data() const { return mem.data() + kGuard; }
  T& operator[](int64_t i) { return data()[i]; }
  const T& operator[](int64_t i) const { return data()[i]; }
  void fill(T v);                        // the interior
  void assign(const std::vector<T>& v);  // the interior, v.size() == n
  std::vector<T> vec() const { return {data(), data() + n}; }
  bool guards_ok() const;  // both guard zones hold the sentinel, bit for bit
};

float sentinel_f();
float nan_f();  // a quiet NaN other than the sentinel (pre-fill of outputs and assign grads)

// ---- helpers for building cases ------------------------------------------------------------
std::vector<float> randn(Rng& r, int64_t n, double scale = 1.0, double mean = 0.0);
std::vector<float> randu(Rng& r, int64_t n, double lo, double hi);
// A case's seed: FNV-1a of its name, so its inputs do not depend on the registry's order.
uint64_t seed_of(const std::string& name);
std::vector<int32_t> iota32(int64_t E);  // 0, 1, ..., E-1
// K distinct experts per token drawn from `allowed` (shuffled per token): a topk_idx[N*K].
std::vector<int32_t> random_topk(Rng& r, int64_t N, int64_t K, std::vector<int32_t> allowed);

// The MoE layout written out plainly (a stable sort of the N*K slots by expert), the oracle for
// moe_layout and the layout the permute / grouped_linear cases use.
struct Layout {
  std::vector<int32_t> offsets;   // [E+1]
  std::vector<int32_t> slot_row;  // [N*K]
};
Layout ref_layout(const std::vector<int32_t>& topk_idx, int64_t E);

}  // namespace automoe::optest
