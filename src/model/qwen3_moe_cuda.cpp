// model/qwen3_moe_cuda.cpp: Qwen3-MoE forward and hand-written backward on the CUDA ops, in
// the order of model/qwen3_moe.cpp (the oracle), bf16 activations, fp32 statistics.
// Backward rule: parameter gradients accumulate (dw = beta * dw + ..., beta 0 on the first
// write after zero_grad() in bf16 mode); activation gradients assign; the residual gradient
// dres flows down (+=).
//
// Gradient precision (Precision::BF16): matrices (projections, router, experts, lm_head,
// embedding) write their bf16 gradient directly (cuBLASLt bf16 C/D, the bf16 grouped dW, the
// sorted embedding backward). The small vectors (RMSNorm weights, biases) are reduced in an fp32
// scratch by their ops (which only know fp32 +=) and folded into the bf16 gradient once by
// accumulate_grad: a few thousand elements, so the scratch is tiny.
//
// Memory savers that cost no accuracy: q/k are normed and roped in place (RoPE's backward needs
// no input). The expert inputs xs = permute(ln2) and the SwiGLU outputs are kept per layer in
// the default mode (0.37 GiB per W1 layer, and about 2 ms of a W1 step's 137 that recomputing
// them cost) and recomputed in the memory-saving mode.
//
// The memory-saving mode (qwen3_moe_cuda.h) adds: no gradient arena (g16_at() points into a
// scratch, done() runs AdamW on a tensor the moment its gradient is complete), and one set of
// the recomputable activations shared by all layers (ln1, normed and roped q/k, ln2, gate_up;
// the expert outputs in temporaries), recomputed at the start of the layer's MLP and attention
// backward. Every kernel is
// deterministic, so the recomputed tensors are the forward's bits. With several ranks done()
// first sums the tensor's gradient over its group (DeviceGradReducer::allreduce_tensor: the
// default mode's reduce, one tensor at a time), so both modes apply the same update.
//
// Several ranks (CudaDist): every `if (s.dist)` / `if (s.ep)` branch below; without them the
// single-GPU path runs exactly as before. Expert parallelism keeps one dist::EpMoeCuda per MoE
// layer (its host row plans); their per-call buffers are one shared EpMoeScratch (the worst
// routing of one layer), and the state each layer's backward needs (received rows, routing,
// expert activations) is carved from one EpSavedArena by the counts each forward received:
// reset at the start of every forward, sized at plan() for CudaDist::ep_capacity (train.
// ep_capacity) x the balanced load of all MoE layers (dist/ep_arena.h; docs/DISTRIBUTED.md).
// With CudaDist::ep_dispatch padded the blocks run padded mode (no host sync in the MoE
// forward) and the arena holds every layer's worst case for N tokens instead.
#include "model/qwen3_moe_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>

#include <fmt/format.h>

#include "backend/cuda/ops_cuda.h"
#include "backend/cuda/trace.h"
#include "core/check.h"
#include "dist/data_parallel_cuda.h"
#include "dist/ep_transport.h"
#include "dist/expert_parallel_cuda.h"
#include "dist/process_group.h"
#include "dist/zero3.h"
#include "dist/zero3_cuda.h"
#include "dist/zero_cuda.h"

namespace automoe {

namespace cu = automoe::cuda;
using cu::bf16;

Precision parse_precision(const std::string& name) {
  if (name == "bf16") return Precision::BF16;
  if (name == "fp32_master") return Precision::FP32Master;
  AM_FAIL("train.precision '{}' is not known; use bf16 (bf16 weights, gradients and AdamW state) "
          "or fp32_master (fp32 master weights, gradients and moments)",
          name);
}

const char* precision_name(Precision p) { return p == Precision::BF16 ? "bf16" : "fp32_master"; }

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Bump allocation over one arena: a first pass with base 0 measures, the second carves.
struct Carver {
  uintptr_t base = 0;
  size_t off = 0;
  template <class T>
  T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(base + off);
    off = align_up(off + size_t(std::max<int64_t>(n, 0)) * sizeof(T));
    return p;
  }
};

// Host bf16 <-> fp32 (round to nearest even, NaN kept quiet), for uploads and downloads.
uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float from_bf16_bits(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr int64_t kChunkElems = int64_t(1) << 26;  // host transfers in 64M-element pieces

void upload_bf16(bf16* dst, const float* src, int64_t n) {
  std::vector<uint16_t> tmp(size_t(std::min(n, kChunkElems)));
  for (int64_t i = 0; i < n; i += kChunkElems) {
    const int64_t c = std::min(kChunkElems, n - i);
    for (int64_t j = 0; j < c; ++j) tmp[j] = to_bf16_bits(src[i + j]);
    CUDA_CHECK(cudaMemcpy(dst + i, tmp.data(), size_t(c) * 2, cudaMemcpyHostToDevice));
  }
}
void download_bf16(float* dst, const bf16* src, int64_t n) {
  std::vector<uint16_t> tmp(size_t(std::min(n, kChunkElems)));
  for (int64_t i = 0; i < n; i += kChunkElems) {
    const int64_t c = std::min(kChunkElems, n - i);
    CUDA_CHECK(cudaMemcpy(tmp.data(), src + i, size_t(c) * 2, cudaMemcpyDeviceToHost));
    for (int64_t j = 0; j < c; ++j) dst[i + j] = from_bf16_bits(tmp[j]);
  }
}

// One parameter tensor: element offsets in the host (packed) and device (aligned) arenas.
struct Seg {
  int64_t host, dev, n;
};

// Offsets (elements) of one layer's parameters in the arenas; -1 when absent.
struct LayerOff {
  int64_t ln1, wq, bq, wk, bk, wv, bv, wo, bo, qn, kn, ln2;
  int64_t router, ex_gu, ex_down, mlp_gu, mlp_down;
  bool moe;
  int64_t moe_index;
};

// What one layer's backward reads, planned for (B, T). Shapes: N tokens, H hidden.
struct LayerActs {
  bf16 *ln1, *q_pre, *q, *k_pre, *k, *v, *ao, *x_mid, *ln2;  // [N,H] [N,nH*D] x2 [N,nKV*D] x3 [N,nH*D] [N,H] x2
  float *ln1_rstd, *q_rstd, *k_rstd, *lse, *ln2_rstd;        // [N] [N*nH] [N*nKV] [B,nH,T] [N]
  float* topk_w = nullptr;                                   // [N,K] (MoE)
  int32_t *offsets = nullptr, *slot_row = nullptr;           // [E+1], [N*K] (MoE)
  bf16* gu = nullptr;  // [N*K, 2I] (MoE) or [N, 2F] (dense): SwiGLU input
  bf16* ys = nullptr;  // [N*K, H] expert outputs (MoE; unpermute's backward reads them)
  // default mode, MoE: the permuted inputs and the SwiGLU outputs, which the expert weight
  // gradients read (the memory-saving mode recomputes them into temporaries instead)
  bf16* xs = nullptr;   // [N*K, H]
  bf16* act = nullptr;  // [N*K, I]
};

}  // namespace

struct Qwen3MoeCuda::State {
  ModelConfig cfg;
  Precision prec;
  bool memsave = false;
  Qwen3Moe layout_model;  // layout and HF names, no host arenas
  // The device arenas hold the tensors in layout order, each starting 256-byte aligned (GEMM
  // and vector loads want it; the host layout packs them): P elements with the zero padding.
  std::vector<Seg> segs;  // per layout parameter
  int64_t P = 0, P_host = 0;
  std::vector<LayerOff> lo;
  int64_t off_wte = 0, off_lnf = 0, off_lm = 0;
  bool tied = false;
  int64_t max_small = 0;  // the largest parameter folded through the fp32 scratch

  std::unique_ptr<cu::ScopedCtx> scoped;  // stream + cuBLASLt handle
  cu::Ctx ctx;                            // + our workspace
  cu::DeviceBuffer<unsigned char> ws;

  // parameter-sized arenas
  cu::DeviceBuffer<bf16> p16;      // compute weights
  cu::DeviceBuffer<float> p32;     // master weights (FP32Master)
  cu::DeviceBuffer<bf16> g16, m16, v16;
  cu::DeviceBuffer<float> g32, m32, v32;
  // memory-saving mode: gradient scratch (the largest tensor; biases beside their weight in
  // gsc_small; a tied wte/lm_head gradient, alive from the forward's lm_head to the embedding
  // backward, in gsc_tied; under EP the experts' down gradient, written by the EP block's
  // backward together with gate_up's, in gsc_down), each tensor's g^2 sum (slots, per layout
  // tensor), which tensors this step has updated (applied; host), the step's settings
  cu::DeviceBuffer<bf16> gsc, gsc_small, gsc_tied, gsc_down;
  cu::DeviceBuffer<double> slots;
  std::vector<char> applied;      // [segs]
  std::map<int64_t, int> seg_at;  // device offset -> index in segs
  AdamWConfig ac{};
  float lr = 0.f, max_norm = 0.f;
  bool step_begun = false, step_applied = false;
  int64_t adam_t = 0;
  bool fresh = true;   // gradients hold nothing since zero_grad()
  float beta = 0.f;    // this micro-batch's first-write beta (0: overwrite, 1: accumulate)

  // small device scalars: sumsq (f64), clip coef, norm, aux
  cu::DeviceBuffer<unsigned char> misc;
  double* d_sumsq = nullptr;
  float *d_coef = nullptr, *d_norm = nullptr, *d_aux = nullptr;

  // activations for (B, T)
  int64_t B = 0, T = 0, N = 0, chunk = 0;
  cu::DeviceBuffer<unsigned char> acts;
  std::vector<LayerActs> la;
  std::vector<bf16*> res;  // [L+1] residual stream [N,H]: res[l] enters layer l, res[L] = x_final
  float *probs_all = nullptr;  // [nMoE*N, E]
  int32_t* topk_all = nullptr;  // [nMoE*N, K]
  bf16 *lnf_out = nullptr, *dres = nullptr;  // [N,H]
  float *lnf_rstd = nullptr, *losses = nullptr, *small = nullptr;  // [N], [N], [max_small]
  // forward temporaries
  bf16 *rlogits = nullptr, *xs = nullptr, *act = nullptr, *tmp = nullptr;
  bf16 *logits_c = nullptr, *dlnf = nullptr;
  float* lse_c = nullptr;
  // backward temporaries
  bf16 *dln = nullptr, *dao = nullptr, *dq = nullptr, *dqn = nullptr, *dk = nullptr,
       *dkn = nullptr, *dv = nullptr, *dys = nullptr, *dact = nullptr, *dgu = nullptr,
       *xs_b = nullptr, *act_b = nullptr, *drl = nullptr, *ys_b = nullptr;
  float *dtopk_w = nullptr, *dprobs_all = nullptr;
  // the batch on the device, and its pinned host staging (same byte layout)
  size_t in_bytes = 0;
  unsigned char* in_host = nullptr;  // cudaMallocHost
  int64_t *ids = nullptr, *targets = nullptr;
  int32_t *pos = nullptr, *doc = nullptr, *uniq = nullptr, *uoff = nullptr, *rows = nullptr;
  unsigned char* seg_table = nullptr;  // the packed batch's segment table (attention, cuDNN)
  int64_t n_uniq = 0;
  bool has_doc = false;
  bool planned_packed = false;  // plan() sized the workspace for packed batches too
  cu::AttentionSegments seg;  // table = seg_table, count from the host's doc ids
  // the two halves (train.ep_halves): each half's own segment table, after seg_table
  unsigned char* seg_half_table[2] = {};
  cu::AttentionSegments seg_half[2];
  cudaEvent_t upload_done = nullptr, loss_ready = nullptr, norm_ready = nullptr;
  bool upload_pending = false;
  float* loss_host = nullptr;  // pinned [N + 1]: losses, aux
  float* norm_host = nullptr;  // pinned [1]

  // last forward
  bool have_grad_forward = false, has_aux = false;
  int64_t labelled = 0;
  float denom = 0.f, aux_grad = 0.f;

  bool timing = false;
  cudaEvent_t ev[5] = {};
  std::vector<cudaEvent_t> lev;  // [L][6]: fwd start, after attention, end; bwd start, after MLP, end

