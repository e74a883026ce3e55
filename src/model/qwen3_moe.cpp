// model/qwen3_moe.cpp: Qwen3-MoE forward and hand-written backward on the CPU reference ops.
// Backward rule: parameter gradients accumulate (+=); the residual gradient dres_ flows down.
#include "model/qwen3_moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "dist/data_parallel.h"
#include "dist/expert_parallel.h"
#include "ops/ops.h"

namespace automoe {

using namespace automoe::cpu;

struct Qwen3Moe::LayerW {
  float *ln1, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *qn, *kn, *ln2;
  float *router, *ex_gu, *ex_down, *mlp_gu, *mlp_down;
};

// Everything one layer's backward needs, planned for (B, T).
struct Qwen3Moe::LayerActs {
  std::vector<float> x_in;            // [N,H] residual stream entering the layer
  std::vector<float> ln1, ln1_rstd;   // [N,H], [N]
  std::vector<float> q_pre, q_rstd, q_n, q;  // [N,nH*D] raw, [N*nH], normed, roped
  std::vector<float> k_pre, k_rstd, k_n, k;  // [N,nKV*D] ...
  std::vector<float> v;               // [N,nKV*D]
  std::vector<float> att;             // [B,nH,T,T]
  std::vector<float> ao;              // [N,nH*D] attention output before o_proj
  std::vector<float> x_mid;           // [N,H] after the attention residual
  std::vector<float> ln2, ln2_rstd;   // [N,H], [N]
  // MoE
  std::vector<float> rlogits, topk_w;  // [N,E], [N,K]
  std::vector<int32_t> offsets, slot_row;  // [E+1], [N*K]
  std::vector<float> xs, gu, act, ys;  // [NK,H], [NK,2I], [NK,I], [NK,H]
  // dense MLP reuses gu [N,2F], act [N,F]
  std::unique_ptr<dist::EpMoeActs> ep;  // expert parallel: the expert block's own activations
};

Qwen3Moe::~Qwen3Moe() {
  for (auto* a : acts_) delete a;
}

Qwen3Moe::Qwen3Moe(const ModelConfig& c, const dist::Groups* groups, bool host_arenas)
    : cfg_(c), groups_(groups) {
  const int64_t H = c.hidden_size, V = c.vocab_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                I = c.moe_intermediate_size, F = c.intermediate_size;
  dist_ = groups && groups->world.size() > 1;
  ep_ = groups && groups->ep.size() > 1 && c.num_moe_layers() > 0;
  ex_first_ = 0;
  ex_count_ = E;
  if (ep_) {
    dist::ExpertShard sh = dist::expert_shard(E, groups->ep.rank(), groups->ep.size());
    ex_first_ = sh.first;
    ex_count_ = sh.count;
  }
  const int64_t El = ex_count_;
  auto add = [&](const std::string& n, Shape s) {
    layout_.add(n, s);
    return int64_t(layout_.params.size() - 1);
  };
  auto hf = [&](const std::string& name, int64_t pidx, int64_t elem_off, Shape s) {
    hf_.push_back({name, s, layout_.params[pidx].offset + elem_off, numel_of(s)});
  };
  auto both = [&](const std::string& name, int64_t pidx) {  // same name in both formats
    hf(name, pidx, 0, layout_.params[pidx].shape);
    hf_fused_.push_back(hf_.back());
  };
  int64_t wte = add("wte", {V, H});
  both("model.embed_tokens.weight", wte);
  int64_t moe_i = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::string p = "layers." + std::to_string(l) + ".", h = "model.layers." + std::to_string(l) + ".";
    LayerOff o{};
    o.ln1 = add(p + "ln1", {H});
    both(h + "input_layernorm.weight", o.ln1);
    o.wq = add(p + "attn.wq", {nH * D, H});
    both(h + "self_attn.q_proj.weight", o.wq);
    o.wk = add(p + "attn.wk", {nKV * D, H});
    both(h + "self_attn.k_proj.weight", o.wk);
    o.wv = add(p + "attn.wv", {nKV * D, H});
    both(h + "self_attn.v_proj.weight", o.wv);
    o.wo = add(p + "attn.wo", {H, nH * D});
    both(h + "self_attn.o_proj.weight", o.wo);
    if (c.attention_bias) {
      o.bq = add(p + "attn.bq", {nH * D});
      both(h + "self_attn.q_proj.bias", o.bq);
      o.bk = add(p + "attn.bk", {nKV * D});
      both(h + "self_attn.k_proj.bias", o.bk);
      o.bv = add(p + "attn.bv", {nKV * D});
      both(h + "self_attn.v_proj.bias", o.bv);
      o.bo = add(p + "attn.bo", {H});
      both(h + "self_attn.o_proj.bias", o.bo);
    }
    o.qn = add(p + "attn.q_norm", {D});
    both(h + "self_attn.q_norm.weight", o.qn);
    o.kn = add(p + "attn.k_norm", {D});
    both(h + "self_attn.k_norm.weight", o.kn);
    o.ln2 = add(p + "ln2", {H});
    both(h + "post_attention_layernorm.weight", o.ln2);
    o.moe = c.is_moe_layer(l);
    if (o.moe) {
      o.moe_index = moe_i++;
      o.router = add(p + "moe.router", {E, H});
      both(h + "mlp.gate.weight", o.router);
      // this rank's experts [ex_first_, ex_first_ + El): all of them without expert parallelism
      o.ex_gu = add(p + "moe.experts_gate_up", {El, 2 * I, H});
      o.ex_down = add(p + "moe.experts_down", {El, H, I});
      layout_.params[o.ex_gu].expert = layout_.params[o.ex_down].expert = true;
      for (int64_t e = 0; e < El; ++e) {
        const int64_t ge = ex_first_ + e;  // the expert's index in the model
        std::string x = h + "mlp.experts." + std::to_string(ge) + ".";
        hf(x + "gate_proj.weight", o.ex_gu, e * 2 * I * H, {I, H});
        hf(x + "up_proj.weight", o.ex_gu, e * 2 * I * H + I * H, {I, H});
        hf(x + "down_proj.weight", o.ex_down, e * H * I, {H, I});
        for (int k = 1; k <= 3; ++k) {
          hf_[hf_.size() - k].layer = l;
          hf_[hf_.size() - k].expert = ge;
        }
      }
      // fused keys hold every expert: this rank's chunk starts at its first expert
      auto& gu = layout_.params[o.ex_gu];
      hf_fused_.push_back({h + "mlp.experts.gate_up_proj", {E, 2 * I, H}, gu.offset, gu.numel, ex_first_ * 2 * I * H});
      auto& dn = layout_.params[o.ex_down];
      hf_fused_.push_back({h + "mlp.experts.down_proj", {E, H, I}, dn.offset, dn.numel, ex_first_ * H * I});
    } else {
      o.mlp_gu = add(p + "mlp.gate_up", {2 * F, H});
      o.mlp_down = add(p + "mlp.down", {H, F});
      for (auto* v : {&hf_, &hf_fused_}) {
        auto& gu = layout_.params[o.mlp_gu];
        v->push_back({h + "mlp.gate_proj.weight", {F, H}, gu.offset, F * H});
        v->push_back({h + "mlp.up_proj.weight", {F, H}, gu.offset + F * H, F * H});
        auto& dn = layout_.params[o.mlp_down];
        v->push_back({h + "mlp.down_proj.weight", dn.shape, dn.offset, dn.numel});
      }
    }
    lo_.push_back(o);
  }
  int64_t lnf = add("ln_f", {H});
  both("model.norm.weight", lnf);
  wte_ = lm_head_ = wte;
  lnf_ = lnf;
  if (!c.tie_word_embeddings) {
    lm_head_ = add("lm_head", {V, H});
    both("lm_head.weight", lm_head_);
  }
  off_wte_ = layout_.params[wte_].offset;
  off_lnf_ = layout_.params[lnf_].offset;
  off_lm_head_ = layout_.params[lm_head_].offset;
  if (host_arenas) {
    params_.assign(layout_.total, 0.f);
    grads_.assign(layout_.total, 0.f);
  }
}

