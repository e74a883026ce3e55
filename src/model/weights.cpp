// model/weights.cpp: HF checkpoint <-> parameter arena.
#include "model/weights.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>

#include "core/check.h"
#include "dist/process_group.h"
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
    const float* src = t.f32() + s.src_offset;  // a fused key: this rank's experts
    std::copy(src, src + s.numel, model.params().data() + s.offset);
  }
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 20; ++i) list += "\n  " + missing[i];
    if (missing.size() > 20) list += fmt::format("\n  ... and {} more", missing.size() - 20);
    AM_FAIL("{}: {} tensor(s) the config needs are missing from the checkpoint:{}", model_dir,
            missing.size(), list);
  }
  std::vector<std::string> extra;
  for (auto& n : st.names())  // with expert parallelism, the other ranks load the other experts
    if (!used.count(n) && !(model.expert_parallel() && n.find(".mlp.experts.") != std::string::npos))
      extra.push_back(n);
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

void for_each_hf_tensor(const Qwen3Moe& model, const std::vector<float>& arena,
                        const std::function<void(const std::string&, const Tensor&)>& emit) {
  const dist::Groups* g = model.groups();
  const bool lead = !g || g->world.rank() == 0;
  if (!model.expert_parallel()) {
    if (lead)
      for (auto& [n, t] : hf_tensors(model, arena)) emit(n, t);
    return;
  }
  if (g->dp.rank() != 0) return;  // the EP group of world rank 0 holds every expert once
  const auto& c = model.config();
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  int64_t layer_done = -1;
  for (auto& s : model.hf_slices()) {
    if (s.expert < 0) {
      if (lead) emit(s.hf_name, Tensor::borrow(DType::F32, s.shape, const_cast<float*>(arena.data() + s.offset)));
      continue;
    }
    if (s.layer == layer_done) continue;  // this layer's experts went out with its first one
    layer_done = s.layer;
    std::string p = "layers." + std::to_string(s.layer) + ".moe.";
    const ParamSpec &gu = model.layout().find(p + "experts_gate_up"), &dn = model.layout().find(p + "experts_down");
    auto gu_all = std::make_shared<std::vector<float>>(lead ? E * 2 * I * H : 0);  // [E,2I,H]
    auto dn_all = std::make_shared<std::vector<float>>(lead ? E * H * I : 0);      // [E,H,I]
    g->ep.gather(gu_all->data(), arena.data() + gu.offset, gu.numel * int64_t(sizeof(float)), 0);
    g->ep.gather(dn_all->data(), arena.data() + dn.offset, dn.numel * int64_t(sizeof(float)), 0);
    if (!lead) continue;
    std::string h = "model.layers." + std::to_string(s.layer) + ".mlp.experts.";
    for (int64_t e = 0; e < E; ++e) {
      std::string x = h + std::to_string(e) + ".";
      emit(x + "gate_proj.weight", Tensor::borrow(DType::F32, {I, H}, gu_all->data() + e * 2 * I * H, gu_all));
      emit(x + "up_proj.weight", Tensor::borrow(DType::F32, {I, H}, gu_all->data() + e * 2 * I * H + I * H, gu_all));
      emit(x + "down_proj.weight", Tensor::borrow(DType::F32, {H, I}, dn_all->data() + e * H * I, dn_all));
    }
  }
}

void save_hf_model(const Qwen3Moe& model, const std::string& out_dir, const std::string& source_dir,
                   int64_t max_shard_bytes) {
  const bool lead = !model.groups() || model.groups()->world.rank() == 0;
  std::unique_ptr<ShardedWriter> w;
  if (lead) w = std::make_unique<ShardedWriter>(out_dir, max_shard_bytes, SafetensorsMetadata{{"format", "pt"}});
  for_each_hf_tensor(model, model.params(), [&](const std::string& n, const Tensor& t) { w->add(n, t); });
  if (!lead) return;
  w->finish();
  nlohmann::json cfg = model_config_to_json(model.config());
  cfg.erase("torch_dtype");
  cfg["dtype"] = "float32";  // automoe's CPU path trains and exports fp32
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
