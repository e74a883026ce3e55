// dist/expert_parallel_cuda.h: the expert block of one MoE layer over the EP group on the GPU
// (bf16 activations, fp32 routing weights), the device twin of ep_moe_fwd/ep_moe_bwd in
// dist/expert_parallel.h (the oracle: same semantics, same order of sums):
//   layout    on the device from topk_idx: which ranks each token goes to (ONCE per destination
//             rank), rows per destination, send order by destination rank then token ascending
//   dispatch  each sent row: the token's hidden state, its picks remapped to the destination's
//             local experts (-1 = not here), their weights (0 where -1)
//   experts   receiver: moe_layout over its received picks -> permute -> grouped linear ->
//             SwiGLU -> grouped linear -> unpermute weighted by the received weights, summed
//             over its local picks: one row per (token, rank) travels back
//   combine   the sender sums the returned rows of each token in rank order
// Backward mirrors it, reusing the forward's layout: combine's gradient is a dispatch of
// d(out), dispatch's gradient is a combine of d(x) and d(weights).
//
// Two ways to size the receive (EpMode):
//   kCounts  every rank's per-destination counts (rows and picks) are exchanged, then ONE
//            device-to-host sync per layer forward reads them and sizes the all-to-all-v and
//            the saved state exactly (the backward reuses them)
//   kPadded  every peer gets a region of N rows (worst case) with the true count sent
//            alongside; no host sync at all: the receiver's kernels read the counts on the
//            device and skip the rows past them (cuda::RowRegions: moe_layout, unpermute,
//            permute_bwd), the grouped GEMMs and SwiGLU stop at the offsets' total. Costs wire
//            bytes (P*N rows per rank) and grids sized for P*N rows whose blocks past the
//            counts return at once.
// Transports (dist/ep_transport.h): NCCL, one process per GPU; or loopback, all P ranks in this
// process on one GPU (checking). The calls take the tensors of every rank this process drives.
//
// Memory. What only one call uses (send/receive staging, the expert GEMMs' inputs and
// gradients) lives in an EpMoeScratch, sized for the worst routing of ONE layer (all tokens of
// all ranks on one rank's experts) and shareable by blocks that run one after another on one
// stream. What the backward needs of a forward (dist/ep_arena.h: send_pos, offsets, slot_row,
// w_recv, x_recv, gu and ys unless recomputed) is carved from an EpSavedArena at each forward:
//   counts mode  exactly the rows and expert rows this rank received (their counts come with
//                the counts exchange, so no extra sync). The arena may be shared by all MoE
//                layers of a model (carved in layer order, reset by the model at the start of
//                each step's forward, sized from the balanced load x train.ep_capacity); when
//                a layer's carve does not fit, EVERY rank throws the same error (the exchange
//                carries each rank's room left), before any rows move.
//   padded mode  the worst case for N tokens (P*N rows, P*N*min(K, El) expert rows), known on
//                the host from N alone: carved before anything is enqueued, so the forward
//                never waits for the device. May also be shared by all MoE layers (sized
//                ep_arena_padded_bytes: layers x the worst carve, so no routing overflows it;
//                an arena too small for N stops every rank alike, since every rank carves the
//                same bytes for the same N). Every rank must call with the same N (the
//                regions; the model checks that over the EP group once per forward).
// Without an arena the block owns one sized for its worst case, reset at each forward: one
// forward's state, as a standalone block needs (bench/ep_check.cpp). Nothing is allocated per
// call. The caller's Ctx needs workspace_bytes() of workspace.
//
// Host waits in a forward: counts mode reads the counts back (one sync); padded mode none of
// its own (rows_received() is -1, the counts stay on the device; last_times() syncs, but only
// when called). A transport may wait on its own: MPI staging syncs to stage rows through host
// memory (a checking transport); NCCL and IPC only enqueue (IPC orders its calls with flags on
// the device: no host collective per call).
// The constructor is collective over the EP group with IPC (EpTransport::reserve): every rank
// builds the same blocks in the same order.
//
// Recompute (EpRecompute, dist/ep_arena.h; train.ep_recompute): the carve drops ys (kOutputs)
// or gu and ys (kExperts), and the backward rebuilds them with the forward's kernels on the
// forward's inputs (x_recv, slot_row, offsets, the weights, which have not changed), so its
// results are bit-identical to kNone's. Where the dropped tensors live during one call:
//   ys  the scratch's xs (dead after the gate_up GEMM; the backward permutes x_recv into xs
//       again for the gate_up weight gradient, as it always has)
//   gu  (kExperts) the scratch's gu, [Mcap,2I], allocated only for kExperts
//
// The backward's weight gradients beside its combine (AUTOMOE_EP_WGRAD_OVERLAP, default 1).
// The expert backward runs its data-gradient path first on the caller's stream (unpermute_bwd,
// dact = dys w_down, SwiGLU's backward, dxs = dgu w_gu, permute_bwd), then the combine of the
// dx rows; the two weight gradients (g_down = dys^T act, g_gu = dgu^T xs, with xs permuted
// again from x_recv) need nothing of the combine and run on the scratch's side stream, which
// waits on an event recorded after permute_bwd. So they run while the dx rows travel back and
// while the caller does what follows (the router's and the attention's backward, the next
// layer's dispatch). Bit-identical to the one-stream order (bench/RESULTS.md, fifth session);
// on two H200s (W2, EP = 2) +1.1% fwd+bwd: the GEMMs beside the combine share the SMs with the
// next layer's attention backward, which slows by most of what the MoE backward saves. A
// persistent CUTLASS wgrad holds its SMs, so kernels of the caller's stream (ep_combine_unpack,
// the transport's own kernels over NCCL) may wait for it; IPC moves the rows with copy engines.
// The ordering that makes it safe (every gradient read is after its producer):
//   inputs    dys, act, dgu, xs of the scratch (and the carve's x_recv, slot_row, offsets) are
//             read by the side stream until the scratch's wgrad_done event: every writer of the
//             scratch waits on it first (fwd() on entry; bwd() before each local rank's
//             experts, as its dispatch writes only x_send and y_recv, which they do not read;
//             EpMoeScratch::wait_wgrad() for anyone else). So with several local ranks
//             (loopback) only the last one's overlap the combine. The carve is rewritten only
//             by a later forward, which waits too; blocks sharing an arena share one scratch.
//   outputs   g_gu and g_down are complete only after join(stream): a caller makes every stream
//             that reads them (a gradient all-reduce, AdamW, a norm, a download) join first.
//   dxs       lives in the scratch's xs (dead by then: ys, when recomputed into xs, is read by
//             unpermute_bwd before), and the side stream permutes x_recv into xs only after
//             permute_bwd has read dxs; dys keeps its own buffer for g_down. No memory added
//             but the side stream's GEMM workspace (grouped_linear_workspace_bytes(El): kB).
// With AUTOMOE_EP_WGRAD_OVERLAP=0 (or set_wgrad_overlap(false)) the same launches run in the
// same order on the caller's stream (each local rank's weight gradients before the next rank's
// experts, all before the combine): the same kernels on the same inputs, so the same bits.
// The backward's timing (EpTimes::bwd_combine_ms) measures the combine alone either way; with
// the overlap on the weight gradients run beside it and may slow it.
//
// Token chunks (train.ep_chunks C, 1..8; the constructor's `chunks`). C = 1 runs everything
// above on the caller's stream, as before. C > 1 splits the N tokens into C contiguous chunks
// (ep_chunk_tokens: at most ceil(N/C) each), each a complete pass with its own layout, counts,
// row plan, carve and send/receive buffers (the scratch's Local per chunk and local rank), and
// pipelines them on two streams:
//   comm     the scratch's comm stream: every transport call (counts exchanges, dispatches,
//            combines), in the same order on every rank (IPC's rule; one stream for all the
//            blocks sharing the scratch)
//   compute  ctx.stream: layouts, packs, the expert GEMMs chunk after chunk (they share the
//            scratch's expert buffers), unpacks
// Events per chunk: dispatch c waits for pack c (packed), experts c for dispatch c (arrived),
// combine c for experts c (computed), unpack c for combine c (returned). So dispatch c+1 runs
// while experts c compute, combine c while experts c+1 do; ctx.stream ends behind the last
// unpack (which waited for the last combine, so for everything on the comm stream). The comm
// stream's first call waits for ctx.stream (laid_out_), so for whatever the caller and the
// side stream's wait_wgrad() ordered before. Counts mode: every chunk's counts exchanged, then
// ONE host sync for all of them (check_room() adds the chunks' carves). Padded: each chunk's
// regions are its own tokens. The backward mirrors it (the d(out) rows of chunk c+1 travel
// during chunk c's expert backward, chunk c's dx rows during chunk c+1's); the weight gradients
// stay on the side stream, chunk c+1's experts waiting for chunk c's (wait_wgrad: the expert
// buffers are shared), summed over the chunks in the scratch's fp32 accumulators (acc_gu,
// acc_down) and folded once into g (accumulate_grad: g = g_beta * g + dW, one rounding).
// Bits: out, dx and dtopk_w are those of C = 1 (each token's rows go through the same kernels;
// a row's result depends on its own inputs only); the weight gradients add the same products
// in another fp32 order, so a bf16 element may differ in its last bit (ep_check: NMSE <= 1e-6).
// Memory added: per chunk its Rank counts and events (bytes); the Local buffers are per chunk
// but each for ceil(max_tokens/C) tokens (about C = 1's in all), the expert buffers shrink
// C-fold, the arena holds C carves per layer (ep_arena_bytes(..., chunks): C-1 more offsets
// and alignments), the fp32 accumulators 4 x 3 x I x H bytes per local expert and local rank.
// Over IPC the comm stream waits on the device for its peers' flags; a stream blocked in a
// wait can hold back streams sharing its hardware queue (CUDA_DEVICE_MAX_CONNECTIONS, 8 by
// default): the launcher should set CUDA_DEVICE_MAX_CONNECTIONS=32 (docs/DISTRIBUTED.md).
// Checked on one H200 (ep_check over loopback, MPI staging and IPC at small shapes; 50 training
// steps). On two H200s (W2, EP = 2) C = 2 is 10.4% SLOWER than C = 1 (half-size GEMMs, twice
// the launches, chunk c+1's expert backward waiting for chunk c's weight gradients); hence the
// default 1. Unmeasured at EP = 4.
//
// Gradient rule: dx and dtopk_w assign (=); expert weight gradients are bf16,
// g = g_beta * g + dW (g_beta 0 overwrites, experts without rows then get 0; 1 accumulates).
// Legend: N tokens per rank, H hidden, I expert width, E experts, K top-k, P EP ranks,
// El = E/P experts per rank.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/common.cuh"
#include "backend/cuda/ops_cuda.h"
#include "dist/ep_arena.h"
#include "dist/ep_transport.h"

