// model/qwen3_moe_cuda.h: the Qwen3-MoE model on one GPU (CUDA backend, bf16 compute): the CPU
// model's forward and hand-written backward (model/qwen3_moe.cpp) on the CUDA ops, one stream,
// no host synchronisation inside forward/backward, every buffer allocated once.
// Only in builds with CUDA (the automoe_cuda_model target; AUTOMOE_HAVE_CUDA).
//
// Memory (all allocated up front, nothing on the hot path):
//   parameters  bf16 compute copy [P] (+ fp32 master [P] with Precision::FP32Master)
//   gradients   bf16 [P] (fp32 with FP32Master), same layout as the parameters; in the
//               memory-saving mode (below) only a scratch of the largest tensor's size (+ one
//               layer's expert down gradient under expert parallelism)
//   AdamW m, v  bf16 [P] each (fp32 with FP32Master); with ZeRO-1 or ZeRO-3 (CudaDist::zero)
//               bf16 [this rank's shard] each, flat in the partition's order
//   ZeRO-3      no parameter or gradient arena: bf16 parameter and gradient shards [shard],
//               two parameter windows and two gradient windows (one without the prefetch,
//               AUTOMOE_ZERO3_PREFETCH=0) of the largest block's device range
//               (dist/zero3_cuda.h), gathered and reduced block by block
//   activations one arena planned for (B, T) by plan(): saved per-layer tensors, the
//               residual stream, then one region shared by the forward's and the backward's
//               temporaries (their union), the lm_head+CE chunk buffers among them
//   workspace   one buffer, the largest *_workspace_bytes() of the ops at this (B, T)
// The layout (offsets, HF names) is the CPU model's, so the host fp32 arena of a Qwen3Moe loads,
// checkpoints and exports through model/weights.h and train/checkpoint.h unchanged.
//
// Several GPU ranks (CudaDist below; docs/DISTRIBUTED.md): each rank runs its own micro-batch;
// with an expert-parallel group of P > 1 ranks it holds only its E/P experts of every MoE layer
// (the host layout of a Qwen3Moe built with the same dist::Groups, so loading, checkpoints and
// exports go through the CPU code unchanged) and each MoE layer's expert block runs through a
// dist::EpMoeCuda (counts mode) over the given transport. The loss and aux loss are those of the
// global batch; optimizer_step() all-reduces the gradients (replicated tensors over the world,
// expert shards over their DP group; or the last micro-batch's backward did, layer by layer on a
// second stream: set_reduce_in_backward), clips by the global norm (each expert counted once)
// and runs AdamW on this rank (the memory-saving mode does the same per tensor inside the
// backward; below). With world size 1 nothing of this runs: the single-GPU code path and its numerics are
// unchanged (bit-identical).
//
// The lm_head and the cross-entropy run in chunks of rows: per chunk, logits [rows, V] (bf16),
// the loss, dlogits in place, and lm_head's backward into d(ln_f out) and dW_lm_head, all in
// forward() (which knows the loss scale). Full [N, V] logits never exist on the device; forward()
// can copy each chunk's logits to the host for `automoe forward` (small models).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend/cuda/common.cuh"
#include "dist/ep_arena.h"
#include "model/qwen3_moe.h"
#include "train/adamw.h"