  // several ranks (CudaDist): dist = world > 1, ep = an EP group of P > 1 ranks
  const dist::Groups* groups = nullptr;
  dist::EpTransport* ept = nullptr;
  dist::NcclGroup *nccl_world = nullptr, *nccl_dp = nullptr;
  bool dist = false, ep = false;
  std::unique_ptr<dist::DeviceGradReducer> reducer;     // gradient all-reduce, global norm
  // [nMoE], sized in plan(); with the two halves [2 * nMoE]: half A's blocks, then half B's
  std::vector<std::unique_ptr<dist::EpMoeCuda>> ep_moe;
  std::shared_ptr<dist::EpMoeScratch> ep_scratch;        // their per-call scratch, one for all
  std::shared_ptr<dist::EpSavedArena> ep_arena;          // their saved state, reset per forward
  double ep_capacity = 2.0;                              // the arena over the balanced load
  dist::EpRecompute ep_recompute = dist::EpRecompute::kNone;  // what the EP backward recomputes
  dist::EpMode ep_dispatch = dist::EpMode::kCounts;           // counts (host sync) or padded
  int ep_chunks = 1;  // token chunks each EP block pipelines (train.ep_chunks)
  // the two halves (CudaDist::ep_halves): half B's transport, scratch and arena (half A's are
  // ep_scratch and ep_arena)
  bool halves = false;
  bool split_seq = false;  // the halves split the one sequence (B == 1) instead of the batch
  dist::EpTransport* ept_b = nullptr;
  std::shared_ptr<dist::EpMoeScratch> ep_scratch_b;
  std::shared_ptr<dist::EpSavedArena> ep_arena_b;
  cu::DeviceBuffer<double> auxstats;                     // [2E+1] global aux statistics
  cu::DeviceBuffer<double> tsumsq;                       // [segs] g^2 per tensor
  double* sumsq_host = nullptr;                          // pinned [1]: the global g^2 sum
  // The default mode's all-reduce overlapped with the backward (several ranks, bf16, neither
  // ZeRO nor the memory-saving mode; AUTOMOE_GRAD_OVERLAP=0 turns it off, the same on every
  // rank): when set_reduce_in_backward() marked the micro-batch as the step's last, each group
  // of tensors is summed on the reducer's comm stream as soon as it is complete: [ln_f, lm_head]
  // at the end of forward(), each layer's tensors after its backward, wte last.
  // optimizer_step() (allreduce_grads()) then only joins the comm stream and waits.
  enum class Summed { kNone, kHead, kAll };  // which gradients the overlapped reduce has summed
  bool overlap_ok = false;    // the mode and the environment allow it
  bool reduce_in_bwd = false;  // set_reduce_in_backward(): the next micro-batch is the last
  bool overlap = false;        // this forward(grad)/backward pair sums as it goes
  Summed summed = Summed::kNone;
  size_t k_wte = 0, k_head0 = 0, k_head1 = 0;      // tensor indices: wte, [ln_f, lm_head)
  std::vector<std::pair<size_t, size_t>> layer_k;  // [L]: layer l's tensors [first, end)
  void reduce_async(size_t k0, size_t k1) {
    reducer->allreduce_async(k0, k1, g16.get(), ctx.stream);
  }
  // ZeRO-1 (CudaDist::zero): the shard's pieces, their collectives; m16/v16 are [shard]
  std::unique_ptr<dist::DeviceZero> zero;
  cu::DeviceBuffer<double> zsumsq;  // [pieces] g^2 per piece of this rank's shard (ZeRO-1, -3)
  // ZeRO-3 (CudaDist::zero 3; dist/zero3_cuda.h): no p16/g16 arenas. This rank's parameters and
  // gradients are flat shards like m16/v16; W() reads a block's weights from one of two
  // parameter windows (the running block, and the next one, whose ln1 / ln_f the fused residual
  // norm reads), g16_at() writes the running block's gradients into a gradient window.
  //
  // Prefetch (z3_prefetch: AUTOMOE_ZERO3_PREFETCH, default 1, the same on every rank; NCCL or
  // one-rank groups; MPI staging stays synchronous): the gathers and reduces run on DeviceZero3's
  // comm stream, ordered by events with no host wait. The same collectives in the same rounds
  // as the synchronous path (=0: each on the compute stream where it is needed, a host wait
  // each), so the same bits.
  //   forward   layer l computes from block l+1 while block l+2 is gathered into the other slot
  //             (that slot's last reader, layer l-1, is enqueued before: the gather waits for it);
  //             the compute stream waits for block l+2 only at the fused add + norm that ends
  //             layer l, which reads its ln1 (or ln_f). The first two blocks (wte, layer 0) have
  //             nothing before them to hide behind.
  //   backward  layer l computes from block l+1 while block l (layer l-1's) is gathered into the
  //             other slot, whose last reader was layer l+1's backward (or the head); block l+1's
  //             reduce runs after layer l, beside layer l-1's backward. Two gradient windows
  //             make that possible: block b's gradients go to slot b % 2, and the compute stream
  //             waits for block b+2's reduce (the slot's last reader) before writing block b's.
  //             With one window, layer l-1's first gradient write (a few kernels in) would wait
  //             for the whole reduce: no overlap. Costs one more window of the largest block,
  //             win x 2 bytes (Qwen3-30B-A3B: the lm_head block, V x H, 0.58 GiB; at EP 1 a
  //             layer with all 128 experts, 1.16 GiB); bench/memory_plan.py counts it.
  //   step      the end of backward() (and optimizer_step(), synchronize()) joins the comm
  //             stream, so AdamW reads the summed gshard, and the next gathers (after AdamW on
  //             the compute stream) read the new pshard.
  // W() refuses a slot whose gather the compute stream has not waited for (z3_need does).
  std::unique_ptr<dist::DeviceZero3> z3;
  cu::DeviceBuffer<bf16> pshard, gshard;  // [shard] each
  cu::DeviceBuffer<bf16> pwin;            // [2 * win]: two blocks' device ranges
  cu::DeviceBuffer<bf16> gwin;            // [win], prefetching [2 * win]: block b's in slot b % 2
  int64_t win = 0;
  int64_t resident[2] = {-1, -1};  // the block each parameter window holds (-1: none, stale)
  int64_t gblock = -1;             // the block whose gradients g16_at() points into
  int gslot = 0;                   // ... in this gradient window
  bool z3_assign = true;           // this micro-batch's reduces assign (first of the step) or add
  bool z3_prefetch = false;
  cudaEvent_t z3_gathered[2] = {};  // prefetch: on the comm stream after the gather into slot i
  bool z3_unwaited[2] = {};         // ... which the compute stream has not waited for yet
  cudaEvent_t z3_reduced[2] = {};   // prefetch: after the reduce out of gradient slot i
  // Window slot of block b; absent: gathered now into the slot that does not hold `keep`
  // (prefetch: started on the comm stream after the compute stream's work so far, which holds
  // the last reads of that slot; else on the compute stream, synchronously).
  int z3_slot(int64_t b, int64_t keep) {
    for (int i = 0; i < 2; ++i)
      if (resident[i] == b) return i;
    const int i = resident[0] == keep && keep >= 0 ? 1 : 0;
    resident[i] = -1;  // a failed gather leaves it stale
    if (z3_prefetch) {
      z3->gather_async(pwin.get() + i * win, pshard.get(), b, ctx.stream, z3_gathered[i]);
      z3_unwaited[i] = true;
    } else {
      z3->gather(pwin.get() + i * win, pshard.get(), b, ctx.stream);
    }
    resident[i] = b;
    return i;
  }
  // Block b's weights readable by what is enqueued on the compute stream from here on.
  void z3_need(int64_t b, int64_t keep) {
    const int i = z3_slot(b, keep);
    if (z3_unwaited[i]) {  // on the device: no host wait
      CUDA_CHECK(cudaStreamWaitEvent(ctx.stream, z3_gathered[i], 0));
      z3_unwaited[i] = false;
    }
  }
  // Prefetch: block b's gather started now (see z3_slot); without prefetch nothing (z3_need
  // gathers it where it is first read).
  void z3_fetch(int64_t b, int64_t keep) {
    if (z3_prefetch) z3_slot(b, keep);
  }
  // block b's gradients go to a gradient window; then (z3_reduce) to this rank's shard
  void z3_grads(int64_t b) {
    gblock = b;
    gslot = z3_prefetch ? int(b % 2) : 0;
    if (z3_prefetch)  // the slot's previous reduce (block b+2's) has read it
      CUDA_CHECK(cudaStreamWaitEvent(ctx.stream, z3_reduced[gslot], 0));
  }
  void z3_reduce(int64_t b) {
    const bf16* g = gwin.get() + gslot * win;
    if (z3_prefetch) z3->reduce_async(gshard.get(), g, b, z3_assign, ctx.stream, z3_reduced[gslot]);
    else z3->reduce(gshard.get(), g, b, z3_assign, ctx.stream);
    gblock = -1;
  }
  // the compute stream behind every gather and reduce started so far (on the device)
  void z3_join() {
    if (z3) z3->join(ctx.stream);
  }

  State(const ModelConfig& c, Precision p, bool ms, const CudaDist& d)
      : cfg(c), prec(p), memsave(ms), layout_model(c, d.groups, false), groups(d.groups),
        ept(d.ep_transport), nccl_world(d.nccl_world), nccl_dp(d.nccl_dp),
        ep_capacity(d.ep_capacity), ep_recompute(d.ep_recompute), ep_dispatch(d.ep_dispatch),
        ep_chunks(d.ep_chunks), halves(d.ep_halves), ept_b(d.ep_transport_b) {
    dist = groups && groups->world.size() > 1;
    ep = groups && groups->ep.size() > 1 && c.num_moe_layers() > 0;
  }
  ~State() {
    z3.reset();  // drains its comm stream before the windows and shards it reads are freed
    if (scoped) cudaStreamSynchronize(ctx.stream);
    if (in_host) cudaFreeHost(in_host);
    if (loss_host) cudaFreeHost(loss_host);
    if (norm_host) cudaFreeHost(norm_host);
    if (sumsq_host) cudaFreeHost(sumsq_host);
    for (cudaEvent_t e : {upload_done, loss_ready, norm_ready, ev[0], ev[1], ev[2], ev[3], ev[4]})
      if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : lev) cudaEventDestroy(e);
    for (cudaEvent_t e : {z3_gathered[0], z3_gathered[1], z3_reduced[0], z3_reduced[1]})
      if (e) cudaEventDestroy(e);
  }

  bool bf16_mode() const { return prec == Precision::BF16; }

  // The residual adds fused with the next RMSNorm and the q/k norms with RoPE (add_rmsnorm_fwd,
  // qk_norm_rope_fwd: the same bits as the op pairs, checked on an H200 by cuda_op_check and
  // cuda_parity). AUTOMOE_FUSED_NORM=0 runs the op pairs instead.
  bool fused_norm = dist::env_on("AUTOMOE_FUSED_NORM");
  // ... and in the backward RoPE's and the q/k norms' (qk_norm_rope_bwd, even head dims up to
  // 256; not the same bits as the pair: the rotated gradient stays fp32). Set in the constructor.
  bool fused_qk_bwd = false;
  // q, k = RoPE(per-head RMSNorm(q_pre, k_pre)), rstds kept.
  void qk_norm_rope(LayerActs& a, const LayerOff& o, int64_t N, float eps, float theta) {
    const int64_t nH = cfg.num_attention_heads, nKV = cfg.num_key_value_heads, D = cfg.head_dim;
    if (fused_norm) {
      cu::qk_norm_rope_fwd(a.q, a.q_rstd, a.q_pre, W(o.qn), pos, N, nH, D, eps, theta, ctx);
      cu::qk_norm_rope_fwd(a.k, a.k_rstd, a.k_pre, W(o.kn), pos, N, nKV, D, eps, theta, ctx);
      return;
    }
    cu::rmsnorm_fwd(a.q, a.q_rstd, a.q_pre, W(o.qn), N * nH, D, eps, ctx);
    cu::rmsnorm_fwd(a.k, a.k_rstd, a.k_pre, W(o.kn), N * nKV, D, eps, ctx);
    cu::rope_fwd(a.q, a.q, pos, N, nH, D, theta, ctx);  // in place
    cu::rope_fwd(a.k, a.k, pos, N, nKV, D, theta, ctx);
  }
  // A host wait on the step's work: over NCCL timed (the reducer's host_wait: a peer that
  // stopped ends the job instead of hanging it here), otherwise cudaEventSynchronize.
  void host_wait(cudaEvent_t ev, const char* what) {
    if (reducer) reducer->host_wait(ev, what);
    else CUDA_CHECK(cudaEventSynchronize(ev));
  }
  const bf16* W(int64_t off) const {
    if (!z3) return p16.get() + off;
    for (int i = 0; i < 2; ++i) {  // ZeRO-3: a gathered block's window
      const int64_t b = resident[i];
      if (b >= 0 && off >= z3->dev_lo(b) && off < z3->dev_hi(b)) {
        AM_CHECK(!z3_unwaited[i], "internal: ZeRO-3 reads block {} before waiting for its "
                 "gather (z3_need)", b);
        return pwin.get() + i * win + (off - z3->dev_lo(b));
      }
    }
    AM_FAIL("internal: ZeRO-3 reads the parameter at device offset {} outside the gathered "
            "blocks {} and {}", off, resident[0], resident[1]);
  }
  int64_t nmoe() const { return cfg.num_moe_layers(); }

  // ---- gradient writers (see the file comment) ----
  // Where the bf16 gradient of the tensor at device offset `off` goes: its place in the arena,
  // or (memory-saving mode) a scratch; `aux` for a bias written in the same op as its weight.
  bf16* g16_at(int64_t off, bool aux = false) {
    if (z3) {  // the running block's gradient window
      AM_CHECK(gblock >= 0 && off >= z3->dev_lo(gblock) && off < z3->dev_hi(gblock),
               "internal: ZeRO-3 writes the gradient at device offset {} outside block {}", off,
               gblock);
      return gwin.get() + gslot * win + (off - z3->dev_lo(gblock));
    }
    if (!memsave) return g16.get() + off;
    if (tied && off == off_wte) return gsc_tied.get();
    return aux ? gsc_small.get() : gsc.get();
  }
  // The gradient of the tensor at `off` is complete: the memory-saving mode's AdamW on it now
  // (its weights are not read again in this step), and its g^2 sum into its slot.
  void done(int64_t off, bool aux = false) {
    if (memsave) done_at(off, g16_at(off, aux));
  }
  // ... with its gradient at `g`. Several ranks: summed over its group first (the default
  // mode's reduce; every rank reaches the same done() calls in the same order).
  void done_at(int64_t off, bf16* g) {
    const int k = seg_at.at(off);
    AM_CHECK(!applied[size_t(k)], "internal: memory-saving mode updated {} twice in one step",
             layout_model.layout().params[size_t(k)].name);
    applied[size_t(k)] = 1;
    if (dist) reducer->allreduce_tensor(size_t(k), g, ctx.stream);
    cu::adamw_step_sumsq(p16.get() + off, g, m16.get() + off, v16.get() + off, segs[size_t(k)].n,
                         lr, ac.beta1, ac.beta2, ac.eps, ac.weight_decay, adam_t, d_coef,
                         slots.get() + k, ctx);
  }
  // The layers' forward and backward as two halves (train.ep_halves; below forward()).
  void forward_halves(float eps, float theta);
  void backward_halves();
  // The two halves (train.ep_halves): layer activations `a` from token row r0 on (every
  // per-token tensor; lse is [B,nH,T], so a half of whole sequences starts at r0 * nH).
  LayerActs half_of(const LayerActs& a, int64_t r0) const {
    const int64_t H = cfg.hidden_size, nH = cfg.num_attention_heads,
                  nKV = cfg.num_key_value_heads, D = cfg.head_dim, K = cfg.num_experts_per_tok,
                  F = cfg.intermediate_size;
    LayerActs h = a;
    for (bf16** t : {&h.ln1, &h.x_mid, &h.ln2}) *t += r0 * H;
    for (bf16** t : {&h.q_pre, &h.q, &h.ao}) *t += r0 * nH * D;
    for (bf16** t : {&h.k_pre, &h.k, &h.v}) *t += r0 * nKV * D;
    h.ln1_rstd += r0;
    h.ln2_rstd += r0;
    h.q_rstd += r0 * nH;
    h.k_rstd += r0 * nKV;
    h.lse += r0 * nH;
    if (h.topk_w) h.topk_w += r0 * K;
    if (h.gu && !h.offsets) h.gu += r0 * 2 * F;  // a dense layer's [N,2F]
    return h;
  }
  // dx (nullable) = dx_beta * dx + dout @ w; dW (and db when b_off >= 0) of the parameter at
  // w_off; `last`: no further writes to dW follow in this step (done()).
  void lin_bwd(bf16* dx, float dx_beta, int64_t w_off, int64_t b_off, const bf16* dout,
               const bf16* x, int64_t n, int64_t I, int64_t O, float dw_beta, bool last = true) {
    const bf16* w = W(w_off);
    if (bf16_mode()) {
      float* db = nullptr;
      if (b_off >= 0) {
        db = small;
        CUDA_CHECK(cudaMemsetAsync(db, 0, size_t(O) * sizeof(float), ctx.stream));
      }
      cu::linear_bwd(dx, dx_beta, g16_at(w_off), dw_beta, db, dout, x, w, n, I, O, ctx);
      if (b_off >= 0) cu::accumulate_grad(g16_at(b_off, true), db, beta, O, ctx);
      if (last) {
        done(w_off);
        if (b_off >= 0) done(b_off, true);
      }
    } else {
      cu::linear_bwd(dx, dx_beta, g32.get() + w_off, b_off >= 0 ? g32.get() + b_off : nullptr,
                     dout, x, w, n, I, O, ctx);
    }
  }
  // RMSNorm backward: dx = ..., d(weight at w_off) accumulates.
  void norm_bwd(bf16* dx, float dx_beta, int64_t w_off, const bf16* dout, const bf16* x,
                const float* rstd, int64_t n, int64_t C) {
    if (bf16_mode()) {
      CUDA_CHECK(cudaMemsetAsync(small, 0, size_t(C) * sizeof(float), ctx.stream));
      cu::rmsnorm_bwd(dx, dx_beta, small, dout, x, W(w_off), rstd, n, C, ctx);
      cu::accumulate_grad(g16_at(w_off), small, beta, C, ctx);
      done(w_off);
    } else {
      cu::rmsnorm_bwd(dx, dx_beta, g32.get() + w_off, dout, x, W(w_off), rstd, n, C, ctx);
    }
  }
  // q or k: dg (the attention's gradient of the roped heads) becomes the gradient of the heads
  // before their norm, in place; d(norm weight at w_off) accumulates.
  void qk_norm_rope_bwd(bf16* dg, int64_t w_off, const bf16* x, const float* rstd, int64_t n,
                        int64_t heads, float theta) {
    const int64_t D = cfg.head_dim;
    float* dw = small;
    if (bf16_mode()) CUDA_CHECK(cudaMemsetAsync(small, 0, size_t(D) * sizeof(float), ctx.stream));
    else dw = g32.get() + w_off;
    cu::qk_norm_rope_bwd(dg, dw, dg, x, W(w_off), rstd, pos, n, heads, D, theta, ctx);
    if (bf16_mode()) {
      cu::accumulate_grad(g16_at(w_off), small, beta, D, ctx);
      done(w_off);
    }
  }
  void grouped_bwd(bf16* dx, int64_t w_off, const bf16* dout, const bf16* x,
                   const int32_t* offsets, int64_t R, int64_t E, int64_t I, int64_t O) {
    if (bf16_mode()) {
      cu::grouped_linear_bwd(dx, g16_at(w_off), beta, dout, x, W(w_off), offsets, R, E, I, O,
                             ctx);
      done(w_off);
    } else {
      cu::grouped_linear_bwd(dx, g32.get() + w_off, dout, x, W(w_off), offsets, R, E, I, O, ctx);
    }
  }
  // Pieces of a layer over n token rows from r0 (the whole micro-batch: r0 0, n N; the two
  // halves: each half's rows), `a` those rows' activations (half_of), RoPE at positions `pos`
  // and the weight gradients with `beta`, as the caller set them.
  // The attention block up to the attention: ln1 (unless fused into the previous residual
  // add), the q/k/v projections, the q/k norms and RoPE.
  void qkv_fwd(LayerActs& a, const LayerOff& o, const bf16* x_in, int64_t n, bool with_ln1,
               float eps, float theta) {
    const int64_t H = cfg.hidden_size, nH = cfg.num_attention_heads,
                  nKV = cfg.num_key_value_heads, D = cfg.head_dim;
    auto Wn = [&](int64_t off) { return off < 0 ? nullptr : W(off); };
    if (with_ln1) cu::rmsnorm_fwd(a.ln1, a.ln1_rstd, x_in, W(o.ln1), n, H, eps, ctx);
    cu::linear_fwd(a.q_pre, a.ln1, W(o.wq), Wn(o.bq), n, H, nH * D, ctx);
    cu::linear_fwd(a.k_pre, a.ln1, W(o.wk), Wn(o.bk), n, H, nKV * D, ctx);
    cu::linear_fwd(a.v, a.ln1, W(o.wv), Wn(o.bv), n, H, nKV * D, ctx);
    qk_norm_rope(a, o, n, eps, theta);
  }
  // Its backward from dq, dk, dv: the norms' and RoPE's, the projections' into dln, ln1's
  // added to dres.
  void qkv_bwd(const LayerActs& a, const LayerOff& o, const bf16* x_in, int64_t r0, int64_t n,
               float theta) {
    const int64_t H = cfg.hidden_size, nH = cfg.num_attention_heads,
                  nKV = cfg.num_key_value_heads, D = cfg.head_dim;
    bf16 *dq_r = dq + r0 * nH * D, *dk_r = dk + r0 * nKV * D, *dv_r = dv + r0 * nKV * D,
         *dl = dln + r0 * H;
    if (fused_qk_bwd) {  // RoPE's and the q/k norms' backward in one pass, in place
      qk_norm_rope_bwd(dq_r, o.qn, a.q_pre, a.q_rstd, n, nH, theta);
      qk_norm_rope_bwd(dk_r, o.kn, a.k_pre, a.k_rstd, n, nKV, theta);
    } else {
      cu::rope_bwd(dqn + r0 * nH * D, dq_r, pos, n, nH, D, theta, ctx);
      cu::rope_bwd(dkn + r0 * nKV * D, dk_r, pos, n, nKV, D, theta, ctx);
      norm_bwd(dq_r, 0.f, o.qn, dqn + r0 * nH * D, a.q_pre, a.q_rstd, n * nH, D);
      norm_bwd(dk_r, 0.f, o.kn, dkn + r0 * nKV * D, a.k_pre, a.k_rstd, n * nKV, D);
    }
    lin_bwd(dl, 0.f, o.wq, o.bq, dq_r, a.ln1, n, H, nH * D, beta);
    lin_bwd(dl, 1.f, o.wk, o.bk, dk_r, a.ln1, n, H, nKV * D, beta);
    lin_bwd(dl, 1.f, o.wv, o.bv, dv_r, a.ln1, n, H, nKV * D, beta);
    norm_bwd(dres + r0 * H, 1.f, o.ln1, dl, x_in, a.ln1_rstd, n, H);  // dres += ln1's dx
  }
  // A MoE layer's router backward: d(top-k weights) and the aux loss's d(probs) into
  // d(logits), then its linear's added to dln (which holds the experts' dx).
  void router_bwd_rows(const LayerActs& a, const LayerOff& o, int64_t r0, int64_t n) {
    const int64_t H = cfg.hidden_size, E = cfg.num_experts, K = cfg.num_experts_per_tok;
    const int64_t at = o.moe_index * N * E + r0 * E;  // this layer's rows of probs_all
    cu::router_bwd(drl + r0 * E, dtopk_w + r0 * K, aux_grad != 0.f ? dprobs_all + at : nullptr,
                   probs_all + at, topk_all + o.moe_index * N * K + r0 * K, n, E, K,
                   cfg.norm_topk_prob, ctx);
    lin_bwd(dln + r0 * H, 1.f, o.router, -1, drl + r0 * E, a.ln2, n, H, E, beta);
  }
  // A dense MLP's backward (SwiGLU recomputed into act_b) from dres into dln.
  void dense_mlp_bwd(const LayerActs& a, const LayerOff& o, int64_t r0, int64_t n) {
    const int64_t H = cfg.hidden_size, F = cfg.intermediate_size;
    cu::swiglu_fwd(act_b, a.gu, n, F, ctx);  // recomputed
    lin_bwd(dact, 0.f, o.mlp_down, -1, dres + r0 * H, act_b, n, F, H, beta);
    cu::swiglu_bwd(dgu, dact, a.gu, n, F, ctx);
    lin_bwd(dln + r0 * H, 0.f, o.mlp_gu, -1, dgu, a.ln2, n, H, 2 * F, beta);
  }
  void record(int i) {
    if (timing) CUDA_CHECK(cudaEventRecord(ev[i], ctx.stream));
  }
  void lrecord(int64_t l, int i) {
    if (timing) CUDA_CHECK(cudaEventRecord(lev[size_t(l * 6 + i)], ctx.stream));
  }
};

