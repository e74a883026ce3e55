// backend/cuda/ops_cuda.h: the CUDA op table, mirroring ops/ops.h name for name and argument
// for argument (outputs first, then inputs, then sizes, then the Ctx). One .cu file per op,
// named as in backend/cpu/. Checked against the CPU ops by bench/op_check.cu.
//
// Precision: activations, weights and activation gradients are bf16 (storage); every sum,
// softmax and norm is computed in fp32; statistics (rstd, lse, probs, router weights, losses)
// are fp32; parameter gradients are fp32 and ACCUMULATE (+=), activation gradients ASSIGN (=);
// ops whose parameter gradients may also be bf16 (grouped_linear) take a beta for them.
// In the comments below: `bf16`/`f32`/`i32`/`i64` is the element type, `=`/`+=` how an output
// is written. All pointers are device pointers unless a comment says host.
//
// Every op enqueues on ctx.stream and never synchronises with the host; none allocates. Ops
// that need scratch take it from ctx.workspace and say how much in *_workspace_bytes().
// Legend as in ops.h: N rows (tokens), C channels, V vocab, E experts, K top-k, B batch,
// T sequence, nH query heads, nKV key/value heads, D head dim, I input / O output features,
// R rows of the expert-ordered buffers (N*K).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "backend/cuda/common.cuh"

