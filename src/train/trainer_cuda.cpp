// train/trainer_cuda.cpp: the trainer's DeviceTrainModel on one GPU: Qwen3MoeCuda in the
// recipe's train.precision. Checkpoints and exports go through the host model's fp32 arena
// (bf16 values convert exactly), so they are the CPU run's formats.
#include "train/trainer_cuda.h"

#include <algorithm>

#include "model/qwen3_moe_cuda.h"
#include "train/trainer.h"

namespace automoe {

namespace {

class CudaTrainModel final : public DeviceTrainModel {
 public:
  CudaTrainModel(const ModelConfig& mc, const TrainConfig& cfg)
      : free0_(free_bytes()), model_(mc, parse_precision(cfg.precision), 0, cfg.memory_saving) {}

  void upload(const Qwen3Moe& host, const AdamW* opt) override {
    model_.upload_params(host.params());
    if (opt) model_.upload_moments(opt->m, opt->v, opt->t);
  }
  void download(Qwen3Moe& host, AdamW* opt) override {
    model_.download_params(host.params());
    if (opt) {
      model_.download_moments(opt->m, opt->v);
      opt->t = model_.adam_steps();
    }
  }
  void zero_grad() override { model_.zero_grad(); }
  void begin_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    model_.begin_step(c, lr, max_grad_norm);
  }
  void set_last_grad_norm(float norm) override { model_.set_previous_grad_norm(norm); }
  LossParts forward_backward(const Batch& b, float ce_denominator, float aux_scale) override {
    model_.forward(b, ce_denominator, aux_scale, true);
    model_.backward();           // enqueued before the loss is read: the GPU stays busy
    LossParts lp = model_.loss();
    track_memory();
    return lp;
  }
  float clip_and_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    model_.optimizer_step(c, lr, max_grad_norm);
    return model_.grad_norm();
  }
  int64_t peak_mem_bytes() override { return int64_t(peak_); }

 private:
  static size_t free_bytes() {
    size_t fr = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&fr, &total));  // creates the context first
    return fr;
  }
  // Everything is allocated up front, so the memory in use after a step is the peak (with what
  // cuBLASLt keeps): the drop of free device memory since before the model existed.
  void track_memory() {
    const size_t fr = free_bytes();
    if (free0_ > fr) peak_ = std::max(peak_, free0_ - fr);
  }

  size_t free0_ = 0, peak_ = 0;  // before model_: measured before it allocates
  Qwen3MoeCuda model_;
};

}  // namespace

void register_cuda_trainer() {
  register_device_model("cuda", [](const ModelConfig& mc, const TrainConfig& cfg) {
    return std::unique_ptr<DeviceTrainModel>(new CudaTrainModel(mc, cfg));
  });
}

}  // namespace automoe