Qwen3MoeCuda::Qwen3MoeCuda(const ModelConfig& cfg, Precision precision, int device,
                           bool memory_saving, const CudaDist& dist)
    : s_(std::make_unique<State>(cfg, precision, memory_saving, dist)) {
  State& s = *s_;
  AM_CHECK(!memory_saving || precision == Precision::BF16,
           "train.memory_saving needs train.precision bf16 (the mode drops the bf16 gradient "
           "arena; with fp32_master use the default mode)");
  AM_CHECK(!s.ep || precision == Precision::BF16,
           "train.precision fp32_master is not supported with expert parallelism on the GPU yet "
           "(the EP block writes bf16 expert gradients); use train.precision bf16, or train.ep 1");
  if (s.ep) {
    AM_CHECK(s.ept, "internal: an expert-parallel Qwen3MoeCuda needs an EP transport");
    AM_CHECK(s.ept->size() == s.groups->ep.size() && s.ept->num_local() == 1,
             "internal: EP transport of {} ranks ({} in this process) for an EP group of {}",
             s.ept->size(), s.ept->num_local(), s.groups->ep.size());
  }
  AM_CHECK(dist.zero == 0 || dist.zero == 1 || dist.zero == 3,
           "train.zero {} is not built for the CUDA model (ZeRO-2 needs the backward to "
           "reduce-scatter gradient buckets as it produces them); use train.zero 1, 3 or 0",
           dist.zero);
  AM_CHECK(dist.zero == 0 || (precision == Precision::BF16 && !memory_saving && dist.groups),
           "internal: ZeRO on the GPU needs bf16 precision, the default mode and dist.groups");
  AM_CHECK(dist.zero != 3 || !cfg.tie_word_embeddings,
           "train.zero 3 on the GPU needs untied embeddings (tie_word_embeddings false; "
           "Qwen3-30B-A3B is untied): the embedding's and the head's blocks would both write "
           "wte's gradient. Use train.zero 1, or train.device cpu");
  if (s.halves) {  // the two-half overlap (CudaDist::ep_halves): what it is built on
    AM_CHECK(s.ep, "train.ep_halves needs expert parallelism (train.ep > 1 and MoE layers): "
             "it overlaps the EP all-to-alls; turn it off for a single GPU");
    AM_CHECK(s.ept_b && s.ept_b != s.ept && s.ept_b->size() == s.ept->size() &&
                 s.ept->can_push() && s.ept_b->can_push(),
             "train.ep_halves needs the IPC transport (the direct dispatch) and a second one for "
             "half B; this run's EP transport is {}. Use AUTOMOE_EP_TRANSPORT=ipc (GPUs of one "
             "node with peer access) or turn train.ep_halves off",
             s.ept->name());
    AM_CHECK(s.ep_dispatch == dist::EpMode::kCounts && s.ep_chunks == 1 && !memory_saving &&
                 dist.zero != 3,
             "train.ep_halves runs with train.ep_dispatch counts, train.ep_chunks 1, without "
             "train.memory_saving and without train.zero 3 (got {}, {}, {}, zero {}); change "
             "those or turn train.ep_halves off",
             dist::ep_mode_name(s.ep_dispatch), s.ep_chunks,
             memory_saving ? "memory-saving" : "default mode", dist.zero);
  }
  s.fused_qk_bwd = s.fused_norm && cu::qk_norm_rope_bwd_fused(cfg.head_dim);
  const auto& layout = s.layout_model.layout();
  s.P_host = layout.total;
  std::map<std::string, int64_t> off;  // device offsets
  for (auto& p : layout.params) {
    const int64_t dev = (s.P + 127) / 128 * 128;
    s.seg_at[dev] = int(s.segs.size());
    s.segs.push_back({p.offset, dev, p.numel});
    off[p.name] = dev;
    s.P = dev + p.numel;
  }
  s.P = (s.P + 127) / 128 * 128;
  auto O = [&](const std::string& n) {
    auto it = off.find(n);
    return it == off.end() ? int64_t(-1) : it->second;
  };
  int64_t mi = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    LayerOff o{};
    o.ln1 = O(p + "ln1");
    o.wq = O(p + "attn.wq");
    o.bq = O(p + "attn.bq");
    o.wk = O(p + "attn.wk");
    o.bk = O(p + "attn.bk");
    o.wv = O(p + "attn.wv");
    o.bv = O(p + "attn.bv");
    o.wo = O(p + "attn.wo");
    o.bo = O(p + "attn.bo");
    o.qn = O(p + "attn.q_norm");
    o.kn = O(p + "attn.k_norm");
    o.ln2 = O(p + "ln2");
    o.moe = cfg.is_moe_layer(l);
    o.moe_index = o.moe ? mi++ : -1;
    o.router = O(p + "moe.router");
    o.ex_gu = O(p + "moe.experts_gate_up");
    o.ex_down = O(p + "moe.experts_down");
    o.mlp_gu = O(p + "mlp.gate_up");
    o.mlp_down = O(p + "mlp.down");
    s.lo.push_back(o);
  }
  s.off_wte = O("wte");
  s.off_lnf = O("ln_f");
  s.tied = cfg.tie_word_embeddings;
  s.off_lm = s.tied ? s.off_wte : O("lm_head");
  AM_CHECK(s.off_wte >= 0 && s.off_lnf >= 0 && s.off_lm >= 0, "internal: layout without wte/ln_f/lm_head");
  for (auto& p : layout.params)
    if (p.shape.size() == 1) s.max_small = std::max(s.max_small, p.numel);

  s.scoped = std::make_unique<cu::ScopedCtx>(0, device);
  s.ctx = s.scoped->ctx();
  const size_t P = size_t(s.P);
  // Everything starts at zero, the padding between tensors stays zero (the gradient norm and
  // AdamW run over whole arenas).
  if (dist.zero != 3) {  // ZeRO-3: windows and shards instead (below)
    s.p16 = cu::DeviceBuffer<bf16>(P);
    CUDA_CHECK(cudaMemset(s.p16.get(), 0, P * 2));
  }
  if (s.bf16_mode()) {
    if (s.memsave) {
      int64_t biggest = 0;
      for (auto& sg : s.segs) biggest = std::max(biggest, sg.n);
      s.gsc = cu::DeviceBuffer<bf16>(size_t(biggest));
      s.gsc_small = cu::DeviceBuffer<bf16>(size_t(std::max<int64_t>(s.max_small, 1)));
      if (s.tied) s.gsc_tied = cu::DeviceBuffer<bf16>(size_t(cfg.vocab_size * cfg.hidden_size));
      if (s.ep) {
        int64_t down = 0;
        for (auto& o : s.lo)
          if (o.moe) down = std::max(down, s.segs[size_t(s.seg_at.at(o.ex_down))].n);
        s.gsc_down = cu::DeviceBuffer<bf16>(size_t(down));
      }
      s.slots = cu::DeviceBuffer<double>(s.segs.size());
      s.applied.assign(s.segs.size(), 0);
      CUDA_CHECK(cudaMemset(s.slots.get(), 0, s.segs.size() * sizeof(double)));
    } else if (dist.zero != 3) {
      s.g16 = cu::DeviceBuffer<bf16>(P);
      CUDA_CHECK(cudaMemset(s.g16.get(), 0, P * 2));
    }
    // ZeRO-1: the moments of this rank's shard only (the memory saving); the shard is a list
    // of pieces of the parameter and gradient arenas (dist/zero_cuda.h)
    size_t PM = P;
    std::vector<int64_t> dev_off;
    for (const Seg& sg : s.segs) dev_off.push_back(sg.dev);
    if (dist.zero == 1) {
      s.zero = std::make_unique<dist::DeviceZero>(
          dist::ZeroPartition(dist.zero, layout, *s.groups), *s.groups, std::move(dev_off),
          s.nccl_world, s.nccl_dp);
      PM = size_t(s.zero->shard_numel());
      s.zsumsq = cu::DeviceBuffer<double>(std::max<size_t>(s.zero->pieces().size(), 1));
    } else if (dist.zero == 3) {
      s.z3 = std::make_unique<dist::DeviceZero3>(dist::ZeroPartition(3, layout, *s.groups),
                                                 *s.groups, std::move(dev_off), dist::block_tensor_ranges(s.layout_model),
                                                 s.nccl_world, s.nccl_dp);
      PM = size_t(s.z3->shard_numel());
      s.zsumsq = cu::DeviceBuffer<double>(std::max<size_t>(s.z3->pieces().size(), 1));
      s.win = (s.z3->window_numel() + 127) / 128 * 128;  // slot 1 stays 256-byte aligned
      // the prefetch (State::z3_prefetch): on unless AUTOMOE_ZERO3_PREFETCH=0, which must be the
      // same on every rank (the order of the gathers and reduces differs in the backward)
      s.z3_prefetch =
          dist::env_on_everywhere("AUTOMOE_ZERO3_PREFETCH", s.groups->world) && s.z3->can_overlap();
      for (cudaEvent_t* e : {&s.z3_gathered[0], &s.z3_gathered[1], &s.z3_reduced[0],
                             &s.z3_reduced[1]})
        CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
      s.pwin = cu::DeviceBuffer<bf16>(size_t(2 * s.win));
      s.gwin = cu::DeviceBuffer<bf16>(size_t((s.z3_prefetch ? 2 : 1) * s.win));
      s.pshard = cu::DeviceBuffer<bf16>(PM);
      s.gshard = cu::DeviceBuffer<bf16>(PM);
      for (const auto* b : {&s.pwin, &s.gwin, &s.pshard, &s.gshard})  // padding stays zero
        CUDA_CHECK(cudaMemset(b->get(), 0, b->bytes()));
    }
    s.m16 = cu::DeviceBuffer<bf16>(PM);
    s.v16 = cu::DeviceBuffer<bf16>(PM);
    for (bf16* b : {s.m16.get(), s.v16.get()}) CUDA_CHECK(cudaMemset(b, 0, PM * 2));
  } else {
    s.p32 = cu::DeviceBuffer<float>(P);
    s.g32 = cu::DeviceBuffer<float>(P);
    s.m32 = cu::DeviceBuffer<float>(P);
    s.v32 = cu::DeviceBuffer<float>(P);
    for (float* b : {s.p32.get(), s.g32.get(), s.m32.get(), s.v32.get()})
      CUDA_CHECK(cudaMemset(b, 0, P * 4));
  }
  s.misc = cu::DeviceBuffer<unsigned char>(kAlign * 4);
  s.d_sumsq = reinterpret_cast<double*>(s.misc.get());
  s.d_coef = reinterpret_cast<float*>(s.misc.get() + kAlign);
  s.d_norm = reinterpret_cast<float*>(s.misc.get() + 2 * kAlign);
  s.d_aux = reinterpret_cast<float*>(s.misc.get() + 3 * kAlign);
  CUDA_CHECK(cudaMemset(s.misc.get(), 0, kAlign * 4));
  if (s.dist) {  // the gradient all-reduce over the arena's tensors, and the global statistics
    std::vector<dist::DeviceTensor> ts;
    for (size_t k = 0; k < layout.params.size(); ++k)
      ts.push_back({s.segs[k].dev, s.segs[k].n, layout.params[k].expert});
    s.reducer = std::make_unique<dist::DeviceGradReducer>(*s.groups, std::move(ts));
    s.reducer->use_nccl(s.nccl_world, s.nccl_dp);
    // the overlapped reduce (State::overlap): on unless AUTOMOE_GRAD_OVERLAP=0, which must be
    // the same on every rank (the ranks would otherwise issue different collectives)
    s.overlap_ok = dist::env_on_everywhere("AUTOMOE_GRAD_OVERLAP", s.groups->world) &&
                   s.bf16_mode() && !s.memsave && !s.zero && !s.z3;
    // its points: every tensor in exactly one of [ln_f, lm_head], a layer, wte (checked here:
    // a tensor left out would never be summed, and its replicas would drift)
    s.layer_k.assign(size_t(cfg.num_hidden_layers), {layout.params.size(), 0});
    for (size_t k = 0; k < layout.params.size(); ++k) {
      const std::string& n = layout.params[k].name;
      if (n.rfind("layers.", 0) != 0) continue;
      auto& r = s.layer_k.at(size_t(std::stoll(n.substr(7))));  // "layers.12.ln1" -> 12
      r.first = std::min(r.first, k);
      r.second = std::max(r.second, k + 1);
    }
    s.k_wte = size_t(s.seg_at.at(s.off_wte));
    s.k_head0 = size_t(s.seg_at.at(s.off_lnf));
    s.k_head1 = s.k_head0 + 1;
    if (!s.tied) {
      AM_CHECK(size_t(s.seg_at.at(s.off_lm)) == s.k_head1, "internal: lm_head does not follow ln_f");
      s.k_head1 += 1;
    }
    std::vector<int> cover(layout.params.size(), 0);
    auto mark = [&](size_t k0, size_t k1) {
      for (size_t k = k0; k < k1; ++k) ++cover[k];
    };
    mark(s.k_wte, s.k_wte + 1);
    mark(s.k_head0, s.k_head1);
    for (auto& r : s.layer_k) mark(r.first, r.second);
    for (size_t k = 0; k < cover.size(); ++k)
      AM_CHECK(cover[k] == 1, "internal: the overlapped gradient reduce sums {} {} times",
               layout.params[k].name, cover[k]);
    s.auxstats = cu::DeviceBuffer<double>(size_t(2 * cfg.num_experts + 1));
    s.tsumsq = cu::DeviceBuffer<double>(s.segs.size());
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.sumsq_host), sizeof(double)));
  }
  for (cudaEvent_t* e : {&s.upload_done, &s.loss_ready, &s.norm_ready})
    CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  for (auto& e : s.ev) CUDA_CHECK(cudaEventCreate(&e));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.norm_host), sizeof(float)));
  s.norm_host[0] = 0.f;
  // cudaMemset/cudaMemcpy run on the legacy stream, which does not order with our
  // non-blocking stream: set-up and transfers end with a device sync.
  CUDA_CHECK(cudaDeviceSynchronize());
}

