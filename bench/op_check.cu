// bench/op_check.cu: checks every CUDA op (backend/cuda, bf16) against the CPU op (backend/cpu,
// fp32) on the same bf16-rounded inputs, in the style of ggml's test-backend-ops. Odd shapes
// (5, 7, 11, 13), one realistic shape per op, experts without tokens and all tokens on one
// expert. Per output: NMSE = sum (cuda - cpu)^2 / sum cpu^2 against a per-op limit, NaN/Inf
// where the CPU is finite, and 256-byte sentinel zones before and after every CUDA output
// buffer (checked after the op; "=" outputs start as NaN so an unwritten element shows).
//
//   cuda_op_check [WORD ...] [-WORD ...]   runs the groups whose name contains a WORD (all
//                                          without one) and no -WORD (e.g. -grouped_perf)
// Prints `OK|FAIL op output shape nmse (limit)` per check, then a table per op. Exit code: the
// number of failures (at most 255); 0 with a message when there is no CUDA device.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/ep_kernels.h"
#include "backend/cuda/ops_cuda.h"
#include "ops/ops.h"

using automoe::cuda::bf16;
namespace cu = automoe::cuda;
namespace cpu = automoe::cpu;

namespace {

// ---- limits --------------------------------------------------------------------------------
// The CPU reference sees the same bf16-rounded inputs and computes in fp32, so the difference
// is the CUDA side's: one bf16 rounding of an output is a relative error up to 2^-9, an NMSE
// of about 1.3e-6; fp32 sums in another order differ by ~1e-7 relative (NMSE ~1e-13).
constexpr double kExact = 0.0;        // copies (embedding, permute) and integer outputs
constexpr double kBf16Out = 1e-4;     // bf16 output after fp32 math: ~1e-6 expected
constexpr double kBf16Chain = 1e-3;   // bf16 output through cancellation or a bf16 intermediate
                                      // (attention bwd uses the bf16 forward output, rmsnorm
                                      // dx and router dlogits subtract nearly equal terms)
constexpr double kFlash = 1e-3;       // cuDNN flash attention: P and dS are rounded to bf16
                                      // before the tensor-core matmuls (expected ~1e-5)
constexpr double kF32 = 1e-6;         // fp32 statistics and gradients from bf16 inputs
constexpr double kF32Exact = 1e-10;   // fp32 element-wise (optimizer): ~1 ulp differences
constexpr double kF64 = 1e-20;        // double sums (sum of squares), squared relative error

constexpr size_t kGuardBytes = 256;
constexpr unsigned char kSentinel = 0xA5;

std::mt19937 g_rng(20261128);

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw automoe::Error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Device buffer with sentinel zones of kGuardBytes on both sides (the body stays 256-aligned).
// Copies and fills finish before they return (the ops run on the Ctx's non-blocking stream,
// which does not wait for the legacy stream that cudaMemcpy/cudaMemset use).
struct DevBase {
  virtual ~DevBase() = default;
};
template <class T>
struct Dev : DevBase {
  unsigned char* raw = nullptr;
  size_t n = 0;
  T* p = nullptr;
  explicit Dev(size_t n_) : n(n_) {
    cuda_ok(cudaMalloc(&raw, bytes() + 2 * kGuardBytes), "cudaMalloc");
    cuda_ok(cudaMemset(raw, kSentinel, bytes() + 2 * kGuardBytes), "cudaMemset");
    cuda_ok(cudaDeviceSynchronize(), "cudaMemset");
    p = reinterpret_cast<T*>(raw + kGuardBytes);
  }
  ~Dev() override { cudaFree(raw); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  size_t bytes() const { return n * sizeof(T); }
  void upload(const std::vector<T>& h) {
    cuda_ok(cudaMemcpy(p, h.data(), bytes(), cudaMemcpyHostToDevice), "upload");
    cuda_ok(cudaDeviceSynchronize(), "upload");
  }
  void fill_nan() {  // NaN for floats, -1 for integers
    cuda_ok(cudaMemset(p, 0xFF, bytes()), "cudaMemset");
    cuda_ok(cudaDeviceSynchronize(), "cudaMemset");
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    cuda_ok(cudaMemcpy(h.data(), p, bytes(), cudaMemcpyDeviceToHost), "download");
    return h;
  }
  bool guards_ok() const {
    std::vector<unsigned char> g(kGuardBytes);
    for (const unsigned char* zone : {raw, raw + kGuardBytes + bytes()}) {
      cuda_ok(cudaMemcpy(g.data(), zone, kGuardBytes, cudaMemcpyDeviceToHost), "guard");
      for (unsigned char c : g)
        if (c != kSentinel) return false;
    }
    return true;
  }
};

// Owns the buffers of one case; they are freed when the case ends.
struct Pool {
  std::vector<std::unique_ptr<DevBase>> bufs;
  template <class T>
  Dev<T>& in(const std::vector<T>& h) {
    Dev<T>& d = add(std::make_unique<Dev<T>>(h.size()));
    d.upload(h);
    return d;
  }
  template <class T>
  Dev<T>& out(size_t n) {  // an "=" output: starts as NaN (-1 for integers)
    Dev<T>& d = add(std::make_unique<Dev<T>>(n));
    d.fill_nan();
    return d;
  }
  template <class T>
  Dev<T>& add(std::unique_ptr<Dev<T>> d) {
    Dev<T>& r = *d;
    bufs.push_back(std::move(d));
    return r;
  }
};

// ---- host data --------------------------------------------------------------------------------
std::vector<float> uniform(size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g_rng);
  return v;
}
// bf16 values and the same values as fp32 (what the CPU reference reads)
struct Bf {
  std::vector<bf16> h;
  std::vector<float> f;
};
Bf bf_uniform(size_t n, float lo, float hi) {
  Bf r;
  r.h.resize(n);
  r.f.resize(n);
  std::uniform_real_distribution<float> d(lo, hi);
  for (size_t i = 0; i < n; ++i) {
    r.h[i] = __float2bfloat16_rn(d(g_rng));
    r.f[i] = __bfloat162float(r.h[i]);
  }
  return r;
}
std::vector<float> to_f(const std::vector<bf16>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = __bfloat162float(v[i]);
  return r;
}
template <class T>
std::vector<float> to_f(const std::vector<T>& v) {
  return std::vector<float>(v.begin(), v.end());
}
int rand_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g_rng); }

// K distinct experts per token. mode 0: any of E; 1: only every third expert (the others get
// no token); 2: always experts 0..K-1 (all tokens on the same K experts; with K = 1, one expert).
std::vector<int32_t> routing(int64_t N, int64_t E, int64_t K, int mode) {
  std::vector<int32_t> idx(N * K);
  std::vector<int32_t> pool;
  for (int32_t e = 0; e < E; ++e)
    if (mode != 1 || e % 3 == 0) pool.push_back(e);
  for (int64_t n = 0; n < N; ++n) {
    if (mode == 2) {
      for (int64_t j = 0; j < K; ++j) idx[n * K + j] = int32_t(K - 1 - j);
      continue;
    }
    std::shuffle(pool.begin(), pool.end(), g_rng);
    for (int64_t j = 0; j < K; ++j) idx[n * K + j] = pool[j];
  }
  return idx;
}

// ---- checking -------------------------------------------------------------------------------
struct OpStats {
  int checks = 0, fails = 0, skips = 0;
  double worst = 0.0;  // largest nmse / limit (limit 0: nmse itself)
};
std::map<std::string, OpStats> g_stats;
int g_failures = 0;

void record(const std::string& op, const std::string& what, const std::string& shape, bool ok,
            double nmse, double limit, const std::string& note) {
  std::printf("%-4s %-20s %-9s %-30s nmse=%.2e (limit %.0e)%s%s\n", ok ? "OK" : "FAIL", op.c_str(),
              what.c_str(), shape.c_str(), nmse, limit, note.empty() ? "" : "  ", note.c_str());
  std::fflush(stdout);
  OpStats& s = g_stats[op];
  s.checks++;
  if (!ok) {
    s.fails++;
    g_failures++;
  }
  const double ratio = limit > 0 ? nmse / limit : nmse;
  if (std::isfinite(ratio)) s.worst = std::max(s.worst, ratio);
}

// A case an implementation does not support: said, counted, not a failure.
void skip(const std::string& op, const std::string& shape, const std::string& why) {
  std::printf("%-4s %-20s %-9s %-30s %s\n", "SKIP", op.c_str(), "-", shape.c_str(), why.c_str());
  std::fflush(stdout);
  g_stats[op].skips++;
}

// got (CUDA) against ref (CPU): NMSE, non-finite values where the reference is finite.
void check(const std::string& op, const std::string& what, const std::string& shape,
           const std::vector<float>& got, const std::vector<float>& ref, double limit,
           bool guards) {
  double num = 0, den = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isfinite(ref[i]) != std::isfinite(got[i])) {
      ++bad;
      continue;
    }
    if (!std::isfinite(ref[i])) continue;
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  const double nmse = den > 0 ? num / den : num;
  std::string note;
  if (bad) note += std::to_string(bad) + " NaN/Inf mismatches; ";
  if (!guards) note += "sentinel zone overwritten (out-of-bounds write); ";
  record(op, what, shape, bad == 0 && guards && nmse <= limit, nmse, limit, note);
}
template <class T>
void check(const std::string& op, const std::string& what, const std::string& shape,
           const Dev<T>& got, const std::vector<float>& ref, double limit) {
  check(op, what, shape, to_f(got.download()), ref, limit, got.guards_ok());
}
void check_i32(const std::string& op, const std::string& what, const std::string& shape,
               const Dev<int32_t>& got, const std::vector<int32_t>& ref) {
  auto g = got.download();
  int64_t diff = 0;
  for (size_t i = 0; i < ref.size(); ++i) diff += g[i] != ref[i];
  std::string note =
      diff ? std::to_string(diff) + " of " + std::to_string(ref.size()) + " differ" : "";
  const bool guards = got.guards_ok();
  if (!guards) note += " sentinel zone overwritten";
  record(op, what, shape, diff == 0 && guards, double(diff), kExact, note);
}

std::string shape_str(std::initializer_list<std::pair<const char*, int64_t>> dims) {
  std::string s;
  for (auto& [k, v] : dims) s += (s.empty() ? "" : " ") + std::string(k) + "=" + std::to_string(v);
  return s;
}

void sync(const cu::Ctx& ctx) { CUDA_CHECK(cudaStreamSynchronize(ctx.stream)); }

// Mean milliseconds of `iters` calls of f on ctx.stream, after one warm-up call (first launch:
// module load, cuDNN/CUTLASS set-up).
template <class F>
double mean_ms(const cu::Ctx& ctx, F&& f, int iters) {
  f();
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  CUDA_CHECK(cudaEventRecord(e0, ctx.stream));
  for (int i = 0; i < iters; ++i) f();
  CUDA_CHECK(cudaEventRecord(e1, ctx.stream));
  CUDA_CHECK(cudaEventSynchronize(e1));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  return double(ms) / iters;
}

// ---- cases, one function per op file ---------------------------------------------------------

void case_embedding(const cu::Ctx& ctx, int64_t V, int64_t N, int64_t C) {
  const std::string sh = shape_str({{"V", V}, {"N", N}, {"C", C}});
  Pool pool;
  Bf wte = bf_uniform(V * C, -1, 1);
  std::vector<int64_t> ids(N);
  for (auto& id : ids) id = rand_int(0, int(std::min<int64_t>(V, N / 2 + 1)) - 1);  // repeats
  std::vector<float> out_ref(N * C);
  cpu::embedding_fwd(out_ref.data(), ids.data(), wte.f.data(), N, C);
  auto& d_ids = pool.in(ids);
  auto& d_wte = pool.in(wte.h);
  auto& d_out = pool.out<bf16>(N * C);
  cu::embedding_fwd(d_out.p, d_ids.p, d_wte.p, N, C, ctx);
  sync(ctx);
  check("embedding_fwd", "out", sh, d_out, out_ref, kExact);

  Bf dout = bf_uniform(N * C, -1, 1);
  std::vector<float> dwte = uniform(V * C, -1, 1);
  auto& d_dout = pool.in(dout.h);
  auto& d_dwte = pool.in(dwte);
  cpu::embedding_bwd(dwte.data(), dout.f.data(), ids.data(), N, C);
  cu::embedding_bwd(d_dwte.p, d_dout.p, d_ids.p, N, C, ctx);
  sync(ctx);
  check("embedding_bwd", "dwte", sh, d_dwte, dwte, kF32);
}

void case_rmsnorm(const cu::Ctx& ctx, int64_t N, int64_t C) {
  const std::string sh = shape_str({{"N", N}, {"C", C}});
  Pool pool;
  const float eps = 1e-6f;
  Bf x = bf_uniform(N * C, -2, 2), w = bf_uniform(C, 0.5f, 1.5f);
  std::vector<float> out_ref(N * C), rstd_ref(N);
  cpu::rmsnorm_fwd(out_ref.data(), rstd_ref.data(), x.f.data(), w.f.data(), N, C, eps);
  auto& d_x = pool.in(x.h);
  auto& d_w = pool.in(w.h);
  auto& d_out = pool.out<bf16>(N * C);
  auto& d_rstd = pool.out<float>(N);
  cu::rmsnorm_fwd(d_out.p, d_rstd.p, d_x.p, d_w.p, N, C, eps, ctx);
  sync(ctx);
  check("rmsnorm_fwd", "out", sh, d_out, out_ref, kBf16Out);
  check("rmsnorm_fwd", "rstd", sh, d_rstd, rstd_ref, kF32);

  Bf dout = bf_uniform(N * C, -1, 1);
  std::vector<float> dx_ref(N * C), dw = uniform(C, -1, 1);
  auto& d_dout = pool.in(dout.h);
  auto& d_dw = pool.in(dw);
  auto& d_dx = pool.out<bf16>(N * C);
  cpu::rmsnorm_bwd(dx_ref.data(), dw.data(), dout.f.data(), x.f.data(), w.f.data(),
                   rstd_ref.data(), N, C);
  cu::rmsnorm_bwd(d_dx.p, 0.f, d_dw.p, d_dout.p, d_x.p, d_w.p, d_rstd.p, N, C, ctx);
  sync(ctx);
  check("rmsnorm_bwd", "dx", sh, d_dx, dx_ref, kBf16Chain);
  check("rmsnorm_bwd", "dw", sh, d_dw, dw, kF32);
  // dx_beta = 1: the residual gradient already in dx is added in the same pass (dw accumulates
  // a second time)
  Bf res = bf_uniform(N * C, -1, 1);
  auto& d_acc = pool.in(res.h);
  for (int64_t i = 0; i < N * C; ++i) dx_ref[i] += res.f[i];
  cpu::rmsnorm_bwd(out_ref.data(), dw.data(), dout.f.data(), x.f.data(), w.f.data(),
                   rstd_ref.data(), N, C);  // out_ref: scratch for the dx this call discards
  cu::rmsnorm_bwd(d_acc.p, 1.f, d_dw.p, d_dout.p, d_x.p, d_w.p, d_rstd.p, N, C, ctx);
  sync(ctx);
  check("rmsnorm_bwd", "dx+=", sh, d_acc, dx_ref, kBf16Chain);
  check("rmsnorm_bwd", "dw+=", sh, d_dw, dw, kF32);
}

