// train/train_config.h: a fine-tuning recipe: YAML file plus `--section.key value` overrides.
// Unknown keys are errors (a typo must not silently train with defaults).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "train/adamw.h"
#include "train/schedule.h"

namespace automoe {

struct TrainConfig {
  // model:
  std::string model_path;               // HF model directory
  std::string model_builtin;            // or a built-in config, randomly initialised
  float init_std = 0.02f;
  float router_aux_loss_coef = -1.f;    // >= 0 overrides config.json's router_aux_loss_coef
  // data:
  std::string data_train;               // pre-tokenized JSONL (input_ids, labels)
  std::string data_builtin;             // or a built-in task: "addition"
  std::string data_format = "auto";     // text | prompt_completion | messages | sharegpt | alpaca | tokens
  std::string data_tokenizer;           // tokenizer path; default: the model directory
  bool train_on_prompt = false;         // loss on prompt/user tokens too
  bool skip_bad = false;                // skip malformed records (counted in metrics) instead of failing
  std::string enable_thinking;          // "", "true" or "false": passed to the chat template
  int64_t data_examples = 20000;        // size of the built-in task
  int64_t data_digits = 3;
  int64_t seq_len = 64;
  int64_t micro_batch = 8;              // rows per micro-batch (per rank under mpirun)
  // train:
  int64_t steps = 100;
  int64_t grad_accum = 1;
  Schedule schedule;
  AdamWConfig adamw;
  float max_grad_norm = 1.0f;
  uint64_t seed = 1234;
  int64_t log_every = 1;
  int64_t checkpoint_every = 0;         // 0 = only at the end
  int64_t keep_checkpoints = 2;
  std::string device = "cpu";           // cpu | cuda (one GPU)
  std::string precision = "bf16";       // cuda: bf16 | fp32_master (the CPU backend is fp32)
  bool memory_saving = false;           // cuda, bf16: AdamW inside the backward, recompute
                                        // (model/qwen3_moe_cuda.h); needs grad_accum 1
  int64_t ep = 1;                       // expert-parallel size (ranks from mpirun; dp = world / ep)
  double ep_capacity = 2.0;             // cuda, ep > 1: the EP arena over the balanced load
  std::string ep_recompute = "none";    // cuda, ep > 1: none | outputs | experts: what the EP
                                        // backward recomputes instead of keeping in that arena
  std::string ep_dispatch = "counts";   // cuda, ep > 1: counts | padded (no host sync in the
                                        // MoE forward; needs ep_recompute experts)
  int64_t ep_chunks = 1;                // cuda, ep > 1: 1..8 token chunks the EP block pipelines
                                        // (all-to-alls beside the expert GEMMs); 1 = none
  bool ep_halves = false;               // cuda, ep > 1 over IPC: the two-half overlap
                                        // (model/qwen3_moe_cuda.h, CudaDist::ep_halves)
  bool ep_balance = false;              // cpu, ep > 1: move expert work off the busiest EP
                                        // ranks within the step (dist/ep_balance.h)
  int64_t zero = 0;                     // ZeRO: 0 replicated, 1 optimizer state sharded, 2 + gradients, 3 + parameters (CPU)
  // output:
  std::string output_dir = "out/run";
  bool export_hf = true;
  bool resume = false;

  std::string to_yaml() const;  // the resolved recipe, saved beside the run
};

// Loads `path` (may be empty: defaults) and applies overrides such as {"train.lr", "3e-4"}.
TrainConfig load_train_config(const std::string& path,
                              const std::vector<std::pair<std::string, std::string>>& overrides);

}  // namespace automoe
