// bench/ep_check.cpp: the GPU expert-parallel MoE block (dist/expert_parallel_cuda.h) against the
// single-GPU MoE ops, and its dispatch/combine bandwidth.
//
//   ep_check [--loopback P]          P virtual ranks on ONE GPU (loopback transport; the default
//                                    without mpirun, P = 4)
//   mpirun -np P ep_check            one rank per process; the transport is --transport or
//                                    AUTOMOE_EP_TRANSPORT: nccl (a GPU per rank, built with
//                                    NCCL), mpi (rows staged through host memory and MPI: any
//                                    number of ranks on ONE GPU), ipc (CUDA IPC buffers: the
//                                    ranks of one node, on one GPU or on P2P-capable GPUs),
//                                    auto (default: ipc within a node, else nccl when every
//                                    rank has its own GPU and NCCL is built in, else mpi;
//                                    dist/gpu_rank.h)
//   The bandwidth run (not with --no-bench; a GPU per rank, NCCL built in): the forward's
//   dispatch and combine over the chosen transport, timed, against ncclAlltoAll of the same
//   bytes on an NCCL communicator of the same ranks (opened for it when the transport is not
//   NCCL): "BW <transport> rank ..." lines; counts mode over IPC both with the forward's
//   direct dispatch ("direct", the default) and without it ("packed", AUTOMOE_EP_PUSH=0), and
//   the direct dispatch's time in three (layout + counts sent, push, copy-out: dist::EpTimes).
//   Each timed iteration starts after a host barrier (a rank's own call, not its wait for a
//   peer that is still finishing the last iteration).
//   flags: --tokens N (8192, per rank) --hidden H (2048) --inter I (768) --experts E (128)
//          --topk K (8) --modes counts,padded --recompute none,outputs,experts (all three)
//          --chunks 2,3 (train.ep_chunks checked against one chunk; "1" for none)
//          --iters 20 --warmup 3 --seed S --no-bench
//          --bench-only (the bandwidth run alone, no checks)
//          --queued-start (the bandwidth run: each timed call, ours and NCCL's, behind 300 us of
//          GPU spin after the barrier, so its work is enqueued before the GPU reaches it, as in
//          a step; without it the idle GPU also times the host's launches)
//          --time (loopback: no checks; the block's fwd and bwd GPU time per chunk count (1,
//          then --chunks), mode and recompute option, median of --iters: the relative cost of
//          the options)
//          --transport mpi|nccl|ipc|auto (under mpirun)
//          --kill-rank R [--kill-mode exit|stall]   (NCCL: rank R exits abruptly, or stops
//          communicating, in the middle of the bandwidth run; the others must stop with an
//          error within AUTOMOE_NCCL_TIMEOUT_S, never hang)
//          --stall-rank R   (IPC, a drill instead of the checks; needs AUTOMOE_DIST_TIMEOUT <= 60:
//          after one padded forward together, rank R sleeps the timeout + 15 s before its next
//          forward; every other rank's sync() must throw the transport's timeout error (naming
//          AUTOMOE_DIST_TIMEOUT) within the timeout + 10 s: "PASS ... stalled peer" or "FAIL";
//          then the job ends through MPI_Abort, so its exit code is non-zero either way)
//   Under mpirun over IPC, with padded in --modes: "no host wait" (after the checks): a padded forward is enqueued while the
//   stream is held 1.5 s by a host function and every rank but 0 starts it 0.3 s late; its
//   host enqueue must take < 200 ms on every rank with the stream still busy after it (a host
//   wait on the device or a host collective inside the call would take longer), and its
//   output must be bit-identical to the same forward run plainly.
//
// Every rank has its own random tokens, routing and d(out); all of it is made from seeds, so each
// process can rebuild every rank's inputs. The reference runs the tokens of ALL ranks through
// all E experts on one GPU with the existing ops (moe_layout, permute, grouped_linear, swiglu,
// unpermute and their backwards), exactly one process on the concatenated batch, as the CPU EP
// tests do. Compared, per mode (counts, padded) and case (random routing; a rank receiving no
// rows; every token on rank 0's experts; N odd), as NMSE = sum (ep - ref)^2 / sum ref^2:
//   out, dx (bf16), dtopk_w (f32), the expert weight gradients (bf16, g_beta 0), then a second
//   forward (must be bit-identical: no atomics) and a backward with g_beta 1 (gradients 2x).
//   Then each recompute option of --recompute (EpRecompute: outputs, experts; train.
//   ep_recompute), a block sharing the scratch, with the scratch's expert buffers overwritten
//   between its forward and backward: out, dx, dtopk_w and both weight gradients must be
//   bit-identical to the block that keeps everything ("rc=outputs", "rc=experts" lines).
//   Padded mode against counts mode (train.ep_dispatch): the same rows reach the same expert
//   GEMMs in the same order (source rank, then token; moe_layout is stable; the grouped GEMMs
//   read only the rows of the device offsets), so each case's out, dx, dtopk_w and weight
//   gradients must be bit-identical to counts mode's on the same inputs ("= counts" lines:
//   64-bit hashes of the bits; needs counts before padded in --modes, the default).
//   The backward's weight gradients beside the combine (AUTOMOE_EP_WGRAD_OVERLAP, default on)
//   against the same block with them on the caller's stream (the setting flipped: "wgrad
//   overlap off" lines, "on" under AUTOMOE_EP_WGRAD_OVERLAP=0): out, dx, dtopk_w and both
//   weight gradients bit-identical, with g_beta 0 and 1. Every read of a weight gradient joins
//   the block's side stream first (finish()), as the model does.
//   Token chunks (train.ep_chunks, --chunks, default 2 and 3): the same block pipelining its
//   tokens in C chunks over the comm stream, per recompute option, from a poisoned scratch:
//   each token's rows go through the same kernels, and a row's result depends on its own
//   inputs only (the grouped GEMMs compute each output row's dot products alike whatever the
//   rows around it; permute, unpermute and combine sum a token's picks and ranks in the same
//   order), so out, dx and dtopk_w must be bit-identical to one chunk's ("chunks=C" lines);
//   the weight gradients sum a chunk's rows at a time in fp32 and round once, so they may
//   differ from one chunk's in the last bit now and then: NMSE <= 1e-6 (a bf16 rounding is
//   ~1e-5 relative), with the number of differing elements printed; with g_beta 0 and 1.
//   The odd N is not a multiple of 2 or 3, "none to last" sends no rows of any chunk to the
//   last rank.
// A small unaligned suite (H 100, I 36, N 37: the scalar kernel paths, the GEMM fallback)
// runs before the given shapes. Then the arena check (check_arena), per mode and recompute
// option: three layers' forwards then backwards in reverse through one shared EpSavedArena
// (counts: 2x the balanced load; padded: ep_arena_padded_bytes, what the model sizes),
// bit-identical to each layer run alone by a counts-mode block keeping everything, its weight
// gradients on the caller's stream (so the shared layers, overlap on by default, also check the
// side stream's ordering against the shared scratch bitwise); again with the layers in 2 token
// chunks (--chunks: the first C > 1; the weight gradients then within 1e-6); a backward
// after a reset refused; an arena too small stopping with the overflow error.
// Prints PASS/FAIL lines; the exit code is the number of failures (at most 255).
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "backend/cuda/ops_cuda.h"
#include "backend/cuda/spin.h"
#include "dist/expert_parallel_cuda.h"
#include "dist/gpu_rank.h"
#include "dist/process_group.h"
#if AUTOMOE_HAVE_NCCL
#include "dist/nccl_group.h"
#endif

namespace cu = automoe::cuda;
namespace dist = automoe::dist;
using cu::bf16;
template <class T>
using Buf = cu::DeviceBuffer<T>;

namespace {

// NMSE limits. bf16 outputs after fp32 math: one rounding is ~1e-6; the EP path rounds partial
// sums once more (receiver's weighted sum, combine), so allow op_check's bf16 limit. dx also
// goes through two grouped GEMMs of bf16 intermediates (op_check's "chain" limit).
constexpr double kOut = 1e-4, kDx = 1e-3, kDw = 1e-4, kGrad = 1e-4;
// Token chunks' weight gradients against one chunk's: fp32 sums in another order, rounded once
// to bf16: rare last-bit differences (one is ~1e-5 relative, squared ~1e-10 per element).
constexpr double kChunkGrad = 1e-6;

struct Opts {
  int loopback = 0;  // 0: NCCL under mpirun, loopback with 4 ranks otherwise
  int64_t N = 8192, H = 2048, I = 768, E = 128, K = 8;
  std::vector<dist::EpMode> modes{dist::EpMode::kCounts, dist::EpMode::kPadded};
  // none first: the block checked against the reference, the others bitwise against it
  std::vector<dist::EpRecompute> recompute{dist::EpRecompute::kNone, dist::EpRecompute::kOutputs,
                                           dist::EpRecompute::kExperts};
  int iters = 20, warmup = 3;
  uint64_t seed = 20261129;
  bool bench = true;
  bool checks = true;  // --bench-only: false
  bool queued = false;  // --queued-start
  int kill_rank = -1;
  int stall_rank = -1;  // IPC: the stalled-peer drill
  std::string kill_mode = "exit";
  std::string transport;  // "" = AUTOMOE_EP_TRANSPORT (default auto)
  bool time_only = false;  // loopback: time fwd and bwd per mode and recompute option, no checks
  std::vector<int> chunks{2, 3};  // train.ep_chunks checked against one chunk
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "ep_check: %s\nusage: ep_check [--loopback P] [--tokens N] [--hidden H] [--inter I] "
               "[--experts E] [--topk K] [--modes counts,padded] "
               "[--recompute none,outputs,experts] [--iters N] [--warmup N] "
               "[--seed S] [--no-bench | --bench-only] [--queued-start] [--kill-rank R] "
               "[--kill-mode exit|stall] [--stall-rank R] "
               "[--transport mpi|nccl|ipc|auto] [--time] [--chunks 2,3]\n",
               why.c_str());
  std::exit(2);
}

