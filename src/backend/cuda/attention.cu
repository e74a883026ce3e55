// backend/cuda/attention.cu: the attention op. attention_fwd/attention_bwd run cuDNN SDPA
// (attention_cudnn.cpp; plain causal, or packed sequences through a segment table) where it can,
// else the fallback kernel below; the choice is made per call (see ops_cuda.h:
// AUTOMOE_ATTENTION, set_attention_impl). Also here: the host-side segment table builder and the
// kernels converting cuDNN's ragged (token-major) Stats to and from our lse [B,nH,T].
//
// The fallback: causal grouped-query attention with document masking, bf16 in/out, fp32
// scores, online softmax; saves lse per (b, h, t) and recomputes the probabilities in the
// backward (flash-attention style, no [T,T] buffer). A straightforward, correct kernel for T up
// to a few thousand: one warp per query (forward, dq) or per key (dk/dv).
//
// Shared-memory tiles hold 32 keys (or queries) as bf16 rows padded to an odd number of 4-byte
// words, so a warp reading one column of 32 rows hits 32 banks.
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <unordered_set>

#include "backend/cuda/attention_cudnn.h"
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;    // queries (or keys) per block, one per warp
constexpr int kTile = 32;    // keys (or queries) per shared-memory tile, one per lane
constexpr int kMaxD = 256;

__host__ __device__ inline int dpad(int D) { return D % 2 == 0 ? D + 2 : D + 1; }

// Loads rows r0..r0+31 of a [B,T,nHx,D] tensor (batch b, head h) into tile[32][Dp];
// rows past T are zero. All threads of the block take part.
__device__ void load_tile(bf16* tile, const bf16* src, int b, int r0, int h, int T, int nHx,
                          int D, int Dp) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, s = r0 + r;
    tile[r * Dp + d] = s < T ? src[((int64_t(b) * T + s) * nHx + h) * D + d] : to_bf(0.f);
  }
}

// sum_d a[d] * row[d]: a is fp32 (broadcast), row a bf16 tile row.
__device__ __forceinline__ float dot_row(const float* a, const bf16* row, int D) {
  float acc = 0.f;
  for (int d = 0; d < D; ++d) acc += a[d] * to_f(row[d]);
  return acc;
}

// ---- forward ----------------------------------------------------------------------------------
// Grid (ceil(T/4), nH, B), block 4 warps. Warp w owns query t = blockIdx.x*4 + w: lane j scores
// key s0+j of each 32-key tile, the warp merges the tile into its online softmax (m, l), then
// accumulates o[d] for d = lane + 32*i (kDC chunks, kDC*32 >= D) from the V tile.
template <int kDC>
__global__ void attention_fwd_kernel(bf16* out, float* lse, const bf16* q, const bf16* k,
                                     const bf16* v, const int32_t* doc, int T, int nH, int nKV,
                                     int D, float scale) {
  extern __shared__ float smem[];
  const int Dp = dpad(D);
  float* qs = smem;                                      // [kWarps][D] fp32
  bf16* Ks = reinterpret_cast<bf16*>(qs + kWarps * D);   // [kTile][Dp]
  bf16* Vs = Ks + kTile * Dp;                            // [kTile][Dp]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.z, h = blockIdx.y, hk = h / (nH / nKV);
  const int t0 = blockIdx.x * kWarps, t = t0 + warp;
  const bool active = t < T;
  const int t_last = min(T - 1, t0 + kWarps - 1);
  const int64_t qrow = ((int64_t(b) * T + t) * nH + h) * D;
  float* qw = qs + warp * D;
  if (active)
    for (int d = lane; d < D; d += 32) qw[d] = to_f(q[qrow + d]);
  const int my_doc = (active && doc) ? doc[int64_t(b) * T + t] : 0;

  float m = -INFINITY, l = 0.f, o[kDC];
#pragma unroll
  for (int i = 0; i < kDC; ++i) o[i] = 0.f;

  for (int s0 = 0; s0 <= t_last; s0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and qs written, on the first pass)
    load_tile(Ks, k, b, s0, hk, T, nKV, D, Dp);
    load_tile(Vs, v, b, s0, hk, T, nKV, D, Dp);
    __syncthreads();
    if (!active || s0 > t) continue;
    const int s = s0 + lane;
    bool ok = s <= t;
    if (ok && doc) ok = doc[int64_t(b) * T + s] == my_doc;
    const float score = ok ? dot_row(qw, Ks + lane * Dp, D) * scale : -INFINITY;
    const float m_new = fmaxf(m, warp_max(score));
    if (m_new == -INFINITY) continue;  // every key so far masked
    const float p = ok ? expf(score - m_new) : 0.f;
    const float corr = expf(m - m_new);
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kDC; ++i) o[i] *= corr;
    const int s_end = min(kTile, t - s0 + 1);  // keys past t have p = 0
    for (int j = 0; j < s_end; ++j) {
      const float pj = __shfl_sync(kFullMask, p, j);
#pragma unroll
      for (int i = 0; i < kDC; ++i) {
        const int d = lane + 32 * i;
        if (d < D) o[i] += pj * to_f(Vs[j * Dp + d]);
      }
    }
    m = m_new;
  }
  if (!active) return;
  const float inv = 1.0f / l;  // l > 0: a query always sees itself
