// backend/cuda/rmsnorm.cu: RMSNorm over the last dim, bf16 in/out, fp32 statistics. Also the
// per-head q/k norm (N = tokens*heads, C = head dim), and add_rmsnorm_fwd (the residual add
// fused with the norm that follows it). HF order: (x * rstd) then * w.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;  // rows per block

// Thread mapping: one warp per row (row = blockIdx.x * 4 + warp); lane handles the columns
// c = lane, lane+32, ...; the sum of squares is a warp reduction. kAdd (add_rmsnorm_fwd): the row
// is first x + b, rounded to bf16 and stored to `sum` (the residual stream), then normed: the
// same code, so the same bits as add() followed by rmsnorm_fwd().
template <bool kAdd>
__global__ void rmsnorm_fwd_kernel(bf16* out, float* rstd, bf16* sum, const bf16* x,
                                   const bf16* b, const bf16* w, int64_t N, int64_t C,
                                   float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16* xr = x + n * C;
  if constexpr (kAdd) {
    const bf16* br = b + n * C;
    bf16* sr = sum + n * C;
    for (int64_t c = lane; c < C; c += 32) sr[c] = to_bf(to_f(xr[c]) + to_f(br[c]));
    xr = sr;  // the lane reads back only what it wrote
  }
  float ss = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    float v = to_f(xr[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(C) + eps);
  if (lane == 0) rstd[n] = r;
  bf16* o = out + n * C;
  for (int64_t c = lane; c < C; c += 32) o[c] = to_bf((to_f(xr[c]) * r) * to_f(w[c]));
}

// The 16-byte forward, for hidden sizes C = 256 * NV (NV 2..16: C 512..4096) with 16-byte
// aligned rows: one warp per row as above, lane owning the 8-column vectors j * 32 + lane (kept
// packed in registers between the sum of squares and the output). The same arithmetic per
// element; the sum of squares adds in another order than the general kernel, so a C takes
// one kernel or the other for every call (rmsnorm_fwd and add_rmsnorm_fwd alike: their bits
// still match each other). Head dims (C <= 256) stay on the general kernel, whose order
// qk_norm_rope_fwd repeats.
template <bool kAdd, int NV>
__global__ void __launch_bounds__(kWarps * 32)
    rmsnorm_fwd_vec_kernel(bf16* __restrict__ out, float* __restrict__ rstd, bf16* sum,
                           const bf16* x, const bf16* __restrict__ b, const bf16* __restrict__ w,
                           int64_t N, float eps) {
  constexpr int C = 256 * NV;
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  uint4 xv[NV];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int64_t off = n * C + int64_t(j * 32 + lane) * 8;
    if constexpr (kAdd) {
      float a[8], bb[8];
      load8(x + off, a);
      load8(b + off, bb);
#pragma unroll
      for (int t = 0; t < 8; ++t) a[t] += bb[t];
      xv[j] = pack8(a);  // the residual stream, rounded to bf16 once
      *reinterpret_cast<uint4*>(sum + off) = xv[j];
    } else {
      xv[j] = *reinterpret_cast<const uint4*>(x + off);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    float v[8];
    unpack8(xv[j], v);
#pragma unroll
    for (int t = 0; t < 8; ++t) ss += v[t] * v[t];
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(C) + eps);
  if (lane == 0) rstd[n] = r;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int c = (j * 32 + lane) * 8;
    float v[8], wf[8];
    unpack8(xv[j], v);
    load8(w + c, wf);
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = (v[t] * r) * wf[t];
    *reinterpret_cast<uint4*>(out + n * C + c) = pack8(v);
  }
}

// Which forward kernel a C takes (the same for every call at that C; see above).
bool fwd_vec_ok(int64_t C) {
  return C == 512 || C == 1024 || C == 2048 || C == 4096;
}

