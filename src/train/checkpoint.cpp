// train/checkpoint.cpp: save/load of training checkpoints; a checkpoint folder appears only
// complete (written as step-N.tmp, then renamed), and old ones are pruned after the new one.
#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "dist/process_group.h"
#include "dist/zero_partition.h"
#include "io/safetensors.h"

namespace automoe {

namespace fs = std::filesystem;

namespace {


// Which parameters a file holds: all of them, or (expert parallelism) the replicated ones in the
// shared file and this rank's expert shards in its own.
enum class Part { All, Dense, Experts };
bool in_part(const ParamSpec& p, Part part) {
  return part == Part::All || (part == Part::Experts) == p.expert;
}

// One tensor per parameter, under the internal names (the arena layout is the contract).
std::vector<std::pair<std::string, Tensor>> named(const Qwen3Moe& model, const std::vector<float>& arena,
                                                  Part part = Part::All) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& p : model.layout().params)
    if (in_part(p, part))
      out.emplace_back(p.name, Tensor::borrow(DType::F32, p.shape, const_cast<float*>(arena.data() + p.offset)));
  return out;
}

void read_into(const SafetensorsFile& f, const Qwen3Moe& model, std::vector<float>& arena, const std::string& what,
               Part part = Part::All) {
  for (auto& p : model.layout().params) {
    if (!in_part(p, part)) continue;
    AM_CHECK(f.has(p.name), "checkpoint {} has no '{}': it was written for another model", what, p.name);
    Tensor t = f.view(p.name);
    AM_CHECK(t.dtype == DType::F32 && t.shape == p.shape, "checkpoint {}: '{}' is {} {}, the model needs F32 {}",
             what, p.name, dtype_name(t.dtype), shape_str(t.shape), shape_str(p.shape));
    std::copy(t.data<float>(), t.data<float>() + p.numel, arena.data() + p.offset);
  }
}

}  // namespace

namespace {

void barrier(const Qwen3Moe& model) {
  if (model.groups()) model.groups()->world.barrier();
}

void save_part(const fs::path& dir, const std::string& suffix, const Qwen3Moe& model, const AdamW& opt, Part part,
               bool with_moments) {
  save_safetensors((dir / ("model" + suffix + ".safetensors")).string(), named(model, model.params(), part), {});
  if (!with_moments) return;  // ZeRO: each rank writes its shard (save_zero_moments)
  auto m = named(model, opt.m, part), v = named(model, opt.v, part);
  std::vector<std::pair<std::string, Tensor>> moments;
  for (auto& [n, t] : m) moments.emplace_back("exp_avg." + n, t);
  for (auto& [n, t] : v) moments.emplace_back("exp_avg_sq." + n, t);
  save_safetensors((dir / ("optimizer" + suffix + ".safetensors")).string(), moments, {});
}

int ep_size(const Qwen3Moe& model) { return model.expert_parallel() ? model.groups()->ep_size() : 1; }
int world_rank(const Qwen3Moe& model) { return model.groups() ? model.groups()->world.rank() : 0; }
int world_size(const Qwen3Moe& model) { return model.groups() ? model.groups()->world.size() : 1; }

// ZeRO: this rank's moment shards, flat ([replicated shard | expert shard] of opt.m and opt.v).
fs::path zero_file(const fs::path& dir, int rank) { return dir / fmt::format("optimizer-zero-{}.safetensors", rank); }
struct ZeroPart {
  const char* name;
  int64_t at, numel;
};
std::vector<ZeroPart> zero_parts(const dist::ZeroPartition& z) {
  std::vector<ZeroPart> out;
  if (z.replicated_shard() > 0) out.push_back({"replicated", 0, z.replicated_shard()});
  if (z.expert_shard() > 0) out.push_back({"experts", z.replicated_shard(), z.expert_shard()});
  return out;
}

void save_zero_moments(const fs::path& dir, const Qwen3Moe& model, const AdamW& opt, const dist::ZeroPartition& z) {
  std::vector<std::pair<std::string, Tensor>> t;
  for (auto& [prefix, arena] : {std::pair{"exp_avg.", &opt.m}, std::pair{"exp_avg_sq.", &opt.v}})
    for (auto& p : zero_parts(z))
      t.emplace_back(prefix + std::string(p.name),
                     Tensor::borrow(DType::F32, {p.numel}, const_cast<float*>(arena->data() + p.at)));
  SafetensorsMetadata meta = {{"zero", std::to_string(z.level())},
                              {"world_size", std::to_string(world_size(model))},
                              {"rank", std::to_string(world_rank(model))},
                              {"replicated_numel", std::to_string(z.replicated_numel())},
                              {"expert_numel", std::to_string(z.expert_numel())}};
  save_safetensors(zero_file(dir, world_rank(model)).string(), t, meta);
}

}  // namespace

