// bench/grouped_sweep.cu: which CUTLASS sm90 grouped GEMM configuration is fastest for each of
// the six MoE expert GEMMs of Qwen3-30B-A3B (E = 128 experts, R = 65536 routed rows = 8192
// tokens x top-8, hidden 2048, expert intermediate 768; gate_up has O = 2 x 768 = 1536).
// Built with -DAUTOMOE_GROUPED_SWEEP=ON only (bench/device.sh STAGES=sweep): every candidate
// configuration is its own translation unit (bench/grouped_sweep_candidate.cuh).
//
//   grouped_sweep [--only WORD]... [--iters N] [--batches N] [--child-timeout S]
//   grouped_sweep --one GEMM CANDIDATE [--iters N] [--batches N]   (one measurement, internal)
//   grouped_sweep --list
//
// Each (GEMM, candidate) runs in a child process (this binary with --one), so a configuration
// that faults, hangs (killed after --child-timeout s) or cannot run takes no other down. A child
// builds the same data (deterministic), runs the library's production entry point once as the
// reference, then the candidate once on NaN-filled output (wgrad: on dw0, beta = 1) and
// compares, then times it: warm-up (>= 3 calls and >= 200 ms), then --batches batches of
// --iters calls between two cudaEvents; ms is the median of the batch means. A call is what
// training pays: the offsets-to-arrays kernel plus the grouped kernel.
// Output: one line per (GEMM, candidate) with ms, TFLOP/s (2*R*I*O flops), the max relative
// difference to the production output (max |out - ref| / max |ref|; a correct configuration
// differs only by fp32 summation order, at most one bf16 ulp: <= 2^-8), then per GEMM the
// fastest correct candidate, and last one "BEST" line per GEMM. Exit code: the number of GEMMs
// whose production reference could not be measured.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/grouped_gemm_sm90.h"
#include "grouped_sweep.h"

namespace automoe::sweep {

std::vector<Candidate>& registry() {
  static std::vector<Candidate> all;
  return all;
}
void add_candidate(const Candidate& c) { registry().push_back(c); }

}  // namespace automoe::sweep

