// backend/cuda/qk_norm_rope.cu: the per-head q/k RMSNorm and RoPE in one pass, forward and
// backward.
// Forward: out[n,h,:] = rope(bf16((x[n,h,:] * rstd) * w), pos[n]), the same bits as rmsnorm_fwd()
// on N*H rows of D then rope_fwd() (the normed value is rounded to bf16 before the rotation, as
// the two-op path stores it): one read and one write of the head instead of two each.
// Backward: dx = rmsnorm_bwd(rope_bwd(dout)) and dw += the norm weight's gradient, with the
// rotated gradient kept in fp32 between the two (the op pair rounds it to bf16): one read of
// dout and x instead of rope_bwd's read and write plus the norm's reads.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;  // (token, head) rows per block of the general kernel

// The general forward (any even D): one warp per (token, head) row; the sum of squares with
// rmsnorm_fwd_kernel's mapping (lane handles c = lane, lane+32, ...); then lane rotates the
// pairs (i, i + D/2), i = lane, lane+32.. with rope's fp32 angle arithmetic.
__global__ void qk_norm_rope_fwd_kernel(bf16* out, float* rstd, const bf16* x, const bf16* w,
                                        const int32_t* pos, int64_t N, int64_t H, int64_t D,
                                        float eps, float theta) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N * H) return;
  const int64_t n = row / H, h2 = D / 2;
  const bf16* xr = x + row * D;
  float ss = 0.f;
  for (int64_t c = lane; c < D; c += 32) {
    const float v = to_f(xr[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  if (lane == 0) rstd[row] = r;
  const float p = float(pos[n]);
  bf16* o = out + row * D;
  for (int64_t i = lane; i < h2; i += 32) {
    const float a = to_f(to_bf((to_f(xr[i]) * r) * to_f(w[i])));
    const float b = to_f(to_bf((to_f(xr[i + h2]) * r) * to_f(w[i + h2])));
    const float inv_freq = 1.0f / powf(theta, float(2 * i) / float(D));
    float s, c;
    sincosf(p * inv_freq, &s, &c);
    o[i] = to_bf(rot_lo(a, b, c, s));
    o[i + h2] = to_bf(rot_hi(a, b, c, s));
  }
}

// ---- per-token kernels: D = 64 * PPL (PPL = rotation pairs per lane: D 64, 128, 256) ----------
// A block takes `tpb` consecutive tokens: its threads first compute each (token, pair) angle's
// cos and sin once into shared memory (rope's fp32 arithmetic: the same bits as computing them
// per head), then each warp takes (token, head) rows. Lane owns the columns lane + 32 j,
// j < 2 PPL: the pairs (i, i + D/2) with i = lane + 32 p sit in the same lane, and the sum of
// squares runs in rmsnorm_fwd_kernel's order.
constexpr int kTokWarps = 8;
constexpr int kMaxTokensPerBlock = 16;

bool tok_ok(int64_t D) { return D == 64 || D == 128 || D == 256; }
int64_t tokens_per_block(int64_t H) {
  return std::clamp<int64_t>(64 / std::max<int64_t>(H, 1), 1, kMaxTokensPerBlock);
}

// cs[t * h2 + i] = (cos, sin) of pos[t0 + t] * inv_freq(i) for the block's nt tokens.
__device__ __forceinline__ void token_angles(float2* cs, const int32_t* pos, int64_t t0, int nt,
                                             int h2, int D, float theta) {
  for (int idx = threadIdx.x; idx < nt * h2; idx += blockDim.x) {
    const int t = idx / h2, i = idx % h2;
    const float inv_freq = 1.0f / powf(theta, float(2 * i) / float(D));
    float s, c;
    sincosf(float(pos[t0 + t]) * inv_freq, &s, &c);
    cs[idx] = make_float2(c, s);
  }
  __syncthreads();
}

template <int PPL>
__global__ void __launch_bounds__(kTokWarps * 32)
    qk_norm_rope_fwd_tok_kernel(bf16* __restrict__ out, float* __restrict__ rstd,
                                const bf16* __restrict__ x, const bf16* __restrict__ w,
                                const int32_t* __restrict__ pos, int64_t N, int64_t H, float eps,
                                float theta, int tpb) {
  constexpr int h2 = 32 * PPL, D = 64 * PPL, J = 2 * PPL;
  __shared__ float2 cs[kMaxTokensPerBlock * h2];
  const int64_t t0 = int64_t(blockIdx.x) * tpb;
  const int nt = int(t0 + tpb <= N ? tpb : N - t0);
  token_angles(cs, pos, t0, nt, h2, D, theta);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t rr = warp; rr < int64_t(nt) * H; rr += kTokWarps) {
    const int t = int(rr / H);
    const int64_t row = (t0 + t) * H + rr % H;
    const bf16* xr = x + row * D;
    float xv[J];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      xv[j] = to_f(xr[lane + 32 * j]);
      ss += xv[j] * xv[j];
    }
    ss = warp_sum(ss);
    const float r = 1.0f / sqrtf(ss / float(D) + eps);
    if (lane == 0) rstd[row] = r;
    bf16* o = out + row * D;
#pragma unroll
    for (int p = 0; p < PPL; ++p) {
      const int i = lane + 32 * p;
      const float a = to_f(to_bf((xv[p] * r) * to_f(w[i])));
      const float b = to_f(to_bf((xv[p + PPL] * r) * to_f(w[i + h2])));
      const float2 c = cs[t * h2 + i];
      o[i] = to_bf(rot_lo(a, b, c.x, c.y));
      o[i + h2] = to_bf(rot_hi(a, b, c.x, c.y));
    }
  }
}