namespace automoe::cuda {
struct EpPushDst;     // backend/cuda/ep_kernels.h
struct EpRowSources;  // backend/cuda/ep_kernels.h
}

namespace automoe::dist {

// EpMode, ep_mode_name: dist/ep_arena.h (train.ep_dispatch, CUDA-free).

// One rank's tensors for fwd (device pointers).
struct EpMoeFwdArgs {
  cuda::bf16* out = nullptr;             // [N,H] bf16 =
  const cuda::bf16* x = nullptr;         // [N,H] bf16
  const int32_t* topk_idx = nullptr;     // [N,K] i32, global experts
  const float* topk_w = nullptr;         // [N,K] f32
  const cuda::bf16* w_gu = nullptr;      // [El,2I,H] bf16, this rank's experts (gate | up)
  const cuda::bf16* w_down = nullptr;    // [El,H,I] bf16
};
// One rank's tensors for bwd.
struct EpMoeBwdArgs {
  cuda::bf16* dx = nullptr;              // [N,H] bf16 =
  float* dtopk_w = nullptr;              // [N,K] f32 =
  cuda::bf16* g_gu = nullptr;            // [El,2I,H] bf16 = g_beta * g_gu + dW
  cuda::bf16* g_down = nullptr;          // [El,H,I] bf16 = g_beta * g_down + dW
  const cuda::bf16* dout = nullptr;      // [N,H] bf16
  const cuda::bf16* w_gu = nullptr;      // [El,2I,H] bf16
  const cuda::bf16* w_down = nullptr;    // [El,H,I] bf16
};

// GPU time of the last forward's dispatch (layout .. rows received) and combine (rows sent back
// .. summed), and the rows moved by this process's ranks (payload: true rows; wire: what the
// all-to-all moved, = payload in counts mode, P*N per rank in padded mode). Needs set_timing.
// With token chunks (train.ep_chunks > 1) each figure is the sum over the chunks of the
// transport calls alone (the counts exchange and the rows' all-to-all for dispatch, the rows'
// all-to-all for combine), timed on the comm stream: they overlap the expert GEMMs now, so they
// are not a share of the block's time, and the layout, pack and unpack are in none of them.
struct EpTimes {
  float dispatch_ms = 0, combine_ms = 0;
  // the backward's, when one ran after that forward (0 otherwise): combine's gradient (a
  // dispatch of d(out): pack .. rows received) and dispatch's (the d(x), d(w) rows back .. summed)
  float bwd_dispatch_ms = 0, bwd_combine_ms = 0;
  // the forward's direct dispatch in three (0 otherwise; they add up to dispatch_ms): the layout
  // and the counts' mail sent (not its arrival: the host waits for that beside the push); the
  // push (with its waits for the peers' last copy-outs); the rest (the carve's copy, the
  // copy-out with its waits for the peers' rows, and any gap while the host had not enqueued
  // them yet)
  float dispatch_counts_ms = 0, dispatch_push_ms = 0, dispatch_recv_ms = 0;
  float dispatch_layout_ms = 0;  // of dispatch_counts_ms: the layout kernels alone
  int64_t rows_payload = 0, rows_wire = 0;
};

// What the block uses only inside one fwd() or bwd() call, for the worst routing of one layer's
// token chunk of Nc = ceil(max_tokens / chunks) tokens (Mcap = P * Nc * min(K, E/P) local slots,
// Rcap = P * Nc received rows, Scap send rows: Nc * min(P, K) packed, P * Nc padded). Blocks
// that run one after another on one stream (a model's MoE layers) share one instead of holding
// one each. With chunks > 1 (train.ep_chunks) the send/receive buffers (Local) are one set per
// (chunk, local rank), each sized for Nc tokens, so together about the one set of chunks = 1
// (C x ceil(Nmax/C) tokens), and the expert buffers (xs .. gu) shrink C-fold: the chunks use
// them one after another on the caller's stream.
// EpRecompute::kExperts adds the gate|up outputs the carve no longer keeps (gu).
// The backward's weight gradients run on the scratch's side stream (see "The backward's weight
// gradients" above): the stream, its events and its GEMM workspace live here, created once.
struct EpMoeScratch {
  // `split`: the blocks using it run split calls (fwd_begin .. bwd_finish, "Two halves" below):
  // the scratch gets a comm stream with one chunk too.
  EpMoeScratch(const EpMoeShape& shape, int P, int local_ranks = 1, EpMode mode = EpMode::kCounts,
               EpRecompute recompute = EpRecompute::kNone, int chunks = 1, bool split = false);
  ~EpMoeScratch();  // waits for the side and comm streams (their work reads these buffers)
  EpMoeScratch(const EpMoeScratch&) = delete;
  EpMoeScratch& operator=(const EpMoeScratch&) = delete;
  int64_t Mcap = 0, Rcap = 0, Scap = 0;
  int chunks = 1;  // token chunks of the blocks using it (train.ep_chunks)
  EpMode mode = EpMode::kCounts;
  EpRecompute recompute = EpRecompute::kNone;
  // the expert GEMMs' (the local ranks run one after the other); in bwd xs also holds dxs
  cuda::DeviceBuffer<cuda::bf16> xs, act, dys, dact, dgu;  // [Mcap,H] [Mcap,I] [Mcap,H] [Mcap,I] [Mcap,2I]
  cuda::DeviceBuffer<cuda::bf16> gu;  // [Mcap,2I] kExperts only (else empty): recomputed gate|up
  // The weight gradients' stream (non-blocking), the event it waits on (recorded on the
  // caller's stream once their inputs exist), the event it records when done (every writer of
  // the buffers above waits on it), and its own GEMM workspace (the caller's stream keeps
  // ctx.workspace): grouped_linear_workspace_bytes(E/P).
  cudaStream_t side = nullptr;
  cudaEvent_t inputs_ready = nullptr, wgrad_done = nullptr;
  cuda::DeviceBuffer<unsigned char> side_ws;
  // chunks > 1 or split: the stream of every transport call (non-blocking, the device's highest
  // priority, so the copies and NCCL kernels of an all-to-all start before queued GEMM blocks);
  // shared by the blocks using this scratch, so their calls keep one order (IPC's rule). Null
  // otherwise: the calls run on the caller's stream.
  cudaStream_t comm = nullptr;
  // chunks > 1: the weight gradients of one layer's local experts in fp32, [local_ranks] x
  // [El,2I,H] and [El,H,I] (4 bytes x 3*I*H per local expert and local rank: 604 MiB at
  // Qwen3-30B-A3B's shapes, EP 4): the chunks' dW add up here and are folded into the bf16
  // gradient once (one rounding, as with one chunk), on the weight gradients' stream.
  cuda::DeviceBuffer<float> acc_gu, acc_down;
  // `stream` waits (on the device) for the weight gradients still reading the buffers; call it
  // before writing any of them outside fwd()/bwd() (a no-op when none is pending).
  void wait_wgrad(cudaStream_t stream) const;
  struct Local {  // one per local rank (an all-to-all moves every local rank's rows at once)
    cuda::DeviceBuffer<int32_t> send_pos;  // [Nmax,P] the layout, before the carve exists
    cuda::DeviceBuffer<cuda::bf16> x_send;  // [Scap,H] dispatch rows; combine's returned rows;
                                            //   in bwd d(out) rows, then the returned dx rows
    cuda::DeviceBuffer<int32_t> idx_send;   // [Scap,K] picks remapped to the destination's experts
    cuda::DeviceBuffer<float> w_send;       // [Scap,K] their weights; in bwd the returned dw rows
    cuda::DeviceBuffer<int32_t> idx_recv;   // [Rcap,K] received picks (local experts or -1)
    cuda::DeviceBuffer<float> dw_recv;      // [Rcap,K] d(weights) of the received picks (bwd)
    cuda::DeviceBuffer<cuda::bf16> y_recv;  // [Rcap,H] weighted expert outputs per received row;
                                            //   in bwd d(out) rows, then d(x) rows
  };
  std::vector<Local> local;  // [chunks * local_ranks]: chunk c, local rank i at c * local_ranks + i
  size_t bytes() const;
};

// The saved state of every forward until its backward (see "Memory" above): one device
// allocation and its bump carving (dist/ep_arena.h). `what` says how it was sized (errors).
struct EpSavedArena {
  EpSavedArena(size_t bytes, std::string what);
  EpBumpArena bump;
  cuda::DeviceBuffer<unsigned char> mem;
  std::string what;
  void reset() { bump.reset(); }  // at the start of a step's forward: every carve is released
  size_t bytes() const { return mem.bytes(); }
};

class EpMoeCuda {
 public:
  // `recompute`: what the backward recomputes instead of keeping (see "Recompute" above).
  // `scratch`: shared with other blocks of the same shape and stream (built with kExperts when
  // this block recomputes the experts); null: the block owns one.
  // `arena`: shared with the other MoE layers, sized for the same `recompute` and mode
  // (counts: ep_arena_bytes; padded: ep_arena_padded_bytes); null: the block owns one sized for
  // its worst case (both sized with the same `chunks`). `label` names the block in errors
  // ("MoE layer 3"). `chunks`: token chunks pipelined over the comm stream (train.ep_chunks,
  // 1..8; 1 runs everything on the caller's stream, as before); a shared scratch must have
  // been built with the same chunks.
  EpMoeCuda(EpTransport& t, const EpMoeShape& shape, EpMode mode,
            EpRecompute recompute = EpRecompute::kNone,
            std::shared_ptr<EpMoeScratch> scratch = nullptr,
            std::shared_ptr<EpSavedArena> arena = nullptr, std::string label = "the EP block",
            int chunks = 1);
  ~EpMoeCuda();
  EpMoeCuda(const EpMoeCuda&) = delete;
  EpMoeCuda& operator=(const EpMoeCuda&) = delete;