Qwen3MoeCuda::~Qwen3MoeCuda() {
  // Unwinding from an error mid-step (any error, on any rank): the step's NCCL work may be
  // queued behind a peer that will never come, and State's members wait on the GPU as they go
  // (stream synchronizes, cudaFree, cudaFreeHost): the communicators are aborted first, so their
  // kernels end and those waits return (dist::stop_device_collectives).
  if (s_ && s_->dist && std::uncaught_exceptions() > 0) dist::stop_device_collectives();
}

const ModelConfig& Qwen3MoeCuda::config() const { return s_->cfg; }
const Qwen3Moe& Qwen3MoeCuda::host_layout() const { return s_->layout_model; }
int64_t Qwen3MoeCuda::numel() const { return s_->P_host; }
Precision Qwen3MoeCuda::precision() const { return s_->prec; }
bool Qwen3MoeCuda::memory_saving() const { return s_->memsave; }
const cuda::Ctx& Qwen3MoeCuda::ctx() const { return s_->ctx; }
int64_t Qwen3MoeCuda::adam_steps() const { return s_->adam_t; }
void Qwen3MoeCuda::synchronize() const {
  s_->z3_join();  // ZeRO-3 prefetch: its comm stream's work too
  // several ranks: timed (NCCL work of a stopped peer must end the job, not hang it)
  if (s_->reducer) s_->reducer->host_sync(s_->ctx.stream, "a model synchronize");
  else CUDA_CHECK(cudaStreamSynchronize(s_->ctx.stream));
}

// ---- parameters and optimizer state <-> host fp32 arenas ---------------------------------------

namespace {

// One fp32 host arena of the layout <-> one device arena (bf16 or fp32), tensor by tensor.
template <class D>
void to_device(D* dst, const std::vector<float>& src, const std::vector<Seg>& segs) {
  for (auto& sg : segs) {
    if constexpr (sizeof(D) == 2)
      upload_bf16(dst + sg.dev, src.data() + sg.host, sg.n);
    else
      CUDA_CHECK(cudaMemcpy(dst + sg.dev, src.data() + sg.host, size_t(sg.n) * 4, cudaMemcpyHostToDevice));
  }
  // cudaMemcpy runs on the legacy stream, which does not order with the model's stream
  CUDA_CHECK(cudaDeviceSynchronize());
}
template <class D>
void to_host(std::vector<float>& dst, const D* src, const std::vector<Seg>& segs) {
  for (auto& sg : segs) {
    if constexpr (sizeof(D) == 2)
      download_bf16(dst.data() + sg.host, src + sg.dev, sg.n);
    else
      CUDA_CHECK(cudaMemcpy(dst.data() + sg.host, src + sg.dev, size_t(sg.n) * 4, cudaMemcpyDeviceToHost));
  }
}

}  // namespace

void Qwen3MoeCuda::upload_params(const std::vector<float>& params) {
  State& s = *s_;
  AM_CHECK(int64_t(params.size()) == s.P_host, "upload_params: {} values for {} parameters",
           params.size(), s.P_host);
  synchronize();
  if (s.z3) {  // block by block through window 0; each rank keeps its own elements
    s.resident[0] = s.resident[1] = -1;
    for (int64_t b = 0; b < s.z3->num_blocks(); ++b) {
      for (const Seg& sg : s.segs)
        if (sg.dev >= s.z3->dev_lo(b) && sg.dev < s.z3->dev_hi(b))
          upload_bf16(s.pwin.get() + (sg.dev - s.z3->dev_lo(b)), params.data() + sg.host, sg.n);
      CUDA_CHECK(cudaDeviceSynchronize());  // legacy-stream copies: see to_device
      s.z3->keep_own(s.pshard.get(), s.pwin.get(), b, s.ctx.stream);
      synchronize();
    }
    return;
  }
  if (s.bf16_mode()) {
    to_device(s.p16.get(), params, s.segs);
  } else {
    to_device(s.p32.get(), params, s.segs);
    cu::convert(s.p16.get(), s.p32.get(), s.P, s.ctx);
    synchronize();
  }
}

void Qwen3MoeCuda::download_params(std::vector<float>& params) const {
  State& s = *s_;
  synchronize();
  params.resize(size_t(s.P_host));
  if (s.z3) {  // block by block: gathered into window 0 (collective), then to the host
    s.resident[0] = s.resident[1] = -1;
    for (int64_t b = 0; b < s.z3->num_blocks(); ++b) {
      s.z3->gather(s.pwin.get(), s.pshard.get(), b, s.ctx.stream);
      synchronize();
      for (const Seg& sg : s.segs)
        if (sg.dev >= s.z3->dev_lo(b) && sg.dev < s.z3->dev_hi(b))
          download_bf16(params.data() + sg.host, s.pwin.get() + (sg.dev - s.z3->dev_lo(b)), sg.n);
    }
    return;
  }
  if (s.bf16_mode())
    to_host(params, s.p16.get(), s.segs);
  else
    to_host(params, s.p32.get(), s.segs);
}

void Qwen3MoeCuda::download_grads(std::vector<float>& grads) const {
  const State& s = *s_;
  AM_CHECK(!s.memsave, "download_grads: the memory-saving mode keeps no gradients (AdamW runs "
           "inside the backward); use the default mode to inspect them");
  AM_CHECK(!s.z3, "download_grads: under train.zero 3 each rank keeps only its gradient shard; "
           "use train.zero 0 or 1 to inspect the gradients");
  if (s.reducer) s.reducer->join(s.ctx.stream);  // a sum in the backward still in flight
  synchronize();
  grads.assign(size_t(s.P_host), 0.f);
  if (s.bf16_mode()) {
    if (!s.fresh) to_host(grads, s.g16.get(), s.segs);
  } else {
    to_host(grads, s.g32.get(), s.segs);
  }
}

void Qwen3MoeCuda::upload_moments(const std::vector<float>& m, const std::vector<float>& v, int64_t t) {
  State& s = *s_;
  const int64_t want = s.zero ? s.zero->shard_numel() : s.z3 ? s.z3->shard_numel() : s.P_host;
  AM_CHECK(int64_t(m.size()) == want && int64_t(v.size()) == want,
           "upload_moments: {} and {} values for {} moments{}", m.size(), v.size(), want,
           s.zero || s.z3 ? " (this rank's ZeRO shard)" : "");
  synchronize();
  if (s.zero || s.z3) {  // the shard, flat
    upload_bf16(s.m16.get(), m.data(), want);
    upload_bf16(s.v16.get(), v.data(), want);
    CUDA_CHECK(cudaDeviceSynchronize());  // legacy-stream copies: see to_device
  } else if (s.bf16_mode()) {
    to_device(s.m16.get(), m, s.segs);
    to_device(s.v16.get(), v, s.segs);
  } else {
    to_device(s.m32.get(), m, s.segs);
    to_device(s.v32.get(), v, s.segs);
  }
  s.adam_t = t;
}

void Qwen3MoeCuda::download_moments(std::vector<float>& m, std::vector<float>& v) const {
  const State& s = *s_;
  synchronize();
  if (s.zero || s.z3) {  // the shard, flat
    m.resize(size_t(s.zero ? s.zero->shard_numel() : s.z3->shard_numel()));
    v.resize(m.size());
    download_bf16(m.data(), s.m16.get(), int64_t(m.size()));
    download_bf16(v.data(), s.v16.get(), int64_t(v.size()));
    return;
  }
  m.resize(size_t(s.P_host));
  v.resize(size_t(s.P_host));
  if (s.bf16_mode()) {
    to_host(m, s.m16.get(), s.segs);
    to_host(v, s.v16.get(), s.segs);
  } else {
    to_host(m, s.m32.get(), s.segs);
    to_host(v, s.v32.get(), s.segs);
  }
}

void Qwen3MoeCuda::init_random(uint64_t seed, float std) {
  State& s = *s_;
  const auto& params = s.layout_model.layout().params;
  if (s.z3) s.resident[0] = s.resident[1] = -1;
  int64_t b = 0;  // ZeRO-3: the block being filled in window 0
  for (size_t k = 0; k < params.size(); ++k) {
    const ParamSpec& p = params[k];
    const bool is_norm = p.shape.size() == 1 && p.name.find("attn.b") == std::string::npos;
    const bool is_bias = p.shape.size() == 1 && !is_norm;
    const uint64_t sd = seed * 0x9e3779b97f4a7c15ull + uint64_t(k + 1);
    const int64_t at = s.segs[k].dev;
    if (s.z3) {  // every rank draws every tensor of the block, keeps its own elements
      bf16* d = s.pwin.get() + (at - s.z3->dev_lo(b));
      if (is_norm || is_bias) cu::fill(d, is_norm ? 1.f : 0.f, p.numel, s.ctx);
      else cu::fill_normal(d, p.numel, std, sd, s.ctx);
      if (k + 1 == params.size() || s.segs[k + 1].dev >= s.z3->dev_hi(b))
        s.z3->keep_own(s.pshard.get(), s.pwin.get(), b++, s.ctx.stream);
    } else if (s.bf16_mode()) {
      bf16* d = s.p16.get() + at;
      if (is_norm || is_bias) cu::fill(d, is_norm ? 1.f : 0.f, p.numel, s.ctx);
      else cu::fill_normal(d, p.numel, std, sd, s.ctx);
    } else {
      float* d = s.p32.get() + at;
      if (is_norm || is_bias) cu::fill(d, is_norm ? 1.f : 0.f, p.numel, s.ctx);
      else cu::fill_normal(d, p.numel, std, sd, s.ctx);
    }
  }
  if (!s.bf16_mode()) cu::convert(s.p16.get(), s.p32.get(), s.P, s.ctx);
  synchronize();
}

// ---- planning --------------------------------------------------------------------------------

