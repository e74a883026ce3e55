// tests/train/test_train.cpp: the training loop: bit-identical runs from one seed, bit-identical
// resume after an interruption, gradient accumulation equal to one big batch, LR schedules.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "core/check.h"
#include "model/qwen3_moe.h"
#include "train/adamw.h"
#include "train/trainer.h"

using namespace automoe;
namespace fs = std::filesystem;

namespace {

TrainConfig small(const std::string& dir, int64_t steps) {
  TrainConfig c = load_train_config("", {{"model.builtin", "tiny-moe"},
                                         {"data.builtin", "addition"},
                                         {"data.examples", "500"},
                                         {"data.seq_len", "32"},
                                         {"data.micro_batch", "4"},
                                         {"train.steps", std::to_string(steps)},
                                         {"train.lr", "2e-3"},
                                         {"train.warmup", "2"},
                                         {"train.log_every", "1000"},
                                         {"output.export_hf", "false"},
                                         {"output.dir", dir}});
  return c;
}

std::string tmpdir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("automoe_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d.string();
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace

TEST(Train, SameSeedSameLossesBitForBit) {
  auto a = run_finetune(small(tmpdir("det_a"), 6)).history;
  auto b = run_finetune(small(tmpdir("det_b"), 6)).history;
  ASSERT_EQ(a.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(bits(a[i].loss), bits(b[i].loss)) << "step " << i + 1;
    EXPECT_EQ(bits(a[i].grad_norm), bits(b[i].grad_norm)) << "step " << i + 1;
  }
  EXPECT_LT(a.back().loss, a.front().loss) << "the loss should fall over 6 steps";
}

TEST(Train, ResumeAfterInterruptionIsBitIdentical) {
  auto full = run_finetune(small(tmpdir("full"), 10)).history;
  std::string dir = tmpdir("resume");
  TrainConfig c = small(dir, 10);
  c.checkpoint_every = 4;
  // "Crash" after step 6: the newest checkpoint is step 4.
  EXPECT_THROW(run_finetune(c, [](const StepMetrics& m) {
                 if (m.step == 6) throw std::runtime_error("simulated crash");
               }),
               std::runtime_error);
  c.resume = true;
  auto resumed = run_finetune(c).history;
  ASSERT_EQ(resumed.size(), 6u) << "steps 5..10 run after resuming from step 4";
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[i].step, full[4 + i].step);
    EXPECT_EQ(bits(resumed[i].loss), bits(full[4 + i].loss)) << "step " << resumed[i].step;
  }
  // metrics.jsonl holds each step once, 1..10
  std::ifstream f(fs::path(dir) / "metrics.jsonl");
  std::string line;
  int64_t n = 0;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["step"].get<int64_t>(), ++n);
    for (const char* k : {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"})
      EXPECT_TRUE(j.contains(k)) << k;
  }
  EXPECT_EQ(n, 10);
}

TEST(Train, GradAccumulationMatchesOneBigBatch) {
  // The aux loss is a product of batch means, so it is not additive over micro-batches: off here.
  TrainConfig one = small(tmpdir("acc1"), 3);
  one.micro_batch = 8;
  one.router_aux_loss_coef = 0;
  TrainConfig two = small(tmpdir("acc2"), 3);
  two.router_aux_loss_coef = 0;
  two.micro_batch = 4;
  two.grad_accum = 2;
  auto a = run_finetune(one).history, b = run_finetune(two).history;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a[i].loss, b[i].loss, 1e-5f * std::fabs(a[i].loss)) << "step " << i + 1;
    EXPECT_NEAR(a[i].grad_norm, b[i].grad_norm, 1e-4f * a[i].grad_norm) << "step " << i + 1;
  }
}