namespace {

using automoe::cuda::bf16;
using automoe::cuda::DeviceBuffer;
namespace cu = automoe::cuda;
namespace sw = automoe::sweep;
using sw::Op;

constexpr int64_t kExperts = 128;
constexpr int64_t kRows = 65536;      // 8192 tokens x top-8
constexpr int kEmptyExpert = 37;      // gets no rows: the M = 0 path stays in the measurement
constexpr double kRelLimit = 1e-2;    // above: the configuration computes something else

// The six expert GEMMs, in grouped_linear's terms (w[e] is [O, I]).
struct Gemm {
  const char* name;
  Op op;
  int64_t I, O;
  const char* what;  // with the GEMM's M, N, K per expert
};
constexpr Gemm kGemms[] = {
    {"fwd_gate_up", Op::fwd, 2048, 1536,
     "out[R,1536] = x[R,2048] @ w[e]^T  (M=rows N=1536 K=2048)"},
    {"fwd_down", Op::fwd, 768, 2048, "out[R,2048] = act[R,768] @ w[e]^T  (M=rows N=2048 K=768)"},
    {"dgrad_gate_up", Op::dgrad, 2048, 1536,
     "dx[R,2048] = dout[R,1536] @ w[e]  (M=rows N=2048 K=1536)"},
    {"dgrad_down", Op::dgrad, 768, 2048, "dx[R,768] = dout[R,2048] @ w[e]  (M=rows N=768 K=2048)"},
    {"wgrad_gate_up", Op::wgrad, 2048, 1536,
     "dw[e][1536,2048] += dout_e^T @ x_e  (M=1536 N=2048 K=rows of e)"},
    {"wgrad_down", Op::wgrad, 768, 2048,
     "dw[e][2048,768] += dout_e^T @ act_e  (M=2048 N=768 K=rows of e)"},
};

const char* op_name(Op op) { return op == Op::fwd ? "fwd" : op == Op::dgrad ? "dgrad" : "wgrad"; }

// ---- the production entry points as candidates -------------------------------------------------

size_t prod_ws_fwd(int64_t E, int sms) { return cu::sm90::fwd_workspace_bytes(E, sms); }
size_t prod_ws_dgrad(int64_t E, int sms) { return cu::sm90::dgrad_workspace_bytes(E, sms); }
size_t prod_ws_wgrad(int64_t E, int sms) { return cu::sm90::wgrad_bf16_workspace_bytes(E, sms); }
void prod_fwd(const sw::Call& c, const cu::Ctx& ctx) {
  cu::sm90::fwd(c.out, c.a, c.b, c.offsets, c.E, c.I, c.O, ctx);
}
void prod_dgrad(const sw::Call& c, const cu::Ctx& ctx) {
  cu::sm90::dgrad(c.out, c.a, c.b, c.offsets, c.E, c.I, c.O, ctx);
}
void prod_wgrad(const sw::Call& c, const cu::Ctx& ctx) {
  cu::sm90::wgrad(c.out, 1.0f, c.a, c.b, c.offsets, c.E, c.I, c.O, ctx);
}
const sw::Candidate kProduction[] = {{Op::fwd, "production", &prod_ws_fwd, &prod_fwd},
                                     {Op::dgrad, "production", &prod_ws_dgrad, &prod_dgrad},
                                     {Op::wgrad, "production", &prod_ws_wgrad, &prod_wgrad}};
const sw::Candidate& production(Op op) { return kProduction[int(op)]; }

// Production first, then the swept configurations by name.
std::vector<sw::Candidate> candidates(Op op) {
  std::vector<sw::Candidate> v = {production(op)};
  std::vector<sw::Candidate> swept;
  for (const sw::Candidate& c : sw::registry())
    if (c.op == op) swept.push_back(c);
  std::sort(swept.begin(), swept.end(), [](const sw::Candidate& a, const sw::Candidate& b) {
    return std::strcmp(a.name, b.name) < 0;
  });
  v.insert(v.end(), swept.begin(), swept.end());
  return v;
}

// Rows per expert: each row to one expert drawn with weight 0.5 + u (u uniform in [0, 1)), so
// counts spread over about 256..768 around R/E = 512; kEmptyExpert gets none. Deterministic:
// the parent and every child draw the same counts.
std::vector<int32_t> routing_counts(int64_t E, int64_t R) {
  std::mt19937 rng(20261128);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<double> weight(E);
  for (double& w : weight) w = 0.5 + u(rng);
  weight[kEmptyExpert % E] = 0.0;
  std::discrete_distribution<int> pick(weight.begin(), weight.end());
  std::vector<int32_t> c(E, 0);
  for (int64_t r = 0; r < R; ++r) c[pick(rng)]++;
  return c;
}

// ---- device helpers ----------------------------------------------------------------------------

__device__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// p[i] = uniform in [lo, hi) from a hash of (seed, i): the same data in every process.
__global__ void fill_uniform_kernel(bf16* p, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float u = float(splitmix64(seed * 0x100000001B3ull + uint64_t(i)) >> 40) * 0x1p-24f;
    p[i] = __float2bfloat16_rn(lo + (hi - lo) * u);
  }
}

