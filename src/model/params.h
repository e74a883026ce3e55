// model/params.h: a parameter layout: named tensors packed into one contiguous fp32 arena, and
// the map between those tensors and the names a Hugging Face checkpoint uses.
// Gradients and optimizer moments use the same layout (same offsets) in arenas of their own.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace automoe {

struct ParamSpec {
  std::string name;  // internal name, e.g. "layers.3.moe.experts_gate_up"
  Shape shape;       // e.g. [E, 2I, H]
  int64_t offset;    // element offset into the arena
  int64_t numel;
  bool decay = true;  // weight decay applies (torch.optim.AdamW default: every parameter)
  bool expert = false;  // an expert tensor: split over the expert-parallel group (one shard here)
};

// One tensor of the HF checkpoint: a contiguous chunk of a parameter. Per-expert keys map to
// slices of the fused expert tensors; fused keys (v5 save_original_format=False) map whole.
struct HfSlice {
  std::string hf_name;  // e.g. "model.layers.0.mlp.experts.3.up_proj.weight"
  Shape shape;          // the checkpoint's shape
  int64_t offset;       // element offset into the arena
  int64_t numel;
  // Expert parallelism: a fused key holds every expert but this rank loads only its own; the
  // chunk starts `src_offset` elements into the checkpoint tensor.
  int64_t src_offset = 0;
  int64_t layer = -1, expert = -1;  // per-expert keys: the layer and the (global) expert
};

struct ParamLayout {
  std::vector<ParamSpec> params;
  int64_t total = 0;  // elements

  // Appends a parameter; returns its offset.
  int64_t add(const std::string& name, Shape shape);
  const ParamSpec& find(const std::string& name) const;  // throws when absent
};

}  // namespace automoe
