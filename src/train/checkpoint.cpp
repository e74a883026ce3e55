// train/checkpoint.cpp: save/load of training checkpoints; a checkpoint folder appears only
// complete (written as step-N.tmp, then renamed), and old ones are pruned after the new one.
#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/safetensors.h"

namespace automoe {

namespace fs = std::filesystem;

namespace {


// One tensor per parameter, under the internal names (the arena layout is the contract).
std::vector<std::pair<std::string, Tensor>> named(const Qwen3Moe& model, const std::vector<float>& arena) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& p : model.layout().params)
    out.emplace_back(p.name, Tensor::borrow(DType::F32, p.shape, const_cast<float*>(arena.data() + p.offset)));
  return out;
}

void read_into(const SafetensorsFile& f, const Qwen3Moe& model, std::vector<float>& arena, const std::string& what) {
  for (auto& p : model.layout().params) {
    AM_CHECK(f.has(p.name), "checkpoint {} has no '{}': it was written for another model", what, p.name);
    Tensor t = f.view(p.name);
    AM_CHECK(t.dtype == DType::F32 && t.shape == p.shape, "checkpoint {}: '{}' is {} {}, the model needs F32 {}",
             what, p.name, dtype_name(t.dtype), shape_str(t.shape), shape_str(p.shape));
    std::copy(t.data<float>(), t.data<float>() + p.numel, arena.data() + p.offset);
  }
}

}  // namespace

void save_checkpoint(const std::string& output_dir, const TrainState& st, const Qwen3Moe& model,
                     const AdamW& opt, int64_t keep) {
  fs::path root = fs::path(output_dir) / "checkpoints";
  fs::create_directories(root);
  std::string name = fmt::format("step-{:07d}", st.step);
  fs::path tmp = root / (name + ".tmp"), final_dir = root / name;
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  save_safetensors((tmp / "model.safetensors").string(), named(model, model.params()), {});
  auto m = named(model, opt.m), v = named(model, opt.v);
  std::vector<std::pair<std::string, Tensor>> moments;
  for (auto& [n, t] : m) moments.emplace_back("exp_avg." + n, t);
  for (auto& [n, t] : v) moments.emplace_back("exp_avg_sq." + n, t);
  save_safetensors((tmp / "optimizer.safetensors").string(), moments, {});
  nlohmann::json j = {{"step", st.step}, {"data_epoch", st.data_epoch}, {"data_cursor", st.data_cursor},
                      {"adamw_t", opt.t}, {"num_params", model.params().size()}};
  std::ofstream(tmp / "state.json") << j.dump(1) << "\n";
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  // prune: keep the newest `keep` checkpoints
  std::vector<fs::path> all;
  for (auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0 &&
        e.path().extension() != ".tmp")
      all.push_back(e.path());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; keep > 0 && i + size_t(keep) < all.size(); ++i) fs::remove_all(all[i]);
}

std::string latest_checkpoint(const std::string& output_dir) {
  fs::path root = fs::path(output_dir) / "checkpoints";
  if (!fs::exists(root)) return "";
  std::string best;
  for (auto& e : fs::directory_iterator(root)) {
    std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0 && e.path().extension() != ".tmp" &&
        fs::exists(e.path() / "state.json") && n > fs::path(best).filename().string())
      best = e.path().string();
  }
  return best;
}

TrainState load_checkpoint(const std::string& dir, Qwen3Moe& model, AdamW& opt) {
  std::ifstream f(fs::path(dir) / "state.json");
  AM_CHECK(f.good(), "checkpoint {} has no state.json", dir);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    AM_FAIL("checkpoint {}/state.json is not valid JSON ({})", dir, e.what());
  }
  AM_CHECK(j.value("num_params", int64_t(-1)) == int64_t(model.params().size()),
           "checkpoint {} holds {} parameters, the model has {}: it belongs to another model",
           dir, j.value("num_params", int64_t(-1)), model.params().size());
  read_into(SafetensorsFile((fs::path(dir) / "model.safetensors").string()), model, model.params(), dir);
  SafetensorsFile of((fs::path(dir) / "optimizer.safetensors").string());
  opt.init(int64_t(model.params().size()));
  for (auto& [prefix, arena] : {std::pair{"exp_avg.", &opt.m}, std::pair{"exp_avg_sq.", &opt.v}})
    for (auto& p : model.layout().params) {
      std::string key = prefix + p.name;
      AM_CHECK(of.has(key), "checkpoint {} has no optimizer tensor '{}'", dir, key);
      Tensor t = of.view(key);
      AM_CHECK(t.shape == p.shape && t.dtype == DType::F32, "checkpoint {}: '{}' has the wrong shape or dtype", dir, key);
      std::copy(t.data<float>(), t.data<float>() + p.numel, arena->data() + p.offset);
    }
  opt.t = j.at("adamw_t").get<int64_t>();
  return {j.at("step").get<int64_t>(), j.at("data_epoch").get<int64_t>(), j.at("data_cursor").get<int64_t>()};
}

}  // namespace automoe