Qwen3Moe::LayerW Qwen3Moe::layer_ptrs(float* base, int64_t l) const {
  const LayerOff& o = lo_[l];
  auto P = [&](int64_t idx) { return idx < 0 ? nullptr : base + layout_.params[idx].offset; };
  return {P(o.ln1), P(o.wq), P(o.bq), P(o.wk), P(o.bk), P(o.wv), P(o.bv), P(o.wo), P(o.bo),
          P(o.qn), P(o.kn), P(o.ln2), P(o.router), P(o.ex_gu), P(o.ex_down), P(o.mlp_gu),
          P(o.mlp_down)};
}

std::vector<int64_t> Qwen3Moe::block_params(int64_t b, Pass pass) const {
  AM_CHECK(b >= 0 && b < num_blocks(), "internal: block {} of {}", b, num_blocks());
  std::vector<int64_t> out;
  if (b == 0) {
    if (pass == Pass::kForward) out = {wte_};
  } else if (b == num_blocks() - 1) {
    out = {lnf_, lm_head_};  // lm_head_ == wte_ (index 0) when tied
  } else {
    const LayerOff& o = lo_[size_t(b - 1)];
    for (int64_t i : {o.ln1, o.wq, o.bq, o.wk, o.bk, o.wv, o.bv, o.wo, o.bo, o.qn, o.kn, o.ln2,
                      o.router, o.ex_gu, o.ex_down, o.mlp_gu, o.mlp_down})
      if (i >= 0) out.push_back(i);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void Qwen3Moe::init_random(Rng& rng, float std) {
  for (auto& p : layout_.params) {
    float* x = params_.data() + p.offset;
    bool is_norm = p.shape.size() == 1 && p.name.find("attn.b") == std::string::npos;
    bool is_bias = p.shape.size() == 1 && !is_norm;
    // An expert shard draws the whole tensor and keeps elements [keep, keep + numel).
    int64_t total = p.numel, keep = 0;
    if (p.expert && ep_) {
      total = p.numel / ex_count_ * cfg_.num_experts;
      keep = p.numel / ex_count_ * ex_first_;
    }
    for (int64_t i = 0; i < total; ++i) {
      float v = is_norm ? 1.0f : is_bias ? 0.0f : float(rng.normal() * std);
      if (i >= keep && i < keep + p.numel) x[i - keep] = v;
    }
  }
}

int64_t Qwen3Moe::global_numel() const {
  int64_t n = 0;
  for (auto& p : layout_.params) n += p.expert && ep_ ? p.numel / ex_count_ * cfg_.num_experts : p.numel;
  return n;
}

void Qwen3Moe::zero_grad() { std::fill(grads_.begin(), grads_.end(), 0.f); }

void Qwen3Moe::plan(int64_t B, int64_t T) {
  if (B == B_ && T == T_ && !acts_.empty()) return;
  B_ = B;
  T_ = T;
  const auto& c = cfg_;
  const int64_t N = B * T, H = c.hidden_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                K = c.num_experts_per_tok, I = c.moe_intermediate_size,
                F = c.intermediate_size, V = c.vocab_size;
  for (auto* a : acts_) delete a;
  acts_.clear();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto* a = new LayerActs;
    a->x_in.resize(N * H);
    a->ln1.resize(N * H);
    a->ln1_rstd.resize(N);
    for (auto* v : {&a->q_pre, &a->q_n, &a->q, &a->ao}) v->resize(N * nH * D);
    a->q_rstd.resize(N * nH);
    for (auto* v : {&a->k_pre, &a->k_n, &a->k, &a->v}) v->resize(N * nKV * D);
    a->k_rstd.resize(N * nKV);
    a->att.resize(B * nH * T * T);
    a->x_mid.resize(N * H);
    a->ln2.resize(N * H);
    a->ln2_rstd.resize(N);
    if (lo_[l].moe && ep_) {  // the expert block sizes its buffers per forward
      a->rlogits.resize(N * E);
      a->topk_w.resize(N * K);
      a->ep = std::make_unique<dist::EpMoeActs>();
    } else if (lo_[l].moe) {
      a->rlogits.resize(N * E);
      a->topk_w.resize(N * K);
      a->offsets.resize(E + 1);
      a->slot_row.resize(N * K);
      a->xs.resize(N * K * H);
      a->gu.resize(N * K * 2 * I);
      a->act.resize(N * K * I);
      a->ys.resize(N * K * H);
    } else {
      a->gu.resize(N * 2 * F);
      a->act.resize(N * F);
    }
    acts_.push_back(a);
  }
  x_final_.resize(N * H);
  lnf_out_.resize(N * H);
  lnf_rstd_.resize(N);
  logits_.resize(N * V);
  lse_.resize(N);
  losses_.resize(N);
  probs_all_.resize(c.num_moe_layers() * N * E);
  topk_all_.resize(c.num_moe_layers() * N * K);
  dres_.resize(N * H);
  dln_.resize(N * H);
  dlogits_.resize(N * V);
  pos_.resize(N);
  doc_.resize(N);
  targets_.resize(N);
}

LossParts Qwen3Moe::forward(const Batch& b, float ce_denominator, float aux_scale) {
  const auto& c = cfg_;
  const int64_t B = b.B, T = b.T, N = B * T, H = c.hidden_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                K = c.num_experts_per_tok, I = c.moe_intermediate_size,
                F = c.intermediate_size, V = c.vocab_size;
  AM_CHECK(int64_t(b.ids.size()) == N, "batch has {} ids, expected B*T = {}", b.ids.size(), N);
  AM_CHECK(b.labels.empty() || int64_t(b.labels.size()) == N, "batch labels must be [B,T]");
  for (int64_t i = 0; i < N; ++i)
    AM_CHECK(b.ids[i] >= 0 && b.ids[i] < V,
             "input id {} at row {}, position {} is outside the vocabulary [0, {}); check the "
             "tokenizer matches the model",
             b.ids[i], i / T, i % T, V);
  plan(B, T);
  ids_ = b.ids;
  have_forward_ = true;
  for (int64_t i = 0; i < N; ++i) {
    pos_[i] = b.pos.empty() ? int32_t(i % T) : b.pos[i];
    doc_[i] = b.doc.empty() ? 0 : b.doc[i];
  }
  // Shifted targets: position t is scored against labels[t+1] of the same row.
  int64_t labelled = 0;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < T; ++t) {
      int64_t y = (t + 1 < T && !b.labels.empty()) ? b.labels[r * T + t + 1] : -100;
      AM_CHECK(y == -100 || (y >= 0 && y < V), "label {} at row {}, position {} is outside the vocabulary [0, {})", y, r, t + 1, V);
      targets_[r * T + t] = y;
      labelled += y != -100;
    }

  float* P = params_.data();
  std::vector<float> tmp;  // scratch (sized once per call; CPU reference)
  const int64_t head = num_blocks() - 1;  // blocks: 0 embedding, 1 + l layer l, head
  hook_before(Pass::kForward, 0);
  embedding_fwd(acts_[0]->x_in.data(), b.ids.data(), P + off_wte_, N, H);
  hook_after(Pass::kForward, 0);
  const float eps = float(c.rms_norm_eps), theta = float(c.rope_theta);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerActs& a = *acts_[l];
    LayerW w = layer_ptrs(P, l);
    hook_before(Pass::kForward, 1 + l);
    float* x_out = l + 1 < c.num_hidden_layers ? acts_[l + 1]->x_in.data() : x_final_.data();
    // attention block
    rmsnorm_fwd(a.ln1.data(), a.ln1_rstd.data(), a.x_in.data(), w.ln1, N, H, eps);
    linear_fwd(a.q_pre.data(), a.ln1.data(), w.wq, w.bq, N, H, nH * D);
    linear_fwd(a.k_pre.data(), a.ln1.data(), w.wk, w.bk, N, H, nKV * D);
    linear_fwd(a.v.data(), a.ln1.data(), w.wv, w.bv, N, H, nKV * D);
    rmsnorm_fwd(a.q_n.data(), a.q_rstd.data(), a.q_pre.data(), w.qn, N * nH, D, eps);
    rmsnorm_fwd(a.k_n.data(), a.k_rstd.data(), a.k_pre.data(), w.kn, N * nKV, D, eps);
    rope_fwd(a.q.data(), a.q_n.data(), pos_.data(), N, nH, D, theta);
    rope_fwd(a.k.data(), a.k_n.data(), pos_.data(), N, nKV, D, theta);
    attention_fwd(a.ao.data(), a.att.data(), a.q.data(), a.k.data(), a.v.data(),
                  b.doc.empty() ? nullptr : doc_.data(), B, T, nH, nKV, D);
    linear_fwd(a.x_mid.data(), a.ao.data(), w.wo, w.bo, N, nH * D, H);
    for (int64_t i = 0; i < N * H; ++i) a.x_mid[i] += a.x_in[i];
    // MLP block
    rmsnorm_fwd(a.ln2.data(), a.ln2_rstd.data(), a.x_mid.data(), w.ln2, N, H, eps);
    tmp.resize(N * H);
    if (lo_[l].moe) {
      int64_t mi = lo_[l].moe_index;
      float* probs = probs_all_.data() + mi * N * E;
      int32_t* idx = topk_all_.data() + mi * N * K;
      linear_fwd(a.rlogits.data(), a.ln2.data(), w.router, nullptr, N, H, E);
      router_fwd(probs, idx, a.topk_w.data(), a.rlogits.data(), N, E, K, c.norm_topk_prob);
      if (ep_) {  // experts on the EP group: layout, dispatch, local experts, combine
        dist::EpBalanceOptions bal;
        bal.on = ep_balance_;
        bal.tol = ep_balance_tol_;
        bal.max_borrowed = ep_balance_max_;
        dist::ep_moe_fwd(tmp.data(), *a.ep, a.ln2.data(), idx, a.topk_w.data(), w.ex_gu, w.ex_down,
                         N, H, I, K, {E, ex_first_, ex_count_}, groups_->ep, bal);
        if (ep_balance_) ++ep_balance_forwards_;
        if (a.ep->bal.moved()) ++ep_balance_moves_;
      } else {
        moe_layout(a.offsets.data(), a.slot_row.data(), idx, N, E, K);
        permute_fwd(a.xs.data(), a.ln2.data(), a.slot_row.data(), N, K, H);
        grouped_linear_fwd(a.gu.data(), a.xs.data(), w.ex_gu, a.offsets.data(), E, H, 2 * I);
        swiglu_fwd(a.act.data(), a.gu.data(), N * K, I);
        grouped_linear_fwd(a.ys.data(), a.act.data(), w.ex_down, a.offsets.data(), E, I, H);
        unpermute_fwd(tmp.data(), a.ys.data(), a.topk_w.data(), a.slot_row.data(), N, K, H);
      }
    } else {
      linear_fwd(a.gu.data(), a.ln2.data(), w.mlp_gu, nullptr, N, H, 2 * F);
      swiglu_fwd(a.act.data(), a.gu.data(), N, F);
      linear_fwd(tmp.data(), a.act.data(), w.mlp_down, nullptr, N, F, H);
    }
    for (int64_t i = 0; i < N * H; ++i) x_out[i] = a.x_mid[i] + tmp[i];
    hook_after(Pass::kForward, 1 + l);
  }
  hook_before(Pass::kForward, head);
  rmsnorm_fwd(lnf_out_.data(), lnf_rstd_.data(), x_final_.data(), P + off_lnf_, N, H, eps);
  linear_fwd(logits_.data(), lnf_out_.data(), P + off_lm_head_, nullptr, N, H, V);
  hook_after(Pass::kForward, head);
  cross_entropy_fwd(losses_.data(), lse_.data(), logits_.data(), targets_.data(), N, V);

  LossParts out;
  double sum = 0.0;
  for (int64_t i = 0; i < N; ++i) sum += losses_[i];
  if (dist_) {  // the global batch: CE summed and labelled tokens counted over every rank
    double both[2] = {sum, double(labelled)};
    groups_->world.allreduce_sum(both, 2);
    sum = both[0];
    labelled = int64_t(both[1]);
  }
  out.labelled = labelled;
  float denom = ce_denominator > 0 ? ce_denominator : float(labelled);
  // HF: mean over labelled tokens; with no labelled token the mean is NaN there, 0 here.
  out.ce = denom > 0 ? float(sum / denom) : 0.f;
  ce_scale_ = denom > 0 ? 1.0f / denom : 0.f;
  out.loss = out.ce;
  aux_grad_ = 0.f;
  if (c.output_router_logits && c.num_moe_layers() > 0) {
    if (dist_) {  // f and P over the global batch
      aux_fsum_.resize(E);
      out.aux = dist::aux_loss_global_fwd(aux_fsum_.data(), &aux_rows_, probs_all_.data(),
                                          topk_all_.data(), c.num_moe_layers() * N, E, K,
                                          groups_->world);
    } else {
      out.aux = aux_loss_fwd(probs_all_.data(), topk_all_.data(), c.num_moe_layers() * N, E, K);
    }
    out.has_aux = true;
    aux_grad_ = float(c.router_aux_loss_coef) * aux_scale;
    out.loss += aux_grad_ * out.aux;
  }
  return out;
}

