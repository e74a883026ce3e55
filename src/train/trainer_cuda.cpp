// train/trainer_cuda.cpp: the trainer's DeviceTrainModel on a GPU: Qwen3MoeCuda in the
// recipe's train.precision. Checkpoints and exports go through the host model's fp32 arena
// (bf16 values convert exactly), so they are the CPU run's formats.
// Under mpirun (world > 1) each rank takes the GPU of its local_rank (round-robin when there are
// fewer GPUs than ranks per node) and, with train.ep > 1, an EP transport (dist/gpu_rank.h:
// AUTOMOE_EP_TRANSPORT, NCCL when every rank has its own GPU, else MPI staging). train.zero 1
// shards the AdamW moments (the model's ZeRO-1, dist/zero_cuda.h), train.zero 3 the parameters
// and gradients too (dist/zero3_cuda.h): the moments it uploads and downloads are this rank's
// shard, as the CPU's ZeRO checkpoints store them; the weights go up and down whole (ZeRO-3:
// kept as shards, gathered block by block on the way down: every rank downloads).
#include "train/trainer_cuda.h"

#include <algorithm>
#include <cstdio>

#include "dist/gpu_rank.h"
#include "dist/process_group.h"
#include "model/qwen3_moe_cuda.h"
#include "train/trainer.h"

namespace automoe {

namespace {

class CudaTrainModel final : public DeviceTrainModel {
 public:
  CudaTrainModel(const ModelConfig& mc, const TrainConfig& cfg, const dist::Groups& g)
      : device_(pick_device(g)),
        free0_(free_bytes()),
        comms_(make_comms(g, device_)),
        model_(mc, parse_precision(cfg.precision), device_.device, cfg.memory_saving,
               cuda_dist(g, comms_.get(), cfg)) {}

  void upload(const Qwen3Moe& host, const AdamW* opt) override {
    model_.upload_params(host.params());
    if (opt) model_.upload_moments(opt->m, opt->v, opt->t);
  }
  void download(Qwen3Moe& host, AdamW* opt) override {
    model_.download_params(host.params());
    if (opt) {
      model_.download_moments(opt->m, opt->v);
      opt->t = model_.adam_steps();
    }
  }
  void zero_grad() override { model_.zero_grad(); }
  void begin_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    model_.begin_step(c, lr, max_grad_norm);
  }
  void set_last_grad_norm(float norm) override { model_.set_previous_grad_norm(norm); }
  // the last micro-batch's backward sums the gradients as it goes (Qwen3MoeCuda::
  // set_reduce_in_backward; AUTOMOE_GRAD_OVERLAP=0 keeps the sum in clip_and_step)
  void set_last_micro_batch(bool last) override { model_.set_reduce_in_backward(last); }
  LossParts forward_backward(const Batch& b, float ce_denominator, float aux_scale) override {
    model_.forward(b, ce_denominator, aux_scale, true);
    model_.backward();           // enqueued before the loss is read: the GPU stays busy
    LossParts lp = model_.loss();
    track_memory();
    return lp;
  }
  float clip_and_step(const AdamWConfig& c, float lr, float max_grad_norm) override {
    model_.optimizer_step(c, lr, max_grad_norm);
    return model_.grad_norm();
  }
  int64_t peak_mem_bytes() override { return int64_t(peak_); }

 private:
  // One process: GPU 0, as always. Several: local_rank's GPU (collective over the world).
  static dist::GpuPlacement pick_device(const dist::Groups& g) {
    if (g.world.size() == 1) {
      cuda::require_device("train.device cuda");
      return dist::GpuPlacement{};
    }
    return dist::place_on_gpu(g.world, dist::detect_launch(), "automoe");
  }
  // The model's ranks and EP options (comms: null in one process).
  static CudaDist cuda_dist(const dist::Groups& g, dist::GpuComms* comms, const TrainConfig& cfg) {
    CudaDist d;
    d.groups = &g;
    if (comms) {
      d.ep_transport = comms->ep_transport();
      d.nccl_world = comms->nccl_world();
      d.nccl_dp = comms->nccl_dp();
    }
    d.ep_capacity = cfg.ep_capacity;
    d.ep_recompute = dist::parse_ep_recompute(cfg.ep_recompute);
    d.zero = int(cfg.zero);
    d.ep_dispatch = dist::parse_ep_dispatch(cfg.ep_dispatch);
    d.ep_chunks = int(cfg.ep_chunks);
    d.ep_halves = cfg.ep_halves;
    // half B's transport (collective: every rank gets here in the same order); null unless IPC,
    // which the model then names in its error
    if (comms && cfg.ep_halves) d.ep_transport_b = comms->second_ep_transport();
    return d;
  }
  // Several ranks: the EP transport and, over NCCL, the gradient communicators (collective).
  static std::unique_ptr<dist::GpuComms> make_comms(const dist::Groups& g,
                                                    const dist::GpuPlacement& pl) {
    if (g.world.size() == 1) return nullptr;
    auto comms = std::make_unique<dist::GpuComms>(g, pl, dist::choose_ep_transport("", pl));
    if (g.world.rank() == 0) {
      std::printf("%d GPU ranks: expert parallel %d x data parallel %d; %s\n", g.world.size(),
                  g.ep.size(), g.dp.size(), comms->describe(g).c_str());
      std::fflush(stdout);
    }
    return comms;
  }
  static size_t free_bytes() {
    size_t fr = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&fr, &total));  // creates the context first
    return fr;
  }
  // Everything is allocated up front, so the memory in use after a step is the peak (with what
  // cuBLASLt keeps): the drop of free device memory since before the model existed.
  void track_memory() {
    const size_t fr = free_bytes();
    if (free0_ > fr) peak_ = std::max(peak_, free0_ - fr);
  }

  dist::GpuPlacement device_;   // before free0_: the GPU is chosen first
  size_t free0_ = 0, peak_ = 0;  // before model_: measured before it allocates (on a shared GPU
                                 // the drop includes the other ranks' memory)
  std::unique_ptr<dist::GpuComms> comms_;  // before model_, which uses them
  Qwen3MoeCuda model_;
};

}  // namespace

void register_cuda_trainer() {
  register_device_model("cuda", [](const ModelConfig& mc, const TrainConfig& cfg,
                                   const dist::Groups& g) {
    return std::unique_ptr<DeviceTrainModel>(new CudaTrainModel(mc, cfg, g));
  });
}

}  // namespace automoe
