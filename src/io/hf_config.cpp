// io/hf_config.cpp: config.json <-> ModelConfig for model_type "qwen3_moe" (model/config.h).
// Accepts both spellings the hub uses: num_experts | num_local_experts, rope_theta |
// rope_parameters.rope_theta, torch_dtype | dtype. Defaults follow transformers' Qwen3MoeConfig;
// the architecture sizes have no sensible default and are required.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/check.h"
#include "model/config.h"

namespace automoe {

using nlohmann::json;

namespace {

// Typed access to one JSON object; errors name the file and the field. A null value counts as
// absent (transformers writes `"bos_token_id": null`).
struct Fields {
  const json& j;
  const std::string& where;
  std::string prefix;  // "rope_parameters." for nested fields

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  [[noreturn]] void wrong_type(const char* key, const char* expected, const json& v) const {
    AM_FAIL("{}: field \"{}{}\" must be {}, but it is {}; fix config.json", where, prefix, key, expected, v.dump());
  }
  const json& need(const char* key) const {
    const json* v = find(key);
    AM_CHECK(v, "{}: required field \"{}{}\" is missing; add it to config.json", where, prefix, key);
    return *v;
  }
  int64_t as_int(const char* key, const json& v) const {
    if (!v.is_number_integer()) wrong_type(key, "an integer", v);
    return v.get<int64_t>();
  }
  int64_t i64(const char* key) const { return as_int(key, need(key)); }
  int64_t i64(const char* key, int64_t def) const {
    const json* v = find(key);
    return v ? as_int(key, *v) : def;
  }
  double f64(const char* key, double def) const {
    const json* v = find(key);
    if (v && !v->is_number()) wrong_type(key, "a number", *v);
    return v ? v->get<double>() : def;
  }
  bool flag(const char* key, bool def) const {
    const json* v = find(key);
    if (v && !v->is_boolean()) wrong_type(key, "true or false", *v);
    return v ? v->get<bool>() : def;
  }
  std::string str(const char* key, const std::string& def) const {
    const json* v = find(key);
    if (v && !v->is_string()) wrong_type(key, "a string", *v);
    return v ? v->get<std::string>() : def;
  }
  int64_t token_id(const char* key) const {  // int, null (-1) or a list (the first id)
    const json* v = find(key);
    if (!v) return -1;
    if (v->is_array() && !v->empty()) return as_int(key, (*v)[0]);
    return as_int(key, *v);
  }
};

}  // namespace

const std::vector<std::string>& supported_model_types() {
  static const std::vector<std::string> types = {"qwen3_moe"};
  return types;
}

bool ModelConfig::is_moe_layer(int64_t i) const {
  for (int64_t l : mlp_only_layers)
    if (l == i) return false;
  return num_experts > 0 && (i + 1) % decoder_sparse_step == 0;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) n += is_moe_layer(i);
  return n;
}

