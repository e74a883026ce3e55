// train/trainer.cpp: the fine-tuning loop on the CPU backend, or on a device model
// (train.device; DeviceTrainModel in trainer.h) with the same data, metrics and checkpoints.
#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "core/check.h"
#include "dist/data_parallel.h"
#include "dist/process_group.h"
#include "dist/zero.h"
#include "dist/zero3.h"
#include "model/qwen3_moe.h"
#include "model/weights.h"
#include "text/chat_template.h"
#include "text/dataset.h"
#include "text/sft.h"
#include "text/tokenizer.h"
#include "train/addition_eval.h"
#include "train/builtin.h"
#include "train/checkpoint.h"

namespace automoe {

namespace fs = std::filesystem;

namespace {
std::map<std::string, DeviceModelFactory>& device_models() {
  static std::map<std::string, DeviceModelFactory> m;
  return m;
}
}  // namespace

void register_device_model(const std::string& device, DeviceModelFactory make) {
  if (make)
    device_models()[device] = std::move(make);
  else
    device_models().erase(device);
}

int64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return 0;
}

namespace {

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = int64_t(s + 0.5);
  return t >= 3600 ? fmt::format("{}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
                   : fmt::format("{}:{:02}", t / 60, t % 60);
}

// Labelled tokens after the causal shift (what the loss is averaged over).
int64_t shifted_labelled(const PackedBatch& b) {
  int64_t n = 0;
  for (int64_t r = 0; r < b.B; ++r)
    for (int64_t t = 1; t < b.T; ++t) n += b.labels[r * b.T + t] != -100;
  return n;
}

// Keeps metrics.jsonl lines with step <= last_step (a resumed run rewrites what came after).
void truncate_metrics(const fs::path& path, int64_t last_step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      if (nlohmann::json::parse(line).value("step", int64_t(0)) <= last_step) kept += line + "\n";
    } catch (const std::exception&) {  // a line cut by a crash: drop it
    }
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

// This rank's rows [r0, r0 + rows) of a packed global micro-batch.
Batch rows_of(const PackedBatch& mb, int64_t r0, int64_t rows) {
  const int64_t T = mb.T, a = r0 * T, b = (r0 + rows) * T;
  Batch out{rows, T, {mb.ids.begin() + a, mb.ids.begin() + b}, {mb.labels.begin() + a, mb.labels.begin() + b}, {}, {}};
  if (!mb.pos.empty()) out.pos.assign(mb.pos.begin() + a, mb.pos.begin() + b);
  if (!mb.doc.empty()) out.doc.assign(mb.doc.begin() + a, mb.doc.begin() + b);
  return out;
}

}  // namespace

std::vector<Example> load_training_data(const TrainConfig& cfg, const ModelConfig& mc, SftStats* stats,
                                        bool print) {
  if (!cfg.data_builtin.empty()) return addition_examples(cfg.data_examples, int(cfg.data_digits), cfg.seed + 1);
  std::string tok_path = !cfg.data_tokenizer.empty() ? cfg.data_tokenizer : cfg.model_path;
  bool have_tok = !tok_path.empty() && (fs::exists(fs::path(tok_path) / "tokenizer.json") ||
                                        fs::exists(fs::path(tok_path) / "vocab.json") || fs::is_regular_file(tok_path));
  if (!have_tok) {  // no tokenizer: the data must be pre-tokenized
    AM_CHECK(cfg.data_format == "auto" || cfg.data_format == "tokens",
             "data.format {} needs a tokenizer: the model directory has none; set data.tokenizer", cfg.data_format);
    return load_tokenized_jsonl(cfg.data_train, mc.vocab_size);
  }
  Tokenizer tok = Tokenizer::load(tok_path);
  std::string tdir = fs::is_directory(tok_path) ? tok_path : fs::path(tok_path).parent_path().string();
  std::unique_ptr<ChatTemplate> chat;
  bool has_template = fs::exists(fs::path(tdir) / "chat_template.jinja") || fs::exists(fs::path(tdir) / "tokenizer_config.json");
  if (has_template) {
    try {
      chat = std::make_unique<ChatTemplate>(ChatTemplate::load(tdir));
    } catch (const Error&) {  // tokenizer_config.json without a chat_template: plain formats still work
    }
  }
  SftOptions opt;
  opt.format = cfg.data_format;
  opt.train_on_prompt = cfg.train_on_prompt;
  opt.skip_bad = cfg.skip_bad;
  if (!cfg.enable_thinking.empty()) opt.template_vars = {{"enable_thinking", cfg.enable_thinking == "true"}};
  std::vector<Example> data = load_sft_file(cfg.data_train, tok, chat.get(), opt, stats);
  for (size_t i = 0; i < data.size(); ++i)
    for (int64_t id : data[i].ids)
      AM_CHECK(id >= 0 && id < mc.vocab_size, "{}: record {} has token id {} outside the model's vocabulary [0, {}); "
               "does the tokenizer belong to this model?", cfg.data_train, i, id, mc.vocab_size);
  if (print)
    std::printf("data %s: %lld records, %lld tokens, %lld with loss%s\n", cfg.data_train.c_str(),
              (long long)stats->records, (long long)stats->tokens, (long long)stats->labelled,
              stats->skipped ? fmt::format(", {} skipped (first: {})", stats->skipped, stats->first_error).c_str() : "");
  return data;
}

