// bench/cuda_parity.cpp: the CUDA model (bf16) against the CPU model (fp32, itself exact to
// Transformers 5.17) on the Transformers fixtures under tests/fixtures/hf: logits, loss, aux
// loss and every parameter gradient, in both precisions, plus a packed batch (document masks,
// restarting positions); then 300 AdamW steps of the built-in tiny-moe on the addition task on
// both backends from the same initial weights, and the two loss curves' largest difference.
// The memory-saving mode must equal the default mode bit for bit without clipping (4 steps on
// each fixture).
//   cuda_parity [--steps N] [--skip-train] [--hf-noise FILE]   exit: the number of failed checks
// Limits (bf16 noise against fp32): logits rel-L2 < 2e-2, loss rel < 1e-2, every gradient
// rel-L2 < 5e-2 (gradients whose reference is all zeros: experts nobody picked, must be ~0).
// With --hf-noise (bench/hf_bf16_noise.py: what bf16 costs Transformers itself on the same
// fixture) a logits or gradient limit is max(the fixed one, 3x Transformers' own bf16 error):
// bf16 is judged by bf16's yardstick where a tiny random model is badly conditioned (e.g. the
// softmax backward's cancellation when attention is nearly uniform).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <fstream>

#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "io/safetensors.h"
#include "model/qwen3_moe.h"
#include "model/qwen3_moe_cuda.h"
#include "model/weights.h"
#include "text/dataset.h"
#include "train/adamw.h"
#include "train/builtin.h"
#include "train/schedule.h"

using namespace automoe;

