// backend/cuda/moe_permute.cu: MoE routing layout computed on the device (slots sorted by expert,
// stable in slot order, no atomics on the result, no host sync), permute of token rows into
// expert order and the weighted unpermute (combine) back to tokens. Slots whose expert is out
// of [0, E) get slot_row = -1 and are skipped by (un)permute. With RowRegions (expert
// parallelism's padded receive, ops_cuda.h) the padding rows are skipped without being read.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kLayoutThreads = 256, kLayoutWarps = kLayoutThreads / 32;
constexpr int kMaxExperts = 1024;

// Whether row n is padding of its region (never with the default RowRegions).
__device__ __forceinline__ bool is_padding(const RowRegions& g, int64_t n) {
  if (!g.cnt) return false;
  const int64_t s = n / g.region;
  return n - s * g.region >= g.cnt[s];
}

// Whether every slot of [s0, s1) lies on padding rows: the padding of a region is its
// tail, so the first and last rows in one region's padding cover everything between.
__device__ __forceinline__ bool all_padding(const RowRegions& g, int64_t s0, int64_t s1, int K) {
  if (!g.cnt || s1 <= s0) return false;
  const int64_t r0 = s0 / K, r1 = (s1 - 1) / K;
  return r0 / g.region == r1 / g.region && is_padding(g, r0);
}

// The layout in three kernels over tiles of kLayoutTile slots (one block per tile):
//  1. count:  per tile, the slots of each expert (shared-memory atomics: counts do not depend on
//             the order) -> cnt[tile][E];
//  2. scan:   one block: offsets = exclusive scan over experts of the totals, and cnt[tile][e]
//             becomes the first row of expert e taken by tile `tile` (tiles in slot order);
//  3. place:  per tile, its slots in chunks of 256, in order: a lane's rank among the lanes of
//             its warp with the same expert (match_any), plus the rows taken by earlier warps of
//             the chunk and by earlier chunks of the tile.
// Stable in slot order, deterministic, no host sync; cnt lives in the workspace.
constexpr int64_t kLayoutTile = 1024;

__global__ void moe_layout_count_kernel(int32_t* cnt, const int32_t* topk_idx, int64_t S, int E,
                                        int K, RowRegions rows) {
  extern __shared__ int32_t hist[];  // [E]
  for (int e = threadIdx.x; e < E; e += kLayoutThreads) hist[e] = 0;
  __syncthreads();
  const int64_t s0 = int64_t(blockIdx.x) * kLayoutTile, end = min(S, s0 + kLayoutTile);
  const int64_t s1 = all_padding(rows, s0, end, K) ? s0 : end;  // wholly padding: counts nothing
  for (int64_t i = s0 + threadIdx.x; i < s1; i += kLayoutThreads) {
    if (is_padding(rows, i / K)) continue;
    const int e = topk_idx[i];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kLayoutThreads) cnt[int64_t(blockIdx.x) * E + e] = hist[e];
}

__global__ void moe_layout_scan_kernel(int32_t* offsets, int32_t* cnt, int tiles, int E) {
  __shared__ int tmp[32];
  int total = 0;
  const int tid = threadIdx.x;
  const int per = (E + kLayoutThreads - 1) / kLayoutThreads;
  const int e0 = min(E, tid * per), e1 = min(E, e0 + per);
  int run = 0;
  for (int e = e0; e < e1; ++e)
    for (int t = 0; t < tiles; ++t) run += cnt[int64_t(t) * E + e];
  run = block_exclusive_scan(run, tmp, total);
  for (int e = e0; e < e1; ++e) {
    offsets[e] = run;
    for (int t = 0; t < tiles; ++t) {  // counts -> each tile's first row of expert e
      const int c = cnt[int64_t(t) * E + e];
      cnt[int64_t(t) * E + e] = run;
      run += c;
    }
  }
  if (tid == 0) offsets[E] = total;
}