// ZeRO in one process: one shard holding everything, in the partition's order (replicated
// tensors, then experts): the same steps as train.zero 0, and with gradient accumulation ZeRO-2's
// and ZeRO-3's per-micro-batch shard sums add in the same order as the arena's.
TEST(Train, ZeroOnOneProcessTrainsLikeZero0) {
  TrainConfig c0 = small(tmpdir("zero0"), 4);
  c0.grad_accum = 2;
  c0.micro_batch = 2;
  auto h0 = run_finetune(c0).history;
  for (int level : {1, 2, 3}) {
    TrainConfig cz = c0;
    cz.output_dir = tmpdir("zero" + std::to_string(level));
    cz.zero = level;
    auto hz = run_finetune(cz).history;
    ASSERT_EQ(hz.size(), h0.size());
    for (size_t i = 0; i < h0.size(); ++i) {
      EXPECT_EQ(bits(hz[i].loss), bits(h0[i].loss)) << "zero " << level << " step " << i + 1;
      EXPECT_EQ(bits(hz[i].grad_norm), bits(h0[i].grad_norm)) << "zero " << level << " step " << i + 1;
    }
    EXPECT_TRUE(fs::exists(fs::path(cz.output_dir) / "checkpoints/step-0000004/optimizer-zero-0.safetensors"));
    fs::remove_all(cz.output_dir);
  }
  fs::remove_all(c0.output_dir);
}

TEST(Schedule, MatchesTransformersFormulas) {
  Schedule s{"cosine", 1.0f, 10, 110, 0.f};
  EXPECT_FLOAT_EQ(s.at(0), 0.f);
  EXPECT_FLOAT_EQ(s.at(5), 0.5f);
  EXPECT_FLOAT_EQ(s.at(10), 1.f);
  EXPECT_NEAR(s.at(60), 0.5f, 1e-6);
  EXPECT_NEAR(s.at(110), 0.f, 1e-6);
  Schedule lin{"linear", 2.0f, 0, 100, 0.f};
  EXPECT_FLOAT_EQ(lin.at(25), 1.5f);
  Schedule c{"constant", 3.0f, 4, 100, 0.f};
  EXPECT_FLOAT_EQ(c.at(2), 1.5f);
  EXPECT_FLOAT_EQ(c.at(50), 3.f);
  Schedule bad{"exp", 1.f, 0, 10, 0.f};
  EXPECT_THROW(bad.validate(), Error);
}

