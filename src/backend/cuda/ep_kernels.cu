// backend/cuda/ep_kernels.cu: expert-parallel layout, dispatch pack and combine unpack
// (declarations and buffer layouts in ep_kernels.h). Deterministic: no atomics, and
// the combine sums a token's rows in rank order as the CPU path does.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ep_kernels.h"

namespace automoe::cuda {

namespace {

constexpr int kScanThreads = 256;
constexpr int kLayoutThreads = 1024;  // ep_layout_count_kernel's block
constexpr int kRowThreads = 128;

// The general path (P > 8): block d finds which tokens have a pick on rank d, and their rank
// among them (token order); ep_layout_place_kernel then adds each destination's first row.
// Measured for P = 2 (bench/RESULTS.md, eighth session): 43-49 us at N 4096 and 80 us at 8192
// on an H200, a third of the direct dispatch. Each thread's run of tokens makes a warp's load
// touch 32 cache lines (threads per*K*4 bytes apart), so the loads are bound by L1 wavefronts,
// one per line: N*K/32 warp loads x 32 wavefronts per pass. One block doing every destination,
// or four tokens' loads in flight at once, did not help (measured): ep_layout_rounds_kernel
// below puts consecutive threads on consecutive tokens instead.
// send_pos gets the position relative to d's first row; send_cnt[d] the number of tokens;
// send_picks[d] (nullable) the number of their picks on d (the receiver's expert rows).
// Each of the block's kLayoutThreads threads owns a contiguous run of tokens: it counts them,
// one block scan places the runs, and it numbers them (one scan, not one per 256 tokens: the
// grid is only P blocks, so a chain of scans was the dispatch's longest kernel).
__global__ void ep_layout_count_kernel(int32_t* send_pos, int32_t* send_cnt, int32_t* send_picks,
                                       const int32_t* topk_idx, int64_t N, int K, int El, int P) {
  __shared__ int tmp[32], tmp_p[32];
  const int d = blockIdx.x;
  const int64_t per = (N + blockDim.x - 1) / blockDim.x;
  const int64_t t0 = int64_t(threadIdx.x) * per;
  const int64_t n0 = t0 < N ? t0 : N, n1 = n0 + per < N ? n0 + per : N;
  auto picks_on = [&](int64_t n) {
    int picks = 0;
    for (int j = 0; j < K; ++j) {
      const int e = topk_idx[n * K + j];
      if (e >= 0 && e / El == d) ++picks;
    }
    return picks;
  };
  int cnt = 0, picks = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int p = picks_on(n);
    cnt += p > 0 ? 1 : 0;
    picks += p;
  }
  int total = 0, total_p = 0;
  int run = block_exclusive_scan(cnt, tmp, total);
  if (send_picks) block_exclusive_scan(picks, tmp_p, total_p);  // uniform over the block
  for (int64_t n = n0; n < n1; ++n) send_pos[n * P + d] = picks_on(n) > 0 ? run++ : -1;
  if (threadIdx.x == 0) {
    send_cnt[d] = total;
    if (send_picks) send_picks[d] = total_p;
  }
}

// P <= kMaxP (8), one block: every destination at once, consecutive threads on consecutive
// tokens, so a warp's loads cover one contiguous span of top-k rows (8 cache lines per 16-byte
// load at K = 8, against 32 lines per load in the general path's runs). Pass 1 counts every
// destination's tokens and picks; pass 2 walks the tokens in rounds of blockDim, a block scan
// per destination and round placing each token after the ones before it (the base carried
// from round to round), and writes the final rows (packed: after the earlier destinations; or
// regions). The same rows as the general path, bit for bit (token order within a destination).
// kVec: K == 8 and topk_idx 16-byte aligned (two 16-byte loads per token); else K loads.
// The scans' shared words are double-buffered by round, so a round's writes never meet the
// reads of the round before (the scans of the round between hold every thread at a barrier).
template <int kMaxP, bool kVec>
__global__ void __launch_bounds__(kLayoutThreads)
    ep_layout_rounds_kernel(int32_t* send_pos, int32_t* send_cnt, int32_t* send_picks,
                            const int32_t* topk_idx, int64_t N, int K, int El, int P,
                            int64_t region) {
  __shared__ int tmp[2][kMaxP][32];
  __shared__ int tot[kMaxP], tot_p[kMaxP];
  // on[d] = token n's picks on destination d (0 for n >= N); d unrolled, never an index
  auto picks_of = [&](int64_t n, int (&on)[kMaxP]) {
#pragma unroll
    for (int d = 0; d < kMaxP; ++d) on[d] = 0;
    if (n >= N) return;
    auto add = [&](int e) {
      const int r = e >= 0 ? e / El : -1;
#pragma unroll
      for (int d = 0; d < kMaxP; ++d) on[d] += r == d ? 1 : 0;
    };
    if constexpr (kVec) {
      const int4* row = reinterpret_cast<const int4*>(topk_idx + n * 8);
      const int4 a = row[0], b = row[1];
      add(a.x), add(a.y), add(a.z), add(a.w), add(b.x), add(b.y), add(b.z), add(b.w);
    } else {
      for (int j = 0; j < K; ++j) add(topk_idx[n * K + j]);
    }
  };
  const int64_t T = blockDim.x;
  int on[kMaxP], cnt[kMaxP], picks[kMaxP];
#pragma unroll
  for (int d = 0; d < kMaxP; ++d) cnt[d] = picks[d] = 0;
  for (int64_t n = threadIdx.x; n < N; n += T) {  // pass 1: the totals
    picks_of(n, on);
#pragma unroll
    for (int d = 0; d < kMaxP; ++d) {
      cnt[d] += on[d] > 0 ? 1 : 0;
      picks[d] += on[d];
    }
  }
#pragma unroll
  for (int d = 0; d < kMaxP; ++d) {
    if (d >= P) continue;  // uniform over the block
    int total = 0, total_p = 0;
    block_exclusive_scan(cnt[d], tmp[0][d], total);
    if (send_picks) block_exclusive_scan(picks[d], tmp[1][d], total_p);
    if (threadIdx.x == 0) {
      tot[d] = total;
      tot_p[d] = total_p;
    }
  }
  __syncthreads();
  int64_t base[kMaxP], first = 0;  // destination d's next row
#pragma unroll
  for (int d = 0; d < kMaxP; ++d) {
    base[d] = 0;
    if (d >= P) continue;
    base[d] = region > 0 ? d * region : first;
    first += tot[d];
  }
  int round = 0;
  for (int64_t n0 = 0; n0 < N; n0 += T, ++round) {  // pass 2: the rows, in token order
    const int64_t n = n0 + threadIdx.x;
    picks_of(n, on);
#pragma unroll
    for (int d = 0; d < kMaxP; ++d) {
      if (d >= P) continue;
      int total = 0;
      const int before = block_exclusive_scan(on[d] > 0 ? 1 : 0, tmp[round & 1][d], total);
      if (n < N) send_pos[n * P + d] = on[d] > 0 ? int32_t(base[d] + before) : -1;
      base[d] += total;
    }
  }
  if (threadIdx.x < P) {
    send_cnt[threadIdx.x] = tot[threadIdx.x];
    if (send_picks) send_picks[threadIdx.x] = tot_p[threadIdx.x];
  }
}

// ep_layout_all: one block; thread t takes tokens t, t + blockDim, ...; the picks per
// destination summed by integer atomics on shared words (exact, in any order).
__global__ void __launch_bounds__(kLayoutThreads)
    ep_layout_all_kernel(int32_t* send_pos, int32_t* send_cnt, int32_t* send_picks,
                         const int32_t* topk_idx, int64_t N, int K, int El, int P) {
  __shared__ int picks[32];
  if (threadIdx.x < 32) picks[threadIdx.x] = 0;
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    for (int d = 0; d < P; ++d) send_pos[n * P + d] = int32_t(d * N + n);
    if (!send_picks) continue;
    for (int j = 0; j < K; ++j) {
      const int e = topk_idx[n * K + j];
      if (e >= 0) atomicAdd(&picks[e / El], 1);
    }
  }
  __syncthreads();
  if (threadIdx.x < P) {
    send_cnt[threadIdx.x] = int32_t(N);
    if (send_picks) send_picks[threadIdx.x] = picks[threadIdx.x];
  }
}

