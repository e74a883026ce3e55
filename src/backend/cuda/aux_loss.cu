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

// counts[e] (+=, zeroed by the caller) = number of (n, k) slots routed to e: blocks over the
// slots, shared-memory integer atomics, then one global integer atomic per (block, expert);
// integer sums, so the result does not depend on the order.
__global__ void count_experts_kernel(int* counts, const int32_t* topk_idx, int64_t S, int E) {
  extern __shared__ int cnt[];  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < S;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int e = topk_idx[i];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (cnt[e]) atomicAdd(&counts[e], cnt[e]);
}

// One block: aux = E / N^2 * sum_e count[e] * P[e], P[e] = sum_n probs[n,e] (from colsum).
__global__ void aux_fwd_kernel(float* aux, const float* P, const int* counts, int64_t N, int E) {
  __shared__ double red[32];
  double s = 0.0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s += double(counts[e]) * double(P[e]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) aux[0] = float(s / double(N) / double(N) * double(E));
}

// Grid-stride over N*E: dprobs[n,e] = daux * E * (count[e] / N) / N.
__global__ void aux_bwd_kernel(float* dprobs, float daux, const int* counts, int64_t N, int E) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * E;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int e = int(i % E);
    dprobs[i] = float(double(daux) * E * (double(counts[e]) / double(N)) / double(N));
  }
}

// counts[E] (=) over the S slots.
void count_experts(int* counts, const int32_t* topk_idx, int64_t S, int E, const Ctx& ctx) {
  CUDA_CHECK(cudaMemsetAsync(counts, 0, size_t(E) * sizeof(int), ctx.stream));
  if (S == 0) return;
  const unsigned blocks = std::min<unsigned>(grid_for(S, kThreads, ctx), unsigned((S + 4095) / 4096));
  count_experts_kernel<<<std::max(blocks, 1u), kThreads, size_t(E) * sizeof(int), ctx.stream>>>(
      counts, topk_idx, S, E);
  CUDA_CHECK_LAUNCH();
}

// The statistics both losses start from, in the workspace (aux_loss_workspace_bytes): counts[E]
// (picks per expert), then P[E] = sum_n probs[n,e], then the column sums' partials.
struct CountsP {
  int* counts;
  float* P;
};
CountsP counts_and_probsum(const float* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                           int64_t K, const Ctx& ctx, const char* op) {
  char* ws = static_cast<char*>(workspace_for(ctx, aux_loss_workspace_bytes(N, E), op));
  CountsP c{reinterpret_cast<int*>(ws),
            reinterpret_cast<float*>(ws + round_up(size_t(E) * sizeof(int)))};
  Ctx rest = ctx;  // the column sums use the workspace after counts and P
  rest.workspace = ws + 2 * round_up(size_t(E) * sizeof(float));
  rest.workspace_bytes = ctx.workspace_bytes - 2 * round_up(size_t(E) * sizeof(float));
  CUDA_CHECK(cudaMemsetAsync(c.P, 0, size_t(E) * sizeof(float), ctx.stream));
  if (N > 0) colsum_accumulate(c.P, probs, N, E, rest, op);
  count_experts(c.counts, topk_idx, N * K, int(E), ctx);
  return c;
}

// stats = counts | P | N in f64 (one thread per expert).
__global__ void aux_stats_kernel(double* stats, const int* counts, const float* P, int64_t N,
                                 int E) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
    stats[e] = double(counts[e]);
    stats[E + e] = double(P[e]);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) stats[2 * E] = double(N);
}

// One block: aux from global stats, the same formula as aux_fwd_kernel with Ng rows.
__global__ void aux_fwd_global_kernel(float* aux, const double* stats, int E) {
  __shared__ double red[32];
  double s = 0.0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s += stats[e] * stats[E + e];
  s = block_sum(s, red);
  const double Ng = stats[2 * E];
  if (threadIdx.x == 0) aux[0] = Ng > 0 ? float(s / Ng / Ng * double(E)) : 0.f;
}

__global__ void aux_bwd_global_kernel(float* dprobs, float daux, const double* stats, int64_t N,
                                      int E) {
  const double Ng = stats[2 * E];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * E;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int e = int(i % E);
    dprobs[i] = Ng > 0 ? float(double(daux) * E * (stats[e] / Ng) / Ng) : 0.f;
  }
}

}  // namespace

// counts[E] and P[E] (each rounded up to 256 bytes), then the column-sum partials.
size_t aux_loss_workspace_bytes(int64_t N, int64_t E) {
  return 2 * round_up(size_t(E) * sizeof(float)) + colsum_workspace_bytes(N, E);
}

void aux_loss_fwd(float* aux, const float* probs, const int32_t* topk_idx, int64_t N, int64_t E,
                  int64_t K, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= 8192, "[aux_loss_fwd] {} experts: supported 1..8192", E);
  if (N == 0) {
    CUDA_CHECK(cudaMemsetAsync(aux, 0, sizeof(float), ctx.stream));
    return;
  }
  const CountsP c = counts_and_probsum(probs, topk_idx, N, E, K, ctx, "aux_loss_fwd");
  aux_fwd_kernel<<<1, kThreads, 0, ctx.stream>>>(aux, c.P, c.counts, N, int(E));
  CUDA_CHECK_LAUNCH();
}

void aux_loss_bwd(float* dprobs, float daux, const int32_t* topk_idx, int64_t N, int64_t E,
                  int64_t K, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= 8192, "[aux_loss_bwd] {} experts: supported 1..8192", E);
  if (N == 0) return;
  int* counts = static_cast<int*>(
      workspace_for(ctx, aux_loss_workspace_bytes(N, E), "aux_loss_bwd"));  // [E]
  count_experts(counts, topk_idx, N * K, int(E), ctx);
  aux_bwd_kernel<<<grid_for(N * E, kThreads, ctx), kThreads, 0, ctx.stream>>>(dprobs, daux,
                                                                             counts, N, int(E));
  CUDA_CHECK_LAUNCH();
}

void aux_loss_stats(double* stats, const float* probs, const int32_t* topk_idx, int64_t N,
                    int64_t E, int64_t K, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= 8192, "[aux_loss_stats] {} experts: supported 1..8192", E);
  const CountsP c = counts_and_probsum(probs, topk_idx, N, E, K, ctx, "aux_loss_stats");
  aux_stats_kernel<<<unsigned((E + kThreads - 1) / kThreads), kThreads, 0, ctx.stream>>>(
      stats, c.counts, c.P, N, int(E));
  CUDA_CHECK_LAUNCH();
}

void aux_loss_fwd_global(float* aux, const double* stats, int64_t E, const Ctx& ctx) {
  aux_fwd_global_kernel<<<1, kThreads, 0, ctx.stream>>>(aux, stats, int(E));
  CUDA_CHECK_LAUNCH();
}

void aux_loss_bwd_global(float* dprobs, float daux, const double* stats, int64_t N, int64_t E,
                         const Ctx& ctx) {
  if (N == 0) return;
  aux_bwd_global_kernel<<<grid_for(N * E, kThreads, ctx), kThreads, 0, ctx.stream>>>(
      dprobs, daux, stats, N, int(E));
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
