// backend/cuda/colsum.cu: deterministic column sums over rows, the reduction behind parameter
// gradients of per-channel weights: out[c] += sum_n a[n,c] * b[n,c] * rs[n] (b, rs optional).
#include "backend/cuda/device.cuh"

namespace automoe::cuda {

namespace {

constexpr int kColTile = 32, kRowThreads = 8;

// Thread mapping: block (32, 8); threadIdx.x = column within a 32-wide tile (coalesced
// reads), threadIdx.y strides the rows of the chunk; blockIdx.x = column tile, blockIdx.y =
// row chunk. part[chunk, c] gets the chunk's sum (fixed order: deterministic).
template <class TA>
__global__ void colsum_partial_kernel(float* part /*[chunks,C]*/, const TA* a /*[N,C]*/,
                                      const bf16* b /*[N,C] or null*/,
                                      const float* rs /*[N] or null*/, int64_t N, int64_t C,
                                      int64_t rows_per_chunk) {
  __shared__ float red[kRowThreads][kColTile + 1];
  const int64_t c = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t n0 = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t n1 = n0 + rows_per_chunk < N ? n0 + rows_per_chunk : N;
  float acc = 0.f;
  if (c < C)
    for (int64_t n = n0 + threadIdx.y; n < n1; n += kRowThreads) {
      float v = to_f(a[n * C + c]);
      if (b) v *= to_f(b[n * C + c]);
      if (rs) v *= rs[n];
      acc += v;
    }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.f;
    for (int y = 0; y < kRowThreads; ++y) s += red[y][threadIdx.x];
    part[int64_t(blockIdx.y) * C + c] = s;
  }
}

// out[c] += sum over the chunks' partial rows. Block (32, 32): threadIdx.x a column of a 32-wide
// tile (coalesced), threadIdx.y sums the chunks y, y + 32, ...; the 32 sums are then added in y
// order: a fixed order, so deterministic, and 32x more loads in flight than a thread per column.
constexpr int kFinishY = 32;
__global__ void colsum_finish_kernel(float* out /*[C] +=*/, const float* part /*[chunks,C]*/,
                                     int64_t chunks, int64_t C) {
  __shared__ float red[kFinishY][kColTile + 1];
  const int64_t c = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  float s = 0.f;
  if (c < C)
    for (int64_t r = threadIdx.y; r < chunks; r += kFinishY) s += part[r * C + c];
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
    for (int y = 0; y < kFinishY; ++y) t += red[y][threadIdx.x];
    out[c] += t;
  }
}

template <class TA>
void colsum_run(float* out, const TA* a, const bf16* b, const float* rs, int64_t N, int64_t C,
                const Ctx& ctx, const char* op) {
  if (N == 0 || C == 0) return;
  const int64_t chunks = colsum_chunks(N);
  float* part = static_cast<float*>(workspace_for(ctx, colsum_workspace_bytes(N, C), op));
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  dim3 grid(unsigned((C + kColTile - 1) / kColTile), unsigned(chunks));
  colsum_partial_kernel<TA><<<grid, dim3(kColTile, kRowThreads), 0, ctx.stream>>>(
      part, a, b, rs, N, C, rows_per_chunk);
  CUDA_CHECK_LAUNCH();
  colsum_finish(out, part, chunks, C, ctx);
}

}  // namespace

void colsum_finish(float* out, const float* part, int64_t chunks, int64_t C, const Ctx& ctx) {
  if (C == 0) return;
  colsum_finish_kernel<<<unsigned((C + kColTile - 1) / kColTile), dim3(kColTile, kFinishY), 0,
                         ctx.stream>>>(out, part, chunks, C);
  CUDA_CHECK_LAUNCH();
}

// Chunks of at least 64 rows, at most 128 chunks (enough blocks to fill the device for C >= 1k).
int64_t colsum_chunks(int64_t N) { return std::clamp<int64_t>((N + 63) / 64, 1, 128); }

void colsum_accumulate(float* out, const bf16* a, const bf16* b, const float* rs, int64_t N,
                       int64_t C, const Ctx& ctx, const char* op) {
  colsum_run<bf16>(out, a, b, rs, N, C, ctx, op);
}

void colsum_accumulate(float* out, const float* a, int64_t N, int64_t C, const Ctx& ctx,
                       const char* op) {
  colsum_run<float>(out, a, nullptr, nullptr, N, C, ctx, op);
}

}  // namespace automoe::cuda