namespace automoe::cuda {

// ---- embedding: out[N,C] = wte[ids[n], :] --------------------------------------------------
void embedding_fwd(bf16* out /*[N,C] bf16 =*/, const int64_t* ids /*[N] i64*/,
                   const bf16* wte /*[V,C] bf16*/, int64_t N, int64_t C, const Ctx& ctx);
// Rows sharing an id are added with fp32 atomics: the order (last bits) is not deterministic.
void embedding_bwd(float* dwte /*[V,C] f32 +=*/, const bf16* dout /*[N,C] bf16*/,
                   const int64_t* ids /*[N] i64*/, int64_t N, int64_t C, const Ctx& ctx);

// ---- RMSNorm over the last dim (also per-head q/k norm: N = tokens*heads, C = D) -------------
// out = (x * rstd) * w in fp32, rounded once; rstd = 1/sqrt(mean(x^2) + eps).
void rmsnorm_fwd(bf16* out /*[N,C] bf16 =*/, float* rstd /*[N] f32 =*/,
                 const bf16* x /*[N,C] bf16*/, const bf16* w /*[C] bf16*/, int64_t N, int64_t C,
                 float eps, const Ctx& ctx);
size_t rmsnorm_bwd_workspace_bytes(int64_t N, int64_t C);
// dx = dx_beta * dx + d(out)/dx (dx_beta 0 or 1: 1 adds the residual stream's gradient in the
// same pass, rounded once); dw += the weight's gradient. Workspace: rmsnorm_bwd_workspace_bytes.
void rmsnorm_bwd(bf16* dx /*[N,C] bf16 = or +=*/, float dx_beta, float* dw /*[C] f32 +=*/,
                 const bf16* dout /*[N,C] bf16*/, const bf16* x /*[N,C] bf16*/,
                 const bf16* w /*[C] bf16*/, const float* rstd /*[N] f32*/, int64_t N, int64_t C,
                 const Ctx& ctx);

// ---- linear: out[N,O] = x[N,I] @ w[O,I]^T (+ b[O]) through cuBLASLt (bf16 in, fp32 compute) ---
// cuBLASLt uses up to ctx.workspace_bytes of workspace (linear_workspace_bytes() recommended).
// Plans (descriptors, layouts, the heuristic's algorithm) are cached by shape and alignment.
size_t linear_workspace_bytes();
void linear_fwd(bf16* out /*[N,O] bf16 =*/, const bf16* x /*[N,I] bf16*/,
                const bf16* w /*[O,I] bf16*/, const bf16* b /*[O] bf16, nullable*/, int64_t N,
                int64_t I, int64_t O, const Ctx& ctx);
// dx = dx_beta * dx + dout @ w (nullable); dw += dout^T @ x in fp32 (beta = 1 on an fp32
// output, nullable); db += sum_n dout (fp32, nullable).
size_t linear_bwd_workspace_bytes(int64_t N, int64_t O);
void linear_bwd(bf16* dx /*[N,I] bf16*/, float dx_beta, float* dw /*[O,I] f32 +=*/,
                float* db /*[O] f32 +=*/, const bf16* dout /*[N,O] bf16*/,
                const bf16* x /*[N,I] bf16*/, const bf16* w /*[O,I] bf16*/, int64_t N, int64_t I,
                int64_t O, const Ctx& ctx);

// ---- RoPE, half rotation, on x[N,H,D] with positions pos[N]; angles in fp32 as HF -------------
// In place is allowed (out == x).
void rope_fwd(bf16* out /*[N,H,D] bf16 =*/, const bf16* x /*[N,H,D] bf16*/,
              const int32_t* pos /*[N] i32*/, int64_t N, int64_t H, int64_t D, float theta,
              const Ctx& ctx);
void rope_bwd(bf16* dx /*[N,H,D] bf16 =*/, const bf16* dout /*[N,H,D] bf16*/,
              const int32_t* pos /*[N] i32*/, int64_t N, int64_t H, int64_t D, float theta,
              const Ctx& ctx);

// ---- causal GQA attention, scale D^-0.5, fp32 scores and softmax, D <= 256 ---------------------
// doc[B*T] (nullable): document id per token; a token attends only within its document
// (documents are contiguous runs within a row).
// seg (nullable, only with doc): the same documents as a segment table for cuDNN (below).
// Saves lse[b,h,t] = ln sum_s exp(score) (natural log, over the unmasked keys) instead of the
// probabilities (recomputed in bwd). Every implementation below keeps this contract, so a
// forward of one may feed a backward of another.
//
// Implementations, chosen per call:
//  - cuDNN SDPA (flash attention, attention_cudnn.cpp), the fast path: when the build has cuDNN
//    (AUTOMOE_HAVE_CUDNN), D % 8 == 0, every pointer is 16-byte aligned and cuDNN accepts the
//    graph (checked once per shape). Its backward accumulates dq with fp32 atomics (not
//    bit-reproducible run to run); P and dS go through bf16 on the tensor cores.
//    - plain causal: doc == nullptr, or every row is one document (seg->count == B).
//    - packed (document masks): doc with seg: each (row, document) run is one sequence of a
//      ragged (THD) view of the same buffers, causal within it; graphs cached per bucket of the
//      number of sequences (a power of two >= 8), so batches do not rebuild them. Needs
//      cuDNN >= 9.6 and a Hopper (sm_90+) GPU; the Stats go through a workspace scratch
//      (token-major) and are converted to lse[B,nH,T] by a small kernel.
//  - the fallback kernel (attention.cu): everything else: doc without seg, head dims cuDNN
//    rejects, no cuDNN in the build, a packed bucket whose workspace exceeds ctx's.
// AUTOMOE_ATTENTION (read once) = auto (default: as above) | cudnn (cuDNN or an Error saying
// why not) | fallback (always the fallback kernel); set_attention_impl() overrides it. In auto,
// a shape cuDNN rejects runs the fallback with one line on stderr per shape. Packed batches take
// cuDNN's packed graphs (checked on an H200: W1 with 15 documents, 386 TFLOP/s forward and 250
// backward against the fallback's 1); AUTOMOE_ATTENTION_PACKED=fallback sends them to the
// fallback kernel instead.
//
// Workspace: attention_*_workspace_bytes() build the cuDNN graphs for the shape (slow, needs the
// device): query them at set-up for every shape to be run and size ctx.workspace for the
// largest; the first call of a shape not queried builds its graph then. With doc = true they
// cover the packed graphs of every bucket up to B*T sequences whose workspace stays within
// 1 GiB (attention.cu), plus the Stats scratch; a batch in a bucket above that runs the
// fallback (said once). cuDNN's plans and handle are cached for the process (one GPU per
// process).
enum class AttentionImpl { kAuto, kCudnn, kFallback };
void set_attention_impl(AttentionImpl impl);
AttentionImpl attention_impl();

// The segment table of a packed batch: built on the host by attention_segments_build() into
// attention_segments_bytes(B, T) bytes (put them in the batch's pinned staging and copy them to
// the device with the batch: no extra copy, no sync), then handed to attention_fwd/bwd with the
// device address. count > 0: sequences in the table ((row, document) runs); 0: doc[] cannot be
// described by one (a document id that reappears after another in a row): the fallback runs.
struct AttentionSegments {
  const void* table = nullptr;  // device, 16-byte aligned, attention_segments_bytes(B, T) bytes
  int64_t count = 0;            // host
};
size_t attention_segments_bytes(int64_t B, int64_t T);
// The number of sequences of the cuDNN graph that runs `count` segments: a power of two >= 8.
int64_t attention_segment_bucket(int64_t count);
// The workspace cuDNN's packed graph of `segments` sequences needs (its bucket's, + the Stats
// scratch); 0 when cuDNN cannot run it. Builds the graph. For benchmarks and diagnostics.
size_t attention_packed_workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                                        int64_t D, int64_t segments);
// Writes the table for doc[B*T] (host) into table_host; returns the count (see above). The
// table's offsets depend on nH, nKV and D: build it for the shape the op runs.
int64_t attention_segments_build(void* table_host, const int32_t* doc /*[B*T] host*/, int64_t B,
                                 int64_t T, int64_t nH, int64_t nKV, int64_t D);