namespace automoe {

namespace dist {
class EpTransport;
class NcclGroup;
}

// The ranks a Qwen3MoeCuda belongs to. Default: one GPU.
struct CudaDist {
  const dist::Groups* groups = nullptr;       // world, ep, dp; null or world size 1: one GPU
  dist::EpTransport* ep_transport = nullptr;  // needed when groups->ep has P > 1 ranks: moves
                                              // the MoE rows (one rank per process)
  // Optional NCCL communicators of the world and the DP group: the gradient all-reduce runs on
  // them (null: MPI staging through host memory; dist/data_parallel_cuda.h).
  dist::NcclGroup* nccl_world = nullptr;
  dist::NcclGroup* nccl_dp = nullptr;
  // train.ep_capacity: the EP arena (every MoE layer's saved expert state of one step, carved by
  // the received counts) holds this many times the balanced load; a step whose routing needs
  // more stops with an error on every rank (dist/expert_parallel_cuda.h).
  double ep_capacity = 2.0;
  // train.ep_recompute: what the EP backward recomputes instead of keeping in that arena (the
  // expert outputs, or gate|up and the outputs); the gradients are the same bits either way.
  dist::EpRecompute ep_recompute = dist::EpRecompute::kNone;
  // train.zero: 0, or 1 (ZeRO-1, dist/zero_cuda.h): AdamW moments for this rank's shard only
  // (the partition of dist/zero_partition.h), gradients reduce-scattered, the updated parameter
  // shards all-gathered; or 3 (ZeRO-3, dist/zero3_cuda.h): parameters, gradients and moments
  // as this rank's shards, each block gathered before its forward and backward into a window,
  // its gradients reduced after its backward (untied embeddings only). bf16 precision, default
  // mode; needs `groups` (world size 1 is fine).
  int zero = 0;
  // train.ep_dispatch: counts (one device-to-host sync per MoE layer forward, the arena sized
  // by ep_capacity) or padded (no host sync: every peer's region of N rows; the arena holds
  // every layer's worst case, ep_capacity unused; the trainer requires ep_recompute experts,
  // without which that worst case keeps gate|up and the outputs of P*N*min(K, E/P) rows).
  dist::EpMode ep_dispatch = dist::EpMode::kCounts;
  // train.ep_chunks: each MoE layer's EP block pipelines its tokens in this many chunks (1..8),
  // the all-to-alls on a comm stream beside the expert GEMMs (dist/expert_parallel_cuda.h);
  // 1 runs the unchunked block.
  int ep_chunks = 1;
  // train.ep_halves: each micro-batch runs as two halves of its sequences (B even), or with
  // one sequence (B == 1, T even) as its first and second half (the second half's attention
  // over both halves' keys: attention_tail), whose MoE all-to-alls overlap the other half's
  // compute (the two-half overlap, docs/DISTRIBUTED.md): per layer attention A, dispatch A,
  // attention B, dispatch B, experts A, combine A beside experts B, and the next layer's
  // attention A beside combine B; the backward likewise. Needs the direct dispatch (counts
  // mode, one chunk, the IPC transport) and the default mode (no memory-saving, no ZeRO-3);
  // the sequence split takes no document ids. `ep_transport_b`, a second transport of the same
  // EP group, carries half B's rows. The halves' results equal the whole batch's within bf16
  // rounding (the weight gradients add two halves).
  bool ep_halves = false;
  dist::EpTransport* ep_transport_b = nullptr;
};

// train.precision: "bf16" (default: bf16 weights, gradients and AdamW moments, what a
// Transformers user with a bf16 model gets) or "fp32_master" (fp32 master weights, gradients
// and moments; a bf16 copy of the weights for compute).
enum class Precision { BF16, FP32Master };
Precision parse_precision(const std::string& name);  // throws naming the accepted values
const char* precision_name(Precision p);

struct CudaMemory {  // bytes
  size_t params = 0, master = 0, grads = 0, moments = 0, activations = 0, workspace = 0;
  size_t total() const { return params + master + grads + moments + activations + workspace; }
};

// The memory-saving mode (train.memory_saving; bf16 precision only) removes the gradient arena
// and most saved activations:
//   - AdamW runs inside the backward, one tensor at a time, as soon as its gradient is complete
//     (lm_head and ln_f at the end of forward(), a layer's tensors during its backward, the
//     embedding last); each gradient lives in one scratch the size of the largest tensor.
//     So there is no gradient accumulation over micro-batches, and begin_step() must give the
//     step's lr and AdamW settings BEFORE forward().
//   - Global-norm clipping cannot wait for the whole gradient: the clip coefficient of step t
//     comes from step t-1's norm (no clipping on the first step; after a resume, from the norm
//     the checkpoint recorded: set_previous_grad_norm). grad_norm() still reports
//     this step's true norm. With max_grad_norm 0 the mode's update is the default mode's.
//   - Per layer only the residual input, q/k before their norms and v, the attention output
//     (+ its log-sum-exp), the post-attention residual and the routing (top-k, weights, expert
//     offsets) are kept; the backward recomputes ln1, the q/k norms and RoPE, ln2 and the
//     experts' gate_up and down outputs from them, before that layer's weights are updated
//     (under expert parallelism the EP block keeps its expert state in its arena, as in the
//     default mode; only ln2 is recomputed for the router).
//   - Several ranks: each tensor's gradient is summed over its group just before its AdamW
//     (replicated over the world, expert shards over their DP group: DeviceGradReducer::
//     allreduce_tensor, the default mode's sum and bf16 rounding; over NCCL enqueued on the
//     stream, over MPI staging one host sync per tensor), so with max_grad_norm 0 the mode
//     trains exactly as the default mode under the same ranks. The norm that clips the next step
//     is the global one (replicated tensors once, expert shards summed over the EP group, in
//     optimizer_step(): one host sync), the same on every rank.
class Qwen3MoeCuda {
 public:
  // Several ranks (`dist.groups` with world size > 1): bf16 precision under expert parallelism
  // (the EP block's expert gradients are bf16); the groups and the transport must outlive the
  // model.
  explicit Qwen3MoeCuda(const ModelConfig& cfg, Precision precision = Precision::BF16,
                        int device = 0, bool memory_saving = false, const CudaDist& dist = {});
  ~Qwen3MoeCuda();
  Qwen3MoeCuda(const Qwen3MoeCuda&) = delete;
  Qwen3MoeCuda& operator=(const Qwen3MoeCuda&) = delete;