// Shared memory: base[E] (the tile's next free row of each expert) and table[E][8] (per chunk:
// slots of expert e in warp w, then their first row).
// A tile of padding rows only writes its slot_row = -1 (uniform over the block, before any
// barrier).
__global__ void moe_layout_place_kernel(int32_t* slot_row, const int32_t* topk_idx,
                                        const int32_t* first, int64_t S, int E, int K,
                                        RowRegions rows) {
  extern __shared__ int32_t sm[];
  int32_t* base = sm;       // [E]
  int32_t* table = sm + E;  // [E][kLayoutWarps]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t s0 = int64_t(blockIdx.x) * kLayoutTile, s1 = min(S, s0 + kLayoutTile);
  if (all_padding(rows, s0, s1, K)) {
    for (int64_t i = s0 + tid; i < s1; i += kLayoutThreads) slot_row[i] = -1;
    return;
  }
  for (int e = tid; e < E; e += kLayoutThreads) base[e] = first[int64_t(blockIdx.x) * E + e];
  for (int64_t c0 = s0; c0 < s1; c0 += kLayoutThreads) {
    const int64_t i = c0 + tid;
    int e = i < s1 && !is_padding(rows, i / K) ? topk_idx[i] : -1;
    if (e >= E) e = -1;
    for (int x = tid; x < E * kLayoutWarps; x += kLayoutThreads) table[x] = 0;
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank = __popc(peers & ((1u << lane) - 1));
    __syncthreads();
    if (e >= 0 && rank == 0) table[e * kLayoutWarps + warp] = __popc(peers);
    __syncthreads();
    for (int x = tid; x < E; x += kLayoutThreads) {
      int r = base[x];
      for (int w = 0; w < kLayoutWarps; ++w) {
        const int c = table[x * kLayoutWarps + w];
        table[x * kLayoutWarps + w] = r;
        r += c;
      }
      base[x] = r;
    }
    __syncthreads();
    if (i < s1) slot_row[i] = e >= 0 ? table[e * kLayoutWarps + warp] + rank : -1;
    __syncthreads();  // the table is cleared for the next chunk
  }
}

// permute: block i copies token row n = i / K to expert row slot_row[i]; threads stride the
// row in chunks of Chunk (16 bytes when C % 8 == 0 and aligned, else one bf16).
template <class Chunk>
__global__ void permute_fwd_kernel(Chunk* xs, const Chunk* x, const int32_t* slot_row, int K,
                                   int64_t Cc /*chunks per row*/) {
  const int64_t i = blockIdx.x;
  const int64_t r = slot_row[i];
  if (r < 0) return;
  const Chunk* src = x + (i / K) * Cc;
  Chunk* dst = xs + r * Cc;
  for (int64_t c = threadIdx.x; c < Cc; c += blockDim.x) dst[c] = src[c];
}

// Block per token n, threads stride the channels: dx[n] = sum_j dxs[slot_row[n*K+j]] (fp32).
__global__ void permute_bwd_kernel(bf16* dx, const bf16* dxs, const int32_t* slot_row, int K,
                                   int64_t C, RowRegions pad) {
  const int64_t n = blockIdx.x;
  if (is_padding(pad, n)) return;
  const int32_t* rows = slot_row + n * K;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < K; ++j)
      if (rows[j] >= 0) acc += to_f(dxs[int64_t(rows[j]) * C + c]);
    dx[n * C + c] = to_bf(acc);
  }
}

// Block per token n: out[n] = sum_j w[n,j] * ys[slot_row[n*K+j]] (fp32).
__global__ void unpermute_fwd_kernel(bf16* out, const bf16* ys, const float* w,
                                     const int32_t* slot_row, int K, int64_t C, RowRegions pad) {
  const int64_t n = blockIdx.x;
  if (is_padding(pad, n)) return;
  const int32_t* rows = slot_row + n * K;
  const float* wn = w + n * K;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < K; ++j)
      if (rows[j] >= 0) acc += wn[j] * to_f(ys[int64_t(rows[j]) * C + c]);
    out[n * C + c] = to_bf(acc);
  }
}

