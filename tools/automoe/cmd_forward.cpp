// tools/automoe/cmd_forward.cpp: `automoe forward`: one forward (and optionally backward) pass of
// an HF model on a batch file, writing logits, loss, aux loss and per-parameter gradients
// under their HF checkpoint names (ARCHITECTURE.md, "Contracts").
// Under `mpirun -np N ... --ep P` the batch rows are split over the N ranks (data parallel), the
// experts over P ranks; rank 0 gathers logits and gradients and writes the same OUT file.
#include "commands.h"
#include "core/check.h"
#include "dist/data_parallel.h"
#include "dist/process_group.h"
#include "io/safetensors.h"
#include "model/qwen3_moe.h"
#include "model/weights.h"
#ifdef AUTOMOE_HAVE_CUDA
#include "dist/gpu_rank.h"
#include "model/qwen3_moe_cuda.h"
#endif

namespace automoe::cli {

namespace {
std::vector<int64_t> read_ids(const SafetensorsFile& f, const std::string& name, const std::string& path,
                              Shape* shape) {
  AM_CHECK(f.has(name), "batch file '{}' has no '{}' tensor (expected int64 [B,T])", path, name);
  Tensor t = f.view(name);
  AM_CHECK(t.shape.size() == 2, "batch file '{}': '{}' must be 2-D [B,T], got {}", path, name, shape_str(t.shape));
  AM_CHECK(t.dtype == DType::I64 || t.dtype == DType::I32,
           "batch file '{}': '{}' must be int64 (or int32), got {}", path, name, dtype_name(t.dtype));
  std::vector<int64_t> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i)
    v[i] = t.dtype == DType::I64 ? t.data<int64_t>()[i] : t.data<int32_t>()[i];
  *shape = t.shape;
  return v;
}

// The contract's scalar outputs: "loss" [1] when the batch has labels, "aux_loss" [1] when the
// model computes the router's load-balancing loss.
void add_loss_tensors(std::vector<std::pair<std::string, Tensor>>& out, const LossParts& lp, bool has_labels) {
  if (has_labels) {
    Tensor loss = Tensor::empty(DType::F32, {1});
    loss.f32()[0] = lp.loss;
    out.emplace_back("loss", loss);
  }
  if (lp.has_aux) {
    Tensor aux = Tensor::empty(DType::F32, {1});
    aux.f32()[0] = lp.aux;
    out.emplace_back("aux_loss", aux);
  }
}
}  // namespace