  // Workspace the Ctx must carry (the grouped GEMMs').
  static size_t workspace_bytes(const EpMoeShape& shape, int P);

  // The forward's rows ahead of the routing (optional; one rank per process): where the
  // direct dispatch uses the broadcast layout (cuda::ep_layout_all: every token to every rank,
  // so a row's place does not depend on the routing), x[N,H] starts for the peers now, on the
  // scratch's side stream once ctx.stream has written it, and the next fwd/fwd_begin, which
  // must get the same x and N, sends only the picks. A no-op where the broadcast is not used.
  // The broadcast is opt-in (AUTOMOE_EP_BROADCAST=1; 1 < P <= K). The rows go by the copy
  // engines (not yet run), or by the SMs' copy kernel with AUTOMOE_EP_AHEAD_SM=1: the same bits,
  // but at W2 that copy slowed the router beside it and the forward did not gain
  // (bench/RESULTS.md, 2026-11-30).
  void rows_ahead(const cuda::bf16* x, int64_t N, const cuda::Ctx& ctx);
  bool broadcast() const { return bcast_; }
  // ep_check: the broadcast layout on or off (on only where P * N rows fit: 1 < P <= K)
  void set_broadcast(bool on) { bcast_ = on && P_ > 1 && P_ <= s_.K; }

