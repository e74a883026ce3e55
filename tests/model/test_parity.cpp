// tests/model/test_parity.cpp: the CPU model against real Transformers 5.17 (fp32 fixtures made by
// tools/fixtures/make_hf_fixtures.py): logits, loss, aux loss, every parameter gradient, and the
// losses over three AdamW steps.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "io/safetensors.h"
#include "model/qwen3_moe.h"
#include "model/weights.h"
#include "train/adamw.h"

using namespace automoe;

namespace {

const std::string kFix = std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/hf/";

struct Fixture {
  ModelConfig cfg;
  SafetensorsFile ref;
  Batch batch;
  explicit Fixture(const std::string& name, const std::string& model_sub = "model")
      : cfg(load_model_config(kFix + name + "/" + model_sub + "/config.json")),
        ref(kFix + name + "/reference.safetensors") {
    Tensor ids = ref.view("input_ids"), labels = ref.view("labels");
    batch.B = ids.shape[0];
    batch.T = ids.shape[1];
    batch.ids.assign(ids.i64(), ids.i64() + ids.numel());
    batch.labels.assign(labels.i64(), labels.i64() + labels.numel());
  }
};

double max_abs(const float* a, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, double(std::fabs(a[i])));
  return m;
}

void check_forward(const std::string& name, const std::string& model_sub) {
  Fixture f(name, model_sub);
  Qwen3Moe model(f.cfg);
  load_hf_weights(model, kFix + name + "/" + model_sub);
  LossParts lp = model.forward(f.batch);
  Tensor logits = f.ref.load_f32("logits");
  ASSERT_EQ(int64_t(model.logits().size()), logits.numel());
  double err = 0;
  for (int64_t i = 0; i < logits.numel(); ++i)
    err = std::max(err, double(std::fabs(model.logits()[i] - logits.f32()[i])));
  double rel = err / max_abs(logits.f32(), logits.numel());
  EXPECT_LE(rel, 1e-5) << name << ": logits max error relative to max |logit|";
  std::printf("[parity] %s/%s logits rel err %.2e, loss %.8f vs %.8f\n", name.c_str(), model_sub.c_str(), rel,
              lp.loss, f.ref.load_f32("loss").f32()[0]);
  float ref_loss = f.ref.load_f32("loss").f32()[0];
  EXPECT_LE(std::fabs(lp.loss - ref_loss) / std::fabs(ref_loss), 1e-5) << name << " loss " << lp.loss << " vs " << ref_loss;
  if (f.ref.has("aux_loss")) {
    ASSERT_TRUE(lp.has_aux);
    float ref_aux = f.ref.load_f32("aux_loss").f32()[0];
    EXPECT_LE(std::fabs(lp.aux - ref_aux) / std::fabs(ref_aux), 1e-5) << name << " aux " << lp.aux << " vs " << ref_aux;
  } else {
    EXPECT_FALSE(lp.has_aux);
  }
}

}  // namespace

class Parity : public ::testing::TestWithParam<std::string> {};

TEST_P(Parity, LogitsLossAux) { check_forward(GetParam(), "model"); }

TEST_P(Parity, EveryGradient) {
  const std::string name = GetParam();
  Fixture f(name);
  Qwen3Moe model(f.cfg);
  load_hf_weights(model, kFix + name + "/model");
  model.forward(f.batch);
  model.zero_grad();
  model.backward();
  int checked = 0;
  double worst = 0;
  for (auto& [hf_name, g] : hf_tensors(model, model.grads())) {
    std::string key = "grad." + hf_name;
    ASSERT_TRUE(f.ref.has(key)) << "fixture has no " << key;
    Tensor ref = f.ref.load_f32(key);
    ASSERT_EQ(ref.shape, g.shape) << key;
    double num = 0, den = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      double d = double(g.f32()[i]) - ref.f32()[i];
      num += d * d;
      den += double(ref.f32()[i]) * ref.f32()[i];
    }
    if (den == 0) EXPECT_LE(num, 1e-20) << key << " should be zero";  // experts nobody picked
    else EXPECT_LE(num / den, 1e-9) << key << " NMSE";
    if (den > 0) worst = std::max(worst, num / den);
    ++checked;
  }
  std::printf("[parity] %s: %d gradients, worst NMSE %.2e\n", name.c_str(), checked, worst);
  EXPECT_EQ(checked, int(f.ref.names().size()) - int(f.ref.has("aux_loss")) - 5)
      << "every gradient in the fixture is compared";
}

TEST_P(Parity, ThreeAdamWSteps) {
  const std::string name = GetParam();
  Fixture f(name);
  Qwen3Moe model(f.cfg);
  load_hf_weights(model, kFix + name + "/model");
  AdamW opt;
  opt.cfg = {2e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  opt.init(int64_t(model.params().size()));
  Tensor ref = f.ref.load_f32("adamw_losses");
  for (int step = 0; step < 4; ++step) {
    LossParts lp = model.forward(f.batch);
    float r = ref.f32()[step];
    EXPECT_LE(std::fabs(lp.loss - r) / std::fabs(r), 1e-5) << name << " loss before step " << step << ": " << lp.loss << " vs " << r;
    std::printf("[parity] %s adamw loss %d: %.7f vs %.7f\n", name.c_str(), step, lp.loss, r);
    if (step == 3) break;
    model.zero_grad();
    model.backward();
    opt.step(model.params(), model.grads(), 2e-3f);
  }
}

INSTANTIATE_TEST_SUITE_P(Hf, Parity, ::testing::Values("tiny_a", "tiny_b", "tiny_c", "tiny_d"));

TEST(ParityFused, V5FusedExpertKeysLoadTheSameModel) { check_forward("tiny_a", "model_fused"); }