void add_forward(CLI::App& app, Runners& runners) {
  auto* cmd = app.add_subcommand("forward", "Run one forward (and backward) pass; write logits, loss and gradients");
  struct Opts {
    std::string model, batch, out, device = "cpu", dtype = "fp32";
    bool grads = false;
    int ep = 1;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--model", o->model, "Hugging Face model directory")->required();
  cmd->add_option("--batch", o->batch, "safetensors with input_ids and labels (int64 [B,T])")->required();
  cmd->add_option("--out", o->out, "output safetensors")->required();
  cmd->add_flag("--grads", o->grads, "also write grad.<HF name> for every parameter");
  cmd->add_option("--device", o->device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", o->dtype, "fp32 | bf16")->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--ep", o->ep, "expert-parallel size under mpirun (experts split over this many ranks; "
                  "batch rows over all ranks)")->check(CLI::PositiveNumber);
  runners.push_back([cmd, o]() -> int {
    if (!cmd->parsed()) return -1;
#ifndef AUTOMOE_HAVE_CUDA
    AM_CHECK(o->device == "cpu",
             "--device cuda: this automoe was built without CUDA (nvcc was not found when it was "
             "configured); rebuild where CUDA is installed, or use --device cpu");
#endif
    AM_CHECK(o->device == "cuda" || o->dtype == "fp32",
             "--device cpu runs fp32; --dtype bf16 needs --device cuda");
    AM_CHECK(o->device == "cpu" || o->dtype == "bf16",
             "--device cuda computes in bf16; pass --dtype bf16");
    dist::Groups g = dist::make_groups(o->ep);
    const int world = g.world.size(), rank = g.world.rank();
    ModelConfig mc = load_model_config(o->model + "/config.json");
    SafetensorsFile in(o->batch);
    Batch b;
    Shape s_ids, s_lab;
    b.ids = read_ids(in, "input_ids", o->batch, &s_ids);
    b.B = s_ids[0];
    b.T = s_ids[1];
    bool has_labels = in.has("labels");
    if (has_labels) {
      b.labels = read_ids(in, "labels", o->batch, &s_lab);
      AM_CHECK(s_lab == s_ids, "batch file '{}': labels {} must have the shape of input_ids {}", o->batch,
               shape_str(s_lab), shape_str(s_ids));
    }
    AM_CHECK(!o->grads || has_labels, "--grads needs labels in the batch file '{}'", o->batch);
    if (world > 1) {  // this rank's rows
      AM_CHECK(b.B % world == 0, "batch file '{}' has {} rows, which cannot be split evenly over {} ranks; "
               "use a multiple of {} rows", o->batch, b.B, world, world);
      const int64_t rows = b.B / world, a = rank * rows * b.T, e = (rank + 1) * rows * b.T;
      b.ids = std::vector<int64_t>(b.ids.begin() + a, b.ids.begin() + e);
      if (has_labels) b.labels = std::vector<int64_t>(b.labels.begin() + a, b.labels.begin() + e);
      b.B = rows;
    }
#ifdef AUTOMOE_HAVE_CUDA
    if (o->device == "cuda" && world > 1) {  // a GPU per rank (or shared), bf16, EP over --ep
      const dist::GpuPlacement pl =
          dist::place_on_gpu(g.world, dist::detect_launch(), "automoe forward");
      dist::GpuComms comms(g, pl, dist::choose_ep_transport("", pl));
      Qwen3Moe host(mc, &g, false);  // this rank's experts
      host.params().assign(size_t(host.layout().total), 0.f);
      load_hf_weights(host, o->model);
      Qwen3MoeCuda gpu(mc, Precision::BF16, pl.device, false,
                       CudaDist{&g, comms.ep_transport(), comms.nccl_world(), comms.nccl_dp()});
      gpu.upload_params(host.params());
      gpu.zero_grad();
      std::vector<float> logits_v, grads_v;
      gpu.forward(b, 0.f, 1.f, o->grads, &logits_v);  // loss and aux over the whole batch
      LossParts lp = gpu.loss();
      std::vector<std::pair<std::string, Tensor>> out;
      Tensor logits =
          Tensor::empty(DType::F32, rank == 0 ? Shape{b.B * world, b.T, mc.vocab_size} : Shape{0});
      g.world.gather(logits.f32(), logits_v.data(), int64_t(logits_v.size() * sizeof(float)), 0);
      out.emplace_back("logits", logits);
      add_loss_tensors(out, lp, has_labels);
      if (o->grads) {
        gpu.backward();
        gpu.allreduce_grads();
        gpu.download_grads(grads_v);
        for_each_hf_tensor(host, grads_v, [&](const std::string& name, const Tensor& t) {
          out.emplace_back("grad." + name, t);  // rank 0: experts gathered layer by layer
        });
      }
      if (rank == 0) save_safetensors(o->out, out, {});
      return 0;
    }
    if (o->device == "cuda") {  // one GPU, bf16; the logits come back chunk by chunk
      cuda::require_device("forward --device cuda");
      Qwen3Moe host(mc, nullptr, false);
      host.params().assign(size_t(host.layout().total), 0.f);
      load_hf_weights(host, o->model);
      Qwen3MoeCuda gpu(mc, Precision::BF16);
      gpu.upload_params(host.params());
      gpu.zero_grad();
      std::vector<float> logits_v, grads_v;
      gpu.forward(b, 0.f, 1.f, o->grads, &logits_v);
      LossParts lp = gpu.loss();
      std::vector<std::pair<std::string, Tensor>> out;
      out.emplace_back("logits", Tensor::borrow(DType::F32, {b.B, b.T, mc.vocab_size}, logits_v.data()));
      add_loss_tensors(out, lp, has_labels);
      if (o->grads) {
        gpu.backward();
        gpu.download_grads(grads_v);
        for (auto& [name, t] : hf_tensors(host, grads_v)) out.emplace_back("grad." + name, t);
      }
      save_safetensors(o->out, out, {});
      return 0;
    }
#endif
    Qwen3Moe model(mc, &g);
    load_hf_weights(model, o->model);
    LossParts lp = model.forward(b);  // loss and aux over the whole batch (all ranks)
    std::vector<std::pair<std::string, Tensor>> out;
    Tensor logits = Tensor::empty(DType::F32, rank == 0 ? Shape{b.B * world, b.T, mc.vocab_size} : Shape{0});
    g.world.gather(logits.f32(), model.logits().data(), int64_t(model.logits().size() * sizeof(float)), 0);
    out.emplace_back("logits", logits);
    add_loss_tensors(out, lp, has_labels);
    if (o->grads) {
      model.zero_grad();
      model.backward();
      dist::allreduce_grads(model.grads(), model.layout(), g);
      for_each_hf_tensor(model, model.grads(), [&](const std::string& name, const Tensor& t) {
        out.emplace_back("grad." + name, t);  // rank 0: experts gathered layer by layer
      });
    }
    if (rank == 0) save_safetensors(o->out, out, {});
    return 0;
  });
}

}  // namespace automoe::cli