ModelConfig parse_model_config(const std::string& json_text, const std::string& where) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    AM_FAIL("{} is not valid JSON: {}; fix the file or download it again", where, e.what());
  }
  AM_CHECK(j.is_object(), "{} must be a JSON object (a Hugging Face config.json)", where);
  Fields f{j, where, ""};
  std::string types;
  for (auto& t : supported_model_types()) types += (types.empty() ? "" : ", ") + t;

  ModelConfig c;
  AM_CHECK(f.find("model_type"), "{}: required field \"model_type\" is missing; automoe supports: {}", where, types);
  c.model_type = f.str("model_type", "");
  bool known = false;
  for (auto& t : supported_model_types()) known = known || t == c.model_type;
  AM_CHECK(known, "{}: model_type '{}' is not supported yet; supported model types: {}", where, c.model_type, types);

  c.vocab_size = f.i64("vocab_size");
  c.hidden_size = f.i64("hidden_size");
  c.intermediate_size = f.i64("intermediate_size");
  c.num_hidden_layers = f.i64("num_hidden_layers");
  c.num_attention_heads = f.i64("num_attention_heads");
  c.num_key_value_heads = f.i64("num_key_value_heads", c.num_attention_heads);
  c.moe_intermediate_size = f.i64("moe_intermediate_size");
  c.num_experts_per_tok = f.i64("num_experts_per_tok");
  const json *ne = f.find("num_experts"), *nle = f.find("num_local_experts");
  AM_CHECK(ne || nle, "{}: required field \"num_experts\" (or \"num_local_experts\") is missing; add it to config.json",
           where);
  c.num_experts = ne ? f.as_int("num_experts", *ne) : f.as_int("num_local_experts", *nle);
  AM_CHECK(!ne || !nle || f.as_int("num_local_experts", *nle) == c.num_experts,
           "{}: \"num_experts\" ({}) and \"num_local_experts\" ({}) disagree; keep one of them", where, c.num_experts,
           nle ? nle->dump() : "");
  if (f.find("head_dim")) {
    c.head_dim = f.i64("head_dim");
  } else {
    AM_CHECK(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0,
             "{}: \"hidden_size\" ({}) is not a multiple of \"num_attention_heads\" ({}); set \"head_dim\"", where,
             c.hidden_size, c.num_attention_heads);
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }

  c.hidden_act = f.str("hidden_act", "silu");
  c.rms_norm_eps = f.f64("rms_norm_eps", 1e-6);
  c.max_position_embeddings = f.i64("max_position_embeddings", 32768);
  c.attention_bias = f.flag("attention_bias", false);
  c.use_sliding_window = f.flag("use_sliding_window", false);
  c.sliding_window = f.i64("sliding_window", 0);
  c.decoder_sparse_step = f.i64("decoder_sparse_step", 1);
  c.norm_topk_prob = f.flag("norm_topk_prob", false);
  c.output_router_logits = f.flag("output_router_logits", false);
  c.router_aux_loss_coef = f.f64("router_aux_loss_coef", 0.001);
  c.tie_word_embeddings = f.flag("tie_word_embeddings", false);
  c.pad_token_id = f.token_id("pad_token_id");
  c.bos_token_id = f.token_id("bos_token_id");
  c.eos_token_id = f.token_id("eos_token_id");
  f.str("torch_dtype", "");  // either spelling; only type-checked here, kept in raw
  f.str("dtype", "");
  if (const json* m = f.find("mlp_only_layers")) {
    if (!m->is_array()) f.wrong_type("mlp_only_layers", "a list of layer indices", *m);
    for (auto& l : *m) c.mlp_only_layers.push_back(f.as_int("mlp_only_layers", l));
  }

  // RoPE: v5 writes rope_parameters {"rope_type": "default", "rope_theta": ...}; older configs
  // write rope_theta (+ rope_scaling, which we cannot honour yet).
  c.rope_theta = f.f64("rope_theta", 10000.0);
  if (const json* rs = f.find("rope_scaling"))
    AM_FAIL("{}: rope_scaling {} is not supported yet; automoe implements default RoPE only (remove rope_scaling "
            "to train at the original context length)", where, rs->dump());
  if (const json* rp = f.find("rope_parameters")) {
    if (!rp->is_object()) f.wrong_type("rope_parameters", "an object", *rp);
    Fields r{*rp, where, "rope_parameters."};
    std::string type = r.str("rope_type", "default");
    AM_CHECK(type == "default", "{}: rope_parameters.rope_type '{}' is not supported yet; automoe implements "
             "default RoPE only", where, type);
    c.rope_theta = r.f64("rope_theta", c.rope_theta);
  }

  // Settings we cannot honour, then values that make no sense.
  AM_CHECK(c.hidden_act == "silu", "{}: hidden_act '{}' is not supported yet; qwen3_moe uses 'silu'", where,
           c.hidden_act);
  AM_CHECK(!c.use_sliding_window, "{}: use_sliding_window true is not supported yet; set it to false (Qwen3-MoE "
           "checkpoints train with full attention)", where);
  auto positive = [&](const char* key, int64_t v) {
    AM_CHECK(v > 0, "{}: \"{}\" must be positive, got {}", where, key, v);
  };
  positive("vocab_size", c.vocab_size);
  positive("hidden_size", c.hidden_size);
  positive("intermediate_size", c.intermediate_size);
  positive("num_hidden_layers", c.num_hidden_layers);
  positive("num_attention_heads", c.num_attention_heads);
  positive("num_key_value_heads", c.num_key_value_heads);
  positive("head_dim", c.head_dim);
  positive("moe_intermediate_size", c.moe_intermediate_size);
  positive("num_experts", c.num_experts);
  positive("num_experts_per_tok", c.num_experts_per_tok);
  positive("decoder_sparse_step", c.decoder_sparse_step);
  positive("max_position_embeddings", c.max_position_embeddings);
  AM_CHECK(c.num_attention_heads % c.num_key_value_heads == 0,
           "{}: \"num_attention_heads\" ({}) must be a multiple of \"num_key_value_heads\" ({})", where,
           c.num_attention_heads, c.num_key_value_heads);
  AM_CHECK(c.head_dim % 2 == 0, "{}: \"head_dim\" ({}) must be even for RoPE", where, c.head_dim);
  AM_CHECK(c.num_experts_per_tok <= c.num_experts,
           "{}: \"num_experts_per_tok\" ({}) cannot exceed the number of experts ({})", where, c.num_experts_per_tok,
           c.num_experts);
  AM_CHECK(c.rms_norm_eps > 0, "{}: \"rms_norm_eps\" must be positive, got {}", where, c.rms_norm_eps);
  AM_CHECK(c.rope_theta > 0, "{}: \"rope_theta\" must be positive, got {}", where, c.rope_theta);
  AM_CHECK(c.router_aux_loss_coef >= 0, "{}: \"router_aux_loss_coef\" must not be negative, got {}", where,
           c.router_aux_loss_coef);
  for (int64_t l : c.mlp_only_layers)
    AM_CHECK(l >= 0 && l < c.num_hidden_layers, "{}: \"mlp_only_layers\" names layer {}, but layers are 0..{}",
             where, l, c.num_hidden_layers - 1);
  c.raw = std::move(j);
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  AM_CHECK(std::filesystem::is_regular_file(path), "cannot read '{}': no such file; --model must be a Hugging Face "
           "model directory containing config.json", path);
  std::ifstream f(path);
  AM_CHECK(f.is_open(), "cannot read '{}'; check its permissions", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_model_config(ss.str(), path);
}