// Backward, for any even D <= 256 (PPL = ceil(D / 64) pairs per lane at most; with D < 64 * PPL
// the lanes whose pair i = lane + 32 p is >= D/2 sit out): g = rope_bwd(dout) in fp32 (rotation
// by -angle), then the RMSNorm backward on the row: dx = r * w * g - x * r^3 / D * sum(w g x);
// the weight's column sums of g * x * r per lane in registers, added over the block's warps in
// warp order into one partial row per block (colsum_finish adds the blocks in order). Every lane
// reads its columns of dout before it writes them, so dx == dout is safe.
constexpr int kMaxBwdD = 256;

template <int PPL>
__global__ void __launch_bounds__(kTokWarps * 32)
    qk_norm_rope_bwd_tok_kernel(bf16* dx, float* __restrict__ part, const bf16* dout,
                                const bf16* __restrict__ x, const bf16* __restrict__ w,
                                const float* __restrict__ rstd, const int32_t* __restrict__ pos,
                                int64_t N, int64_t H, int D, float theta, int tpb) {
  const int h2 = D / 2;
  __shared__ float2 cs[kMaxTokensPerBlock * kMaxBwdD / 2];
  __shared__ float red[kMaxBwdD];
  const int64_t t0 = int64_t(blockIdx.x) * tpb;
  const int nt = int(t0 + tpb <= N ? tpb : N - t0);
  token_angles(cs, pos, t0, nt, h2, D, theta);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // lane's columns: col[p] = lane + 32 p and col[p] + h2, for the pairs it has
  bool on[PPL];
#pragma unroll
  for (int p = 0; p < PPL; ++p) on[p] = lane + 32 * p < h2;
  float acc[2 * PPL];
#pragma unroll
  for (int j = 0; j < 2 * PPL; ++j) acc[j] = 0.f;
  for (int64_t rr = warp; rr < int64_t(nt) * H; rr += kTokWarps) {
    const int t = int(rr / H);
    const int64_t row = (t0 + t) * H + rr % H;
    const bf16* gr = dout + row * D;
    const bf16* xr = x + row * D;
    float g[2 * PPL], xv[2 * PPL], wv[2 * PPL];
#pragma unroll
    for (int p = 0; p < PPL; ++p) {
      const int i = lane + 32 * p;
      g[p] = on[p] ? to_f(gr[i]) : 0.f;
      g[p + PPL] = on[p] ? to_f(gr[i + h2]) : 0.f;
      xv[p] = on[p] ? to_f(xr[i]) : 0.f;
      xv[p + PPL] = on[p] ? to_f(xr[i + h2]) : 0.f;
      wv[p] = on[p] ? to_f(w[i]) : 0.f;
      wv[p + PPL] = on[p] ? to_f(w[i + h2]) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < PPL; ++p) {  // the transpose of the rotation: sin negated
      if (!on[p]) continue;
      const float2 c = cs[t * h2 + lane + 32 * p];
      const float a = g[p], b = g[p + PPL], s = -c.y;
      g[p] = a * c.x - b * s;
      g[p + PPL] = b * c.x + a * s;
    }
    const float r = rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < 2 * PPL; ++j) {
      dot += g[j] * wv[j] * xv[j];
      acc[j] += g[j] * xv[j] * r;
    }
    dot = warp_sum(dot);
    const float k = dot * r * r * r / float(D);
    bf16* dr = dx + row * D;
#pragma unroll
    for (int p = 0; p < PPL; ++p) {
      if (!on[p]) continue;
      const int i = lane + 32 * p;
      dr[i] = to_bf(r * wv[p] * g[p] - xv[p] * k);
      dr[i + h2] = to_bf(r * wv[p + PPL] * g[p + PPL] - xv[p + PPL] * k);
    }
  }
  for (int ww = 0; ww < kTokWarps; ++ww) {
    if (warp == ww)
#pragma unroll
      for (int p = 0; p < PPL; ++p) {
        if (!on[p]) continue;
        const int i = lane + 32 * p;
        red[i] = ww == 0 ? acc[p] : red[i] + acc[p];
        red[i + h2] = ww == 0 ? acc[p + PPL] : red[i + h2] + acc[p + PPL];
      }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < D; c += kTokWarps * 32) part[int64_t(blockIdx.x) * D + c] = red[c];
}