template <bool kAdd>
void launch_fwd(bf16* out, float* rstd, bf16* sum, const bf16* x, const bf16* b, const bf16* w,
                int64_t N, int64_t C, float eps, const Ctx& ctx) {
  const unsigned blocks = unsigned((N + kWarps - 1) / kWarps);
  if (fwd_vec_ok(C)) {
    const void* ptrs[] = {out, sum, x, b, w};
    for (const void* p : ptrs)
      AM_CHECK(p == nullptr || aligned_16b(p),
               "[rmsnorm_fwd] C = {} takes the 16-byte kernel: its buffers must be 16-byte "
               "aligned (got {})",
               C, p);
    auto go = [&](auto kernel) {
      kernel<<<blocks, kWarps * 32, 0, ctx.stream>>>(out, rstd, sum, x, b, w, N, eps);
    };
    if (C == 512) go(rmsnorm_fwd_vec_kernel<kAdd, 2>);
    else if (C == 1024) go(rmsnorm_fwd_vec_kernel<kAdd, 4>);
    else if (C == 2048) go(rmsnorm_fwd_vec_kernel<kAdd, 8>);
    else go(rmsnorm_fwd_vec_kernel<kAdd, 16>);
  } else {
    rmsnorm_fwd_kernel<kAdd><<<blocks, kWarps * 32, 0, ctx.stream>>>(out, rstd, sum, x, b, w, N,
                                                                     C, eps);
  }
  CUDA_CHECK_LAUNCH();
}

// dx = r * w * g - x * r^3 / C * sum(w * g * x) (+ dx when dx_beta = 1). Same mapping as the
// forward. The general path: any C, any alignment; the weight's column sums come after it
// (colsum_accumulate, a second read of dout and x).
__global__ void rmsnorm_bwd_dx_kernel(bf16* dx, float dx_beta, const bf16* dout, const bf16* x,
                                      const bf16* w, const float* rstd, int64_t N, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16* xr = x + n * C;
  const bf16* g = dout + n * C;
  float dot = 0.f;
  for (int64_t c = lane; c < C; c += 32) dot += to_f(g[c]) * to_f(w[c]) * to_f(xr[c]);
  dot = warp_sum(dot);
  const float r = rstd[n];
  const float k = dot * r * r * r / float(C);
  bf16* d = dx + n * C;
  for (int64_t c = lane; c < C; c += 32) {
    float v = r * to_f(w[c]) * to_f(g[c]) - to_f(xr[c]) * k;
    if (dx_beta != 0.f) v += to_f(d[c]);
    d[c] = to_bf(v);
  }
}

// ---- the fused backward: dx and the weight's column sums in one read of dout and x ----------
// For C = 32 * CPL, CPL in {4, 8, 16, 32, 64} (head dims 128..256, hidden sizes up to 2048),
// rows aligned for 8-byte (CPL 4) or 16-byte accesses. One warp per row; lane owns the columns
// (j * 32 + lane) * V + t of its NV vectors of V; a block of W warps walks a chunk of rows,
// each warp summing dout * x * rstd over its rows for its lanes' columns: in registers for
// CPL <= 32, in the warp's own row of shared memory for CPL 64 (64 sums per lane beside the row
// would spill). The block adds its warps in warp order and writes one partial row;
// colsum_finish adds the chunks in order (deterministic, no atomics).
constexpr int64_t kBwdRowsPerChunk = 32;
constexpr int64_t kBwdPartFloats = 512 * 1024;  // partial sums: at most 2 MiB

bool fused_bwd_ok(int64_t C) {
  return C % 32 == 0 && (C / 32 == 4 || C / 32 == 8 || C / 32 == 16 || C / 32 == 32 ||
                         C / 32 == 64);
}
int64_t fused_bwd_chunks(int64_t N, int64_t C) {
  const int64_t cap = std::max<int64_t>(1, kBwdPartFloats / C);
  return std::clamp<int64_t>((N + kBwdRowsPerChunk - 1) / kBwdRowsPerChunk, 1, cap);
}

template <int V>
struct alignas(2 * V) BfVec {
  bf16 v[V];
};