// Block per token n: for each pick j, dys[r] = w[n,j] * dout[n] and dw[n,j] = dout[n] . ys[r]
// (block reduction, deterministic).
__global__ void unpermute_bwd_kernel(bf16* dys, float* dw, const bf16* dout, const bf16* ys,
                                     const float* w, const int32_t* slot_row, int K, int64_t C,
                                     RowRegions pad) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  if (is_padding(pad, n)) return;
  const bf16* g = dout + n * C;
  for (int j = 0; j < K; ++j) {
    const int64_t r = slot_row[n * K + j];
    if (r < 0) {  // uniform over the block
      if (threadIdx.x == 0) dw[n * K + j] = 0.f;
      continue;
    }
    const float wj = w[n * K + j];
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float gc = to_f(g[c]);
      dys[r * C + c] = to_bf(wj * gc);
      dot += gc * to_f(ys[r * C + c]);
    }
    dot = block_sum(dot, red);
    if (threadIdx.x == 0) dw[n * K + j] = dot;
  }
}

// 16-byte versions of the three row kernels above (C % 8 == 0, rows 16-byte aligned): the same
// sums in the same order per element; a thread owns chunks of 8 channels.
__global__ void permute_bwd_vec_kernel(bf16* dx, const bf16* dxs, const int32_t* slot_row, int K,
                                       int64_t C, RowRegions pad) {
  const int64_t n = blockIdx.x;
  if (is_padding(pad, n)) return;
  const int32_t* rows = slot_row + n * K;
  for (int64_t c = int64_t(threadIdx.x) * 8; c < C; c += int64_t(blockDim.x) * 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < K; ++j) {
      const int32_t r = rows[j];
      if (r < 0) continue;
      float v[8];
      load8(dxs + int64_t(r) * C + c, v);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] += v[q];
    }
    store8(dx + n * C + c, acc);
  }
}

__global__ void unpermute_fwd_vec_kernel(bf16* out, const bf16* ys, const float* w,
                                         const int32_t* slot_row, int K, int64_t C,
                                         RowRegions pad) {
  const int64_t n = blockIdx.x;
  if (is_padding(pad, n)) return;
  const int32_t* rows = slot_row + n * K;
  const float* wn = w + n * K;
  for (int64_t c = int64_t(threadIdx.x) * 8; c < C; c += int64_t(blockDim.x) * 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < K; ++j) {
      const int32_t r = rows[j];
      if (r < 0) continue;
      float v[8];
      load8(ys + int64_t(r) * C + c, v);
      const float wj = wn[j];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] += wj * v[q];
    }
    store8(out + n * C + c, acc);
  }
}

// All K dot products of a token in one pass and one block reduction (K <= kMaxPicksVec).
constexpr int kMaxPicksVec = 16;
__global__ void unpermute_bwd_vec_kernel(bf16* dys, float* dw, const bf16* dout, const bf16* ys,
                                         const float* w, const int32_t* slot_row, int K,
                                         int64_t C, RowRegions pad) {
  __shared__ float red[kMaxPicksVec][33];
  const int64_t n = blockIdx.x;
  if (is_padding(pad, n)) return;  // uniform over the block, before any barrier
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  float dot[kMaxPicksVec];
#pragma unroll
  for (int j = 0; j < kMaxPicksVec; ++j) dot[j] = 0.f;
  for (int64_t c = int64_t(threadIdx.x) * 8; c < C; c += int64_t(blockDim.x) * 8) {
    float g[8];
    load8(dout + n * C + c, g);
#pragma unroll
    for (int j = 0; j < kMaxPicksVec; ++j) {
      if (j >= K) break;
      const int32_t r = slot_row[n * K + j];
      if (r < 0) continue;
      const float wj = w[n * K + j];
      float y[8], d[8];
      load8(ys + int64_t(r) * C + c, y);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        d[q] = wj * g[q];
        dot[j] += g[q] * y[q];
      }
      store8(dys + int64_t(r) * C + c, d);
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxPicksVec; ++j) {
    if (j >= K) break;
    const float v = warp_sum(dot[j]);
    if (lane == 0) red[j][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    for (int j = 0; j < K; ++j) {
      const float v = warp_sum(lane < nwarps ? red[j][lane] : 0.f);
      if (lane == 0) dw[n * K + j] = slot_row[n * K + j] < 0 ? 0.f : v;
    }
  }
}

constexpr int kRowThreads = 128;

}  // namespace

size_t moe_layout_workspace_bytes(int64_t N, int64_t K, int64_t E) {
  const int64_t tiles = std::max<int64_t>(1, (N * K + kLayoutTile - 1) / kLayoutTile);
  return size_t(tiles * E) * sizeof(int32_t);
}