// Why cuDNN cannot run this case ("" when it can; builds the graph). segments: the count of a
// segment table (0: none; with doc, the fallback then).
std::string attention_cudnn_unsupported(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV,
                                        int64_t D, bool doc, int64_t segments = 0);

size_t attention_fwd_workspace_bytes(int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                                     bool doc);
void attention_fwd(bf16* out /*[B,T,nH,D] bf16 =*/, float* lse /*[B,nH,T] f32 =*/,
                   const bf16* q /*[B,T,nH,D] bf16*/, const bf16* k /*[B,T,nKV,D] bf16*/,
                   const bf16* v /*[B,T,nKV,D] bf16*/, const int32_t* doc /*[B*T] i32*/,
                   const AttentionSegments* seg /*nullable*/, int64_t B, int64_t T, int64_t nH,
                   int64_t nKV, int64_t D, const Ctx& ctx);
size_t attention_bwd_workspace_bytes(int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                                     bool doc);
void attention_bwd(bf16* dq /*[B,T,nH,D] bf16 =*/, bf16* dk /*[B,T,nKV,D] bf16 =*/,
                   bf16* dv /*[B,T,nKV,D] bf16 =*/, const bf16* dout /*[B,T,nH,D] bf16*/,
                   const bf16* out /*[B,T,nH,D] bf16 (fwd)*/, const float* lse /*[B,nH,T] f32*/,
                   const bf16* q, const bf16* k, const bf16* v, const int32_t* doc,
                   const AttentionSegments* seg /*nullable*/, int64_t B, int64_t T, int64_t nH,
                   int64_t nKV, int64_t D, const Ctx& ctx);

// The last Tq queries of each sequence over all Tkv of its keys, causal aligned bottom-right
// (query i at position Tkv - Tq + i): the second half of a sequence split in two (the CPU op
// attention_tail_fwd/bwd of ops/ops.h is its oracle). cuDNN only (no fallback kernel): an
// Error says why where cuDNN cannot run it; attention_tail_unsupported() asks first. The
// backward adds dk and dv (+=) onto what is there, e.g. the first half's attention_bwd: cuDNN
// writes them into the workspace, then one add each. Checked against the CPU op on an H200
// (op_check's attention_tail group: 25 of 25); the model uses it for train.ep_halves with one
// sequence per micro-batch (run on two H200s: bench/RESULTS.md, 2026-11-30).
std::string attention_tail_unsupported(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                                       int64_t nKV, int64_t D);  // "" when cuDNN can run it
size_t attention_tail_workspace_bytes(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                                      int64_t nKV, int64_t D);
void attention_tail_fwd(bf16* out /*[B,Tq,nH,D] bf16 =*/, float* lse /*[B,nH,Tq] f32 =*/,
                        const bf16* q /*[B,Tq,nH,D]*/, const bf16* k /*[B,Tkv,nKV,D]*/,
                        const bf16* v /*[B,Tkv,nKV,D]*/, int64_t B, int64_t Tq, int64_t Tkv,
                        int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx);
