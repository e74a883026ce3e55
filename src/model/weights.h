// model/weights.h: moving parameters between the model's arena and Hugging Face checkpoints
// (per-expert keys as save_pretrained writes them, or v5's fused expert keys on load).
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "model/qwen3_moe.h"

namespace automoe {

// Loads every parameter from the model directory (model.safetensors or a sharded index).
// Errors list missing tensors and name the tensor, file, and expected vs found shape.
void load_hf_weights(Qwen3Moe& model, const std::string& model_dir);

// Views of an arena (parameters or gradients) under the HF per-expert checkpoint names: this
// rank's tensors (with expert parallelism, its own experts only).
std::vector<std::pair<std::string, Tensor>> hf_tensors(const Qwen3Moe& model,
                                                       const std::vector<float>& arena);

// Every tensor of the WHOLE model under the HF per-expert names, in checkpoint order, handed to
// `emit` on world rank 0. With expert parallelism the experts are gathered over the EP group one
// layer at a time (never the whole model at once). Collective: every rank calls it.
void for_each_hf_tensor(const Qwen3Moe& model, const std::vector<float>& arena,
                        const std::function<void(const std::string&, const Tensor&)>& emit);

// Writes an HF model directory: config.json, sharded safetensors + index (per-expert keys),
// and the tokenizer files of `source_dir` when given. Collective like for_each_hf_tensor; world
// rank 0 writes (shard by shard).
void save_hf_model(const Qwen3Moe& model, const std::string& out_dir, const std::string& source_dir,
                   int64_t max_shard_bytes = int64_t(5) << 30);

}  // namespace automoe
