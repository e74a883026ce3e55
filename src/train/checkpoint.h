// train/checkpoint.h: training checkpoints (model, optimizer moments, schedule/data position)
// that resume bit-identically. Layout: OUTPUT/checkpoints/step-NNNNNNN/{model.safetensors,
// optimizer.safetensors, state.json}, written to a temporary folder and renamed when complete.
// Expert parallelism (P ranks): model/optimizer.safetensors hold the replicated parameters
// (written by world rank 0) and model-rank-R / optimizer-rank-R.safetensors the experts of EP
// rank R (written by its first data-parallel replica); state.json records "expert_parallel": P
// and a resume needs the same P. Both calls are collective over the model's groups, and the
// output folder must be one every rank sees (a shared file system across nodes).
// ZeRO (train.zero 1/2/3, dist/zero_partition.h; the CPU's dist::Zero and the GPU's DeviceZero
// cut the same shards): the model files are the same (ZeRO-3: the trainer gathers the full
// parameters into the model's arena before saving and shards them again after loading); the optimizer moments are this rank's shards, each world rank R writing optimizer-zero-R.safetensors (flat tensors
// exp_avg.replicated / exp_avg.experts and their exp_avg_sq twins) instead of the optimizer
// files above; state.json records "zero" and "world_size", and a resume needs both equal.
#pragma once
#include <cstdint>
#include <string>

#include "model/qwen3_moe.h"
#include "train/adamw.h"

namespace automoe {

namespace dist {
class ZeroPartition;
}

struct TrainState {
  int64_t step = 0;  // optimizer steps done
  int64_t data_epoch = 0, data_cursor = 0;
  // the grad norm of step `step` (before clipping); < 0 when unknown (older checkpoints). The
  // CUDA memory-saving mode clips a step by the previous step's norm, so a resume needs it.
  double last_grad_norm = -1.0;
};

// `zero` (null: train.zero 0): opt holds this rank's shard moments ([zero->shard_numel()]).
void save_checkpoint(const std::string& output_dir, const TrainState& st, const Qwen3Moe& model,
                     const AdamW& opt, int64_t keep, const dist::ZeroPartition* zero = nullptr);
// The newest complete checkpoint folder under output_dir/checkpoints, or "" when none.
std::string latest_checkpoint(const std::string& output_dir);
TrainState load_checkpoint(const std::string& dir, Qwen3Moe& model, AdamW& opt,
                           const dist::ZeroPartition* zero = nullptr);

}  // namespace automoe