#pragma unroll
  for (int i = 0; i < kDC; ++i) {
    const int d = lane + 32 * i;
    if (d < D) out[qrow + d] = to_bf(o[i] * inv);
  }
  if (lane == 0) lse[(int64_t(b) * nH + h) * T + t] = m + logf(l);
}

// ---- backward, dq (and delta = rowsum(dout * out) for the dk/dv pass) -------------------------
// Same mapping as the forward. Lane j recomputes p = exp(score - lse) for key s0+j and
// ds = p * (dout.v - delta) * scale; the warp accumulates dq[d] += ds_j * k_j[d].
template <int kDC>
__global__ void attention_bwd_dq_kernel(bf16* dq, float* delta, const bf16* dout,
                                        const bf16* out, const float* lse, const bf16* q,
                                        const bf16* k, const bf16* v, const int32_t* doc, int T,
                                        int nH, int nKV, int D, float scale) {
  extern __shared__ float smem[];
  const int Dp = dpad(D);
  float* qs = smem;                                      // [kWarps][D] fp32
  float* gs = qs + kWarps * D;                           // [kWarps][D] fp32 (dout row)
  bf16* Ks = reinterpret_cast<bf16*>(gs + kWarps * D);   // [kTile][Dp]
  bf16* Vs = Ks + kTile * Dp;                            // [kTile][Dp]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.z, h = blockIdx.y, hk = h / (nH / nKV);
  const int t0 = blockIdx.x * kWarps, t = t0 + warp;
  const bool active = t < T;
  const int t_last = min(T - 1, t0 + kWarps - 1);
  const int64_t qrow = ((int64_t(b) * T + t) * nH + h) * D;
  const int64_t srow = (int64_t(b) * nH + h) * T + t;  // index into lse / delta
  float* qw = qs + warp * D;
  float* gw = gs + warp * D;
  float Di = 0.f, lse_t = 0.f;
  int my_doc = 0;
  if (active) {
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) {
      qw[d] = to_f(q[qrow + d]);
      gw[d] = to_f(dout[qrow + d]);
      acc += gw[d] * to_f(out[qrow + d]);
    }
    Di = warp_sum(acc);
    if (lane == 0) delta[srow] = Di;
    lse_t = lse[srow];
    if (doc) my_doc = doc[int64_t(b) * T + t];
  }

  float g[kDC];
