// train/trainer.h: the fine-tuning loop: data -> micro-batches -> forward/backward (gradient
// accumulation) -> clip -> AdamW -> schedule; metrics.jsonl, a progress line, checkpoints with
// bit-identical resume, and the Hugging Face export at the end.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/qwen3_moe.h"
#include "text/dataset.h"
#include "text/sft.h"
#include "train/train_config.h"

namespace automoe {

namespace dist {
struct Groups;
}

struct StepMetrics {
  int64_t step = 0;  // 1-based optimizer step
  float loss = 0, ce = 0, aux = 0, lr = 0, grad_norm = 0;
  int64_t tokens = 0;  // tokens processed in this step (B*T*accum)
  double tokens_per_s = 0;
  int64_t peak_mem_bytes = 0;
};

struct TrainResult {
  std::vector<StepMetrics> history;  // steps run in this process
  std::string export_dir;            // empty when not exported
};

// Runs the recipe. `on_step` (optional) sees every step's metrics (tests use it).
// Under mpirun every rank calls it: `groups` null means dist::make_groups(cfg.ep) over the world.
// Each rank trains on rows [r*micro_batch, (r+1)*micro_batch) of a global micro-batch of
// micro_batch * world rows, packed identically on every rank, so N ranks follow the data order
// (and, within fp32 rounding, the losses) of one process with N times the micro-batch. Metrics,
// progress lines, checkpoints' shared files and the HF export are written by world rank 0;
// metrics are global (loss over the global batch, global grad norm and tokens). train.zero 1/2
// shards the optimizer state (and gradients) over the data-parallel ranks (dist/zero.h), 3 the
// parameters too (CPU only; dist/zero3.h).
TrainResult run_finetune(const TrainConfig& cfg,
                         const std::function<void(const StepMetrics&)>& on_step = nullptr,
                         const dist::Groups* groups = nullptr);

// The training examples the recipe names: a built-in task, pre-tokenized JSONL (models without
// a tokenizer), or any SFT format through the model's tokenizer and chat template.
// `print`: the one-line data summary on stdout.
std::vector<Example> load_training_data(const TrainConfig& cfg, const ModelConfig& mc, SftStats* stats,
                                        bool print = true);

// A model on an accelerator (train.device != cpu) behind the same loop: the trainer keeps the
// host model (fp32 arena: loading, init, checkpoints, export) and this one trains. The CUDA one
// (train/trainer_cuda.cpp) is registered by binaries linked with the CUDA backend.
class DeviceTrainModel {
 public:
  virtual ~DeviceTrainModel() = default;
  // Params (+ moments, step). With train.zero > 0 the moments are this rank's shard, flat
  // ([replicated shard | expert shard] of dist/zero_partition.h): the model shards its optimizer.
  virtual void upload(const Qwen3Moe& host, const AdamW* opt) = 0;
  virtual void download(Qwen3Moe& host, AdamW* opt) = 0;
  virtual void zero_grad() = 0;
  // The step's optimizer settings, before its first micro-batch (a model that applies AdamW
  // inside the backward needs them then; others ignore this).
  virtual void begin_step(const AdamWConfig& c, float lr, float max_grad_norm) = 0;
  // On resume: the grad norm of the step before (a model that clips by it needs it; others
  // ignore this).
  virtual void set_last_grad_norm(float norm) { (void)norm; }
  // One micro-batch: forward and backward, gradients accumulate; the loss as Qwen3Moe::forward.
  virtual LossParts forward_backward(const Batch& b, float ce_denominator, float aux_scale) = 0;
  // Before each forward_backward: whether it is the step's last micro-batch (clip_and_step
  // follows), so a model may sum its gradients over the ranks inside that backward.
  virtual void set_last_micro_batch(bool last) { (void)last; }
  // Several ranks: the gradients summed over the ranks first (as dist::allreduce_grads).
  // Global-norm clipping (the global norm) and AdamW at lr; returns the norm before clipping.
  virtual float clip_and_step(const AdamWConfig& c, float lr, float max_grad_norm) = 0;
  virtual int64_t peak_mem_bytes() = 0;  // device memory in use at its peak
};
// `groups`: the job's ranks (world size 1 in one process); the model holds the experts of its
// EP rank (the host model's layout with the same groups) and reduces its gradients over them.
using DeviceModelFactory = std::function<std::unique_ptr<DeviceTrainModel>(
    const ModelConfig&, const TrainConfig&, const dist::Groups&)>;
// Registers the model for train.device `device` (e.g. "cuda"); an empty `make` removes it.
void register_device_model(const std::string& device, DeviceModelFactory make);

// Peak resident memory of this process (VmHWM), in bytes.
int64_t peak_rss_bytes();

}  // namespace automoe
