// train/train_config.cpp: recipe parsing with yaml-cpp; every key is known and typed.
#include "train/train_config.h"

#include <yaml-cpp/yaml.h>

#include <functional>
#include <map>

#include "core/check.h"
#include "dist/ep_arena.h"

namespace automoe {

namespace {

// The table of keys: "section.key" -> how to set it from a string.
using Setter = std::function<void(TrainConfig&, const std::string&)>;

template <class T> T parse_as(const std::string& key, const std::string& v) {
  try {
    return YAML::Load(v).as<T>();
  } catch (const std::exception&) {
    AM_FAIL("recipe key '{}': cannot read '{}' as a {}", key, v,
            std::is_same_v<T, bool> ? "boolean (true/false)"
            : std::is_integral_v<T> ? "integer" : std::is_floating_point_v<T> ? "number" : "string");
  }
}

const std::map<std::string, Setter>& keys() {
#define KEY(k, field, T) {k, [](TrainConfig& c, const std::string& v) { c.field = parse_as<T>(k, v); }}
  static const std::map<std::string, Setter> m = {
      KEY("model.path", model_path, std::string),
      KEY("model.builtin", model_builtin, std::string),
      KEY("model.init_std", init_std, float),
      KEY("model.router_aux_loss_coef", router_aux_loss_coef, float),
      KEY("data.train", data_train, std::string),
      KEY("data.builtin", data_builtin, std::string),
      KEY("data.format", data_format, std::string),
      KEY("data.tokenizer", data_tokenizer, std::string),
      KEY("data.train_on_prompt", train_on_prompt, bool),
      KEY("data.skip_bad", skip_bad, bool),
      KEY("data.enable_thinking", enable_thinking, std::string),
      KEY("data.examples", data_examples, int64_t),
      KEY("data.digits", data_digits, int64_t),
      KEY("data.seq_len", seq_len, int64_t),
      KEY("data.micro_batch", micro_batch, int64_t),
      KEY("train.steps", steps, int64_t),
      KEY("train.grad_accum", grad_accum, int64_t),
      KEY("train.lr", schedule.lr, float),
      KEY("train.schedule", schedule.kind, std::string),
      KEY("train.warmup", schedule.warmup, int64_t),
      KEY("train.min_lr_ratio", schedule.min_lr_ratio, float),
      KEY("train.beta1", adamw.beta1, float),
      KEY("train.beta2", adamw.beta2, float),
      KEY("train.eps", adamw.eps, float),
      KEY("train.weight_decay", adamw.weight_decay, float),
      KEY("train.max_grad_norm", max_grad_norm, float),
      KEY("train.seed", seed, uint64_t),
      KEY("train.log_every", log_every, int64_t),
      KEY("train.checkpoint_every", checkpoint_every, int64_t),
      KEY("train.keep_checkpoints", keep_checkpoints, int64_t),
      KEY("train.device", device, std::string),
      KEY("train.precision", precision, std::string),
      KEY("train.memory_saving", memory_saving, bool),
      KEY("train.ep", ep, int64_t),
      KEY("train.ep_capacity", ep_capacity, double),
      KEY("train.ep_recompute", ep_recompute, std::string),
      KEY("train.ep_dispatch", ep_dispatch, std::string),
      KEY("train.ep_chunks", ep_chunks, int64_t),
      KEY("train.ep_halves", ep_halves, bool),
      KEY("train.ep_balance", ep_balance, bool),
      KEY("train.zero", zero, int64_t),
      KEY("output.dir", output_dir, std::string),
      KEY("output.export_hf", export_hf, bool),
      KEY("output.resume", resume, bool),
  };
#undef KEY
  return m;
}

void set_key(TrainConfig& c, const std::string& key, const std::string& value, const std::string& where) {
  auto it = keys().find(key);
  if (it == keys().end()) {
    std::string known;
    for (auto& [k, _] : keys()) known += (known.empty() ? "" : ", ") + k;
    AM_FAIL("{}: unknown recipe key '{}'. Known keys: {}", where, key, known);
  }
  it->second(c, value);
}

}  // namespace

TrainConfig load_train_config(const std::string& path,
                              const std::vector<std::pair<std::string, std::string>>& overrides) {
  TrainConfig c;
  if (!path.empty()) {
    YAML::Node root;
    try {
      root = YAML::LoadFile(path);
    } catch (const YAML::BadFile&) {
      AM_FAIL("cannot open recipe '{}'", path);
    } catch (const YAML::Exception& e) {
      AM_FAIL("recipe '{}' line {}: {}", path, e.mark.line + 1, e.msg);
    }
    AM_CHECK(root.IsMap() || root.IsNull(), "recipe '{}' must be a mapping of sections (model, data, train, output)", path);
    for (auto sec : root) {
      std::string s = sec.first.as<std::string>();
      AM_CHECK(sec.second.IsMap(), "recipe '{}' line {}: section '{}' must be a mapping", path,
               sec.first.Mark().line + 1, s);
      for (auto kv : sec.second) {
        AM_CHECK(kv.second.IsScalar(), "recipe '{}' line {}: '{}.{}' must be a single value", path,
                 kv.first.Mark().line + 1, s, kv.first.as<std::string>());
        set_key(c, s + "." + kv.first.as<std::string>(), kv.second.Scalar(),
                fmt::format("recipe '{}' line {}", path, kv.first.Mark().line + 1));
      }
    }
  }
  for (auto& [k, v] : overrides) set_key(c, k, v, "command line --" + k);
  c.schedule.total = c.steps;
  c.schedule.validate();
  AM_CHECK(!c.model_path.empty() || !c.model_builtin.empty(),
           "the recipe names no model: set model.path (a Hugging Face model directory) or model.builtin (tiny-moe)");
  AM_CHECK(c.model_path.empty() || c.model_builtin.empty(), "set model.path or model.builtin, not both");
  AM_CHECK(!c.data_train.empty() || !c.data_builtin.empty(),
           "the recipe names no data: set data.train (a pre-tokenized JSONL file) or data.builtin (addition)");
  AM_CHECK(c.data_builtin.empty() || c.data_builtin == "addition",
           "unknown built-in task '{}'; the built-in tasks are: addition", c.data_builtin);
  AM_CHECK(c.steps > 0 && c.grad_accum > 0 && c.seq_len > 1 && c.micro_batch > 0 && c.log_every > 0,
           "train.steps, train.grad_accum, data.micro_batch and train.log_every must be positive and data.seq_len > 1");
  AM_CHECK(c.enable_thinking.empty() || c.enable_thinking == "true" || c.enable_thinking == "false",
           "data.enable_thinking must be true or false, got '{}'", c.enable_thinking);
  AM_CHECK(c.ep >= 1, "train.ep (the expert-parallel size) must be at least 1, got {}", c.ep);
  AM_CHECK(c.ep_capacity > 0 && c.ep_capacity < 1e6,
           "train.ep_capacity (the GPU EP arena over the balanced expert load) must be a positive "
           "number such as 2, got {}",
           c.ep_capacity);
  dist::parse_ep_recompute(c.ep_recompute);  // an unknown name throws, listing the known ones
  AM_CHECK(c.ep_recompute == "none" || (c.device == "cuda" && c.ep > 1),
           "train.ep_recompute {} applies to the GPU expert-parallel block (train.device cuda, "
           "train.ep > 1), but this run has train.device {} and train.ep {}; remove it or set "
           "both",
           c.ep_recompute, c.device, c.ep);
  dist::parse_ep_dispatch(c.ep_dispatch);  // the same for train.ep_dispatch
  AM_CHECK(c.ep_chunks >= 1 && c.ep_chunks <= dist::kEpMaxChunks,
           "train.ep_chunks must be between 1 (no pipelining, the default) and {} (the EP block "
           "pipelines its tokens in that many chunks; 1 unless measured faster), got {}",
           dist::kEpMaxChunks, c.ep_chunks);
  AM_CHECK(c.ep_chunks == 1 || (c.device == "cuda" && c.ep > 1),
           "train.ep_chunks {} applies to the GPU expert-parallel block (train.device cuda, "
           "train.ep > 1), but this run has train.device {} and train.ep {}; remove it or set "
           "both",
           c.ep_chunks, c.device, c.ep);
  AM_CHECK(!c.ep_balance || (c.device == "cpu" && c.ep > 1),
           "train.ep_balance moves expert work between the expert-parallel ranks; it exists on "
           "the CPU backend so far (train.device cpu, train.ep > 1), but this run has "
           "train.device {} and train.ep {}; remove it or set both",
           c.device, c.ep);
  AM_CHECK(!c.ep_halves || (c.device == "cuda" && c.ep > 1),
           "train.ep_halves applies to the GPU expert-parallel block (train.device cuda, "
           "train.ep > 1), but this run has train.device {} and train.ep {}; remove it or set "
           "both",
           c.device, c.ep);
  if (c.ep_dispatch == "padded") {
    AM_CHECK(c.device == "cuda" && c.ep > 1,
             "train.ep_dispatch padded applies to the GPU expert-parallel block (train.device "
             "cuda, train.ep > 1), but this run has train.device {} and train.ep {}; remove it "
             "or set both",
             c.device, c.ep);
    AM_CHECK(c.ep_recompute == "experts",
             "train.ep_dispatch padded needs train.ep_recompute experts (this run has {}): padded "
             "mode cannot know on the host how many rows a layer receives, so every MoE layer "
             "keeps its saved state for the worst case, P x N x min(K, E/P) expert rows; with "
             "gate|up (and the outputs) kept that is about 21 GiB (outputs) or 45 GiB (none) at "
             "Qwen3-30B-A3B, EP 4, 4096 tokens, against 3.1 GiB with experts; set "
             "train.ep_recompute experts or use train.ep_dispatch counts",
             c.ep_recompute);
    AM_CHECK(c.ep_capacity == 2.0,
             "train.ep_capacity {} has no effect with train.ep_dispatch padded (the EP arena holds "
             "every layer's worst case, so it needs no capacity); remove it or use "
             "train.ep_dispatch counts",
             c.ep_capacity);
  }
  AM_CHECK(c.device == "cpu" || c.device == "cuda", "train.device '{}' is not known; use cpu or cuda", c.device);
  AM_CHECK(c.precision == "bf16" || c.precision == "fp32_master",
           "train.precision '{}' is not known; use bf16 (bf16 weights, gradients and AdamW state) or "
           "fp32_master (fp32 master weights, gradients and moments)", c.precision);
  if (c.memory_saving) {
    AM_CHECK(c.device == "cuda", "train.memory_saving is a mode of train.device cuda (the CPU "
             "backend is the fp32 reference); remove it or set train.device cuda");
    AM_CHECK(c.precision == "bf16", "train.memory_saving needs train.precision bf16 (it drops "
             "the bf16 gradient arena); with fp32_master leave it off");
    AM_CHECK(c.grad_accum == 1, "train.memory_saving applies AdamW inside the backward, so it "
             "cannot accumulate gradients: set train.grad_accum 1 (and raise data.micro_batch) "
             "or leave train.memory_saving off");
    AM_CHECK(c.zero == 0, "train.memory_saving keeps every rank's full AdamW moments and "
             "updates each tensor inside the backward, so it does not combine with train.zero {}; "
             "use train.zero 0 or leave train.memory_saving off", c.zero);
  }
  AM_CHECK(c.zero >= 0 && c.zero <= 3,
           "train.zero must be 0 (replicated optimizer state), 1 (optimizer state sharded over the "
           "data-parallel ranks), 2 (optimizer state and gradients sharded) or 3 (parameters "
           "sharded too), got {}", c.zero);
  if (c.zero > 0 && c.device == "cuda") {  // the GPU path has ZeRO-1 and ZeRO-3, default mode
    // (with the memory-saving mode: refused above)
    AM_CHECK(c.zero != 2,
             "train.zero 2 is not built for train.device cuda yet: its memory saving needs the "
             "backward to reduce-scatter each bucket of gradients as it produces them; use "
             "train.zero 3 (parameters, gradients and moments sharded, gathered block by block) "
             "or 1 (sharded AdamW moments) on the GPU, or train.device cpu");
    AM_CHECK(c.precision == "bf16",
             "train.zero {} on train.device cuda needs train.precision bf16 for now (the sharded "
             "step keeps bf16 moments and bf16 weight shards; fp32 master shards are not built "
             "yet); use train.precision bf16 or train.zero 0", c.zero);
  }
  return c;
}

std::string TrainConfig::to_yaml() const {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  if (!model_path.empty()) e << YAML::Key << "path" << YAML::Value << model_path;
  if (!model_builtin.empty()) e << YAML::Key << "builtin" << YAML::Value << model_builtin;
  e << YAML::Key << "init_std" << YAML::Value << init_std;
  if (router_aux_loss_coef >= 0) e << YAML::Key << "router_aux_loss_coef" << YAML::Value << router_aux_loss_coef;
  e << YAML::EndMap;
  e << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  if (!data_train.empty()) e << YAML::Key << "train" << YAML::Value << data_train;
  if (!data_builtin.empty()) e << YAML::Key << "builtin" << YAML::Value << data_builtin;
  e << YAML::Key << "format" << YAML::Value << data_format;
  if (!data_tokenizer.empty()) e << YAML::Key << "tokenizer" << YAML::Value << data_tokenizer;
  e << YAML::Key << "train_on_prompt" << YAML::Value << train_on_prompt << YAML::Key << "skip_bad" << YAML::Value << skip_bad;
  if (!enable_thinking.empty()) e << YAML::Key << "enable_thinking" << YAML::Value << enable_thinking;
  e << YAML::Key << "examples" << YAML::Value << data_examples << YAML::Key << "digits" << YAML::Value
    << data_digits << YAML::Key << "seq_len" << YAML::Value << seq_len << YAML::Key << "micro_batch"
    << YAML::Value << micro_batch << YAML::EndMap;
  e << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "steps" << YAML::Value << steps << YAML::Key << "grad_accum" << YAML::Value << grad_accum
    << YAML::Key << "lr" << YAML::Value << schedule.lr << YAML::Key << "schedule" << YAML::Value
    << schedule.kind << YAML::Key << "warmup" << YAML::Value << schedule.warmup << YAML::Key
    << "min_lr_ratio" << YAML::Value << schedule.min_lr_ratio << YAML::Key << "beta1" << YAML::Value
    << adamw.beta1 << YAML::Key << "beta2" << YAML::Value << adamw.beta2 << YAML::Key << "eps"
    << YAML::Value << adamw.eps << YAML::Key << "weight_decay" << YAML::Value << adamw.weight_decay
    << YAML::Key << "max_grad_norm" << YAML::Value << max_grad_norm << YAML::Key << "seed" << YAML::Value
    << seed << YAML::Key << "log_every" << YAML::Value << log_every << YAML::Key << "checkpoint_every"
    << YAML::Value << checkpoint_every << YAML::Key << "keep_checkpoints" << YAML::Value << keep_checkpoints
    << YAML::Key << "device" << YAML::Value << device;
  if (device != "cpu") e << YAML::Key << "precision" << YAML::Value << precision;
  if (memory_saving) e << YAML::Key << "memory_saving" << YAML::Value << memory_saving;
  if (ep != 1) e << YAML::Key << "ep" << YAML::Value << ep;
  if (ep_capacity != 2.0) e << YAML::Key << "ep_capacity" << YAML::Value << ep_capacity;
  if (ep_recompute != "none") e << YAML::Key << "ep_recompute" << YAML::Value << ep_recompute;
  if (ep_dispatch != "counts") e << YAML::Key << "ep_dispatch" << YAML::Value << ep_dispatch;
  if (ep_chunks != 1) e << YAML::Key << "ep_chunks" << YAML::Value << ep_chunks;
  if (ep_halves) e << YAML::Key << "ep_halves" << YAML::Value << ep_halves;
  if (ep_balance) e << YAML::Key << "ep_balance" << YAML::Value << ep_balance;
  if (zero != 0) e << YAML::Key << "zero" << YAML::Value << zero;
  e << YAML::EndMap;
  e << YAML::Key << "output" << YAML::Value << YAML::BeginMap << YAML::Key << "dir" << YAML::Value
    << output_dir << YAML::Key << "export_hf" << YAML::Value << export_hf << YAML::EndMap;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace automoe