#pragma unroll
  for (int i = 0; i < kDC; ++i) g[i] = 0.f;

  for (int s0 = 0; s0 <= t_last; s0 += kTile) {
    __syncthreads();
    load_tile(Ks, k, b, s0, hk, T, nKV, D, Dp);
    load_tile(Vs, v, b, s0, hk, T, nKV, D, Dp);
    __syncthreads();
    if (!active || s0 > t) continue;
    const int s = s0 + lane;
    bool ok = s <= t;
    if (ok && doc) ok = doc[int64_t(b) * T + s] == my_doc;
    float ds = 0.f;
    if (ok) {
      const float p = expf(dot_row(qw, Ks + lane * Dp, D) * scale - lse_t);
      const float dp = dot_row(gw, Vs + lane * Dp, D);
      ds = p * (dp - Di) * scale;
    }
    const int s_end = min(kTile, t - s0 + 1);
    for (int j = 0; j < s_end; ++j) {
      const float dsj = __shfl_sync(kFullMask, ds, j);
#pragma unroll
      for (int i = 0; i < kDC; ++i) {
        const int d = lane + 32 * i;
        if (d < D) g[i] += dsj * to_f(Ks[j * Dp + d]);
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < kDC; ++i) {
    const int d = lane + 32 * i;
    if (d < D) dq[qrow + d] = to_bf(g[i]);
  }
}

// ---- backward, dk and dv ----------------------------------------------------------------------
// Grid (ceil(T/4), nKV, B), block 4 warps. Warp w owns key s = blockIdx.x*4 + w of kv head hk
// and loops over the query heads of its group and over 32-query tiles from the block's first
// key on: lane j recomputes p and ds for query t0+j; the warp accumulates
// dv[d] += p_j * dout_j[d] and dk[d] += ds_j * q_j[d]. Each (b, s, hk) has one owner: no atomics.
template <int kDC>
__global__ void attention_bwd_dkdv_kernel(bf16* dk, bf16* dv, const float* delta,
                                          const bf16* dout, const float* lse, const bf16* q,
                                          const bf16* k, const bf16* v, const int32_t* doc,
                                          int T, int nH, int nKV, int D, float scale) {
  extern __shared__ float smem[];
  const int Dp = dpad(D);
  float* ks = smem;                                      // [kWarps][D] fp32
  float* vs = ks + kWarps * D;                           // [kWarps][D] fp32
  float* lse_s = vs + kWarps * D;                        // [kTile]
  float* del_s = lse_s + kTile;                          // [kTile]
  bf16* Qs = reinterpret_cast<bf16*>(del_s + kTile);     // [kTile][Dp]
  bf16* Gs = Qs + kTile * Dp;                            // [kTile][Dp] (dout rows)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.z, hk = blockIdx.y, rep = nH / nKV;
  const int s_first = blockIdx.x * kWarps, s = s_first + warp;
  const bool active = s < T;
  const int64_t krow = ((int64_t(b) * T + s) * nKV + hk) * D;
  float* kw = ks + warp * D;
  float* vw = vs + warp * D;
  int my_doc = 0;
  if (active) {
    for (int d = lane; d < D; d += 32) {
      kw[d] = to_f(k[krow + d]);
      vw[d] = to_f(v[krow + d]);
    }
    if (doc) my_doc = doc[int64_t(b) * T + s];
  }

  float gk[kDC], gv[kDC];
#pragma unroll
  for (int i = 0; i < kDC; ++i) gk[i] = gv[i] = 0.f;

  for (int h = hk * rep; h < (hk + 1) * rep; ++h)
    for (int t0 = s_first; t0 < T; t0 += kTile) {
      __syncthreads();
      load_tile(Qs, q, b, t0, h, T, nH, D, Dp);
      load_tile(Gs, dout, b, t0, h, T, nH, D, Dp);
      if (threadIdx.x < kTile) {
        const int tt = t0 + threadIdx.x;
        const int64_t r = (int64_t(b) * nH + h) * T + tt;
        lse_s[threadIdx.x] = tt < T ? lse[r] : 0.f;
        del_s[threadIdx.x] = tt < T ? delta[r] : 0.f;
      }
      __syncthreads();
      if (!active) continue;
      const int t = t0 + lane;
      bool ok = t >= s && t < T;
      if (ok && doc) ok = doc[int64_t(b) * T + t] == my_doc;
      float p = 0.f, ds = 0.f;
      if (ok) {
        p = expf(dot_row(kw, Qs + lane * Dp, D) * scale - lse_s[lane]);
        const float dp = dot_row(vw, Gs + lane * Dp, D);
        ds = p * (dp - del_s[lane]) * scale;
      }
      const int j0 = max(0, s - t0), j1 = min(kTile, T - t0);  // queries t >= s, t < T
      for (int j = j0; j < j1; ++j) {
        const float pj = __shfl_sync(kFullMask, p, j);
        const float dsj = __shfl_sync(kFullMask, ds, j);
#pragma unroll
        for (int i = 0; i < kDC; ++i) {
          const int d = lane + 32 * i;
          if (d < D) {
            gv[i] += pj * to_f(Gs[j * Dp + d]);
            gk[i] += dsj * to_f(Qs[j * Dp + d]);
          }
        }
      }
    }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < kDC; ++i) {
    const int d = lane + 32 * i;
    if (d < D) {
      dk[krow + d] = to_bf(gk[i]);
      dv[krow + d] = to_bf(gv[i]);
    }
  }
}