using LayoutKernel = void (*)(int32_t*, int32_t*, int32_t*, const int32_t*, int64_t, int, int,
                              int, int64_t);
template <int kMaxP>
LayoutKernel rounds_kernel(bool vec) {
  return vec ? ep_layout_rounds_kernel<kMaxP, true> : ep_layout_rounds_kernel<kMaxP, false>;
}

// Relative positions to send-buffer rows: destination d starts at d * region (padded) or after
// the rows of destinations 0..d-1 (packed; P is small, each thread sums the counts itself).
__global__ void ep_layout_place_kernel(int32_t* send_pos, const int32_t* send_cnt, int64_t N,
                                       int P, int64_t region) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * P;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t pos = send_pos[i];
    if (pos < 0) continue;
    const int d = int(i % P);
    int64_t off = 0;
    if (region > 0) {
      off = d * region;
    } else {
      for (int q = 0; q < d; ++q) off += send_cnt[q];
    }
    send_pos[i] = int32_t(off + pos);
  }
}

// Block per token n: its row to every destination, with its picks remapped to that rank's
// local experts. Chunk: 16 bytes (uint4) when rows allow it, else one bf16.
template <class Chunk>
__global__ void ep_dispatch_pack_kernel(Chunk* x_send, int32_t* idx_send, float* w_send,
                                        const Chunk* x, const int32_t* topk_idx,
                                        const float* topk_w, const int32_t* send_pos,
                                        int64_t Hc /*chunks per row*/, int K, int El, int P) {
  const int64_t n = blockIdx.x;
  const Chunk* src = x + n * Hc;
  for (int d = 0; d < P; ++d) {
    const int64_t r = send_pos[n * P + d];
    if (r < 0) continue;  // uniform over the block
    Chunk* dst = x_send + r * Hc;
    for (int64_t c = threadIdx.x; c < Hc; c += blockDim.x) dst[c] = src[c];
    if (idx_send)
      for (int j = threadIdx.x; j < K; j += blockDim.x) {
        const int le = topk_idx[n * K + j] - d * El;
        const bool here = le >= 0 && le < El;
        idx_send[r * K + j] = here ? le : -1;
        w_send[r * K + j] = here ? topk_w[n * K + j] : 0.f;
      }
  }
}

