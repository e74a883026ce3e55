// backend/cuda/grouped_linear.cu: one linear per expert over its contiguous block of rows, with
// the per-expert offsets read on the device (no host sync). Two implementations, chosen per call:
// - sm90: CUTLASS TMA + WGMMA grouped GEMMs (grouped_gemm_sm90.h), on compute capability 9.0
//   when CUTLASS was built in and the operands suit TMA (I, O multiples of 8, 16-byte aligned);
// - fallback: a plain tiled GEMM on CUDA cores, bf16 operands converted to fp32 in shared
//   memory, fp32 accumulation. Correct everywhere, slow; the op check compares both.
// AUTOMOE_GROUPED_GEMM=fallback|sm90|auto (default auto) overrides the choice.
#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/device.cuh"
#include "backend/cuda/grouped_gemm_sm90.h"
#include "backend/cuda/ops_cuda.h"

#ifndef AUTOMOE_HAVE_CUTLASS
#define AUTOMOE_HAVE_CUTLASS 0
#endif

namespace automoe::cuda {

namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

struct Tiles {
  float a[kBK][kBM + 4];  // A tile, k-major
  float b[kBK][kBN + 4];  // B tile, k-major
};

// acc[i][j] += sum_k A(m,k) B(k,n) for m = m0 + ty + 16i, n = n0 + tx + 16j (ty = tid/16,
// tx = tid%16: the 64x64 tile as 4x4 outputs per thread, strided so a warp reads few banks).
// A(m,k) = A[m*sam + k*sak] (M x Kd), B(k,n) = B[k*sbk + n*sbn] (Kd x Nn); out of range = 0.
// Loads walk the contiguous dimension of each operand across consecutive threads.
__device__ void gemm_tile(float (&acc)[4][4], Tiles& sm, const bf16* A, int64_t sam, int64_t sak,
                          const bf16* B, int64_t sbk, int64_t sbn, int64_t M, int64_t Nn,
                          int64_t Kd, int64_t m0, int64_t n0) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t k0 = 0; k0 < Kd; k0 += kBK) {
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      const int mm = sak == 1 ? idx / kBK : idx % kBM;
      const int kk = sak == 1 ? idx % kBK : idx / kBM;
      const int64_t m = m0 + mm, k = k0 + kk;
      sm.a[kk][mm] = (m < M && k < Kd) ? to_f(A[m * sam + k * sak]) : 0.f;
    }
    for (int idx = tid; idx < kBN * kBK; idx += kThreads) {
      const int nn = sbn == 1 ? idx % kBN : idx / kBK;
      const int kk = sbn == 1 ? idx / kBN : idx % kBK;
      const int64_t n = n0 + nn, k = k0 + kk;
      sm.b[kk][nn] = (n < Nn && k < Kd) ? to_f(B[k * sbk + n * sbn]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sm.a[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sm.b[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
}

// Forward and dx: C[r, n] = sum_k A(r,k) B_e(k,n) over the rows r of each expert, bf16 out.
// Grid (row-tile slots, ceil(Nn/64)): slot s is tile t of expert e where the experts' tiles are
// numbered in order (found by thread 0 from the device offsets). A block takes slots
// blockIdx.x, blockIdx.x + gridDim.x, ... until one is past the last tile, so any grid covers
// every tile (ceil(R/64) + E slots need one pass). The strides of B say whether B_e is w[e]^T (fwd) or w[e] (dx).
__global__ void grouped_rows_kernel(bf16* C /*[R,Nn]*/, const bf16* A /*[R,Kd]*/,
                                    const bf16* W /*[E, O*I]*/, int64_t sbk, int64_t sbn,
                                    const int32_t* offsets, int E, int64_t Nn, int64_t Kd) {
  __shared__ Tiles sm;
  __shared__ int64_t s_row0, s_rows, s_e;
  for (int64_t slot0 = blockIdx.x;; slot0 += gridDim.x) {
    __syncthreads();  // every thread has read the previous slot's s_*
    if (threadIdx.x == 0) {
      int64_t slot = slot0;
      s_rows = 0;
      for (int e = 0; e < E; ++e) {
        const int64_t cnt = offsets[e + 1] - offsets[e];
        const int64_t tiles = (cnt + kBM - 1) / kBM;
        if (slot < tiles) {
          s_row0 = offsets[e] + slot * kBM;
          s_rows = min(int64_t(kBM), cnt - slot * kBM);
          s_e = e;
          break;
        }
        slot -= tiles;
      }
    }
    __syncthreads();
    const int64_t rows = s_rows, row0 = s_row0;
    if (rows == 0) return;  // uniform over the block
    const bf16* We = W + s_e * Nn * Kd;
    const int64_t n0 = int64_t(blockIdx.y) * kBN;
    float acc[4][4] = {};
    gemm_tile(acc, sm, A + row0 * Kd, Kd, 1, We, sbk, sbn, rows, Nn, Kd, 0, n0);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t m = ty + 16 * i, n = n0 + tx + 16 * j;
        if (m < rows && n < Nn) C[(row0 + m) * Nn + n] = to_bf(acc[i][j]);
      }
  }
}

// dw[e][o,i] = beta * dw[e][o,i] + sum_{r of e} dout[r,o] x[r,i] (fp32 accumulate, one rounding
// to T; beta = 0 never reads dw). M = O, N = I, K = rows of e. Grid (tiles of [O,I], E); experts
// without rows write beta * dw (0 for beta = 0) or exit when beta = 1.
template <class T>
__global__ void grouped_dw_kernel(T* dw /*[E,O,I]*/, float beta, const bf16* dout /*[R,O]*/,
                                  const bf16* x /*[R,I]*/, const int32_t* offsets, int64_t O,
                                  int64_t I) {
  __shared__ Tiles sm;
  const int64_t e = blockIdx.y;
  const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
  if (rows <= 0 && beta == 1.f) return;
  const int64_t tiles_n = (I + kBN - 1) / kBN;
  const int64_t m0 = int64_t(blockIdx.x / tiles_n) * kBM, n0 = int64_t(blockIdx.x % tiles_n) * kBN;
  float acc[4][4] = {};
  // A(m=o, k=r) = dout[r*O + o], B(k=r, n=i) = x[r*I + i]; no rows: no k step, acc stays 0
  gemm_tile(acc, sm, dout + r0 * O, 1, O, x + r0 * I, I, 1, O, I, rows > 0 ? rows : 0, m0, n0);
  T* dwe = dw + e * O * I;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < O && n < I) {
        T& d = dwe[m * I + n];
        d = T(beta == 0.f ? acc[i][j] : acc[i][j] + beta * float(d));
      }
    }
}