  // ranks[num_local()]: every rank this process drives, in local order; N tokens on each.
  void fwd(const EpMoeFwdArgs* ranks, int64_t N, const cuda::Ctx& ctx);
  void bwd(const EpMoeBwdArgs* ranks, float g_beta, const cuda::Ctx& ctx);
  // One rank per process (NCCL): the same, outputs first.
  void fwd(cuda::bf16* out, const cuda::bf16* x, const int32_t* topk_idx, const float* topk_w,
           const cuda::bf16* w_gu, const cuda::bf16* w_down, int64_t N, const cuda::Ctx& ctx);
  void bwd(cuda::bf16* dx, float* dtopk_w, cuda::bf16* g_gu, cuda::bf16* g_down, float g_beta,
           const cuda::bf16* dout, const cuda::bf16* w_gu, const cuda::bf16* w_down,
           const cuda::Ctx& ctx);

  // Two halves (the model's train.ep_halves; docs/DISTRIBUTED.md): the forward and the backward
  // in three steps each, so that the caller can run other work (the other half's attention and
  // MoE block) between them:
  //   fwd_begin   enqueues the layout (caller's stream), the counts' mail and the direct
  //               dispatch's push (comm stream); no host wait
  //   fwd_end     waits on the host for the mail, plans, carves, enqueues the copy-out (comm),
  //               the experts (caller's stream, after the rows came) and the combine (comm)
  //   fwd_finish  the caller's stream waits for the combine and sums the rows into `out`
  //   bwd_begin   the d(out) rows pushed (comm, after the caller's stream has written dout)
  //   bwd_end     the experts' backward (caller's stream; weight gradients on the side stream),
  //               the dx and dw rows' combine (comm)
  //   bwd_finish  the caller's stream waits for it and sums into dx, dtopk_w
  // fwd() and bwd() are these three in a row wherever the direct dispatch applies (use_push),
  // with or without a comm stream. The split calls need it (counts mode, one chunk, one rank per
  // process, a transport that can push: IPC) and a scratch built with `split` (its comm
  // stream; without one they still work, on the caller's stream, with nothing overlapped). Two
  // blocks whose calls interleave must not share a transport, a scratch or an arena: over IPC
  // one transport's calls keep one order on one stream, and a carve's room is reported at
  // fwd_begin. The args' pointers must stay valid until the matching finish.
  void fwd_begin(const EpMoeFwdArgs& a, int64_t N, const cuda::Ctx& ctx);
  void fwd_end(const cuda::Ctx& ctx);
  void fwd_finish(const cuda::Ctx& ctx);
  void bwd_begin(const EpMoeBwdArgs& a, float g_beta, const cuda::Ctx& ctx);
  void bwd_end(const cuda::Ctx& ctx);
  void bwd_finish(const cuda::Ctx& ctx);
  // This block's weight gradients go into the same tensors as `first`'s (the other half of the
  // same layer) and must come after them: its side stream waits for first's before its own
  // (with the overlap off both run on the caller's stream in call order). Null: none.
  void set_wgrad_after(const EpMoeCuda* first) { wgrad_after_ = first; }