// ---- ragged Stats <-> lse ----------------------------------------------------------------------
// st[B*T, nH] (token-major: cuDNN's ragged Stats) and lse[B, nH, T], per row a [T, nH] <-> [nH, T]
// transpose through a 32x33 shared tile. Grid (ceil(T/32), ceil(nH/32), B), block (32, 8).
template <bool kToLse>
__global__ void stats_lse_kernel(float* dst, const float* src, int T, int nH) {
  __shared__ float tile[32][33];
  const int b = blockIdx.z, t0 = blockIdx.x * 32, h0 = blockIdx.y * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    if (kToLse) {  // read st along h (coalesced), tile[t][h]
      const int t = t0 + i, h = h0 + threadIdx.x;
      if (t < T && h < nH) tile[i][threadIdx.x] = src[(int64_t(b) * T + t) * nH + h];
    } else {  // read lse along t, tile[t][h]
      const int h = h0 + i, t = t0 + threadIdx.x;
      if (t < T && h < nH) tile[threadIdx.x][i] = src[(int64_t(b) * nH + h) * T + t];
    }
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    if (kToLse) {  // write lse along t
      const int h = h0 + i, t = t0 + threadIdx.x;
      if (t < T && h < nH) dst[(int64_t(b) * nH + h) * T + t] = tile[threadIdx.x][i];
    } else {  // write st along h
      const int t = t0 + i, h = h0 + threadIdx.x;
      if (t < T && h < nH) dst[(int64_t(b) * T + t) * nH + h] = tile[i][threadIdx.x];
    }
  }
}

template <bool kToLse>
void stats_lse(float* dst, const float* src, int64_t B, int64_t T, int64_t nH, const Ctx& ctx) {
  dim3 grid(unsigned((T + 31) / 32), unsigned((nH + 31) / 32), unsigned(B));
  stats_lse_kernel<kToLse><<<grid, dim3(32, 8), 0, ctx.stream>>>(dst, src, int(T), int(nH));
  CUDA_CHECK_LAUNCH();
}

void check_sizes(int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D, const char* op) {
  AM_CHECK(D > 0 && D <= kMaxD, "[{}] head dim {} is not supported (1..{})", op, D, kMaxD);
  AM_CHECK(nKV > 0 && nH % nKV == 0, "[{}] {} query heads are not a multiple of {} kv heads", op,
           nH, nKV);
  AM_CHECK(T < (int64_t(1) << 31) && nH < 65536 && B < 65536,
           "[{}] sizes out of range (B {}, T {}, nH {})", op, B, T, nH);
}

size_t tile_bytes(int D) { return size_t(2) * kTile * dpad(D) * sizeof(bf16); }

void fallback_fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                  const int32_t* doc, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                  const Ctx& ctx) {
  const float scale = 1.0f / sqrtf(float(D));
  dim3 grid(unsigned((T + kWarps - 1) / kWarps), unsigned(nH), unsigned(B));
  const size_t smem = kWarps * D * sizeof(float) + tile_bytes(int(D));
  auto kernel = D <= 128 ? attention_fwd_kernel<4> : attention_fwd_kernel<8>;
  kernel<<<grid, kWarps * 32, smem, ctx.stream>>>(out, lse, q, k, v, doc, int(T), int(nH),
                                                  int(nKV), int(D), scale);
  CUDA_CHECK_LAUNCH();
}

size_t fallback_bwd_workspace_bytes(int64_t B, int64_t T, int64_t nH) {
  return size_t(B) * size_t(nH) * size_t(T) * sizeof(float);  // delta [B,nH,T] f32
}

