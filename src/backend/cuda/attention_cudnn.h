// backend/cuda/attention_cudnn.h: causal GQA attention through cuDNN's SDPA (flash attention),
// built with the header-only cudnn-frontend graph API. Internal to the CUDA backend: the op
// table's attention_fwd/attention_bwd (attention.cu) choose between this and the fallback kernel.
//
// Layout, as in ops_cuda.h: q/out/dq [B,T,nH,D], k/v/dk/dv [B,T,nKV,D] (BSHD, given to cuDNN as
// [B,H,T,D] through strides, no transposes), lse [B,nH,T] fp32. cuDNN's "Stats" output is the
// natural-log logsumexp of the scaled, masked scores, which is our lse contract as it is.
//
// Plans (cuDNN graphs) are built once per (direction, B, T, nH, nKV, D, mask) and cached for the
// life of the process; one cudnnHandle_t per process, bound to ctx.stream at each call. With
// AUTOMOE_HAVE_CUDNN=0 (cuDNN or cudnn-frontend not found at configure time) every function
// here reports "not compiled in".
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "backend/cuda/common.cuh"

namespace automoe::cuda::sdpa {

// Whether the build has cuDNN (AUTOMOE_HAVE_CUDNN).
bool compiled_in();

// True when cuDNN can run this case; otherwise false and *why (when given) says why: no cuDNN
// in the build, document masking, head dim, device, or cuDNN's own check of the graph. Builds and
// caches the graph on first use (slow: do it at set-up). Throws automoe::Error when cuDNN is in
// the build but unusable at run time (too old, no handle), with what to do.
bool supported(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D, bool doc,
               std::string* why);

// Bytes of ctx.workspace the cuDNN plan needs (0 when unsupported). Builds the graph.
size_t workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D);

// The op itself; the caller checked supported(). Pointers 16-byte aligned.
void fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
         int64_t T, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx);
void bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
         const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t T, int64_t nH,
         int64_t nKV, int64_t D, const Ctx& ctx);

}  // namespace automoe::cuda::sdpa