// The fused forward pairs: against the CPU ops they replace, and against the two CUDA ops
// (the same bits expected; the limit lets a rare ulp of a different FMA contraction through).
void case_add_rmsnorm(const cu::Ctx& ctx, int64_t N, int64_t C) {
  const std::string sh = shape_str({{"N", N}, {"C", C}});
  Pool pool;
  const float eps = 1e-6f;
  Bf a = bf_uniform(N * C, -2, 2), b = bf_uniform(N * C, -2, 2), w = bf_uniform(C, 0.5f, 1.5f);
  std::vector<float> sum_ref(N * C), out_ref(N * C), rstd_ref(N);
  for (int64_t i = 0; i < N * C; ++i) sum_ref[i] = a.f[i] + b.f[i];
  cpu::rmsnorm_fwd(out_ref.data(), rstd_ref.data(), sum_ref.data(), w.f.data(), N, C, eps);
  auto& d_a = pool.in(a.h);
  auto& d_b = pool.in(b.h);
  auto& d_w = pool.in(w.h);
  auto& d_sum = pool.out<bf16>(N * C);
  auto& d_out = pool.out<bf16>(N * C);
  auto& d_rstd = pool.out<float>(N);
  auto& d_sum2 = pool.out<bf16>(N * C);
  auto& d_out2 = pool.out<bf16>(N * C);
  auto& d_rstd2 = pool.out<float>(N);
  cu::add_rmsnorm_fwd(d_sum.p, d_out.p, d_rstd.p, d_a.p, d_b.p, d_w.p, N, C, eps, ctx);
  cu::add(d_sum2.p, d_a.p, d_b.p, N * C, ctx);
  cu::rmsnorm_fwd(d_out2.p, d_rstd2.p, d_sum2.p, d_w.p, N, C, eps, ctx);
  sync(ctx);
  check("add_rmsnorm_fwd", "sum", sh, d_sum, sum_ref, kBf16Out);
  check("add_rmsnorm_fwd", "out", sh, d_out, out_ref, kBf16Chain);
  check("add_rmsnorm_fwd", "rstd", sh, d_rstd, rstd_ref, kF32);
  check("add_rmsnorm_fwd", "out=add;norm", sh, d_out, to_f(d_out2.download()), kF32Exact);
  check("add_rmsnorm_fwd", "rstd=add;norm", sh, d_rstd, d_rstd2.download(), kF32Exact);
}

void case_qk_norm_rope(const cu::Ctx& ctx, int64_t N, int64_t H, int64_t D, float theta) {
  const std::string sh = shape_str({{"N", N}, {"H", H}, {"D", D}});
  Pool pool;
  const float eps = 1e-6f;
  Bf x = bf_uniform(N * H * D, -2, 2), w = bf_uniform(D, 0.5f, 1.5f);
  std::vector<int32_t> pos(N);
  for (auto& p : pos) p = rand_int(0, 4095);
  std::vector<float> normed(N * H * D), rstd_ref(N * H), out_ref(N * H * D);
  cpu::rmsnorm_fwd(normed.data(), rstd_ref.data(), x.f.data(), w.f.data(), N * H, D, eps);
  cpu::rope_fwd(out_ref.data(), normed.data(), pos.data(), N, H, D, theta);
  auto& d_x = pool.in(x.h);
  auto& d_w = pool.in(w.h);
  auto& d_pos = pool.in(pos);
  auto& d_out = pool.out<bf16>(N * H * D);
  auto& d_rstd = pool.out<float>(N * H);
  auto& d_out2 = pool.out<bf16>(N * H * D);
  auto& d_rstd2 = pool.out<float>(N * H);
  cu::qk_norm_rope_fwd(d_out.p, d_rstd.p, d_x.p, d_w.p, d_pos.p, N, H, D, eps, theta, ctx);
  cu::rmsnorm_fwd(d_out2.p, d_rstd2.p, d_x.p, d_w.p, N * H, D, eps, ctx);
  cu::rope_fwd(d_out2.p, d_out2.p, d_pos.p, N, H, D, theta, ctx);  // in place, as the model
  sync(ctx);
  check("qk_norm_rope_fwd", "out", sh, d_out, out_ref, kBf16Chain);
  check("qk_norm_rope_fwd", "rstd", sh, d_rstd, rstd_ref, kF32);
  check("qk_norm_rope_fwd", "out=norm;rope", sh, d_out, to_f(d_out2.download()), kF32Exact);
  check("qk_norm_rope_fwd", "rstd=norm;rope", sh, d_rstd, d_rstd2.download(), kF32Exact);
  if (!cu::qk_norm_rope_bwd_fused(D)) return;

  // the backward, in place as the model runs it (dx over dout), against rope_bwd then
  // rmsnorm_bwd on the CPU (dw accumulates onto random values)
  Bf dout = bf_uniform(N * H * D, -1, 1);
  std::vector<float> dn(N * H * D), dx_ref(N * H * D), dw = uniform(D, -1, 1);
  auto& d_g = pool.in(dout.h);
  auto& d_dw = pool.in(dw);
  cpu::rope_bwd(dn.data(), dout.f.data(), pos.data(), N, H, D, theta);
  cpu::rmsnorm_bwd(dx_ref.data(), dw.data(), dn.data(), x.f.data(), w.f.data(), rstd_ref.data(),
                   N * H, D);
  cu::qk_norm_rope_bwd(d_g.p, d_dw.p, d_g.p, d_x.p, d_w.p, d_rstd.p, d_pos.p, N, H, D, theta,
                       ctx);
  sync(ctx);
  check("qk_norm_rope_bwd", "dx", sh, d_g, dx_ref, kBf16Chain);
  check("qk_norm_rope_bwd", "dw", sh, d_dw, dw, kF32);
}

void case_linear(const cu::Ctx& ctx, int64_t N, int64_t I, int64_t O, bool bias, float dx_beta) {
  const std::string sh = shape_str({{"N", N}, {"I", I}, {"O", O}, {"bias", bias}}) +
                         (dx_beta != 0 ? " dx+=" : "");
  Pool pool;
  const float ws = 1.0f / std::sqrt(float(I));
  Bf x = bf_uniform(N * I, -1, 1), w = bf_uniform(O * I, -ws, ws), b = bf_uniform(O, -1, 1);
  std::vector<float> out_ref(N * O);
  cpu::linear_fwd(out_ref.data(), x.f.data(), w.f.data(), bias ? b.f.data() : nullptr, N, I, O);
  auto& d_x = pool.in(x.h);
  auto& d_w = pool.in(w.h);
  auto& d_b = pool.in(b.h);
  auto& d_out = pool.out<bf16>(N * O);
  cu::linear_fwd(d_out.p, d_x.p, d_w.p, bias ? d_b.p : nullptr, N, I, O, ctx);
  sync(ctx);
  check("linear_fwd", "out", sh, d_out, out_ref, kBf16Out);

  Bf dout = bf_uniform(N * O, -1, 1), dx0 = bf_uniform(N * I, -1, 1);
  std::vector<float> dx_ref = dx0.f, dw = uniform(O * I, -1, 1), db = uniform(O, -1, 1);
  auto& d_dout = pool.in(dout.h);
  auto& d_dx = pool.in(dx0.h);
  if (dx_beta == 0) d_dx.fill_nan();  // beta 0 must not read dx (NaN * 0 would show)
  auto& d_dw = pool.in(dw);
  auto& d_db = pool.in(db);
  cpu::linear_bwd(dx_ref.data(), dx_beta, dw.data(), bias ? db.data() : nullptr, dout.f.data(),
                  x.f.data(), w.f.data(), N, I, O);
  cu::linear_bwd(d_dx.p, dx_beta, d_dw.p, bias ? d_db.p : nullptr, d_dout.p, d_x.p, d_w.p, N, I,
                 O, ctx);
  sync(ctx);
  check("linear_bwd", "dx", sh, d_dx, dx_ref, kBf16Out);
  check("linear_bwd", "dw", sh, d_dw, dw, kF32);
  if (bias) check("linear_bwd", "db", sh, d_db, db, kF32);
}

void case_rope(const cu::Ctx& ctx, int64_t N, int64_t H, int64_t D, float theta) {
  const std::string sh = shape_str({{"N", N}, {"H", H}, {"D", D}});
  Pool pool;
  Bf x = bf_uniform(N * H * D, -1, 1), dout = bf_uniform(N * H * D, -1, 1);
  std::vector<int32_t> pos(N);
  for (auto& p : pos) p = rand_int(0, 4095);
  std::vector<float> out_ref(N * H * D), dx_ref(N * H * D);
  cpu::rope_fwd(out_ref.data(), x.f.data(), pos.data(), N, H, D, theta);
  cpu::rope_bwd(dx_ref.data(), dout.f.data(), pos.data(), N, H, D, theta);
  auto& d_x = pool.in(x.h);
  auto& d_pos = pool.in(pos);
  auto& d_out = pool.out<bf16>(N * H * D);
  auto& d_g = pool.in(dout.h);  // backward in place: dx overwrites dout
  cu::rope_fwd(d_out.p, d_x.p, d_pos.p, N, H, D, theta, ctx);
  cu::rope_bwd(d_g.p, d_g.p, d_pos.p, N, H, D, theta, ctx);
  sync(ctx);
  check("rope_fwd", "out", sh, d_out, out_ref, kBf16Out);
  check("rope_bwd", "dx(inpl)", sh, d_g, dx_ref, kBf16Out);
}

// lse[b,h,t] of the masked, scaled scores, in double (the CPU op saves probabilities instead).
std::vector<float> attention_lse(const std::vector<float>& q, const std::vector<float>& k,
                                 const std::vector<int32_t>* doc, int64_t B, int64_t T,
                                 int64_t nH, int64_t nKV, int64_t D) {
  std::vector<float> lse(B * nH * T);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> sc(T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nH; ++h)
      for (int64_t t = 0; t < T; ++t) {
        double mx = -INFINITY;
        for (int64_t s = 0; s <= t; ++s) {
          sc[s] = -INFINITY;
          if (doc && (*doc)[b * T + s] != (*doc)[b * T + t]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += double(q[((b * T + t) * nH + h) * D + d]) *
                   k[((b * T + s) * nKV + h / (nH / nKV)) * D + d];
          sc[s] = dot * scale;
          mx = std::max(mx, sc[s]);
        }
        double sum = 0;
        for (int64_t s = 0; s <= t; ++s)
          if (sc[s] != -INFINITY) sum += std::exp(sc[s] - mx);
        lse[(b * nH + h) * T + t] = float(mx + std::log(sum));
      }
  return lse;
}

// The attention implementations checked (ops_cuda.h): cuDNN SDPA and the fallback kernel.
struct AttnImpl {
  cu::AttentionImpl impl;
  const char* tag;
};
constexpr AttnImpl kAttnImpls[] = {{cu::AttentionImpl::kCudnn, "cudnn"},
                                   {cu::AttentionImpl::kFallback, "fallback"}};

// Why `impl` cannot run this case's fwd or bwd ("" when it can): cuDNN's support check.
std::string attention_skip_reason(cu::AttentionImpl impl, bool bwd, int64_t B, int64_t T,
                                  int64_t nH, int64_t nKV, int64_t D, bool doc,
                                  int64_t segments) {
  if (impl != cu::AttentionImpl::kCudnn) return "";
  return cu::attention_cudnn_unsupported(bwd, B, T, nH, nKV, D, doc, segments);
}

// Random document cuts: docs documents of random lengths per row.
std::vector<int32_t> attention_docs(int64_t B, int64_t T, int docs) {
  std::vector<int32_t> doc(B * T);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> cuts{0, T};
    for (int i = 1; i < docs; ++i) cuts.push_back(rand_int(1, int(T) - 1));
    std::sort(cuts.begin(), cuts.end());
    for (size_t i = 0; i + 1 < cuts.size(); ++i)
      for (int64_t t = cuts[i]; t < cuts[i + 1]; ++t) doc[b * T + t] = int32_t(i);
  }
  return doc;
}

// Document ids from explicit lengths per row (each row's lengths sum to T).
std::vector<int32_t> attention_docs_from(int64_t T, const std::vector<std::vector<int>>& rows) {
  std::vector<int32_t> doc;
  for (const auto& row : rows) {
    int64_t n = 0;
    for (size_t i = 0; i < row.size(); ++i)
      for (int j = 0; j < row[i]; ++j, ++n) doc.push_back(int32_t(i));
    if (n != T) throw automoe::Error("op_check: document lengths of a row must sum to T");
  }
  return doc;
}

// The documents of a packed batch as "docs=[5,1,7|13]" (lengths per row, rows split by |; long
// rows as a count), then the segment count and cuDNN's bucket.
std::string docs_str(const std::vector<int32_t>& doc, int64_t B, int64_t T, int64_t segments) {
  std::string s = "docs=[";
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> lens;
    for (int64_t t = 0; t < T; ++t)
      if (t == 0 || doc[b * T + t] != doc[b * T + t - 1]) lens.push_back(1);
      else ++lens.back();
    if (b) s += "|";
    if (lens.size() > 10) {
      s += std::to_string(lens.size()) + " docs";
      continue;
    }
    for (size_t i = 0; i < lens.size(); ++i) s += (i ? "," : "") + std::to_string(lens[i]);
  }
  s += "] seqs=" + std::to_string(segments);
  if (segments == B) s += "(causal graph)";  // one document per row: cuDNN's plain causal graph
  else if (segments > 0) s += " bucket=" + std::to_string(cu::attention_segment_bucket(segments));
  return s;
}