void attention_tail_bwd(bf16* dq /*[B,Tq,nH,D] bf16 =*/, bf16* dk /*[B,Tkv,nKV,D] bf16 +=*/,
                        bf16* dv /*[B,Tkv,nKV,D] bf16 +=*/, const bf16* dout /*[B,Tq,nH,D]*/,
                        const bf16* out /*[B,Tq,nH,D] (fwd)*/, const float* lse /*[B,nH,Tq]*/,
                        const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t Tq,
                        int64_t Tkv, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx);

// ---- router: probs = softmax(logits) in fp32, top-k (descending, ties to the lower index),
// weights = top-k probs, renormalised to sum 1 when norm_topk. One warp per token.
void router_fwd(float* probs /*[N,E] f32 =*/, int32_t* topk_idx /*[N,K] i32 =*/,
                float* topk_w /*[N,K] f32 =*/, const bf16* logits /*[N,E] bf16*/, int64_t N,
                int64_t E, int64_t K, bool norm_topk, const Ctx& ctx);
void router_bwd(bf16* dlogits /*[N,E] bf16 =*/, const float* dtopk_w /*[N,K] f32*/,
                const float* dprobs_extra /*[N,E] f32, nullable*/, const float* probs /*[N,E]*/,
                const int32_t* topk_idx /*[N,K]*/, int64_t N, int64_t E, int64_t K,
                bool norm_topk, const Ctx& ctx);

// ---- MoE layout: the N*K (token, pick) slots sorted by expert, stable in slot order ------------
// Computed on the device by blocks over tiles of slots (no atomics on slot_row, no host sync),
// per-tile counts in ctx.workspace (moe_layout_workspace_bytes); E <= 1024.
//
// Rows in regions with padding (expert parallelism's padded receive, dist/expert_parallel_cuda.h):
// region s holds rows [s*region, (s+1)*region), of which the first cnt[s] hold tokens and the rest
// is padding. The ops below that take a RowRegions treat padding rows as rows without picks and
// skip them without reading their inputs; cnt stays on the device (no host sync), so the grids
// keep the host's bound (N rows) and a padding row's block returns at once. The default (cnt
// null): every row holds a token, the ops' plain behaviour.
struct RowRegions {
  const int32_t* cnt = nullptr;  // [N / region] i32, device: rows holding tokens per region
  int64_t region = 0;            // rows per region (> 0 with cnt)
};
size_t moe_layout_workspace_bytes(int64_t N, int64_t K, int64_t E);
// Padding rows' picks are not read: they count for no expert and get slot_row = -1.
void moe_layout(int32_t* offsets /*[E+1] i32 =*/, int32_t* slot_row /*[N*K] i32 =*/,
                const int32_t* topk_idx /*[N,K] i32*/, int64_t N, int64_t E, int64_t K,
                const Ctx& ctx, RowRegions rows = {});
// permute: xs[slot_row[n*K+j], :] = x[n, :] (slot_row -1: skipped, so padding rows laid out by
// moe_layout with regions cost one read of slot_row per slot)
void permute_fwd(bf16* xs /*[N*K,C] bf16 =*/, const bf16* x /*[N,C] bf16*/,
                 const int32_t* slot_row, int64_t N, int64_t K, int64_t C, const Ctx& ctx);
// dx[n] = sum_j dxs[slot_row[n*K+j]] (fp32 sum); padding rows of dx are not written
void permute_bwd(bf16* dx /*[N,C] bf16 =*/, const bf16* dxs /*[N*K,C] bf16*/,
                 const int32_t* slot_row, int64_t N, int64_t K, int64_t C, const Ctx& ctx,
                 RowRegions rows = {});
// unpermute: out[n] = sum_j w[n,j] * ys[slot_row[n*K+j]] (fp32 sum); padding rows of out are
// not written
void unpermute_fwd(bf16* out /*[N,C] bf16 =*/, const bf16* ys /*[N*K,C] bf16*/,
                   const float* w /*[N,K] f32*/, const int32_t* slot_row, int64_t N, int64_t K,
                   int64_t C, const Ctx& ctx, RowRegions rows = {});
// dys[slot_row[n*K+j]] = w[n,j] * dout[n], dw[n,j] = dout[n] . ys[slot_row[n*K+j]] (0 where
// slot_row is -1); padding rows of dw are not written
void unpermute_bwd(bf16* dys /*[N*K,C] bf16 =*/, float* dw /*[N,K] f32 =*/,
                   const bf16* dout /*[N,C] bf16*/, const bf16* ys /*[N*K,C] bf16*/,
                   const float* w /*[N,K] f32*/, const int32_t* slot_row, int64_t N, int64_t K,
                   int64_t C, const Ctx& ctx, RowRegions rows = {});

