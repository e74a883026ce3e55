// model/qwen3_moe.h: the Qwen3-MoE model on the CPU backend (fp32): parameters in one arena,
// a forward that saves what the backward needs, and a hand-written backward (llm.c style).
// Parity target: transformers v5 Qwen3MoeForCausalLM (shared/design/QWEN3_MOE.md).
//
// Legend: B batch, T sequence, N = B*T tokens, H hidden, V vocab, nH/nKV heads, D head dim,
// E experts, K top-k, I expert width, F dense MLP width, L layers.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/config.h"
#include "model/params.h"

namespace automoe {

namespace dist {
struct Groups;
}

// One micro-batch. ids/labels [B,T] (label -100 = no loss; labels are shifted inside, as HF).
struct Batch {
  int64_t B = 0, T = 0;
  std::vector<int64_t> ids, labels;
  std::vector<int32_t> pos;  // [B*T] positions; empty = 0..T-1 per row
  std::vector<int32_t> doc;  // [B*T] document ids for packed rows; empty = one document per row
};

// Block boundaries of a forward and a backward, for a caller that moves parameters or gradients
// there (dist/zero3.h: ZeRO-3 gathers a block's parameters before it, releases them after it and
// reduce-scatters its gradients after its backward). Blocks in forward order: 0 the embedding,
// 1..L the decoder layers, L+1 the final norm and lm_head (Qwen3Moe::num_blocks()).
enum class Pass { kForward, kBackward };
class BlockHooks {
 public:
  virtual ~BlockHooks() = default;
  // Before block `b` reads its parameters (Qwen3Moe::block_params(b, pass)).
  virtual void before(Pass pass, int64_t b) = 0;
  // After block `b` has read its parameters for the last time in this pass (backward: and has
  // written the gradients it writes).
  virtual void after(Pass pass, int64_t b) = 0;
};

struct LossParts {
  float loss = 0;      // ce + coef * aux (the trained objective)
  float ce = 0;        // mean cross-entropy over labelled tokens (or sum / denominator)
  float aux = 0;       // load-balancing loss (unscaled), 0 when not computed
  bool has_aux = false;
  int64_t labelled = 0;  // tokens with a label
};

// Parallel runs (dist/process_group.h): with `groups` spanning several ranks, each rank runs its
// own micro-batch; the loss, the aux loss and LossParts are those of the GLOBAL batch (all ranks
// concatenated, labelled tokens all-reduced), and with an expert-parallel group of P > 1 ranks
// this rank holds experts [expert_first(), expert_first() + local_experts()) only (the arena
// shrinks; the MoE layers dispatch tokens to the ranks holding their experts). Gradients stay
// local: dist::allreduce_grads sums them. Without groups (or world size 1) nothing changes.
class Qwen3Moe {
 public:
  // host_arenas = false: the layout and HF names only, with empty params()/grads() (the CUDA
  // model's bookkeeping, or a caller that sizes params() itself).
  explicit Qwen3Moe(const ModelConfig& cfg, const dist::Groups* groups = nullptr,
                    bool host_arenas = true);

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  const std::vector<HfSlice>& hf_slices() const { return hf_; }        // per-expert names
  const std::vector<HfSlice>& hf_fused_slices() const { return hf_fused_; }  // v5 fused names
  std::vector<float>& params() { return params_; }
  std::vector<float>& grads() { return grads_; }
  const std::vector<float>& params() const { return params_; }
  const std::vector<float>& grads() const { return grads_; }

  const dist::Groups* groups() const { return groups_; }  // null: a single process
  bool expert_parallel() const { return ep_; }
  int64_t expert_first() const { return ex_first_; }
  int64_t local_experts() const { return ex_count_; }
  // Elements of the whole model (every expert), whatever this rank holds.
  int64_t global_numel() const;

  // Hooks at block boundaries (null, the default: none; a run without hooks is unchanged).
  void set_hooks(BlockHooks* h) { hooks_ = h; }
  int64_t num_blocks() const { return cfg_.num_hidden_layers + 2; }
  // The tensors (indices into layout().params, ascending) block `b` reads in `pass`. A block's
  // backward writes the gradients of the tensors its forward reads; the embedding's backward
  // reads none (a scatter-add of rows). Tied embeddings: the head reads "wte" too.
  std::vector<int64_t> block_params(int64_t b, Pass pass) const;

  // HF-style random init: normal(0, std) for matrices, ones for norm weights, zeros for biases.
  // Draws as for the whole model, so an expert shard gets the values one process would.
  void init_random(Rng& rng, float std = 0.02f);