void save_checkpoint(const std::string& output_dir, const TrainState& st, const Qwen3Moe& model,
                     const AdamW& opt, int64_t keep, const dist::ZeroPartition* zero) {
  const dist::Groups* g = model.groups();
  const bool lead = !g || g->world.rank() == 0, ep = model.expert_parallel();
  fs::path root = fs::path(output_dir) / "checkpoints";
  std::string name = fmt::format("step-{:07d}", st.step);
  fs::path tmp = root / (name + ".tmp"), final_dir = root / name;
  if (lead) {
    fs::create_directories(root);
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  barrier(model);
  if (lead) save_part(tmp, "", model, opt, ep ? Part::Dense : Part::All, !zero);
  if (ep && g->dp.rank() == 0)  // one copy of each expert shard: the first DP replica writes it
    save_part(tmp, fmt::format("-rank-{}", g->ep.rank()), model, opt, Part::Experts, !zero);
  if (zero) save_zero_moments(tmp, model, opt, *zero);  // every rank: its own shard
  barrier(model);
  if (!lead) {
    barrier(model);  // the checkpoint is complete (renamed) when every rank leaves
    return;
  }
  nlohmann::json j = {{"step", st.step}, {"data_epoch", st.data_epoch}, {"data_cursor", st.data_cursor},
                      {"adamw_t", opt.t}, {"num_params", model.global_numel()},
                      {"last_grad_norm", st.last_grad_norm}};
  if (ep) j["expert_parallel"] = ep_size(model);
  if (zero) {
    j["zero"] = zero->level();
    j["world_size"] = world_size(model);
  }
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
  barrier(model);
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

TrainState load_checkpoint(const std::string& dir, Qwen3Moe& model, AdamW& opt, const dist::ZeroPartition* zero) {
  std::ifstream f(fs::path(dir) / "state.json");
  AM_CHECK(f.good(), "checkpoint {} has no state.json", dir);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    AM_FAIL("checkpoint {}/state.json is not valid JSON ({})", dir, e.what());
  }
  AM_CHECK(j.value("num_params", int64_t(-1)) == model.global_numel(),
           "checkpoint {} holds {} parameters, the model has {}: it belongs to another model",
           dir, j.value("num_params", int64_t(-1)), model.global_numel());
  // ZeRO shards fit only the partition they were cut for: the same level and world size
  const int64_t ck_zero = j.value("zero", int64_t(0)), ck_world = j.value("world_size", int64_t(-1));
  const int64_t run_zero = zero ? zero->level() : 0, run_world = world_size(model);
  auto layout = [](int64_t z, int64_t w) {  // w < 0: not recorded (a train.zero 0 checkpoint)
    return w < 0 ? fmt::format("train.zero {}", z) : fmt::format("train.zero {} on {} rank{}", z, w, w == 1 ? "" : "s");
  };
  if (ck_zero != 0 || run_zero != 0)
    AM_CHECK(ck_zero == run_zero && ck_world == run_world,
             "checkpoint {} was written with {}, this run has {}; resume with {}{} (re-sharding ZeRO "
             "optimizer state is not implemented yet)",
             dir, layout(ck_zero, ck_world), layout(run_zero, run_world), layout(ck_zero, ck_world),
             ck_zero ? fmt::format(" (mpirun -np {} ... --train.zero {})", ck_world, ck_zero) : std::string(""));
  const int64_t ck_ep = j.value("expert_parallel", int64_t(1));
  AM_CHECK(ck_ep == ep_size(model),
           "checkpoint {} was written with expert parallelism {}, this run has {}; resume with train.ep {} "
           "(re-sharding a checkpoint is not implemented yet)",
           dir, ck_ep, ep_size(model), ck_ep);
  const bool ep = model.expert_parallel();
  opt.init(zero ? zero->shard_numel() : int64_t(model.params().size()));
  if (zero) {
    SafetensorsFile of(zero_file(dir, world_rank(model)).string());
    for (auto& [prefix, arena] : {std::pair{"exp_avg.", &opt.m}, std::pair{"exp_avg_sq.", &opt.v}})
      for (auto& p : zero_parts(*zero)) {
        std::string key = prefix + std::string(p.name);
        AM_CHECK(of.has(key), "checkpoint {} has no optimizer tensor '{}' in {}", dir, key, zero_file(dir, world_rank(model)).string());
        Tensor t = of.view(key);
        AM_CHECK(t.dtype == DType::F32 && t.shape == Shape{p.numel},
                 "checkpoint {}: ZeRO shard '{}' is {} {}, this rank's shard is F32 [{}]: it was cut for another layout",
                 dir, key, dtype_name(t.dtype), shape_str(t.shape), p.numel);
        std::copy(t.data<float>(), t.data<float>() + p.numel, arena->data() + p.at);
      }
  }
  std::vector<std::pair<std::string, Part>> files = {{"", ep ? Part::Dense : Part::All}};
  if (ep) files.emplace_back(fmt::format("-rank-{}", model.groups()->ep.rank()), Part::Experts);
  for (auto& [suffix, part] : files) {
    read_into(SafetensorsFile((fs::path(dir) / ("model" + suffix + ".safetensors")).string()), model, model.params(), dir, part);
    if (zero) continue;  // the moments came from this rank's ZeRO shard
    SafetensorsFile of((fs::path(dir) / ("optimizer" + suffix + ".safetensors")).string());
    for (auto& [prefix, arena] : {std::pair{"exp_avg.", &opt.m}, std::pair{"exp_avg_sq.", &opt.v}})
      for (auto& p : model.layout().params) {
        if (!in_part(p, part)) continue;
        std::string key = prefix + p.name;
        AM_CHECK(of.has(key), "checkpoint {} has no optimizer tensor '{}'", dir, key);
        Tensor t = of.view(key);
        AM_CHECK(t.shape == p.shape && t.dtype == DType::F32, "checkpoint {}: '{}' has the wrong shape or dtype", dir, key);
        std::copy(t.data<float>(), t.data<float>() + p.numel, arena->data() + p.offset);
      }
  }
  opt.t = j.at("adamw_t").get<int64_t>();
  TrainState st{j.at("step").get<int64_t>(), j.at("data_epoch").get<int64_t>(),
                j.at("data_cursor").get<int64_t>()};
  if (j.contains("last_grad_norm")) st.last_grad_norm = j.at("last_grad_norm").get<double>();
  return st;
}

}  // namespace automoe