TEST(Recipe, UnknownKeyAndBadValueAreClearErrors) {
  try {
    load_train_config("", {{"train.learning_rate", "1"}, {"model.builtin", "tiny-moe"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown recipe key 'train.learning_rate'"), std::string::npos) << e.what();
  }
  try {
    load_train_config("", {{"train.steps", "many"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.steps"), std::string::npos) << e.what();
  }
}

TEST(Recipe, MemorySavingNeedsCudaBf16AndNoAccumulation) {
  auto err = [](std::vector<std::pair<std::string, std::string>> kv) {
    kv.push_back({"model.builtin", "tiny-moe"});
    kv.push_back({"data.builtin", "addition"});
    kv.push_back({"train.memory_saving", "true"});
    try {
      load_train_config("", kv);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(err({}).find("train.device cuda"), std::string::npos);
  EXPECT_NE(err({{"train.device", "cuda"}, {"train.precision", "fp32_master"}}).find("precision bf16"),
            std::string::npos);
  EXPECT_NE(err({{"train.device", "cuda"}, {"train.grad_accum", "2"}}).find("train.grad_accum 1"),
            std::string::npos);
  EXPECT_EQ(err({{"train.device", "cuda"}}), "");
  // under mpirun with expert parallelism (the gradients are summed inside the backward)
  EXPECT_EQ(err({{"train.device", "cuda"}, {"train.ep", "2"}}), "");
  EXPECT_NE(err({{"train.device", "cuda"}, {"train.ep", "2"}, {"train.grad_accum", "4"}})
                .find("cannot accumulate gradients"),
            std::string::npos);
  EXPECT_NE(err({{"train.device", "cuda"}, {"train.zero", "1"}}).find("train.zero"),
            std::string::npos);
  TrainConfig ok = load_train_config("", {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"},
                                          {"train.device", "cuda"}, {"train.memory_saving", "true"}});
  EXPECT_TRUE(ok.memory_saving);
  EXPECT_NE(ok.to_yaml().find("memory_saving: true"), std::string::npos) << ok.to_yaml();
}

TEST(Recipe, DeviceAndPrecisionAreChecked) {
  try {
    load_train_config("", {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}, {"train.precision", "fp8"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.precision 'fp8'"), std::string::npos) << e.what();
  }
  try {
    load_train_config("", {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}, {"train.device", "tpu"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.device 'tpu'"), std::string::npos) << e.what();
  }
  try {
    load_train_config("", {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}, {"train.zero", "4"}});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.zero must be 0"), std::string::npos) << e.what();
  }
  // the GPU path has ZeRO-1 and ZeRO-3 in the default mode with bf16 precision (grad_accum too);
  // the rest is refused by name
  for (const char* z : {"1", "3"})
    EXPECT_NO_THROW(load_train_config("", {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"},
                                           {"train.zero", z}, {"train.device", "cuda"},
                                           {"train.grad_accum", "2"}}));
  using Kv = std::vector<std::pair<std::string, std::string>>;
  const std::vector<std::pair<Kv, std::string>> refused = {
      {{{"train.zero", "2"}}, "train.zero 2 is not built for train.device cuda"},
      {{{"train.zero", "1"}, {"train.memory_saving", "true"}}, "does not combine with train.zero 1"},
      {{{"train.zero", "3"}, {"train.memory_saving", "true"}}, "does not combine with train.zero 3"},
      {{{"train.zero", "1"}, {"train.precision", "fp32_master"}}, "train.zero 1 on train.device cuda needs train.precision bf16"},
      {{{"train.zero", "3"}, {"train.precision", "fp32_master"}}, "train.zero 3 on train.device cuda needs train.precision bf16"},
  };
  for (auto& [keys, want] : refused) {
    Kv kv = {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}, {"train.device", "cuda"}};
    kv.insert(kv.end(), keys.begin(), keys.end());
    try {
      load_train_config("", kv);
      ADD_FAILURE() << want;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
  }
  // This test binary registers no device model (the CLI registers CUDA when built with it).
  TrainConfig c = small(tmpdir("nocuda"), 1);
  c.device = "cuda";
  try {
    run_finetune(c);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("built without the cuda backend"), std::string::npos) << e.what();
  }
}

namespace {

// The trainer's device branch (upload, step, download for checkpoints and resume) driven by a
// stand-in "device" that is the CPU model itself: it must train bit-identically to the CPU run.
class CpuAsDevice final : public DeviceTrainModel {
 public:
  explicit CpuAsDevice(const ModelConfig& mc) : model_(mc) {}
  void upload(const Qwen3Moe& host, const AdamW* opt) override {
    model_.params() = host.params();
    if (opt) {
      opt_.m = opt->m;
      opt_.v = opt->v;
      opt_.t = opt->t;
    } else {
      opt_.init(int64_t(host.params().size()));
    }
  }
  void download(Qwen3Moe& host, AdamW* opt) override {
    host.params() = model_.params();
    if (opt) {
      opt->m = opt_.m;
      opt->v = opt_.v;
      opt->t = opt_.t;
    }
  }
  void zero_grad() override { model_.zero_grad(); }
  void begin_step(const AdamWConfig&, float lr, float max_grad_norm) override {
    begun_lr_ = lr;
    begun_norm_ = max_grad_norm;
  }
  LossParts forward_backward(const Batch& b, float denom, float aux_scale) override {
    // the trainer announces each step's settings before its micro-batches
    EXPECT_GE(begun_lr_, 0.f) << "forward_backward before begin_step";
    marks.push_back(last_);
    LossParts lp = model_.forward(b, denom, aux_scale);
    model_.backward();
    return lp;
  }
  float clip_and_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    EXPECT_EQ(lr, begun_lr_);
    EXPECT_EQ(max_grad_norm, begun_norm_);
    EXPECT_TRUE(last_) << "the micro-batch before clip_and_step was not marked last";
    marks.push_back(-1);
    begun_lr_ = -1.f;
    const float n = clip_grad_norm(model_.grads(), max_grad_norm);
    opt_.cfg = c;
    opt_.step(model_.params(), model_.grads(), lr);
    return n;
  }
  int64_t peak_mem_bytes() override { return 1; }
  void set_last_grad_norm(float norm) override { last_norm_set = norm; }
  void set_last_micro_batch(bool last) override { last_ = last; }

  static inline float last_norm_set = -1.f;  // what the trainer handed over on resume
  // per forward_backward the last-micro-batch mark it came with (0/1), -1 per clip_and_step
  static inline std::vector<int> marks;

 private:
  Qwen3Moe model_;
  AdamW opt_;
  float begun_lr_ = -1.f, begun_norm_ = -1.f;
  bool last_ = false;
};

}  // namespace

TEST(Train, DeviceBranchTrainsAndResumesLikeTheCpuLoop) {
  auto cpu = run_finetune(small(tmpdir("dev_cpu"), 8)).history;
  register_device_model("cuda", [](const ModelConfig& mc, const TrainConfig&, const dist::Groups&) {
    return std::unique_ptr<DeviceTrainModel>(new CpuAsDevice(mc));
  });
  TrainConfig c = small(tmpdir("dev_full"), 8);
  c.device = "cuda";
  c.export_hf = true;  // downloads the weights, exports, loads them back (checked inside)
  TrainResult res = run_finetune(c);
  auto dev = res.history;
  EXPECT_TRUE(fs::exists(fs::path(res.export_dir) / "model.safetensors.index.json") ||
              fs::exists(fs::path(res.export_dir) / "model.safetensors"));
  std::string dir = tmpdir("dev_resume");
  TrainConfig r = small(dir, 8);
  r.device = "cuda";
  r.checkpoint_every = 3;
  EXPECT_THROW(run_finetune(r, [](const StepMetrics& m) {
                 if (m.step == 5) throw std::runtime_error("simulated crash");
               }),
               std::runtime_error);
  r.resume = true;
  CpuAsDevice::last_norm_set = -1.f;
  auto resumed = run_finetune(r).history;
  // the checkpoint of step 3 carries step 3's grad norm to the resumed device model
  EXPECT_EQ(bits(CpuAsDevice::last_norm_set), bits(cpu[2].grad_norm));
  register_device_model("cuda", nullptr);
  ASSERT_EQ(dev.size(), cpu.size());
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_EQ(bits(dev[i].loss), bits(cpu[i].loss)) << "step " << i + 1;
    EXPECT_EQ(bits(dev[i].grad_norm), bits(cpu[i].grad_norm)) << "step " << i + 1;
    EXPECT_EQ(dev[i].peak_mem_bytes, 1) << "the device's memory is reported";
  }
  ASSERT_EQ(resumed.size(), 5u) << "steps 4..8 run after resuming from step 3";
  for (size_t i = 0; i < resumed.size(); ++i)
    EXPECT_EQ(bits(resumed[i].loss), bits(cpu[3 + i].loss)) << "step " << resumed[i].step;
}

// A device model may sum its gradients over the ranks inside the backward of the step's last
// micro-batch only (Qwen3MoeCuda::set_reduce_in_backward): the trainer marks exactly that one.
TEST(Train, DeviceBranchMarksTheLastMicroBatch) {
  register_device_model("cuda", [](const ModelConfig& mc, const TrainConfig&, const dist::Groups&) {
    return std::unique_ptr<DeviceTrainModel>(new CpuAsDevice(mc));
  });
  TrainConfig c = small(tmpdir("dev_marks"), 2);
  c.device = "cuda";
  c.grad_accum = 3;
  CpuAsDevice::marks.clear();
  run_finetune(c);
  register_device_model("cuda", nullptr);
  EXPECT_EQ(CpuAsDevice::marks, (std::vector<int>{0, 0, 1, -1, 0, 0, 1, -1}));
}