// Block per token n: out[n] = sum_d y_back[send_pos[n,d]] in rank order, fp32, one rounding.
// Vectorised: each thread owns 8 channels (one uint4 of bf16) when rows allow it.
// One token's combine, 16-byte chunks: out[n] = sum over d of row_y(d, pos[d]), dw_out[n] likewise
// from row_w (rank order, fp32, one rounding). row_y/row_w say where the row of send_pos r on d is.
// kSmall: P <= kEpPushMaxRanks, every loop over the ranks unrolled (so row_y/row_w may index
// kernel parameters by d without a copy to local memory), and each thread's chunks of all P rows
// loaded before any is added (P loads in flight instead of one at a time). The sums are the same
// either way: rank order, fp32, one rounding.
template <bool kSmall, class RowY, class RowW>
__device__ __forceinline__ void unpack_token(uint4* out, float* dw_out, const int32_t* pos,
                                             int64_t n, int64_t Hc, int K, int P, RowY row_y,
                                             RowW row_w) {
  constexpr int kMax = kSmall ? kEpPushMaxRanks : 1;
  int64_t r[kMax];
  if constexpr (kSmall) {
#pragma unroll
    for (int d = 0; d < kMax; ++d) r[d] = d < P ? pos[d] : -1;
  }
  for (int64_t c = threadIdx.x; c < Hc; c += blockDim.x) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    auto add = [&](const uint4& v) {
      const bf16* b = reinterpret_cast<const bf16*>(&v);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] += to_f(b[k]);
    };
    if constexpr (kSmall) {
      uint4 v[kMax];
#pragma unroll
      for (int d = 0; d < kMax; ++d)
        if (r[d] >= 0) v[d] = row_y(d, r[d])[c];
#pragma unroll
      for (int d = 0; d < kMax; ++d)
        if (r[d] >= 0) add(v[d]);
    } else {
      for (int d = 0; d < P; ++d)
        if (pos[d] >= 0) add(row_y(d, pos[d])[c]);
    }
    uint4 o;
    bf16* ob = reinterpret_cast<bf16*>(&o);