namespace {

const std::string kFix = std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/hf/";
int g_fail = 0;
nlohmann::json g_hf_noise;  // {fixture: {"logits": e, "grads": {name: e}}}; null without --hf-noise

// The limit for one quantity: the fixed one, or 3x Transformers' own bf16 error when known.
double limit_for(const std::string& fixture, const std::string& grad, double fixed, double* hf) {
  *hf = -1;
  if (g_hf_noise.is_null() || !g_hf_noise.contains(fixture)) return fixed;
  const auto& f = g_hf_noise[fixture];
  const nlohmann::json* v = nullptr;
  if (grad.empty()) {
    if (f.contains("logits")) v = &f["logits"];
  } else if (f["grads"].contains(grad)) {
    v = &f["grads"][grad];
  }
  if (!v || !v->is_number()) return fixed;
  *hf = v->get<double>();
  return std::max(fixed, 3.0 * *hf);
}

void verdict(bool ok, const std::string& what) {
  if (!ok) {
    ++g_fail;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// sqrt(sum (a-b)^2 / sum b^2); the absolute L2 of a when b is all zeros.
double rel_l2(const float* a, const float* b, int64_t n, bool* ref_zero = nullptr) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  if (ref_zero) *ref_zero = den == 0;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

Batch fixture_batch(const SafetensorsFile& ref) {
  Tensor ids = ref.view("input_ids"), labels = ref.view("labels");
  Batch b;
  b.B = ids.shape[0];
  b.T = ids.shape[1];
  b.ids.assign(ids.i64(), ids.i64() + ids.numel());
  b.labels.assign(labels.i64(), labels.i64() + labels.numel());
  return b;
}

// One batch through both models: forward (logits), backward; compare everything.
void compare(const std::string& name, const ModelConfig& cfg, const std::vector<float>& params,
             const Batch& b, Precision prec, const std::string& fixture) {
  Qwen3Moe cpu(cfg);
  cpu.params() = params;
  LossParts lc = cpu.forward(b);
  cpu.zero_grad();
  cpu.backward();

  Qwen3MoeCuda gpu(cfg, prec);
  gpu.upload_params(params);
  std::vector<float> logits, grads;
  gpu.zero_grad();
  gpu.forward(b, 0.f, 1.f, true, &logits);
  LossParts lg = gpu.loss();
  gpu.backward();
  gpu.download_grads(grads);

  const std::string tag = name + " [" + precision_name(prec) + "]";
  // Routing decisions that differ (bf16 router logits near a tie pick another expert): the
  // gradients downstream of a different pick are not comparable, so their limits only warn.
  const std::vector<int32_t> tk_cpu = cpu.router_topk(), tk_gpu = gpu.download_router_topk();
  const int64_t K = cfg.num_experts_per_tok;
  int64_t flips = 0;
  for (size_t r = 0; K > 0 && r < tk_cpu.size() / size_t(K); ++r) {
    std::vector<int32_t> a(tk_cpu.begin() + r * K, tk_cpu.begin() + (r + 1) * K);
    std::vector<int32_t> g(tk_gpu.begin() + r * K, tk_gpu.begin() + (r + 1) * K);
    std::sort(a.begin(), a.end());
    std::sort(g.begin(), g.end());
    flips += a != g;
  }
  if (flips)
    std::printf("%-28s note: %lld of %lld tokens (over all MoE layers) were routed to other experts "
                "than on the CPU; gradient limits only warn\n",
                tag.c_str(), (long long)flips, (long long)(tk_cpu.size() / size_t(K)));
  const double lrel = rel_l2(logits.data(), cpu.logits().data(), int64_t(logits.size()));
  const double loss_rel = std::fabs(double(lg.loss) - lc.loss) / std::max(1e-12, std::fabs(double(lc.loss)));
  std::printf("%-28s logits rel-L2 %.3e | loss %.6f vs %.6f (rel %.2e)", tag.c_str(), lrel, lg.loss,
              lc.loss, loss_rel);
  if (lc.has_aux) std::printf(" | aux %.6f vs %.6f", lg.aux, lc.aux);
  double hf_l = -1;
  const double llim = limit_for(fixture, "", 2e-2, &hf_l);
  if (hf_l >= 0) std::printf(" | Transformers bf16: logits rel-L2 %.3e", hf_l);
  std::printf("\n");
  verdict(lrel < llim, tag + ": logits rel-L2 " + std::to_string(lrel) + " (limit " + std::to_string(llim) + ")");
  verdict(loss_rel < 1e-2, tag + ": loss rel " + std::to_string(loss_rel));
  verdict(lg.has_aux == lc.has_aux, tag + ": aux loss presence");
  if (lc.has_aux)
    if (!flips)  // the aux loss counts the picks: a different pick moves it
      verdict(std::fabs(lg.aux - lc.aux) <= 2e-2 * std::fabs(lc.aux) + 1e-6, tag + ": aux loss");

  double worst = 0, worst_ratio = 0;
  std::string worst_name, worst_ratio_name;
  int n = 0;
  for (auto& s : cpu.hf_slices()) {
    bool zero = false;
    const double e = rel_l2(grads.data() + s.offset, cpu.grads().data() + s.offset, s.numel, &zero);
    ++n;
    if (zero && !flips) {
      verdict(e < 1e-6, tag + ": grad." + s.hf_name + " should be zero, L2 " + std::to_string(e));
      continue;
    }
    if (zero) continue;
    if (e > worst) {
      worst = e;
      worst_name = s.hf_name;
    }
    double hf = -1;
    const double lim = limit_for(fixture, s.hf_name, 5e-2, &hf);
    if (hf >= 0 && e / std::max(hf, 1e-30) > worst_ratio) {
      worst_ratio = e / std::max(hf, 1e-30);
      worst_ratio_name = s.hf_name;
    }
    if (flips && e >= lim)
      std::printf("WARN %s: grad.%s rel-L2 %.3e (routing differs)\n", tag.c_str(), s.hf_name.c_str(), e);
    else
      verdict(e < lim, tag + ": grad." + s.hf_name + " rel-L2 " + std::to_string(e) + " (limit " +
                           std::to_string(lim) + (hf >= 0 ? ", Transformers bf16 " + std::to_string(hf) : "") + ")");
  }
  std::printf("%-28s %d gradients, worst rel-L2 %.3e (%s)", tag.c_str(), n, worst, worst_name.c_str());
  if (worst_ratio > 0)
    std::printf("; worst against Transformers' own bf16 error: %.2fx (%s)", worst_ratio, worst_ratio_name.c_str());
  std::printf("\n");
}

// 300 steps of the demo's recipe on both backends from the same weights and data order.
void train_both(int64_t steps) {
  ModelConfig mc = builtin_model_config("tiny-moe");
  const uint64_t seed = 1234;
  std::vector<Example> data = addition_examples(20000, 3, seed + 1);
  Qwen3Moe cpu(mc);
  Rng rng(seed);
  cpu.init_random(rng, 0.02f);
  const std::vector<float> init = cpu.params();
  AdamWConfig ac{3e-3f, 0.9f, 0.98f, 1e-8f, 0.01f};
  Schedule sch;
  sch.kind = "cosine";
  sch.lr = 3e-3f;
  sch.warmup = 20;
  sch.total = steps;
  sch.min_lr_ratio = 0.1f;
  const int64_t B = 16, T = 64;

  for (Precision prec : {Precision::BF16, Precision::FP32Master}) {
    Qwen3Moe c(mc);
    c.params() = init;
    AdamW opt;
    opt.cfg = ac;
    opt.init(int64_t(init.size()));
    Qwen3MoeCuda g(mc, prec);
    g.upload_params(init);
    DataOrder o1, o2;
    o1.reset(seed, int64_t(data.size()));
    o2.reset(seed, int64_t(data.size()));
    double max_diff = 0, last_c = 0, last_g = 0;
    std::printf("train tiny-moe addition, %lld steps, CPU fp32 vs CUDA %s:\n", (long long)steps,
                precision_name(prec));
    for (int64_t step = 0; step < steps; ++step) {
      PackedBatch p1 = pack_rows(data, o1, B, T, 0), p2 = pack_rows(data, o2, B, T, 0);
      Batch b1{p1.B, p1.T, p1.ids, p1.labels, p1.pos, p1.doc}, b2{p2.B, p2.T, p2.ids, p2.labels, p2.pos, p2.doc};
      const float lr = sch.at(step);
      c.zero_grad();
      LossParts lc = c.forward(b1);
      c.backward();
      clip_grad_norm(c.grads(), 1.0f);
      opt.step(c.params(), c.grads(), lr);
      g.zero_grad();
      g.forward(b2);
      g.backward();
      g.optimizer_step(ac, lr, 1.0f);
      LossParts lg = g.loss();
      const float gn = g.grad_norm();
      max_diff = std::max(max_diff, std::fabs(double(lg.loss) - lc.loss));
      last_c = lc.loss;
      last_g = lg.loss;
      if (step % 25 == 0 || step + 1 == steps)
        std::printf("  step %4lld  cpu %.5f  cuda %.5f  (grad norm cuda %.3f)\n", (long long)step + 1,
                    lc.loss, lg.loss, gn);
      if (!std::isfinite(lg.loss)) break;
    }
    std::printf("  %s: loss curves' max |diff| %.4f; final loss cpu %.4f cuda %.4f\n",
                precision_name(prec), max_diff, last_c, last_g);
    verdict(std::isfinite(last_g) && last_g < 1.5 * last_c + 0.05,
            std::string("train ") + precision_name(prec) + ": the CUDA run ends far above the CPU run");
  }
}

// The memory-saving mode (AdamW inside the backward, activations recomputed) against the
// default mode, both bf16, from the same weights on the same batch: without clipping the update
// is the same arithmetic on the same bits, so after `steps` steps the losses and every weight
// must be identical. With clipping the mode clips step t by step t-1's norm: reported only.
void memsave_vs_default(const std::string& name, const ModelConfig& cfg,
                        const std::vector<float>& params, const Batch& b, int64_t steps) {
  AdamWConfig ac{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  for (float max_norm : {0.f, 1.f}) {
    Qwen3MoeCuda d(cfg, Precision::BF16), m(cfg, Precision::BF16, 0, true);
    d.upload_params(params);
    m.upload_params(params);
    double loss_diff = 0;
    float gn_d = 0, gn_m = 0;
    for (int64_t i = 0; i < steps; ++i) {
      for (Qwen3MoeCuda* x : {&d, &m}) {
        x->zero_grad();
        x->begin_step(ac, ac.lr, max_norm);
        x->forward(b);
        x->backward();
        x->optimizer_step(ac, ac.lr, max_norm);
      }
      loss_diff = std::max(loss_diff, std::fabs(double(d.loss().loss) - double(m.loss().loss)));
      gn_d = d.grad_norm();
      gn_m = m.grad_norm();
    }
    std::vector<float> pd, pm;
    d.download_params(pd);
    m.download_params(pm);
    int64_t differ = 0;
    for (size_t i = 0; i < pd.size(); ++i) differ += pd[i] != pm[i];
    const double rel = rel_l2(pm.data(), pd.data(), int64_t(pd.size()));
    std::printf("%-16s memory-saving vs default, %lld steps, clip %.1f: max |loss diff| %.3g, "
                "last grad norms %.5f / %.5f, weights differing %lld of %zu (rel-L2 %.3g)\n",
                name.c_str(), (long long)steps, max_norm, loss_diff, gn_m, gn_d,
                (long long)differ, pd.size(), rel);
    if (max_norm == 0.f)
      verdict(loss_diff == 0 && differ == 0 && std::fabs(gn_d - gn_m) <= 1e-6f * gn_d,
              name + " memory-saving mode: not identical to the default mode without clipping");
  }
}

// The memory-saving mode resumed from a checkpoint's state (weights, moments, step count and
// the last step's grad norm) must continue exactly as the uninterrupted run: 4 steps with
// clipping against 2 + 2.
void memsave_resume(const std::string& name, const ModelConfig& cfg,
                    const std::vector<float>& params, const Batch& b) {
  AdamWConfig ac{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  const float max_norm = 1.f;
  auto step = [&](Qwen3MoeCuda& x) {
    x.zero_grad();
    x.begin_step(ac, ac.lr, max_norm);
    x.forward(b);
    x.backward();
    x.optimizer_step(ac, ac.lr, max_norm);
    return x.grad_norm();
  };
  Qwen3MoeCuda full(cfg, Precision::BF16, 0, true), first(cfg, Precision::BF16, 0, true),
      second(cfg, Precision::BF16, 0, true);
  full.upload_params(params);
  first.upload_params(params);
  for (int i = 0; i < 4; ++i) step(full);
  float gn = 0;
  for (int i = 0; i < 2; ++i) gn = step(first);
  std::vector<float> p, m, v;
  first.download_params(p);
  first.download_moments(m, v);
  second.upload_params(p);
  second.upload_moments(m, v, first.adam_steps());
  second.set_previous_grad_norm(gn);
  for (int i = 0; i < 2; ++i) step(second);
  std::vector<float> pf, ps;
  full.download_params(pf);
  second.download_params(ps);
  int64_t differ = 0;
  for (size_t i = 0; i < pf.size(); ++i) differ += pf[i] != ps[i];
  std::printf("%-16s memory-saving resume (2 + 2 steps vs 4, clip 1.0): weights differing %lld of %zu\n",
              name.c_str(), (long long)differ, pf.size());
  verdict(differ == 0, name + " memory-saving mode: a resumed run does not continue exactly");
}

// The fused norm ops (the default: add_rmsnorm_fwd and qk_norm_rope_fwd in the forward,
// qk_norm_rope_bwd in the backward) against the op pairs (AUTOMOE_FUSED_NORM=0): the forward's
// are the same bits, so the loss must match (a rare ulp of a different FMA contraction allowed);
// the backward keeps the rotated q/k gradient in fp32 where the pair rounds it to bf16, so the
// gradients differ by bf16 noise: rel-L2 <= 1e-2 (the model against fp32 is judged elsewhere).
void fused_vs_unfused(const std::string& name, const ModelConfig& cfg,
                      const std::vector<float>& params, const Batch& b) {
  setenv("AUTOMOE_FUSED_NORM", "0", 1);
  Qwen3MoeCuda plain(cfg, Precision::BF16);
  unsetenv("AUTOMOE_FUSED_NORM");
  Qwen3MoeCuda fused(cfg, Precision::BF16);
  std::vector<float> gp, gf;
  float lp = 0, lf = 0;
  for (Qwen3MoeCuda* x : {&plain, &fused}) {
    x->upload_params(params);
    x->zero_grad();
    x->forward(b);
    x->backward();
  }
  lp = plain.loss().loss;
  lf = fused.loss().loss;
  plain.download_grads(gp);
  fused.download_grads(gf);
  int64_t differ = 0;
  for (size_t i = 0; i < gp.size(); ++i) differ += gp[i] != gf[i];
  const double rel = rel_l2(gf.data(), gp.data(), int64_t(gp.size()));
  std::printf("%-16s fused norms vs op pairs: loss %.7f / %.7f, gradients differing %lld of %zu "
              "(rel-L2 %.3g)\n",
              name.c_str(), lf, lp, (long long)differ, gp.size(), rel);
  verdict(std::fabs(double(lf) - lp) <= 1e-6 * std::fabs(double(lp)) && rel <= 1e-2,
          name + " the fused norm pairs change the results");
}

}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 300;
  bool train = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoll(argv[++i]);
    else if (!std::strcmp(argv[i], "--skip-train")) train = false;
    else if (!std::strcmp(argv[i], "--hf-noise") && i + 1 < argc) {
      std::ifstream f(argv[++i]);
      if (!f) {
        std::fprintf(stderr, "cuda_parity: cannot read %s (written by bench/hf_bf16_noise.py)\n", argv[i]);
        return 2;
      }
      g_hf_noise = nlohmann::json::parse(f);
    } else {
      std::fprintf(stderr, "usage: cuda_parity [--steps N] [--skip-train] [--hf-noise FILE]\n");
      return 2;
    }
  }
  try {
    for (const char* name : {"tiny_a", "tiny_b", "tiny_c", "tiny_d"}) {
      ModelConfig cfg = load_model_config(kFix + name + "/model/config.json");
      Qwen3Moe host(cfg);
      load_hf_weights(host, kFix + name + "/model");
      SafetensorsFile ref(kFix + name + "/reference.safetensors");
      Batch b = fixture_batch(ref);
      for (Precision p : {Precision::BF16, Precision::FP32Master}) compare(name, cfg, host.params(), b, p, name);
      memsave_vs_default(name, cfg, host.params(), b, 4);
      memsave_resume(name, cfg, host.params(), b);
      fused_vs_unfused(name, cfg, host.params(), b);
      if (std::string(name) == "tiny_a") {  // packed rows: two documents per row
        Batch pk = b;
        pk.pos.resize(size_t(b.B * b.T));
        pk.doc.resize(size_t(b.B * b.T));
        for (int64_t r = 0; r < b.B; ++r)
          for (int64_t t = 0; t < b.T; ++t) {
            const int64_t cut = b.T / 2 - 1;
            pk.doc[r * b.T + t] = int32_t(r * 2 + (t >= cut));
            pk.pos[r * b.T + t] = int32_t(t >= cut ? t - cut : t);
          }
        // the same model on a re-cut batch: Transformers' bf16 error on the fixture's batch is
        // the yardstick (it was measured there, not on this batch)
        compare(std::string(name) + " packed", cfg, host.params(), pk, Precision::BF16, name);
      }
    }
    if (train) train_both(steps);
  } catch (const std::exception& e) {
    std::printf("FAIL error: %s\n", e.what());
    return 100;
  }
  std::printf("cuda_parity: %d failed check(s)\n", g_fail);
  return g_fail;
}
