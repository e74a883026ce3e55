// backend/cuda/attention_cudnn.h: causal GQA attention through cuDNN's SDPA (flash attention),
// built with the header-only cudnn-frontend graph API. Internal to the CUDA backend: the op
// table's attention_fwd/attention_bwd (attention.cu) choose between this and the fallback kernel.
//
// Layout, as in ops_cuda.h: q/out/dq [B,T,nH,D], k/v/dk/dv [B,T,nKV,D] (BSHD, given to cuDNN as
// [B,H,T,D] through strides, no transposes), lse [B,nH,T] fp32. cuDNN's "Stats" output is the
// natural-log logsumexp of the scaled, masked scores, which is our lse contract as it is.
//
// Packed batches (document masks): every (row, document) run of tokens is one sequence of a
// ragged (THD) view of the same [B,T,H,D] buffers: sequence i starts at token tok_i of the flat
// B*T token axis, so its ragged offset is tok_i*H*D elements; seq_len_q = seq_len_kv = its
// length, padding mask on, causal (top-left) within each sequence. The graph has a bucketed
// number of sequences (segment_bucket(S): a power of two >= 8); the unused slots are sequences
// of length 0 placed at the end of the buffers. Its Stats are ragged too, token-major
// [B*T, nH] fp32 (the layout cuDNN's ragged Stats use, as TransformerEngine's THD path does):
// attention.cu converts them to and from our lse [B,nH,T] in a workspace scratch.
//
// Plans (cuDNN graphs) are built once per (direction, B, T, nH, nKV, D, mask, bucket) and cached
// for the life of the process; one cudnnHandle_t per process, bound to ctx.stream at each call.
// With AUTOMOE_HAVE_CUDNN=0 (cuDNN or cudnn-frontend not found at configure time) every function
// here reports "not compiled in".
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "backend/cuda/common.cuh"

namespace automoe::cuda::sdpa {

// Whether the build has cuDNN (AUTOMOE_HAVE_CUDNN).
bool compiled_in();

// ---- the segment table of a packed batch (written on the host by attention.cu's
// attention_segments_build, read by cuDNN from device memory). C = segment_capacity(B, T)
// entries per array, arrays back to back, each 16-byte aligned:
//   int64 off_q[C]   token start * nH * D   (Q, O, dO, dQ ragged offsets, elements)
//   int64 off_kv[C]  token start * nKV * D  (K, V, dK, dV)
//   int64 off_st[C]  token start * nH       (Stats, token-major [B*T, nH])
//   int32 len[C]     tokens in the sequence (seq_len_q = seq_len_kv)
// Sequences S.. are padding: length 0, offsets at the end of the buffers (token B*T).
constexpr int64_t kMinSegmentBucket = 8;
int64_t segment_bucket(int64_t segments);  // max(8, next power of two >= segments)
int64_t segment_capacity(int64_t B, int64_t T);  // entries per array: the largest bucket + 1
size_t segment_table_bytes(int64_t B, int64_t T);

// True when cuDNN can run this case; otherwise false and *why (when given) says why: no cuDNN
// in the build, document ids without a segment table, head dim, device, cuDNN version, or
// cuDNN's own check of the graph. segments = 0: plain causal; > 0: the packed (ragged) graph of
// segment_bucket(segments) sequences. Builds and caches the graph on first use (slow: do it at
// set-up). Throws automoe::Error when cuDNN is in the build but unusable at run time (too old,
// no handle), with what to do.
bool supported(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D, bool doc,
               int64_t segments, std::string* why);

// Bytes of ctx.workspace the cuDNN plan needs (0 when unsupported). Builds the graph. For the
// packed graph this is cuDNN's own workspace only (attention.cu adds its Stats scratch).
size_t workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                       int64_t segments);

// The op itself; the caller checked supported(). Pointers 16-byte aligned.
void fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
         int64_t T, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx);
void bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
         const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t T, int64_t nH,
         int64_t nKV, int64_t D, const Ctx& ctx);

// The packed (ragged) op; the caller checked supported(.., segments, ..). table: the device copy
// of the segment table; stats: token-major [B*T, nH] fp32 (not our lse layout, see above), not
// inside the first workspace_bytes() bytes of ctx.workspace.
void fwd_packed(bf16* out, float* stats, const bf16* q, const bf16* k, const bf16* v,
                const void* table, int64_t segments, int64_t B, int64_t T, int64_t nH,
                int64_t nKV, int64_t D, const Ctx& ctx);
void bwd_packed(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                const float* stats, const bf16* q, const bf16* k, const bf16* v,
                const void* table, int64_t segments, int64_t B, int64_t T, int64_t nH,
                int64_t nKV, int64_t D, const Ctx& ctx);

// The tail graph (ops_cuda.h attention_tail_*): the last Tq queries of each sequence over all
// Tkv of its keys, causal aligned bottom-right; q/out/dq [B,Tq,nH,D], k/v/dk/dv [B,Tkv,nKV,D]
// (dk, dv assigned here: attention.cu adds them), lse [B,nH,Tq]. Plans keyed by (bwd, B, Tq,
// Tkv, nH, nKV, D) and cached like the others.
bool supported_tail(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV,
                    int64_t D, std::string* why);
size_t workspace_bytes_tail(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                            int64_t nKV, int64_t D);
void fwd_tail(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
              int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx);
void bwd_tail(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
              const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t Tq, int64_t Tkv,
              int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx);

}  // namespace automoe::cuda::sdpa