void check_sizes(int64_t R, int64_t E, const char* op) {
  AM_CHECK(E >= 1 && E < 65536, "[{}] {} experts: supported 1..65535", op, E);
  AM_CHECK(R < (int64_t(1) << 31), "[{}] {} rows do not fit int32 offsets", op, R);
}

// ---- choosing the implementation --------------------------------------------------------------

enum class Mode { automatic, fallback, sm90 };

Mode mode_from_env() {
  const char* v = std::getenv("AUTOMOE_GROUPED_GEMM");
  if (!v || !*v || !std::strcmp(v, "auto")) return Mode::automatic;
  if (!std::strcmp(v, "fallback")) return Mode::fallback;
  if (!std::strcmp(v, "sm90") || !std::strcmp(v, "cutlass")) return Mode::sm90;
  AM_FAIL("AUTOMOE_GROUPED_GEMM={}: expected auto, fallback or sm90 (cutlass)", v);
}

// Compute capability 9.0 exactly (sm_90a code runs on no other), cached per device.
bool device_is_sm90() {
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes (static: zero-initialised)
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64 && cache[dev].load(std::memory_order_relaxed))
    return cache[dev].load(std::memory_order_relaxed) == 2;
  int major = 0, minor = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool yes = major == 9 && minor == 0;
  if (dev >= 0 && dev < 64) cache[dev].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
}

bool tma_aligned(int64_t I, int64_t O, std::initializer_list<const void*> ptrs) {
  if (I % 8 || O % 8) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}

// sm90 or fallback for one call; with AUTOMOE_GROUPED_GEMM=sm90 an impossible sm90 is an error.
bool use_sm90(const char* op, int64_t I, int64_t O, std::initializer_list<const void*> ptrs) {
  const Mode mode = mode_from_env();
  if (mode == Mode::fallback) return false;
  const bool built = AUTOMOE_HAVE_CUTLASS;
  const bool aligned = tma_aligned(I, O, ptrs);
  if (mode == Mode::sm90) {
    AM_CHECK(built,
             "[{}] AUTOMOE_GROUPED_GEMM=sm90 but this build has no CUTLASS: pip install "
             "nvidia-cutlass==4.2.0.0 (scripts/setup.sh) and reconfigure",
             op);
    AM_CHECK(device_is_sm90(), "[{}] AUTOMOE_GROUPED_GEMM=sm90 needs a compute capability 9.0 GPU",
             op);
    AM_CHECK(aligned,
             "[{}] AUTOMOE_GROUPED_GEMM=sm90 needs I and O multiples of 8 and 16-byte aligned "
             "buffers (TMA); got I={} O={}",
             op, I, O);
    return true;
  }
  return built && aligned && device_is_sm90();
}

#if AUTOMOE_HAVE_CUTLASS
int current_num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // no device: size for the largest Hopper part and more
    return 256;
  }
  return sms;
}
#endif

// ---- fallback launches ------------------------------------------------------------------------

