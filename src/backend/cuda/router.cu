// backend/cuda/router.cu: MoE router: softmax over experts (fp32) + top-k + optional renorm in
// one kernel per token, and its backward. bf16 logits in, fp32 probabilities and weights out.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kWarps = 4;  // tokens per block

struct Pick {
  float p;
  int e;  // -1: no candidate
};
// a ranks before b: larger probability, ties to the lower expert index (as torch.topk).
__device__ __forceinline__ bool ranks_before(Pick a, Pick b) {
  return a.e >= 0 && (b.e < 0 || a.p > b.p || (a.p == b.p && a.e < b.e));
}

// Thread mapping: one warp per token (n = blockIdx.x*4 + warp), lanes stride the experts.
// Top-k as k passes of a warp arg-max over the experts ranking after the previous pick, so no
// "taken" set is needed.
__global__ void router_fwd_kernel(float* probs, int32_t* topk_idx, float* topk_w,
                                  const bf16* logits, int64_t N, int E, int K, bool norm_topk) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const bf16* l = logits + n * E;
  float* p = probs + n * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, to_f(l[e]));
  mx = warp_max(mx);
  float sum = 0.f;
  for (int e = lane; e < E; e += 32) {
    const float ex = expf(to_f(l[e]) - mx);
    p[e] = ex;
    sum += ex;
  }
  sum = warp_sum(sum);
  for (int e = lane; e < E; e += 32) p[e] = p[e] / sum;  // each lane rereads its own writes

  Pick prev{0.f, -1};
  float wsum = 0.f;
  for (int j = 0; j < K; ++j) {
    Pick best{0.f, -1};
    for (int e = lane; e < E; e += 32) {
      const Pick c{p[e], e};
      if ((prev.e < 0 || ranks_before(prev, c)) && ranks_before(c, best)) best = c;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const Pick other{__shfl_xor_sync(kFullMask, best.p, o),
                       __shfl_xor_sync(kFullMask, best.e, o)};
      if (ranks_before(other, best)) best = other;
    }
    prev = best;
    wsum += best.p;
    if (lane == 0) {
      topk_idx[n * K + j] = best.e;
      topk_w[n * K + j] = best.p;
    }
  }
  if (norm_topk && lane == 0)
    for (int j = 0; j < K; ++j) topk_w[n * K + j] /= wsum;
}

// Same mapping. dp_e = extra_e + the top-k terms; dlogit_e = p_e (dp_e - sum_e' p_e' dp_e').
// dp is recomputed in the second pass instead of stored (bf16 output, no fp32 scratch).
__global__ void router_bwd_kernel(bf16* dlogits, const float* dtopk_w, const float* dprobs_extra,
                                  const float* probs, const int32_t* topk_idx, int64_t N, int E,
                                  int K, bool norm_topk) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const float* p = probs + n * E;
  const int32_t* idx = topk_idx + n * K;
  const float* gw = dtopk_w + n * K;
  // renorm: w_j = p_j / S: dp_j = (gw_j - sum_i gw_i w_i) / S
  float S = 1.f, gww = 0.f;
  if (norm_topk) {
    S = 0.f;
    for (int j = 0; j < K; ++j) S += p[idx[j]];
    for (int j = 0; j < K; ++j) gww += gw[j] * p[idx[j]] / S;
  }
  auto dp_of = [&](int e) {
    float d = dprobs_extra ? dprobs_extra[n * E + e] : 0.f;
    for (int j = 0; j < K; ++j)
      if (idx[j] == e) d += norm_topk ? (gw[j] - gww) / S : gw[j];
    return d;
  };
  float dot = 0.f;
  for (int e = lane; e < E; e += 32) dot += p[e] * dp_of(e);
  dot = warp_sum(dot);
  for (int e = lane; e < E; e += 32) dlogits[n * E + e] = to_bf(p[e] * (dp_of(e) - dot));
}

}  // namespace

void router_fwd(float* probs, int32_t* topk_idx, float* topk_w, const bf16* logits, int64_t N,
                int64_t E, int64_t K, bool norm_topk, const Ctx& ctx) {
  AM_CHECK(K >= 1 && K <= E, "[router_fwd] top-k {} must be in 1..{} (experts)", K, E);
  if (N == 0) return;
  router_fwd_kernel<<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0, ctx.stream>>>(
      probs, topk_idx, topk_w, logits, N, int(E), int(K), norm_topk);
  CUDA_CHECK_LAUNCH();
}

void router_bwd(bf16* dlogits, const float* dtopk_w, const float* dprobs_extra,
                const float* probs, const int32_t* topk_idx, int64_t N, int64_t E, int64_t K,
                bool norm_topk, const Ctx& ctx) {
  AM_CHECK(K >= 1 && K <= E, "[router_bwd] top-k {} must be in 1..{} (experts)", K, E);
  if (N == 0) return;
  router_bwd_kernel<<<unsigned((N + kWarps - 1) / kWarps), kWarps * 32, 0, ctx.stream>>>(
      dlogits, dtopk_w, dprobs_extra, probs, topk_idx, N, int(E), int(K), norm_topk);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
