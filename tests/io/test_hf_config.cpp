// tests/io/test_hf_config.cpp: config.json parsing for qwen3_moe: both hub spellings, defaults,
// the MoE layer pattern, export JSON, and one test per bad input (message names file and field).
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "core/check.h"
#include "model/config.h"

using namespace automoe;
using nlohmann::json;

namespace {

const std::string kFix = std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/hf/";

// A Qwen3-30B-A3B-shaped config as the original hub release writes it.
json hub_config() {
  return {{"architectures", {"Qwen3MoeForCausalLM"}}, {"model_type", "qwen3_moe"}, {"vocab_size", 151936},
          {"hidden_size", 2048}, {"intermediate_size", 6144}, {"num_hidden_layers", 48},
          {"num_attention_heads", 32}, {"num_key_value_heads", 4}, {"head_dim", 128}, {"hidden_act", "silu"},
          {"rms_norm_eps", 1e-6}, {"max_position_embeddings", 40960}, {"rope_theta", 1000000.0},
          {"rope_scaling", nullptr}, {"decoder_sparse_step", 1}, {"mlp_only_layers", json::array()},
          {"moe_intermediate_size", 768}, {"num_experts", 128}, {"num_experts_per_tok", 8},
          {"norm_topk_prob", true}, {"use_sliding_window", false}, {"sliding_window", nullptr},
          {"tie_word_embeddings", false}, {"bos_token_id", 151643}, {"eos_token_id", 151645},
          {"torch_dtype", "bfloat16"}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Parsing `j` fails with a message naming the file and containing every part.
void expect_error(const json& j, const std::vector<std::string>& parts) {
  std::string e = error_of([&] { parse_model_config(j.dump(), "/models/x/config.json"); });
  EXPECT_NE(e.find("/models/x/config.json"), std::string::npos) << e;
  for (auto& p : parts) EXPECT_NE(e.find(p), std::string::npos) << e;
}

}  // namespace

TEST(HfConfig, HubSpellings) {
  ModelConfig c = parse_model_config(hub_config().dump(), "hub");
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.num_moe_layers(), 48);
  EXPECT_EQ(c.raw, hub_config());
}

TEST(HfConfig, TransformersV5Spellings) {
  ModelConfig c = load_model_config(kFix + "tiny_a/model/config.json");  // written by transformers 5.17
  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.router_aux_loss_coef, 0.01);
  EXPECT_TRUE(c.output_router_logits);
  json j = hub_config();
  j.erase("num_experts");
  j.erase("rope_theta");
  j.erase("torch_dtype");
  j["num_local_experts"] = 64;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}};
  j["dtype"] = "bfloat16";
  c = parse_model_config(j.dump(), "v5");
  EXPECT_EQ(c.num_experts, 64);
  EXPECT_EQ(c.rope_theta, 5e5);
}

TEST(HfConfig, DefaultsAndLayerPattern) {
  json j = hub_config();
  for (const char* k : {"head_dim", "norm_topk_prob", "rms_norm_eps", "rope_theta", "mlp_only_layers",
                        "num_key_value_heads", "max_position_embeddings"})
    j.erase(k);
  ModelConfig c = parse_model_config(j.dump(), "defaults");
  EXPECT_EQ(c.head_dim, 2048 / 32);
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_FALSE(c.norm_topk_prob);  // transformers' default
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  ModelConfig b = load_model_config(kFix + "tiny_b/model/config.json");  // mlp_only_layers [1]
  EXPECT_TRUE(b.is_moe_layer(0));
  EXPECT_FALSE(b.is_moe_layer(1));
  EXPECT_EQ(b.num_moe_layers(), 2);
  ModelConfig s = load_model_config(kFix + "tiny_c/model/config.json");  // decoder_sparse_step 2
  EXPECT_FALSE(s.is_moe_layer(0));
  EXPECT_TRUE(s.is_moe_layer(1));
  EXPECT_EQ(s.num_moe_layers(), 1);
}