void Qwen3MoeCuda::plan(int64_t B, int64_t T, bool packed) {
  State& s = *s_;
  // a packed batch after unpacked ones at the same shape: planned again, for the workspace of
  // cuDNN's packed attention graphs
  if (B == s.B && T == s.T && s.acts.get() && (s.planned_packed || !packed)) return;
  synchronize();
  const auto& c = s.cfg;
  const int64_t N = B * T, H = c.hidden_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                K = c.num_experts_per_tok, I = c.moe_intermediate_size, F = c.intermediate_size,
                V = c.vocab_size, L = c.num_hidden_layers, M = c.num_moe_layers();
  // Expert parallelism: the EP blocks keep the expert rows; the model's own are not needed.
  const int64_t NK = M > 0 && !s.ep ? N * K : 0;
  // lm_head + CE chunk: at most 2048 rows and 512 MiB of bf16 logits, a multiple of 64 rows
  // (W1: 1728 rows, 5 chunks; fewer chunks = fewer bf16 roundings of the accumulated dW).
  int64_t chunk = std::min<int64_t>(2048, (int64_t(512) << 20) / (2 * V));
  chunk = std::max<int64_t>(64, chunk / 64 * 64);
  chunk = std::min(chunk, N);

  s.la.assign(size_t(L), LayerActs{});
  s.res.assign(size_t(L + 1), nullptr);
  auto carve = [&](uintptr_t base) -> size_t {
    Carver cv{base, 0};
    for (int64_t l = 0; l <= L; ++l) s.res[l] = cv.take<bf16>(N * H);
    // the recomputable activations: per layer, or one set shared by all (memory-saving mode,
    // whose expert outputs ys live in the forward's and the backward's temporaries instead)
    auto recomputable = [&](LayerActs& a, bool moe, bool dense, bool ys) {
      a.ln1 = cv.take<bf16>(N * H);
      a.ln1_rstd = cv.take<float>(N);
      a.q = cv.take<bf16>(N * nH * D);
      a.q_rstd = cv.take<float>(N * nH);
      a.k = cv.take<bf16>(N * nKV * D);
      a.k_rstd = cv.take<float>(N * nKV);
      a.ln2 = cv.take<bf16>(N * H);
      a.ln2_rstd = cv.take<float>(N);
      a.gu = cv.take<bf16>(std::max(moe && !s.ep ? N * K * 2 * I : 0, dense ? N * 2 * F : 0));
      if (moe && ys && !s.ep) {
        a.ys = cv.take<bf16>(N * K * H);
        a.xs = cv.take<bf16>(N * K * H);
        a.act = cv.take<bf16>(N * K * I);
      }
    };
    LayerActs shared{};
    if (s.memsave) recomputable(shared, M > 0, M < L, false);
    for (int64_t l = 0; l < L; ++l) {
      LayerActs& a = s.la[l];
      if (s.memsave) a = shared;
      else recomputable(a, s.lo[l].moe, !s.lo[l].moe, true);
      // kept per layer in both modes: q/k before their norms and v (the attention backward's
      // recompute is then norms and RoPE, no GEMM), the attention output, x_mid, the routing
      a.q_pre = cv.take<bf16>(N * nH * D);
      a.k_pre = cv.take<bf16>(N * nKV * D);
      a.v = cv.take<bf16>(N * nKV * D);
      a.ao = cv.take<bf16>(N * nH * D);
      a.lse = cv.take<float>(B * nH * T);
      a.x_mid = cv.take<bf16>(N * H);
      if (s.lo[l].moe) {
        a.topk_w = cv.take<float>(N * K);
        if (!s.ep) {
          a.offsets = cv.take<int32_t>(E + 1);
          a.slot_row = cv.take<int32_t>(N * K);
        }
      }
    }
    s.probs_all = cv.take<float>(M * N * E);
    s.topk_all = cv.take<int32_t>(M * N * K);
    s.lnf_out = cv.take<bf16>(N * H);
    s.lnf_rstd = cv.take<float>(N);
    s.dres = cv.take<bf16>(N * H);
    s.losses = cv.take<float>(N);
    s.small = cv.take<float>(std::max<int64_t>(s.max_small, 1));
    // the batch
    const size_t in0 = cv.off;
    s.ids = cv.take<int64_t>(N);
    s.targets = cv.take<int64_t>(N);
    s.pos = cv.take<int32_t>(N);
    s.doc = cv.take<int32_t>(N);
    s.uniq = cv.take<int32_t>(N);
    s.uoff = cv.take<int32_t>(N + 1);
    s.rows = cv.take<int32_t>(N);
    s.seg_table = cv.take<unsigned char>(int64_t(cu::attention_segments_bytes(B, T)));
    for (auto& t : s.seg_half_table)
      t = s.ep && s.halves ? cv.take<unsigned char>(int64_t(cu::attention_segments_bytes(B / 2, T)))
                           : nullptr;
    s.in_bytes = cv.off - in0;
    // temporaries: the forward's and the backward's share one region
    const size_t u0 = cv.off;
    Carver f{base, u0};
    // expert rows in the temporaries: the memory-saving mode recomputes xs and act there (and
    // puts the forward's expert outputs in xs); the default mode keeps them per layer
    const int64_t NKt = s.memsave ? NK : 0;
    s.rlogits = f.take<bf16>(N * E);
    s.xs = f.take<bf16>(NKt * H);
    s.act = f.take<bf16>(std::max(NKt * I, N * F));
    s.tmp = f.take<bf16>(N * H);
    s.logits_c = f.take<bf16>(chunk * V);
    s.lse_c = f.take<float>(chunk);
    s.dlnf = f.take<bf16>(N * H);
    Carver b{base, u0};
    s.dln = b.take<bf16>(N * H);
    s.dao = b.take<bf16>(N * nH * D);
    s.dq = b.take<bf16>(N * nH * D);
    s.dqn = b.take<bf16>(s.fused_qk_bwd ? 0 : N * nH * D);  // the op pairs' rotated gradients
    s.dk = b.take<bf16>(N * nKV * D);
    s.dkn = b.take<bf16>(s.fused_qk_bwd ? 0 : N * nKV * D);
    s.dv = b.take<bf16>(N * nKV * D);
    s.dys = b.take<bf16>(NK * H);
    s.xs_b = b.take<bf16>(NKt * H);
    s.act_b = b.take<bf16>(std::max(NKt * I, N * F));
    const size_t dact_at = b.off;
    s.dact = b.take<bf16>(std::max(NK * I, N * F));
    s.dgu = b.take<bf16>(std::max(NK * 2 * I, N * 2 * F));
    s.drl = b.take<bf16>(N * E);
    s.dtopk_w = b.take<float>(N * K);
    s.dprobs_all = b.take<float>(M * N * E);
    // memory-saving mode: the recomputed expert outputs overlay dact.. (dead until
    // unpermute_bwd has read ys); the forward's go to xs (dead after the gate_up GEMM)
    Carver ov{base, dact_at};
    s.ys_b = ov.take<bf16>(NK * H);
    return std::max({f.off, b.off, ov.off});
  };
  s.acts = cu::DeviceBuffer<unsigned char>();  // free the old arena first
  if (s.ep) {  // one EP block per MoE layer, sized for N tokens (see the file comment)
    s.ep_moe.clear();
    s.ep_scratch.reset();  // free the old ones before sizing the new
    s.ep_arena.reset();
    s.ep_scratch_b.reset();
    s.ep_arena_b.reset();
    AM_CHECK(!s.halves || B % 2 == 0 || (B == 1 && T % 2 == 0),
             "train.ep_halves splits each micro-batch into two halves of its sequences (or one "
             "sequence into its two halves), but this one is B x T = {} x {}; use an even "
             "micro-batch, or one sequence of even length, or turn train.ep_halves off",
             B, T);
    s.split_seq = s.halves && B == 1;
    for (const bool bwd : {false, true}) {
      const std::string why = s.split_seq ? cu::attention_tail_unsupported(bwd, 1, T / 2, T, nH,
                                                                           nKV, D)
                                          : "";
      AM_CHECK(why.empty(),
               "train.ep_halves with one sequence per micro-batch runs the second half's "
               "attention over both halves' keys (attention_tail), which cuDNN cannot run here: "
               "{}. Use a micro-batch of two or more sequences, or turn train.ep_halves off",
               why);
    }
  }
  if (s.ep && s.halves) {  // per half: a scratch with a comm stream, an arena, the blocks
    const dist::EpMoeShape sh{N / 2, H, I, E, K};
    const int P = int(s.groups->ep.size());
    for (int h = 0; h < 2; ++h) {
      auto sc = std::make_shared<dist::EpMoeScratch>(sh, P, 1, dist::EpMode::kCounts,
                                                     s.ep_recompute, 1, true);
      auto ar = std::make_shared<dist::EpSavedArena>(
          dist::ep_arena_bytes(sh, P, M, 1, s.ep_capacity, s.ep_recompute, 1),
          fmt::format("sized for train.ep_capacity {} x the balanced load of {} MoE layers of "
                      "{} tokens (half {} of the micro-batch, train.ep_halves), "
                      "train.ep_recompute {}",
                      s.ep_capacity, M, N / 2, h == 0 ? "A" : "B",
                      dist::ep_recompute_name(s.ep_recompute)));
      for (int64_t l = 0, m = 0; l < L; ++l)
        if (s.lo[l].moe) {
          s.ep_moe.push_back(std::make_unique<dist::EpMoeCuda>(
              h == 0 ? *s.ept : *s.ept_b, sh, dist::EpMode::kCounts, s.ep_recompute, sc, ar,
              fmt::format("MoE layer {} (model layer {}), half {}", m, l, h == 0 ? "A" : "B"), 1));
          s.ep_moe.back()->set_timing(s.timing);
          if (h == 1) s.ep_moe.back()->set_wgrad_after(s.ep_moe[size_t(m)].get());
          ++m;
        }
      (h == 0 ? s.ep_scratch : s.ep_scratch_b) = std::move(sc);
      (h == 0 ? s.ep_arena : s.ep_arena_b) = std::move(ar);
    }
  } else if (s.ep) {
    const dist::EpMoeShape sh{N, H, I, E, K};
    const int P = int(s.groups->ep.size());
    const dist::EpMode mode = s.ep_dispatch;
    const int C = s.ep_chunks;
    s.ep_scratch = std::make_shared<dist::EpMoeScratch>(sh, P, 1, mode, s.ep_recompute, C);
    // counts: the carves are what each layer received (capacity x the balanced load); padded:
    // every carve is the worst case of N tokens, known here, so the arena never overflows
    s.ep_arena = mode == dist::EpMode::kPadded
                     ? std::make_shared<dist::EpSavedArena>(
                           dist::ep_arena_padded_bytes(sh, P, M, 1, s.ep_recompute, C),
                           fmt::format("sized for train.ep_dispatch padded: the worst case of {} "
                                       "MoE layers of {} tokens, train.ep_recompute {}",
                                       M, N, dist::ep_recompute_name(s.ep_recompute)))
                     : std::make_shared<dist::EpSavedArena>(
                           dist::ep_arena_bytes(sh, P, M, 1, s.ep_capacity, s.ep_recompute, C),
                           fmt::format("sized for train.ep_capacity {} x the balanced load of {} "
                                       "MoE layers of {} tokens, train.ep_recompute {}",
                                       s.ep_capacity, M, N,
                                       dist::ep_recompute_name(s.ep_recompute)));
    for (int64_t l = 0, m = 0; l < L; ++l)
      if (s.lo[l].moe) {
        s.ep_moe.push_back(std::make_unique<dist::EpMoeCuda>(
            *s.ept, sh, mode, s.ep_recompute, s.ep_scratch, s.ep_arena,
            fmt::format("MoE layer {} (model layer {})", m, l), C));
        s.ep_moe.back()->set_timing(s.timing);
        ++m;
      }
  }
  const size_t bytes = carve(0);
  s.acts = cu::DeviceBuffer<unsigned char>(bytes);
  const size_t in_off_check = carve(reinterpret_cast<uintptr_t>(s.acts.get()));
  AM_CHECK(in_off_check == bytes, "internal: activation plan changed between passes");

  // pinned staging of the batch: the same byte layout as the device copy from `ids` on
  if (s.in_host) cudaFreeHost(s.in_host);
  if (s.loss_host) cudaFreeHost(s.loss_host);
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.in_host), s.in_bytes));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.loss_host), size_t(N + 1) * sizeof(float)));
  s.upload_pending = false;

  // one workspace for the largest need of the ops at this shape
  size_t ws = cu::linear_workspace_bytes();
  for (int64_t o : {H, nH * D, nKV * D, E, 2 * F, 2 * I, V})
    ws = std::max(ws, cu::linear_bwd_workspace_bytes(N, o));
  ws = std::max(ws, cu::rmsnorm_bwd_workspace_bytes(N, H));
  ws = std::max(ws, cu::rmsnorm_bwd_workspace_bytes(N * nH, D));
  ws = std::max(ws, cu::rmsnorm_bwd_workspace_bytes(N * nKV, D));
  if (s.fused_qk_bwd)
    for (int64_t h : {nH, nKV}) ws = std::max(ws, cu::qk_norm_rope_bwd_workspace_bytes(N, h, D));
  // packed batches (document ids): cuDNN's packed graphs (every bucket up to attention.cu's
  // workspace cap) and their Stats scratch, or the fallback kernel
  s.planned_packed = packed;
  ws = std::max(ws, cu::attention_fwd_workspace_bytes(B, T, nH, nKV, D, packed));
  ws = std::max(ws, cu::attention_bwd_workspace_bytes(B, T, nH, nKV, D, packed));
  if (s.split_seq)  // the second half's attention over both halves' keys
    for (const bool bwd : {false, true})
      ws = std::max(ws, cu::attention_tail_workspace_bytes(bwd, 1, T / 2, T, nH, nKV, D));
  if (M > 0) ws = std::max(ws, cu::aux_loss_workspace_bytes(M * N, E));
  if (M > 0) ws = std::max(ws, cu::grouped_linear_workspace_bytes(E));
  if (M > 0) ws = std::max(ws, cu::moe_layout_workspace_bytes(N, K, E));
  if (s.ep)
    ws = std::max(ws, dist::EpMoeCuda::workspace_bytes({N, H, I, E, K}, s.groups->ep.size()));
  ws = std::max(ws, cu::sum_squares_workspace_bytes());
  if (ws > s.ws.bytes()) {
    s.ws = cu::DeviceBuffer<unsigned char>();
    s.ws = cu::DeviceBuffer<unsigned char>(ws);
  }
  s.ctx.workspace = s.ws.get();
  s.ctx.workspace_bytes = s.ws.bytes();
  s.B = B;
  s.T = T;
  s.N = N;
  s.chunk = chunk;
  s.have_grad_forward = false;
}

CudaMemory Qwen3MoeCuda::memory() const {
  const State& s = *s_;
  CudaMemory m;
  m.params = s.p16.bytes() + s.pshard.bytes() + s.pwin.bytes();
  m.master = s.p32.bytes();
  m.grads = s.g16.bytes() + s.g32.bytes() + s.gsc.bytes() + s.gsc_small.bytes() +
            s.gsc_tied.bytes() + s.gsc_down.bytes();
  if (s.zero) m.grads += s.zero->device_bytes();  // ZeRO-1's NCCL bucket
  if (s.z3) m.grads += s.gshard.bytes() + s.gwin.bytes() + s.z3->device_bytes();  // + its round
  m.moments = s.m16.bytes() + s.v16.bytes() + s.m32.bytes() + s.v32.bytes();
  m.activations = s.acts.bytes();
  for (auto& e : s.ep_moe) m.activations += e->device_bytes();  // EP buffers count as activations
  for (const auto& sc : {s.ep_scratch, s.ep_scratch_b})
    if (sc) m.activations += sc->bytes();
  for (const auto& ar : {s.ep_arena, s.ep_arena_b})
    if (ar) m.activations += ar->bytes();
  m.workspace = s.ws.bytes();
  return m;
}

void Qwen3MoeCuda::zero_grad() {
  State& s = *s_;
  s.fresh = true;
  // a sum still in flight (a caller that skipped optimizer_step) ends before the next writes
  if (s.reducer) s.reducer->join(s.ctx.stream);
  s.summed = State::Summed::kNone;
  if (!s.bf16_mode()) CUDA_CHECK(cudaMemsetAsync(s.g32.get(), 0, s.g32.bytes(), s.ctx.stream));
}

void Qwen3MoeCuda::set_reduce_in_backward(bool last) { s_->reduce_in_bwd = last; }

void Qwen3MoeCuda::set_previous_grad_norm(float norm) {
  State& s = *s_;
  if (!s.memsave) return;
  AM_CHECK(std::isfinite(norm) && norm >= 0.f, "set_previous_grad_norm: bad norm {}", norm);
  // squared in double: exact for a float, so clip_coef's sqrt gives `norm` back bit for bit
  const double sumsq = double(norm) * double(norm);
  synchronize();
  CUDA_CHECK(cudaMemcpy(s.d_sumsq, &sumsq, sizeof(double), cudaMemcpyHostToDevice));
}

void Qwen3MoeCuda::begin_step(const AdamWConfig& c, float lr, float max_grad_norm) {
  State& s = *s_;
  if (!s.memsave) return;
  AM_CHECK(!s.step_begun, "begin_step() twice without a forward() and backward() between");
  s.ac = c;
  s.lr = lr;
  s.max_norm = max_grad_norm;
  ++s.adam_t;
  // the clip coefficient from the previous step's norm (d_sumsq: 0 before the first step)
  cu::clip_coef(s.d_coef, s.d_norm, s.d_sumsq, max_grad_norm, s.ctx);
  CUDA_CHECK(cudaMemsetAsync(s.slots.get(), 0, s.slots.bytes(), s.ctx.stream));
  std::fill(s.applied.begin(), s.applied.end(), char(0));
  s.step_begun = true;
  s.step_applied = false;
}

// ---- forward -----------------------------------------------------------------------------------

