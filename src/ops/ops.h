// ops/ops.h: the op table. Every op is a forward/backward pair: outputs first, then inputs,
// then sizes. This header declares the CPU reference (namespace automoe::cpu, fp32, naive,
// one file per op in backend/cpu/); the CUDA backend mirrors these names in backend/cuda/.
//
// Gradient rule for every *_bwd: parameter gradients ACCUMULATE (+=); activation gradients
// ASSIGN (=) unless the op says otherwise (linear's dx takes a beta). The model adds residuals.
//
// Legend: N rows (tokens), C channels, V vocab, E experts, K top-k, B batch, T sequence,
// nH query heads, nKV key/value heads, D head dim, I input features, O output features.
#pragma once
#include <cstdint>

namespace automoe::cpu {

// Threads for OpenMP loops and BLAS: AUTOMOE_THREADS (default 1; 0 = all cores). Returns it.
int set_num_threads_from_env();

// ---- embedding: out[N,C] = wte[ids[n], :] --------------------------------------------------
void embedding_fwd(float* out, const int64_t* ids, const float* wte, int64_t N, int64_t C);
void embedding_bwd(float* dwte /*[V,C] +=*/, const float* dout /*[N,C]*/, const int64_t* ids,
                   int64_t N, int64_t C);

// ---- RMSNorm over the last dim: out = (x * rstd) * w, rstd[N] = 1/sqrt(mean(x^2)+eps) --------
// Also the per-head q/k norm (N = tokens*heads, C = D).
void rmsnorm_fwd(float* out /*[N,C]*/, float* rstd /*[N]*/, const float* x /*[N,C]*/,
                 const float* w /*[C]*/, int64_t N, int64_t C, float eps);
void rmsnorm_bwd(float* dx /*[N,C] =*/, float* dw /*[C] +=*/, const float* dout, const float* x,
                 const float* w, const float* rstd, int64_t N, int64_t C);

// ---- linear: out[N,O] = x[N,I] @ w[O,I]^T (+ b[O]) ----------------------------------------------
void linear_fwd(float* out, const float* x, const float* w, const float* b /*nullable*/, int64_t N,
                int64_t I, int64_t O);
// dx = dx_beta * dx + dout @ w (dx nullable); dw += dout^T @ x; db += sum_n dout (nullable).
void linear_bwd(float* dx, float dx_beta, float* dw, float* db, const float* dout, const float* x,
                const float* w, int64_t N, int64_t I, int64_t O);

// ---- RoPE, half rotation (HF rotate_half), applied to x[N, H, D] with positions pos[N] ---------
// inv_freq[i] = 1 / theta^(2i/D) (fp32), angle = pos * inv_freq[i mod D/2].
void rope_fwd(float* out, const float* x, const int32_t* pos, int64_t N, int64_t H, int64_t D,
              float theta);
void rope_bwd(float* dx /*=*/, const float* dout, const int32_t* pos, int64_t N, int64_t H,
              int64_t D, float theta);

// ---- causal GQA attention, scale D^-0.5 ------------------------------------------------------
// q[B,T,nH,D], k/v[B,T,nKV,D] -> out[B,T,nH,D]; att[B,nH,T,T] saves the probabilities.
// doc[B*T] (nullable): document id per token; a token attends only within its document.
void attention_fwd(float* out, float* att, const float* q, const float* k, const float* v,
                   const int32_t* doc, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D);
void attention_bwd(float* dq /*=*/, float* dk /*=*/, float* dv /*=*/, const float* dout,
                   const float* att, const float* q, const float* k, const float* v, int64_t B,
                   int64_t T, int64_t nH, int64_t nKV, int64_t D);
// The last Tq queries of each sequence over all Tkv of its keys, causal aligned bottom-right
// (query t sits at position Tkv - Tq + t): the second half of a sequence split in two, whose
// first half is attention_fwd over its own Tkv - Tq keys (the oracle of a split step's
// attention; the same bits as the unsplit attention_fwd). q[B,Tq,nH,D], k/v[B,Tkv,nKV,D] ->
// out[B,Tq,nH,D], att[B,nH,Tq,Tkv]. Backward: dq (=); dk, dv over all Tkv keys (+=), so the
// first half's attention_bwd gradients of its keys are added to what this leaves there.
void attention_tail_fwd(float* out, float* att, const float* q, const float* k, const float* v,
                        int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D);
void attention_tail_bwd(float* dq /*=*/, float* dk /*+=*/, float* dv /*+=*/, const float* dout,
                        const float* att, const float* q, const float* k, const float* v,
                        int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D);

// ---- router: probs = softmax(logits) (fp32), top-k (descending; ties to the lower index),
// weights = top-k probs, renormalised to sum 1 when norm_topk.
void router_fwd(float* probs /*[N,E]*/, int32_t* topk_idx /*[N,K]*/, float* topk_w /*[N,K]*/,
                const float* logits /*[N,E]*/, int64_t N, int64_t E, int64_t K, bool norm_topk);
// dlogits (=) from dtopk_w[N,K] plus an optional extra gradient on probs (the aux loss).
void router_bwd(float* dlogits /*[N,E]*/, const float* dtopk_w, const float* dprobs_extra,
                const float* probs, const int32_t* topk_idx, int64_t N, int64_t E, int64_t K,
                bool norm_topk);

// ---- MoE layout: sort the N*K (token, pick) slots by expert, stable in slot order --------------
// offsets[E+1]: rows of expert e are [offsets[e], offsets[e+1]); slot_row[N*K]: the row of slot
// n*K+j in expert order.
void moe_layout(int32_t* offsets, int32_t* slot_row, const int32_t* topk_idx, int64_t N,
                int64_t E, int64_t K);
// permute: xs[slot_row[n*K+j], :] = x[n, :]           xs[N*K, C]
void permute_fwd(float* xs, const float* x, const int32_t* slot_row, int64_t N, int64_t K,
                 int64_t C);
void permute_bwd(float* dx /*[N,C] =*/, const float* dxs, const int32_t* slot_row, int64_t N,
                 int64_t K, int64_t C);
// unpermute: out[n, :] = sum_j w[n,j] * ys[slot_row[n*K+j], :]
void unpermute_fwd(float* out, const float* ys, const float* w, const int32_t* slot_row,
                   int64_t N, int64_t K, int64_t C);
void unpermute_bwd(float* dys /*[N*K,C] =*/, float* dw /*[N,K] =*/, const float* dout,
                   const float* ys, const float* w, const int32_t* slot_row, int64_t N, int64_t K,
                   int64_t C);

// ---- grouped linear over experts: rows [off[e], off[e+1]) of x use w[e]: out = x @ w[e]^T ------
// x[R,I], w[E,O,I], out[R,O] with R = offsets[E].
void grouped_linear_fwd(float* out, const float* x, const float* w, const int32_t* offsets,
                        int64_t E, int64_t I, int64_t O);
void grouped_linear_bwd(float* dx /*=*/, float* dw /*+=*/, const float* dout, const float* x,
                        const float* w, const int32_t* offsets, int64_t E, int64_t I, int64_t O);

// ---- SwiGLU on a fused gate|up row: gu[N, 2F] (gate = cols [0,F), up = [F,2F)) -> out[N, F] -----
void swiglu_fwd(float* out, const float* gu, int64_t N, int64_t F);
void swiglu_bwd(float* dgu /*[N,2F] =*/, const float* dout, const float* gu, int64_t N, int64_t F);

// ---- cross-entropy on logits[N,V] with targets[N] (-100 = ignored) -----------------------------
// losses[n] = lse - logit[target] (0 when ignored); lse[n] saved for backward.
void cross_entropy_fwd(float* losses, float* lse, const float* logits, const int64_t* targets,
                       int64_t N, int64_t V);
// dlogits (=) = scale * (softmax - onehot) on labelled rows, 0 on ignored rows.
void cross_entropy_bwd(float* dlogits, const float* logits, const float* lse,
                       const int64_t* targets, float scale, int64_t N, int64_t V);

// ---- load-balancing aux loss (Switch / HF load_balancing_loss_func) ------------------------------
// probs[N,E] and topk_idx[N,K] of every MoE layer concatenated along N.
// aux = E * sum_{k,e} f[k,e] * P[e], f = mean_n onehot(idx[n,k]), P = mean_n probs[n].
float aux_loss_fwd(const float* probs, const int32_t* topk_idx, int64_t N, int64_t E, int64_t K);
// dprobs (=) = daux * E * (sum_k f[k,e]) / N  (no gradient through the top-k mask).
void aux_loss_bwd(float* dprobs, float daux, const int32_t* topk_idx, int64_t N, int64_t E,
                  int64_t K);

// ---- optimizer ------------------------------------------------------------------------------
// torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). t starts at 1.
void adamw_step(float* p, const float* g, float* m, float* v, int64_t n, float lr, float b1,
                float b2, float eps, float wd, int64_t t);
// sum of squares (double accumulation) for the global grad norm.
double sum_squares(const float* x, int64_t n);
void scale_inplace(float* x, float s, int64_t n);

}  // namespace automoe::cpu
