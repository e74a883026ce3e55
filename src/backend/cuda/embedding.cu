// backend/cuda/embedding.cu: token embedding lookup (row gather) and its backward (row
// scatter-add into an fp32 gradient).
#include "backend/cuda/device.cuh"
#include "backend/cuda/ops_cuda.h"

namespace automoe::cuda {

namespace {

// Grid-stride over the N*C/8 chunks of 8 bf16 (16 bytes) when C % 8 == 0 and the rows are
// 16-byte aligned, else over single elements (vec = 1). Thread i copies chunk i.
template <class Chunk>
__global__ void embedding_fwd_kernel(Chunk* out, const int64_t* ids, const Chunk* wte,
                                     int64_t N, int64_t Cc /*chunks per row*/) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * Cc;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / Cc, c = i % Cc;
    out[i] = wte[ids[n] * Cc + c];
  }
}

// Grid-stride over N*C elements: dwte[ids[n], c] += dout[n, c] with an fp32 atomic (rows may
// share an id).
__global__ void embedding_bwd_kernel(float* dwte, const bf16* dout, const int64_t* ids,
                                     int64_t N, int64_t C) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * C;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    atomicAdd(dwte + ids[n] * C + c, to_f(dout[i]));
  }
}

// One block per distinct id u: column c (strided over the block) sums dout[rows[j], c] over the
// id's rows in fp32, in row order (deterministic), then adds into dwte[uniq[u], c].
template <class G>
__global__ void embedding_bwd_sorted_kernel(G* dwte, const bf16* dout, const int32_t* uniq,
                                            const int32_t* uoff, const int32_t* rows, int64_t C) {
  const int64_t u = blockIdx.x;
  const int32_t j0 = uoff[u], j1 = uoff[u + 1];
  G* dst = dwte + int64_t(uniq[u]) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float s = 0.f;
    for (int32_t j = j0; j < j1; ++j) s += to_f(dout[int64_t(rows[j]) * C + c]);
    if constexpr (sizeof(G) == 2)
      dst[c] = to_bf(to_f(dst[c]) + s);
    else
      dst[c] += s;
  }
}

template <class G>
void embedding_bwd_sorted_run(G* dwte, const bf16* dout, const int32_t* uniq, const int32_t* uoff,
                              const int32_t* rows, int64_t U, int64_t C, const Ctx& ctx) {
  if (U == 0 || C == 0) return;
  embedding_bwd_sorted_kernel<G><<<unsigned(U), 256, 0, ctx.stream>>>(dwte, dout, uniq, uoff,
                                                                      rows, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void embedding_bwd_sorted(bf16* dwte, const bf16* dout, const int32_t* uniq, const int32_t* uoff,
                          const int32_t* rows, int64_t U, int64_t C, const Ctx& ctx) {
  embedding_bwd_sorted_run(dwte, dout, uniq, uoff, rows, U, C, ctx);
}

void embedding_bwd_sorted(float* dwte, const bf16* dout, const int32_t* uniq,
                          const int32_t* uoff, const int32_t* rows, int64_t U, int64_t C,
                          const Ctx& ctx) {
  embedding_bwd_sorted_run(dwte, dout, uniq, uoff, rows, U, C, ctx);
}

void embedding_fwd(bf16* out, const int64_t* ids, const bf16* wte, int64_t N, int64_t C,
                   const Ctx& ctx) {
  if (N == 0 || C == 0) return;
  constexpr int kThreads = 256;
  if (rows_16b(C, out, wte)) {
    const int64_t Cc = C / 8;
    embedding_fwd_kernel<uint4><<<grid_for(N * Cc, kThreads, ctx), kThreads, 0, ctx.stream>>>(
        reinterpret_cast<uint4*>(out), ids, reinterpret_cast<const uint4*>(wte), N, Cc);
  } else {
    embedding_fwd_kernel<bf16><<<grid_for(N * C, kThreads, ctx), kThreads, 0, ctx.stream>>>(
        out, ids, wte, N, C);
  }
  CUDA_CHECK_LAUNCH();
}

void embedding_bwd(float* dwte, const bf16* dout, const int64_t* ids, int64_t N, int64_t C,
                   const Ctx& ctx) {
  if (N == 0 || C == 0) return;
  constexpr int kThreads = 256;
  embedding_bwd_kernel<<<grid_for(N * C, kThreads, ctx), kThreads, 0, ctx.stream>>>(dwte, dout,
                                                                                    ids, N, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace automoe::cuda