  // Forward with loss. `ce_denominator` > 0 divides the summed CE by it (gradient accumulation
  // across micro-batches, as the HF Trainer's num_items_in_batch); else the mean over this
  // batch's labelled tokens. `aux_scale` multiplies coef*aux (1/accumulation steps).
  // Saves activations for backward(). Logits [N,V] stay available through logits().
  LossParts forward(const Batch& b, float ce_denominator = 0.f, float aux_scale = 1.f);
  // Accumulates (+=) d(loss)/d(params) into grads() for the last forward.
  void backward();
  void zero_grad();

  // Expert parallelism: move expert work off the busiest EP ranks within each MoE layer's step
  // (dist/ep_balance.h; train.ep_balance). The same loss and gradients within fp32 rounding.
  // ep_balance_moves(): of the MoE layer forwards so far with it on (ep_balance_forwards()), how
  // many moved work (the same on every rank: one plan).
  void set_ep_balance(bool on, double tol = 0.05, int max_borrowed = 8) {
    ep_balance_ = on;
    ep_balance_tol_ = tol;
    ep_balance_max_ = max_borrowed;
  }
  int64_t ep_balance_moves() const { return ep_balance_moves_; }
  int64_t ep_balance_forwards() const { return ep_balance_forwards_; }

  const std::vector<float>& logits() const { return logits_; }  // [N,V]
  // Top-k experts of every MoE layer in the last forward, [nMoE * N, K] (parity tools).
  const std::vector<int32_t>& router_topk() const { return topk_all_; }

 private:
  struct LayerW;  // pointers into an arena for one layer
  struct LayerActs;
  LayerW layer_ptrs(float* base, int64_t l) const;
  void plan(int64_t B, int64_t T);

  ModelConfig cfg_;
  const dist::Groups* groups_ = nullptr;
  bool ep_ = false, dist_ = false;  // expert parallel (EP group > 1); several ranks (world > 1)
  int64_t ex_first_ = 0, ex_count_ = 0;  // the experts this rank holds
  ParamLayout layout_;
  std::vector<HfSlice> hf_, hf_fused_;
  std::vector<float> params_, grads_;

  // Offsets of the named parameters (indices into layout_.params for each layer).
  struct LayerOff {
    int64_t ln1, wq, bq = -1, wk, bk = -1, wv, bv = -1, wo, bo = -1, qn, kn, ln2;
    bool moe;
    int64_t router = -1, ex_gu = -1, ex_down = -1;  // MoE
    int64_t mlp_gu = -1, mlp_down = -1;             // dense
    int64_t moe_index = -1;                         // which MoE layer (for the aux buffers)
  };
  std::vector<LayerOff> lo_;
  int64_t off_wte_ = 0, off_lnf_ = 0, off_lm_head_ = 0;  // lm_head == wte when tied
  int64_t wte_ = 0, lnf_ = 0, lm_head_ = 0;              // their indices in layout_.params
  BlockHooks* hooks_ = nullptr;
  bool ep_balance_ = false;  // set_ep_balance
  double ep_balance_tol_ = 0.05;
  int ep_balance_max_ = 8;
  int64_t ep_balance_moves_ = 0, ep_balance_forwards_ = 0;
  void hook_before(Pass p, int64_t b) { if (hooks_) hooks_->before(p, b); }
  void hook_after(Pass p, int64_t b) { if (hooks_) hooks_->after(p, b); }

  // Saved activations, planned for the current (B, T).
  int64_t B_ = 0, T_ = 0;
  std::vector<int64_t> ids_;  // [N] input ids of the last forward (embedding backward)
  bool have_forward_ = false;
  std::vector<int32_t> pos_, doc_;
  std::vector<int64_t> targets_;  // [N] shifted labels
  float ce_scale_ = 0.f, aux_grad_ = 0.f;
  std::vector<LayerActs*> acts_;
  std::vector<float> x_final_, lnf_out_, lnf_rstd_, logits_, lse_, losses_;
  std::vector<float> probs_all_;      // [nMoE * N, E]
  std::vector<int32_t> topk_all_;     // [nMoE * N, K]
  std::vector<double> aux_fsum_;      // [E] global sum_k f[k,e] (several ranks)
  double aux_rows_ = 0;               // rows of the global aux batch (several ranks)
  // backward scratch
  std::vector<float> dres_, dln_, dlogits_;

 public:
  ~Qwen3Moe();
  Qwen3Moe(const Qwen3Moe&) = delete;
  Qwen3Moe& operator=(const Qwen3Moe&) = delete;
};

}  // namespace automoe