// Over n elements: max |got - ref| and max |ref| (as float bits: non-negative floats order as
// unsigned ints), elements where got or ref is not finite, and elements that differ at all.
struct DiffStats {
  unsigned max_diff_bits, max_ref_bits;
  unsigned long long nonfinite, ndiff;
};
__global__ void diff_kernel(DiffStats* s, const bf16* got, const bf16* ref, int64_t n) {
  float md = 0.f, mr = 0.f;
  unsigned long long nf = 0, nd = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = __bfloat162float(got[i]), r = __bfloat162float(ref[i]);
    if (!isfinite(g) || !isfinite(r)) {
      ++nf;
      continue;
    }
    nd += g != r;
    md = fmaxf(md, fabsf(g - r));
    mr = fmaxf(mr, fabsf(r));
  }
  for (int o = 16; o > 0; o /= 2) {
    md = fmaxf(md, __shfl_xor_sync(0xffffffffu, md, o));
    mr = fmaxf(mr, __shfl_xor_sync(0xffffffffu, mr, o));
    nf += __shfl_xor_sync(0xffffffffu, nf, o);
    nd += __shfl_xor_sync(0xffffffffu, nd, o);
  }
  if (threadIdx.x % 32 == 0) {
    atomicMax(&s->max_diff_bits, __float_as_uint(md));
    atomicMax(&s->max_ref_bits, __float_as_uint(mr));
    atomicAdd(&s->nonfinite, nf);
    atomicAdd(&s->ndiff, nd);
  }
}

void fill_uniform(const DeviceBuffer<bf16>& b, uint64_t seed, float lo, float hi,
                  cudaStream_t stream) {
  fill_uniform_kernel<<<1024, 256, 0, stream>>>(b.get(), int64_t(b.size()), seed, lo, hi);
  CUDA_CHECK_LAUNCH();
}

// ---- one measurement (the child) ---------------------------------------------------------------

struct Options {
  int iters = 20, batches = 3, child_timeout_s = 120;
  std::vector<std::string> only;  // GEMM or candidate names containing one of these words
};

const Gemm* find_gemm(const std::string& name) {
  for (const Gemm& g : kGemms)
    if (name == g.name) return &g;
  return nullptr;
}