Opts parse(int argc, char** argv) {
  Opts o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    auto num = [&]() -> int64_t {
      const std::string v = val();
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      if (!end || *end) usage(a + " needs an integer, got " + v);
      return x;
    };
    if (a == "--loopback") o.loopback = int(num());
    else if (a == "--tokens") o.N = num();
    else if (a == "--hidden") o.H = num();
    else if (a == "--inter") o.I = num();
    else if (a == "--experts") o.E = num();
    else if (a == "--topk") o.K = num();
    else if (a == "--iters") o.iters = int(num());
    else if (a == "--warmup") o.warmup = int(num());
    else if (a == "--seed") o.seed = uint64_t(num());
    else if (a == "--no-bench") o.bench = false;
    else if (a == "--bench-only") o.checks = false;
    else if (a == "--queued-start") o.queued = true;
    else if (a == "--time") o.time_only = true;
    else if (a == "--kill-rank") o.kill_rank = int(num());
    else if (a == "--kill-mode") o.kill_mode = val();
    else if (a == "--stall-rank") o.stall_rank = int(num());
    else if (a == "--transport") o.transport = val();
    else if (a == "--chunks") {
      o.chunks.clear();
      std::string v = val();
      for (size_t at = 0; at <= v.size();) {
        const size_t end = std::min(v.find(',', at), v.size());
        const int c = std::atoi(v.substr(at, end - at).c_str());
        if (c < 1 || c > dist::kEpMaxChunks) usage("--chunks takes numbers from 1 to 8");
        if (c > 1) o.chunks.push_back(c);  // 1: the block every chunked one is checked against
        at = end + 1;
      }
    }
    else if (a == "--modes") {
      o.modes.clear();
      const std::string v = val();
      for (size_t p = 0; p <= v.size();) {
        size_t q = v.find(',', p);
        if (q == std::string::npos) q = v.size();
        const std::string m = v.substr(p, q - p);
        if (m == "counts") o.modes.push_back(dist::EpMode::kCounts);
        else if (m == "padded") o.modes.push_back(dist::EpMode::kPadded);
        else usage("unknown mode " + m + " (counts, padded)");
        p = q + 1;
      }
    } else if (a == "--recompute") {
      o.recompute.assign(1, dist::EpRecompute::kNone);  // always the baseline
      const std::string v = val();
      for (size_t p = 0; p <= v.size();) {
        size_t q = v.find(',', p);
        if (q == std::string::npos) q = v.size();
        const std::string m = v.substr(p, q - p);
        if (m == "outputs") o.recompute.push_back(dist::EpRecompute::kOutputs);
        else if (m == "experts") o.recompute.push_back(dist::EpRecompute::kExperts);
        else if (m != "none") usage("unknown recompute option " + m + " (none, outputs, experts)");
        p = q + 1;
      }
    } else usage("unknown flag " + a);
  }
  if (o.kill_mode != "exit" && o.kill_mode != "stall") usage("--kill-mode is exit or stall");
  if (o.N < 1 || o.H < 1 || o.I < 1 || o.K < 1 || o.E < o.K) usage("shapes must be positive, K <= E");
  return o;
}

// ---- host helpers ------------------------------------------------------------------------------

template <class T>
std::vector<float> download(const T* d, int64_t n) {
  std::vector<T> h(size_t(std::max<int64_t>(n, 0)));
  if (n > 0) CUDA_CHECK(cudaMemcpy(h.data(), d, size_t(n) * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) {
    if constexpr (std::is_same_v<T, bf16>) f[i] = __bfloat162float(h[i]);
    else f[i] = float(h[i]);
  }
  return f;
}

template <class T>
void upload(T* d, const std::vector<T>& h) {
  if (!h.empty()) CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}

struct Tally {
  int checks = 0, fails = 0;
  std::string tag;  // "loopback P=4" or "nccl rank 1/2"
  // counts mode's bits of each case (out, dx, dtopk_w, d w_gate_up, d w_down), by case, for
  // padded mode's "= counts" checks
  std::map<std::string, std::array<uint64_t, 5>> counts_bits;
};

// 64 bits of a tensor's bytes (word-wise multiply-xorshift): two tensors with the same hash
// hold the same bits, barring a collision (not adversarial data).
template <class T>
uint64_t hash_bits(const std::vector<T>& v) {
  const size_t n = v.size() * sizeof(T);
  const unsigned char* b = reinterpret_cast<const unsigned char*>(v.data());
  uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  auto mix = [&h](uint64_t w) {
    h ^= w;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  };
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, b + i, 8);
    mix(w);
  }
  uint64_t w = 0;
  std::memcpy(&w, b + i, n - i);
  mix(w);
  return h;
}

// Two bf16 tensors meant to differ in a last bit now and then only (the chunked block's weight
// gradients against one chunk's): NMSE within `limit`, plus how many elements differ and the
// largest difference in units of the last place, printed (the measured difference).
void close_bits(Tally& t, const std::string& what, const std::vector<bf16>& got,
                const std::vector<bf16>& want, double limit) {
  double num = 0, den = 0;
  int64_t differ = 0, max_ulp = 0;
  const bool same_size = got.size() == want.size();
  for (size_t i = 0; same_size && i < got.size(); ++i) {
    const double g = __bfloat162float(got[i]), w = __bfloat162float(want[i]);
    num += (g - w) * (g - w);
    den += w * w;
    uint16_t a, b;
    std::memcpy(&a, &got[i], 2);
    std::memcpy(&b, &want[i], 2);
    if (a != b) {
      ++differ;
      // same sign: the distance in representable steps; else count it as large
      max_ulp = std::max<int64_t>(max_ulp, (a ^ b) & 0x8000 ? 1 << 16 : std::abs(int(a) - int(b)));
    }
  }
  const double nmse = den > 0 ? num / den : num;
  const bool ok = same_size && std::isfinite(nmse) && nmse <= limit;
  ++t.checks;
  if (!ok) ++t.fails;
  std::printf("%-4s %s %-34s nmse=%.2e (limit %.0e), %lld of %zu elements differ, at most %lld "
              "ulp\n",
              ok ? "PASS" : "FAIL", t.tag.c_str(), what.c_str(), nmse, limit, (long long)differ,
              got.size(), (long long)max_ulp);
}

// NMSE of got against ref (scaled by ref_scale), NaN/Inf where ref is finite fail.
void compare(Tally& t, const std::string& what, const std::vector<float>& got,
             const std::vector<float>& ref, double limit, float ref_scale = 1.f) {
  double num = 0, den = 0;
  int64_t bad = 0;
  const int64_t n = int64_t(std::min(got.size(), ref.size()));
#pragma omp parallel for reduction(+ : num, den, bad)
  for (int64_t i = 0; i < n; ++i) {
    const double r = double(ref[size_t(i)]) * ref_scale, g = got[size_t(i)];
    if (!std::isfinite(g) && std::isfinite(r)) ++bad;
    num += (g - r) * (g - r);
    den += r * r;
  }
  const double nmse = den > 0 ? num / den : num;
  const bool ok = bad == 0 && got.size() == ref.size() && nmse <= limit;
  ++t.checks;
  if (!ok) ++t.fails;
  std::printf("%-4s %s %-34s nmse=%.2e (limit %.0e)%s\n", ok ? "PASS" : "FAIL", t.tag.c_str(),
              what.c_str(), nmse, limit,
              bad ? (" " + std::to_string(bad) + " non-finite").c_str() : "");
}

template <class T>
void same_bits(Tally& t, const std::string& what, const std::vector<T>& a,
               const std::vector<T>& b) {
  const bool ok = a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
  ++t.checks;
  if (!ok) ++t.fails;
  std::printf("%-4s %s %-34s %s\n", ok ? "PASS" : "FAIL", t.tag.c_str(), what.c_str(),
              ok ? "bit-identical" : "differs");
}

// The same check on two 64-bit hashes of the bits (hash_bits).
void same_hash(Tally& t, const std::string& what, uint64_t got, uint64_t want) {
  const bool ok = got == want;
  ++t.checks;
  if (!ok) ++t.fails;
  std::printf("%-4s %s %-34s %s\n", ok ? "PASS" : "FAIL", t.tag.c_str(), what.c_str(),
              ok ? "bit-identical" : "differs");
}

// ---- one problem: every rank's inputs, the reference, the EP outputs ---------------------------