template <int CPL>
struct BwdShape {
  static constexpr int V = CPL >= 8 ? 8 : 4, NV = CPL / V, C = 32 * CPL;
  static constexpr bool kSmemAcc = CPL > 32;
  static constexpr int W = kSmemAcc ? 4 : 8;  // warps per block; CPL 64: 4 x 8 KiB of sums
};

template <int CPL>
__global__ void __launch_bounds__(BwdShape<CPL>::W * 32)
    rmsnorm_bwd_fused_kernel(bf16* __restrict__ dx, float dx_beta, float* __restrict__ part,
                             const bf16* __restrict__ dout, const bf16* __restrict__ x,
                             const bf16* __restrict__ w, const float* __restrict__ rstd,
                             int64_t N, int64_t rows_per_chunk) {
  using S = BwdShape<CPL>;
  constexpr int V = S::V, NV = S::NV, C = S::C, W = S::W;
  using Vec = BfVec<V>;
  __shared__ __align__(16) float red[S::kSmemAcc ? W * C : C];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float acc[S::kSmemAcc ? 1 : CPL];
  float* mine = red + (S::kSmemAcc ? warp * C : 0);  // kSmemAcc: this warp's sums
  if constexpr (S::kSmemAcc) {
    for (int c = lane; c < C; c += 32) mine[c] = 0.f;  // a warp touches only its own row
  } else {
#pragma unroll
    for (int i = 0; i < CPL; ++i) acc[i] = 0.f;
  }
  const int64_t n0 = int64_t(blockIdx.x) * rows_per_chunk;
  const int64_t n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
  for (int64_t n = n0 + warp; n < n1; n += W) {
    Vec g[NV], xv[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t c = int64_t(j * 32 + lane) * V;
      g[j] = *reinterpret_cast<const Vec*>(dout + n * C + c);
      xv[j] = *reinterpret_cast<const Vec*>(x + n * C + c);
    }
    const float r = rstd[n];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c0 = (j * 32 + lane) * V;
      const Vec wv = *reinterpret_cast<const Vec*>(w + c0);
      float s[V];
#pragma unroll
      for (int t = 0; t < V; ++t) {
        const float gf = to_f(g[j].v[t]), xf = to_f(xv[j].v[t]);
        dot += gf * to_f(wv.v[t]) * xf;
        s[t] = gf * xf * r;
      }
      if constexpr (S::kSmemAcc) {
#pragma unroll
        for (int t = 0; t < V; t += 4) {
          float4* q = reinterpret_cast<float4*>(mine + c0 + t);
          float4 m = *q;
          m.x += s[t];
          m.y += s[t + 1];
          m.z += s[t + 2];
          m.w += s[t + 3];
          *q = m;
        }
      } else {
#pragma unroll
        for (int t = 0; t < V; ++t) acc[j * V + t] += s[t];
      }
    }
    dot = warp_sum(dot);
    const float k = dot * r * r * r / float(C);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t c = int64_t(j * 32 + lane) * V;
      const Vec wv = *reinterpret_cast<const Vec*>(w + c);
      Vec* dp = reinterpret_cast<Vec*>(dx + n * C + c);
      Vec old;
      if (dx_beta != 0.f) old = *dp;
      Vec o;
#pragma unroll
      for (int t = 0; t < V; ++t) {
        float v = r * to_f(wv.v[t]) * to_f(g[j].v[t]) - to_f(xv[j].v[t]) * k;
        if (dx_beta != 0.f) v += to_f(old.v[t]);
        o.v[t] = to_bf(v);
      }
      *dp = o;
    }
  }
  // the block's partial row: its warps' sums added in warp order
  if constexpr (S::kSmemAcc) {
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += W * 32) {
      float t = red[c];
      for (int ww = 1; ww < W; ++ww) t += red[ww * C + c];
      part[int64_t(blockIdx.x) * C + c] = t;
    }
  } else {
    for (int ww = 0; ww < W; ++ww) {
      if (warp == ww) {
#pragma unroll
        for (int j = 0; j < NV; ++j)
#pragma unroll
          for (int t = 0; t < V; ++t) {
            const int c = (j * 32 + lane) * V + t;
            red[c] = ww == 0 ? acc[j * V + t] : red[c] + acc[j * V + t];
          }
      }
      __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += W * 32) part[int64_t(blockIdx.x) * C + c] = red[c];
  }
}

}  // namespace