void Qwen3MoeCuda::forward(const Batch& bt, float ce_denominator, float aux_scale, bool grad,
                           std::vector<float>* logits) {
  State& s = *s_;
  const auto& c = s.cfg;
  const int64_t B = bt.B, T = bt.T, N = B * T, H = c.hidden_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                K = c.num_experts_per_tok, I = c.moe_intermediate_size, F = c.intermediate_size,
                V = c.vocab_size, L = c.num_hidden_layers;
  AM_CHECK(int64_t(bt.ids.size()) == N, "batch has {} ids, expected B*T = {}", bt.ids.size(), N);
  AM_CHECK(bt.labels.empty() || int64_t(bt.labels.size()) == N, "batch labels must be [B,T]");
  AM_CHECK(bt.pos.empty() || int64_t(bt.pos.size()) == N, "batch positions must be [B,T]");
  AM_CHECK(bt.doc.empty() || int64_t(bt.doc.size()) == N, "batch document ids must be [B,T]");
  for (int64_t i = 0; i < N; ++i)
    AM_CHECK(bt.ids[i] >= 0 && bt.ids[i] < V,
             "input id {} at row {}, position {} is outside the vocabulary [0, {}); check the "
             "tokenizer matches the model",
             bt.ids[i], i / T, i % T, V);
  if (s.ep && s.ep_dispatch == dist::EpMode::kPadded) {
    // Padded receive regions are N rows per peer: every rank of the EP group must bring the same
    // N, or rows would land past a region. One host all-reduce (no device wait); every rank sees
    // the same extremes, so all of them stop together.
    int64_t ext[2] = {N, -N};
    s.groups->ep.allreduce_max(ext, 2);
    AM_CHECK(ext[0] == -ext[1],
             "train.ep_dispatch padded needs the same tokens per micro-batch on every rank of the "
             "expert-parallel group (its receive regions hold N rows per peer), but they range "
             "from {} to {} (this rank: {} = {} x {}); give every rank the same micro-batch shape "
             "or use train.ep_dispatch counts",
             -ext[1], ext[0], N, B, T);
  }
  plan(B, T, !bt.doc.empty());
  const cu::Ctx& ctx = s.ctx;

  // ---- the batch: host staging (pinned), one copy to the device
  if (s.upload_pending) s.host_wait(s.upload_done, "the previous batch's upload");  // staging is free again
  Carver hv{reinterpret_cast<uintptr_t>(s.in_host), 0};
  int64_t* h_ids = hv.take<int64_t>(N);
  int64_t* h_tg = hv.take<int64_t>(N);
  int32_t* h_pos = hv.take<int32_t>(N);
  int32_t* h_doc = hv.take<int32_t>(N);
  int32_t* h_uniq = hv.take<int32_t>(N);
  int32_t* h_uoff = hv.take<int32_t>(N + 1);
  int32_t* h_rows = hv.take<int32_t>(N);
  unsigned char* h_seg = hv.take<unsigned char>(int64_t(cu::attention_segments_bytes(B, T)));
  const bool halves = s.ep && s.halves;
  unsigned char* h_seg_half[2] = {};
  for (auto& t : h_seg_half)
    t = halves ? hv.take<unsigned char>(int64_t(cu::attention_segments_bytes(B / 2, T))) : nullptr;
  int64_t labelled = 0;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = r * T + t;
      const int64_t y = (t + 1 < T && !bt.labels.empty()) ? bt.labels[i + 1] : -100;
      AM_CHECK(y == -100 || (y >= 0 && y < V),
               "label {} at row {}, position {} is outside the vocabulary [0, {})", y, r, t + 1, V);
      h_ids[i] = bt.ids[i];
      h_tg[i] = y;
      labelled += y != -100;
      h_pos[i] = bt.pos.empty() ? int32_t(t) : bt.pos[i];
      h_doc[i] = bt.doc.empty() ? 0 : bt.doc[i];
    }
  // rows grouped by id for the deterministic embedding backward
  {
    std::vector<std::pair<int64_t, int32_t>> by_id(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) by_id[i] = {bt.ids[i], int32_t(i)};
    std::sort(by_id.begin(), by_id.end());
    int64_t u = 0;
    for (int64_t j = 0; j < N; ++j) {
      if (j == 0 || by_id[j].first != by_id[j - 1].first) {
        h_uniq[u] = int32_t(by_id[j].first);
        h_uoff[u++] = int32_t(j);
      }
      h_rows[j] = by_id[j].second;
    }
    h_uoff[u] = int32_t(N);
    s.n_uniq = u;
  }
  s.has_doc = !bt.doc.empty();
  // the documents as (row, document) sequences for cuDNN's packed attention; uploaded below
  s.seg.table = s.seg_table;
  s.seg.count = s.has_doc && !halves
                    ? cu::attention_segments_build(h_seg, bt.doc.data(), B, T, nH, nKV, D)
                    : 0;
  AM_CHECK(!(halves && s.split_seq && s.has_doc),
           "train.ep_halves with one sequence per micro-batch does not take document ids (packed "
           "sequences): the second half's attention over the first half's keys has no document "
           "mask. Use a micro-batch of two or more rows, or turn train.ep_halves off");
  for (int h = 0; h < 2 && halves && !s.split_seq; ++h) {  // a table for each half's rows
    s.seg_half[h].table = s.seg_half_table[h];
    s.seg_half[h].count = s.has_doc ? cu::attention_segments_build(h_seg_half[h],
                                                                   bt.doc.data() + h * (N / 2),
                                                                   B / 2, T, nH, nKV, D)
                                    : 0;
  }
  CUDA_CHECK(cudaMemcpyAsync(s.ids, s.in_host, s.in_bytes, cudaMemcpyHostToDevice, ctx.stream));
  CUDA_CHECK(cudaEventRecord(s.upload_done, ctx.stream));
  s.upload_pending = true;
  const int32_t* doc = s.has_doc ? s.doc : nullptr;
  const cu::AttentionSegments* seg = s.has_doc ? &s.seg : nullptr;

  if (grad) {
    if (s.memsave) {
      AM_CHECK(s.step_begun, "memory-saving mode: call begin_step(adamw, lr, max_grad_norm) "
               "before each forward(grad = true): its backward applies AdamW");
      AM_CHECK(s.fresh, "memory-saving mode: AdamW runs inside the backward, so gradients "
               "cannot accumulate over micro-batches; set train.grad_accum to 1 or turn "
               "train.memory_saving off");
    }
    if (s.overlap_ok) {  // a summed gradient is final: only the step's last micro-batch sums
      AM_CHECK(s.summed == State::Summed::kNone,
               "forward(grad = true) after a micro-batch whose backward summed the gradients "
               "over the ranks (set_reduce_in_backward(true)): mark only the step's last "
               "micro-batch, and call zero_grad() before the next step");
      s.overlap = s.reduce_in_bwd;
    }
    s.beta = s.fresh ? 0.f : 1.f;
    if (s.z3) {  // ZeRO-3: each block's gradients start afresh in the window; the shard sums
      s.z3_assign = s.fresh;
      s.beta = 0.f;
    }
    s.fresh = false;
  }
  const float eps = float(c.rms_norm_eps), theta = float(c.rope_theta);
  s.record(0);
  // the EP arena: every layer carves its saved state in order below; last step's is released
  if (s.ep) s.ep_arena->reset();
  if (s.ep_arena_b) s.ep_arena_b->reset();
  if (s.z3) {  // ZeRO-3: each block's weights gathered before it runs (State::z3_prefetch);
    s.z3_need(0, 1);  // layer 0's block kept if the last backward left it
    s.z3_fetch(1, 0);
  }
  cu::embedding_fwd(s.res[0], s.ids, s.W(s.off_wte), N, H, ctx);
  if (halves) s.forward_halves(eps, theta);
  for (int64_t l = 0; l < L && !halves; ++l) {
    LayerActs& a = s.la[l];
    const LayerOff& o = s.lo[l];
    const bf16* x_in = s.res[l];
    bf16* x_out = s.res[l + 1];
    auto Wn = [&](int64_t off) { return off < 0 ? nullptr : s.W(off); };
    if (s.z3) {  // this layer's block; the next one's (its ln1 or ln_f ends this layer)
      s.z3_need(l + 1, l + 2);
      s.z3_fetch(l + 2, l + 1);  // prefetch: gathered while this layer computes
    }
    s.lrecord(l, 0);
    // attention block (fused: ln1 came with the previous layer's residual add)
    s.qkv_fwd(a, o, x_in, N, !(s.fused_norm && l > 0), eps, theta);
    cu::attention_fwd(a.ao, a.lse, a.q, a.k, a.v, doc, seg, B, T, nH, nKV, D, ctx);
    cu::linear_fwd(s.tmp, a.ao, s.W(o.wo), Wn(o.bo), N, nH * D, H, ctx);
    if (cu::trace_on()) cu::trace_mark(ctx.stream, fmt::format("layer {}", l), "attention");
    if (s.fused_norm) {
      cu::add_rmsnorm_fwd(a.x_mid, a.ln2, a.ln2_rstd, x_in, s.tmp, s.W(o.ln2), N, H, eps, ctx);
      s.lrecord(l, 1);
    } else {
      cu::add(a.x_mid, x_in, s.tmp, N * H, ctx);
      s.lrecord(l, 1);
      cu::rmsnorm_fwd(a.ln2, a.ln2_rstd, a.x_mid, s.W(o.ln2), N, H, eps, ctx);
    }
    // MLP block
    if (o.moe && s.ep) {  // the expert block over the EP group: layout, dispatch, experts, combine
      float* probs = s.probs_all + o.moe_index * N * E;
      int32_t* idx = s.topk_all + o.moe_index * N * K;
      // the broadcast layout's rows go to the peers beside the router (a no-op without it)
      s.ep_moe[size_t(o.moe_index)]->rows_ahead(a.ln2, N, ctx);
      cu::linear_fwd(s.rlogits, a.ln2, s.W(o.router), nullptr, N, H, E, ctx);
      cu::router_fwd(probs, idx, a.topk_w, s.rlogits, N, E, K, c.norm_topk_prob, ctx);
      s.ep_moe[size_t(o.moe_index)]->fwd(s.tmp, a.ln2, idx, a.topk_w, s.W(o.ex_gu),
                                         s.W(o.ex_down), N, ctx);
    } else if (o.moe) {
      float* probs = s.probs_all + o.moe_index * N * E;
      int32_t* idx = s.topk_all + o.moe_index * N * K;
      cu::linear_fwd(s.rlogits, a.ln2, s.W(o.router), nullptr, N, H, E, ctx);
      cu::router_fwd(probs, idx, a.topk_w, s.rlogits, N, E, K, c.norm_topk_prob, ctx);
      cu::moe_layout(a.offsets, a.slot_row, idx, N, E, K, ctx);
      bf16* xs = s.memsave ? s.xs : a.xs;  // memory-saving: not kept (see plan())
      bf16* act = s.memsave ? s.act : a.act;
      cu::permute_fwd(xs, a.ln2, a.slot_row, N, K, H, ctx);
      cu::grouped_linear_fwd(a.gu, xs, s.W(o.ex_gu), a.offsets, N * K, E, H, 2 * I, ctx);
      cu::swiglu_fwd(act, a.gu, N * K, I, ctx);
      bf16* ys = s.memsave ? s.xs : a.ys;  // xs is dead after the gate_up GEMM
      cu::grouped_linear_fwd(ys, act, s.W(o.ex_down), a.offsets, N * K, E, I, H, ctx);
      cu::unpermute_fwd(s.tmp, ys, a.topk_w, a.slot_row, N, K, H, ctx);
    } else {
      cu::linear_fwd(a.gu, a.ln2, s.W(o.mlp_gu), nullptr, N, H, 2 * F, ctx);
      cu::swiglu_fwd(s.act, a.gu, N, F, ctx);
      cu::linear_fwd(s.tmp, s.act, s.W(o.mlp_down), nullptr, N, F, H, ctx);
    }
    if (s.z3) s.z3_need(l + 2, l + 1);  // the next block, read from here on
    if (s.fused_norm && l + 1 < L)  // the residual add with the next layer's ln1
      cu::add_rmsnorm_fwd(x_out, s.la[l + 1].ln1, s.la[l + 1].ln1_rstd, a.x_mid, s.tmp,
                          s.W(s.lo[l + 1].ln1), N, H, eps, ctx);
    else if (s.fused_norm)  // ... or with ln_f
      cu::add_rmsnorm_fwd(x_out, s.lnf_out, s.lnf_rstd, a.x_mid, s.tmp, s.W(s.off_lnf), N, H, eps,
                          ctx);
    else
      cu::add(x_out, a.x_mid, s.tmp, N * H, ctx);
    s.lrecord(l, 2);
  }
  s.record(1);
  if (s.z3) s.z3_need(L + 1, L);  // the head's block (ln_f, lm_head); its gradients, below
  if (grad && s.z3) s.z3_grads(L + 1);
  if (!(s.fused_norm && L > 0))
    cu::rmsnorm_fwd(s.lnf_out, s.lnf_rstd, s.res[L], s.W(s.off_lnf), N, H, eps, ctx);

  // ---- lm_head + cross-entropy in chunks of rows (and their backward when training)
  s.labelled = labelled;
  if (s.dist && ce_denominator <= 0) {  // the mean over the GLOBAL batch's labelled tokens
    int64_t all = labelled;
    s.groups->world.allreduce_sum(&all, 1);
    ce_denominator = float(all);
  }
  s.denom = ce_denominator > 0 ? ce_denominator : float(labelled);
  const float ce_scale = s.denom > 0 ? 1.0f / s.denom : 0.f;
  if (logits) logits->resize(size_t(N * V));
  std::vector<uint16_t> host_chunk;
  for (int64_t r0 = 0; r0 < N; r0 += s.chunk) {
    const int64_t rows = std::min(s.chunk, N - r0);
    const bf16* xr = s.lnf_out + r0 * H;
    cu::linear_fwd(s.logits_c, xr, s.W(s.off_lm), nullptr, rows, H, V, ctx);
    // training without a host copy of the logits: the loss and its gradient in one kernel
    const bool fused_ce = grad && !logits;
    if (fused_ce)
      cu::cross_entropy_fwd_bwd(s.losses + r0, s.lse_c, s.logits_c, s.logits_c, s.targets + r0,
                                ce_scale, rows, V, ctx);
    else
      cu::cross_entropy_fwd(s.losses + r0, s.lse_c, s.logits_c, s.targets + r0, rows, V, ctx);
    if (logits) {  // `automoe forward`: this chunk's logits to the host (synchronous)
      host_chunk.resize(size_t(rows * V));
      CUDA_CHECK(cudaMemcpyAsync(host_chunk.data(), s.logits_c, size_t(rows * V) * 2,
                                 cudaMemcpyDeviceToHost, ctx.stream));
      CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
      float* dst = logits->data() + r0 * V;
      for (int64_t i = 0; i < rows * V; ++i) dst[i] = from_bf16_bits(host_chunk[i]);
    }
    if (grad) {
      if (!fused_ce)
        cu::cross_entropy_bwd(s.logits_c, s.logits_c, s.lse_c, s.targets + r0, ce_scale, rows, V,
                              ctx);
      // lm_head's gradient is complete after the last chunk (tied: after the embedding's)
      s.lin_bwd(s.dlnf + r0 * H, 0.f, s.off_lm, -1, s.logits_c, xr, rows, H, V,
                r0 == 0 ? s.beta : 1.f, !s.tied && r0 + rows >= N);
    }
  }
  if (grad) s.norm_bwd(s.dres, 0.f, s.off_lnf, s.dlnf, s.res[L], s.lnf_rstd, N, H);
  if (grad && s.z3) s.z3_reduce(L + 1);  // ln_f's and lm_head's gradients to their shards
  if (grad && s.overlap) {  // ln_f's and (untied) lm_head's gradients are complete
    s.reduce_async(s.k_head0, s.k_head1);
    s.summed = State::Summed::kHead;
  }

  // ---- aux loss over every MoE layer's router outputs
  s.has_aux = c.output_router_logits && c.num_moe_layers() > 0;
  s.aux_grad = 0.f;
  if (s.has_aux && s.dist) {  // f and P of the global batch: statistics summed over the world
    cu::aux_loss_stats(s.auxstats.get(), s.probs_all, s.topk_all, c.num_moe_layers() * N, E, K,
                       ctx);
    s.reducer->allreduce_small(s.auxstats.get(), 2 * E + 1, s.groups->world, ctx.stream);
    cu::aux_loss_fwd_global(s.d_aux, s.auxstats.get(), E, ctx);
    s.aux_grad = float(c.router_aux_loss_coef) * aux_scale;
  } else if (s.has_aux) {
    cu::aux_loss_fwd(s.d_aux, s.probs_all, s.topk_all, c.num_moe_layers() * N, E, K, ctx);
    s.aux_grad = float(c.router_aux_loss_coef) * aux_scale;
  }
  CUDA_CHECK(cudaMemcpyAsync(s.loss_host, s.losses, size_t(N) * sizeof(float),
                             cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaMemcpyAsync(s.loss_host + N, s.d_aux, sizeof(float), cudaMemcpyDeviceToHost,
                             ctx.stream));
  CUDA_CHECK(cudaEventRecord(s.loss_ready, ctx.stream));
  s.record(2);
  s.have_grad_forward = grad;
}