enum class Routing { kRandom, kNoneToLast, kAllToRank0 };
const char* routing_name(Routing r) {
  return r == Routing::kRandom ? "random" : r == Routing::kNoneToLast ? "none_to_last" : "all_to_rank0";
}

struct Shape {
  int64_t N, H, I, E, K;
  int P;
  int64_t El() const { return E / P; }
  int64_t T() const { return int64_t(P) * N; }  // tokens of all ranks
};

// K distinct experts per token from [lo, hi), weights positive and summing to 1.
void make_routing(std::vector<int32_t>& idx, std::vector<float>& w, const Shape& s, Routing r,
                  uint64_t seed) {
  std::mt19937_64 rng(seed);
  int64_t lo = 0, hi = s.E;
  if (r == Routing::kNoneToLast) hi = s.E - s.El();
  if (r == Routing::kAllToRank0) hi = std::max(s.El(), s.K);
  std::vector<int32_t> pool(size_t(hi - lo));
  std::uniform_real_distribution<float> u(0.05f, 1.f);
  idx.resize(size_t(s.T() * s.K));
  w.resize(idx.size());
  for (int64_t t = 0; t < s.T(); ++t) {
    std::iota(pool.begin(), pool.end(), int32_t(lo));
    float sum = 0;
    for (int64_t j = 0; j < s.K; ++j) {
      std::uniform_int_distribution<int64_t> pick(j, int64_t(pool.size()) - 1);
      std::swap(pool[size_t(j)], pool[size_t(pick(rng))]);
      idx[size_t(t * s.K + j)] = pool[size_t(j)];
      sum += (w[size_t(t * s.K + j)] = u(rng));
    }
    for (int64_t j = 0; j < s.K; ++j) w[size_t(t * s.K + j)] /= sum;
  }
}

struct Problem {
  Shape s;
  Buf<bf16> x, dout, w_gu, w_down;  // [T,H], [T,H], [E,2I,H], [E,H,I]
  Buf<int32_t> idx;                 // [T,K]
  Buf<float> tw;                    // [T,K]
  // reference
  Buf<bf16> out_ref, dx_ref;        // [T,H]
  Buf<float> dtw_ref, ggu_ref, gdown_ref;  // [T,K], [E,2I,H], [E,H,I] f32
  // EP
  Buf<bf16> out_ep, out_ep2, dx_ep;  // [T,H]
  Buf<float> dtw_ep;                 // [T,K]
  Buf<bf16> ggu_ep, gdown_ep;        // [E,2I,H], [E,H,I] bf16
};

void make_problem(Problem& p, Routing routing, uint64_t seed, const cu::Ctx& ctx) {
  const Shape& s = p.s;
  const int64_t T = s.T(), H = s.H, I = s.I, E = s.E, K = s.K;
  p.x = Buf<bf16>(size_t(T * H));
  p.dout = Buf<bf16>(size_t(T * H));
  p.w_gu = Buf<bf16>(size_t(E * 2 * I * H));
  p.w_down = Buf<bf16>(size_t(E * H * I));
  p.idx = Buf<int32_t>(size_t(T * K));
  p.tw = Buf<float>(size_t(T * K));
  cu::fill_normal(p.x.get(), T * H, 1.f, seed + 1, ctx);
  cu::fill_normal(p.dout.get(), T * H, 1.f, seed + 2, ctx);
  cu::fill_normal(p.w_gu.get(), E * 2 * I * H, 1.f / std::sqrt(float(H)), seed + 3, ctx);
  cu::fill_normal(p.w_down.get(), E * H * I, 1.f / std::sqrt(float(I)), seed + 4, ctx);
  std::vector<int32_t> idx;
  std::vector<float> w;
  make_routing(idx, w, s, routing, seed + 5);
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  upload(p.idx.get(), idx);
  upload(p.tw.get(), w);
  p.out_ref = Buf<bf16>(size_t(T * H));
  p.dx_ref = Buf<bf16>(size_t(T * H));
  p.dtw_ref = Buf<float>(size_t(T * K));
  p.ggu_ref = Buf<float>(size_t(E * 2 * I * H));
  p.gdown_ref = Buf<float>(size_t(E * H * I));
  p.out_ep = Buf<bf16>(size_t(T * H));
  p.out_ep2 = Buf<bf16>(size_t(T * H));
  p.dx_ep = Buf<bf16>(size_t(T * H));
  p.dtw_ep = Buf<float>(size_t(T * K));
  p.ggu_ep = Buf<bf16>(size_t(E * 2 * I * H));
  p.gdown_ep = Buf<bf16>(size_t(E * H * I));
}