void fallback_bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                  const float* lse, const bf16* q, const bf16* k, const bf16* v,
                  const int32_t* doc, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                  const Ctx& ctx) {
  float* delta = static_cast<float*>(
      workspace_for(ctx, fallback_bwd_workspace_bytes(B, T, nH), "attention_bwd"));  // [B,nH,T]
  const float scale = 1.0f / sqrtf(float(D));
  const unsigned tiles = unsigned((T + kWarps - 1) / kWarps);
  {
    const size_t smem = 2 * kWarps * D * sizeof(float) + tile_bytes(int(D));
    auto kernel = D <= 128 ? attention_bwd_dq_kernel<4> : attention_bwd_dq_kernel<8>;
    kernel<<<dim3(tiles, unsigned(nH), unsigned(B)), kWarps * 32, smem, ctx.stream>>>(
        dq, delta, dout, out, lse, q, k, v, doc, int(T), int(nH), int(nKV), int(D), scale);
    CUDA_CHECK_LAUNCH();
  }
  {
    const size_t smem = (2 * kWarps * D + 2 * kTile) * sizeof(float) + tile_bytes(int(D));
    auto kernel = D <= 128 ? attention_bwd_dkdv_kernel<4> : attention_bwd_dkdv_kernel<8>;
    kernel<<<dim3(tiles, unsigned(nKV), unsigned(B)), kWarps * 32, smem, ctx.stream>>>(
        dk, dv, delta, dout, lse, q, k, v, doc, int(T), int(nH), int(nKV), int(D), scale);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

// ---- segment tables (host) ---------------------------------------------------------------------

size_t attention_segments_bytes(int64_t B, int64_t T) { return sdpa::segment_table_bytes(B, T); }

int64_t attention_segment_bucket(int64_t count) { return sdpa::segment_bucket(count); }

int64_t attention_segments_build(void* table_host, const int32_t* doc, int64_t B, int64_t T,
                                 int64_t nH, int64_t nKV, int64_t D) {
  const int64_t C = sdpa::segment_capacity(B, T), N = B * T;
  auto* off_q = static_cast<int64_t*>(table_host);  // layout: attention_cudnn.h
  int64_t* off_kv = off_q + C;
  int64_t* off_st = off_q + 2 * C;
  auto* len = reinterpret_cast<int32_t*>(off_q + 3 * C);
  int64_t S = 0;
  std::unordered_set<int32_t> seen;  // the document ids of the row, to catch one reappearing
  for (int64_t b = 0; b < B; ++b) {
    seen.clear();
    for (int64_t t = 0; t < T;) {
      const int32_t id = doc[b * T + t];
      // not contiguous: only the fallback's doc[] comparison describes it
      if (!seen.insert(id).second) return 0;
      int64_t e = t + 1;
      while (e < T && doc[b * T + e] == id) ++e;
      const int64_t tok = b * T + t;
      off_q[S] = tok * nH * D;
      off_kv[S] = tok * nKV * D;
      off_st[S] = tok * nH;
      len[S] = int32_t(e - t);
      ++S;
      t = e;
    }
  }
  for (int64_t i = S; i < C; ++i) {  // padding sequences: empty, at the end of the buffers
    off_q[i] = N * nH * D;
    off_kv[i] = N * nKV * D;
    off_st[i] = N * nH;
    len[i] = 0;
  }
  return S;
}

// ---- dispatch: cuDNN SDPA or the fallback ------------------------------------------------------
namespace {

AttentionImpl impl_from_env() {
  const char* e = std::getenv("AUTOMOE_ATTENTION");
  if (!e || !*e || std::strcmp(e, "auto") == 0) return AttentionImpl::kAuto;
  if (std::strcmp(e, "cudnn") == 0) return AttentionImpl::kCudnn;
  if (std::strcmp(e, "fallback") == 0) return AttentionImpl::kFallback;
  AM_FAIL("AUTOMOE_ATTENTION={} is not one of auto, cudnn, fallback", e);
}

int g_impl_override = -1;  // an AttentionImpl set by set_attention_impl, or -1: the env's

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr size_t kScratchAlign = 256;
size_t align_scratch(size_t n) { return (n + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

// The packed path's workspace: cuDNN's, then the token-major Stats scratch [B*T, nH] f32.
size_t packed_scratch_offset(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                             int64_t segments) {
  return align_scratch(sdpa::workspace_bytes(bwd, B, T, nH, nKV, D, segments));
}
size_t packed_workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                              int64_t segments) {
  return packed_scratch_offset(bwd, B, T, nH, nKV, D, segments) +
         size_t(B) * size_t(T) * size_t(nH) * sizeof(float);
}

enum class Path { kFallback, kCausal, kPacked };

// Packed (document-masked) batches through cuDNN: with AttentionImpl::kCudnn always, under
// kAuto unless AUTOMOE_ATTENTION_PACKED=fallback.
bool packed_cudnn_allowed() {
  if (attention_impl() == AttentionImpl::kCudnn) return true;
  static const bool on = [] {
    const char* e = std::getenv("AUTOMOE_ATTENTION_PACKED");
    if (!e || !*e || std::strcmp(e, "cudnn") == 0) return true;
    if (std::strcmp(e, "fallback") == 0) return false;
    AM_FAIL("AUTOMOE_ATTENTION_PACKED={} is not one of cudnn, fallback", e);
  }();
  return on;
}

// Which implementation runs this call (ops_cuda.h). kAuto: cuDNN when the build has it and it
// can run the case, else the fallback; kCudnn: cuDNN or an Error saying why not; kFallback: the
// fallback. *segments is set to the packed graph's sequence count (kPacked only).
Path choose(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
            const int32_t* doc, const AttentionSegments* seg, bool aligned, const Ctx& ctx,
            const char* op, int64_t* segments) {
  const AttentionImpl impl = attention_impl();
  if (impl == AttentionImpl::kFallback) return Path::kFallback;
  const bool has_doc = doc != nullptr;
  int64_t segs = has_doc && seg ? seg->count : 0;
  bool packed = has_doc;
  if (has_doc && segs == B) packed = false;  // every row one document: plain causal
  if (packed && !packed_cudnn_allowed()) return Path::kFallback;
  // kAuto's expected fallbacks, said in ops_cuda.h: no cuDNN in the build, doc without a table.
  if (impl == AttentionImpl::kAuto && (!sdpa::compiled_in() || (packed && segs <= 0)))
    return Path::kFallback;
  if (!packed) segs = 0;
  bool ok = aligned && sdpa::supported(bwd, B, T, nH, nKV, D, packed, segs, nullptr);
  bool ws_ok = true;
  if (ok && packed) {
    ws_ok = packed_workspace_bytes(bwd, B, T, nH, nKV, D, segs) <= ctx.workspace_bytes;
    ok = ws_ok;
  }
  if (ok) {
    *segments = segs;
    return packed ? Path::kPacked : Path::kCausal;
  }
  auto why = [&] {
    std::string w = "tensors not 16-byte aligned";
    if (aligned) sdpa::supported(bwd, B, T, nH, nKV, D, packed, segs, &w);
    if (aligned && !ws_ok)
      w = fmt::format("the packed graph of {} sequences (bucket {}) needs {} bytes of workspace, "
                      "the Ctx has {} (size it with attention_*_workspace_bytes(.., doc = true))",
                      segs, sdpa::segment_bucket(segs),
                      packed_workspace_bytes(bwd, B, T, nH, nKV, D, segs), ctx.workspace_bytes);
    return w;
  };
  if (impl == AttentionImpl::kCudnn)
    AM_FAIL("[{}] AUTOMOE_ATTENTION=cudnn but cuDNN cannot run B={} T={} nH={} nKV={} D={}{}: {}",
            op, B, T, nH, nKV, D,
            packed ? fmt::format(" packed ({} sequences)", segs) : std::string(), why());
  // kAuto on a case cuDNN rejects: say so once per case, then run the fallback.
  static std::mutex mu;
  static std::set<std::array<int64_t, 8>> noted;
  std::lock_guard<std::mutex> lock(mu);
  const int64_t bucket = packed ? sdpa::segment_bucket(segs) : 0;
  if (noted.insert({bwd, B, T, nH, nKV, D, aligned, bucket}).second)
    fmt::print(stderr, "[{}] B={} T={} nH={} nKV={} D={}{}: fallback kernel, not cuDNN: {}\n", op,
               B, T, nH, nKV, D,
               packed ? fmt::format(" packed (bucket {})", bucket) : std::string(), why());
  return Path::kFallback;
}

}  // namespace

void set_attention_impl(AttentionImpl impl) { g_impl_override = int(impl); }

AttentionImpl attention_impl() {
  static const AttentionImpl from_env = impl_from_env();
  return g_impl_override >= 0 ? AttentionImpl(g_impl_override) : from_env;
}

std::string attention_cudnn_unsupported(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                                        int64_t D, bool doc, int64_t segments) {
  check_sizes(B, T, nH, nKV, D, bwd ? "attention_bwd" : "attention_fwd");
  if (doc && segments == B) {  // one document per row: plain causal
    doc = false;
    segments = 0;
  }
  std::string why;
  if (sdpa::supported(bwd, B, T, nH, nKV, D, doc, doc ? segments : 0, &why)) return "";
  return why;
}

namespace {

// A packed batch's cuDNN workspace grows with its bucket (the sequence count rounded up to a
// power of two; measured on an H200 at W1's shapes: bucket 16 needs 386 MiB); buckets whose
// workspace is above this are not planned for, and such a batch runs the fallback kernel
// (said once per bucket on stderr).
constexpr size_t kPackedWorkspaceCap = size_t(1) << 30;

// cuDNN's workspace at (B, T): the causal graph, and with doc the packed graph of every bucket
// from the smallest up to B*T sequences while it fits kPackedWorkspaceCap, plus the Stats
// scratch. Each bucket's graph is built (and cached) here, once per shape.
size_t cudnn_workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                             bool doc) {
  size_t n = 0;
  if (sdpa::supported(bwd, B, T, nH, nKV, D, false, 0, nullptr))
    n = sdpa::workspace_bytes(bwd, B, T, nH, nKV, D, 0);
  if (doc && packed_cudnn_allowed())
    for (int64_t S = sdpa::kMinSegmentBucket;; S *= 2) {
      if (sdpa::supported(bwd, B, T, nH, nKV, D, true, S, nullptr)) {
        const size_t b = packed_workspace_bytes(bwd, B, T, nH, nKV, D, S);
        if (b > kPackedWorkspaceCap) break;
        n = std::max(n, b);
      }
      if (S >= B * T) break;
    }
  return n;
}

}  // namespace

size_t attention_packed_workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                                        int64_t D, int64_t segments) {
  check_sizes(B, T, nH, nKV, D, bwd ? "attention_bwd" : "attention_fwd");
  if (!sdpa::compiled_in() || segments <= 0 ||
      !sdpa::supported(bwd, B, T, nH, nKV, D, true, segments, nullptr))
    return 0;
  return packed_workspace_bytes(bwd, B, T, nH, nKV, D, segments);
}

size_t attention_fwd_workspace_bytes(int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                                     bool doc) {
  check_sizes(B, T, nH, nKV, D, "attention_fwd");
  if (B == 0 || T == 0 || nH == 0 || attention_impl() == AttentionImpl::kFallback) return 0;
  if (!sdpa::compiled_in()) return 0;  // the fallback's forward: none
  return cudnn_workspace_bytes(false, B, T, nH, nKV, D, doc);
}

size_t attention_bwd_workspace_bytes(int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                                     bool doc) {
  check_sizes(B, T, nH, nKV, D, "attention_bwd");
  if (B == 0 || T == 0 || nH == 0) return 0;
  size_t n = fallback_bwd_workspace_bytes(B, T, nH);
  if (attention_impl() != AttentionImpl::kFallback && sdpa::compiled_in())
    n = std::max(n, cudnn_workspace_bytes(true, B, T, nH, nKV, D, doc));
  return n;
}

void attention_fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                   const int32_t* doc, const AttentionSegments* seg, int64_t B, int64_t T,
                   int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  check_sizes(B, T, nH, nKV, D, "attention_fwd");
  if (B == 0 || T == 0 || nH == 0) return;
  const bool aligned = aligned16(out) && aligned16(lse) && aligned16(q) && aligned16(k) &&
                       aligned16(v) && (!seg || aligned16(seg->table));
  int64_t segs = 0;
  switch (choose(false, B, T, nH, nKV, D, doc, seg, aligned, ctx, "attention_fwd", &segs)) {
    case Path::kCausal:
      sdpa::fwd(out, lse, q, k, v, B, T, nH, nKV, D, ctx);
      break;
    case Path::kPacked: {
      const size_t at = packed_scratch_offset(false, B, T, nH, nKV, D, segs);
      float* st = reinterpret_cast<float*>(static_cast<unsigned char*>(ctx.workspace) + at);
      sdpa::fwd_packed(out, st, q, k, v, seg->table, segs, B, T, nH, nKV, D, ctx);
      stats_lse<true>(lse, st, B, T, nH, ctx);  // [B*T,nH] -> [B,nH,T]
      break;
    }
    case Path::kFallback:
      fallback_fwd(out, lse, q, k, v, doc, B, T, nH, nKV, D, ctx);
      break;
  }
}

