// bench/cuda_bench.cpp: the W1 throughput benchmark (ARCHITECTURE.md, "Benchmark workloads") for
// the single-GPU CUDA model, and under mpirun W2/W4/W3 (one rank per GPU, experts split over
// --ep ranks), measured as ../shared/bench/hf_moe_baseline.py and hf_moe_fsdp.py measure native
// Transformers, so the numbers compare directly:
//   - the same model (Qwen3-30B-A3B layer shapes, random init, output_router_logits with
//     router_aux_loss_coef 0.001, untied lm_head), random input ids, labels = input ids;
//   - a step = forward + backward (timed alone as "fwd_bwd") + clip + AdamW; host wall-clock
//     with a device sync around each step, WARM untimed steps, the median of STEPS timed ones;
//   - TFLOP/s by the same formula (hf_moe_baseline.py flops_per_token: 6 x (attention
//     projections + active experts + router per layer, + lm_head) + 3 x causal attention core).
// Prints one JSON line (rank 0). Usage:
//   cuda_bench [--layers 12] [--seq 4096] [--mbs 2] [--warmup 3] [--steps 8]
//              [--precision bf16|fp32_master] [--max-grad-norm 1.0] [--memory-saving]
//              [--ep E] [--ep-capacity 2] [--ep-recompute none|outputs|experts]
//              [--ep-dispatch counts|padded] [--ep-chunks 1..8] [--ep-halves] [--zero 0|1|3]
// --ep-halves: train.ep_halves (the two-half overlap; model/qwen3_moe_cuda.h); needs IPC.
// --ep-chunks C: train.ep_chunks (each EP block pipelines its tokens in C chunks; the phases
// fwd_ep_dispatch .. bwd_ep_combine are then the transport calls alone, beside the GEMMs).
// --memory-saving: AdamW inside the backward (there fwd_bwd includes the optimizer and the
// step's separate optimizer phase only sums the norm), activations recomputed.
// Under mpirun (a GPU per rank; more ranks than GPUs share them, which checks but does not
// measure): every rank runs --mbs rows of its own random tokens; --ep (default: the world size)
// splits the experts, the rest is data parallel; the transport is AUTOMOE_EP_TRANSPORT (auto:
// CUDA IPC within a node). Figures are per GPU: tokens of one rank over the slowest rank's
// median step, peak memory of the rank that used most. The replicated weights start from the
// same seed on every rank (their values do not change the speed).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/cuda/trace.h"
#include "core/rng.h"
#include "dist/ep_arena.h"
#include "dist/gpu_rank.h"
#include "dist/process_group.h"
#include "model/config.h"
#include "model/qwen3_moe_cuda.h"

using namespace automoe;