  // `stream` waits (on the device) until the last bwd()'s weight gradients (g_gu, g_down) are
  // written; call it before any read of them on another stream or the host (a no-op when the
  // overlap is off or nothing is pending). No host wait.
  void join(cudaStream_t stream) const;
  // The weight gradients on the side stream (default: AUTOMOE_EP_WGRAD_OVERLAP, 1 unless "0");
  // off runs them on the caller's stream as before, with the same bits. Any call may switch it.
  void set_wgrad_overlap(bool on) { wgrad_overlap_ = on; }
  bool wgrad_overlap() const { return wgrad_overlap_; }
  // The direct dispatch where it applies (counts mode, one chunk, one rank per process, a
  // transport with can_push(): IPC; H a multiple of 8): the dispatch kernel stores the rows into the peers' regions
  // itself (cuda::ep_dispatch_push), in the forward while the host waits for the counts, instead
  // of a pack and then copies after the host's plan; the backward's d(out) rows the same way
  // (one pass over them instead of two). Default: AUTOMOE_EP_PUSH, 1 unless "0"; the same rows
  // land in the same places either way, so the same bits.
  void set_push(bool on) { push_ = on; }
  bool push() const { return push_; }
  // The combine without its gather, where it applies (one chunk, one rank per process, P <= 8,
  // H a multiple of 8): the unpack reads each rank's returned rows where the transport received
  // them (IPC: its staging regions; EpTransport::alltoallv_inplace) instead of after a copy into
  // one buffer; forward and backward. Default: AUTOMOE_EP_INPLACE, 1 unless "0"; the same sums
  // of the same rows in the same order, so the same bits.
  void set_inplace(bool on) { inplace_ = on; }
  bool inplace() const { return inplace_; }

