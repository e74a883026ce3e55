// tests/model/test_weights.cpp: loading HF weights: clear errors for missing tensors and shape
// mismatches; the export round trip (per-expert keys, sharded) loads back bit-identically.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "core/check.h"
#include "io/safetensors.h"
#include "model/qwen3_moe.h"
#include "model/weights.h"

using namespace automoe;
namespace fs = std::filesystem;

namespace {
const std::string kFix = std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/hf/";

std::string tmpdir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("automoe_w_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

// A copy of tiny_a/model whose safetensors holds all tensors except those `drop` rejects.
std::string copy_without(const std::string& name, const std::function<bool(const std::string&)>& drop) {
  std::string d = tmpdir(name);
  fs::copy_file(kFix + "tiny_a/model/config.json", d + "/config.json");
  SafetensorsFile src(kFix + "tiny_a/model/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> keep;
  for (auto& n : src.names())
    if (!drop(n)) keep.emplace_back(n, src.view(n));
  save_safetensors(d + "/model.safetensors", keep, {});
  return d;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Weights, MissingTensorsAreListed) {
  std::string d = copy_without("missing", [](const std::string& n) {
    return n == "model.layers.1.mlp.experts.2.up_proj.weight" || n == "model.norm.weight";
  });
  Qwen3Moe m(load_model_config(d + "/config.json"));
  std::string e = error_of([&] { load_hf_weights(m, d); });
  EXPECT_NE(e.find("2 tensor(s)"), std::string::npos) << e;
  EXPECT_NE(e.find("model.layers.1.mlp.experts.2.up_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("model.norm.weight"), std::string::npos) << e;
}

TEST(Weights, ShapeNotMatchingConfigIsAnError) {
  std::string d = tmpdir("shape");
  fs::copy_file(kFix + "tiny_a/model/model.safetensors", d + "/model.safetensors");
  auto cfg = nlohmann::json::parse(std::ifstream(kFix + "tiny_a/model/config.json"));
  cfg["moe_intermediate_size"] = 8;  // the checkpoint has 16
  std::ofstream(d + "/config.json") << cfg.dump();
  Qwen3Moe m(load_model_config(d + "/config.json"));
  std::string e = error_of([&] { load_hf_weights(m, d); });
  EXPECT_NE(e.find("gate_proj.weight' has shape [16, 32], but config.json implies [8, 32]"), std::string::npos) << e;
}

TEST(Weights, ExportRoundTripShardedIsExact) {
  Qwen3Moe m(load_model_config(kFix + "tiny_c/model/config.json"));
  load_hf_weights(m, kFix + "tiny_c/model");
  std::string d = tmpdir("export");
  save_hf_model(m, d, kFix + "tiny_c/model", 20000);  // small shards: several files + index
  EXPECT_TRUE(fs::exists(d + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(d + "/config.json"));
  EXPECT_TRUE(fs::exists(d + "/generation_config.json"));
  Qwen3Moe back(load_model_config(d + "/config.json"));
  load_hf_weights(back, d);
  EXPECT_TRUE(back.params() == m.params());
  // per-expert keys, as save_pretrained writes them
  SafetensorsModel st(d);
  EXPECT_TRUE(st.has("model.layers.1.mlp.experts.6.down_proj.weight"));
  EXPECT_TRUE(st.has("model.layers.0.mlp.gate_proj.weight"));  // layer 0 is dense in tiny_c
  EXPECT_TRUE(st.has("model.layers.0.self_attn.q_proj.bias"));
}