  const ModelConfig& config() const;
  const Qwen3Moe& host_layout() const;  // layout and HF names (a Qwen3Moe without host arenas)
  int64_t numel() const;
  Precision precision() const;
  const cuda::Ctx& ctx() const;

  // Parameters, gradients and moments as fp32 host arenas of the layout (synchronous).
  // download_grads throws in the memory-saving mode (there is no gradient arena). With ZeRO the
  // moments are this rank's shard, flat: [replicated shard | expert shard] (the CPU's ZeRO
  // optimizer arena, dist/zero_partition.h).
  void upload_params(const std::vector<float>& params);
  void download_params(std::vector<float>& params) const;
  void download_grads(std::vector<float>& grads) const;
  void upload_moments(const std::vector<float>& m, const std::vector<float>& v, int64_t t);
  void download_moments(std::vector<float>& m, std::vector<float>& v) const;
  int64_t adam_steps() const;
  // Random init on the device (normal(0, std) matrices, ones for norms, zeros for biases);
  // not the CPU model's values (use upload_params for those).
  void init_random(uint64_t seed, float std = 0.02f);

  // Sizes the activation arena and the workspace for micro-batches of B x T (the only
  // allocations after construction; forward() calls it, a repeated shape costs nothing).
  // packed: batches with document ids will come (their attention graphs need more workspace;
  // forward() plans again, once, when the first one comes after a plan without).
  void plan(int64_t B, int64_t T, bool packed = false);