void attention_bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                   const float* lse, const bf16* q, const bf16* k, const bf16* v,
                   const int32_t* doc, const AttentionSegments* seg, int64_t B, int64_t T,
                   int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  check_sizes(B, T, nH, nKV, D, "attention_bwd");
  if (B == 0 || T == 0 || nH == 0) return;
  const bool aligned = aligned16(dq) && aligned16(dk) && aligned16(dv) && aligned16(dout) &&
                       aligned16(out) && aligned16(lse) && aligned16(q) && aligned16(k) &&
                       aligned16(v) && (!seg || aligned16(seg->table));
  int64_t segs = 0;
  switch (choose(true, B, T, nH, nKV, D, doc, seg, aligned, ctx, "attention_bwd", &segs)) {
    case Path::kCausal:
      sdpa::bwd(dq, dk, dv, dout, out, lse, q, k, v, B, T, nH, nKV, D, ctx);
      break;
    case Path::kPacked: {
      const size_t at = packed_scratch_offset(true, B, T, nH, nKV, D, segs);
      float* st = reinterpret_cast<float*>(static_cast<unsigned char*>(ctx.workspace) + at);
      stats_lse<false>(st, lse, B, T, nH, ctx);  // [B,nH,T] -> [B*T,nH]
      sdpa::bwd_packed(dq, dk, dv, dout, out, st, q, k, v, seg->table, segs, B, T, nH, nKV, D,
                       ctx);
      break;
    }
    case Path::kFallback:
      fallback_bwd(dq, dk, dv, dout, out, lse, q, k, v, doc, B, T, nH, nKV, D, ctx);
      break;
  }
}