// Prints "RESULT <gemm> <candidate> ms=.. spread=.. tflops=.. maxrel=.. nonfinite=.. ndiff=.."
// or "SKIP <gemm> <candidate> <why>" (CUTLASS cannot run it); returns the exit code.
int measure_one(const Gemm& g, const sw::Candidate& cand, const Options& opt) {
  const int64_t E = kExperts, R = kRows, I = g.I, O = g.O;
  const std::vector<int32_t> counts = routing_counts(E, R);
  std::vector<int32_t> off(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];

  int sms = 0;
  CUDA_CHECK(cudaSetDevice(0));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const sw::Candidate& prod = production(g.op);
  cu::ScopedCtx scoped(std::max(prod.workspace_bytes(E, sms), cand.workspace_bytes(E, sms)));
  const cu::Ctx& ctx = scoped.ctx();

  // fwd: a = x[R,I], b = w[E,O,I], out[R,O]; dgrad: a = dout[R,O], b = w, out = dx[R,I];
  // wgrad: a = dout[R,O], b = x[R,I], out = dw[E,O,I] (from dw0)
  const size_t a_n = size_t(g.op == Op::fwd ? R * I : R * O);
  const size_t b_n = size_t(g.op == Op::wgrad ? R * I : E * O * I);
  const size_t out_n = size_t(g.op == Op::fwd ? R * O : g.op == Op::dgrad ? R * I : E * O * I);
  DeviceBuffer<bf16> a(a_n), b(b_n), out(out_n), ref(out_n);
  DeviceBuffer<bf16> dw0(g.op == Op::wgrad ? out_n : 0);
  DeviceBuffer<int32_t> d_off(off.size());
  DeviceBuffer<DiffStats> stats(1);
  CUDA_CHECK(cudaMemcpyAsync(d_off.get(), off.data(), off.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, ctx.stream));
  const float ws = 1.0f / std::sqrt(float(g.op == Op::fwd ? I : O));  // w ~ 1/sqrt(fan-in)
  fill_uniform(a, 1, -1.f, 1.f, ctx.stream);
  if (g.op == Op::wgrad) {
    fill_uniform(b, 2, -1.f, 1.f, ctx.stream);
    fill_uniform(dw0, 3, -1.f, 1.f, ctx.stream);
  } else {
    fill_uniform(b, 2, -ws, ws, ctx.stream);
  }
  const sw::Call ref_call{ref.get(), a.get(), b.get(), d_off.get(), E, I, O};
  const sw::Call call{out.get(), a.get(), b.get(), d_off.get(), E, I, O};
  auto reset = [&](const DeviceBuffer<bf16>& dst) {  // NaN (0xFFFF), or dw0 for wgrad's +=
    if (g.op == Op::wgrad)
      CUDA_CHECK(cudaMemcpyAsync(dst.get(), dw0.get(), dst.bytes(), cudaMemcpyDeviceToDevice,
                                 ctx.stream));
    else
      CUDA_CHECK(cudaMemsetAsync(dst.get(), 0xFF, dst.bytes(), ctx.stream));
  };
  reset(ref);
  prod.run(ref_call, ctx);
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));

  // the check: one call on a fresh output
  reset(out);
  try {
    cand.run(call, ctx);
  } catch (const automoe::Error& e) {
    std::printf("SKIP %s %s %s\n", g.name, cand.name, e.what());
    return 0;
  }
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  CUDA_CHECK(cudaMemsetAsync(stats.get(), 0, sizeof(DiffStats), ctx.stream));
  diff_kernel<<<1024, 256, 0, ctx.stream>>>(stats.get(), out.get(), ref.get(), int64_t(out_n));
  CUDA_CHECK_LAUNCH();
  DiffStats st{};
  CUDA_CHECK(cudaMemcpyAsync(&st, stats.get(), sizeof st, cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  float max_diff = 0.f, max_ref = 0.f;
  std::memcpy(&max_diff, &st.max_diff_bits, sizeof max_diff);
  std::memcpy(&max_ref, &st.max_ref_bits, sizeof max_ref);
  const double maxrel = max_ref > 0.f ? double(max_diff) / double(max_ref) : double(max_diff);

  // the timing (wgrad keeps accumulating into dw: same work per call)
  using clock = std::chrono::steady_clock;
  const auto w0 = clock::now();
  for (int i = 0; i < 3 || clock::now() - w0 < std::chrono::milliseconds(200); ++i) {
    cand.run(call, ctx);
    if (i % 8 == 7) CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  }
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> means;
  for (int bt = 0; bt < opt.batches; ++bt) {
    CUDA_CHECK(cudaEventRecord(e0, ctx.stream));
    for (int i = 0; i < opt.iters; ++i) cand.run(call, ctx);
    CUDA_CHECK(cudaEventRecord(e1, ctx.stream));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    means.push_back(double(ms) / opt.iters);
  }
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(means.begin(), means.end());
  const double ms = means[means.size() / 2];
  const double spread = (means.back() - means.front()) / ms;
  const double flop = 2.0 * double(R) * double(I) * double(O);
  std::printf(
      "RESULT %s %s ms=%.4f spread=%.4f tflops=%.1f maxrel=%.3e nonfinite=%llu ndiff=%llu\n",
      g.name, cand.name, ms, spread, flop / ms * 1e-9, maxrel, st.nonfinite, st.ndiff);
  return 0;
}

// ---- the driver (the parent: no CUDA here) -----------------------------------------------------

struct Row {
  std::string name, status;  // status: "ok", "WRONG", "skip", "FAILED"
  double ms = 0, tflops = 0, spread = 0, maxrel = 0;
  unsigned long long nonfinite = 0, ndiff = 0;
};

std::string self_exe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  AM_CHECK(n > 0, "grouped_sweep: cannot read /proc/self/exe (needed to start the children)");
  buf[n] = 0;
  return buf;
}

