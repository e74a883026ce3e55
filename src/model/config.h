// model/config.h: ModelConfig, the architecture of a Qwen3-MoE-family model as config.json
// describes it (see shared/design/QWEN3_MOE.md for the field meanings).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace automoe {

struct ModelConfig {
  std::string model_type = "qwen3_moe";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;            // H
  int64_t intermediate_size = 0;      // dense MLP width (F)
  int64_t num_hidden_layers = 0;      // L
  int64_t num_attention_heads = 0;    // nH
  int64_t num_key_value_heads = 0;    // nKV
  int64_t head_dim = 0;               // D (defaults to H / nH when absent)
  std::string hidden_act = "silu";
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 0;
  double rope_theta = 10000.0;
  bool attention_bias = false;
  bool use_sliding_window = false;
  int64_t sliding_window = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  int64_t moe_intermediate_size = 0;  // I
  int64_t num_experts = 0;            // E
  int64_t num_experts_per_tok = 0;    // k
  bool norm_topk_prob = true;
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.001;
  bool tie_word_embeddings = false;
  int64_t pad_token_id = -1, bos_token_id = -1, eos_token_id = -1;
  nlohmann::json raw;  // the whole config.json, written back on export

  // A layer is MoE iff not in mlp_only_layers, E > 0 and (i + 1) % decoder_sparse_step == 0.
  bool is_moe_layer(int64_t i) const;
  int64_t num_moe_layers() const;
};

// Parses config.json text; `where` names the file in errors. Throws automoe::Error with the
// field and what to do. Unsupported model_type lists the supported ones.
ModelConfig parse_model_config(const std::string& json_text, const std::string& where);
ModelConfig load_model_config(const std::string& path);  // reads the file
// The config.json automoe writes on export (transformers-loadable).
nlohmann::json model_config_to_json(const ModelConfig& c);
const std::vector<std::string>& supported_model_types();

}  // namespace automoe