template <class T>
void fallback_dw(T* dw, float beta, const bf16* dout, const bf16* x, const int32_t* offsets,
                 int64_t E, int64_t I, int64_t O, const Ctx& ctx) {
  const int64_t tiles = ((O + kBM - 1) / kBM) * ((I + kBN - 1) / kBN);
  grouped_dw_kernel<T><<<dim3(unsigned(tiles), unsigned(E)), kThreads, 0, ctx.stream>>>(
      dw, beta, dout, x, offsets, O, I);
  CUDA_CHECK_LAUNCH();
}

template <class T>
void bwd_impl(bf16* dx, T* dw, float dw_beta, const bf16* dout, const bf16* x, const bf16* w,
              const int32_t* offsets, int64_t R, int64_t E, int64_t I, int64_t O,
              const Ctx& ctx) {
  const char* op = "grouped_linear_bwd";
  check_sizes(R, E, op);
  if (O == 0 || I == 0) return;
  if (dx && R > 0) {
    if (use_sm90(op, I, O, {dx, dout, w})) {
#if AUTOMOE_HAVE_CUTLASS
      sm90::dgrad(dx, dout, w, offsets, E, I, O, ctx);
#endif
    } else {
      // dx[r,i] = sum_o dout[r,o] w[e][o,i]: B(k=o, n=i) = w_e[o*I + i]
      dim3 grid(unsigned((R + kBM - 1) / kBM + E), unsigned((I + kBN - 1) / kBN));
      grouped_rows_kernel<<<grid, kThreads, 0, ctx.stream>>>(dx, dout, w, I, 1, offsets, int(E),
                                                             I, O);
      CUDA_CHECK_LAUNCH();
    }
  }
  if (dw) {
    // R = 0: every expert is empty, dw = beta * dw still holds (the kernels handle it)
    if (use_sm90(op, I, O, {dw, dout, x})) {
#if AUTOMOE_HAVE_CUTLASS
      sm90::wgrad(dw, dw_beta, dout, x, offsets, E, I, O, ctx);
#endif
    } else {
      fallback_dw(dw, dw_beta, dout, x, offsets, E, I, O, ctx);
    }
  }
}

}  // namespace

size_t grouped_linear_workspace_bytes(int64_t E, int num_sms) {
#if AUTOMOE_HAVE_CUTLASS
  const int sms = num_sms > 0 ? num_sms : current_num_sms();
  return std::max({sm90::fwd_workspace_bytes(E, sms), sm90::dgrad_workspace_bytes(E, sms),
                   sm90::wgrad_bf16_workspace_bytes(E, sms),
                   sm90::wgrad_f32_workspace_bytes(E, sms)});
#else
  (void)num_sms;
  return 0;
#endif
}

const char* grouped_linear_impl(int64_t I, int64_t O) {
  // 16-byte aligned buffers assumed (every allocation is); env and device as for the ops
  alignas(16) static const char kAligned[16] = {};
  return use_sm90("grouped_linear", I, O, {kAligned}) ? "sm90" : "fallback";
}

void grouped_linear_fwd(bf16* out, const bf16* x, const bf16* w, const int32_t* offsets,
                        int64_t R, int64_t E, int64_t I, int64_t O, const Ctx& ctx) {
  check_sizes(R, E, "grouped_linear_fwd");
  if (R == 0 || O == 0) return;
  if (use_sm90("grouped_linear_fwd", I, O, {out, x, w})) {
#if AUTOMOE_HAVE_CUTLASS
    // I = 0 is no TMA shape (K = 0 would store garbage): out = 0 below instead
    if (I > 0) {
      sm90::fwd(out, x, w, offsets, E, I, O, ctx);
      return;
    }
#endif
  }
  // out[r,o] = sum_i x[r,i] w[e][o,i]: B(k=i, n=o) = w_e[o*I + i]
  dim3 grid(unsigned((R + kBM - 1) / kBM + E), unsigned((O + kBN - 1) / kBN));
  grouped_rows_kernel<<<grid, kThreads, 0, ctx.stream>>>(out, x, w, 1, I, offsets, int(E), O, I);
  CUDA_CHECK_LAUNCH();
}

void grouped_linear_bwd(bf16* dx, float* dw, const bf16* dout, const bf16* x, const bf16* w,
                        const int32_t* offsets, int64_t R, int64_t E, int64_t I, int64_t O,
                        const Ctx& ctx) {
  bwd_impl(dx, dw, 1.0f, dout, x, w, offsets, R, E, I, O, ctx);
}

void grouped_linear_bwd(bf16* dx, bf16* dw, float dw_beta, const bf16* dout, const bf16* x,
                        const bf16* w, const int32_t* offsets, int64_t R, int64_t E, int64_t I,
                        int64_t O, const Ctx& ctx) {
  bwd_impl(dx, dw, dw_beta, dout, x, w, offsets, R, E, I, O, ctx);
}

}  // namespace automoe::cuda