TrainResult run_finetune(const TrainConfig& cfg,
                         const std::function<void(const StepMetrics&)>& on_step,
                         const dist::Groups* groups) {
  TrainResult result;
  dist::Groups own;
  if (!groups) own = dist::make_groups(int(cfg.ep));
  const dist::Groups& g = groups ? *groups : own;
  AM_CHECK(g.ep_size() == cfg.ep, "internal: train.ep {} but the expert-parallel group has {} ranks", cfg.ep, g.ep_size());
  const int world = g.world.size(), rank = g.world.rank();
  const bool lead = rank == 0, multi = world > 1;  // rank 0 writes; several ranks reduce
  if (lead) {
    fs::create_directories(cfg.output_dir);
    std::ofstream(fs::path(cfg.output_dir) / "recipe.yaml") << cfg.to_yaml();
  }

  // ---- model
  ModelConfig mc = cfg.model_builtin.empty() ? load_model_config(cfg.model_path + "/config.json")
                                             : builtin_model_config(cfg.model_builtin);
  if (cfg.router_aux_loss_coef >= 0) mc.router_aux_loss_coef = cfg.router_aux_loss_coef;
  // train.device != cpu: the host model keeps parameters only (loading, checkpoints, export)
  const bool on_device = cfg.device != "cpu";
  std::unique_ptr<DeviceTrainModel> dev;
  if (on_device) {
    auto it = device_models().find(cfg.device);
    AM_CHECK(it != device_models().end(),
             "train.device {}: this automoe was built without the {} backend (nvcc was not found "
             "when it was configured); rebuild where CUDA is installed, or use train.device cpu",
             cfg.device, cfg.device);
    dev = it->second(mc, cfg, g);  // under mpirun: this rank's GPU and experts
  }
  Qwen3Moe model(mc, &g, !on_device);
  model.set_ep_balance(cfg.ep_balance);
  if (on_device) model.params().assign(size_t(model.layout().total), 0.f);
  if (cfg.model_builtin.empty()) {
    load_hf_weights(model, cfg.model_path);
  } else {
    Rng init_rng(cfg.seed);
    model.init_random(init_rng, cfg.init_std);
  }
  // ---- data
  SftStats data_stats;
  std::vector<Example> data = load_training_data(cfg, mc, &data_stats, lead);
  AM_CHECK(cfg.data_builtin.empty() || mc.vocab_size >= kAdditionVocab,
           "the built-in addition task needs a vocabulary of at least {} tokens", kAdditionVocab);
  int64_t pad_id = mc.pad_token_id >= 0 ? mc.pad_token_id : 0;
  DataOrder order;
  order.reset(cfg.seed, int64_t(data.size()));
  // ---- optimizer (ZeRO: the moments of this rank's shards only). On the CPU dist::Zero runs the
  // collectives; a device model shards itself (the same partition), the host only needs the
  // partition for the moment files.
  std::unique_ptr<dist::Zero> zero;
  std::unique_ptr<dist::ZeroPartition> zero_dev;
  if (cfg.zero > 0 && !on_device) zero = std::make_unique<dist::Zero>(int(cfg.zero), model.layout(), g);
  if (cfg.zero > 0 && on_device) zero_dev = std::make_unique<dist::ZeroPartition>(int(cfg.zero), model.layout(), g);
  const dist::ZeroPartition* part = zero ? &zero->partition() : zero_dev.get();
  AdamW opt;
  opt.cfg = cfg.adamw;
  if (!on_device) opt.init(zero ? zero->shard_numel() : int64_t(model.params().size()));  // the device keeps its own
  int64_t start = 0;
  double resumed_grad_norm = -1.0;
  const fs::path metrics_path = fs::path(cfg.output_dir) / "metrics.jsonl";
  if (cfg.resume) {
    std::string ck = latest_checkpoint(cfg.output_dir);
    if (ck.empty()) {
      if (lead)
        std::fprintf(stderr, "automoe: no checkpoint in %s/checkpoints; starting from step 0\n",
                   cfg.output_dir.c_str());
    } else {
      TrainState st = load_checkpoint(ck, model, opt, part);
      start = st.step;
      resumed_grad_norm = st.last_grad_norm;
      order.seek(st.data_epoch, st.data_cursor);
      if (lead) {
        truncate_metrics(metrics_path, start);
        std::printf("resumed from %s (step %lld)\n", ck.c_str(), (long long)start);
      }
    }
  } else if (lead) {
    std::ofstream(metrics_path, std::ios::trunc);
  }
  if (dev) dev->upload(model, start > 0 ? &opt : nullptr);  // weights (and resumed moments)
  if (dev && start > 0 && resumed_grad_norm >= 0) dev->set_last_grad_norm(float(resumed_grad_norm));
  // ZeRO-3: from here each rank's parameters are its shard; the model's arena is a workspace that
  // the model's block hooks gather into and poison (dist/zero3.h)
  std::unique_ptr<dist::Zero3> zero3;
  if (zero && zero->level() == 3) {
    zero3 = std::make_unique<dist::Zero3>(model, *zero);
    zero3->shard_params();
  }
  std::ofstream metrics;
  if (lead) metrics.open(metrics_path, std::ios::app);

  if (lead) {
    std::printf("model %s: %lld parameters (%lld layers, %lld experts, top-%lld) | data: %zu examples | "
                "%lld steps x %lld micro-batches x %lldx%lld tokens\n",
                cfg.model_builtin.empty() ? cfg.model_path.c_str() : cfg.model_builtin.c_str(),
                (long long)model.global_numel(), (long long)mc.num_hidden_layers,
                (long long)mc.num_experts, (long long)mc.num_experts_per_tok, data.size(),
                (long long)cfg.steps, (long long)cfg.grad_accum, (long long)cfg.micro_batch * world,
                (long long)cfg.seq_len);
    if (multi)
      std::printf("%d ranks: expert parallel %d (%lld of %lld experts per rank) x data parallel %d, "
                  "%lld rows per rank per micro-batch\n",
                  world, g.ep_size(), (long long)model.local_experts(), (long long)mc.num_experts,
                  g.dp_size(), (long long)cfg.micro_batch);
    if (part) {
      const int z = part->level();  // what each rank keeps only a shard of
      std::printf("ZeRO-%d: %s for %lld of %lld replicated parameters per rank%s%s\n", z,
                  z == 1 ? "AdamW moments" : z == 2 ? "AdamW moments and gradients" : "parameters, gradients and AdamW moments",
                  (long long)part->replicated_shard(), (long long)part->replicated_numel(),
                  g.dp_size() > 1 ? fmt::format(", {} of {} expert parameters", part->expert_shard(), part->expert_numel()).c_str() : "",
                  z == 2   ? "; gradients reduce-scattered after every micro-batch"
                  : z == 3 ? "; each layer's parameters gathered for its forward and its backward, its gradients "
                             "reduce-scattered after its backward"
                           : "");
    }
    std::fflush(stdout);
  }

  auto t_start = std::chrono::steady_clock::now();
  std::vector<PackedBatch> micro(cfg.grad_accum);
  for (int64_t step = start; step < cfg.steps; ++step) {
    auto t0 = std::chrono::steady_clock::now();
    int64_t labelled = 0;
    for (auto& mb : micro) {  // the global micro-batch, the same on every rank
      mb = pack_rows(data, order, cfg.micro_batch * world, cfg.seq_len, pad_id);
      labelled += shifted_labelled(mb);
    }
    StepMetrics m;
    m.step = step + 1;
    m.lr = cfg.schedule.at(step);
    if (dev) {
      dev->zero_grad();
      dev->begin_step(cfg.adamw, m.lr, cfg.max_grad_norm);
    } else {
      model.zero_grad();
    }
    for (size_t i = 0; i < micro.size(); ++i) {
      const PackedBatch& mb = micro[i];
      Batch b = multi ? rows_of(mb, rank * cfg.micro_batch, cfg.micro_batch)
                      : Batch{mb.B, mb.T, mb.ids, mb.labels, mb.pos, mb.doc};
      const float denom = float(std::max<int64_t>(labelled, 1)), aux_scale = 1.0f / float(cfg.grad_accum);
      LossParts lp;
      if (dev) {
        dev->set_last_micro_batch(i + 1 == micro.size());
        lp = dev->forward_backward(b, denom, aux_scale);
      } else {
        if (zero3) zero3->begin_micro_batch(i == 0);  // its reduces assign, then add
        lp = model.forward(b, denom, aux_scale);
        model.backward();
        // ZeRO-2: this micro-batch's gradients go to the shard now; the arena is scratch again
        if (zero && zero->level() == 2) zero->reduce_grads(model.grads(), i == 0);
      }
      m.ce += lp.ce;  // each is sum/labelled_total: they add up to the step's mean
      m.aux += lp.aux / float(cfg.grad_accum);
      m.loss += lp.loss;
      m.tokens += mb.B * mb.T;
    }
    if (dev) {
      m.grad_norm = dev->clip_and_step(cfg.adamw, m.lr, cfg.max_grad_norm);
    } else if (zero) {  // reduce-scatter, norm of the shards, AdamW on the shard, all-gather
      if (zero->level() == 1) zero->reduce_grads(model.grads(), true);
      m.grad_norm = zero->clip_grad_norm(cfg.max_grad_norm);
      if (!zero3) zero->load_param_shard(model.params());  // ZeRO-3: the shard is the truth
      opt.step(zero->param_shard(), zero->grad_shard(), m.lr);
      if (!zero3) zero->allgather_params(model.params());  // ZeRO-3: the next forward gathers per block
    } else {
      if (multi) {  // dense grads summed over the world, expert grads over their DP group
        dist::allreduce_grads(model.grads(), model.layout(), g);
        m.grad_norm = dist::clip_grad_norm_global(model.grads(), model.layout(), g, cfg.max_grad_norm);
      } else {
        m.grad_norm = clip_grad_norm(model.grads(), cfg.max_grad_norm);
      }
      opt.step(model.params(), model.grads(), m.lr);
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    m.tokens_per_s = double(m.tokens) / std::max(dt, 1e-9);
    m.peak_mem_bytes = dev ? dev->peak_mem_bytes() : peak_rss_bytes();
    g.world.allreduce_max(&m.peak_mem_bytes, 1);  // the largest rank
    AM_CHECK(std::isfinite(m.loss), "step {}: the loss is not finite ({}); lower train.lr or check the data", m.step, m.loss);

    nlohmann::json j = {{"step", m.step}, {"loss", m.loss}, {"ce_loss", m.ce}, {"lr", m.lr},
                        {"grad_norm", m.grad_norm}, {"tokens", m.tokens},
                        {"tokens_per_s", m.tokens_per_s}, {"peak_mem_bytes", m.peak_mem_bytes}};
    if (mc.output_router_logits) j["aux_loss"] = m.aux;
    j["epoch"] = order.epoch;
    if (data_stats.skipped) j["data_skipped"] = data_stats.skipped;
    if (lead) {
      metrics << j.dump() << "\n";
      metrics.flush();
    }
    if (lead && (m.step % cfg.log_every == 0 || m.step == cfg.steps || m.step == start + 1)) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      double eta = elapsed / double(m.step - start) * double(cfg.steps - m.step);
      std::printf("step %5lld/%lld | loss %.4f | lr %.2e | grad_norm %.3f | %.0f tok/s | ETA %s\n",
                  (long long)m.step, (long long)cfg.steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s,
                  hms(eta).c_str());
      std::fflush(stdout);
    }
    result.history.push_back(m);
    if (on_step) on_step(m);
    bool last = m.step == cfg.steps;
    if ((cfg.checkpoint_every > 0 && m.step % cfg.checkpoint_every == 0) || last) {
      TrainState st{m.step, order.epoch, order.cursor, double(m.grad_norm)};
      if (dev) dev->download(model, &opt);  // weights and moments into the host arenas
      if (zero3) zero3->gather_all();       // the model files hold the full parameters
      save_checkpoint(cfg.output_dir, st, model, opt, cfg.keep_checkpoints, part);
      if (zero3) zero3->release_all();
    }
  }
  if (zero3) {  // the run's result is the whole model: gathered into the arena, hooks removed
    zero3->gather_all();
    zero3.reset();
  }
  if (cfg.ep_balance && lead)
    std::printf("ep_balance: expert work moved between the ranks in %lld of %lld MoE layer "
                "forwards\n",
                (long long)model.ep_balance_moves(), (long long)model.ep_balance_forwards());
  // Several ranks: the replicas must have stayed identical (the host model holds the last
  // step's weights: the last step always saves a checkpoint).
  if (multi) {
    const uint64_t h = dist::check_replicas(model.params(), model.layout(), g);
    if (lead)
      std::printf("replicas identical on %d ranks: replicated parameters (hash %016llx), expert "
                  "shards over each data-parallel group\n",
                  world, (unsigned long long)h);
  }
  if (cfg.export_hf) {
    result.export_dir = (fs::path(cfg.output_dir) / "hf").string();
    if (dev) dev->download(model, nullptr);
    save_hf_model(model, result.export_dir, cfg.model_path);  // rank 0 writes, layer by layer
    g.world.barrier();
    if (lead) std::printf("exported a Hugging Face checkpoint to %s\n", result.export_dir.c_str());
    // Load the export back into a fresh model (each rank its own share): it must hold exactly
    // the trained weights.
    Qwen3Moe back(load_model_config(result.export_dir + "/config.json"), &g);
    load_hf_weights(back, result.export_dir);
    int64_t differ = back.params() != model.params();
    g.world.allreduce_sum(&differ, 1);
    AM_CHECK(differ == 0, "the exported checkpoint in {} does not load back to the trained weights", result.export_dir);
    if (lead)
      std::printf("loaded %s back: all %lld parameters identical\n", result.export_dir.c_str(), (long long)back.global_numel());
    if (lead && cfg.data_builtin == "addition") {
      // Greedy decoding runs on one process: under mpirun rank 0 loads the whole (tiny) export.
      std::unique_ptr<Qwen3Moe> solo;
      if (multi) {
        solo = std::make_unique<Qwen3Moe>(back.config());
        load_hf_weights(*solo, result.export_dir);
      }
      std::printf("held-out problems (answers are written least-significant digit first):\n");
      std::set<std::vector<int64_t>> seen;
      for (auto& ex : data) seen.insert(ex.ids);
      AdditionScore sc = addition_eval(multi ? *solo : back, 200, int(cfg.data_digits), cfg.seed + 7919, 6, seen);
      std::printf("held-out accuracy: %lld/%lld exact answers\n", (long long)sc.correct, (long long)sc.total);
    }
  }
  return result;
}

}  // namespace automoe