// Each implementation against the CPU op (the same reference for both). doc empty: plain
// causal; otherwise document ids [B*T], given to cuDNN as a segment table (packed sequences).
void case_attention_doc(const cu::Ctx& ctx, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                        int64_t D, const std::vector<int32_t>& doc) {
  const bool has_doc = !doc.empty();
  // the segment table, as the model builds it on the host (uploaded below)
  std::vector<unsigned char> table(cu::attention_segments_bytes(B, T));
  const int64_t segments =
      has_doc ? cu::attention_segments_build(table.data(), doc.data(), B, T, nH, nKV, D) : 0;
  std::string sh = shape_str({{"B", B}, {"T", T}, {"nH", nH}, {"nKV", nKV}, {"D", D}});
  if (has_doc) sh += " " + docs_str(doc, B, T, segments);
  const int64_t nq = B * T * nH * D, nk = B * T * nKV * D;
  Bf q = bf_uniform(nq, -1, 1), k = bf_uniform(nk, -1, 1), v = bf_uniform(nk, -1, 1);
  Bf dout = bf_uniform(nq, -1, 1);
  const int32_t* doc_p = has_doc ? doc.data() : nullptr;
  std::vector<float> out_ref(nq), att(B * nH * T * T), dq_ref(nq), dk_ref(nk), dv_ref(nk);
  cpu::attention_fwd(out_ref.data(), att.data(), q.f.data(), k.f.data(), v.f.data(), doc_p, B, T,
                     nH, nKV, D);
  cpu::attention_bwd(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.f.data(), att.data(),
                     q.f.data(), k.f.data(), v.f.data(), B, T, nH, nKV, D);
  std::vector<float>().swap(att);
  std::vector<float> lse_ref = attention_lse(q.f, k.f, has_doc ? &doc : nullptr, B, T, nH, nKV, D);

  for (const AttnImpl& im : kAttnImpls) {
    const std::string fwd_op = std::string("attention_fwd.") + im.tag;
    const std::string bwd_op = std::string("attention_bwd.") + im.tag;
    const std::string why_fwd =
        attention_skip_reason(im.impl, false, B, T, nH, nKV, D, has_doc, segments);
    const std::string why_bwd =
        attention_skip_reason(im.impl, true, B, T, nH, nKV, D, has_doc, segments);
    // a skipped forward still runs (the fallback) to give the backward its out and lse
    cu::set_attention_impl(why_fwd.empty() ? im.impl : cu::AttentionImpl::kFallback);
    const double lim = im.impl == cu::AttentionImpl::kCudnn ? kFlash : kBf16Out;
    const double lim_bwd = im.impl == cu::AttentionImpl::kCudnn ? kFlash : kBf16Chain;
    Pool pool;
    auto& d_q = pool.in(q.h);
    auto& d_k = pool.in(k.h);
    auto& d_v = pool.in(v.h);
    auto& d_doc = pool.in(has_doc ? doc : std::vector<int32_t>(1));
    auto& d_table = pool.in(table);
    auto& d_out = pool.out<bf16>(nq);
    auto& d_lse = pool.out<float>(B * nH * T);
    const int32_t* d_doc_p = has_doc ? d_doc.p : nullptr;
    cu::AttentionSegments seg;
    seg.table = d_table.p;
    seg.count = segments;
    const cu::AttentionSegments* seg_p = has_doc ? &seg : nullptr;
    cu::attention_fwd(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, d_doc_p, seg_p, B, T, nH, nKV, D,
                      ctx);
    sync(ctx);
    if (why_fwd.empty()) {
      check(fwd_op, "out", sh, d_out, out_ref, lim);
      check(fwd_op, "lse", sh, d_lse, lse_ref, kF32);
    } else {
      skip(fwd_op, sh, why_fwd);
    }
    if (!why_bwd.empty()) {
      skip(bwd_op, sh, why_bwd);
      continue;
    }
    cu::set_attention_impl(im.impl);
    auto& d_dout = pool.in(dout.h);
    auto& d_dq = pool.out<bf16>(nq);
    auto& d_dk = pool.out<bf16>(nk);
    auto& d_dv = pool.out<bf16>(nk);
    cu::attention_bwd(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p,
                      d_doc_p, seg_p, B, T, nH, nKV, D, ctx);
    sync(ctx);
    check(bwd_op, "dq", sh, d_dq, dq_ref, lim_bwd);
    check(bwd_op, "dk", sh, d_dk, dk_ref, lim_bwd);
    check(bwd_op, "dv", sh, d_dv, dv_ref, lim_bwd);
  }
  cu::set_attention_impl(cu::AttentionImpl::kAuto);
}

// The tail of a split sequence (cuDNN only): Tq queries at the end of Tkv keys against the CPU
// op attention_tail_*; dk and dv start from `prior` rows (the op adds onto them). lse in double.
void case_attention_tail(int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D) {
  const std::string sh = shape_str({{"B", B}, {"Tq", Tq}, {"Tkv", Tkv}, {"nH", nH}, {"nKV", nKV},
                                    {"D", D}});
  std::string why = cu::attention_tail_unsupported(false, B, Tq, Tkv, nH, nKV, D);
  if (why.empty()) why = cu::attention_tail_unsupported(true, B, Tq, Tkv, nH, nKV, D);
  if (!why.empty()) {
    skip("attention_tail_fwd", sh, why);
    skip("attention_tail_bwd", sh, why);
    return;
  }
  cu::ScopedCtx owner(std::max(cu::attention_tail_workspace_bytes(false, B, Tq, Tkv, nH, nKV, D),
                               cu::attention_tail_workspace_bytes(true, B, Tq, Tkv, nH, nKV, D)));
  const cu::Ctx& ctx = owner.ctx();
  const int64_t nq = B * Tq * nH * D, nk = B * Tkv * nKV * D, off = Tkv - Tq;
  Bf q = bf_uniform(nq, -1, 1), k = bf_uniform(nk, -1, 1), v = bf_uniform(nk, -1, 1);
  Bf dout = bf_uniform(nq, -1, 1), prior_k = bf_uniform(nk, -1, 1), prior_v = bf_uniform(nk, -1, 1);
  std::vector<float> out_ref(nq), att(B * nH * Tq * Tkv), dq_ref(nq), dk_ref = prior_k.f,
                                                                      dv_ref = prior_v.f;
  cpu::attention_tail_fwd(out_ref.data(), att.data(), q.f.data(), k.f.data(), v.f.data(), B, Tq,
                          Tkv, nH, nKV, D);
  cpu::attention_tail_bwd(dq_ref.data(), dk_ref.data(), dv_ref.data(), dout.f.data(), att.data(),
                          q.f.data(), k.f.data(), v.f.data(), B, Tq, Tkv, nH, nKV, D);
  std::vector<float> lse_ref(B * nH * Tq);
  const double scale = 1.0 / std::sqrt(double(D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nH; ++h)
      for (int64_t i = 0; i < Tq; ++i) {
        std::vector<double> sc;
        double mx = -INFINITY;
        for (int64_t s = 0; s <= off + i; ++s) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += double(q.f[((b * Tq + i) * nH + h) * D + d]) *
                   k.f[((b * Tkv + s) * nKV + h / (nH / nKV)) * D + d];
          sc.push_back(dot * scale);
          mx = std::max(mx, sc.back());
        }
        double sum = 0;
        for (double x : sc) sum += std::exp(x - mx);
        lse_ref[(b * nH + h) * Tq + i] = float(mx + std::log(sum));
      }
  Pool pool;
  auto& d_q = pool.in(q.h);
  auto& d_k = pool.in(k.h);
  auto& d_v = pool.in(v.h);
  auto& d_out = pool.out<bf16>(nq);
  auto& d_lse = pool.out<float>(B * nH * Tq);
  cu::attention_tail_fwd(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, B, Tq, Tkv, nH, nKV, D, ctx);
  sync(ctx);
  check("attention_tail_fwd", "out", sh, d_out, out_ref, kFlash);
  check("attention_tail_fwd", "lse", sh, d_lse, lse_ref, kF32);
  auto& d_dout = pool.in(dout.h);
  auto& d_dq = pool.out<bf16>(nq);
  auto& d_dk = pool.in(prior_k.h);  // += onto the prior rows
  auto& d_dv = pool.in(prior_v.h);
  cu::attention_tail_bwd(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p,
                         B, Tq, Tkv, nH, nKV, D, ctx);
  sync(ctx);
  check("attention_tail_bwd", "dq", sh, d_dq, dq_ref, kFlash);
  check("attention_tail_bwd", "dk(+=)", sh, d_dk, dk_ref, kFlash);
  check("attention_tail_bwd", "dv(+=)", sh, d_dv, dv_ref, kFlash);
}

// docs random documents per row (1: plain causal).
void case_attention(const cu::Ctx& ctx, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                    int64_t D, int docs) {
  std::vector<int32_t> doc = attention_docs(B, T, docs);
  if (docs <= 1) doc.clear();
  case_attention_doc(ctx, B, T, nH, nKV, D, doc);
}

// Explicit document lengths per row.
void case_attention_lens(const cu::Ctx& ctx, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                         const std::vector<std::vector<int>>& rows) {
  case_attention_doc(ctx, int64_t(rows.size()), T, nH, nKV, D, attention_docs_from(T, rows));
}

// A large shape where the CPU reference is too slow (W1: B=2, T=4096, nH=32, nKV=4, D=128):
// cuDNN against the fallback kernel (each backward fed its own forward), then the time of each,
// in TFLOP/s of causal attention: fwd 4*D flops per (query, key <= query) pair and head, bwd
// 2.5x that (five matmuls to the forward's two, the usual flash-attention count).
void case_attention_large(int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D) {
  const std::string sh = shape_str({{"B", B}, {"T", T}, {"nH", nH}, {"nKV", nKV}, {"D", D}});
  const int64_t nq = B * T * nH * D, nk = B * T * nKV * D;
  std::string why = cu::attention_cudnn_unsupported(false, B, T, nH, nKV, D, false);
  if (why.empty()) why = cu::attention_cudnn_unsupported(true, B, T, nH, nKV, D, false);
  const bool have_cudnn = why.empty();
  cu::set_attention_impl(cu::AttentionImpl::kCudnn);
  size_t ws = cu::attention_bwd_workspace_bytes(B, T, nH, nKV, D, false);
  if (have_cudnn)
    ws = std::max(ws, cu::attention_fwd_workspace_bytes(B, T, nH, nKV, D, false));
  std::printf("attention %s: workspace %.1f MiB (fwd+bwd, cuDNN and fallback)\n", sh.c_str(),
              double(ws) / (1 << 20));
  cu::ScopedCtx owner(ws);
  const cu::Ctx& ctx = owner.ctx();

  Bf q = bf_uniform(nq, -2, 2), k = bf_uniform(nk, -1, 1), v = bf_uniform(nk, -1, 1);
  Bf dout = bf_uniform(nq, -1, 1);
  Pool pool;
  auto& d_q = pool.in(q.h);
  auto& d_k = pool.in(k.h);
  auto& d_v = pool.in(v.h);
  auto& d_dout = pool.in(dout.h);
  struct Outs {
    Dev<bf16>*out, *dq, *dk, *dv;
    Dev<float>* lse;
  } o[2];
  for (auto& x : o) {
    x.out = &pool.out<bf16>(nq);
    x.lse = &pool.out<float>(B * nH * T);
    x.dq = &pool.out<bf16>(nq);
    x.dk = &pool.out<bf16>(nk);
    x.dv = &pool.out<bf16>(nk);
  }
  auto fwd = [&](const Outs& x) {
    cu::attention_fwd(x.out->p, x.lse->p, d_q.p, d_k.p, d_v.p, nullptr, nullptr, B, T, nH, nKV, D,
                      ctx);
  };
  auto bwd = [&](const Outs& x) {
    cu::attention_bwd(x.dq->p, x.dk->p, x.dv->p, d_dout.p, x.out->p, x.lse->p, d_q.p, d_k.p,
                      d_v.p, nullptr, nullptr, B, T, nH, nKV, D, ctx);
  };

  // the fallback is the reference here (fp32 softmax and sums, no bf16 intermediates)
  cu::set_attention_impl(cu::AttentionImpl::kFallback);
  fwd(o[1]);
  bwd(o[1]);
  sync(ctx);
  const std::vector<float> out_ref = to_f(o[1].out->download()), lse_ref = o[1].lse->download();
  const std::vector<float> dq_ref = to_f(o[1].dq->download()), dk_ref = to_f(o[1].dk->download());
  const std::vector<float> dv_ref = to_f(o[1].dv->download());
  if (have_cudnn) {
    cu::set_attention_impl(cu::AttentionImpl::kCudnn);
    fwd(o[0]);
    bwd(o[0]);
    sync(ctx);
    check("attention_fwd.cudnn", "out~fb", sh, *o[0].out, out_ref, kFlash);
    check("attention_fwd.cudnn", "lse~fb", sh, *o[0].lse, lse_ref, kF32);
    check("attention_bwd.cudnn", "dq~fb", sh, *o[0].dq, dq_ref, kFlash);
    check("attention_bwd.cudnn", "dk~fb", sh, *o[0].dk, dk_ref, kFlash);
    check("attention_bwd.cudnn", "dv~fb", sh, *o[0].dv, dv_ref, kFlash);
  } else {
    skip("attention_fwd.cudnn", sh, why);
    skip("attention_bwd.cudnn", sh, why);
  }

  const double pairs = double(T) * double(T + 1) / 2;
  const double fwd_flop = 4.0 * double(D) * pairs * double(B) * double(nH);
  const double bwd_flop = 2.5 * fwd_flop;
  for (int i = have_cudnn ? 0 : 1; i < 2; ++i) {
    cu::set_attention_impl(kAttnImpls[i].impl);
    const int iters = i == 0 ? 20 : 2;
    const double f_ms = mean_ms(ctx, [&] { fwd(o[i]); }, iters);
    const double b_ms = mean_ms(ctx, [&] { bwd(o[i]); }, iters);
    std::printf("TIME attention %-8s %s: fwd %8.3f ms %6.1f TFLOP/s, bwd %8.3f ms %6.1f "
                "TFLOP/s (causal)\n",
                kAttnImpls[i].tag, sh.c_str(), f_ms, fwd_flop / (f_ms * 1e9), b_ms,
                bwd_flop / (b_ms * 1e9));
    std::fflush(stdout);
  }
  cu::set_attention_impl(cu::AttentionImpl::kAuto);
}