int64_t tok_blocks(int64_t N, int64_t H) {
  const int64_t tpb = tokens_per_block(H);
  return (N + tpb - 1) / tpb;
}

}  // namespace

void qk_norm_rope_fwd(bf16* out, float* rstd, const bf16* x, const bf16* w, const int32_t* pos,
                      int64_t N, int64_t H, int64_t D, float eps, float theta, const Ctx& ctx) {
  AM_CHECK(D % 2 == 0, "[qk_norm_rope_fwd] head dim must be even for the half rotation, got {}",
           D);
  AM_CHECK(static_cast<const void*>(out) != static_cast<const void*>(x),
           "[qk_norm_rope_fwd] out must not alias x (lanes read pairs other lanes write)");
  if (N == 0 || H == 0) return;
  if (tok_ok(D)) {
    const int tpb = int(tokens_per_block(H));
    const unsigned blocks = unsigned(tok_blocks(N, H));
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kTokWarps * 32, 0, ctx.stream>>>(out, rstd, x, w, pos, N, H, eps, theta,
                                                          tpb);
    };
    if (D == 64) launch(qk_norm_rope_fwd_tok_kernel<1>);
    else if (D == 128) launch(qk_norm_rope_fwd_tok_kernel<2>);
    else launch(qk_norm_rope_fwd_tok_kernel<4>);  // tok_ok: D is 256
    CUDA_CHECK_LAUNCH();
    return;
  }
  const int64_t rows = N * H;
  qk_norm_rope_fwd_kernel<<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0,
                            ctx.stream>>>(out, rstd, x, w, pos, N, H, D, eps, theta);
  CUDA_CHECK_LAUNCH();
}

bool qk_norm_rope_bwd_fused(int64_t D) { return D > 0 && D % 2 == 0 && D <= kMaxBwdD; }

size_t qk_norm_rope_bwd_workspace_bytes(int64_t N, int64_t H, int64_t D) {
  return qk_norm_rope_bwd_fused(D) ? size_t(tok_blocks(N, H) * D) * sizeof(float) : 0;
}

void qk_norm_rope_bwd(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w,
                      const float* rstd, const int32_t* pos, int64_t N, int64_t H, int64_t D,
                      float theta, const Ctx& ctx) {
  AM_CHECK(qk_norm_rope_bwd_fused(D),
           "[qk_norm_rope_bwd] head dim {}: the fused backward takes an even D <= {}; run "
           "rope_bwd then rmsnorm_bwd (qk_norm_rope_bwd_fused() says which)",
           D, kMaxBwdD);
  AM_CHECK(static_cast<const void*>(dx) != static_cast<const void*>(x),
           "[qk_norm_rope_bwd] dx must not alias x");
  if (N == 0 || H == 0) return;
  const int tpb = int(tokens_per_block(H));
  const int64_t blocks = tok_blocks(N, H);
  float* part = static_cast<float*>(workspace_for(
      ctx, qk_norm_rope_bwd_workspace_bytes(N, H, D), "qk_norm_rope_bwd"));
  const int ppl = int((D + 63) / 64);
  auto launch = [&](auto kernel) {
    kernel<<<unsigned(blocks), kTokWarps * 32, 0, ctx.stream>>>(dx, part, dout, x, w, rstd, pos,
                                                                 N, H, int(D), theta, tpb);
  };
  if (ppl == 1) launch(qk_norm_rope_bwd_tok_kernel<1>);
  else if (ppl == 2) launch(qk_norm_rope_bwd_tok_kernel<2>);
  else launch(qk_norm_rope_bwd_tok_kernel<4>);  // D <= 256: pairs past D/2 sit out
  CUDA_CHECK_LAUNCH();
  colsum_finish(dw, part, blocks, D, ctx);
}

}  // namespace automoe::cuda