  bool memory_saving() const;
  // Marks the gradients empty: the next backward overwrites them (no memset in bf16 mode).
  void zero_grad();
  // The optimizer settings of the coming step. Memory-saving mode: required before each
  // forward(grad = true), whose backward applies them; a no-op otherwise.
  void begin_step(const AdamWConfig& c, float lr, float max_grad_norm);
  // The grad norm of the step before the next one (on resume: the memory-saving mode's first
  // step then clips as the uninterrupted run would have). Ignored in the default mode.
  void set_previous_grad_norm(float norm);
  // Forward with loss (as Qwen3Moe::forward: ce_denominator > 0 divides the summed CE, else the
  // mean over labelled tokens; aux_scale scales coef*aux). With `grad`, also lm_head + CE's
  // backward and ln_f's: parameter gradients start here, so call zero_grad() BEFORE forward().
  // `logits` (optional, host): filled with the fp32 [N,V] logits (syncs per chunk; for
  // `automoe forward` only). Enqueues only otherwise; loss() reads the result.
  void forward(const Batch& b, float ce_denominator = 0.f, float aux_scale = 1.f, bool grad = true,
               std::vector<float>* logits = nullptr);
  LossParts loss();  // waits for the last forward's loss
  // Accumulates d(loss)/d(params) for the last forward(grad = true).
  void backward();
  // Several ranks, default mode: `last` says that the coming forward(grad = true) and backward()
  // are the step's last micro-batch (optimizer_step() or allreduce_grads() follows, no further
  // micro-batch), so they sum each group of gradients over the ranks as soon as it is complete,
  // on a second stream overlapped with the rest of the backward ([ln_f, lm_head] at the end of
  // forward(), each layer after its backward, the embedding last); optimizer_step() then only
  // waits for them. Earlier micro-batches must not (their gradients still accumulate), hence
  // the caller's say. Stays set until changed; off by default (the sum then runs in
  // optimizer_step(), as it does always with AUTOMOE_GRAD_OVERLAP=0, ZeRO-1, fp32_master or
  // the memory-saving mode, which reduces inside its own backward).
  void set_reduce_in_backward(bool last);
  // Global-norm clipping (max_grad_norm > 0) and AdamW, on the device without a host sync.
  // Several ranks: first the gradient all-reduce and the global norm (host-staged over MPI:
  // synchronises; dist/data_parallel_cuda.h). ZeRO-1: the gradients reduce-scattered, the norm
  // from the shards (each element once over the world), AdamW on this rank's shard, the updated
  // parameters all-gathered (dist/zero_cuda.h).
  // Memory-saving mode: AdamW already ran in the backward (with begin_step's settings, which
  // these must equal); this only sums the step's gradient norm (several ranks: the global norm,
  // one host sync) and checks that every tensor was updated.
  void optimizer_step(const AdamWConfig& c, float lr, float max_grad_norm);
  float grad_norm();  // the last optimizer_step's norm before clipping (waits)
  // Several ranks: sums the gradients over the ranks now (replicated over the world, experts
  // over their DP group), for a caller that reads them without a step (`automoe forward
  // --grads`); optimizer_step() does it itself. A no-op in one process. Not in the
  // memory-saving mode (its backward reduces each gradient itself).
  void allreduce_grads();
  // Top-k experts of every MoE layer in the last forward, [nMoE * N, K] (parity tools; waits).
  std::vector<int32_t> download_router_topk() const;

  void synchronize() const;
  CudaMemory memory() const;
  // Per-phase GPU times of the last full step (cudaEvents; waits), in ms: fwd_layers,
  // lm_head_ce (ln_f, chunked lm_head + CE forward and backward, aux loss), bwd_layers,
  // optimizer; then the layers split into fwd_attention, fwd_mlp, bwd_mlp, bwd_attention;
  // with EP also fwd_ep_dispatch and fwd_ep_combine (the forward's all-to-alls, summed over
  // the MoE layers; part of fwd_mlp) and bwd_ep_dispatch, bwd_ep_combine (the backward's; part
  // of bwd_mlp). With train.ep_chunks > 1 these four are the transport calls alone, summed over
  // the chunks on the comm stream: they overlap the expert GEMMs, so they are no longer parts
  // of fwd_mlp / bwd_mlp that add up (EpTimes).
  // Recorded only when enabled (before the step).
  void enable_phase_timing(bool on);
  std::vector<std::pair<std::string, float>> phase_ms() const;
  // With EP in counts mode: the expert rows (received picks) this rank ran in each MoE layer
  // of the last forward, in layer order; empty otherwise. cuda_bench's load balance line.
  std::vector<int64_t> ep_picks_received() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace automoe