// W1's attention on a packed batch (B=2, T=4096, nH=32, nKV=4, D=128; documents of uneven
// lengths, one of length 1 in each row): both implementations against the CPU op (about 4.3 GB
// of CPU attention probabilities, a few seconds), in a Ctx sized by the op's own workspace
// queries with doc = true (what the model's plan() does), then the time of each in TFLOP/s
// counting only the causal-within-document pairs.
void case_attention_packed_w1(const std::vector<std::vector<int>>& rows) {
  const int64_t B = int64_t(rows.size()), T = 4096, nH = 32, nKV = 4, D = 128;
  const std::string sh0 = shape_str({{"B", B}, {"T", T}, {"nH", nH}, {"nKV", nKV}, {"D", D}});
  // sized as for cuDNN's packed graphs (kAuto plans for them only with
  // AUTOMOE_ATTENTION_PACKED=cudnn), which the cases below force
  cu::set_attention_impl(cu::AttentionImpl::kCudnn);
  const size_t ws = std::max(cu::attention_fwd_workspace_bytes(B, T, nH, nKV, D, true),
                             cu::attention_bwd_workspace_bytes(B, T, nH, nKV, D, true));
  cu::set_attention_impl(cu::AttentionImpl::kAuto);
  std::printf("attention packed %s: workspace %.1f MiB (fwd+bwd with documents: cuDNN's packed "
              "graphs of every bucket up to 1 GiB + Stats scratch, and the fallback)\n",
              sh0.c_str(), double(ws) / (1 << 20));
  std::string per_bucket;  // what each bucket's packed graphs need (fwd / bwd)
  auto mib = [&](bool bwd, int64_t S) {
    return double(cu::attention_packed_workspace_bytes(bwd, B, T, nH, nKV, D, S)) / (1 << 20);
  };
  for (int64_t S = cu::attention_segment_bucket(1); S <= B * T; S *= 2)
    per_bucket += fmt::format(" {}:{:.0f}/{:.0f}", S, mib(false, S), mib(true, S));
  std::printf("attention packed %s: workspace MiB per bucket (sequences:fwd/bwd, 0 = cuDNN cannot "
              "run it):%s\n", sh0.c_str(), per_bucket.c_str());
  cu::ScopedCtx owner(ws);
  const cu::Ctx& ctx = owner.ctx();
  const std::vector<int32_t> doc = attention_docs_from(T, rows);
  case_attention_doc(ctx, B, T, nH, nKV, D, doc);

  // timing: the same batch through each implementation
  std::vector<unsigned char> table(cu::attention_segments_bytes(B, T));
  const int64_t segments =
      cu::attention_segments_build(table.data(), doc.data(), B, T, nH, nKV, D);
  const std::string sh = sh0 + " " + docs_str(doc, B, T, segments);
  const int64_t nq = B * T * nH * D, nk = B * T * nKV * D;
  Bf q = bf_uniform(nq, -2, 2), k = bf_uniform(nk, -1, 1), v = bf_uniform(nk, -1, 1);
  Bf dout = bf_uniform(nq, -1, 1);
  Pool pool;
  auto& d_q = pool.in(q.h);
  auto& d_k = pool.in(k.h);
  auto& d_v = pool.in(v.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_doc = pool.in(doc);
  auto& d_table = pool.in(table);
  auto& d_out = pool.out<bf16>(nq);
  auto& d_lse = pool.out<float>(B * nH * T);
  auto& d_dq = pool.out<bf16>(nq);
  auto& d_dk = pool.out<bf16>(nk);
  auto& d_dv = pool.out<bf16>(nk);
  cu::AttentionSegments seg;
  seg.table = d_table.p;
  seg.count = segments;
  auto fwd = [&] {
    cu::attention_fwd(d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p, d_doc.p, &seg, B, T, nH, nKV, D,
                      ctx);
  };
  auto bwd = [&] {
    cu::attention_bwd(d_dq.p, d_dk.p, d_dv.p, d_dout.p, d_out.p, d_lse.p, d_q.p, d_k.p, d_v.p,
                      d_doc.p, &seg, B, T, nH, nKV, D, ctx);
  };
  double pairs = 0;  // (query, key <= query) pairs within documents
  for (int64_t i = 0; i < B * T;) {
    int64_t e = i + 1;
    while (e < B * T && e % T != 0 && doc[e] == doc[i]) ++e;
    pairs += double(e - i) * double(e - i + 1) / 2;
    i = e;
  }
  const double fwd_flop = 4.0 * double(D) * pairs * double(nH);
  const double bwd_flop = 2.5 * fwd_flop;
  std::string why = cu::attention_cudnn_unsupported(false, B, T, nH, nKV, D, true, segments);
  if (why.empty()) why = cu::attention_cudnn_unsupported(true, B, T, nH, nKV, D, true, segments);
  for (const AttnImpl& im : kAttnImpls) {
    if (im.impl == cu::AttentionImpl::kCudnn && !why.empty()) {
      std::printf("TIME attention packed cudnn %s: not run: %s\n", sh.c_str(), why.c_str());
      continue;
    }
    cu::set_attention_impl(im.impl);
    const int iters = im.impl == cu::AttentionImpl::kCudnn ? 20 : 2;
    const double f_ms = mean_ms(ctx, fwd, iters);
    const double b_ms = mean_ms(ctx, bwd, iters);
    std::printf("TIME attention packed %-8s %s: fwd %8.3f ms %6.1f TFLOP/s, bwd %8.3f ms %6.1f "
                "TFLOP/s (causal within documents)\n",
                im.tag, sh.c_str(), f_ms, fwd_flop / (f_ms * 1e9), b_ms, bwd_flop / (b_ms * 1e9));
    std::fflush(stdout);
  }
  cu::set_attention_impl(cu::AttentionImpl::kAuto);
}

void case_router(const cu::Ctx& ctx, int64_t N, int64_t E, int64_t K, bool norm, bool extra) {
  const std::string sh = shape_str({{"N", N}, {"E", E}, {"K", K}, {"norm", norm}});
  Pool pool;
  Bf logits = bf_uniform(N * E, -3, 3);
  std::vector<float> probs_ref(N * E), w_ref(N * K);
  std::vector<int32_t> idx_ref(N * K);
  cpu::router_fwd(probs_ref.data(), idx_ref.data(), w_ref.data(), logits.f.data(), N, E, K, norm);
  auto& d_logits = pool.in(logits.h);
  auto& d_probs = pool.out<float>(N * E);
  auto& d_idx = pool.out<int32_t>(N * K);
  auto& d_w = pool.out<float>(N * K);
  cu::router_fwd(d_probs.p, d_idx.p, d_w.p, d_logits.p, N, E, K, norm, ctx);
  sync(ctx);
  check("router_fwd", "probs", sh, d_probs, probs_ref, kF32);
  check_i32("router_fwd", "topk_idx", sh, d_idx, idx_ref);
  check("router_fwd", "topk_w", sh, d_w, w_ref, kF32);

  std::vector<float> dw = uniform(N * K, -1, 1), dextra = uniform(N * E, -1, 1);
  std::vector<float> dl_ref(N * E);
  cpu::router_bwd(dl_ref.data(), dw.data(), extra ? dextra.data() : nullptr, probs_ref.data(),
                  idx_ref.data(), N, E, K, norm);
  auto& d_dw = pool.in(dw);
  auto& d_extra = pool.in(dextra);
  auto& d_dl = pool.out<bf16>(N * E);
  cu::router_bwd(d_dl.p, d_dw.p, extra ? d_extra.p : nullptr, d_probs.p, d_idx.p, N, E, K, norm,
                 ctx);
  sync(ctx);
  check("router_bwd", "dlogits", sh + (extra ? " extra" : ""), d_dl, dl_ref, kBf16Chain);
}

// Layout, permute/unpermute and the grouped linear on one routing (mode: see routing()).
void case_moe(const cu::Ctx& ctx, int64_t N, int64_t E, int64_t K, int64_t C, int64_t O,
              int mode) {
  static const char* kModes[] = {"random", "sparse", "one-set"};
  const std::string sh =
      shape_str({{"N", N}, {"E", E}, {"K", K}, {"C", C}}) + " " + kModes[mode];
  Pool pool;
  const int64_t R = N * K;
  std::vector<int32_t> idx = routing(N, E, K, mode);
  std::vector<int32_t> off_ref(E + 1), row_ref(R);
  cpu::moe_layout(off_ref.data(), row_ref.data(), idx.data(), N, E, K);
  auto& d_idx = pool.in(idx);
  auto& d_off = pool.out<int32_t>(E + 1);
  auto& d_row = pool.out<int32_t>(R);
  cu::moe_layout(d_off.p, d_row.p, d_idx.p, N, E, K, ctx);
  sync(ctx);
  check_i32("moe_layout", "offsets", sh, d_off, off_ref);
  check_i32("moe_layout", "slot_row", sh, d_row, row_ref);

  // permute / unpermute (the CUDA side uses its own layout: equal when the check above passed)
  Bf x = bf_uniform(N * C, -1, 1), dxs = bf_uniform(R * C, -1, 1), ys = bf_uniform(R * C, -1, 1);
  Bf dout = bf_uniform(N * C, -1, 1);
  std::vector<float> w = uniform(N * K, 0, 1);
  std::vector<float> xs_ref(R * C), dx_ref(N * C), out_ref(N * C), dys_ref(R * C), dw_ref(N * K);
  cpu::permute_fwd(xs_ref.data(), x.f.data(), row_ref.data(), N, K, C);
  cpu::permute_bwd(dx_ref.data(), dxs.f.data(), row_ref.data(), N, K, C);
  cpu::unpermute_fwd(out_ref.data(), ys.f.data(), w.data(), row_ref.data(), N, K, C);
  cpu::unpermute_bwd(dys_ref.data(), dw_ref.data(), dout.f.data(), ys.f.data(), w.data(),
                     row_ref.data(), N, K, C);
  auto& d_x = pool.in(x.h);
  auto& d_dxs = pool.in(dxs.h);
  auto& d_ys = pool.in(ys.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_w = pool.in(w);
  auto& d_xs = pool.out<bf16>(R * C);
  auto& d_dx = pool.out<bf16>(N * C);
  auto& d_out = pool.out<bf16>(N * C);
  auto& d_dys = pool.out<bf16>(R * C);
  auto& d_dw = pool.out<float>(N * K);
  cu::permute_fwd(d_xs.p, d_x.p, d_row.p, N, K, C, ctx);
  cu::permute_bwd(d_dx.p, d_dxs.p, d_row.p, N, K, C, ctx);
  cu::unpermute_fwd(d_out.p, d_ys.p, d_w.p, d_row.p, N, K, C, ctx);
  cu::unpermute_bwd(d_dys.p, d_dw.p, d_dout.p, d_ys.p, d_w.p, d_row.p, N, K, C, ctx);
  sync(ctx);
  check("permute_fwd", "xs", sh, d_xs, xs_ref, kExact);
  check("permute_bwd", "dx", sh, d_dx, dx_ref, kBf16Out);
  check("unpermute_fwd", "out", sh, d_out, out_ref, kBf16Out);
  check("unpermute_bwd", "dys", sh, d_dys, dys_ref, kBf16Out);
  check("unpermute_bwd", "dw", sh, d_dw, dw_ref, kF32);

  // grouped linear over the permuted rows: I = C inputs, O outputs per expert
  const std::string gsh = shape_str({{"R", R}, {"E", E}, {"I", C}, {"O", O}}) + " " + kModes[mode];
  const int64_t I = C;
  const float ws = 1.0f / std::sqrt(float(I));
  Bf gw = bf_uniform(E * O * I, -ws, ws), gdout = bf_uniform(R * O, -1, 1);
  std::vector<float> gout_ref(R * O), gdx_ref(R * I), gdw = uniform(E * O * I, -1, 1);
  cpu::grouped_linear_fwd(gout_ref.data(), xs_ref.data(), gw.f.data(), off_ref.data(), E, I, O);
  auto& d_gw = pool.in(gw.h);
  auto& d_gdout = pool.in(gdout.h);
  auto& d_gdw = pool.in(gdw);
  auto& d_gout = pool.out<bf16>(R * O);
  auto& d_gdx = pool.out<bf16>(R * I);
  cpu::grouped_linear_bwd(gdx_ref.data(), gdw.data(), gdout.f.data(), xs_ref.data(), gw.f.data(),
                          off_ref.data(), E, I, O);
  cu::grouped_linear_fwd(d_gout.p, d_xs.p, d_gw.p, d_off.p, R, E, I, O, ctx);
  cu::grouped_linear_bwd(d_gdx.p, d_gdw.p, d_gdout.p, d_xs.p, d_gw.p, d_off.p, R, E, I, O, ctx);
  sync(ctx);
  check("grouped_linear_fwd", "out", gsh, d_gout, gout_ref, kBf16Out);
  check("grouped_linear_bwd", "dx", gsh, d_gdx, gdx_ref, kBf16Out);
  check("grouped_linear_bwd", "dw", gsh, d_gdw, gdw, kF32);
}

// cuda::ep_layout against the host: every token's row per destination (token order, packed
// after the earlier destinations or in regions of `region` rows), the tokens and the picks per
// destination. P <= 8 runs the one-block rounds kernel (K 8: its 16-byte loads), P > 8 the
// general path. `drop`: the share of picks that are -1 (no expert), as a capacity-dropping
// router would leave them. `all`: cuda::ep_layout_all instead (every token to every
// destination, packed; region 0).
void case_ep_layout(const cu::Ctx& ctx, int64_t N, int64_t K, int64_t El, int P, int64_t region,
                    double drop, bool picks, bool all = false) {
  const char* op = all ? "ep_layout_all" : "ep_layout";
  const std::string sh = shape_str({{"N", N}, {"K", K}, {"El", El}, {"P", P}, {"region", region}}) +
                         (picks ? "" : " no picks") + (drop > 0 ? " drops" : "");
  std::uniform_int_distribution<int32_t> ex(0, int32_t(P * El) - 1);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<int32_t> idx(size_t(N * K));
  for (int64_t n = 0; n < N; ++n)  // distinct experts per token, as top-k gives
    for (int64_t j = 0; j < K; ++j) {
      int32_t e;
      bool dup;
      do {
        e = ex(g_rng);
        dup = false;
        for (int64_t i = 0; i < j; ++i) dup |= idx[size_t(n * K + i)] == e;
      } while (dup && K <= P * El);
      idx[size_t(n * K + j)] = u(g_rng) < drop ? -1 : e;
    }
  std::vector<int32_t> pos_ref(size_t(N * P), -1), cnt_ref(size_t(P), 0), picks_ref(size_t(P), 0);
  int64_t first = 0;
  for (int d = 0; d < P; ++d) {
    const int64_t base = region > 0 ? d * region : first;
    for (int64_t n = 0; n < N; ++n) {
      int on = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int32_t e = idx[size_t(n * K + j)];
        on += e >= 0 && e / El == d ? 1 : 0;
      }
      if (on || all) pos_ref[size_t(n * P + d)] = int32_t(base + cnt_ref[size_t(d)]++);
      picks_ref[size_t(d)] += on;
    }
    first += cnt_ref[size_t(d)];
  }
  Pool pool;
  auto& d_idx = pool.in(idx);
  // outputs start as a value the kernel never writes, so a missed element shows
  auto& d_pos = pool.in(std::vector<int32_t>(size_t(N * P), 123456789));
  auto& d_cnt = pool.in(std::vector<int32_t>(size_t(P), 123456789));
  auto& d_picks = pool.in(std::vector<int32_t>(size_t(P), 123456789));
  if (all)
    cu::ep_layout_all(d_pos.p, d_cnt.p, picks ? d_picks.p : nullptr, d_idx.p, N, K, El, P, ctx);
  else
    cu::ep_layout(d_pos.p, d_cnt.p, picks ? d_picks.p : nullptr, d_idx.p, N, K, El, P, region,
                  ctx);
  sync(ctx);
  check_i32(op, "send_pos", sh, d_pos, pos_ref);
  check_i32(op, "send_cnt", sh, d_cnt, cnt_ref);
  if (picks) check_i32(op, "send_picks", sh, d_picks, picks_ref);
}

// cuda::ep_combine_unpack (rows gathered in one buffer) and ep_combine_unpack_sources (each
// rank's rows in a buffer of its own, as the in-place combine reads them from the transport's
// staging) against the host, exactly: each token's returned rows summed in rank order in fp32,
// one rounding, and its dw rows likewise. Each token has a row on a rank with probability
// `share` (the packed layout: rank d's rows after the earlier ranks', in token order). P <= 8
// runs the unrolled kernels; P > 8 (gathered only) the loop; H not a multiple of 8 the scalar
// kernel (gathered only).
void case_ep_unpack(const cu::Ctx& ctx, int64_t N, int64_t H, int64_t K, int P, double share,
                    bool dw) {
  const std::string sh = shape_str({{"N", N}, {"H", H}, {"K", K}, {"P", P}}) + (dw ? " dw" : "");
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<int32_t> pos(size_t(N * P), -1);
  std::vector<int64_t> first(size_t(P) + 1, 0);
  for (int d = 0; d < P; ++d) {
    int64_t r = first[size_t(d)];
    for (int64_t n = 0; n < N; ++n)
      if (u(g_rng) < share) pos[size_t(n * P + d)] = int32_t(r++);
    first[size_t(d) + 1] = r;
  }
  const int64_t S = first[size_t(P)];
  Bf y = bf_uniform(size_t(std::max<int64_t>(S, 1) * H), -2, 2);
  std::vector<float> w = uniform(size_t(std::max<int64_t>(S, 1) * K), -1, 1);
  std::vector<float> out_ref(size_t(N * H)), dw_ref(size_t(N * K));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < H; ++c) {
      float acc = 0.f;
      for (int d = 0; d < P; ++d)
        if (const int32_t r = pos[size_t(n * P + d)]; r >= 0) acc += y.f[size_t(r * H + c)];
      out_ref[size_t(n * H + c)] = __bfloat162float(__float2bfloat16_rn(acc));
    }
    for (int64_t j = 0; j < K; ++j) {
      float acc = 0.f;
      for (int d = 0; d < P; ++d)
        if (const int32_t r = pos[size_t(n * P + d)]; r >= 0) acc += w[size_t(r * K + j)];
      dw_ref[size_t(n * K + j)] = acc;
    }
  }
  Pool pool;
  auto& d_pos = pool.in(pos);
  auto& d_y = pool.in(y.h);
  auto& d_w = pool.in(w);
  auto& d_out = pool.out<bf16>(size_t(N * H));
  auto& d_dw = pool.out<float>(size_t(N * K));
  cu::ep_combine_unpack(d_out.p, dw ? d_dw.p : nullptr, d_y.p, dw ? d_w.p : nullptr, d_pos.p, N,
                        H, K, P, ctx);
  sync(ctx);
  check("ep_unpack", "gathered", sh, d_out, out_ref, kExact);
  if (dw) check("ep_unpack", "dw", sh, d_dw, dw_ref, kExact);
  if (P > cu::kEpPushMaxRanks || H % 8) return;
  // each rank's rows copied to a buffer of its own (a staging region)
  cu::EpRowSources ys, ws;
  for (int d = 0; d < P; ++d) {
    const int64_t f = first[size_t(d)], rows = first[size_t(d) + 1] - f;
    auto& dy = pool.in(std::vector<bf16>(y.h.begin() + f * H, y.h.begin() + (f + rows) * H));
    auto& dwd = pool.in(std::vector<float>(w.begin() + f * K, w.begin() + (f + rows) * K));
    ys.rows[d] = dy.p;
    ys.first[d] = f;
    ws.rows[d] = dwd.p;
    ws.first[d] = f;
  }
  auto& s_out = pool.out<bf16>(size_t(N * H));
  auto& s_dw = pool.out<float>(size_t(N * K));
  cu::ep_combine_unpack_sources(s_out.p, dw ? s_dw.p : nullptr, ys, dw ? &ws : nullptr, d_pos.p, N,
                                H, K, P, ctx);
  sync(ctx);
  check("ep_unpack", "sources", sh, s_out, out_ref, kExact);
  if (dw) check("ep_unpack", "dw srcs", sh, s_dw, dw_ref, kExact);
}