void moe_layout(int32_t* offsets, int32_t* slot_row, const int32_t* topk_idx, int64_t N,
                int64_t E, int64_t K, const Ctx& ctx, RowRegions rows) {
  AM_CHECK(E >= 1 && E <= kMaxExperts, "[moe_layout] {} experts: supported 1..{}", E,
           kMaxExperts);
  AM_CHECK(N * K < (int64_t(1) << 31), "[moe_layout] {} slots do not fit int32 rows", N * K);
  AM_CHECK(!rows.cnt || rows.region > 0,
           "internal: [moe_layout] row regions with counts need region > 0 (got {})", rows.region);
  const int64_t S = N * K;
  const int tiles = int(std::max<int64_t>(1, (S + kLayoutTile - 1) / kLayoutTile));
  int32_t* cnt = static_cast<int32_t*>(
      workspace_for(ctx, moe_layout_workspace_bytes(N, K, E), "moe_layout"));
  moe_layout_count_kernel<<<tiles, kLayoutThreads, size_t(E) * sizeof(int32_t), ctx.stream>>>(
      cnt, topk_idx, S, int(E), int(K), rows);
  CUDA_CHECK_LAUNCH();
  moe_layout_scan_kernel<<<1, kLayoutThreads, 0, ctx.stream>>>(offsets, cnt, tiles, int(E));
  CUDA_CHECK_LAUNCH();
  const size_t smem = size_t(E) * (1 + kLayoutWarps) * sizeof(int32_t);
  moe_layout_place_kernel<<<tiles, kLayoutThreads, smem, ctx.stream>>>(slot_row, topk_idx, cnt, S,
                                                                       int(E), int(K), rows);
  CUDA_CHECK_LAUNCH();
}

void permute_fwd(bf16* xs, const bf16* x, const int32_t* slot_row, int64_t N, int64_t K,
                 int64_t C, const Ctx& ctx) {
  if (N == 0 || K == 0 || C == 0) return;
  if (rows_16b(C, xs, x))
    permute_fwd_kernel<uint4><<<unsigned(N * K), kRowThreads, 0, ctx.stream>>>(
        reinterpret_cast<uint4*>(xs), reinterpret_cast<const uint4*>(x), slot_row, int(K), C / 8);
  else
    permute_fwd_kernel<bf16><<<unsigned(N * K), kRowThreads, 0, ctx.stream>>>(xs, x, slot_row,
                                                                              int(K), C);
  CUDA_CHECK_LAUNCH();
}

void permute_bwd(bf16* dx, const bf16* dxs, const int32_t* slot_row, int64_t N, int64_t K,
                 int64_t C, const Ctx& ctx, RowRegions rows) {
  if (N == 0 || C == 0) return;
  if (rows_16b(C, dx, dxs))
    permute_bwd_vec_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(dx, dxs, slot_row, int(K),
                                                                        C, rows);
  else
    permute_bwd_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(dx, dxs, slot_row, int(K), C,
                                                                    rows);
  CUDA_CHECK_LAUNCH();
}

void unpermute_fwd(bf16* out, const bf16* ys, const float* w, const int32_t* slot_row, int64_t N,
                   int64_t K, int64_t C, const Ctx& ctx, RowRegions rows) {
  if (N == 0 || C == 0) return;
  if (rows_16b(C, out, ys))
    unpermute_fwd_vec_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(out, ys, w, slot_row,
                                                                          int(K), C, rows);
  else
    unpermute_fwd_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(out, ys, w, slot_row,
                                                                      int(K), C, rows);
  CUDA_CHECK_LAUNCH();
}

void unpermute_bwd(bf16* dys, float* dw, const bf16* dout, const bf16* ys, const float* w,
                   const int32_t* slot_row, int64_t N, int64_t K, int64_t C, const Ctx& ctx,
                   RowRegions rows) {
  if (N == 0 || K == 0) return;
  if (K <= kMaxPicksVec && rows_16b(C, dys, ys) && aligned_16b(dout))
    unpermute_bwd_vec_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
        dys, dw, dout, ys, w, slot_row, int(K), C, rows);
  else
    unpermute_bwd_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(dys, dw, dout, ys, w,
                                                                      slot_row, int(K), C, rows);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