// ---- grouped linear over experts: rows [off[e], off[e+1]) of x use w[e]: out = x @ w[e]^T ------
// Offsets stay on the device (no host sync): R is the rows allocated (N*K, host-known), an
// upper bound of offsets[E]; rows at or past offsets[E] are not touched. Experts may have no
// rows. bf16 in, fp32 accumulation, one rounding of each output.
// Implementations: on compute capability 9.0 (H100/H200) with CUTLASS built in
// (AUTOMOE_HAVE_CUTLASS=1), CUTLASS sm90 TMA + WGMMA grouped GEMMs, used when I and O are
// multiples of 8 and every buffer is 16-byte aligned (TMA needs 16-byte rows and bases);
// otherwise a tiled CUDA-core fallback (correct, slow). Env AUTOMOE_GROUPED_GEMM=fallback forces
// the fallback, =sm90 forces CUTLASS (an error with the reason when it cannot run), =auto (the
// default) chooses. The sm90 path takes per-expert pointer/shape arrays and CUTLASS's own
// workspace from ctx.workspace: size it with grouped_linear_workspace_bytes(E) (0 without
// CUTLASS; for ctx.num_sms = the current device's SM count, or `num_sms` where a Ctx gives its
// persistent grids another count).
size_t grouped_linear_workspace_bytes(int64_t E, int num_sms = 0);
// "sm90" or "fallback": what the ops run for this I, O on the current device under the
// current AUTOMOE_GROUPED_GEMM, given 16-byte aligned buffers.
const char* grouped_linear_impl(int64_t I, int64_t O);
void grouped_linear_fwd(bf16* out /*[R,O] bf16 =*/, const bf16* x /*[R,I] bf16*/,
                        const bf16* w /*[E,O,I] bf16*/, const int32_t* offsets /*[E+1] i32*/,
                        int64_t R, int64_t E, int64_t I, int64_t O, const Ctx& ctx);
// dx = dout @ w[e] per expert (nullable); dw[e] += dout_e^T @ x_e in fp32 (nullable; fp32
// master-weight mode); experts with no rows leave dw[e] unchanged.
void grouped_linear_bwd(bf16* dx /*[R,I] bf16 =, nullable*/, float* dw /*[E,O,I] f32 +=*/,
                        const bf16* dout /*[R,O] bf16*/, const bf16* x /*[R,I] bf16*/,
                        const bf16* w /*[E,O,I] bf16*/, const int32_t* offsets, int64_t R,
                        int64_t E, int64_t I, int64_t O, const Ctx& ctx);
// bf16 weight gradients (the default precision policy: bf16 gradients):
// dw[e] = dw_beta * dw[e] + dout_e^T @ x_e, accumulated in fp32 and rounded once to bf16.
// dw_beta = 0 overwrites (dw is not read; experts with no rows get dw[e] = 0), 1 accumulates
// (experts with no rows keep dw[e]). dx as above (nullable).
// Both overloads: dx and dw are separate launches (x is read only for dw, w only for dx, so
// either may be null with its output), and a call with both gives the bits of two calls with
// one each (the EP backward runs them on two streams, each with its own ctx.workspace).
void grouped_linear_bwd(bf16* dx /*[R,I] bf16 =, nullable*/,
                        bf16* dw /*[E,O,I] bf16 = dw_beta*dw + ..., nullable*/, float dw_beta,
                        const bf16* dout /*[R,O] bf16*/, const bf16* x /*[R,I] bf16*/,
                        const bf16* w /*[E,O,I] bf16*/, const int32_t* offsets, int64_t R,
                        int64_t E, int64_t I, int64_t O, const Ctx& ctx);

// ---- SwiGLU on a fused gate|up row: gu[N,2F] (gate = cols [0,F), up = [F,2F)) -> out[N,F] ------
// n_rows (nullable, device): only rows [0, min(N, *n_rows)) are computed, rows past it are not
// touched (the grid keeps the host's bound N, no host sync; expert parallelism's padded mode
// passes offsets + E of its moe_layout). Null: all N rows.
void swiglu_fwd(bf16* out /*[N,F] bf16 =*/, const bf16* gu /*[N,2F] bf16*/, int64_t N,
                int64_t F, const Ctx& ctx, const int32_t* n_rows = nullptr);