#pragma unroll
    for (int k = 0; k < 8; ++k) ob[k] = to_bf(acc[k]);
    out[n * Hc + c] = o;
  }
  if (dw_out)
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      float acc = 0.f;
      if constexpr (kSmall) {
#pragma unroll
        for (int d = 0; d < kMax; ++d)
          if (r[d] >= 0) acc += row_w(d, r[d])[j];
      } else {
        for (int d = 0; d < P; ++d)
          if (pos[d] >= 0) acc += row_w(d, pos[d])[j];
      }
      dw_out[n * K + j] = acc;
    }
}

template <bool kSmall>
__global__ void ep_combine_unpack_vec_kernel(uint4* out, float* dw_out, const uint4* y_back,
                                             const float* dw_back, const int32_t* send_pos,
                                             int64_t Hc, int K, int P) {
  const int64_t n = blockIdx.x;
  unpack_token<kSmall>(
      out, dw_out, send_pos + n * P, n, Hc, K, P,
      [&](int, int64_t r) { return y_back + r * Hc; },
      [&](int, int64_t r) { return dw_back + r * K; });
}

__global__ void ep_combine_unpack_sources_kernel(uint4* out, float* dw_out, EpRowSources y,
                                                 EpRowSources dw, const int32_t* send_pos,
                                                 int64_t Hc, int K, int P) {
  const int64_t n = blockIdx.x;
  unpack_token<true>(
      out, dw_out, send_pos + n * P, n, Hc, K, P,
      [&](int d, int64_t r) { return static_cast<const uint4*>(y.rows[d]) + (r - y.first[d]) * Hc; },
      [&](int d, int64_t r) {
        return static_cast<const float*>(dw.rows[d]) + (r - dw.first[d]) * K;
      });
}

__global__ void ep_combine_unpack_kernel(bf16* out, float* dw_out, const bf16* y_back,
                                         const float* dw_back, const int32_t* send_pos, int64_t H,
                                         int K, int P) {
  const int64_t n = blockIdx.x;
  const int32_t* pos = send_pos + n * P;
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    float acc = 0.f;
    for (int d = 0; d < P; ++d)
      if (pos[d] >= 0) acc += to_f(y_back[int64_t(pos[d]) * H + c]);
    out[n * H + c] = to_bf(acc);
  }
  if (dw_out)
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      float acc = 0.f;
      for (int d = 0; d < P; ++d)
        if (pos[d] >= 0) acc += dw_back[int64_t(pos[d]) * K + j];
      dw_out[n * K + j] = acc;
    }
}

}  // namespace

void ep_layout(int32_t* send_pos, int32_t* send_cnt, int32_t* send_picks, const int32_t* topk_idx,
               int64_t N, int64_t K, int64_t El, int P, int64_t region, const Ctx& ctx) {
  AM_CHECK(P >= 1 && El >= 1 && K >= 1, "[ep_layout] needs P, El, K >= 1 (got {}, {}, {})", P, El,
           K);
  AM_CHECK(int64_t(P) * std::max(N, region) < (int64_t(1) << 31),
           "[ep_layout] {} ranks x {} rows do not fit int32 row indices; use fewer tokens per "
           "micro-batch",
           P, std::max(N, region));
  AM_CHECK(region == 0 || region >= N, "[ep_layout] padded regions of {} rows cannot hold {} tokens",
           region, N);
  if (P <= 8) {  // one block, coalesced (op_check's ep_layout group: both paths, exactly)
    const bool vec = K == 8 && reinterpret_cast<uintptr_t>(topk_idx) % 16 == 0;
    const LayoutKernel k = P <= 2 ? rounds_kernel<2>(vec)
                           : P <= 4 ? rounds_kernel<4>(vec)
                                    : rounds_kernel<8>(vec);
    k<<<1, kLayoutThreads, 0, ctx.stream>>>(send_pos, send_cnt, send_picks, topk_idx, N, int(K),
                                            int(El), P, region);
    CUDA_CHECK_LAUNCH();
    return;
  }
  ep_layout_count_kernel<<<unsigned(P), kLayoutThreads, 0, ctx.stream>>>(
      send_pos, send_cnt, send_picks, topk_idx, N, int(K), int(El), P);
  CUDA_CHECK_LAUNCH();
  if (N == 0) return;
  ep_layout_place_kernel<<<grid_for(N * P, kScanThreads, ctx), kScanThreads, 0, ctx.stream>>>(
      send_pos, send_cnt, N, P, region);
  CUDA_CHECK_LAUNCH();
}