namespace {

double flops_per_token(const ModelConfig& c, int64_t seq) {
  const double h = double(c.hidden_size), L = double(c.num_hidden_layers);
  const double attn_proj = h * double(c.num_attention_heads * c.head_dim) * 2 +
                           h * double(c.num_key_value_heads * c.head_dim) * 2;
  double layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const double mlp = c.is_moe_layer(l)
                           ? 3 * h * double(c.moe_intermediate_size * c.num_experts_per_tok) +
                                 h * double(c.num_experts)
                           : 3 * h * double(c.intermediate_size);
    layers += attn_proj + mlp;
  }
  const double dense = layers + h * double(c.vocab_size);
  const double attn_fwd = L * 2 * double(seq) * double(c.num_attention_heads * c.head_dim);
  return 6 * dense + 3 * attn_fwd;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t layers = 12, seq = 4096, mbs = 2, warm = 3, steps = 8;
  std::string precision = "bf16";
  float max_norm = 1.0f;
  bool memsave = false;
  int ep = 0;  // 0: the world size
  double ep_capacity = 2.0;
  std::string ep_recompute = "none", ep_dispatch = "counts";
  int zero = 0;
  int ep_chunks = 1;
  bool ep_halves = false;
  for (int i = 1; i < argc; ++i) {
    auto need = [&](const char* f) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "cuda_bench: %s needs a value\n", f);
        std::exit(2);
      }
      return argv[++i];
    };
    if (!std::strcmp(argv[i], "--layers")) layers = std::atoll(need("--layers"));
    else if (!std::strcmp(argv[i], "--seq")) seq = std::atoll(need("--seq"));
    else if (!std::strcmp(argv[i], "--mbs")) mbs = std::atoll(need("--mbs"));
    else if (!std::strcmp(argv[i], "--warmup")) warm = std::atoll(need("--warmup"));
    else if (!std::strcmp(argv[i], "--steps")) steps = std::atoll(need("--steps"));
    else if (!std::strcmp(argv[i], "--precision")) precision = need("--precision");
    else if (!std::strcmp(argv[i], "--max-grad-norm")) max_norm = float(std::atof(need("--max-grad-norm")));
    else if (!std::strcmp(argv[i], "--memory-saving")) memsave = true;
    else if (!std::strcmp(argv[i], "--ep")) ep = std::atoi(need("--ep"));
    else if (!std::strcmp(argv[i], "--ep-capacity")) ep_capacity = std::atof(need("--ep-capacity"));
    else if (!std::strcmp(argv[i], "--ep-recompute")) ep_recompute = need("--ep-recompute");
    else if (!std::strcmp(argv[i], "--ep-dispatch")) ep_dispatch = need("--ep-dispatch");
    else if (!std::strcmp(argv[i], "--zero")) zero = std::atoi(need("--zero"));
    else if (!std::strcmp(argv[i], "--ep-chunks")) ep_chunks = std::atoi(need("--ep-chunks"));
    else if (!std::strcmp(argv[i], "--ep-halves")) ep_halves = true;
    else {
      std::fprintf(stderr,
                   "usage: cuda_bench [--layers 12] [--seq 4096] [--mbs 2] [--warmup 3] [--steps 8] "
                   "[--precision bf16|fp32_master] [--max-grad-norm 1.0] [--memory-saving] "
                   "[--ep E] [--ep-capacity 2] [--ep-recompute none|outputs|experts] "
                   "[--ep-dispatch counts|padded] [--ep-chunks 1..8] [--ep-halves] [--zero 0|1|3]\n");
      return 2;
    }
  }
  const dist::LaunchInfo li = dist::detect_launch();
  const bool multi = li.launcher != "none" && li.world_size > 1;
  try {
    nlohmann::json j = {{"architectures", {"Qwen3MoeForCausalLM"}},
                        {"model_type", "qwen3_moe"},
                        {"vocab_size", 151936},
                        {"hidden_size", 2048},
                        {"intermediate_size", 6144},
                        {"num_hidden_layers", layers},
                        {"num_attention_heads", 32},
                        {"num_key_value_heads", 4},
                        {"head_dim", 128},
                        {"hidden_act", "silu"},
                        {"rms_norm_eps", 1e-6},
                        {"max_position_embeddings", 40960},
                        {"rope_theta", 1000000.0},
                        {"attention_bias", false},
                        {"decoder_sparse_step", 1},
                        {"mlp_only_layers", nlohmann::json::array()},
                        {"moe_intermediate_size", 768},
                        {"num_experts", 128},
                        {"num_experts_per_tok", 8},
                        {"norm_topk_prob", true},
                        {"output_router_logits", true},
                        {"router_aux_loss_coef", 0.001},
                        {"tie_word_embeddings", false}};
    ModelConfig mc = parse_model_config(j.dump(), "cuda_bench W1 config");
    // One GPU, or this rank's GPU and groups (collective over the world).
    dist::Groups groups = multi ? dist::make_groups(ep > 0 ? ep : li.world_size)
                                : dist::single_process_groups();
    const int world = groups.world.size(), rank = groups.world.rank();
    dist::GpuPlacement pl;
    if (multi) pl = dist::place_on_gpu(groups.world, li, "cuda_bench");
    size_t free0 = 0, total = 0;
    CUDA_CHECK(cudaSetDevice(pl.device));
    CUDA_CHECK(cudaFree(nullptr));  // the context exists before the baseline reading
    CUDA_CHECK(cudaMemGetInfo(&free0, &total));
    std::unique_ptr<dist::GpuComms> comms;
    CudaDist cd;
    if (multi) {
      comms = std::make_unique<dist::GpuComms>(groups, pl, dist::choose_ep_transport("", pl));
      cd = CudaDist{&groups, comms->ep_transport(), comms->nccl_world(), comms->nccl_dp(),
                    ep_capacity, dist::parse_ep_recompute(ep_recompute), zero,
                    dist::parse_ep_dispatch(ep_dispatch), ep_chunks, ep_halves};
      if (ep_halves) cd.ep_transport_b = comms->second_ep_transport();
      if (rank == 0) {
        std::printf("cuda_bench: %d ranks, expert parallel %d x data parallel %d; %s\n", world,
                    groups.ep.size(), groups.dp.size(), comms->describe(groups).c_str());
        std::fflush(stdout);
      }
    }

    Qwen3MoeCuda model(mc, parse_precision(precision), pl.device, memsave, cd);
    model.init_random(1234, 0.02f);
    model.plan(mbs, seq);
    model.enable_phase_timing(true);
    Batch b;
    b.B = mbs;
    b.T = seq;
    Rng rng{uint64_t(rank)};  // rank 0's tokens are the single-GPU run's
    b.ids.resize(size_t(mbs * seq));
    for (auto& id : b.ids) id = int64_t(rng.next() % uint64_t(mc.vocab_size));
    b.labels = b.ids;
    AdamWConfig ac{1e-5f, 0.9f, 0.999f, 1e-8f, 0.01f};

    std::vector<double> t_step, t_fb;
    std::map<std::string, double> phase_sum;
    size_t min_free = free0;
    float loss = 0, gnorm = 0;
    for (int64_t i = 0; i < warm + steps; ++i) {
      model.synchronize();
      if (i + 1 == warm + steps) cuda::trace_reset();  // AUTOMOE_TRACE: the last step's timeline
      auto t0 = std::chrono::steady_clock::now();
      model.zero_grad();
      model.begin_step(ac, 1e-5f, max_norm);
      // several ranks: the CE mean over the global batch's labelled tokens (as the trainer)
      model.forward(b, multi ? float(world * mbs * (seq - 1)) : 0.f);
      model.backward();
      model.synchronize();
      auto tm = std::chrono::steady_clock::now();
      if (i + 1 == warm + steps && cuda::trace_on())
        std::printf("cuda_bench: rank %d's last forward and backward traced in %s\n", rank,
                    cuda::trace_dump(".rank" + std::to_string(rank)).c_str());
      model.optimizer_step(ac, 1e-5f, max_norm);
      model.synchronize();
      auto t1 = std::chrono::steady_clock::now();
      loss = model.loss().loss;
      gnorm = model.grad_norm();
      size_t fr = 0, tt = 0;
      CUDA_CHECK(cudaMemGetInfo(&fr, &tt));
      min_free = std::min(min_free, fr);
      if (i < warm) continue;
      t_step.push_back(std::chrono::duration<double>(t1 - t0).count());
      t_fb.push_back(std::chrono::duration<double>(tm - t0).count());
      for (auto& [n, ms] : model.phase_ms()) phase_sum[n] += ms;
    }
    const double toks = double(mbs * seq), fpt = flops_per_token(mc, seq);
    // per GPU: the slowest rank's medians, the largest rank's peak
    double worst[3] = {median(t_step), median(t_fb), double(free0 - min_free)};
    groups.world.allreduce_max(worst, 3);
    const double step_s = worst[0], fb_s = worst[1], peak = worst[2];
    // EP load balance of the last forward: per MoE layer the most expert rows any rank ran over
    // their mean (every rank waits for the slowest one at the combine)
    std::vector<int64_t> picks = model.ep_picks_received(), most = picks;
    double balance[2] = {0, 0};  // mean over layers of max/mean, the worst layer's
    if (multi && !picks.empty()) {
      groups.ep.allreduce_sum(picks.data(), int64_t(picks.size()));
      groups.ep.allreduce_max(most.data(), int64_t(most.size()));
      for (size_t l = 0; l < picks.size(); ++l) {
        const double r = picks[l] > 0 ? double(most[l]) * groups.ep.size() / double(picks[l]) : 1.0;
        balance[0] += r / double(picks.size());
        balance[1] = std::max(balance[1], r);
      }
    }
    CudaMemory mem = model.memory();
    const double GiB = double(1 << 30);
    nlohmann::json phases = nlohmann::json::object();
    for (auto& [n, ms] : phase_sum) phases[n] = std::round(ms / double(std::max<int64_t>(steps, 1)) * 100) / 100;
    nlohmann::json out = {
        {"bench", multi ? "ep_cuda" : "w1_cuda"},
        {"world", world},
        {"ep", groups.ep.size()},
        {"ep_rows_max_over_mean", std::round(balance[0] * 1000) / 1000},
        {"ep_rows_max_over_mean_worst_layer", std::round(balance[1] * 1000) / 1000},
        {"transport", multi ? dist::ep_transport_kind_name(comms->kind()) : "none"},
        {"ep_recompute", ep_recompute},
        {"ep_dispatch", ep_dispatch},
        {"ep_chunks", ep_chunks},
        {"ep_halves", ep_halves},
        {"zero", zero},
        {"layers", layers},
        {"seq", seq},
        {"mbs", mbs},
        {"precision", precision},
        {"memory_saving", memsave},
        {"params_B", std::round(double(model.numel()) / 1e7) / 100},
        {"step_s", step_s},
        {"tok_per_s", std::round(toks / step_s)},
        {"model_tflops", std::round(fpt * toks / step_s / 1e11) / 10},
        {"fwd_bwd_s", fb_s},
        {"fwd_bwd_tok_per_s", std::round(toks / fb_s)},
        {"fwd_bwd_tflops", std::round(fpt * toks / fb_s / 1e11) / 10},
        {"flops_per_token", fpt},
        {"peak_used_GiB", std::round(peak / GiB * 100) / 100},
        {"arenas_GiB",
         {{"params", mem.params / GiB},
          {"master", mem.master / GiB},
          {"grads", mem.grads / GiB},
          {"moments", mem.moments / GiB},
          {"activations", mem.activations / GiB},
          {"workspace", mem.workspace / GiB},
          {"total", mem.total() / GiB}}},
        {"phases_ms", phases},
        {"loss", loss},
        {"grad_norm", gnorm},
        {"warmup", warm},
        {"steps", steps}};
    if (rank == 0) std::printf("RESULT %s\n", out.dump().c_str());
  } catch (const std::exception& e) {
    if (dist::backend_active()) dist::abort_all(std::string("cuda_bench: ") + e.what());
    std::fprintf(stderr, "cuda_bench: %s\n", e.what());
    return 1;
  }
  dist::finalize();
  return 0;
}