void swiglu_bwd(bf16* dgu /*[N,2F] bf16 =*/, const bf16* dout /*[N,F] bf16*/,
                const bf16* gu /*[N,2F] bf16*/, int64_t N, int64_t F, const Ctx& ctx,
                const int32_t* n_rows = nullptr);

// ---- cross-entropy on bf16 logits[N,V], targets[N] (-100 = ignored) -----------------------------
// One block per row, one pass over the vocabulary with an online max/sum: no fp32 copy of the
// logits. losses[n] = lse - logit[target] (0 when ignored).
void cross_entropy_fwd(float* losses /*[N] f32 =*/, float* lse /*[N] f32 =*/,
                       const bf16* logits /*[N,V] bf16*/, const int64_t* targets /*[N] i64*/,
                       int64_t N, int64_t V, const Ctx& ctx);
// dlogits = scale * (softmax - onehot) on labelled rows, 0 on ignored rows. In place is
// allowed (dlogits == logits).
void cross_entropy_bwd(bf16* dlogits /*[N,V] bf16 =*/, const bf16* logits /*[N,V] bf16*/,
                       const float* lse /*[N] f32*/, const int64_t* targets /*[N] i64*/,
                       float scale, int64_t N, int64_t V, const Ctx& ctx);
// cross_entropy_fwd() then cross_entropy_bwd() in one kernel (a block per row reads the row for
// lse, then again, mostly from L2, for the gradient): dlogits may be logits.
void cross_entropy_fwd_bwd(float* losses /*[N] f32 =*/, float* lse /*[N] f32 =*/,
                           bf16* dlogits /*[N,V] bf16 =*/, const bf16* logits /*[N,V] bf16*/,
                           const int64_t* targets /*[N] i64*/, float scale, int64_t N,
                           int64_t V, const Ctx& ctx);

// ---- load-balancing aux loss (HF load_balancing_loss_func), probs of every layer along N -----
// aux = E * sum_{k,e} f[k,e] * P[e]; written to aux[0] on the device. Deterministic.
size_t aux_loss_workspace_bytes(int64_t N, int64_t E);
void aux_loss_fwd(float* aux /*[1] f32 =*/, const float* probs /*[N,E] f32*/,
                  const int32_t* topk_idx /*[N,K] i32*/, int64_t N, int64_t E, int64_t K,
                  const Ctx& ctx);
// dprobs = daux * E * (sum_k f[k,e]) / N; daux is a host scalar (the loss coefficient).
void aux_loss_bwd(float* dprobs /*[N,E] f32 =*/, float daux, const int32_t* topk_idx /*[N,K]*/,
                  int64_t N, int64_t E, int64_t K, const Ctx& ctx);
// Over several ranks (the global batch, as dist::aux_loss_global_fwd on the CPU): each rank's
// statistics, which the caller sums over the world, then the loss and this rank's share of the
// gradient from the global sums. stats[2E+1] f64: pick counts[e] | sum_n probs[n,e] | rows N.
// Workspace: aux_loss_workspace_bytes(N, E).
void aux_loss_stats(double* stats /*[2E+1] f64 =*/, const float* probs /*[N,E] f32*/,
                    const int32_t* topk_idx /*[N,K] i32*/, int64_t N, int64_t E, int64_t K,
                    const Ctx& ctx);
// aux[0] = E / Ng^2 * sum_e counts[e] * P[e] from the summed stats (Ng = stats[2E]; 0 if none).
void aux_loss_fwd_global(float* aux /*[1] f32 =*/, const double* stats /*[2E+1] f64*/, int64_t E,
                         const Ctx& ctx);
// dprobs[N,E] (=) = daux * E * (counts[e] / Ng) / Ng for this rank's N rows.
void aux_loss_bwd_global(float* dprobs /*[N,E] f32 =*/, float daux,
                         const double* stats /*[2E+1] f64*/, int64_t N, int64_t E, const Ctx& ctx);

