// train/checkpoint.h: training checkpoints (model, optimizer moments, schedule/data position)
// that resume bit-identically. Layout: OUTPUT/checkpoints/step-NNNNNNN/{model.safetensors,
// optimizer.safetensors, state.json}, written to a temporary folder and renamed when complete.
// Expert parallelism (P ranks): model/optimizer.safetensors hold the replicated parameters
// (written by world rank 0) and model-rank-R / optimizer-rank-R.safetensors the experts of EP
// rank R (written by its first data-parallel replica); state.json records "expert_parallel": P
// and a resume needs the same P. Both calls are collective over the model's groups, and the
// output folder must be one every rank sees (a shared file system across nodes).
#pragma once
#include <cstdint>
#include <string>

#include "model/qwen3_moe.h"
#include "train/adamw.h"

namespace automoe {

struct TrainState {
  int64_t step = 0;  // optimizer steps done
  int64_t data_epoch = 0, data_cursor = 0;
};

void save_checkpoint(const std::string& output_dir, const TrainState& st, const Qwen3Moe& model,
                     const AdamW& opt, int64_t keep);
// The newest complete checkpoint folder under output_dir/checkpoints, or "" when none.
std::string latest_checkpoint(const std::string& output_dir);
TrainState load_checkpoint(const std::string& dir, Qwen3Moe& model, AdamW& opt);

}  // namespace automoe