// The layers' forward as two halves of the micro-batch's sequences (train.ep_halves), each a
// software pipeline over the layers so that every all-to-all has the other half's compute
// beside it on the GPU:
//   layer l:  [finish A(l-1)] attention A, begin A  [finish B(l-1)] attention B, begin B
//             end A (experts A; combine A beside experts B), end B (combine B beside the next
//             layer's finish A and attention A)
// begin = router + fwd_begin (layout, counts' mail, push on half A's or B's comm stream);
// end = fwd_end (the host waits for that half's mail, then copy-out, experts, combine);
// finish = fwd_finish (the sum of the returned rows) + the residual add (with the next norm).
// Every op of a half works on the half's rows of the whole batch's buffers.
void Qwen3MoeCuda::State::forward_halves(float eps, float theta) {
  const auto& c = cfg;
  const int64_t H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads,
                D = c.head_dim, E = c.num_experts, K = c.num_experts_per_tok,
                F = c.intermediate_size, L = c.num_hidden_layers;
  const int64_t N2 = N / 2, B2 = B / 2, nm = nmoe();
  int32_t* const pos0 = pos;
  auto Wn = [&](int64_t off) { return off < 0 ? nullptr : W(off); };
  auto block = [&](int64_t l, int h) -> dist::EpMoeCuda& {
    return *ep_moe[size_t(h * nm + lo[size_t(l)].moe_index)];
  };
  auto attention_begin = [&](int64_t l, int h) {
    const int64_t r0 = h * N2;
    LayerActs a = half_of(la[size_t(l)], r0);
    const LayerOff& o = lo[size_t(l)];
    const bf16* x_in = res[size_t(l)] + r0 * H;
    bf16* t = tmp + r0 * H;
    pos = pos0 + r0;
    qkv_fwd(a, o, x_in, N2, !(fused_norm && l > 0), eps, theta);
    pos = pos0;
    if (!split_seq)
      cu::attention_fwd(a.ao, a.lse, a.q, a.k, a.v, has_doc ? doc + r0 : nullptr,
                        has_doc ? &seg_half[h] : nullptr, B2, T, nH, nKV, D, ctx);
    else if (h == 0)  // the sequence's first half: causal over its own keys
      cu::attention_fwd(a.ao, a.lse, a.q, a.k, a.v, nullptr, nullptr, 1, T / 2, nH, nKV, D, ctx);
    else  // its second half over all the sequence's keys (the first half's came before)
      cu::attention_tail_fwd(a.ao, a.lse, a.q, la[size_t(l)].k, la[size_t(l)].v, 1, T / 2, T, nH,
                             nKV, D, ctx);
    cu::linear_fwd(t, a.ao, W(o.wo), Wn(o.bo), N2, nH * D, H, ctx);
    if (cu::trace_on())
      cu::trace_mark(ctx.stream, fmt::format("layer {} half {}", l, h), "attention");
    if (fused_norm) {
      cu::add_rmsnorm_fwd(a.x_mid, a.ln2, a.ln2_rstd, x_in, t, W(o.ln2), N2, H, eps, ctx);
    } else {
      cu::add(a.x_mid, x_in, t, N2 * H, ctx);
      cu::rmsnorm_fwd(a.ln2, a.ln2_rstd, a.x_mid, W(o.ln2), N2, H, eps, ctx);
    }
    if (o.moe) {
      float* probs = probs_all + o.moe_index * N * E + r0 * E;
      int32_t* idx = topk_all + o.moe_index * N * K + r0 * K;
      cu::linear_fwd(rlogits + r0 * E, a.ln2, W(o.router), nullptr, N2, H, E, ctx);
      cu::router_fwd(probs, idx, a.topk_w, rlogits + r0 * E, N2, E, K, c.norm_topk_prob, ctx);
      block(l, h).fwd_begin({t, a.ln2, idx, a.topk_w, W(o.ex_gu), W(o.ex_down)}, N2, ctx);
    } else {  // a dense MLP: the whole block here
      cu::linear_fwd(a.gu, a.ln2, W(o.mlp_gu), nullptr, N2, H, 2 * F, ctx);
      cu::swiglu_fwd(act, a.gu, N2, F, ctx);
      cu::linear_fwd(t, act, W(o.mlp_down), nullptr, N2, F, H, ctx);
    }
  };
  auto finish = [&](int64_t l, int h) {
    const int64_t r0 = h * N2;
    if (lo[size_t(l)].moe) block(l, h).fwd_finish(ctx);
    const bf16* x_mid = la[size_t(l)].x_mid + r0 * H;
    const bf16* t = tmp + r0 * H;
    bf16* x_out = res[size_t(l + 1)] + r0 * H;
    if (fused_norm && l + 1 < L)  // the residual add with the next layer's ln1
      cu::add_rmsnorm_fwd(x_out, la[size_t(l + 1)].ln1 + r0 * H, la[size_t(l + 1)].ln1_rstd + r0,
                          x_mid, t, W(lo[size_t(l + 1)].ln1), N2, H, eps, ctx);
    else if (fused_norm)  // ... or with ln_f
      cu::add_rmsnorm_fwd(x_out, lnf_out + r0 * H, lnf_rstd + r0, x_mid, t, W(off_lnf), N2, H,
                          eps, ctx);
    else
      cu::add(x_out, x_mid, t, N2 * H, ctx);
  };
  for (int64_t l = 0; l < L; ++l) {
    lrecord(l, 0);
    for (int h = 0; h < 2; ++h) {
      if (l > 0) finish(l - 1, h);
      attention_begin(l, h);
    }
    lrecord(l, 1);
    if (lo[size_t(l)].moe)
      for (int h = 0; h < 2; ++h) block(l, h).fwd_end(ctx);
    lrecord(l, 2);
  }
  for (int h = 0; h < 2; ++h) finish(L - 1, h);
}

// The layers' backward as two halves (train.ep_halves), pipelined as the forward:
//   layer l:  end A (experts' backward A; combine A beside B's), end B
//             core A (finish A: the dx sums; router, ln2, o-proj, attention), tail A (q/k norms,
//             RoPE, q/k/v projections, ln1), begin A(l-1); core B, tail B, begin B(l-1)
//   (the sequence split: core A, core B, then tail A, begin A(l-1), tail B, begin B(l-1))
// begin = bwd_begin (the d(out) rows pushed on that half's comm stream). Half B's weight
// gradients add to half A's (beta 1; the EP blocks' side streams in that order too).
void Qwen3MoeCuda::State::backward_halves() {
  const auto& c = cfg;
  const int64_t H = c.hidden_size, nH = c.num_attention_heads, nKV = c.num_key_value_heads,
                D = c.head_dim, K = c.num_experts_per_tok, L = c.num_hidden_layers;
  const int64_t N2 = N / 2, B2 = B / 2, nm = nmoe();
  const float theta = float(c.rope_theta), beta0 = beta;
  int32_t* const pos0 = pos;
  auto block = [&](int64_t l, int h) -> dist::EpMoeCuda& {
    return *ep_moe[size_t(h * nm + lo[size_t(l)].moe_index)];
  };
  auto begin = [&](int64_t l, int h) {
    const LayerOff& o = lo[size_t(l)];
    if (!o.moe) return;
    const int64_t r0 = h * N2;
    block(l, h).bwd_begin({dln + r0 * H, dtopk_w + r0 * K, g16_at(o.ex_gu), g16_at(o.ex_down),
                           dres + r0 * H, W(o.ex_gu), W(o.ex_down)},
                          h == 0 ? beta0 : 1.f, ctx);
  };
  // A half's backward in two parts: `core` (the MoE block's sums, router, ln2, o-proj and the
  // attention itself) and `tail` (q/k norms and RoPE, the q/k/v projections, ln1). With the
  // sequence split, half B's attention adds to half A's dk and dv, so both cores run before
  // either tail.
  auto set_half = [&](int h) {
    beta = h == 0 ? beta0 : 1.f;  // half B's weight gradients add to half A's
    pos = pos0 + h * N2;
  };
  auto core = [&](int64_t l, int h) {
    const int64_t r0 = h * N2;
    LayerActs a = half_of(la[size_t(l)], r0);
    const LayerOff& o = lo[size_t(l)];
    bf16 *dl = dln + r0 * H, *dr = dres + r0 * H, *dq_h = dq + r0 * nH * D,
         *dk_h = dk + r0 * nKV * D, *dv_h = dv + r0 * nKV * D, *dao_h = dao + r0 * nH * D;
    set_half(h);
    // ---- MLP block
    if (o.moe) {
      block(l, h).bwd_finish(ctx);
      router_bwd_rows(a, o, r0, N2);
    } else {
      dense_mlp_bwd(a, o, r0, N2);
    }
    norm_bwd(dr, 1.f, o.ln2, dl, a.x_mid, a.ln2_rstd, N2, H);  // dres += ln2's dx
    // ---- attention block
    lin_bwd(dao_h, 0.f, o.wo, o.bo, dr, a.ao, N2, nH * D, H, beta);
    if (!split_seq) {
      cu::attention_bwd(dq_h, dk_h, dv_h, dao_h, a.ao, a.lse, a.q, a.k, a.v,
                        has_doc ? doc + r0 : nullptr, has_doc ? &seg_half[h] : nullptr, B2, T, nH,
                        nKV, D, ctx);
    } else if (h == 0) {  // dk, dv of the first half's keys: =, before half B adds to them
      cu::attention_bwd(dq_h, dk_h, dv_h, dao_h, a.ao, a.lse, a.q, a.k, a.v, nullptr, nullptr, 1,
                        T / 2, nH, nKV, D, ctx);
    } else {  // the second half adds to every key's dk, dv: its own start at zero
      CUDA_CHECK(cudaMemsetAsync(dk_h, 0, size_t(N2 * nKV * D) * sizeof(bf16), ctx.stream));
      CUDA_CHECK(cudaMemsetAsync(dv_h, 0, size_t(N2 * nKV * D) * sizeof(bf16), ctx.stream));
      cu::attention_tail_bwd(dq_h, dk, dv, dao_h, a.ao, a.lse, a.q, la[size_t(l)].k,
                             la[size_t(l)].v, 1, T / 2, T, nH, nKV, D, ctx);
    }
    beta = beta0;
    pos = pos0;
  };
  auto tail = [&](int64_t l, int h) {
    const int64_t r0 = h * N2;
    set_half(h);
    qkv_bwd(half_of(la[size_t(l)], r0), lo[size_t(l)], res[size_t(l)] + r0 * H, r0, N2, theta);
    if (cu::trace_on())
      cu::trace_mark(ctx.stream, fmt::format("layer {} half {}", l, h), "bwd router and attention");
    beta = beta0;
    pos = pos0;
  };
  for (int64_t l = L - 1; l >= 0; --l) {
    lrecord(l, 3);
    if (l == L - 1)
      for (int h = 0; h < 2; ++h) begin(l, h);
    if (lo[size_t(l)].moe)
      for (int h = 0; h < 2; ++h) block(l, h).bwd_end(ctx);
    lrecord(l, 4);
    if (split_seq) {
      core(l, 0);
      core(l, 1);
    }
    for (int h = 0; h < 2; ++h) {
      if (!split_seq) core(l, h);
      tail(l, h);
      if (l > 0) begin(l - 1, h);
    }
    lrecord(l, 5);
    if (overlap) {  // the layer's expert gradients too: both halves' side streams first
      if (lo[size_t(l)].moe)
        for (int h = 0; h < 2; ++h) block(l, h).join(ctx.stream);
      reduce_async(layer_k[size_t(l)].first, layer_k[size_t(l)].second);
    }
  }
}

LossParts Qwen3MoeCuda::loss() {
  State& s = *s_;
  AM_CHECK(s.loss_host && s.N > 0, "loss() needs a forward() first");
  s.host_wait(s.loss_ready, "the loss readback");
  double sum = 0.0;
  for (int64_t i = 0; i < s.N; ++i) sum += s.loss_host[i];
  LossParts out;
  out.labelled = s.labelled;
  if (s.dist) {  // the global batch: CE summed and labelled tokens counted over every rank
    double both[2] = {sum, double(s.labelled)};
    s.groups->world.allreduce_sum(both, 2);
    sum = both[0];
    out.labelled = int64_t(both[1]);
  }
  // HF: mean over labelled tokens; with no labelled token the mean is NaN there, 0 here.
  out.ce = s.denom > 0 ? float(sum / s.denom) : 0.f;
  out.loss = out.ce;
  if (s.has_aux) {
    out.has_aux = true;
    out.aux = s.loss_host[s.N];
    out.loss += s.aux_grad * out.aux;  // coef * aux_scale * aux, as the CPU model
  }
  return out;
}

// ---- backward ----------------------------------------------------------------------------------

void Qwen3MoeCuda::backward() {
  State& s = *s_;
  AM_CHECK(s.have_grad_forward, "backward() needs a forward(grad = true) first");
  const auto& c = s.cfg;
  const cu::Ctx& ctx = s.ctx;
  const int64_t B = s.B, T = s.T, N = s.N, H = c.hidden_size, nH = c.num_attention_heads,
                nKV = c.num_key_value_heads, D = c.head_dim, E = c.num_experts,
                K = c.num_experts_per_tok, I = c.moe_intermediate_size, F = c.intermediate_size,
                L = c.num_hidden_layers;
  const float theta = float(c.rope_theta), eps = float(c.rms_norm_eps);
  const int32_t* doc = s.has_doc ? s.doc : nullptr;
  const cu::AttentionSegments* seg = s.has_doc ? &s.seg : nullptr;
  const float beta = s.beta;
  // aux loss: d(coef*aux)/dprobs for all MoE layers at once
  if (s.aux_grad != 0.f && s.dist)
    cu::aux_loss_bwd_global(s.dprobs_all, s.aux_grad, s.auxstats.get(), c.num_moe_layers() * N, E,
                            ctx);
  else if (s.aux_grad != 0.f)
    cu::aux_loss_bwd(s.dprobs_all, s.aux_grad, s.topk_all, c.num_moe_layers() * N, E, K, ctx);
  if (s.ep && s.halves) s.backward_halves();
  for (int64_t l = L - 1; l >= 0 && !(s.ep && s.halves); --l) {
    LayerActs& a = s.la[l];
    const LayerOff& o = s.lo[l];
    const bf16* x_in = s.res[l];
    s.lrecord(l, 3);
    if (s.z3) {  // ZeRO-3: the layer's weights again, its gradients into the window
      s.z3_need(l + 1, -1);
      if (l > 0) s.z3_fetch(l, l + 1);  // prefetch: layer l-1's, gathered meanwhile
      s.z3_grads(l + 1);
    }
    bf16* ys = s.memsave ? s.ys_b : a.ys;
    if (s.memsave) {  // this layer's MLP activations again, before its weights change
      cu::rmsnorm_fwd(a.ln2, a.ln2_rstd, a.x_mid, s.W(o.ln2), N, H, eps, ctx);
      if (o.moe && s.ep) {
        // nothing more: the EP block's backward reads its saved state from the EP arena
      } else if (o.moe) {
        cu::permute_fwd(s.xs_b, a.ln2, a.slot_row, N, K, H, ctx);
        cu::grouped_linear_fwd(a.gu, s.xs_b, s.W(o.ex_gu), a.offsets, N * K, E, H, 2 * I, ctx);
        cu::swiglu_fwd(s.act_b, a.gu, N * K, I, ctx);
        cu::grouped_linear_fwd(ys, s.act_b, s.W(o.ex_down), a.offsets, N * K, E, I, H, ctx);
      } else {
        cu::linear_fwd(a.gu, a.ln2, s.W(o.mlp_gu), nullptr, N, H, 2 * F, ctx);
      }
    }
    // ---- MLP block: out = x_mid + mlp(ln2(x_mid)); dres is d(out)
    if (o.moe && s.ep) {  // combine's gradient is a dispatch, dispatch's a combine
      // memory-saving: both expert gradients come out of one call, so down's has its own scratch
      bf16* dgu = s.g16_at(o.ex_gu);
      bf16* ddown = s.memsave ? s.gsc_down.get() : s.g16_at(o.ex_down);
      dist::EpMoeCuda& ep = *s.ep_moe[size_t(o.moe_index)];
      ep.bwd(s.dln, s.dtopk_w, dgu, ddown, beta, s.dres, s.W(o.ex_gu), s.W(o.ex_down), ctx);
      // The expert gradients may still be in flight on the block's side stream (its weight
      // gradients beside the combine, dist/expert_parallel_cuda.h): every reader joins first.
      // Readers: here the memory-saving mode's done_at (all-reduce, AdamW; and dgu is the
      // shared gradient scratch the router's lin_bwd writes next); the overlapped all-reduce
      // after this layer's attention (reduce_async below); everything after backward() (the
      // end-of-step all-reduce, ZeRO's reduce-scatter, the norm, AdamW, download_grads), behind
      // the join of every block at the end of backward().
      if (s.memsave) {
        ep.join(ctx.stream);
        s.done_at(o.ex_down, ddown);
        s.done_at(o.ex_gu, dgu);
      }
      s.router_bwd_rows(a, o, 0, N);
    } else if (o.moe) {
      cu::unpermute_bwd(s.dys, s.dtopk_w, s.dres, ys, a.topk_w, a.slot_row, N, K, H, ctx);
      // the expert inputs: kept (default) or recomputed above (memory-saving)
      const bf16* act = s.memsave ? s.act_b : a.act;
      const bf16* xs = s.memsave ? s.xs_b : a.xs;
      s.grouped_bwd(s.dact, o.ex_down, s.dys, act, a.offsets, N * K, E, I, H);
      cu::swiglu_bwd(s.dgu, s.dact, a.gu, N * K, I, ctx);
      s.grouped_bwd(s.dys /*dxs*/, o.ex_gu, s.dgu, xs, a.offsets, N * K, E, H, 2 * I);
      cu::permute_bwd(s.dln, s.dys, a.slot_row, N, K, H, ctx);
      s.router_bwd_rows(a, o, 0, N);
    } else {
      s.dense_mlp_bwd(a, o, 0, N);
    }
    s.norm_bwd(s.dres, 1.f, o.ln2, s.dln, a.x_mid, a.ln2_rstd, N, H);  // dres += ln2's dx
    s.lrecord(l, 4);
    if (s.memsave) {  // this layer's attention inputs again, before its weights change
      cu::rmsnorm_fwd(a.ln1, a.ln1_rstd, x_in, s.W(o.ln1), N, H, eps, ctx);
      s.qk_norm_rope(a, o, N, eps, theta);
    }
    // ---- attention block: x_mid = x_in + o_proj(attn(ln1(x_in)))
    s.lin_bwd(s.dao, 0.f, o.wo, o.bo, s.dres, a.ao, N, nH * D, H, beta);
    cu::attention_bwd(s.dq, s.dk, s.dv, s.dao, a.ao, a.lse, a.q, a.k, a.v, doc, seg, B, T, nH, nKV,
                      D, ctx);
    s.qkv_bwd(a, o, x_in, 0, N, theta);
    if (cu::trace_on())
      cu::trace_mark(ctx.stream, fmt::format("layer {}", l), "bwd router and attention");
    s.lrecord(l, 5);
    if (s.overlap) {  // the layer's expert gradients too: their side stream first (see above)
      if (o.moe && s.ep) s.ep_moe[size_t(o.moe_index)]->join(ctx.stream);
      s.reduce_async(s.layer_k[size_t(l)].first, s.layer_k[size_t(l)].second);
    }
    if (s.z3) {  // the layer's gradients to their shards (the expert ones joined first)
      if (o.moe && s.ep) s.ep_moe[size_t(o.moe_index)]->join(ctx.stream);
      s.z3_reduce(l + 1);
    }
  }
  // embedding (tied: lm_head's gradient is already in this tensor, so always accumulate)
  if (s.bf16_mode()) {
    if (s.z3) s.z3_grads(0);  // (the embedding's backward reads no weight)
    bf16* g = s.g16_at(s.off_wte);
    if (beta == 0.f && !s.tied)
      CUDA_CHECK(cudaMemsetAsync(g, 0, size_t(c.vocab_size * H) * sizeof(bf16), ctx.stream));
    cu::embedding_bwd_sorted(g, s.dres, s.uniq, s.uoff, s.rows, s.n_uniq, H, ctx);
    s.done(s.off_wte);
    if (s.z3) s.z3_reduce(0);
  } else {
    cu::embedding_bwd_sorted(s.g32.get() + s.off_wte, s.dres, s.uniq, s.uoff, s.rows, s.n_uniq, H,
                             ctx);
  }
  if (s.overlap) {  // wte (tied: lm_head's too) is complete: every gradient is being summed
    s.reduce_async(s.k_wte, s.k_wte + 1);
    s.summed = State::Summed::kAll;
    s.overlap = false;
  }
  // every expert gradient written before anything after the backward reads one (see the MLP
  // block above); the forward's EP blocks wait on their own (the scratch's event)
  for (const auto& b : s.ep_moe) b->join(ctx.stream);
  s.z3_join();  // ZeRO-3 prefetch: the reduces (gshard) done before the step reads them
  s.record(3);
  s.have_grad_forward = false;
  if (s.memsave) {
    s.step_begun = false;
    s.step_applied = true;
  }
}