// ---- optimizer: torch.optim.AdamW over one flat range of the parameter arena ------------------
// All-fp32 (master weights): p, m, v fp32; p_bf16 (nullable) receives the rounded weights the
// bf16 forward reads.
void adamw_step(float* p /*[n] f32*/, bf16* p_bf16 /*[n] bf16 =, nullable*/,
                const float* g /*[n] f32*/, float* m /*[n] f32*/, float* v /*[n] f32*/, int64_t n,
                float lr, float b1, float b2, float eps, float wd, int64_t t, const Ctx& ctx);
// bf16 weights with fp32 moments: the update is computed in fp32 and rounded to nearest.
void adamw_step(bf16* p /*[n] bf16*/, const float* g /*[n] f32*/, float* m /*[n] f32*/,
                float* v /*[n] f32*/, int64_t n, float lr, float b1, float b2, float eps,
                float wd, int64_t t, const Ctx& ctx);
// out[0] = sum x^2 in double, deterministic (block partials in the workspace, then one block).
size_t sum_squares_workspace_bytes();
void sum_squares(double* out /*[1] f64 =*/, const float* x /*[n] f32*/, int64_t n,
                 const Ctx& ctx);
void scale_inplace(float* x /*[n] f32*/, float s, int64_t n, const Ctx& ctx);

// ==== Training-path additions: bf16 parameter gradients and the model's glue ===================
// The default training precision keeps parameter gradients in bf16 (ARCHITECTURE.md,
// "Precision"): the big matrices' dW is computed in fp32 and rounded once into the bf16
// gradient, `dw = dw_beta * dw + sum`, dw_beta 0 overwriting (first micro-batch) and 1
// accumulating (gradient accumulation).

// linear backward with a bf16 dW (cuBLASLt: bf16 C/D, fp32 compute). dx and db as above.
void linear_bwd(bf16* dx /*[N,I] bf16, nullable*/, float dx_beta, bf16* dw /*[O,I] bf16*/,
                float dw_beta, float* db /*[O] f32 +=, nullable*/, const bf16* dout /*[N,O]*/,
                const bf16* x /*[N,I] bf16*/, const bf16* w /*[O,I] bf16*/, int64_t N, int64_t I,
                int64_t O, const Ctx& ctx);
// Deterministic embedding backward from rows grouped by id (host-sorted, no atomics):
// dwte[uniq[u], :] += sum_{j in [uoff[u], uoff[u+1])} dout[rows[j], :] in fp32, rounded once.
void embedding_bwd_sorted(bf16* dwte /*[V,C] bf16 +=*/, const bf16* dout /*[N,C] bf16*/,
                          const int32_t* uniq /*[U]*/, const int32_t* uoff /*[U+1]*/,
                          const int32_t* rows /*[N]*/, int64_t U, int64_t C, const Ctx& ctx);
void embedding_bwd_sorted(float* dwte /*[V,C] f32 +=*/, const bf16* dout, const int32_t* uniq,
                          const int32_t* uoff, const int32_t* rows, int64_t U, int64_t C,
                          const Ctx& ctx);

// ---- elementwise glue (elementwise.cu); fp32 arithmetic, one rounding ------------------------
void add_inplace(bf16* y /*[n] +=*/, const bf16* x, int64_t n, const Ctx& ctx);   // y += x
void add(bf16* out /*[n] =*/, const bf16* a, const bf16* b, int64_t n, const Ctx& ctx);

// ---- fused forward pairs: the same bits as the two ops they replace, fewer passes ----------------
// add() then rmsnorm_fwd(): sum = a + b (one rounding), out = (sum * rstd) * w.
void add_rmsnorm_fwd(bf16* sum /*[N,C] =*/, bf16* out /*[N,C] =*/, float* rstd /*[N] f32 =*/,
                     const bf16* a /*[N,C]*/, const bf16* b /*[N,C]*/, const bf16* w /*[C]*/,
                     int64_t N, int64_t C, float eps, const Ctx& ctx);
// rmsnorm_fwd() over the N*H rows of D (per-head q/k norm) then rope_fwd(): out must not alias x.
void qk_norm_rope_fwd(bf16* out /*[N,H,D] =*/, float* rstd /*[N*H] f32 =*/,
                      const bf16* x /*[N,H,D]*/, const bf16* w /*[D]*/, const int32_t* pos /*[N]*/,
                      int64_t N, int64_t H, int64_t D, float eps, float theta, const Ctx& ctx);