// The layout and the row ops over rows in regions with padding (EP padded mode, cu::RowRegions):
// P regions of `region` rows, cnt[s] of them tokens. The padding rows hold real-looking picks and
// rows, which must not be read. Reference: the CPU ops on the tokens packed (what counts mode
// runs), mapped back to the regions; the padding rows of the outputs must stay untouched (NaN,
// as the outputs start), slot_row -1 there; expert rows past the picks untouched too.
void case_moe_regions(const cu::Ctx& ctx, int64_t region, const std::vector<int32_t>& cnt,
                      int64_t E, int64_t K, int64_t C) {
  const int64_t P = int64_t(cnt.size()), N = P * region, R = N * K;
  std::string counts;
  for (int32_t c : cnt) counts += (counts.empty() ? "" : ",") + std::to_string(c);
  const std::string sh =
      shape_str({{"region", region}, {"E", E}, {"K", K}, {"C", C}}) + " cnt=" + counts;
  std::vector<int64_t> packed(N, -1);  // padded row -> packed row (-1: padding)
  int64_t Np = 0;
  for (int64_t s = 0; s < P; ++s)
    for (int64_t j = 0; j < cnt[s]; ++j) packed[s * region + j] = Np++;
  const int64_t Mp = Np * K;  // the expert rows: every packed pick is on a local expert
  Pool pool;
  std::vector<int32_t> idx = routing(N, E, K, 0), idx_p(Np * K);
  Bf x = bf_uniform(N * C, -1, 1), dxs = bf_uniform(R * C, -1, 1), ys = bf_uniform(R * C, -1, 1);
  Bf dout = bf_uniform(N * C, -1, 1);
  std::vector<float> w = uniform(N * K, 0, 1);
  // the packed inputs: the token rows of the padded ones, the expert rows as they are
  std::vector<float> x_p(Np * C), dout_p(Np * C), w_p(Np * K);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t q = packed[n];
    if (q < 0) continue;
    std::copy_n(idx.begin() + n * K, K, idx_p.begin() + q * K);
    std::copy_n(w.begin() + n * K, K, w_p.begin() + q * K);
    std::copy_n(x.f.begin() + n * C, C, x_p.begin() + q * C);
    std::copy_n(dout.f.begin() + n * C, C, dout_p.begin() + q * C);
  }
  std::vector<int32_t> off_ref(E + 1), row_p(Np * K);
  cpu::moe_layout(off_ref.data(), row_p.data(), idx_p.data(), Np, E, K);
  std::vector<float> xs_p(Mp * C), dx_p(Np * C), out_p(Np * C), dys_p(Mp * C), dw_p(Np * K);
  cpu::permute_fwd(xs_p.data(), x_p.data(), row_p.data(), Np, K, C);
  cpu::permute_bwd(dx_p.data(), dxs.f.data(), row_p.data(), Np, K, C);
  cpu::unpermute_fwd(out_p.data(), ys.f.data(), w_p.data(), row_p.data(), Np, K, C);
  cpu::unpermute_bwd(dys_p.data(), dw_p.data(), dout_p.data(), ys.f.data(), w_p.data(),
                     row_p.data(), Np, K, C);
  // back to the regions: padding rows NaN (untouched), slot_row -1
  std::vector<int32_t> row_ref(R, -1);
  std::vector<float> dx_ref(N * C, NAN), out_ref(N * C, NAN), dw_ref(N * K, NAN);
  std::vector<float> xs_ref(R * C, NAN), dys_ref(R * C, NAN);
  std::copy(xs_p.begin(), xs_p.end(), xs_ref.begin());
  std::copy(dys_p.begin(), dys_p.end(), dys_ref.begin());
  for (int64_t n = 0; n < N; ++n) {
    const int64_t q = packed[n];
    if (q < 0) continue;
    std::copy_n(row_p.begin() + q * K, K, row_ref.begin() + n * K);
    std::copy_n(dw_p.begin() + q * K, K, dw_ref.begin() + n * K);
    std::copy_n(dx_p.begin() + q * C, C, dx_ref.begin() + n * C);
    std::copy_n(out_p.begin() + q * C, C, out_ref.begin() + n * C);
  }
  auto& d_idx = pool.in(idx);
  auto& d_cnt = pool.in(cnt);
  auto& d_x = pool.in(x.h);
  auto& d_dxs = pool.in(dxs.h);
  auto& d_ys = pool.in(ys.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_w = pool.in(w);
  auto& d_off = pool.out<int32_t>(E + 1);
  auto& d_row = pool.out<int32_t>(R);
  auto& d_xs = pool.out<bf16>(R * C);
  auto& d_dx = pool.out<bf16>(N * C);
  auto& d_out = pool.out<bf16>(N * C);
  auto& d_dys = pool.out<bf16>(R * C);
  auto& d_dw = pool.out<float>(N * K);
  const cu::RowRegions rows{d_cnt.p, region};
  cu::moe_layout(d_off.p, d_row.p, d_idx.p, N, E, K, ctx, rows);
  cu::permute_fwd(d_xs.p, d_x.p, d_row.p, N, K, C, ctx);
  cu::permute_bwd(d_dx.p, d_dxs.p, d_row.p, N, K, C, ctx, rows);
  cu::unpermute_fwd(d_out.p, d_ys.p, d_w.p, d_row.p, N, K, C, ctx, rows);
  cu::unpermute_bwd(d_dys.p, d_dw.p, d_dout.p, d_ys.p, d_w.p, d_row.p, N, K, C, ctx, rows);
  sync(ctx);
  check_i32("moe_layout", "offsets", sh, d_off, off_ref);
  check_i32("moe_layout", "slot_row", sh, d_row, row_ref);
  check("permute_fwd", "xs", sh, d_xs, xs_ref, kExact);
  check("permute_bwd", "dx", sh, d_dx, dx_ref, kBf16Out);
  check("unpermute_fwd", "out", sh, d_out, out_ref, kBf16Out);
  check("unpermute_bwd", "dys", sh, d_dys, dys_ref, kBf16Out);
  check("unpermute_bwd", "dw", sh, d_dw, dw_ref, kF32);
}

// ---- grouped linear on its own: every implementation against the CPU ----------------------------
// Rows per expert for R rows. mode 0: each row to a random expert; 1: only every third expert
// (the others, and the last, get none); 2: all rows to expert E/2.
std::vector<int32_t> expert_counts(int64_t E, int64_t R, int mode) {
  std::vector<int32_t> c(E, 0);
  std::vector<int32_t> pool;
  for (int32_t e = 0; e < E; ++e)
    if (mode != 1 || (e % 3 == 0 && e != E - 1)) pool.push_back(e);
  if (pool.empty()) pool.push_back(0);
  for (int64_t r = 0; r < R; ++r) {
    if (mode == 2) {
      c[E / 2]++;
      continue;
    }
    c[pool[rand_int(0, int(pool.size()) - 1)]]++;
  }
  return c;
}

// Runs f with AUTOMOE_GROUPED_GEMM=impl, then restores the variable.
template <class F>
void with_impl(const char* impl, F&& f) {
  const char* old = std::getenv("AUTOMOE_GROUPED_GEMM");
  const std::string saved = old ? old : "";
  setenv("AUTOMOE_GROUPED_GEMM", impl, 1);
  try {
    f();
  } catch (...) {
    old ? setenv("AUTOMOE_GROUPED_GEMM", saved.c_str(), 1) : unsetenv("AUTOMOE_GROUPED_GEMM");
    throw;
  }
  old ? setenv("AUTOMOE_GROUPED_GEMM", saved.c_str(), 1) : unsetenv("AUTOMOE_GROUPED_GEMM");
}

// The implementations to check for I, O: the fallback always; sm90 when auto would pick it for
// these shapes (else a NOTE says why not).
std::vector<const char*> grouped_impls(int64_t I, int64_t O) {
  std::vector<const char*> impls = {"fallback"};
  std::string chosen;
  with_impl("auto", [&] { chosen = cu::grouped_linear_impl(I, O); });
  if (chosen == "sm90") {
    impls.push_back("sm90");
  } else {
    std::printf("NOTE grouped_linear I=%lld O=%lld: sm90 path not run (%s)\n", (long long)I,
                (long long)O,
                !AUTOMOE_HAVE_CUTLASS ? "built without CUTLASS"
                : (I % 8 || O % 8)    ? "I or O not a multiple of 8: routed to the fallback"
                                      : "not a compute capability 9.0 device");
  }
  return impls;
}

