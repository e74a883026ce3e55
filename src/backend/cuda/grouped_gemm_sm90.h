// backend/cuda/grouped_gemm_sm90.h: host entry points of the CUTLASS sm90 grouped GEMMs (TMA +
// WGMMA, warp-specialised persistent kernels, bf16 in, fp32 accumulate) that grouped_linear.cu
// runs on compute capability 9.0. Defined in sm90/grouped_gemm_*.cu, compiled for sm_90a only
// when the CUTLASS headers are found (AUTOMOE_HAVE_CUTLASS=1). No CUTLASS types here.
//
// Every launch: one tiny kernel turns the device offsets[E+1] into per-expert problem shapes and
// A/B/C/D pointer and stride arrays (in ctx.workspace), then the grouped kernel runs with device
// problem shapes only (no host sync). Experts with no rows get M = 0 (CUTLASS schedules no tile).
// Requirements (TMA): I and O multiples of 8, every pointer 16-byte aligned (AM_CHECKed).
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend/cuda/common.cuh"

namespace automoe::cuda::sm90 {

// ctx.workspace bytes of one launch with E experts on num_sms multiprocessors: the per-expert
// arrays plus CUTLASS's own workspace (TMA descriptors per SM, scheduler).
size_t fwd_workspace_bytes(int64_t E, int num_sms);
size_t dgrad_workspace_bytes(int64_t E, int num_sms);
size_t wgrad_bf16_workspace_bytes(int64_t E, int num_sms);
size_t wgrad_f32_workspace_bytes(int64_t E, int num_sms);

// out[r,:] = x[r,:] @ w[e]^T for r in [offsets[e], offsets[e+1]): M = rows of e, N = O, K = I.
void fwd(bf16* out /*[R,O] =*/, const bf16* x /*[R,I]*/, const bf16* w /*[E,O,I]*/,
         const int32_t* offsets /*[E+1]*/, int64_t E, int64_t I, int64_t O, const Ctx& ctx);
// dx[r,:] = dout[r,:] @ w[e]: M = rows of e, N = I, K = O.
void dgrad(bf16* dx /*[R,I] =*/, const bf16* dout /*[R,O]*/, const bf16* w /*[E,O,I]*/,
           const int32_t* offsets, int64_t E, int64_t I, int64_t O, const Ctx& ctx);
// dw[e] = beta * dw[e] + dout_e^T @ x_e: M = O, N = I, K = rows of e. Experts with no rows are
// not given to CUTLASS (a K = 0 tile would store uninitialised accumulators); with beta = 0 a
// small kernel writes their dw[e] = 0, with beta = 1 they stay unchanged. beta is 0 or 1.
void wgrad(bf16* dw /*[E,O,I]*/, float beta, const bf16* dout /*[R,O]*/, const bf16* x /*[R,I]*/,
           const int32_t* offsets, int64_t E, int64_t I, int64_t O, const Ctx& ctx);
void wgrad(float* dw /*[E,O,I]*/, float beta, const bf16* dout /*[R,O]*/, const bf16* x /*[R,I]*/,
           const int32_t* offsets, int64_t E, int64_t I, int64_t O, const Ctx& ctx);

}  // namespace automoe::cuda::sm90