// Its backward, for an even D <= 256 (qk_norm_rope_bwd_fused(D)): rope_bwd() then
// rmsnorm_bwd() over the N*H rows, the rotated gradient kept in fp32 between them; dx may be
// dout (not x). dw += the norm weight's gradient. Workspace: qk_norm_rope_bwd_workspace_bytes.
bool qk_norm_rope_bwd_fused(int64_t D);
size_t qk_norm_rope_bwd_workspace_bytes(int64_t N, int64_t H, int64_t D);
void qk_norm_rope_bwd(bf16* dx /*[N,H,D] =*/, float* dw /*[D] f32 +=*/,
                      const bf16* dout /*[N,H,D] grad of the roped output*/,
                      const bf16* x /*[N,H,D] before the norm*/, const bf16* w /*[D]*/,
                      const float* rstd /*[N*H] f32*/, const int32_t* pos /*[N]*/, int64_t N,
                      int64_t H, int64_t D, float theta, const Ctx& ctx);
// g = beta * g + s: an fp32 gradient computed in scratch folded into a bf16 gradient.
void accumulate_grad(bf16* g /*[n]*/, const float* s /*[n] f32*/, float beta, int64_t n,
                     const Ctx& ctx);
void convert(bf16* out, const float* in, int64_t n, const Ctx& ctx);  // round to nearest
void convert(float* out, const bf16* in, int64_t n, const Ctx& ctx);
// Random init on the device: normal(0, std) from a counter-based hash of (seed, index).
void fill_normal(bf16* p, int64_t n, float std, uint64_t seed, const Ctx& ctx);
void fill_normal(float* p, int64_t n, float std, uint64_t seed, const Ctx& ctx);
void fill(bf16* p, float value, int64_t n, const Ctx& ctx);
void fill(float* p, float value, int64_t n, const Ctx& ctx);

// ---- optimizer over bf16 gradients, global-norm clipping without a host sync ---------------
void sum_squares(double* out /*[1] f64 =*/, const bf16* x /*[n] bf16*/, int64_t n,
                 const Ctx& ctx);
// coef[0] = max_norm / (sqrt(sumsq) + 1e-6) when max_norm > 0 and the norm exceeds it, else 1
// (torch.nn.utils.clip_grad_norm_); norm[0] = sqrt(sumsq) (f32, for metrics).
void clip_coef(float* coef /*[1] f32 =*/, float* norm /*[1] f32 =*/,
               const double* sumsq /*[1] f64*/, float max_norm, const Ctx& ctx);
// AdamW with the gradient scaled by gscale[0] (device; the clip coefficient), bf16 weights,
// bf16 gradients and bf16 moments (torch's state dtype for a bf16 model); fp32 arithmetic.
void adamw_step(bf16* p /*[n]*/, const bf16* g /*[n]*/, bf16* m /*[n]*/, bf16* v /*[n]*/,
                int64_t n, float lr, float b1, float b2, float eps, float wd, int64_t t,
                const float* gscale /*[1] f32*/, const Ctx& ctx);
// The memory-saving mode's step on ONE tensor inside the backward: adamw_step above (bf16
// weights, gradients and moments, g scaled by gscale[0]) and sumsq[0] (=) the sum of the
// UNscaled g^2 in double, deterministic (block partials in the workspace, then one block).
void adamw_step_sumsq(bf16* p /*[n]*/, const bf16* g /*[n]*/, bf16* m /*[n]*/, bf16* v /*[n]*/,
                      int64_t n, float lr, float b1, float b2, float eps, float wd, int64_t t,
                      const float* gscale /*[1] f32*/, double* sumsq /*[1] f64 =*/,
                      const Ctx& ctx);
// out[0] = x[0] + ... + x[n-1] in a fixed order (one block).
void sum_f64(double* out /*[1] =*/, const double* x /*[n]*/, int64_t n, const Ctx& ctx);
// Master weights: fp32 p, g, m, v; p_bf16 receives the rounded weights; g scaled by gscale[0].
void adamw_step(float* p, bf16* p_bf16 /*nullable*/, const float* g, float* m, float* v,
                int64_t n, float lr, float b1, float b2, float eps, float wd, int64_t t,
                const float* gscale /*[1] f32*/, const Ctx& ctx);

}  // namespace automoe::cuda