void rmsnorm_fwd(bf16* out, float* rstd, const bf16* x, const bf16* w, int64_t N, int64_t C,
                 float eps, const Ctx& ctx) {
  if (N == 0) return;
  launch_fwd<false>(out, rstd, nullptr, x, nullptr, w, N, C, eps, ctx);
}

void add_rmsnorm_fwd(bf16* sum, bf16* out, float* rstd, const bf16* a, const bf16* b,
                     const bf16* w, int64_t N, int64_t C, float eps, const Ctx& ctx) {
  if (N == 0) return;
  launch_fwd<true>(out, rstd, sum, a, b, w, N, C, eps, ctx);
}

size_t rmsnorm_bwd_workspace_bytes(int64_t N, int64_t C) {
  size_t n = colsum_workspace_bytes(N, C);
  if (fused_bwd_ok(C)) n = std::max(n, size_t(fused_bwd_chunks(N, C) * C) * sizeof(float));
  return n;
}

void rmsnorm_bwd(bf16* dx, float dx_beta, float* dw, const bf16* dout, const bf16* x,
                 const bf16* w, const float* rstd, int64_t N, int64_t C, const Ctx& ctx) {
  AM_CHECK(dx_beta == 0.f || dx_beta == 1.f, "[rmsnorm_bwd] dx_beta is 0 or 1, got {}", dx_beta);
  if (N == 0) return;
  const size_t vec_bytes = C / 32 >= 8 ? 16 : 8;
  bool fused = fused_bwd_ok(C);
  for (const void* p : {static_cast<const void*>(dx), static_cast<const void*>(dout),
                        static_cast<const void*>(x), static_cast<const void*>(w)})
    fused = fused && reinterpret_cast<uintptr_t>(p) % vec_bytes == 0;
  if (fused) {
    const int64_t chunks = fused_bwd_chunks(N, C);
    float* part = static_cast<float*>(
        workspace_for(ctx, size_t(chunks * C) * sizeof(float), "rmsnorm_bwd"));
    auto launch = [&](auto kernel, int warps) {
      kernel<<<unsigned(chunks), warps * 32, 0, ctx.stream>>>(dx, dx_beta, part, dout, x, w, rstd,
                                                               N, (N + chunks - 1) / chunks);
      CUDA_CHECK_LAUNCH();
    };
    const int cpl = int(C / 32);  // fused_bwd_ok: 4, 8, 16, 32 or 64
    if (cpl == 4) launch(rmsnorm_bwd_fused_kernel<4>, BwdShape<4>::W);
    else if (cpl == 8) launch(rmsnorm_bwd_fused_kernel<8>, BwdShape<8>::W);
    else if (cpl == 16) launch(rmsnorm_bwd_fused_kernel<16>, BwdShape<16>::W);
    else if (cpl == 32) launch(rmsnorm_bwd_fused_kernel<32>, BwdShape<32>::W);
    else launch(rmsnorm_bwd_fused_kernel<64>, BwdShape<64>::W);
    colsum_finish(dw, part, chunks, C, ctx);  // dw[c] += the chunks' sums, in chunk order
    return;
  }
  rmsnorm_bwd_dx_kernel<<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0, ctx.stream>>>(
      dx, dx_beta, dout, x, w, rstd, N, C);
  CUDA_CHECK_LAUNCH();
  // dw[c] += sum_n dout[n,c] * x[n,c] * rstd[n]
  colsum_accumulate(dw, dout, x, rstd, N, C, ctx, "rmsnorm_bwd");
}

}  // namespace automoe::cuda