// ---- optimizer ---------------------------------------------------------------------------------

void Qwen3MoeCuda::optimizer_step(const AdamWConfig& c, float lr, float max_grad_norm) {
  State& s = *s_;
  const cu::Ctx& ctx = s.ctx;
  AM_CHECK(!s.fresh, "optimizer_step() without gradients: run forward() and backward() first");
  if (s.memsave) {
    AM_CHECK(s.step_applied, "memory-saving mode: optimizer_step() after begin_step(), "
             "forward() and backward() of the step");
    AM_CHECK(c.beta1 == s.ac.beta1 && c.beta2 == s.ac.beta2 && c.eps == s.ac.eps &&
                 c.weight_decay == s.ac.weight_decay && lr == s.lr && max_grad_norm == s.max_norm,
             "memory-saving mode: optimizer_step() settings differ from begin_step()'s, which "
             "the backward already applied");
    s.step_applied = false;
    s.fresh = true;
    for (size_t k = 0; k < s.applied.size(); ++k)  // a tensor left out would never train
      AM_CHECK(s.applied[k], "internal: memory-saving mode: the backward did not update {}",
               s.layout_model.layout().params[k].name);
    if (s.dist) {  // this step's g^2: replicated tensors once, expert shards over the EP group
      s.reducer->wait(ctx.stream);  // NCCL: the backward's all-reduces (timed)
      s.sumsq_host[0] = s.reducer->global_sumsq(s.slots.get(), ctx.stream);  // waits
      CUDA_CHECK(cudaMemcpyAsync(s.d_sumsq, s.sumsq_host, sizeof(double), cudaMemcpyHostToDevice,
                                 ctx.stream));
    } else {
      cu::sum_f64(s.d_sumsq, s.slots.get(), int64_t(s.segs.size()), ctx);  // this step's g^2
    }
    // its norm, for metrics; d_sumsq stays for the next begin_step's clip coefficient
    cu::clip_coef(s.d_coef, s.d_norm, s.d_sumsq, max_grad_norm, ctx);
    CUDA_CHECK(cudaMemcpyAsync(s.norm_host, s.d_norm, sizeof(float), cudaMemcpyDeviceToHost,
                               ctx.stream));
    CUDA_CHECK(cudaEventRecord(s.norm_ready, ctx.stream));
    s.record(4);
    return;
  }
  ++s.adam_t;
  if (s.z3) {  // ZeRO-3: the shards hold the summed gradients; norm, AdamW, no all-gather
    s.z3_join();  // (backward() joined already; a forward's head reduce without it did not)
    const auto& pcs = s.z3->pieces();
    CUDA_CHECK(cudaMemsetAsync(s.d_sumsq, 0, sizeof(double), ctx.stream));
    for (size_t k = 0; k < pcs.size(); ++k)  // per piece, as ZeRO-1 (the same partial sums)
      cu::sum_squares(s.zsumsq.get() + k, s.gshard.get() + pcs[k].pos, pcs[k].n, ctx);
    if (!pcs.empty()) cu::sum_f64(s.d_sumsq, s.zsumsq.get(), int64_t(pcs.size()), ctx);
    if (s.dist) s.reducer->allreduce_small(s.d_sumsq, 1, s.groups->world, ctx.stream);
    cu::clip_coef(s.d_coef, s.d_norm, s.d_sumsq, max_grad_norm, ctx);
    for (const auto& pc : pcs)  // elementwise: ZeRO-1's update of the same elements
      cu::adamw_step(s.pshard.get() + pc.pos, s.gshard.get() + pc.pos, s.m16.get() + pc.pos,
                     s.v16.get() + pc.pos, pc.n, lr, c.beta1, c.beta2, c.eps, c.weight_decay,
                     s.adam_t, s.d_coef, ctx);
    s.resident[0] = s.resident[1] = -1;  // the windows hold the old weights
    CUDA_CHECK(cudaMemcpyAsync(s.norm_host, s.d_norm, sizeof(float), cudaMemcpyDeviceToHost,
                               ctx.stream));
    CUDA_CHECK(cudaEventRecord(s.norm_ready, ctx.stream));
    s.record(4);
    return;
  }
  if (s.zero) {  // ZeRO-1: reduce-scatter, the norm of the shards, AdamW on the shard, all-gather
    const auto& pcs = s.zero->pieces();
    s.zero->reduce_scatter(s.g16.get(), ctx.stream);  // this rank's pieces hold the sums
    CUDA_CHECK(cudaMemsetAsync(s.d_sumsq, 0, sizeof(double), ctx.stream));
    for (size_t k = 0; k < pcs.size(); ++k)
      cu::sum_squares(s.zsumsq.get() + k, s.g16.get() + pcs[k].dev, pcs[k].n, ctx);
    if (!pcs.empty()) cu::sum_f64(s.d_sumsq, s.zsumsq.get(), int64_t(pcs.size()), ctx);
    // every element of the model is in exactly one rank's shard: one sum over the world
    if (s.dist) s.reducer->allreduce_small(s.d_sumsq, 1, s.groups->world, ctx.stream);
    cu::clip_coef(s.d_coef, s.d_norm, s.d_sumsq, max_grad_norm, ctx);
    for (const auto& pc : pcs)  // the parameter shard is a view of the arena, piece by piece
      cu::adamw_step(s.p16.get() + pc.dev, s.g16.get() + pc.dev, s.m16.get() + pc.pos,
                     s.v16.get() + pc.pos, pc.n, lr, c.beta1, c.beta2, c.eps, c.weight_decay,
                     s.adam_t, s.d_coef, ctx);
    s.zero->allgather(s.p16.get(), ctx.stream);
    CUDA_CHECK(cudaMemcpyAsync(s.norm_host, s.d_norm, sizeof(float), cudaMemcpyDeviceToHost,
                               ctx.stream));
    CUDA_CHECK(cudaEventRecord(s.norm_ready, ctx.stream));
    s.record(4);
    return;
  }
  if (s.dist) {  // gradients summed over the ranks, then the global norm (experts counted once)
    allreduce_grads();
    for (size_t k = 0; k < s.segs.size(); ++k) {
      const Seg& sg = s.segs[k];
      if (s.bf16_mode()) cu::sum_squares(s.tsumsq.get() + k, s.g16.get() + sg.dev, sg.n, ctx);
      else cu::sum_squares(s.tsumsq.get() + k, s.g32.get() + sg.dev, sg.n, ctx);
    }
    s.sumsq_host[0] = s.reducer->global_sumsq(s.tsumsq.get(), ctx.stream);  // waits
    CUDA_CHECK(cudaMemcpyAsync(s.d_sumsq, s.sumsq_host, sizeof(double), cudaMemcpyHostToDevice,
                               ctx.stream));
  } else if (s.bf16_mode()) {
    cu::sum_squares(s.d_sumsq, s.g16.get(), s.P, ctx);
  } else {
    cu::sum_squares(s.d_sumsq, s.g32.get(), s.P, ctx);
  }
  cu::clip_coef(s.d_coef, s.d_norm, s.d_sumsq, max_grad_norm, ctx);
  if (s.bf16_mode())
    cu::adamw_step(s.p16.get(), s.g16.get(), s.m16.get(), s.v16.get(), s.P, lr, c.beta1, c.beta2,
                   c.eps, c.weight_decay, s.adam_t, s.d_coef, ctx);
  else
    cu::adamw_step(s.p32.get(), s.p16.get(), s.g32.get(), s.m32.get(), s.v32.get(), s.P, lr,
                   c.beta1, c.beta2, c.eps, c.weight_decay, s.adam_t, s.d_coef, ctx);
  CUDA_CHECK(cudaMemcpyAsync(s.norm_host, s.d_norm, sizeof(float), cudaMemcpyDeviceToHost,
                             ctx.stream));
  CUDA_CHECK(cudaEventRecord(s.norm_ready, ctx.stream));
  s.record(4);
}

void Qwen3MoeCuda::allreduce_grads() {
  State& s = *s_;
  if (!s.dist) return;
  AM_CHECK(!s.fresh, "allreduce_grads() without gradients: run forward() and backward() first");
  AM_CHECK(!s.z3, "allreduce_grads: under train.zero 3 each rank keeps only its gradient shard "
           "(reduced block by block in the backward); use train.zero 0 or 1 to read gradients");
  AM_CHECK(!s.memsave, "allreduce_grads: the memory-saving mode keeps no gradient arena (each "
           "gradient is summed over the ranks inside the backward); use the default mode");
  AM_CHECK(s.summed != State::Summed::kHead, "optimizer_step()/allreduce_grads() after a "
           "forward(grad = true) without its backward(): its sums in the backward did not run");
  if (s.summed == State::Summed::kAll) {  // the backward summed them on the comm stream
    s.reducer->join(s.ctx.stream);
    s.reducer->wait(s.ctx.stream);  // NCCL: timed
    return;
  }
  if (s.bf16_mode()) s.reducer->allreduce(s.g16.get(), s.ctx.stream);
  else s.reducer->allreduce(s.g32.get(), s.ctx.stream);
}

float Qwen3MoeCuda::grad_norm() {
  s_->host_wait(s_->norm_ready, "the gradient norm readback");
  return s_->norm_host[0];
}

std::vector<int32_t> Qwen3MoeCuda::download_router_topk() const {
  const State& s = *s_;
  synchronize();
  std::vector<int32_t> out(size_t(s.nmoe() * s.N * s.cfg.num_experts_per_tok));
  if (!out.empty())
    CUDA_CHECK(cudaMemcpy(out.data(), s.topk_all, out.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  return out;
}

std::vector<int64_t> Qwen3MoeCuda::ep_picks_received() const {
  std::vector<int64_t> out;
  const size_t nm = size_t(s_->nmoe());
  for (size_t i = 0; i < s_->ep_moe.size(); ++i) {
    const int64_t m = s_->ep_moe[i]->picks_received(0);
    if (m < 0) return {};  // padded mode: on the device only
    if (i < nm) out.push_back(m);
    else out[i - nm] += m;  // the two halves: half B's blocks follow half A's
  }
  return out;
}

void Qwen3MoeCuda::enable_phase_timing(bool on) {
  State& s = *s_;
  s.timing = on;
  for (auto& b : s.ep_moe) b->set_timing(on);  // blocks planned later take it in plan()
  const size_t want = size_t(s.cfg.num_hidden_layers * 6);
  while (on && s.lev.size() < want) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    s.lev.push_back(e);
  }
}

std::vector<std::pair<std::string, float>> Qwen3MoeCuda::phase_ms() const {
  const State& s = *s_;
  std::vector<std::pair<std::string, float>> out;
  if (!s.timing) return out;
  s_->host_wait(s.ev[4], "the phase timing events");  // timed over NCCL
  const char* names[4] = {"fwd_layers", "lm_head_ce", "bwd_layers", "optimizer"};
  for (int i = 0; i < 4; ++i) {
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, s.ev[i], s.ev[i + 1]));
    out.emplace_back(names[i], ms);
  }
  // the layers' share: attention and MLP (MoE or dense) blocks, forward and backward
  float fa = 0, fm = 0, bm = 0, ba = 0;
  for (int64_t l = 0; l < s.cfg.num_hidden_layers; ++l) {
    const cudaEvent_t* e = s.lev.data() + l * 6;
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e[0], e[1]));
    fa += ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e[1], e[2]));
    fm += ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e[3], e[4]));
    bm += ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e[4], e[5]));
    ba += ms;
  }
  out.emplace_back("fwd_attention", fa);
  out.emplace_back("fwd_mlp", fm);
  out.emplace_back("bwd_mlp", bm);
  out.emplace_back("bwd_attention", ba);
  // EP: the forward's dispatch (layout, pack, counts exchange and its host sync, the rows'
  // all-to-all) and combine (the rows back, summed) over every MoE layer, inside fwd_mlp; the
  // backward's two all-to-alls (d(out) rows out, d(x) and d(w) rows back), inside bwd_mlp.
  // With AUTOMOE_EP_WGRAD_OVERLAP on (the default) the expert weight gradients run on a side
  // stream, in no phase of their own: beside bwd_ep_combine and what follows it. A wait for
  // them counts where the compute stream joins them: inside bwd_mlp (memory-saving mode),
  // between layers (the overlapped all-reduce), else at the end of bwd_layers
  if (!s.ep_moe.empty()) {
    float d = 0, c = 0, bd = 0, bc = 0;
    for (const auto& b : s.ep_moe) {
      const dist::EpTimes t = b->last_times();
      d += t.dispatch_ms;
      c += t.combine_ms;
      bd += t.bwd_dispatch_ms;
      bc += t.bwd_combine_ms;
    }
    out.emplace_back("fwd_ep_dispatch", d);
    out.emplace_back("fwd_ep_combine", c);
    out.emplace_back("bwd_ep_dispatch", bd);
    out.emplace_back("bwd_ep_combine", bc);
  }
  return out;
}

}  // namespace automoe