void Qwen3Moe::backward() {
  AM_CHECK(have_forward_, "backward() needs a forward() first");
  const auto& c = cfg_;
  const int64_t B = B_, T = T_, N = B * T, H = c.hidden_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                K = c.num_experts_per_tok, I = c.moe_intermediate_size,
                F = c.intermediate_size, V = c.vocab_size;
  float* P = params_.data();
  float* G = grads_.data();
  const int64_t head = num_blocks() - 1;
  hook_before(Pass::kBackward, head);
  // lm_head + CE
  cross_entropy_bwd(dlogits_.data(), logits_.data(), lse_.data(), targets_.data(), ce_scale_, N, V);
  linear_bwd(dln_.data(), 0.f, G + off_lm_head_, nullptr, dlogits_.data(), lnf_out_.data(),
             P + off_lm_head_, N, H, V);
  rmsnorm_bwd(dres_.data(), G + off_lnf_, dln_.data(), x_final_.data(), P + off_lnf_,
              lnf_rstd_.data(), N, H);
  hook_after(Pass::kBackward, head);
  // aux loss: d(coef*aux)/dprobs for all MoE layers at once
  std::vector<float> dprobs_all;
  if (aux_grad_ != 0.f) {
    dprobs_all.resize(probs_all_.size());
    if (dist_)
      dist::aux_loss_global_bwd(dprobs_all.data(), aux_grad_, aux_fsum_.data(), aux_rows_,
                                c.num_moe_layers() * N, E);
    else
      aux_loss_bwd(dprobs_all.data(), aux_grad_, topk_all_.data(), c.num_moe_layers() * N, E, K);
  }
  std::vector<float> d1, d2, d3, dw;  // scratch, grown to the largest need, reused per layer
  // the attention block's gradients, the same size in every layer: allocated once per call
  std::vector<float> dao(N * nH * D), dq(N * nH * D), dk(N * nKV * D), dv(N * nKV * D);
  std::vector<float> dqn(N * nH * D), dkn(N * nKV * D);
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    LayerActs& a = *acts_[l];
    LayerW w = layer_ptrs(P, l), g = layer_ptrs(G, l);
    hook_before(Pass::kBackward, 1 + l);
    // ---- MLP block: out = x_mid + mlp(ln2(x_mid)); dres_ is d(out)
    if (lo_[l].moe) {
      int64_t mi = lo_[l].moe_index;
      const float* probs = probs_all_.data() + mi * N * E;
      const int32_t* idx = topk_all_.data() + mi * N * K;
      dw.resize(N * K);  // d topk weights
      if (ep_) {  // combine's gradient is a dispatch, dispatch's a combine
        dist::ep_moe_bwd(dln_.data(), dw.data(), g.ex_gu, g.ex_down, dres_.data(), *a.ep, w.ex_gu,
                         w.ex_down, H, I, {E, ex_first_, ex_count_}, groups_->ep);
      } else {
        d1.resize(N * K * H);  // dys
        unpermute_bwd(d1.data(), dw.data(), dres_.data(), a.ys.data(), a.topk_w.data(),
                      a.slot_row.data(), N, K, H);
        d2.resize(N * K * I);  // dact
        grouped_linear_bwd(d2.data(), g.ex_down, d1.data(), a.act.data(), w.ex_down,
                           a.offsets.data(), E, I, H);
        d3.resize(N * K * 2 * I);  // dgu
        swiglu_bwd(d3.data(), d2.data(), a.gu.data(), N * K, I);
        d1.resize(N * K * H);  // dxs
        grouped_linear_bwd(d1.data(), g.ex_gu, d3.data(), a.xs.data(), w.ex_gu, a.offsets.data(),
                           E, H, 2 * I);
        permute_bwd(dln_.data(), d1.data(), a.slot_row.data(), N, K, H);
      }
      d2.resize(N * E);  // drouter logits
      router_bwd(d2.data(), dw.data(), dprobs_all.empty() ? nullptr : dprobs_all.data() + mi * N * E,
                 probs, idx, N, E, K, c.norm_topk_prob);
      linear_bwd(dln_.data(), 1.f, g.router, nullptr, d2.data(), a.ln2.data(), w.router, N, H, E);
    } else {
      d2.resize(N * F);
      linear_bwd(d2.data(), 0.f, g.mlp_down, nullptr, dres_.data(), a.act.data(), w.mlp_down, N,
                 F, H);
      d3.resize(N * 2 * F);
      swiglu_bwd(d3.data(), d2.data(), a.gu.data(), N, F);
      linear_bwd(dln_.data(), 0.f, g.mlp_gu, nullptr, d3.data(), a.ln2.data(), w.mlp_gu, N, H,
                 2 * F);
    }
    d1.resize(N * H);
    rmsnorm_bwd(d1.data(), g.ln2, dln_.data(), a.x_mid.data(), w.ln2, a.ln2_rstd.data(), N, H);
    for (int64_t i = 0; i < N * H; ++i) dres_[i] += d1[i];
    // ---- attention block: x_mid = x_in + o_proj(attn(ln1(x_in)))
    linear_bwd(dao.data(), 0.f, g.wo, g.bo, dres_.data(), a.ao.data(), w.wo, N, nH * D, H);
    attention_bwd(dq.data(), dk.data(), dv.data(), dao.data(), a.att.data(), a.q.data(),
                  a.k.data(), a.v.data(), B, T, nH, nKV, D);
    rope_bwd(dqn.data(), dq.data(), pos_.data(), N, nH, D, float(c.rope_theta));
    rope_bwd(dkn.data(), dk.data(), pos_.data(), N, nKV, D, float(c.rope_theta));
    rmsnorm_bwd(dq.data(), g.qn, dqn.data(), a.q_pre.data(), w.qn, a.q_rstd.data(), N * nH, D);
    rmsnorm_bwd(dk.data(), g.kn, dkn.data(), a.k_pre.data(), w.kn, a.k_rstd.data(), N * nKV, D);
    linear_bwd(dln_.data(), 0.f, g.wq, g.bq, dq.data(), a.ln1.data(), w.wq, N, H, nH * D);
    linear_bwd(dln_.data(), 1.f, g.wk, g.bk, dk.data(), a.ln1.data(), w.wk, N, H, nKV * D);
    linear_bwd(dln_.data(), 1.f, g.wv, g.bv, dv.data(), a.ln1.data(), w.wv, N, H, nKV * D);
    rmsnorm_bwd(d1.data(), g.ln1, dln_.data(), a.x_in.data(), w.ln1, a.ln1_rstd.data(), N, H);
    for (int64_t i = 0; i < N * H; ++i) dres_[i] += d1[i];
    hook_after(Pass::kBackward, 1 + l);
  }
  hook_before(Pass::kBackward, 0);
  embedding_bwd(G + off_wte_, dres_.data(), ids_.data(), N, H);
  hook_after(Pass::kBackward, 0);
}

}  // namespace automoe