// One GPU, all T tokens through all E experts: what the single-GPU model runs.
void reference(Problem& p, const cu::Ctx& ctx) {
  const Shape& s = p.s;
  const int64_t T = s.T(), H = s.H, I = s.I, E = s.E, K = s.K, S = T * K;
  Buf<int32_t> off{size_t(E + 1)}, slot{size_t(S)};
  Buf<bf16> xs(size_t(S * H)), gu(size_t(S * 2 * I)), act(size_t(S * I)), ys(size_t(S * H));
  Buf<bf16> dact(size_t(S * I)), dgu(size_t(S * 2 * I));
  cu::moe_layout(off.get(), slot.get(), p.idx.get(), T, E, K, ctx);
  cu::permute_fwd(xs.get(), p.x.get(), slot.get(), T, K, H, ctx);
  cu::grouped_linear_fwd(gu.get(), xs.get(), p.w_gu.get(), off.get(), S, E, H, 2 * I, ctx);
  cu::swiglu_fwd(act.get(), gu.get(), S, I, ctx);
  cu::grouped_linear_fwd(ys.get(), act.get(), p.w_down.get(), off.get(), S, E, I, H, ctx);
  cu::unpermute_fwd(p.out_ref.get(), ys.get(), p.tw.get(), slot.get(), T, K, H, ctx);
  // backward, fp32 weight gradients (+= into zeros)
  CUDA_CHECK(cudaMemsetAsync(p.ggu_ref.get(), 0, p.ggu_ref.bytes(), ctx.stream));
  CUDA_CHECK(cudaMemsetAsync(p.gdown_ref.get(), 0, p.gdown_ref.bytes(), ctx.stream));
  Buf<bf16>& dys = xs;  // xs is recomputed below
  Buf<bf16> xs2(size_t(S * H));
  cu::unpermute_bwd(dys.get(), p.dtw_ref.get(), p.dout.get(), ys.get(), p.tw.get(), slot.get(), T,
                    K, H, ctx);
  cu::grouped_linear_bwd(dact.get(), p.gdown_ref.get(), dys.get(), act.get(), p.w_down.get(),
                         off.get(), S, E, I, H, ctx);
  cu::swiglu_bwd(dgu.get(), dact.get(), gu.get(), S, I, ctx);
  cu::permute_fwd(xs2.get(), p.x.get(), slot.get(), T, K, H, ctx);
  cu::grouped_linear_bwd(dys.get() /*dxs*/, p.ggu_ref.get(), dgu.get(), xs2.get(), p.w_gu.get(),
                         off.get(), S, E, H, 2 * I, ctx);
  cu::permute_bwd(p.dx_ref.get(), dys.get(), slot.get(), T, K, H, ctx);
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

std::vector<dist::EpMoeFwdArgs> fwd_args(Problem& p, const dist::EpTransport& t, bf16* out) {
  const Shape& s = p.s;
  std::vector<dist::EpMoeFwdArgs> a;
  for (int i = 0; i < t.num_local(); ++i) {
    const int64_t g = t.rank_of(i);
    a.push_back({out + g * s.N * s.H, p.x.get() + g * s.N * s.H, p.idx.get() + g * s.N * s.K,
                 p.tw.get() + g * s.N * s.K, p.w_gu.get() + g * s.El() * 2 * s.I * s.H,
                 p.w_down.get() + g * s.El() * s.H * s.I});
  }
  return a;
}

std::vector<dist::EpMoeBwdArgs> bwd_args(Problem& p, const dist::EpTransport& t) {
  const Shape& s = p.s;
  std::vector<dist::EpMoeBwdArgs> a;
  for (int i = 0; i < t.num_local(); ++i) {
    const int64_t g = t.rank_of(i);
    a.push_back({p.dx_ep.get() + g * s.N * s.H, p.dtw_ep.get() + g * s.N * s.K,
                 p.ggu_ep.get() + g * s.El() * 2 * s.I * s.H,
                 p.gdown_ep.get() + g * s.El() * s.H * s.I, p.dout.get() + g * s.N * s.H,
                 p.w_gu.get() + g * s.El() * 2 * s.I * s.H,
                 p.w_down.get() + g * s.El() * s.H * s.I});
  }
  return a;
}

// The rows [g*rows, (g+1)*rows) of every local rank g, concatenated.
template <class T>
std::vector<float> local_rows(const Buf<T>& b, const dist::EpTransport& t, int64_t rows,
                              int64_t cols) {
  std::vector<float> out;
  for (int i = 0; i < t.num_local(); ++i) {
    auto part = download(b.get() + int64_t(t.rank_of(i)) * rows * cols, rows * cols);
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

// The same rows as stored (bf16 or f32), for bitwise comparisons: no conversion, so the expert
// gradients ([E,2I,H] over the local ranks) cost a copy, not a pass over floats.
template <class T>
std::vector<T> local_raw(const Buf<T>& b, const dist::EpTransport& t, int64_t rows, int64_t cols) {
  std::vector<T> out(size_t(t.num_local() * rows * cols));
  for (int i = 0; i < t.num_local(); ++i)
    if (rows * cols > 0)
      CUDA_CHECK(cudaMemcpy(out.data() + size_t(i * rows * cols),
                            b.get() + int64_t(t.rank_of(i)) * rows * cols,
                            size_t(rows * cols) * sizeof(T), cudaMemcpyDeviceToHost));
  return out;
}

// One pass's results of the local ranks as stored (out from `out`: out_ep or out_ep2), for
// bitwise comparisons.
struct Bits {
  std::vector<bf16> out, dx;
  std::vector<float> dtw;
  std::vector<bf16> ggu, gdown;
};
Bits get_bits(Problem& p, const dist::EpTransport& t, const Buf<bf16>& out) {
  const Shape& s = p.s;
  return Bits{local_raw(out, t, s.N, s.H), local_raw(p.dx_ep, t, s.N, s.H),
              local_raw(p.dtw_ep, t, s.N, s.K), local_raw(p.ggu_ep, t, s.El(), 2 * s.I * s.H),
              local_raw(p.gdown_ep, t, s.El(), s.H * s.I)};
}
void same_bits(Tally& t, const std::string& what, const Bits& got, const Bits& want) {
  same_bits(t, what + " out", got.out, want.out);
  same_bits(t, what + " dx", got.dx, want.dx);
  same_bits(t, what + " dtopk_w", got.dtw, want.dtw);
  same_bits(t, what + " d w_gate_up", got.ggu, want.ggu);
  same_bits(t, what + " d w_down", got.gdown, want.gdown);
}

// What the forward leaves in the scratch's expert buffers must not reach the backward: fill
// them with a wrong (finite) value between the two, so a recompute that was skipped reads it and
// the bits differ. 0x3F bytes: every bf16 0.746.
void poison_scratch(dist::EpMoeScratch& sc, const cu::Ctx& ctx) {
  sc.wait_wgrad(ctx.stream);  // a writer of the scratch: after the weight gradients reading it
  for (cu::DeviceBuffer<bf16>* b : {&sc.xs, &sc.act, &sc.gu, &sc.dys, &sc.dact, &sc.dgu})
    if (b->size()) CUDA_CHECK(cudaMemsetAsync(b->get(), 0x3F, b->bytes(), ctx.stream));
}

// A backward's results readable on the host: its weight gradients (on the block's side stream
// with AUTOMOE_EP_WGRAD_OVERLAP on) joined into the stream, then the transport's sync.
void finish(const dist::EpMoeCuda& ep, dist::EpTransport& t, const cu::Ctx& ctx) {
  ep.join(ctx.stream);
  t.sync(ctx.stream);
}

// The blocks of one shape and mode: ep[0] recomputes nothing (the one checked against the
// reference), then one per recompute option; all share one scratch (built for kExperts, the
// largest), as a model's layers do.
struct Blocks {
  std::shared_ptr<dist::EpMoeScratch> scratch;
  std::vector<std::unique_ptr<dist::EpMoeCuda>> ep;
  // the same per recompute option, in C token chunks (train.ep_chunks), sharing a scratch of C
  struct Chunked {
    int C = 2;
    std::shared_ptr<dist::EpMoeScratch> scratch;
    std::vector<std::unique_ptr<dist::EpMoeCuda>> ep;
  };
  std::vector<Chunked> chunked;
};

void check_case(Tally& tally, Blocks& blocks, dist::EpTransport& t, const Shape& s,
                Routing routing, uint64_t seed, const cu::Ctx& ctx) {
  dist::EpMoeCuda& ep = *blocks.ep[0];
  const std::string name = std::string(dist::ep_mode_name(ep.mode())) + " " + routing_name(routing) +
                           " N=" + std::to_string(s.N) + " H=" + std::to_string(s.H);
  if (routing == Routing::kNoneToLast && s.E - s.El() < s.K) {
    std::printf("SKIP %s %s: needs E - E/P >= K\n", tally.tag.c_str(), name.c_str());
    return;
  }
  Problem p;
  p.s = s;
  make_problem(p, routing, seed, ctx);
  reference(p, ctx);
  auto fa = fwd_args(p, t, p.out_ep.get());
  auto ba = bwd_args(p, t);
  ep.fwd(fa.data(), s.N, ctx);
  poison_scratch(*blocks.scratch, ctx);
  ep.bwd(ba.data(), 0.f, ctx);
  finish(ep, t, ctx);
  const int64_t El = s.El();
  auto out = local_rows(p.out_ep, t, s.N, s.H), dx = local_rows(p.dx_ep, t, s.N, s.H);
  compare(tally, name + " out", out, local_rows(p.out_ref, t, s.N, s.H), kOut);
  compare(tally, name + " dx", dx, local_rows(p.dx_ref, t, s.N, s.H), kDx);
  compare(tally, name + " dtopk_w", local_rows(p.dtw_ep, t, s.N, s.K),
          local_rows(p.dtw_ref, t, s.N, s.K), kDw);
  const auto ggu_ref = local_rows(p.ggu_ref, t, El, 2 * s.I * s.H);
  const auto gdown_ref = local_rows(p.gdown_ref, t, El, s.H * s.I);
  compare(tally, name + " d w_gate_up", local_rows(p.ggu_ep, t, El, 2 * s.I * s.H), ggu_ref, kGrad);
  compare(tally, name + " d w_down", local_rows(p.gdown_ep, t, El, s.H * s.I), gdown_ref, kGrad);
  // this pass's bits, for the recompute options and the overlap below
  const Bits b0 = get_bits(p, t, p.out_ep);
  {  // padded against counts on the same inputs (the same seed and shape in both modes' runs)
    const std::string key = std::string(routing_name(routing)) + " N=" + std::to_string(s.N) +
                            " H=" + std::to_string(s.H) + " E=" + std::to_string(s.E);
    const std::array<uint64_t, 5> h{hash_bits(b0.out), hash_bits(b0.dx), hash_bits(b0.dtw),
                                    hash_bits(b0.ggu), hash_bits(b0.gdown)};
    const char* what[5] = {"out", "dx", "dtopk_w", "d w_gate_up", "d w_down"};
    const auto it = tally.counts_bits.find(key);
    if (ep.mode() == dist::EpMode::kCounts) {
      tally.counts_bits[key] = h;
    } else if (it == tally.counts_bits.end()) {
      std::printf("SKIP %s %s = counts: no counts run of this case (--modes counts,padded)\n",
                  tally.tag.c_str(), name.c_str());
    } else {
      for (int k = 0; k < 5; ++k)
        same_hash(tally, name + " " + what[k] + " = counts", h[size_t(k)], it->second[size_t(k)]);
    }
  }
  if (ep.mode() == dist::EpMode::kCounts && t.num_local() > 1) {
    std::printf("     %s rows received per rank:", name.c_str());
    for (int i = 0; i < t.num_local(); ++i) std::printf(" %lld", (long long)ep.rows_received(i));
    std::printf("\n");
  }
  // again: the same bits, and the weight gradients accumulate (g_beta 1: 2x the reference)
  auto fa2 = fwd_args(p, t, p.out_ep2.get());
  ep.fwd(fa2.data(), s.N, ctx);
  ep.bwd(ba.data(), 1.f, ctx);
  finish(ep, t, ctx);
  // the overlap's check below compares them bitwise, the chunks' closely
  const std::vector<bf16> ggu1 = local_raw(p.ggu_ep, t, El, 2 * s.I * s.H);
  const std::vector<bf16> gdown1 = local_raw(p.gdown_ep, t, El, s.H * s.I);
  const uint64_t ggu1_h = hash_bits(ggu1), gdown1_h = hash_bits(gdown1);
  same_bits(tally, name + " out, 2nd forward", local_rows(p.out_ep2, t, s.N, s.H), out);
  same_bits(tally, name + " dx, 2nd backward", local_rows(p.dx_ep, t, s.N, s.H), dx);
  compare(tally, name + " d w_gate_up, g_beta 1", local_rows(p.ggu_ep, t, El, 2 * s.I * s.H),
          ggu_ref, kGrad, 2.f);
  compare(tally, name + " d w_down, g_beta 1", local_rows(p.gdown_ep, t, El, s.H * s.I), gdown_ref,
          kGrad, 2.f);
  // the recompute options: the same forward, and a backward that rebuilds what the carve did
  // not keep (from a poisoned scratch) with the same kernels on the same inputs, so every
  // output and gradient is bit-identical to the block that keeps everything (g_beta 0 again)
  for (size_t b = 1; b < blocks.ep.size(); ++b) {
    dist::EpMoeCuda& re = *blocks.ep[b];
    const std::string rn = name + " rc=" + dist::ep_recompute_name(re.recompute());
    re.fwd(fa2.data(), s.N, ctx);
    poison_scratch(*blocks.scratch, ctx);
    re.bwd(ba.data(), 0.f, ctx);
    finish(re, t, ctx);
    same_bits(tally, rn, get_bits(p, t, p.out_ep2), b0);
  }
  // The weight gradients on the caller's stream instead of the side stream beside the combine
  // (or the other way round under AUTOMOE_EP_WGRAD_OVERLAP=0): the same launches in the same
  // order, so the same bits, with g_beta 0 and then 1 (accumulating onto the first)
  {
    const bool was = ep.wgrad_overlap();
    ep.set_wgrad_overlap(!was);
    const std::string on = name + (was ? " wgrad overlap off" : " wgrad overlap on");
    ep.fwd(fa2.data(), s.N, ctx);
    poison_scratch(*blocks.scratch, ctx);
    ep.bwd(ba.data(), 0.f, ctx);
    finish(ep, t, ctx);
    same_bits(tally, on, get_bits(p, t, p.out_ep2), b0);
    ep.fwd(fa2.data(), s.N, ctx);
    ep.bwd(ba.data(), 1.f, ctx);
    finish(ep, t, ctx);
    ep.set_wgrad_overlap(was);
    same_hash(tally, on + " d w_gate_up, g_beta 1",
              hash_bits(local_raw(p.ggu_ep, t, El, 2 * s.I * s.H)), ggu1_h);
    same_hash(tally, on + " d w_down, g_beta 1", hash_bits(local_raw(p.gdown_ep, t, El, s.H * s.I)),
              gdown1_h);
  }
  // The forward's direct dispatch (IPC, counts mode: the kernel stores the rows into the peers)
  // against the pack and the rows' all-to-all after the host's plan (or the other way round
  // under AUTOMOE_EP_PUSH=0): the same rows in the same places, so the same bits
  if (ep.mode() == dist::EpMode::kCounts && t.can_push() && t.num_local() == 1 && s.H % 8 == 0) {
    const bool was = ep.push();
    ep.set_push(!was);
    ep.fwd(fa2.data(), s.N, ctx);
    poison_scratch(*blocks.scratch, ctx);
    ep.bwd(ba.data(), 0.f, ctx);
    finish(ep, t, ctx);
    ep.set_push(was);
    same_bits(tally, name + (was ? " direct dispatch off" : " direct dispatch on"),
              get_bits(p, t, p.out_ep2), b0);
    // the broadcast layout (every token to every rank; rows without picks return zeros) against
    // the default's choice, and its rows sent ahead of the forward: the same sums, the same bits
    if (was) {
      const bool bc = ep.broadcast();
      ep.set_broadcast(!bc);
      if (ep.broadcast() != bc) {
        ep.fwd(fa2.data(), s.N, ctx);
        poison_scratch(*blocks.scratch, ctx);
        ep.bwd(ba.data(), 0.f, ctx);
        finish(ep, t, ctx);
        same_bits(tally, name + (bc ? " broadcast off" : " broadcast on"),
                  get_bits(p, t, p.out_ep2), b0);
      }
      ep.set_broadcast(true);
      if (ep.broadcast()) {
        ep.rows_ahead(fa2[0].x, s.N, ctx);
        ep.fwd(fa2.data(), s.N, ctx);
        poison_scratch(*blocks.scratch, ctx);
        ep.bwd(ba.data(), 0.f, ctx);
        finish(ep, t, ctx);
        same_bits(tally, name + " broadcast, rows ahead", get_bits(p, t, p.out_ep2), b0);
      }
      ep.set_broadcast(bc);
    }
  }
  // Token chunks (see the file comment): out, dx, dtopk_w bitwise, the weight gradients close,
  // per recompute option from a poisoned scratch; g_beta 1 on top of g_beta 0 for the first
  for (Blocks::Chunked& ck : blocks.chunked)
    for (size_t b = 0; b < ck.ep.size(); ++b) {
      dist::EpMoeCuda& ce = *ck.ep[b];
      const std::string cn = name + " chunks=" + std::to_string(ck.C) +
                             " rc=" + dist::ep_recompute_name(ce.recompute());
      ce.fwd(fa2.data(), s.N, ctx);
      poison_scratch(*ck.scratch, ctx);
      ce.bwd(ba.data(), 0.f, ctx);
      finish(ce, t, ctx);
      const Bits got = get_bits(p, t, p.out_ep2);
      same_bits(tally, cn + " out", got.out, b0.out);
      same_bits(tally, cn + " dx", got.dx, b0.dx);
      same_bits(tally, cn + " dtopk_w", got.dtw, b0.dtw);
      close_bits(tally, cn + " d w_gate_up", got.ggu, b0.ggu, kChunkGrad);
      close_bits(tally, cn + " d w_down", got.gdown, b0.gdown, kChunkGrad);
      if (b > 0) continue;
      ce.fwd(fa2.data(), s.N, ctx);
      ce.bwd(ba.data(), 1.f, ctx);
      finish(ce, t, ctx);
      close_bits(tally, cn + " d w_gate_up, g_beta 1", local_raw(p.ggu_ep, t, El, 2 * s.I * s.H),
                 ggu1, kChunkGrad);
      close_bits(tally, cn + " d w_down, g_beta 1", local_raw(p.gdown_ep, t, El, s.H * s.I),
                 gdown1, kChunkGrad);
    }
  std::fflush(stdout);
}

// All cases of one shape and mode over one EpMoeCuda per recompute option (kNone first; sized
// once for the largest N).
void check_shape(Tally& tally, dist::EpTransport& t, dist::EpMode mode, const Shape& s,
                 const std::vector<dist::EpRecompute>& rcs, const std::vector<int>& chunks,
                 uint64_t seed, const cu::Ctx& ctx) {
  const int64_t n_odd = std::max<int64_t>(1, (s.N * 2 / 3) | 1);
  const dist::EpMoeShape sh{s.N, s.H, s.I, s.E, s.K};
  Blocks blocks;
  blocks.scratch =
      std::make_shared<dist::EpMoeScratch>(sh, s.P, t.num_local(), mode,
                                           dist::EpRecompute::kExperts);
  size_t bytes = blocks.scratch->bytes();
  std::string names;
  for (dist::EpRecompute rc : rcs) {
    blocks.ep.push_back(std::make_unique<dist::EpMoeCuda>(t, sh, mode, rc, blocks.scratch));
    bytes += blocks.ep.back()->device_bytes();
    names += std::string(names.empty() ? "" : ",") + dist::ep_recompute_name(rc);
  }
  std::string cnames = "1";
  for (int C : chunks) {  // every rank builds the same blocks in the same order (IPC's reserve)
    Blocks::Chunked ck;
    ck.C = C;
    ck.scratch = std::make_shared<dist::EpMoeScratch>(sh, s.P, t.num_local(), mode,
                                                      dist::EpRecompute::kExperts, C);
    bytes += ck.scratch->bytes();
    for (dist::EpRecompute rc : rcs) {
      ck.ep.push_back(std::make_unique<dist::EpMoeCuda>(t, sh, mode, rc, ck.scratch, nullptr,
                                                        "the EP block", C));
      bytes += ck.ep.back()->device_bytes();
    }
    blocks.chunked.push_back(std::move(ck));
    cnames += "," + std::to_string(C);
  }
  std::printf("---- %s %s: N=%lld H=%lld I=%lld E=%lld K=%lld, recompute %s, chunks %s, %.2f GiB "
              "of EP buffers\n",
              tally.tag.c_str(), dist::ep_mode_name(mode), (long long)s.N, (long long)s.H,
              (long long)s.I, (long long)s.E, (long long)s.K, names.c_str(), cnames.c_str(),
              double(bytes) / (1 << 30));
  Shape odd = s;
  odd.N = n_odd;
  check_case(tally, blocks, t, s, Routing::kRandom, seed, ctx);
  check_case(tally, blocks, t, odd, Routing::kRandom, seed + 10, ctx);
  check_case(tally, blocks, t, s, Routing::kNoneToLast, seed + 20, ctx);
  check_case(tally, blocks, t, odd, Routing::kAllToRank0, seed + 30, ctx);
}

// Several layers through ONE shared arena and scratch, as the model runs them, in each mode
// of `modes`: forwards of layers 0..n-1, then backwards n-1..0, every carve alive until the
// end. Against the same layers each run alone by a COUNTS-mode block that owns a worst-case
// arena, recomputes nothing and runs its weight gradients on the caller's stream (the layers
// here overlap them unless AUTOMOE_EP_WGRAD_OVERLAP=0: layer 2's still read the shared scratch
// when layer 1's backward starts, so a missing wait shows): the same kernels on the same rows in the same order, so every
// output and gradient must be bit-identical, for every recompute option (its arena laid out
// without what it recomputes; the backwards of layers 1 and 0 then find layer 2's activations
// in the shared scratch, so a recompute that was skipped shows) and in padded mode too (what
// train.ep_dispatch padded runs: its arena from ep_arena_padded_bytes). Then a backward after
// the arena was reset must refuse, and an arena too small for two layers must stop with the
// overflow error (on every rank: a rank that went on would hang in the next all-to-all).
void check_arena(Tally& tally, dist::EpTransport& t, const Shape& s,
                 const std::vector<dist::EpMode>& modes,
                 const std::vector<dist::EpRecompute>& rcs, const std::vector<int>& chunks,
                 uint64_t seed, const cu::Ctx& ctx) {
  const int n = 3;
  const Routing routings[n] = {Routing::kRandom, Routing::kNoneToLast, Routing::kRandom};
  const dist::EpMoeShape sh{s.N, s.H, s.I, s.E, s.K};
  std::vector<Problem> p(n);
  std::vector<Bits> alone(n);
  for (int l = 0; l < n; ++l) {
    p[l].s = s;
    const bool skip = routings[l] == Routing::kNoneToLast && s.E - s.El() < s.K;
    make_problem(p[l], skip ? Routing::kRandom : routings[l], seed + 1000 * (l + 1), ctx);
    dist::EpMoeCuda ep(t, sh, dist::EpMode::kCounts);  // alone: its own worst-case arena
    ep.set_wgrad_overlap(false);  // one stream: the layers below (default: overlap) against it
    auto fa = fwd_args(p[l], t, p[l].out_ep.get());
    auto ba = bwd_args(p[l], t);
    ep.fwd(fa.data(), s.N, ctx);
    ep.bwd(ba.data(), 0.f, ctx);
    finish(ep, t, ctx);
    alone[l] = get_bits(p[l], t, p[l].out_ep);
  }
  struct Run {
    dist::EpMode mode;
    dist::EpRecompute rc;
    int C;
  };
  std::vector<Run> runs;
  for (int C : {1, chunks.empty() ? 1 : chunks[0]}) {
    for (dist::EpMode m : modes)
      for (dist::EpRecompute rc : rcs) runs.push_back({m, rc, C});
    if (chunks.empty()) break;
  }
  for (const Run& run : runs) {
    const dist::EpMode mode = run.mode;
    const dist::EpRecompute rc = run.rc;
    const int C = run.C;
    const bool padded = mode == dist::EpMode::kPadded;
    const std::string name = std::string("arena ") + dist::ep_mode_name(mode) +
                             " N=" + std::to_string(s.N) + " H=" + std::to_string(s.H) +
                             " rc=" + dist::ep_recompute_name(rc) +
                             (C > 1 ? " chunks=" + std::to_string(C) : std::string());
    auto scratch = std::make_shared<dist::EpMoeScratch>(sh, s.P, t.num_local(), mode, rc, C);
    // the model's sizing for each mode (Qwen3MoeCuda::plan)
    auto arena_for = [&](int64_t layers, double capacity, const char* what) {
      return std::make_shared<dist::EpSavedArena>(
          padded ? dist::ep_arena_padded_bytes(sh, s.P, layers, t.num_local(), rc, C)
                 : dist::ep_arena_bytes(sh, s.P, layers, t.num_local(), capacity, rc, C),
          what);
    };
    auto arena = arena_for(n, 2.0, padded ? "ep_check: padded, 3 layers' worst case"
                                          : "ep_check: 2x the balanced load");
    std::vector<std::unique_ptr<dist::EpMoeCuda>> ep;
    for (int l = 0; l < n; ++l)
      ep.push_back(std::make_unique<dist::EpMoeCuda>(t, sh, mode, rc, scratch, arena,
                                                     "MoE layer " + std::to_string(l), C));
    std::printf("---- %s %s: %d layers, shared arena %.3f GiB (%s; worst %.3f GiB), "
                "scratch %.3f GiB\n",
                tally.tag.c_str(), name.c_str(), n, double(arena->bytes()) / (1 << 30),
                padded ? "the worst case" : "2x balanced",
                double(n * dist::ep_arena_worst_bytes(sh, s.P, t.num_local(), rc, C)) / (1 << 30),
                double(scratch->bytes()) / (1 << 30));
    arena->reset();
    for (int l = 0; l < n; ++l) {
      auto fa = fwd_args(p[l], t, p[l].out_ep.get());
      ep[l]->fwd(fa.data(), s.N, ctx);
    }
    std::printf("     %s arena used %.3f of %.3f GiB\n", name.c_str(),
                double(arena->bump.used()) / (1 << 30), double(arena->bytes()) / (1 << 30));
    for (int l = n - 1; l >= 0; --l) {
      auto ba = bwd_args(p[l], t);
      ep[l]->bwd(ba.data(), 0.f, ctx);
    }
    for (int l = 0; l < n; ++l) ep[l]->join(ctx.stream);
    t.sync(ctx.stream);
    for (int l = 0; l < n; ++l) {
      const std::string ln = name + " layer " + std::to_string(l);
      const Bits got = get_bits(p[l], t, p[l].out_ep);
      if (C == 1) {
        same_bits(tally, ln, got, alone[l]);
        continue;
      }
      same_bits(tally, ln + " out", got.out, alone[l].out);  // chunks: see check_case
      same_bits(tally, ln + " dx", got.dx, alone[l].dx);
      same_bits(tally, ln + " dtopk_w", got.dtw, alone[l].dtw);
      close_bits(tally, ln + " d w_gate_up", got.ggu, alone[l].ggu, kChunkGrad);
      close_bits(tally, ln + " d w_down", got.gdown, alone[l].gdown, kChunkGrad);
    }
    // a backward whose saved state the next step's reset released: refused, on the host
    arena->reset();
    {
      auto ba = bwd_args(p[0], t);
      bool refused = false;
      try {
        ep[0]->bwd(ba.data(), 0.f, ctx);
      } catch (const std::exception& e) {
        refused = std::string(e.what()).find("released") != std::string::npos;
      }
      ++tally.checks;
      tally.fails += refused ? 0 : 1;
      std::printf("%-4s %s %-34s %s\n", refused ? "PASS" : "FAIL", tally.tag.c_str(),
                  (name + " bwd after reset").c_str(), refused ? "refused" : "NOT refused");
    }
    // an arena for one balanced layer (padded: one layer's worst case): the layers stop with
    // the overflow error by layer 1 (padded: at layer 1, before it enqueues anything)
    ep.clear();
    auto small = arena_for(1, 1.0, padded ? "ep_check: padded, one layer's worst case"
                                          : "ep_check: one balanced layer");
    for (int l = 0; l < n; ++l)
      ep.push_back(std::make_unique<dist::EpMoeCuda>(t, sh, mode, rc, scratch, small,
                                                     "MoE layer " + std::to_string(l), C));
    std::string err;
    int at = -1;
    for (int l = 0; l < n && at < 0; ++l) {
      auto fa = fwd_args(p[l], t, p[l].out_ep.get());
      try {
        ep[l]->fwd(fa.data(), s.N, ctx);
      } catch (const std::exception& e) {
        err = e.what();
        at = l;
      }
    }
    t.sync(ctx.stream);
    const bool ok = at >= 0 && at <= 1 && (!padded || at == 1) &&
                    err.find(padded ? "padded mode needs" : "raise train.ep_capacity") !=
                        std::string::npos &&
                    err.find("MoE layer " + std::to_string(at)) != std::string::npos;
    ++tally.checks;
    tally.fails += ok ? 0 : 1;
    std::printf("%-4s %s %-34s %s\n", ok ? "PASS" : "FAIL", tally.tag.c_str(),
                (name + " overflow").c_str(),
                at < 0 ? "no error" : ("layer " + std::to_string(at) + ": " + err).c_str());
    std::fflush(stdout);
  }
}

size_t workspace_for(const Shape& s) {
  return std::max({size_t(16) << 20, cu::grouped_linear_workspace_bytes(s.E),
                   dist::EpMoeCuda::workspace_bytes({s.N, s.H, s.I, s.E, s.K}, s.P)});
}

// The arena check keeps three layers' problems and a worst-case block: at most 4096 tokens.
Shape arena_shape(Shape s) {
  s.N = std::min<int64_t>(s.N, 4096);
  return s;
}

// ---- loopback: P ranks on this GPU -------------------------------------------------------------

// --time (loopback): the GPU time of the block's forward and backward at the given shapes, per
// mode and recompute option, median of --iters after --warmup (random routing). All P ranks run
// on this GPU one after another, so a figure is the work of the whole group; what it tells is
// the relative cost of the options (the recompute's extra expert GEMMs, padded's extra rows).
// The backward's time includes its weight gradients (joined); AUTOMOE_EP_WGRAD_OVERLAP=0 times
// them on the one stream.
int time_loopback(const Opts& o, dist::LoopbackTransport& t, const Shape& s, const cu::Ctx& ctx) {
  Problem p;
  p.s = s;
  make_problem(p, Routing::kRandom, o.seed + 700, ctx);
  cudaEvent_t e[3];
  for (auto& ev : e) CUDA_CHECK(cudaEventCreate(&ev));
  std::vector<int> cs{1};
  cs.insert(cs.end(), o.chunks.begin(), o.chunks.end());
  for (int C : cs)
    for (dist::EpMode m : o.modes)
      for (dist::EpRecompute rc : o.recompute) {
        dist::EpMoeCuda ep(t, {s.N, s.H, s.I, s.E, s.K}, m, rc, nullptr, nullptr, "the EP block",
                           C);
        auto fa = fwd_args(p, t, p.out_ep.get());
        auto ba = bwd_args(p, t);
        std::vector<float> f, b;
        for (int it = 0; it < o.warmup + o.iters; ++it) {
          CUDA_CHECK(cudaEventRecord(e[0], ctx.stream));
          ep.fwd(fa.data(), s.N, ctx);
          CUDA_CHECK(cudaEventRecord(e[1], ctx.stream));
          ep.bwd(ba.data(), 0.f, ctx);
          ep.join(ctx.stream);  // the weight gradients belong to the backward's time
          CUDA_CHECK(cudaEventRecord(e[2], ctx.stream));
          CUDA_CHECK(cudaEventSynchronize(e[2]));
          float ms_f = 0, ms_b = 0;
          CUDA_CHECK(cudaEventElapsedTime(&ms_f, e[0], e[1]));
          CUDA_CHECK(cudaEventElapsedTime(&ms_b, e[1], e[2]));
          if (it >= o.warmup) {
            f.push_back(ms_f);
            b.push_back(ms_b);
          }
        }
        std::sort(f.begin(), f.end());
        std::sort(b.begin(), b.end());
        std::printf("TIME loopback P=%d %-6s rc=%-7s chunks %d wgrad overlap %-3s N=%lld H=%lld "
                    "I=%lld E=%lld K=%lld: fwd %.3f ms, bwd %.3f ms, fwd+bwd %.3f ms (median of %d, "
                    "the whole group on one GPU)\n",
                    s.P, dist::ep_mode_name(m), dist::ep_recompute_name(rc), C,
                    ep.wgrad_overlap() ? "on" : "off", (long long)s.N,
                    (long long)s.H, (long long)s.I, (long long)s.E, (long long)s.K, f[f.size() / 2],
                    b[b.size() / 2], f[f.size() / 2] + b[b.size() / 2], int(f.size()));
        std::fflush(stdout);
      }
  for (auto& ev : e) CUDA_CHECK(cudaEventDestroy(ev));
  return 0;
}

int run_loopback(const Opts& o, int P) {
  dist::LoopbackTransport t(P);
  Tally tally;
  tally.tag = "loopback P=" + std::to_string(P);
  const Shape small{37, 100, 36, 3 * P, 3, P};
  const Shape big{o.N, o.H, o.I, o.E, o.K, P};
  if (big.E % P != 0) usage("--experts must be a multiple of the rank count");
  cu::ScopedCtx owner(std::max(workspace_for(small), workspace_for(big)));
  if (o.time_only) return time_loopback(o, t, big, owner.ctx());
  for (dist::EpMode m : o.modes)
    check_shape(tally, t, m, small, o.recompute, o.chunks, o.seed, owner.ctx());
  for (dist::EpMode m : o.modes)
    check_shape(tally, t, m, big, o.recompute, o.chunks, o.seed + 100, owner.ctx());
  check_arena(tally, t, small, o.modes, o.recompute, o.chunks, o.seed + 200, owner.ctx());
  check_arena(tally, t, arena_shape(big), o.modes, o.recompute, o.chunks, o.seed + 300, owner.ctx());
  std::printf("ep_check %s: %d checks, %d failed\n", tally.tag.c_str(), tally.checks, tally.fails);
  return std::min(tally.fails, 255);
}

// ---- under mpirun: one rank per process, NCCL, MPI staging or CUDA IPC ------------------------

// A padded forward enqueues without a host wait (the point of train.ep_dispatch padded; see the
// file comment): timed on the host while a host function holds the stream 1.5 s and every rank
// but 0 starts 0.3 s late, then its output against the same forward run plainly.
void check_no_host_wait(Tally& tally, dist::EpTransport& t, const dist::Comm& world,
                        const Shape& s, uint64_t seed, const cu::Ctx& ctx) {
  Problem p;
  p.s = s;
  make_problem(p, Routing::kRandom, seed, ctx);
  dist::EpMoeCuda ep(t, {s.N, s.H, s.I, s.E, s.K}, dist::EpMode::kPadded);
  auto fa = fwd_args(p, t, p.out_ep.get());
  ep.fwd(fa.data(), s.N, ctx);
  t.sync(ctx.stream);
  const auto want = local_raw(p.out_ep, t, s.N, s.H);
  CUDA_CHECK(cudaMemsetAsync(p.out_ep.get(), 0, p.out_ep.bytes(), ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  world.barrier();
  CUDA_CHECK(cudaLaunchHostFunc(
      ctx.stream, [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(1500)); },
      nullptr));
  if (world.rank() != 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto t0 = std::chrono::steady_clock::now();
  ep.fwd(fa.data(), s.N, ctx);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const bool busy = cudaStreamQuery(ctx.stream) == cudaErrorNotReady;
  t.sync(ctx.stream);
  const bool ok = ms < 200 && busy;
  ++tally.checks;
  tally.fails += ok ? 0 : 1;
  std::printf("%-4s %s %-34s host enqueue %.1f ms (< 200), stream %s after it\n",
              ok ? "PASS" : "FAIL", tally.tag.c_str(), "padded fwd: no host wait", ms,
              busy ? "still busy" : "ALREADY IDLE (the host waited)");
  same_bits(tally, "padded fwd behind a held stream out", local_raw(p.out_ep, t, s.N, s.H), want);
  std::fflush(stdout);
}

// --stall-rank (IPC): a peer that stops before its part of an all-to-all must end the others'
// sync() with the timeout error, not a hang (see the file comment). Never returns: the job ends
// through MPI_Abort (the stalled rank is still asleep).
[[noreturn]] void stall_drill(const Opts& o, dist::EpTransport& t, const dist::Comm& world,
                              const Shape& s, const cu::Ctx& ctx) {
  const char* v = std::getenv("AUTOMOE_DIST_TIMEOUT");
  const double timeout = v ? std::atof(v) : 0;
  if (timeout <= 0 || timeout > 60)
    usage("--stall-rank needs AUTOMOE_DIST_TIMEOUT between 1 and 60 seconds (mpirun -x)");
  Problem p;
  p.s = s;
  make_problem(p, Routing::kRandom, o.seed + 900, ctx);
  dist::EpMoeCuda ep(t, {s.N, s.H, s.I, s.E, s.K}, dist::EpMode::kPadded);
  auto fa = fwd_args(p, t, p.out_ep.get());
  ep.fwd(fa.data(), s.N, ctx);  // one call together: the transport works
  t.sync(ctx.stream);
  world.barrier();
  const std::string tag = std::string(t.name()) + " rank " + std::to_string(world.rank()) + "/" +
                          std::to_string(world.size());
  if (world.rank() == o.stall_rank) {
    std::printf("ep_check: rank %d stalls %.0f s before its forward (--stall-rank)\n",
                world.rank(), timeout + 15);
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::duration<double>(timeout + 15));
    // only if nobody ended the job (the drill failed on the others)
    dist::abort_all("ep_check: the stalled rank woke up: the other ranks did not end the job");
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::string err;
  try {
    ep.fwd(fa.data(), s.N, ctx);
    t.sync(ctx.stream);
  } catch (const std::exception& e) {
    err = e.what();
  }
  const double sec =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool ok = err.find("did not finish") != std::string::npos &&
                  err.find("AUTOMOE_DIST_TIMEOUT") != std::string::npos && sec < timeout + 10;
  std::printf("%-4s %s stalled peer: %s after %.1f s (AUTOMOE_DIST_TIMEOUT=%g): %s\n",
              ok ? "PASS" : "FAIL", tag.c_str(), err.empty() ? "no error" : "the error",
              sec, timeout, err.empty() ? "(the call finished)" : err.c_str());
  std::fflush(stdout);
  dist::abort_all(ok ? "ep_check: the stall drill passed (ending the job with the stalled rank)"
                     : "ep_check: the stall drill FAILED");
}

#if AUTOMOE_HAVE_NCCL
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

void maybe_die(const Opts& o, int rank) {
  if (rank != o.kill_rank) return;
  std::printf("ep_check: rank %d %s now (--kill-rank %d --kill-mode %s)\n", rank,
              o.kill_mode == "exit" ? "exits" : "stops communicating", rank, o.kill_mode.c_str());
  std::fflush(stdout);
  if (o.kill_mode == "exit") std::_Exit(9);  // no MPI_Finalize, no NCCL teardown: a crash
  std::this_thread::sleep_for(std::chrono::hours(24));
}

// Dispatch/combine GPU time of the forward (EpTimes) against ncclAlltoAll of the same bytes.
// Counts mode over a transport with a direct dispatch (IPC) is timed both ways: "direct" (the
// kernel stores the rows into the peers while the host waits for the counts; the default) and
// "packed" (AUTOMOE_EP_PUSH=0's pack, host sync, then the rows' all-to-all).
// Every timed iteration, ours and NCCL's, starts after a host barrier over the EP group (the
// GPUs idle), so a rank's time is its own call's and not its wait for a peer still finishing the
// previous iteration (each iteration ends with a host sync on each rank, not together). Not in
// the kill drills (--kill-rank), which must end in NCCL's timeout.
constexpr int64_t kQueuedSpinNs = 300000;  // --queued-start

void bandwidth(const Opts& o, const dist::Comm& ep_comm, dist::NcclGroup& g,
               dist::EpTransport& t, dist::EpMode mode, const Shape& s, const cu::Ctx& ctx) {
  Problem p;
  p.s = s;
  make_problem(p, Routing::kRandom, o.seed + 500, ctx);
  dist::EpMoeCuda ep(t, {s.N, s.H, s.I, s.E, s.K}, mode);
  ep.set_timing(true);
  auto fa = fwd_args(p, t, p.out_ep.get());
  const double row_d = double(2 * s.H + 8 * s.K), row_c = double(2 * s.H), gib = double(1 << 30);
  // the baseline: ncclAlltoAll of the dispatch's payload bytes, split evenly over the peers
  // (the payload is the routing's: the same for every way of dispatching)
  double mb = 0, base_bytes = 0;
  const bool both = mode == dist::EpMode::kCounts && t.can_push() && t.num_local() == 1;
  // every timed call, ours and ncclAlltoAll's, starts here (see above)
  auto start = [&] {
    if (o.kill_rank < 0) ep_comm.barrier();  // the kill drills want NCCL's timeout, not MPI's
    if (o.queued) cu::gpu_spin(kQueuedSpinNs, ctx.stream);
  };
  for (const bool push : {true, false}) {
    if (!push && !both) break;
    ep.set_push(push);
    std::vector<double> disp, comb, d_layout, d_counts, d_push, d_recv;
    dist::EpTimes last;
    for (int it = 0; it < o.warmup + o.iters; ++it) {
      if (it == o.warmup && push) maybe_die(o, g.rank());
      start();
      ep.fwd(fa.data(), s.N, ctx);
      t.sync(ctx.stream);
      last = ep.last_times();
      if (it >= o.warmup) {
        disp.push_back(last.dispatch_ms);
        comb.push_back(last.combine_ms);
        d_layout.push_back(last.dispatch_layout_ms);
        d_counts.push_back(last.dispatch_counts_ms);
        d_push.push_back(last.dispatch_push_ms);
        d_recv.push_back(last.dispatch_recv_ms);
      }
    }
    const double bd = double(last.rows_payload) * row_d, bc = double(last.rows_payload) * row_c;
    const double md = median(disp), mc = median(comb);
    if (push) {
      const size_t per_peer = size_t(std::ceil(bd / 2.0 / s.P));  // bf16 elements
      Buf<bf16> a2a_s(per_peer * s.P), a2a_r(per_peer * s.P);
      cudaEvent_t e0, e1;
      CUDA_CHECK(cudaEventCreate(&e0));
      CUDA_CHECK(cudaEventCreate(&e1));
      std::vector<double> base;
      for (int it = 0; it < o.warmup + o.iters; ++it) {
        start();
        CUDA_CHECK(cudaEventRecord(e0, ctx.stream));
        g.alltoall(a2a_r.get(), a2a_s.get(), per_peer, ncclBfloat16, ctx.stream);
        CUDA_CHECK(cudaEventRecord(e1, ctx.stream));
        g.wait(ctx.stream, "all-to-all baseline");
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= o.warmup) base.push_back(ms);
      }
      CUDA_CHECK(cudaEventDestroy(e0));
      CUDA_CHECK(cudaEventDestroy(e1));
      mb = median(base);
      base_bytes = double(per_peer * s.P * 2);
    }
    const char* how = !both ? "" : push ? " direct" : " packed";
    std::printf("BW   %s rank %d/%d %-6s%s N=%lld%s: dispatch %.3f ms %.1f GiB/s (payload %.1f MiB, "
                "wire %.1f MiB; layout+pack+exchange), combine %.3f ms %.1f GiB/s (%.1f MiB); "
                "ncclAlltoAll of the dispatch bytes %.3f ms %.1f GiB/s\n",
                t.name(), g.rank(), g.size(), dist::ep_mode_name(mode), how, (long long)s.N,
                o.queued ? " queued start" : "", md,
                bd / gib / (md / 1e3), bd / (1 << 20), double(last.rows_wire) * row_d / (1 << 20),
                mc, bc / gib / (mc / 1e3), bc / (1 << 20), mb, base_bytes / gib / (mb / 1e3));
    if (both && push)  // where the direct dispatch's time goes (medians; see dist::EpTimes)
      std::printf("BW   %s rank %d/%d direct dispatch: layout + counts sent %.3f ms (layout %.3f), "
                  "push %.3f ms (%.1f GiB/s of all its rows, its own included), copy-out and "
                  "waits %.3f ms\n",
                  t.name(), g.rank(), g.size(), median(d_counts), median(d_layout), median(d_push),
                  double(last.rows_wire) * row_d / gib / (median(d_push) / 1e3), median(d_recv));
    std::fflush(stdout);
  }
}

#endif

int run_ranks(const Opts& o) {
  const dist::LaunchInfo li = dist::detect_launch();
  dist::Groups groups = dist::make_groups(li.world_size);  // the whole job is one EP group
  const int P = groups.ep.size(), rank = groups.ep.rank();
  const dist::GpuPlacement pl = dist::place_on_gpu(groups.world, li, "ep_check");
  const dist::EpTransportKind kind = dist::choose_ep_transport(o.transport, pl);
  std::printf("ep_check: rank %d of %d on GPU %d of %d, transport %s", rank, P, pl.device,
              pl.devices, dist::ep_transport_kind_name(kind));
#if AUTOMOE_HAVE_NCCL
  int nccl_runtime = 0;
  ncclGetVersion(&nccl_runtime);
  std::printf("; NCCL header %d, library %d", NCCL_VERSION_CODE, nccl_runtime);
#endif
  std::printf("\n");
  std::fflush(stdout);
  const Shape small{37, 100, 36, 3 * P, 3, P};  // the unaligned suite (scalar kernel paths)
  cu::ScopedCtx owner(std::max(workspace_for(small), workspace_for({o.N, o.H, o.I, o.E, o.K, P})),
                      pl.device);
  dist::GpuComms comm(groups, pl, kind, /*gradients=*/false);
  if (kind == dist::EpTransportKind::kAuto)
    std::printf("ep_check: rank %d: auto took %s\n", rank, dist::ep_transport_kind_name(comm.kind()));
  if (o.kill_rank >= 0 && comm.kind() != dist::EpTransportKind::kNccl)
    usage("--kill-rank drills the NCCL timeout: run it with --transport nccl");
  if (o.stall_rank >= 0 && comm.kind() != dist::EpTransportKind::kIpc)
    usage("--stall-rank drills the IPC transport's timeout: run it with --transport ipc");
  dist::EpTransport& t = *comm.ep_transport();
  Tally tally;
  tally.tag = std::string(t.name()) + " rank " + std::to_string(rank) + "/" + std::to_string(P);
  const Shape s{o.N, o.H, o.I, o.E, o.K, P};
  if (s.E % P != 0) usage("--experts must be a multiple of the rank count");
  if (o.stall_rank >= 0) stall_drill(o, t, groups.world, s, owner.ctx());
  if (o.kill_rank < 0 && o.checks) {
    // the small unaligned suite first, then the given shapes
    for (dist::EpMode m : o.modes)
      check_shape(tally, t, m, small, o.recompute, o.chunks, o.seed, owner.ctx());
    for (dist::EpMode m : o.modes)
      check_shape(tally, t, m, s, o.recompute, o.chunks, o.seed + 100, owner.ctx());
    check_arena(tally, t, small, o.modes, o.recompute, o.chunks, o.seed + 200, owner.ctx());
    check_arena(tally, t, arena_shape(s), o.modes, o.recompute, o.chunks, o.seed + 300, owner.ctx());
    const bool padded =
        std::find(o.modes.begin(), o.modes.end(), dist::EpMode::kPadded) != o.modes.end();
    if (padded && comm.kind() == dist::EpTransportKind::kIpc)
      check_no_host_wait(tally, t, groups.world, arena_shape(s), o.seed + 400, owner.ctx());
  }
#if AUTOMOE_HAVE_NCCL
  if ((o.bench || o.kill_rank >= 0) && !pl.shared()) {
    // the baseline's communicator: the transport's own, or one opened for it (collective)
    std::unique_ptr<dist::NcclGroup> base;
    if (!comm.nccl_ep()) base = std::make_unique<dist::NcclGroup>(groups.ep, pl.device);
    dist::NcclGroup& g = comm.nccl_ep() ? *comm.nccl_ep() : *base;
    for (dist::EpMode m : o.modes) bandwidth(o, groups.ep, g, t, m, s, owner.ctx());
  }
#endif
  int64_t fails = tally.fails;
  groups.world.allreduce_sum(&fails, 1);
  std::printf("ep_check %s: %d checks, %d failed here, %lld on all ranks\n", tally.tag.c_str(),
              tally.checks, tally.fails, (long long)fails);
  return int(std::min<int64_t>(fails, 255));
}

}  // namespace

int main(int argc, char** argv) {
  const Opts o = parse(argc, argv);
  const dist::LaunchInfo li = dist::detect_launch();
  const bool multi = o.loopback == 0 && li.launcher != "none" && li.world_size > 1;
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("ep_check: no CUDA device (%s): nothing checked\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 0;
  }
  int rc = 0;
  try {
    if (multi) {
      rc = run_ranks(o);
    } else {
      rc = run_loopback(o, o.loopback > 0 ? o.loopback : 4);
    }
  } catch (const std::exception& ex) {
    if (dist::backend_active()) dist::abort_all(std::string("ep_check: ") + ex.what());
    std::fprintf(stderr, "ep_check: error: %s\n", ex.what());
    return 255;
  }
  dist::finalize();
  return rc;
}
