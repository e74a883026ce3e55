// backend/cuda/moe_permute.cu: MoE routing layout computed on the device (slots sorted by expert,
// stable in slot order, no atomics on the result, no host sync), permute of token rows into
// expert order and the weighted unpermute (combine) back to tokens. Slots whose expert is out
// of [0, E) get slot_row = -1 and are skipped by (un)permute (for expert parallelism later).
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kLayoutThreads = 256, kLayoutWarps = kLayoutThreads / 32;
constexpr int kMaxExperts = 1024;

// Exclusive prefix sum over the block (one value per thread); `total` gets the sum.
// `tmp` is __shared__ int[32].
__device__ int block_exclusive_scan(int v, int* tmp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int x = v;  // inclusive scan within the warp
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) tmp[warp] = x;
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the warp totals
    int w = lane < nwarps ? tmp[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nwarps) tmp[lane] = w;
  }
  __syncthreads();
  total = tmp[nwarps - 1];
  return (warp > 0 ? tmp[warp - 1] : 0) + x - v;
}

// One block of 256 threads. Shared memory: base[E] (counts, then each expert's next free row)
// and table[E][8] (per chunk: slots of expert e in warp w, then their first row).
//  1. counts by shared-memory atomics (the counts do not depend on the order);
//  2. offsets = exclusive scan of the counts (each thread scans a run of E/256 experts);
//  3. slots in chunks of 256, in order: a lane's rank among the lanes of its warp with the same
//     expert (match_any), plus the rows taken by earlier warps of the chunk and earlier chunks.
__global__ void moe_layout_kernel(int32_t* offsets, int32_t* slot_row, const int32_t* topk_idx,
                                  int64_t S /*N*K slots*/, int E) {
  extern __shared__ int32_t sm[];
  int32_t* base = sm;       // [E]
  int32_t* table = sm + E;  // [E][kLayoutWarps]
  __shared__ int tmp[32];
  int total = 0;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int e = tid; e < E; e += kLayoutThreads) base[e] = 0;
  __syncthreads();
  for (int64_t i = tid; i < S; i += kLayoutThreads) {
    const int e = topk_idx[i];
    if (e >= 0 && e < E) atomicAdd(&base[e], 1);
  }
  __syncthreads();

  const int per = (E + kLayoutThreads - 1) / kLayoutThreads;
  const int e0 = min(E, tid * per), e1 = min(E, e0 + per);
  int run = 0;
  for (int e = e0; e < e1; ++e) run += base[e];
  run = block_exclusive_scan(run, tmp, total);
  for (int e = e0; e < e1; ++e) {
    const int c = base[e];
    offsets[e] = run;
    base[e] = run;
    run += c;
  }
  if (tid == 0) offsets[E] = total;
  __syncthreads();

  for (int64_t c0 = 0; c0 < S; c0 += kLayoutThreads) {
    const int64_t i = c0 + tid;
    int e = i < S ? topk_idx[i] : -1;
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
        const int cnt = table[x * kLayoutWarps + w];
        table[x * kLayoutWarps + w] = r;
        r += cnt;
      }
      base[x] = r;
    }
    __syncthreads();
    if (i < S) slot_row[i] = e >= 0 ? table[e * kLayoutWarps + warp] + rank : -1;
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
                                   int64_t C) {
  const int64_t n = blockIdx.x;
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
                                     const int32_t* slot_row, int K, int64_t C) {
  const int64_t n = blockIdx.x;
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
                                     const float* w, const int32_t* slot_row, int K, int64_t C) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
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

constexpr int kRowThreads = 128;

}  // namespace

void moe_layout(int32_t* offsets, int32_t* slot_row, const int32_t* topk_idx, int64_t N,
                int64_t E, int64_t K, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= kMaxExperts, "[moe_layout] {} experts: supported 1..{}", E,
           kMaxExperts);
  AM_CHECK(N * K < (int64_t(1) << 31), "[moe_layout] {} slots do not fit int32 rows", N * K);
  const size_t smem = size_t(E) * (1 + kLayoutWarps) * sizeof(int32_t);
  moe_layout_kernel<<<1, kLayoutThreads, smem, ctx.stream>>>(offsets, slot_row, topk_idx, N * K,
                                                              int(E));
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
                 int64_t C, const Ctx& ctx) {
  if (N == 0 || C == 0) return;
  permute_bwd_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(dx, dxs, slot_row, int(K), C);
  CUDA_CHECK_LAUNCH();
}

void unpermute_fwd(bf16* out, const bf16* ys, const float* w, const int32_t* slot_row, int64_t N,
                   int64_t K, int64_t C, const Ctx& ctx) {
  if (N == 0 || C == 0) return;
  unpermute_fwd_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(out, ys, w, slot_row,
                                                                    int(K), C);
  CUDA_CHECK_LAUNCH();
}

void unpermute_bwd(bf16* dys, float* dw, const bf16* dout, const bf16* ys, const float* w,
                   const int32_t* slot_row, int64_t N, int64_t K, int64_t C, const Ctx& ctx) {
  if (N == 0 || K == 0) return;
  unpermute_bwd_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(dys, dw, dout, ys, w,
                                                                    slot_row, int(K), C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