// ---- the tail of a split sequence (cuDNN only) ------------------------------------------------

std::string attention_tail_unsupported(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                                       int64_t nKV, int64_t D) {
  check_sizes(B, Tkv, nH, nKV, D, bwd ? "attention_tail_bwd" : "attention_tail_fwd");
  std::string why;
  if (sdpa::supported_tail(bwd, B, Tq, Tkv, nH, nKV, D, &why)) return "";
  return why;
}

namespace {

// The backward's scratch after cuDNN's workspace: dk and dv as cuDNN writes them [B,Tkv,nKV,D].
size_t tail_scratch_offset(int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV,
                           int64_t D) {
  return align_scratch(sdpa::workspace_bytes_tail(true, B, Tq, Tkv, nH, nKV, D));
}

void tail_check(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D,
                bool aligned, const Ctx& ctx) {
  const char* op = bwd ? "attention_tail_bwd" : "attention_tail_fwd";
  check_sizes(B, Tkv, nH, nKV, D, op);
  AM_CHECK(aligned, "[{}] tensors not 16-byte aligned (cuDNN needs them)", op);
  std::string why;
  AM_CHECK(sdpa::supported_tail(bwd, B, Tq, Tkv, nH, nKV, D, &why),
           "[{}] cuDNN cannot run B={} Tq={} Tkv={} nH={} nKV={} D={}, and the tail attention "
           "has no fallback kernel: {}",
           op, B, Tq, Tkv, nH, nKV, D, why);
  const size_t need = attention_tail_workspace_bytes(bwd, B, Tq, Tkv, nH, nKV, D);
  AM_CHECK(ctx.workspace_bytes >= need,
           "[{}] needs {} bytes of workspace, the Ctx has {} (size it with "
           "attention_tail_workspace_bytes)",
           op, need, ctx.workspace_bytes);
}

}  // namespace