// fwd, dx, dw (fp32 +=) and dw (bf16, beta 0 and 1) for rows per expert `counts`, with `slack`
// allocated rows past offsets[E] that no output may touch (they stay NaN).
void case_grouped(const cu::Ctx& ctx, const char* label, const std::vector<int32_t>& counts,
                  int64_t I, int64_t O, int64_t slack) {
  const int64_t E = int64_t(counts.size());
  std::vector<int32_t> off(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
  const int64_t used = off[E], R = used + slack;
  int64_t empty = 0;
  for (int32_t c : counts) empty += c == 0;
  const std::string sh = shape_str({{"R", R}, {"E", E}, {"I", I}, {"O", O}}) + " " + label +
                         " empty=" + std::to_string(empty);
  Pool pool;
  const float ws = 1.0f / std::sqrt(float(std::max<int64_t>(I, 1)));
  Bf x = bf_uniform(R * I, -1, 1), w = bf_uniform(E * O * I, -ws, ws);
  Bf dout = bf_uniform(R * O, -1, 1), dw0 = bf_uniform(E * O * I, -1, 1);
  // CPU: out, dx (NaN on the slack rows), dw_sum = sum over rows (from 0)
  std::vector<float> out_ref(R * O, NAN), dx_ref(R * I, NAN), dw_sum(E * O * I, 0.f);
  cpu::grouped_linear_fwd(out_ref.data(), x.f.data(), w.f.data(), off.data(), E, I, O);
  cpu::grouped_linear_bwd(dx_ref.data(), dw_sum.data(), dout.f.data(), x.f.data(), w.f.data(),
                          off.data(), E, I, O);
  std::vector<float> dw_acc_ref(E * O * I);  // dw0 + dw_sum (fp32 +=, bf16 beta = 1)
  for (size_t i = 0; i < dw_acc_ref.size(); ++i) dw_acc_ref[i] = dw0.f[i] + dw_sum[i];

  auto& d_x = pool.in(x.h);
  auto& d_w = pool.in(w.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_off = pool.in(off);
  for (const char* impl : grouped_impls(I, O)) {
    with_impl(impl, [&] {
      const std::string ish = sh + " " + impl;
      {
        Pool p;
        auto& d_out = p.out<bf16>(R * O);
        auto& d_dx = p.out<bf16>(R * I);
        auto& d_dw = p.in(dw0.f);
        cu::grouped_linear_fwd(d_out.p, d_x.p, d_w.p, d_off.p, R, E, I, O, ctx);
        cu::grouped_linear_bwd(d_dx.p, d_dw.p, d_dout.p, d_x.p, d_w.p, d_off.p, R, E, I, O, ctx);
        sync(ctx);
        check("grouped_linear_fwd", "out", ish, d_out, out_ref, kBf16Out);
        check("grouped_linear_bwd", "dx", ish, d_dx, dx_ref, kBf16Out);
        check("grouped_linear_bwd", "dw f32+=", ish, d_dw, dw_acc_ref, kF32);
      }
      {
        Pool p;
        auto& d_dw_b0 = p.out<bf16>(E * O * I);  // NaN: beta = 0 must not read it
        auto& d_dw_b1 = p.in(dw0.h);
        cu::grouped_linear_bwd(nullptr, d_dw_b0.p, 0.0f, d_dout.p, d_x.p, d_w.p, d_off.p, R, E, I,
                               O, ctx);
        cu::grouped_linear_bwd(nullptr, d_dw_b1.p, 1.0f, d_dout.p, d_x.p, d_w.p, d_off.p, R, E, I,
                               O, ctx);
        sync(ctx);
        check("grouped_linear_bwd", "dw bf16=", ish, d_dw_b0, dw_sum, kBf16Out);
        check("grouped_linear_bwd", "dw bf16+=", ish, d_dw_b1, dw_acc_ref, kBf16Out);
      }
    });
  }
}

// Timing of the expert GEMMs at Qwen3-30B-A3B shapes (E = 128 experts, R = 65536 routed rows):
// TFLOP/s of fwd, dgrad and wgrad (bf16 dw, beta = 1) per implementation, 2*R*I*O flops each.
void perf_grouped(const cu::Ctx& ctx, const char* name, int64_t E, int64_t R, int64_t I,
                  int64_t O) {
  std::vector<int32_t> counts = expert_counts(E, R, 0);
  std::vector<int32_t> off(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
  Pool pool;
  std::vector<bf16> x(R * I), w(E * O * I), dout(R * O);
  for (auto* v : {&x, &w, &dout})
    for (auto& b : *v) b = __float2bfloat16_rn(float(rand_int(-64, 64)) / 256.f);
  auto& d_x = pool.in(x);
  auto& d_w = pool.in(w);
  auto& d_dout = pool.in(dout);
  auto& d_off = pool.in(off);
  auto& d_out = pool.out<bf16>(R * O);
  auto& d_dx = pool.out<bf16>(R * I);
  auto& d_dw = pool.in(std::vector<bf16>(E * O * I, __float2bfloat16_rn(0.f)));
  const double flop = 2.0 * double(R) * double(I) * double(O);
  std::string line;
  for (const char* impl : grouped_impls(I, O)) {
    with_impl(impl, [&] {
      const int iters = std::strcmp(impl, "fallback") ? 20 : 3;
      auto time = [&](auto&& op) { return mean_ms(ctx, op, iters); };
      const double fwd = time([&] {
        cu::grouped_linear_fwd(d_out.p, d_x.p, d_w.p, d_off.p, R, E, I, O, ctx);
      });
      const double dgrad = time([&] {
        cu::grouped_linear_bwd(d_dx.p, static_cast<float*>(nullptr), d_dout.p, d_x.p, d_w.p,
                               d_off.p, R, E, I, O, ctx);
      });
      const double wgrad = time([&] {
        cu::grouped_linear_bwd(nullptr, d_dw.p, 1.0f, d_dout.p, d_x.p, d_w.p, d_off.p, R, E, I, O,
                               ctx);
      });
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "  %-8s fwd %6.1f  dgrad %6.1f  wgrad %6.1f TFLOP/s  (%.2f / %.2f / %.2f ms)\n",
                    impl, flop / fwd * 1e-9, flop / dgrad * 1e-9, flop / wgrad * 1e-9, fwd, dgrad,
                    wgrad);
      line += buf;
    });
  }
  std::printf("PERF grouped_linear %s E=%lld R=%lld I=%lld O=%lld (bf16 in, fp32 accumulate)\n%s",
              name, (long long)E, (long long)R, (long long)I, (long long)O, line.c_str());
  std::fflush(stdout);
}

// rows >= 0: the device-side row count (EP padded mode): rows [0, rows) against the CPU, the
// rows past it must stay untouched (NaN, as the outputs start).
void case_swiglu(const cu::Ctx& ctx, int64_t N, int64_t F, int32_t rows = -1) {
  const std::string sh =
      shape_str({{"N", N}, {"F", F}}) + (rows >= 0 ? " rows=" + std::to_string(rows) : "");
  Pool pool;
  Bf gu = bf_uniform(N * 2 * F, -4, 4), dout = bf_uniform(N * F, -1, 1);
  std::vector<float> out_ref(N * F), dgu_ref(N * 2 * F);
  cpu::swiglu_fwd(out_ref.data(), gu.f.data(), N, F);
  cpu::swiglu_bwd(dgu_ref.data(), dout.f.data(), gu.f.data(), N, F);
  if (rows >= 0) {
    std::fill(out_ref.begin() + std::min<int64_t>(N, rows) * F, out_ref.end(), NAN);
    std::fill(dgu_ref.begin() + std::min<int64_t>(N, rows) * 2 * F, dgu_ref.end(), NAN);
  }
  auto& d_gu = pool.in(gu.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_rows = pool.in(std::vector<int32_t>{rows});
  auto& d_out = pool.out<bf16>(N * F);
  auto& d_dgu = pool.out<bf16>(N * 2 * F);
  const int32_t* n_rows = rows >= 0 ? d_rows.p : nullptr;
  cu::swiglu_fwd(d_out.p, d_gu.p, N, F, ctx, n_rows);
  cu::swiglu_bwd(d_dgu.p, d_dout.p, d_gu.p, N, F, ctx, n_rows);
  sync(ctx);
  check("swiglu_fwd", "out", sh, d_out, out_ref, kBf16Out);
  check("swiglu_bwd", "dgu", sh, d_dgu, dgu_ref, kBf16Out);
}

void case_cross_entropy(const cu::Ctx& ctx, int64_t N, int64_t V, bool inplace) {
  const std::string sh = shape_str({{"N", N}, {"V", V}}) + (inplace ? " inplace" : "");
  Pool pool;
  Bf logits = bf_uniform(N * V, -8, 8);
  std::vector<int64_t> tgt(N);
  int64_t labelled = 0;
  for (int64_t n = 0; n < N; ++n) {
    tgt[n] = n % 4 == 1 ? -100 : rand_int(0, int(V) - 1);  // every fourth row ignored
    labelled += tgt[n] != -100;
  }
  const float scale = 1.0f / float(std::max<int64_t>(1, labelled));
  std::vector<float> loss_ref(N), lse_ref(N), dl_ref(N * V);
  cpu::cross_entropy_fwd(loss_ref.data(), lse_ref.data(), logits.f.data(), tgt.data(), N, V);
  cpu::cross_entropy_bwd(dl_ref.data(), logits.f.data(), lse_ref.data(), tgt.data(), scale, N, V);
  auto& d_logits = pool.in(logits.h);
  auto& d_tgt = pool.in(tgt);
  auto& d_loss = pool.out<float>(N);
  auto& d_lse = pool.out<float>(N);
  cu::cross_entropy_fwd(d_loss.p, d_lse.p, d_logits.p, d_tgt.p, N, V, ctx);
  sync(ctx);
  check("cross_entropy_fwd", "losses", sh, d_loss, loss_ref, kF32);
  check("cross_entropy_fwd", "lse", sh, d_lse, lse_ref, kF32);
  Dev<bf16>& d_dl = inplace ? d_logits : pool.out<bf16>(N * V);
  cu::cross_entropy_bwd(d_dl.p, d_logits.p, d_lse.p, d_tgt.p, scale, N, V, ctx);
  sync(ctx);
  check("cross_entropy_bwd", "dlogits", sh, d_dl, dl_ref, kBf16Out);
  // both in one kernel, from fresh logits (in place or not, as above)
  auto& d_logits2 = pool.in(logits.h);
  auto& d_loss2 = pool.out<float>(N);
  auto& d_lse2 = pool.out<float>(N);
  Dev<bf16>& d_dl2 = inplace ? d_logits2 : pool.out<bf16>(N * V);
  cu::cross_entropy_fwd_bwd(d_loss2.p, d_lse2.p, d_dl2.p, d_logits2.p, d_tgt.p, scale, N, V, ctx);
  sync(ctx);
  check("cross_entropy_fwd_bwd", "losses", sh, d_loss2, loss_ref, kF32);
  check("cross_entropy_fwd_bwd", "lse", sh, d_lse2, lse_ref, kF32);
  check("cross_entropy_fwd_bwd", "dlogits", sh, d_dl2, dl_ref, kBf16Out);
}

void case_aux_loss(const cu::Ctx& ctx, int64_t N, int64_t E, int64_t K, int mode) {
  const std::string sh = shape_str({{"N", N}, {"E", E}, {"K", K}}) + (mode ? " sparse" : "");
  Pool pool;
  std::vector<float> probs = uniform(N * E, 0, 1);
  for (int64_t n = 0; n < N; ++n) {  // rows of a softmax: positive, sum 1
    float s = 0;
    for (int64_t e = 0; e < E; ++e) s += probs[n * E + e];
    for (int64_t e = 0; e < E; ++e) probs[n * E + e] /= s;
  }
  std::vector<int32_t> idx = routing(N, E, K, mode);
  const float daux = 0.01f;
  std::vector<float> aux_ref{cpu::aux_loss_fwd(probs.data(), idx.data(), N, E, K)};
  std::vector<float> dp_ref(N * E);
  cpu::aux_loss_bwd(dp_ref.data(), daux, idx.data(), N, E, K);
  auto& d_probs = pool.in(probs);
  auto& d_idx = pool.in(idx);
  auto& d_aux = pool.out<float>(1);
  auto& d_dp = pool.out<float>(N * E);
  cu::aux_loss_fwd(d_aux.p, d_probs.p, d_idx.p, N, E, K, ctx);
  cu::aux_loss_bwd(d_dp.p, daux, d_idx.p, N, E, K, ctx);
  sync(ctx);
  check("aux_loss_fwd", "aux", sh, d_aux, aux_ref, kF32);
  check("aux_loss_bwd", "dprobs", sh, d_dp, dp_ref, kF32);
}

void case_adamw(const cu::Ctx& ctx, int64_t n) {
  const std::string sh = shape_str({{"n", n}});
  Pool pool;
  const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
  const int64_t t = 3;
  std::vector<float> g = uniform(n, -1, 1), m0 = uniform(n, -0.1f, 0.1f), v0 = uniform(n, 0, 0.01f);
  {  // fp32 weights (+ bf16 copy)
    const float lr = 1e-2f;
    std::vector<float> p = uniform(n, -1, 1), m = m0, v = v0;
    auto& d_p = pool.in(p);
    auto& d_g = pool.in(g);
    auto& d_m = pool.in(m);
    auto& d_v = pool.in(v);
    auto& d_p16 = pool.out<bf16>(n);
    cpu::adamw_step(p.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, t);
    cu::adamw_step(d_p.p, d_p16.p, d_g.p, d_m.p, d_v.p, n, lr, b1, b2, eps, wd, t, ctx);
    sync(ctx);
    check("adamw_step.f32", "p", sh, d_p, p, kF32Exact);
    check("adamw_step.f32", "p_bf16", sh, d_p16, p, kBf16Out);
    check("adamw_step.f32", "m", sh, d_m, m, kF32Exact);
    check("adamw_step.f32", "v", sh, d_v, v, kF32Exact);
  }
  {  // bf16 weights, fp32 moments; lr large enough that a missing update exceeds the limit
    const float lr = 5e-2f;
    Bf p = bf_uniform(n, -1, 1);
    std::vector<float> pf = p.f, m = m0, v = v0;
    auto& d_p = pool.in(p.h);
    auto& d_g = pool.in(g);
    auto& d_m = pool.in(m);
    auto& d_v = pool.in(v);
    cpu::adamw_step(pf.data(), g.data(), m.data(), v.data(), n, lr, b1, b2, eps, wd, t);
    cu::adamw_step(d_p.p, d_g.p, d_m.p, d_v.p, n, lr, b1, b2, eps, wd, t, ctx);
    sync(ctx);
    check("adamw_step.bf16", "p", sh, d_p, pf, kBf16Out);
    check("adamw_step.bf16", "m", sh, d_m, m, kF32Exact);
    check("adamw_step.bf16", "v", sh, d_v, v, kF32Exact);
  }
  {  // global grad norm helpers
    std::vector<float> x = uniform(n, -1, 1);
    const double ss_ref = cpu::sum_squares(x.data(), n);
    auto& d_x = pool.in(x);
    auto& d_ss = pool.out<double>(1);
    cu::sum_squares(d_ss.p, d_x.p, n, ctx);
    cu::scale_inplace(d_x.p, 0.37f, n, ctx);
    cpu::scale_inplace(x.data(), 0.37f, n);
    sync(ctx);
    const double ss = d_ss.download()[0];
    const double rel2 = (ss - ss_ref) * (ss - ss_ref) / (ss_ref * ss_ref);
    record("sum_squares", "out", sh, d_ss.guards_ok() && rel2 <= kF64, rel2, kF64,
           d_ss.guards_ok() ? "" : "sentinel zone overwritten");
    check("scale_inplace", "x", sh, d_x, x, kF32Exact);
  }
}

// ---- the training path's additions: bf16 parameter gradients and the model's glue ----------------

// bf16 dW: beta 0 overwrites (the buffer starts as NaN: it must not be read), beta 1 adds.
void case_linear_bf16_dw(const cu::Ctx& ctx, int64_t N, int64_t I, int64_t O, float beta) {
  const std::string sh = shape_str({{"N", N}, {"I", I}, {"O", O}}) + (beta != 0 ? " dw+=" : " dw=");
  Pool pool;
  const float ws = 1.0f / std::sqrt(float(I));
  Bf x = bf_uniform(N * I, -1, 1), w = bf_uniform(O * I, -ws, ws), dout = bf_uniform(N * O, -1, 1);
  Bf dw0 = bf_uniform(O * I, -1, 1);
  std::vector<float> dx_ref(N * I), dw_ref = beta != 0 ? dw0.f : std::vector<float>(O * I, 0.f);
  cpu::linear_bwd(dx_ref.data(), 0.f, dw_ref.data(), nullptr, dout.f.data(), x.f.data(), w.f.data(),
                  N, I, O);
  auto& d_x = pool.in(x.h);
  auto& d_w = pool.in(w.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_dw = pool.in(dw0.h);
  if (beta == 0) d_dw.fill_nan();
  auto& d_dx = pool.out<bf16>(N * I);
  cu::linear_bwd(d_dx.p, 0.f, d_dw.p, beta, nullptr, d_dout.p, d_x.p, d_w.p, N, I, O, ctx);
  sync(ctx);
  check("linear_bwd.bf16dw", "dx", sh, d_dx, dx_ref, kBf16Out);
  check("linear_bwd.bf16dw", "dw", sh, d_dw, dw_ref, kBf16Out);
}

void case_grouped_bf16_dw(const cu::Ctx& ctx, int64_t N, int64_t E, int64_t K, int64_t I, int64_t O,
                          int mode, float beta) {
  const int64_t R = N * K;
  const std::string sh = shape_str({{"R", R}, {"E", E}, {"I", I}, {"O", O}, {"mode", mode}}) +
                         (beta != 0 ? " dw+=" : " dw=");
  Pool pool;
  std::vector<int32_t> idx = routing(N, E, K, mode), off(E + 1), row(R);
  cpu::moe_layout(off.data(), row.data(), idx.data(), N, E, K);
  const float ws = 1.0f / std::sqrt(float(I));
  Bf x = bf_uniform(R * I, -1, 1), w = bf_uniform(E * O * I, -ws, ws), dout = bf_uniform(R * O, -1, 1);
  Bf dw0 = bf_uniform(E * O * I, -1, 1);
  std::vector<float> dx_ref(R * I), dw_ref = beta != 0 ? dw0.f : std::vector<float>(E * O * I, 0.f);
  cpu::grouped_linear_bwd(dx_ref.data(), dw_ref.data(), dout.f.data(), x.f.data(), w.f.data(),
                          off.data(), E, I, O);
  auto& d_off = pool.in(off);
  auto& d_x = pool.in(x.h);
  auto& d_w = pool.in(w.h);
  auto& d_dout = pool.in(dout.h);
  auto& d_dw = pool.in(dw0.h);
  if (beta == 0) d_dw.fill_nan();  // experts without rows must be zeroed, not left
  auto& d_dx = pool.out<bf16>(R * I);
  cu::grouped_linear_bwd(d_dx.p, d_dw.p, beta, d_dout.p, d_x.p, d_w.p, d_off.p, R, E, I, O, ctx);
  sync(ctx);
  check("grouped_linear_bwd.bf16dw", "dx", sh, d_dx, dx_ref, kBf16Out);
  check("grouped_linear_bwd.bf16dw", "dw", sh, d_dw, dw_ref, kBf16Out);
  // split as the EP backward runs it (dx alone without x, dw alone without w): the same two
  // launches as the call above, so the same bits
  auto& d_dx2 = pool.out<bf16>(R * I);
  auto& d_dw2 = pool.in(dw0.h);
  if (beta == 0) d_dw2.fill_nan();
  cu::grouped_linear_bwd(d_dx2.p, static_cast<bf16*>(nullptr), 0.f, d_dout.p, nullptr, d_w.p,
                         d_off.p, R, E, I, O, ctx);
  cu::grouped_linear_bwd(nullptr, d_dw2.p, beta, d_dout.p, d_x.p, nullptr, d_off.p, R, E, I, O,
                         ctx);
  sync(ctx);
  check("grouped_linear_bwd.bf16dw", "dx split", sh, d_dx2, to_f(d_dx.download()), kExact);
  check("grouped_linear_bwd.bf16dw", "dw split", sh, d_dw2, to_f(d_dw.download()), kExact);
}

// Rows grouped by id on the host, as the model does.
void case_embedding_sorted(const cu::Ctx& ctx, int64_t V, int64_t N, int64_t C) {
  const std::string sh = shape_str({{"V", V}, {"N", N}, {"C", C}});
  Pool pool;
  std::vector<int64_t> ids(N);
  for (auto& id : ids) id = rand_int(0, int(std::min<int64_t>(V, N / 2 + 1)) - 1);
  std::vector<std::pair<int64_t, int32_t>> by(N);
  for (int64_t i = 0; i < N; ++i) by[i] = {ids[i], int32_t(i)};
  std::sort(by.begin(), by.end());
  std::vector<int32_t> uniq, uoff, rows(N);
  for (int64_t j = 0; j < N; ++j) {
    if (j == 0 || by[j].first != by[j - 1].first) {
      uniq.push_back(int32_t(by[j].first));
      uoff.push_back(int32_t(j));
    }
    rows[j] = by[j].second;
  }
  uoff.push_back(int32_t(N));
  Bf dout = bf_uniform(N * C, -1, 1), g0 = bf_uniform(V * C, -1, 1);
  std::vector<float> ref = g0.f;
  cpu::embedding_bwd(ref.data(), dout.f.data(), ids.data(), N, C);
  auto& d_u = pool.in(uniq);
  auto& d_uo = pool.in(uoff);
  auto& d_r = pool.in(rows);
  auto& d_dout = pool.in(dout.h);
  auto& d_g16 = pool.in(g0.h);
  auto& d_g32 = pool.in(g0.f);
  const int64_t U = int64_t(uniq.size());
  cu::embedding_bwd_sorted(d_g16.p, d_dout.p, d_u.p, d_uo.p, d_r.p, U, C, ctx);
  cu::embedding_bwd_sorted(d_g32.p, d_dout.p, d_u.p, d_uo.p, d_r.p, U, C, ctx);
  sync(ctx);
  check("embedding_bwd_sorted", "dwte.bf16", sh, d_g16, ref, kBf16Out);
  check("embedding_bwd_sorted", "dwte.f32", sh, d_g32, ref, kF32);
}

void case_elementwise(const cu::Ctx& ctx, int64_t n) {
  const std::string sh = shape_str({{"n", n}});
  Pool pool;
  Bf a = bf_uniform(n, -1, 1), b = bf_uniform(n, -1, 1);
  std::vector<float> s = uniform(n, -1, 1), sum(n), acc(n);
  for (int64_t i = 0; i < n; ++i) {
    sum[i] = a.f[i] + b.f[i];
    acc[i] = 0.5f * a.f[i] + s[i];
  }
  auto& d_a = pool.in(a.h);
  auto& d_b = pool.in(b.h);
  auto& d_s = pool.in(s);
  auto& d_out = pool.out<bf16>(n);
  auto& d_y = pool.in(a.h);
  auto& d_g = pool.in(a.h);
  auto& d_c16 = pool.out<bf16>(n);
  auto& d_c32 = pool.out<float>(n);
  cu::add(d_out.p, d_a.p, d_b.p, n, ctx);
  cu::add_inplace(d_y.p, d_b.p, n, ctx);
  cu::accumulate_grad(d_g.p, d_s.p, 0.5f, n, ctx);
  cu::convert(d_c16.p, d_s.p, n, ctx);
  cu::convert(d_c32.p, d_a.p, n, ctx);
  sync(ctx);
  check("elementwise", "add", sh, d_out, sum, kBf16Out);
  check("elementwise", "add_inplace", sh, d_y, sum, kBf16Out);
  check("elementwise", "accum_grad", sh, d_g, acc, kBf16Out);
  check("elementwise", "to_bf16", sh, d_c16, s, kBf16Out);
  check("elementwise", "to_f32", sh, d_c32, a.f, kExact);
  // normal init: mean ~0, std ~0.02 (a loose statistical check)
  auto& d_r = pool.out<bf16>(n);
  cu::fill_normal(d_r.p, n, 0.02f, 7, ctx);
  sync(ctx);
  std::vector<float> r = to_f(d_r.download());
  double m = 0, v = 0;
  for (float x : r) m += x;
  m /= double(n);
  for (float x : r) v += (x - m) * (x - m);
  const double sd = std::sqrt(v / double(n));
  const bool ok = n < 1000 || (std::fabs(m) < 0.002 && std::fabs(sd - 0.02) < 0.002);
  record("elementwise", "fill_normal", sh, ok && d_r.guards_ok(), std::fabs(sd - 0.02), 0.002,
         "std " + std::to_string(sd) + " mean " + std::to_string(m));
}

// AdamW on bf16 weights, gradients and moments, the gradient scaled by a device coefficient;
// and the clip coefficient from a bf16 sum of squares.
void case_adamw_bf16_state(const cu::Ctx& ctx, int64_t n) {
  const std::string sh = shape_str({{"n", n}});
  Pool pool;
  const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, lr = 5e-2f, gs = 0.5f;
  const int64_t t = 3;
  Bf p = bf_uniform(n, -1, 1), g = bf_uniform(n, -1, 1), m = bf_uniform(n, -0.1f, 0.1f),
     v = bf_uniform(n, 0, 0.01f);
  std::vector<float> pf = p.f, mf = m.f, vf = v.f, gf = g.f;
  for (auto& x : gf) x *= gs;
  cpu::adamw_step(pf.data(), gf.data(), mf.data(), vf.data(), n, lr, b1, b2, eps, wd, t);
  auto& d_p = pool.in(p.h);
  auto& d_g = pool.in(g.h);
  auto& d_m = pool.in(m.h);
  auto& d_v = pool.in(v.h);
  auto& d_gs = pool.in(std::vector<float>{gs});
  cu::adamw_step(d_p.p, d_g.p, d_m.p, d_v.p, n, lr, b1, b2, eps, wd, t, d_gs.p, ctx);
  sync(ctx);
  check("adamw_step.bf16state", "p", sh, d_p, pf, kBf16Out);
  check("adamw_step.bf16state", "m", sh, d_m, mf, kBf16Out);
  check("adamw_step.bf16state", "v", sh, d_v, vf, kBf16Out);

  const double ss_ref = cpu::sum_squares(g.f.data(), n);
  auto& d_ss = pool.out<double>(1);
  auto& d_coef = pool.out<float>(1);
  auto& d_norm = pool.out<float>(1);
  cu::sum_squares(d_ss.p, d_g.p, n, ctx);
  const float max_norm = float(std::sqrt(ss_ref)) * 0.5f;  // clipping applies
  cu::clip_coef(d_coef.p, d_norm.p, d_ss.p, max_norm, ctx);
  sync(ctx);
  const double ss = d_ss.download()[0];
  const double rel2 = (ss - ss_ref) * (ss - ss_ref) / (ss_ref * ss_ref);
  record("sum_squares.bf16", "out", sh, d_ss.guards_ok() && rel2 <= kF64, rel2, kF64, "");
  const float nrm = float(std::sqrt(ss_ref));
  check("clip_coef", "norm", sh, d_norm, {nrm}, kF32);
  check("clip_coef", "coef", sh, d_coef, {max_norm / (nrm + 1e-6f)}, kF32);

  // the memory-saving mode's fused step: the same update, and the unscaled gradient's sum of
  // squares; twice the same call must give the same bits (fixed-order reduction)
  auto& d_p2 = pool.in(p.h);
  auto& d_m2 = pool.in(m.h);
  auto& d_v2 = pool.in(v.h);
  auto& d_ss2 = pool.out<double>(1);
  cu::adamw_step_sumsq(d_p2.p, d_g.p, d_m2.p, d_v2.p, n, lr, b1, b2, eps, wd, t, d_gs.p, d_ss2.p,
                       ctx);
  sync(ctx);
  check("adamw_step_sumsq", "p", sh, d_p2, pf, kBf16Out);
  check("adamw_step_sumsq", "m", sh, d_m2, mf, kBf16Out);
  check("adamw_step_sumsq", "v", sh, d_v2, vf, kBf16Out);
  const double ss2 = d_ss2.download()[0];
  const double rel2b = (ss2 - ss_ref) * (ss2 - ss_ref) / (ss_ref * ss_ref);
  record("adamw_step_sumsq", "sumsq", sh, d_ss2.guards_ok() && rel2b <= kF64, rel2b, kF64, "");
  // and sum_f64 over per-tensor slots
  auto& d_slots = pool.in(std::vector<double>{ss2, 1.5, -0.25});
  auto& d_tot = pool.out<double>(1);
  cu::sum_f64(d_tot.p, d_slots.p, 3, ctx);
  sync(ctx);
  const double tot = d_tot.download()[0], tot_ref = ss2 + 1.5 - 0.25;
  record("sum_f64", "out", sh, d_tot.guards_ok() && tot == tot_ref, std::fabs(tot - tot_ref), 0.0,
         "");
}

// Runs one case; an exception (an op's check, a CUDA error) is a failure of that case.
// The command line's filters: a group runs when its name contains one of the plain words (all
// groups when there are none) and none of the words given as -WORD.
struct Filter {
  std::vector<std::string> want, skip;
  bool operator()(const char* op) const {
    for (auto& w : skip)
      if (std::strstr(op, w.c_str())) return false;
    if (want.empty()) return true;
    for (auto& w : want)
      if (std::strstr(op, w.c_str())) return true;
    return false;
  }
};

template <class F>
void run(const Filter& filter, const char* op, F&& f) {
  if (!filter(op)) return;
  try {
    f();
  } catch (const std::exception& e) {
    record(op, "-", "-", false, NAN, 0, std::string("error: ") + e.what());
    cudaGetLastError();  // clear a non-sticky error so later cases can run
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("cuda_op_check: no CUDA device (%s): nothing checked\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 0;
  }
  Filter filter;
  for (int i = 1; i < argc; ++i)
    (argv[i][0] == '-' ? filter.skip.emplace_back(argv[i] + 1) : filter.want.emplace_back(argv[i]));
  const int threads = cpu::set_num_threads_from_env();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("cuda_op_check: %s (sm_%d%d, %d SMs), CPU reference on %d threads\n", prop.name,
              prop.major, prop.minor, prop.multiProcessorCount, threads);
  std::printf("cuda_op_check: grouped GEMM %s (CUTLASS %s; AUTOMOE_GROUPED_GEMM=%s)\n",
              cu::grouped_linear_impl(2048, 1536), AUTOMOE_HAVE_CUTLASS ? "built in" : "absent",
              std::getenv("AUTOMOE_GROUPED_GEMM") ? std::getenv("AUTOMOE_GROUPED_GEMM") : "auto");
  // One workspace for every op, sized once (64 MiB covers the largest case below).
  cu::ScopedCtx owner(std::max(size_t(64) << 20, cu::grouped_linear_workspace_bytes(128)));
  const cu::Ctx& ctx = owner.ctx();
  const auto t0 = std::chrono::steady_clock::now();

  run(filter, "embedding", [&] {
    case_embedding(ctx, 13, 7, 11);
    case_embedding(ctx, 11, 5, 16);
    case_embedding(ctx, 4096, 512, 2048);
  });
  run(filter, "rmsnorm", [&] {
    case_rmsnorm(ctx, 7, 13);
    case_rmsnorm(ctx, 11, 5);
    case_rmsnorm(ctx, 13 * 4, 128);  // per-head q/k norm: N = tokens*heads, C = head dim
    case_rmsnorm(ctx, 33 * 3, 6);    // the parity fixture tiny_c's q norm (head dim 6)
    case_rmsnorm(ctx, 512, 2048);
    // the fused backward's column counts (CPL 4..64) with chunk tails, and W1's shapes: the
    // hidden norms (8192 x 2048) and the q norm (8192 tokens x 32 heads, head dim 128)
    case_rmsnorm(ctx, 65, 256);
    case_rmsnorm(ctx, 300, 512);
    case_rmsnorm(ctx, 129, 1024);
    case_rmsnorm(ctx, 8192, 2048);
    case_rmsnorm(ctx, 8192 * 32, 128);
    case_rmsnorm(ctx, 70, 4096);  // the 16-byte forward's widest case
    case_add_rmsnorm(ctx, 33, 1024);
    case_add_rmsnorm(ctx, 7, 13);
    case_add_rmsnorm(ctx, 512, 2048);
    case_add_rmsnorm(ctx, 8192, 2048);  // W1's residual stream
  });
  run(filter, "linear", [&] {
    case_linear(ctx, 5, 7, 11, true, 0.0f);
    case_linear(ctx, 13, 11, 5, false, 1.0f);
    case_linear(ctx, 7, 13, 16, true, 1.0f);
    case_linear(ctx, 512, 2048, 2048, false, 0.0f);
    case_linear(ctx, 512, 2048, 512, true, 1.0f);
  });
  run(filter, "rope", [&] {
    case_rope(ctx, 7, 5, 10, 10000.f);
    case_rope(ctx, 13, 3, 2, 10000.f);
    case_rope(ctx, 33, 3, 6, 500.f);  // tiny_c: head dim 6, theta 500
    case_rope(ctx, 512, 32, 128, 1e6f);
    case_qk_norm_rope(ctx, 7, 5, 10, 10000.f);
    case_qk_norm_rope(ctx, 33, 3, 6, 500.f);    // tiny_c
    case_qk_norm_rope(ctx, 512, 32, 128, 1e6f);  // W1's q heads
    case_qk_norm_rope(ctx, 8192, 4, 128, 1e6f);  // W1's k heads
    case_qk_norm_rope(ctx, 8192, 32, 128, 1e6f);  // W1's q heads, all tokens
    case_qk_norm_rope(ctx, 37, 3, 64, 10000.f);   // the per-token kernels' other head dims,
    case_qk_norm_rope(ctx, 19, 1, 256, 10000.f);  // token counts that leave a partial block
    case_qk_norm_rope(ctx, 21, 2, 200, 10000.f);  // backward: lanes without a pair sit out
    case_qk_norm_rope(ctx, 40, 4, 16, 10000.f);   // backward at the parity fixtures' head dims
    case_rope(ctx, 37, 4, 64, 1e6f);  // the per-token kernel at its smallest shape
    case_rope(ctx, 8192, 4, 128, 1e6f);  // W1's k heads
  });
  // Every case through cuDNN SDPA (attention_*.cudnn; SKIP with the reason where cuDNN cannot
  // run it) and through the fallback kernel (attention_*.fallback). Cases with documents give
  // cuDNN a segment table: its packed (ragged) graph, "docs=[lengths per row] seqs=S bucket=N"
  // in the shape column, or "(causal graph)" when every row is one document.
  run(filter, "attention", [&] {
    case_attention(ctx, 1, 5, 2, 1, 8, 1);
    case_attention(ctx, 3, 11, 3, 1, 6, 1);      // tiny_c: head dim 6, one kv head for three
    case_attention(ctx, 2, 13, 4, 2, 16, 3);     // document masking
    case_attention(ctx, 1, 37, 6, 2, 10, 1);     // D not a multiple of 8 (nor 32)
    case_attention(ctx, 2, 70, 2, 2, 40, 2);     // T past two tiles, documents
    case_attention(ctx, 1, 33, 3, 1, 200, 1);    // 128 < D <= 256
    case_attention(ctx, 2, 77, 8, 8, 64, 1);     // GQA ratio 1 (MHA), odd T, D 64
    case_attention(ctx, 1, 129, 16, 4, 128, 1);  // GQA ratio 4, odd T
    case_attention(ctx, 2, 255, 32, 4, 128, 1);  // GQA ratio 8 (Qwen3-30B-A3B heads), odd T
    case_attention(ctx, 1, 301, 8, 1, 64, 1);    // GQA ratio 8, D 64
    case_attention(ctx, 1, 512, 8, 2, 128, 1);   // Qwen3 head dim, plain causal
    case_attention(ctx, 1, 512, 8, 2, 128, 3);   // the same with documents
    // packed batches: uneven documents, length 1, a row that is one document
    case_attention_lens(ctx, 20, 4, 2, 16, {{1, 6, 13}, {20}, {7, 1, 1, 11}});
    case_attention_lens(ctx, 77, 8, 2, 64, {{1, 1, 75}, {30, 47}});
    case_attention_lens(ctx, 129, 16, 4, 128, {{64, 64, 1}});  // tile boundaries
    case_attention_lens(ctx, 40, 8, 1, 128, {{40}, {40}});     // one document per row
    case_attention_lens(ctx, 50, 4, 2, 200, {{10, 1, 39}, {25, 25}});  // D 200: not % 16
    case_attention_lens(ctx, 30, 3, 1, 6, {{10, 20}, {30}});   // D 6: fallback only
    case_attention(ctx, 2, 300, 8, 1, 128, 9);   // 18 sequences: bucket 32
    case_attention(ctx, 2, 64, 4, 2, 64, 33);    // many short documents: bucket 128
  });
  // The second half of a split sequence (the two-half overlap's attention; cuDNN only, SKIP
  // with the reason where it cannot run): against the CPU op attention_tail_*
  run(filter, "attention_tail", [&] {
    case_attention_tail(2, 5, 13, 4, 2, 16);
    case_attention_tail(1, 64, 128, 8, 2, 64);
    case_attention_tail(1, 1, 77, 4, 1, 128);       // the last query alone
    case_attention_tail(1, 100, 100, 4, 4, 64);     // Tq = Tkv: the causal attention
    case_attention_tail(1, 256, 512, 32, 4, 128);   // Qwen3-30B-A3B heads
  });
  // W1 (seq 4096, micro-batch 2, 32 q heads, 4 kv heads, D 128): cuDNN against the fallback,
  // and the TIME lines (TFLOP/s of each, fwd and bwd).
  run(filter, "attention_w1", [&] { case_attention_large(2, 4096, 32, 4, 128); });
  // W1 on a packed batch: 6 and 9 documents, a length-1 document in each row
  run(filter, "attention_packed_w1", [&] {
    case_attention_packed_w1({{1500, 1, 900, 700, 600, 395},
                              {313, 2048, 17, 1, 640, 129, 500, 447, 1}});
  });
  run(filter, "router", [&] {
    case_router(ctx, 7, 5, 2, true, false);
    case_router(ctx, 13, 11, 3, false, true);
    case_router(ctx, 5, 7, 7, true, true);  // K = E
    case_router(ctx, 512, 128, 8, true, true);
    case_router(ctx, 300, 160, 6, false, false);
  });
  run(filter, "moe", [&] {
    case_moe(ctx, 7, 5, 2, 11, 13, 0);
    case_moe(ctx, 13, 11, 3, 7, 5, 1);     // experts without tokens
    case_moe(ctx, 11, 7, 1, 13, 7, 2);     // all tokens to one expert
    case_moe(ctx, 13, 5, 2, 16, 11, 2);    // all tokens to the same two experts
    case_moe(ctx, 600, 13, 4, 24, 40, 0);  // several layout chunks
    case_moe(ctx, 512, 128, 8, 2048, 256, 0);
    case_moe(ctx, 512, 128, 8, 256, 128, 1);
  });
  run(filter, "ep_layout", [&] {  // the EP dispatch's rows per destination
    case_ep_layout(ctx, 0, 8, 4, 2, 0, 0, true);          // no tokens
    case_ep_layout(ctx, 1, 3, 2, 3, 0, 0, true);          // one token
    case_ep_layout(ctx, 37, 3, 4, 2, 0, 0.2, true);       // fewer tokens than threads, drops
    case_ep_layout(ctx, 1025, 8, 16, 4, 0, 0, false);     // one past the block: runs of 2
    case_ep_layout(ctx, 4096, 8, 64, 2, 0, 0, true);      // Qwen3-30B-A3B, EP 2
    case_ep_layout(ctx, 4096, 8, 32, 4, 4096, 0, true);   // EP 4, padded regions
    case_ep_layout(ctx, 8193, 8, 16, 8, 0, 0.05, true);   // EP 8, odd N
    case_ep_layout(ctx, 8192, 8, 16, 8, 8200, 0, true);   // EP 8, regions larger than N
    case_ep_layout(ctx, 3000, 6, 8, 5, 0, 0, true);       // P 5, K 6: a load per pick
    case_ep_layout(ctx, 2000, 8, 8, 16, 0, 0.1, true);    // P 16: the general path
    case_ep_layout(ctx, 500, 4, 2, 9, 600, 0, true);      // P 9, regions: the general path
    // the broadcast layout (every token to every destination)
    case_ep_layout(ctx, 0, 8, 64, 2, 0, 0, true, true);      // no tokens
    case_ep_layout(ctx, 37, 3, 4, 2, 0, 0.3, true, true);    // drops: tokens with no pick on d
    case_ep_layout(ctx, 8192, 8, 64, 2, 0, 0, true, true);   // Qwen3-30B-A3B, EP 2, W2's N
    case_ep_layout(ctx, 3001, 8, 43, 3, 0, 0.05, false, true);  // P 3, no picks output
  });
  run(filter, "ep_unpack", [&] {  // the EP combine's sum per token
    case_ep_unpack(ctx, 0, 64, 8, 2, 0.7, true);       // no tokens
    case_ep_unpack(ctx, 37, 64, 8, 2, 0.7, true);      // fewer tokens than a block's threads
    case_ep_unpack(ctx, 300, 2048, 8, 2, 0.9, true);   // Qwen3-30B-A3B, EP 2
    case_ep_unpack(ctx, 300, 2048, 8, 2, 0.9, false);  // the forward: rows only
    case_ep_unpack(ctx, 257, 256, 8, 4, 0.5, true);    // EP 4, tokens with no row at all
    case_ep_unpack(ctx, 129, 1032, 6, 8, 0.4, true);   // EP 8, Hc not a multiple of the block
    case_ep_unpack(ctx, 100, 64, 8, 9, 0.5, true);     // P 9: the loop (gathered only)
    case_ep_unpack(ctx, 50, 12, 4, 3, 0.6, true);      // H 12: the scalar kernel (gathered only)
  });
  run(filter, "moe_regions", [&] {  // EP padded mode's receive
    case_moe_regions(ctx, 7, {7, 0, 4}, 5, 2, 11);
    case_moe_regions(ctx, 5, {0, 0}, 3, 1, 8);  // nothing came
    // layout tiles wholly in padding (region 1 from row 17, region 2), the 16-byte kernels
    case_moe_regions(ctx, 300, {300, 17, 0, 255}, 32, 8, 256);
  });
  run(filter, "grouped_linear", [&] {
    case_grouped(ctx, "random", expert_counts(5, 37, 0), 8, 16, 3);
    case_grouped(ctx, "sparse", expert_counts(7, 100, 1), 24, 40, 0);
    case_grouped(ctx, "one", expert_counts(6, 300, 2), 64, 72, 5);
    case_grouped(ctx, "tails", {0, 1, 129, 257}, 136, 264, 0);  // partial tiles, K = 1 in dw
    case_grouped(ctx, "none", {0, 0, 0}, 16, 8, 5);              // no rows at all
    case_grouped(ctx, "unaligned", expert_counts(5, 50, 0), 12, 20, 0);  // fallback only
    case_grouped(ctx, "sparse", expert_counts(128, 4096, 1), 256, 512, 0);
    case_grouped(ctx, "W1", expert_counts(128, 65536, 0), 2048, 1536, 0);    // gate|up
    case_grouped(ctx, "down", expert_counts(128, 65536, 0), 768, 2048, 0);   // down
  });
  run(filter, "grouped_perf", [&] {
    perf_grouped(ctx, "W1", 128, 65536, 2048, 1536);
    perf_grouped(ctx, "down", 128, 65536, 768, 2048);
  });
  run(filter, "swiglu", [&] {
    case_swiglu(ctx, 7, 13);
    case_swiglu(ctx, 5, 11);
    case_swiglu(ctx, 4096, 768);
    case_swiglu(ctx, 9, 16);  // the 16-byte kernel, small
    // a device-side row count below the grid's rows (EP padded mode): both kernels, 0 rows
    case_swiglu(ctx, 4096, 768, 1000);
    case_swiglu(ctx, 7, 13, 3);
    case_swiglu(ctx, 9, 16, 0);
  });
  run(filter, "cross_entropy", [&] {
    case_cross_entropy(ctx, 7, 13, false);
    case_cross_entropy(ctx, 5, 1000, true);
    case_cross_entropy(ctx, 64, 151936, false);
    case_cross_entropy(ctx, 33, 151936, true);  // W1's vocabulary, in place (as the model runs it)
    case_cross_entropy(ctx, 6, 1003, false);    // V not a multiple of 8: the scalar path
  });
  run(filter, "aux_loss", [&] {
    case_aux_loss(ctx, 13, 5, 2, 0);
    case_aux_loss(ctx, 11, 7, 3, 1);
    case_aux_loss(ctx, 4096, 128, 8, 0);
    case_aux_loss(ctx, 12 * 8192, 128, 8, 0);  // W1: 12 layers' routing at once
  });
  run(filter, "adamw", [&] {
    case_adamw(ctx, 13);
    case_adamw(ctx, 1003);
    case_adamw(ctx, (1 << 22) + 7);
  });
  run(filter, "bf16grad", [&] {  // the training path's bf16 parameter gradients
    case_linear_bf16_dw(ctx, 5, 7, 11, 0.f);
    case_linear_bf16_dw(ctx, 13, 11, 5, 1.f);
    case_linear_bf16_dw(ctx, 512, 2048, 512, 0.f);
    case_linear_bf16_dw(ctx, 512, 2048, 512, 1.f);
    case_grouped_bf16_dw(ctx, 7, 5, 2, 11, 13, 0, 0.f);
    case_grouped_bf16_dw(ctx, 13, 11, 3, 7, 5, 1, 0.f);   // experts without tokens
    case_grouped_bf16_dw(ctx, 13, 11, 3, 7, 5, 1, 1.f);
    case_grouped_bf16_dw(ctx, 512, 128, 8, 256, 128, 0, 1.f);
    case_embedding_sorted(ctx, 13, 7, 11);
    case_embedding_sorted(ctx, 4096, 512, 2048);
  });
  run(filter, "glue", [&] {
    case_elementwise(ctx, 13);
    case_elementwise(ctx, (1 << 20) + 3);
    case_adamw_bf16_state(ctx, 1003);
    case_adamw_bf16_state(ctx, (1 << 22) + 7);
  });

  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\n%-24s %7s %6s %6s %14s\n", "op", "checks", "fails", "skips", "worst nmse/lim");
  for (const auto& [op, s] : g_stats)
    std::printf("%-24s %7d %6d %6d %14.2e\n", op.c_str(), s.checks, s.fails, s.skips, s.worst);
  std::printf("cuda_op_check: %d failure%s in %.1f s\n", g_failures, g_failures == 1 ? "" : "s",
              secs);
  return std::min(g_failures, 255);
}
