// backend/cuda/aux_loss.cu: the Switch-style load-balancing loss as HF's
// load_balancing_loss_func computes it, over the router outputs of every MoE layer
// concatenated along tokens. Deterministic: column sums in fixed order, integer counts.
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// counts[e] = number of (n, k) slots routed to e: one block, shared-memory integer atomics
// (order-free), then written out. `counts` is __shared__/global int[E] via dynamic smem.
__device__ void count_experts(int* cnt /*smem [E]*/, const int32_t* topk_idx, int64_t S, int E) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < S; i += blockDim.x) {
    const int e = topk_idx[i];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
}

// One block: aux = E / N^2 * sum_e count[e] * P[e], P[e] = sum_n probs[n,e] (from colsum).
__global__ void aux_fwd_kernel(float* aux, const float* P, const int32_t* topk_idx, int64_t N,
                               int E, int K) {
  extern __shared__ int cnt[];
  __shared__ double red[32];
  count_experts(cnt, topk_idx, N * K, E);
  double s = 0.0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s += double(cnt[e]) * double(P[e]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) aux[0] = float(s / double(N) / double(N) * double(E));
}

// One block: counts[e] to global memory for the gradient kernel.
__global__ void aux_count_kernel(int* counts, const int32_t* topk_idx, int64_t S, int E) {
  extern __shared__ int cnt[];
  count_experts(cnt, topk_idx, S, E);
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = cnt[e];
}

// Grid-stride over N*E: dprobs[n,e] = daux * E * (count[e] / N) / N.
__global__ void aux_bwd_kernel(float* dprobs, float daux, const int* counts, int64_t N, int E) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * E;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int e = int(i % E);
    dprobs[i] = float(double(daux) * E * (double(counts[e]) / double(N)) / double(N));
  }
}

}  // namespace

// P[E] (rounded up to 256 bytes), then the column-sum partials.
size_t aux_loss_workspace_bytes(int64_t N, int64_t E) {
  return round_up(size_t(E) * sizeof(float)) + colsum_workspace_bytes(N, E);
}

void aux_loss_fwd(float* aux, const float* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                  int64_t K, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= 8192, "[aux_loss_fwd] {} experts: supported 1..8192", E);
  if (N == 0) {
    CUDA_CHECK(cudaMemsetAsync(aux, 0, sizeof(float), ctx.stream));
    return;
  }
  char* ws = static_cast<char*>(workspace_for(ctx, aux_loss_workspace_bytes(N, E), "aux_loss_fwd"));
  float* P = reinterpret_cast<float*>(ws);
  Ctx rest = ctx;  // the column sums use the workspace after P
  rest.workspace = ws + round_up(size_t(E) * sizeof(float));
  rest.workspace_bytes = ctx.workspace_bytes - round_up(size_t(E) * sizeof(float));
  CUDA_CHECK(cudaMemsetAsync(P, 0, size_t(E) * sizeof(float), ctx.stream));
  colsum_accumulate(P, probs, N, E, rest, "aux_loss_fwd");
  aux_fwd_kernel<<<1, kThreads, size_t(E) * sizeof(int), ctx.stream>>>(aux, P, topk_idx, N,
                                                                       int(E), int(K));
  CUDA_CHECK_LAUNCH();
}

void aux_loss_bwd(float* dprobs, float daux, const int32_t* topk_idx, int64_t N, int64_t E,
                  int64_t K, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= 8192, "[aux_loss_bwd] {} experts: supported 1..8192", E);
  if (N == 0) return;
  int* counts = static_cast<int*>(
      workspace_for(ctx, aux_loss_workspace_bytes(N, E), "aux_loss_bwd"));  // [E]
  aux_count_kernel<<<1, kThreads, size_t(E) * sizeof(int), ctx.stream>>>(counts, topk_idx, N * K,
                                                                         int(E));
  CUDA_CHECK_LAUNCH();
  aux_bwd_kernel<<<grid_for(N * E, kThreads, ctx), kThreads, 0, ctx.stream>>>(dprobs, daux,
                                                                             counts, N, int(E));
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