  EpMode mode() const { return mode_; }
  EpRecompute recompute() const { return rc_; }
  int num_local() const { return L_; }
  int chunks() const { return C_; }
  int64_t local_experts() const { return El_; }
  // what this object allocated, with its own scratch and arena (not shared ones)
  size_t device_bytes() const { return bytes_; }
  // Counts mode: rows local rank `i` received in the last forward (all chunks); padded mode: -1
  // (on the device only).
  int64_t rows_received(int i) const;
  // Counts mode: expert rows (received picks) of local rank `i` in the last forward; padded: -1.
  int64_t picks_received(int i) const;

  void set_timing(bool on) { timing_ = on; }
  EpTimes last_times() const;  // synchronises with the last forward's events

 private:
  struct Rank;   // one local rank's counts and carve of one chunk (expert_parallel_cuda.cpp)
  struct Chunk;  // one token chunk: its tokens, ranks, row plan, host counts and events
  // Whether this call dispatches directly (set_push): one chunk, one local rank, a transport
  // that can, and rows the kernel moves in 16-byte pieces (H % 8 == 0, `rows` aligned).
  bool use_push(const cuda::bf16* rows) const;
  bool use_bcast(const cuda::bf16* rows) const;  // the broadcast layout: direct dispatch, counts
  bool use_inplace(const cuda::bf16* out) const;
  // The combine's rows back (nt = 1: y; 2: the backward's dx and dw) with alltoallv_inplace on
  // stream s: src[k] says where each rank's rows of tensor k are until inplace_end.
  void return_inplace(Chunk& ch, int nt, cuda::EpRowSources* src, cudaStream_t s);
  // Opens a direct dispatch's transport call on `s` (EpTransport::push_begin): the kernel's
  // destinations.
  cuda::EpPushDst push_begin(cudaStream_t s);
  // The stream of the transport calls: the scratch's comm stream, or the caller's (chunks = 1).
  cudaStream_t comm_stream(const cuda::Ctx& ctx) const;
  // chunks > 1: record e on s / make s wait for e's last record (the hand-offs between the
  // compute and the comm stream); nothing with one chunk (one stream).
  void signal(cudaEvent_t e, cudaStream_t s) const;
  void await(cudaStream_t s, cudaEvent_t e) const;
  // chunks > 1 with timing: event k of chunk c on the comm stream (see last_times())
  void mark(Chunk& c, int k, cudaStream_t s) const;
  // the bf16 rows of chunk c's scratch buffers `from` (send) to `to` (receive) over `rows`
  void move_rows(Chunk& c, cuda::DeviceBuffer<cuda::bf16> EpMoeScratch::Local::*from,
                 cuda::DeviceBuffer<cuda::bf16> EpMoeScratch::Local::*to, const EpA2aRows& rows,
                 cudaStream_t s);
  void exchange_counts(Chunk& c, const cuda::Ctx& ctx);  // padded: counts only
  void exchange_info(Chunk& c, const cuda::Ctx& ctx);    // counts: every rank's counts and room
  void info_tail(Chunk& c, cudaStream_t s);  // counts: N and the room into the info row's tail
  void check_room();  // counts: the same verdict on every rank, before any rows move
  void check_room_padded();  // padded: the worst carves of every chunk, on the host
  // this forward's saved state of every local rank of chunk c, from the arena (counts: send_pos
  // copied in from the scratch; padded: carved before the layout, which writes send_pos in place)
  void carve(Chunk& c, const cuda::Ctx& ctx);
  void set_plan(Chunk& c);  // host row plan of chunk c's all-to-alls for this forward
  // padded: local rank i's received rows of chunk c as regions (padding skipped); counts: none
  cuda::RowRegions padding(const Chunk& c, int i) const;
  // padded: &offsets[El] on the device; counts: null
  const int32_t* expert_rows(const Chunk& c, int i) const;
  EpMoeScratch::Local& local(int c, int i) const { return sc_->local[size_t(c * L_ + i)]; }
  // the local experts of chunk c, local rank i, on the caller's stream (forward; backward: the
  // data gradients on ctx, the weight gradients on wctx, g = g_beta * g + dW)
  void experts_fwd(Chunk& c, int i, const EpMoeFwdArgs& a, const cuda::Ctx& ctx);
  void experts_bwd(Chunk& c, int i, const EpMoeBwdArgs& a, float g_beta, const cuda::Ctx& ctx,
                   const cuda::Ctx& wctx, bool overlap);
  // The tensor of every local rank for one all-to-all: pointer table slot `slot` (0..2) filled
  // with send_of(i) / recv_of(i) for local rank i.
  template <class S, class D>
  EpA2aTensor tensor(int slot, EpDtype dt, int64_t row_elems, S send_of, D recv_of);