void ep_layout_all(int32_t* send_pos, int32_t* send_cnt, int32_t* send_picks,
                   const int32_t* topk_idx, int64_t N, int64_t K, int64_t El, int P,
                   const Ctx& ctx) {
  AM_CHECK(P >= 1 && P <= 32 && El >= 1 && K >= 1,
           "[ep_layout_all] needs 1 <= P <= 32 and El, K >= 1 (got {}, {}, {})", P, El, K);
  AM_CHECK(int64_t(P) * N < (int64_t(1) << 31),
           "[ep_layout_all] {} ranks x {} rows do not fit int32 row indices; use fewer tokens "
           "per micro-batch",
           P, N);
  ep_layout_all_kernel<<<1, kLayoutThreads, 0, ctx.stream>>>(send_pos, send_cnt, send_picks,
                                                             topk_idx, N, int(K), int(El), P);
  CUDA_CHECK_LAUNCH();
}

void ep_dispatch_pack(bf16* x_send, int32_t* idx_send, float* w_send, const bf16* x,
                      const int32_t* topk_idx, const float* topk_w, const int32_t* send_pos,
                      int64_t N, int64_t H, int64_t K, int64_t El, int P, const Ctx& ctx) {
  if (N == 0) return;
  AM_CHECK((idx_send == nullptr) == (w_send == nullptr),
           "[ep_dispatch_pack] idx_send and w_send go together (both or neither)");
  if (rows_16b(H, x_send, x))
    ep_dispatch_pack_kernel<uint4><<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
        reinterpret_cast<uint4*>(x_send), idx_send, w_send, reinterpret_cast<const uint4*>(x),
        topk_idx, topk_w, send_pos, H / 8, int(K), int(El), P);
  else
    ep_dispatch_pack_kernel<bf16><<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
        x_send, idx_send, w_send, x, topk_idx, topk_w, send_pos, H, int(K), int(El), P);
  CUDA_CHECK_LAUNCH();
}

void ep_combine_unpack(bf16* out, float* dw_out, const bf16* y_back, const float* dw_back,
                       const int32_t* send_pos, int64_t N, int64_t H, int64_t K, int P,
                       const Ctx& ctx) {
  if (N == 0) return;
  AM_CHECK(dw_out == nullptr || dw_back != nullptr,
           "[ep_combine_unpack] dw_out needs the returned dw rows (dw_back)");
  if (rows_16b(H, out, y_back))
    (P <= kEpPushMaxRanks ? ep_combine_unpack_vec_kernel<true> : ep_combine_unpack_vec_kernel<false>)
        <<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
            reinterpret_cast<uint4*>(out), dw_out, reinterpret_cast<const uint4*>(y_back), dw_back,
            send_pos, H / 8, int(K), P);
  else
    ep_combine_unpack_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
        out, dw_out, y_back, dw_back, send_pos, H, int(K), P);
  CUDA_CHECK_LAUNCH();
}

void ep_combine_unpack_sources(bf16* out, float* dw_out, const EpRowSources& y,
                               const EpRowSources* dw, const int32_t* send_pos, int64_t N,
                               int64_t H, int64_t K, int P, const Ctx& ctx) {
  if (N == 0) return;
  AM_CHECK((dw_out == nullptr) == (dw == nullptr),
           "[ep_combine_unpack_sources] dw_out and the returned dw rows (dw) go together");
  AM_CHECK(P >= 1 && P <= kEpPushMaxRanks, "[ep_combine_unpack_sources] {} ranks, at most {}", P,
           kEpPushMaxRanks);
  bool aligned = H % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int d = 0; d < P; ++d) aligned = aligned && reinterpret_cast<uintptr_t>(y.rows[d]) % 16 == 0;
  AM_CHECK(aligned, "[ep_combine_unpack_sources] hidden size {} (or a source) is not 16-byte "
           "aligned; use ep_combine_unpack over gathered rows", H);
  ep_combine_unpack_sources_kernel<<<unsigned(N), kRowThreads, 0, ctx.stream>>>(
      reinterpret_cast<uint4*>(out), dw_out, y, dw ? *dw : EpRowSources{}, send_pos, H / 8,
      int(K), P);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