json model_config_to_json(const ModelConfig& c) {
  if (!c.raw.is_null() && !c.raw.empty()) return c.raw;
  auto id = [](int64_t v) { return v < 0 ? json(nullptr) : json(v); };
  // The layout transformers 5 writes (num_local_experts, rope_parameters).
  return json{{"architectures", {"Qwen3MoeForCausalLM"}},
              {"model_type", c.model_type},
              {"vocab_size", c.vocab_size},
              {"hidden_size", c.hidden_size},
              {"intermediate_size", c.intermediate_size},
              {"num_hidden_layers", c.num_hidden_layers},
              {"num_attention_heads", c.num_attention_heads},
              {"num_key_value_heads", c.num_key_value_heads},
              {"head_dim", c.head_dim},
              {"hidden_act", c.hidden_act},
              {"rms_norm_eps", c.rms_norm_eps},
              {"max_position_embeddings", c.max_position_embeddings},
              {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", c.rope_theta}}},
              {"attention_bias", c.attention_bias},
              {"use_sliding_window", c.use_sliding_window},
              {"sliding_window", c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr)},
              {"decoder_sparse_step", c.decoder_sparse_step},
              {"mlp_only_layers", c.mlp_only_layers},
              {"moe_intermediate_size", c.moe_intermediate_size},
              {"num_local_experts", c.num_experts},
              {"num_experts_per_tok", c.num_experts_per_tok},
              {"norm_topk_prob", c.norm_topk_prob},
              {"output_router_logits", c.output_router_logits},
              {"router_aux_loss_coef", c.router_aux_loss_coef},
              {"tie_word_embeddings", c.tie_word_embeddings},
              {"pad_token_id", id(c.pad_token_id)},
              {"bos_token_id", id(c.bos_token_id)},
              {"eos_token_id", id(c.eos_token_id)}};
}

}  // namespace automoe