  EpTransport& t_;
  EpMoeShape s_;
  EpMode mode_;
  EpRecompute rc_;
  int P_ = 1, L_ = 1, C_ = 1;
  int64_t El_ = 0, Scap_ = 0, Rcap_ = 0, Mcap_ = 0;  // per chunk (of ceil(max_tokens / C) tokens)
  int64_t W_ = 0;  // counts mode: ints of one rank's info row (send rows [P], picks [P], N, room)
  int64_t N_ = -1;  // tokens of the last forward (-1: none yet)
  size_t bytes_ = 0;
  bool timing_ = false;
  std::vector<std::unique_ptr<Chunk>> ch_;  // [C]
  // Scratch (the local ranks run one after the other on the stream), maybe shared with others
  std::shared_ptr<EpMoeScratch> sc_;
  std::shared_ptr<EpSavedArena> arena_;  // the saved state's, maybe shared with other layers
  bool own_arena_ = false;               // ours: reset at each forward
  uint64_t carved_gen_ = 0;              // the arena generation of the last forward's carves
  std::string label_;
  // Host side (pinned, counts mode): every rank's info row read back ([C, L, P, W]) and this
  // process's N and room going up ([C, L, 2]).
  int32_t* host_cnt_ = nullptr;
  int32_t* host_tail_ = nullptr;
  std::vector<int64_t> unit_off_, unit_cnt_, zero_off_;  // [L*P] the counts exchanges' plans
  std::vector<const void*> ptr_send_;  // [3*L] pointer tables for EpA2aTensor
  std::vector<void*> ptr_recv_;
  cudaEvent_t ev_[4] = {nullptr, nullptr, nullptr, nullptr};   // chunks = 1 (set_timing)
  cudaEvent_t evb_[4] = {nullptr, nullptr, nullptr, nullptr};  // the backward's (set_timing)
  cudaEvent_t evd_[3] = {};  // the direct dispatch's (set_timing): counts sent, pushed, laid out
  bool pushed_ = false;                      // the last forward dispatched directly
  cudaEvent_t laid_out_ = nullptr;  // chunks > 1: every chunk's layout written (comm waits)
  bool bwd_timed_ = false;  // evb_ hold the backward of the last forward
  bool wgrad_overlap_ = true;
  // the side stream's persistent grids' CTAs: AUTOMOE_EP_WGRAD_SMS (above the GPU's SMs: more
  // CTAs than fit, each with fewer tiles, so that SMs free up for the compute stream sooner;
  // not measured yet), else the GPU's SMs less kWgradSmsLeft (the one figure measured: 124 of
  // 132 on an H200, bench/RESULTS.md 2026-11-30)
  static constexpr int kWgradSmsLeft = 8;
  int wgrad_sms_ = 0;
  bool push_ = true;
  bool bcast_ = false;  // the broadcast layout where the direct dispatch runs (rows_ahead)
  // rows_ahead's call in flight: its x, N, the transport call it opened, and its copies' end
  bool ahead_ = false;
  bool ahead_sm_ = false;  // AUTOMOE_EP_AHEAD_SM=1: the rows ahead by the SMs' copy kernel
  const cuda::bf16* ahead_x_ = nullptr;
  int64_t ahead_n_ = 0;
  std::unique_ptr<cuda::EpPushDst> ahead_dst_;
  cudaEvent_t ahead_ev_ = nullptr;
  bool inplace_ = true;
  cudaEvent_t counted_ = nullptr;  // direct dispatch: the mail's counts read back (the host waits)
  // the split calls: which step comes next, the args of the call in progress, and where the
  // combine's rows came back (in place)
  enum class Step { kIdle, kFwdBegun, kFwdEnded, kBwdBegun, kBwdEnded };
  Step step_ = Step::kIdle;
  EpMoeFwdArgs fa_{};
  EpMoeBwdArgs ba_{};
  float g_beta_ = 0.f;
  bool inplace_now_ = false;
  std::unique_ptr<cuda::EpRowSources[]> src_;  // [2]
  bool split_ = false;                 // a comm stream with one chunk (the scratch's)
  const EpMoeCuda* wgrad_after_ = nullptr;
  void expect(Step want, const char* call) const;
  void check_saved() const;  // the backward's: a complete forward whose carve is still there
  cuda::Ctx wgrad_ctx(const cuda::Ctx& ctx) const;  // where the weight gradients run
  // the combine's rows back (nt = 1: y; 2: dx and dw) on the comm stream s
  void combine_back(Chunk& ch, int nt, bool inplace, cudaStream_t s);
  // the split calls' combine after the experts (signals, timing event ev, trace point what)
  void combine_after_experts(Chunk& ch, int nt, cudaEvent_t ev, const char* what,
                             const cuda::Ctx& ctx);
  // the combine's sum into out(i) (and dw(i) when not null) on ctx, after the rows came back
  template <class Out, class Dw>
  void sum_back(Chunk& ch, bool inplace, Out out, Dw dw, const cuda::Ctx& ctx);
  // a forward's first steps (call: the caller's name for expect's message)
  void start_forward(const char* call, int64_t N, const cuda::Ctx& ctx);
  cudaEvent_t wgrad_done_ = nullptr;  // on the scratch's side stream after this block's bwd
};

}  // namespace automoe::dist
