// train/checkpoint.h: training checkpoints (model, optimizer moments, schedule/data position)
// that resume bit-identically. Layout: OUTPUT/checkpoints/step-NNNNNNN/{model.safetensors,
// optimizer.safetensors, state.json}, written to a temporary folder and renamed when complete.
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
