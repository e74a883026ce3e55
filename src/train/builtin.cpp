// train/builtin.cpp: the built-in tiny model config and the addition task.
#include "train/builtin.h"

#include "core/check.h"
#include "core/rng.h"

namespace automoe {

ModelConfig builtin_model_config(const std::string& name) {
  AM_CHECK(name == "tiny-moe", "unknown built-in model '{}'; the built-in models are: tiny-moe", name);
  nlohmann::json j = {
      {"architectures", {"Qwen3MoeForCausalLM"}},
      {"model_type", "qwen3_moe"},
      {"vocab_size", kAdditionVocab},
      {"hidden_size", 64},
      {"intermediate_size", 128},
      {"num_hidden_layers", 2},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 2},
      {"head_dim", 16},
      {"hidden_act", "silu"},
      {"rms_norm_eps", 1e-6},
      {"max_position_embeddings", 256},
      {"rope_theta", 10000.0},
      {"attention_bias", false},
      {"decoder_sparse_step", 1},
      {"mlp_only_layers", nlohmann::json::array()},
      {"moe_intermediate_size", 64},
      {"num_experts", 8},
      {"num_experts_per_tok", 2},
      {"norm_topk_prob", true},
      {"output_router_logits", true},
      {"router_aux_loss_coef", 0.01},
      {"tie_word_embeddings", false},
      {"pad_token_id", 0},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", "float32"}};
  return parse_model_config(j.dump(), "built-in model 'tiny-moe'");
}

std::string addition_detokenize(const std::vector<int64_t>& ids) {
  std::string s;
  for (int64_t id : ids) {
    if (id >= 3 && id <= 12) s += char('0' + (id - 3));
    else if (id == 13) s += '+';
    else if (id == 14) s += '=';
    else if (id == 1) s += "<bos>";
    else if (id == 2) s += "<eos>";
    else if (id == 0) s += "<pad>";
    else s += "?";
  }
  return s;
}

std::vector<Example> addition_examples(int64_t count, int digits, uint64_t seed) {
  Rng rng(seed);
  int64_t limit = 1;
  for (int i = 0; i < digits; ++i) limit *= 10;
  std::vector<Example> out;
  // Fixed widths (zero-padded) keep digit positions aligned, which a tiny model needs.
  auto put_number = [](Example& ex, int64_t v, int width, bool reversed, bool label) {
    std::string s = std::to_string(v);
    s = std::string(size_t(std::max(0, width - int(s.size()))), '0') + s;
    if (reversed) s = std::string(s.rbegin(), s.rend());
    for (char ch : s) {
      ex.ids.push_back(3 + (ch - '0'));
      ex.labels.push_back(label ? ex.ids.back() : -100);
    }
  };
  for (int64_t i = 0; i < count; ++i) {
    int64_t a = int64_t(rng.below(uint64_t(limit))), b = int64_t(rng.below(uint64_t(limit)));
    Example ex;
    ex.ids = {1};
    ex.labels = {-100};
    put_number(ex, a, digits, false, false);
    ex.ids.push_back(13);
    ex.labels.push_back(-100);
    put_number(ex, b, digits, false, false);
    ex.ids.push_back(14);
    ex.labels.push_back(-100);
    put_number(ex, a + b, digits + 1, true, true);
    ex.ids.push_back(2);
    ex.labels.push_back(2);
    out.push_back(std::move(ex));
  }
  return out;
}

}  // namespace automoe