// Runs `self --one gemm candidate` under timeout(1), reads its lines and prints one row.
Row run_child(const std::string& exe, const Gemm& g, const sw::Candidate& c, const Options& opt,
              const char* label) {
  Row row{label, "FAILED"};
  const std::string cmd = "timeout " + std::to_string(opt.child_timeout_s) + " '" + exe +
                          "' --one " + g.name + " " + c.name + " --iters " +
                          std::to_string(opt.iters) + " --batches " +
                          std::to_string(opt.batches) + " 2>&1";
  std::FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    std::printf("  %-28s FAILED: popen: %s\n", label, std::strerror(errno));
    return row;
  }
  std::string other;
  char line[8192];
  bool got = false;
  while (std::fgets(line, sizeof line, p)) {
    std::string s(line);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    const std::string result = std::string("RESULT ") + g.name + " " + c.name + " ";
    const std::string skip = std::string("SKIP ") + g.name + " " + c.name + " ";
    if (s.rfind(result, 0) == 0) {
      std::sscanf(s.c_str() + result.size(),
                  "ms=%lf spread=%lf tflops=%lf maxrel=%lf nonfinite=%llu ndiff=%llu", &row.ms,
                  &row.spread, &row.tflops, &row.maxrel, &row.nonfinite, &row.ndiff);
      const bool ok = row.nonfinite == 0 && std::isfinite(row.maxrel) && row.maxrel <= kRelLimit;
      row.status = ok ? "ok" : "WRONG";
      got = true;
    } else if (s.rfind(skip, 0) == 0) {
      row.status = "skip: " + s.substr(skip.size());
      got = true;
    } else {
      other += "      | " + s + "\n";
    }
  }
  const int st = pclose(p);
  const int rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  if (!got || rc != 0) {
    row.status = rc == 124 ? "FAILED: hung, killed after " + std::to_string(opt.child_timeout_s) +
                                 " s"
                           : "FAILED: exit " + std::to_string(rc);
    row.ms = 0;
  }
  if (row.status == "ok" || row.status == "WRONG") {
    std::printf("  %-28s %8.4f ms %7.1f TFLOP/s  spread %4.1f%%  maxrel %.2e (%llu differ)",
                label, row.ms, row.tflops, 100 * row.spread, row.maxrel, row.ndiff);
    if (row.nonfinite) std::printf("  %llu not finite", row.nonfinite);
    std::printf("%s\n", row.status == "WRONG" ? "  WRONG: not what production computes" : "");
  } else {
    std::printf("  %-28s %s\n", label, row.status.c_str());
  }
  if (!other.empty() && row.status != "ok") std::printf("%s", other.c_str());
  std::fflush(stdout);
  return row;
}

bool selected(const Options& opt, const std::string& s) {
  if (opt.only.empty()) return true;
  for (const std::string& w : opt.only)
    if (s.find(w) != std::string::npos) return true;
  return false;
}