TEST(HfConfig, ToJsonReturnsRawOrBuildsALoadableOne) {
  ModelConfig c = load_model_config(kFix + "tiny_c/model/config.json");
  EXPECT_EQ(model_config_to_json(c), c.raw);
  c.raw = json();
  json built = model_config_to_json(c);
  EXPECT_EQ(built["architectures"][0], "Qwen3MoeForCausalLM");
  EXPECT_EQ(built["num_local_experts"], 7);
  ModelConfig back = parse_model_config(built.dump(), "built");
  EXPECT_EQ(back.num_experts, c.num_experts);
  EXPECT_EQ(back.rope_theta, c.rope_theta);
  EXPECT_EQ(back.decoder_sparse_step, c.decoder_sparse_step);
  EXPECT_EQ(back.attention_bias, c.attention_bias);
  EXPECT_EQ(back.norm_topk_prob, c.norm_topk_prob);
  EXPECT_EQ(back.head_dim, c.head_dim);
  EXPECT_EQ(back.router_aux_loss_coef, c.router_aux_loss_coef);
  EXPECT_EQ(back.bos_token_id, c.bos_token_id);
}

TEST(HfConfigBad, MalformedJson) {
  std::string e = error_of([] { parse_model_config("{\n  \"vocab_size\": 3,\n  oops\n}", "/m/config.json"); });
  EXPECT_NE(e.find("/m/config.json is not valid JSON"), std::string::npos) << e;
  EXPECT_NE(e.find("line 3"), std::string::npos) << e;
}

TEST(HfConfigBad, MissingFile) {
  std::string e = error_of([] { load_model_config("/nonexistent/model/config.json"); });
  EXPECT_NE(e.find("/nonexistent/model/config.json"), std::string::npos) << e;
}

TEST(HfConfigBad, MissingField) {
  json j = hub_config();
  j.erase("hidden_size");
  expect_error(j, {"required field \"hidden_size\" is missing"});
  j = hub_config();
  j.erase("num_experts");
  expect_error(j, {"\"num_experts\" (or \"num_local_experts\") is missing"});
}

TEST(HfConfigBad, WrongType) {
  json j = hub_config();
  j["num_attention_heads"] = "32";
  expect_error(j, {"\"num_attention_heads\" must be an integer", "\"32\""});
  j = hub_config();
  j["rope_parameters"] = {{"rope_theta", "big"}};
  expect_error(j, {"\"rope_parameters.rope_theta\" must be a number"});
}

TEST(HfConfigBad, UnsupportedModelType) {
  json j = hub_config();
  j["model_type"] = "mixtral";
  expect_error(j, {"model_type 'mixtral' is not supported yet", "qwen3_moe"});
}

TEST(HfConfigBad, UnsupportedSettings) {
  json j = hub_config();
  j["use_sliding_window"] = true;
  expect_error(j, {"use_sliding_window true is not supported yet"});
  j = hub_config();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error(j, {"rope_scaling", "not supported yet"});
  j = hub_config();
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e6}};
  expect_error(j, {"rope_type 'yarn' is not supported yet"});
  j = hub_config();
  j["hidden_act"] = "gelu";
  expect_error(j, {"hidden_act 'gelu' is not supported yet"});
}

TEST(HfConfigBad, ValuesThatMakeNoSense) {
  json j = hub_config();
  j["num_key_value_heads"] = 5;
  expect_error(j, {"\"num_attention_heads\" (32) must be a multiple of \"num_key_value_heads\" (5)"});
  j = hub_config();
  j["num_experts_per_tok"] = 129;
  expect_error(j, {"\"num_experts_per_tok\" (129) cannot exceed the number of experts (128)"});
  j = hub_config();
  j["moe_intermediate_size"] = 0;
  expect_error(j, {"\"moe_intermediate_size\" must be positive"});
  j = hub_config();
  j["mlp_only_layers"] = {48};
  expect_error(j, {"\"mlp_only_layers\" names layer 48"});
  j = hub_config();
  j["num_local_experts"] = 64;
  expect_error(j, {"\"num_experts\" (128) and \"num_local_experts\" (64) disagree"});
}