size_t attention_tail_workspace_bytes(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                                      int64_t nKV, int64_t D) {
  if (!sdpa::supported_tail(bwd, B, Tq, Tkv, nH, nKV, D, nullptr)) return 0;
  if (!bwd) return sdpa::workspace_bytes_tail(false, B, Tq, Tkv, nH, nKV, D);
  const size_t kv = align_scratch(size_t(B * Tkv * nKV * D) * sizeof(bf16));
  return tail_scratch_offset(B, Tq, Tkv, nH, nKV, D) + 2 * kv;
}

void attention_tail_fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                        int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D,
                        const Ctx& ctx) {
  if (B == 0 || Tq == 0 || nH == 0) return;
  tail_check(false, B, Tq, Tkv, nH, nKV, D,
             aligned16(out) && aligned16(lse) && aligned16(q) && aligned16(k) && aligned16(v), ctx);
  sdpa::fwd_tail(out, lse, q, k, v, B, Tq, Tkv, nH, nKV, D, ctx);
}

void attention_tail_bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                        const float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
                        int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D,
                        const Ctx& ctx) {
  if (B == 0 || Tq == 0 || nH == 0) return;
  tail_check(true, B, Tq, Tkv, nH, nKV, D,
             aligned16(dq) && aligned16(dk) && aligned16(dv) && aligned16(dout) &&
                 aligned16(out) && aligned16(lse) && aligned16(q) && aligned16(k) && aligned16(v),
             ctx);
  const int64_t nkv = B * Tkv * nKV * D;
  unsigned char* ws = static_cast<unsigned char*>(ctx.workspace);
  bf16* dk_t = reinterpret_cast<bf16*>(ws + tail_scratch_offset(B, Tq, Tkv, nH, nKV, D));
  bf16* dv_t = dk_t + align_scratch(size_t(nkv) * sizeof(bf16)) / sizeof(bf16);
  sdpa::bwd_tail(dq, dk_t, dv_t, dout, out, lse, q, k, v, B, Tq, Tkv, nH, nKV, D, ctx);
  add(dk, dk, dk_t, nkv, ctx);
  add(dv, dv, dv_t, nkv, ctx);
}

}  // namespace automoe::cuda