int drive(const Options& opt) {
  const std::string exe = self_exe();
  const std::vector<int32_t> counts = routing_counts(kExperts, kRows);
  int32_t mn = kRows, mx = 0;
  int64_t empty = 0;
  for (int32_t c : counts) {
    empty += c == 0;
    if (c > 0) mn = std::min(mn, c);
    mx = std::max(mx, c);
  }
  std::printf("grouped_sweep: E=%lld R=%lld, rows per non-empty expert %d..%d (mean %lld), %lld "
              "empty; bf16 in, fp32 accumulate; ms = median of %d batch means of %d calls\n",
              (long long)kExperts, (long long)kRows, mn, mx, (long long)(kRows / kExperts),
              (long long)empty, opt.batches, opt.iters);
  std::printf("production = the library's sm90 entry point (src/backend/cuda/sm90: cooperative "
              "128x256x64; fwd and dgrad without clusters, wgrad with 2x1x1); maxrel vs its "
              "output, WRONG above %.0e\n",
              kRelLimit);
  std::fflush(stdout);
  int missing = 0;
  std::vector<std::string> best;
  for (const Gemm& g : kGemms) {
    // production (the reference, first) always; the others when the GEMM or they are selected
    std::vector<sw::Candidate> cands;
    for (const sw::Candidate& c : candidates(g.op))
      if (cands.empty() || selected(opt, g.name) || selected(opt, c.name)) cands.push_back(c);
    if (cands.size() == 1 && !selected(opt, g.name)) continue;
    const double gflop = 2.0 * double(kRows) * double(g.I) * double(g.O) * 1e-9;
    std::printf("\n== %s: %s, %.1f GFLOP\n", g.name, g.what, gflop);
    std::vector<Row> rows;
    for (const sw::Candidate& c : cands) rows.push_back(run_child(exe, g, c, opt, c.name));
    // production again last: drift over the GEMM's candidates (clocks, temperature)
    const Row again = run_child(exe, g, production(g.op), opt, "production (again)");
    const Row* prod = rows[0].status == "ok" ? &rows[0] : nullptr;
    if (!prod) ++missing;
    const Row* win = nullptr;
    for (const Row& r : rows)
      if (r.status == "ok" && (!win || r.ms < win->ms)) win = &r;
    if (again.status == "ok" && prod)
      std::printf("  drift of production over this GEMM's runs: %+.1f%%\n",
                  100 * (again.ms / prod->ms - 1));
    char buf[512];
    if (win && prod) {
      std::snprintf(buf, sizeof buf,
                    "BEST %-14s %-28s %8.4f ms %7.1f TFLOP/s  (production %.4f ms: %.3fx)",
                    g.name, win->name.c_str(), win->ms, win->tflops, prod->ms, prod->ms / win->ms);
    } else if (win) {
      std::snprintf(buf, sizeof buf, "BEST %-14s %-28s %8.4f ms %7.1f TFLOP/s  (no production run)",
                    g.name, win->name.c_str(), win->ms, win->tflops);
    } else {
      std::snprintf(buf, sizeof buf, "BEST %-14s none: no candidate ran correctly", g.name);
    }
    std::printf("-- %s\n", buf);
    std::fflush(stdout);
    best.push_back(buf);
  }
  std::printf("\n== grouped_sweep summary: the fastest correct configuration per GEMM\n");
  for (const std::string& b : best) std::printf("%s\n", b.c_str());
  return missing;
}

int usage() {
  std::fprintf(stderr,
               "usage: grouped_sweep [--only WORD]... [--iters N] [--batches N] "
               "[--child-timeout S] | --list | --one GEMM CANDIDATE [--iters N] [--batches N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  std::string one_gemm, one_cand;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--list") {
      list = true;
    } else if (a == "--one" && i + 2 < argc) {
      one_gemm = argv[++i];
      one_cand = argv[++i];
    } else if (a == "--only" && (v = next())) {
      opt.only.push_back(v);
    } else if (a == "--iters" && (v = next())) {
      opt.iters = std::max(1, std::atoi(v));
    } else if (a == "--batches" && (v = next())) {
      opt.batches = std::max(1, std::atoi(v));
    } else if (a == "--child-timeout" && (v = next())) {
      opt.child_timeout_s = std::max(1, std::atoi(v));
    } else {
      return usage();
    }
  }
  try {
    if (list) {
      for (Op op : {Op::fwd, Op::dgrad, Op::wgrad})
        for (const sw::Candidate& c : candidates(op)) std::printf("%s %s\n", op_name(op), c.name);
      return 0;
    }
    if (!one_gemm.empty()) {
      const Gemm* g = find_gemm(one_gemm);
      if (!g) {
        std::fprintf(stderr, "grouped_sweep: no GEMM %s (kGemms in bench/grouped_sweep.cu)\n",
                     one_gemm.c_str());
        return 2;
      }
      for (const sw::Candidate& c : candidates(g->op))
        if (one_cand == c.name) return measure_one(*g, c, opt);
      std::fprintf(stderr, "grouped_sweep: no candidate %s for %s (grouped_sweep --list)\n",
                   one_cand.c_str(), op_name(g->op));
      return 2;
    }
    return drive(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "grouped_sweep: %s\n", e.what());
    return 1;
  }
}
