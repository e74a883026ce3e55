// model/weights.cpp: HF checkpoint <-> parameter arena.
#include "model/weights.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/check.h"
#include "io/safetensors.h"

namespace automoe {

namespace fs = std::filesystem;

void load_hf_weights(Qwen3Moe& model, const std::string& model_dir) {
  SafetensorsModel st(model_dir);
  // Per-expert keys (save_pretrained) or v5's fused keys (save_original_format=False).
  const auto& cfg = model.config();
  bool fused = false;
  for (int64_t l = 0; l < cfg.num_hidden_layers && !fused; ++l)
    fused = st.has("model.layers." + std::to_string(l) + ".mlp.experts.gate_up_proj");
  const auto& slices = fused ? model.hf_fused_slices() : model.hf_slices();
  std::vector<std::string> missing;
  std::set<std::string> used;
  for (auto& s : slices) {
    if (!st.has(s.hf_name)) {
      missing.push_back(s.hf_name);
      continue;
    }
    used.insert(s.hf_name);
    TensorInfo info = st.info(s.hf_name);
    AM_CHECK(info.shape == s.shape,
             "{}: tensor '{}' has shape {}, but config.json implies {}; the checkpoint does not "
             "match its config",
             model_dir, s.hf_name, shape_str(info.shape), shape_str(s.shape));
    AM_CHECK(info.dtype == DType::F32 || info.dtype == DType::BF16 || info.dtype == DType::F16,
             "{}: tensor '{}' is {}; automoe loads F32, BF16 or F16 weights", model_dir, s.hf_name,
             dtype_name(info.dtype));
    Tensor t = st.load_f32(s.hf_name);
    std::copy(t.f32(), t.f32() + s.numel, model.params().data() + s.offset);
  }
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 20; ++i) list += "\n  " + missing[i];
    if (missing.size() > 20) list += fmt::format("\n  ... and {} more", missing.size() - 20);
    AM_FAIL("{}: {} tensor(s) the config needs are missing from the checkpoint:{}", model_dir,
            missing.size(), list);
  }
  std::vector<std::string> extra;
  for (auto& n : st.names())
    if (!used.count(n)) extra.push_back(n);
  if (!extra.empty())
    std::fprintf(stderr, "automoe: warning: %s holds %zu tensor(s) the model does not use (first: %s)\n",
                 model_dir.c_str(), extra.size(), extra[0].c_str());
}

std::vector<std::pair<std::string, Tensor>> hf_tensors(const Qwen3Moe& model,
                                                       const std::vector<float>& arena) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& s : model.hf_slices())
    out.emplace_back(s.hf_name, Tensor::borrow(DType::F32, s.shape, const_cast<float*>(arena.data() + s.offset)));
  return out;
}

void save_hf_model(const Qwen3Moe& model, const std::string& out_dir, const std::string& source_dir,
                   int64_t max_shard_bytes) {
  fs::create_directories(out_dir);
  nlohmann::json cfg = model_config_to_json(model.config());
  cfg.erase("torch_dtype");
  cfg["dtype"] = "float32";  // automoe's CPU path trains and exports fp32
  save_sharded(out_dir, hf_tensors(model, model.params()), max_shard_bytes, {{"format", "pt"}});
  std::string tmp = out_dir + "/config.json.tmp";
  {
    std::ofstream f(tmp);
    f << cfg.dump(2) << "\n";
    AM_CHECK(f.good(), "cannot write {}", tmp);
  }
  fs::rename(tmp, out_dir + "/config.json");
  if (!source_dir.empty())
    for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json"})
      if (fs::exists(fs::path(source_dir) / name))
        fs::copy_file(fs::path(source_dir) / name, fs::path(out_dir) / name,
                      fs::copy_options::overwrite_existing);
}

}  // namespace automoe
