// dist/expert_parallel_cuda.cpp: EpMoeCuda (see expert_parallel_cuda.h): the EP expert block on
// the device over an EpTransport, built from the EP kernels (backend/cuda/ep_kernels.h) and the
// single-GPU MoE ops (moe_layout, permute, grouped_linear, swiglu, unpermute).
#include "dist/expert_parallel_cuda.h"

#include <algorithm>
#include <climits>
#include <cstdlib>

#include "backend/cuda/copy_many.h"
#include "backend/cuda/ep_kernels.h"
#include "backend/cuda/ops_cuda.h"
#include "backend/cuda/trace.h"
#include "core/check.h"
#include "dist/process_group.h"

namespace automoe::dist {

namespace cu = automoe::cuda;
using cu::bf16;
template <class T>
using Buf = cu::DeviceBuffer<T>;

namespace {

// AUTOMOE_EP_WGRAD_SMS: the CTAs of the weight gradients' persistent grids on the side stream
// (0 when unset: the block's default, the GPU's SMs less a few)
int wgrad_sms_env() {
  const char* v = std::getenv("AUTOMOE_EP_WGRAD_SMS");
  if (!v) return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  AM_CHECK(end != v && *end == 0 && n >= 1 && n <= 4096,
           "[EpMoeCuda] AUTOMOE_EP_WGRAD_SMS={}: give the weight gradients' grid in CTAs (1 to "
           "4096: below the GPU's SMs leaves SMs free, above it makes CTAs retire sooner) or "
           "leave it unset",
           v);
  return int(n);
}

// the SM count the side stream's GEMM workspace is sized for: the larger of the GPU's and
// AUTOMOE_EP_WGRAD_SMS
int side_sms() {
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(sms, wgrad_sms_env());
}

}  // namespace

// One local rank's counts and the carve of its last forward (the saved state, dist/ep_arena.h:
// pointers into the arena, valid while the arena's generation is carved_gen_).
struct EpMoeCuda::Rank {
  Buf<int32_t> cnt;      // padded: [2P] send counts | received counts
  Buf<int32_t> info;     // counts: [(1+P)*W] this rank's info row, then every rank's (row 1+s
                         //         from rank s): send rows [P], send picks [P], N, room
  int32_t* send_pos = nullptr;  // [N,P] (kept)
  int32_t* offsets = nullptr;   // [El+1] (kept)
  int32_t* slot_row = nullptr;  // [R*K] (kept)
  float* w_recv = nullptr;      // [R,K] (kept)
  bf16* x_recv = nullptr;       // [R,H] (kept)
  bf16* gu = nullptr;           // [M,2I] (kept; null with EpRecompute::kExperts)
  bf16* ys = nullptr;           // [M,H] (kept; null with kOutputs, kExperts)
};

// One token chunk of the last forward: tokens [t0, t0 + n) of every local rank, a complete EP
// pass of its own (with chunks = 1, all N tokens).
struct EpMoeCuda::Chunk {
  int idx = 0;  // c: its send/receive buffers are the scratch's local(c, i)
  int64_t t0 = 0, n = 0;
  std::vector<std::unique_ptr<Rank>> r;  // [L]
  // row plans of its all-to-alls, at [i*P + p] (EpA2aRows), and each local rank's rows (R) and
  // expert rows (M)
  std::vector<int64_t> send_off, send_cnt, recv_off, recv_cnt;
  std::vector<int64_t> R, M;  // [L]
  // the dispatch's row plan, and the combine's (the same rows back)
  EpA2aRows fwd_rows() const {
    return {send_off.data(), send_cnt.data(), recv_off.data(), recv_cnt.data()};
  }
  EpA2aRows back_rows() const {
    return {recv_off.data(), recv_cnt.data(), send_off.data(), send_cnt.data()};
  }
  int32_t* host_cnt = nullptr;   // [L, P, W] of EpMoeCuda::host_cnt_ (counts mode)
  int32_t* host_tail = nullptr;  // [L, 2] of host_tail_
  // chunks > 1: the hand-offs between the caller's stream (compute) and the comm stream:
  // packed (compute: its send rows written), arrived (comm: its rows received), computed
  // (compute: its expert outputs or dx rows written), returned (comm: its rows back)
  cudaEvent_t packed = nullptr, arrived = nullptr, computed = nullptr, returned = nullptr;
  // chunks > 1, set_timing: around its transport calls on the comm stream, [0,1] the counts
  // exchange, [2,3] dispatch, [4,5] combine, [6,7] the backward's dispatch, [8,9] its combine
  cudaEvent_t tev[10] = {};
};

size_t EpMoeCuda::workspace_bytes(const EpMoeShape& s, int P) {
  const int64_t El = s.E / std::max(P, 1);
  return std::max(cu::grouped_linear_workspace_bytes(El),
                  cu::moe_layout_workspace_bytes(int64_t(std::max(P, 1)) * s.max_tokens, s.K, El));
}

EpMoeScratch::EpMoeScratch(const EpMoeShape& s, int P, int local_ranks, EpMode m, EpRecompute rc,
                           int chunks_, bool split)
    : chunks(chunks_), mode(m), recompute(rc) {
  check_ep_chunks(chunks);
  P = std::max(P, 1);
  // one chunk's tokens at most (ep_chunk_tokens)
  const int64_t El = s.E / P, Nmax = (s.max_tokens + chunks - 1) / chunks;
  Rcap = int64_t(P) * Nmax;
  Mcap = Rcap * std::min(s.K, std::max<int64_t>(El, 1));
  Scap = mode == EpMode::kPadded ? Rcap : Nmax * std::min<int64_t>(P, s.K);
  xs = Buf<bf16>(size_t(Mcap * s.H));
  act = Buf<bf16>(size_t(Mcap * s.I));
  dys = Buf<bf16>(size_t(Mcap * s.H));
  dact = Buf<bf16>(size_t(Mcap * s.I));
  dgu = Buf<bf16>(size_t(Mcap * 2 * s.I));
  if (rc == EpRecompute::kExperts) gu = Buf<bf16>(size_t(Mcap * 2 * s.I));
  CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreateWithFlags(&inputs_ready, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&wgrad_done, cudaEventDisableTiming));
  side_ws = Buf<unsigned char>(
      cu::grouped_linear_workspace_bytes(std::max<int64_t>(El, 1), side_sms()));
  if (chunks > 1) {
    const int64_t L = std::max(local_ranks, 1);
    acc_gu = Buf<float>(size_t(L * El * 2 * s.I * s.H));
    acc_down = Buf<float>(size_t(L * El * s.H * s.I));
  }
  if (chunks > 1 || split) comm = cu::create_priority_stream();
  local.resize(size_t(std::max(local_ranks, 1)) * size_t(chunks));
  for (Local& l : local) {
    l.send_pos = Buf<int32_t>(size_t(Nmax * P));
    l.x_send = Buf<bf16>(size_t(Scap * s.H));
    l.idx_send = Buf<int32_t>(size_t(Scap * s.K));
    l.w_send = Buf<float>(size_t(Scap * s.K));
    l.idx_recv = Buf<int32_t>(size_t(Rcap * s.K));
    l.dw_recv = Buf<float>(size_t(Rcap * s.K));
    l.y_recv = Buf<bf16>(size_t(Rcap * s.H));
  }
}

EpMoeScratch::~EpMoeScratch() {
  if (side) {
    cudaStreamSynchronize(side);  // its kernels may still read the buffers freed below
    cudaStreamDestroy(side);
  }
  if (comm) {
    cudaStreamSynchronize(comm);  // its copies may still write the buffers freed below
    cudaStreamDestroy(comm);
  }
  if (inputs_ready) cudaEventDestroy(inputs_ready);
  if (wgrad_done) cudaEventDestroy(wgrad_done);
}

void EpMoeScratch::wait_wgrad(cudaStream_t stream) const {
  CUDA_CHECK(cudaStreamWaitEvent(stream, wgrad_done, 0));
}

size_t EpMoeScratch::bytes() const {
  size_t b = xs.bytes() + act.bytes() + dys.bytes() + dact.bytes() + dgu.bytes() + gu.bytes() +
             side_ws.bytes() + acc_gu.bytes() + acc_down.bytes();
  for (const Local& l : local)
    b += l.send_pos.bytes() + l.x_send.bytes() + l.idx_send.bytes() + l.w_send.bytes() +
         l.idx_recv.bytes() + l.dw_recv.bytes() + l.y_recv.bytes();
  return b;
}

EpSavedArena::EpSavedArena(size_t bytes, std::string w)
    : bump(bytes), mem(bytes), what(std::move(w)) {}

EpMoeCuda::EpMoeCuda(EpTransport& t, const EpMoeShape& shape, EpMode mode, EpRecompute recompute,
                     std::shared_ptr<EpMoeScratch> scratch, std::shared_ptr<EpSavedArena> arena,
                     std::string label, int chunks)
    : t_(t), s_(shape), mode_(mode), rc_(recompute), P_(t.size()), L_(t.num_local()), C_(chunks),
      sc_(std::move(scratch)), arena_(std::move(arena)), label_(std::move(label)) {
  check_ep_chunks(C_);
  // the buffers are per chunk: at most ceil(max_tokens / C) tokens (ep_chunk_tokens)
  const int64_t H = s_.H, I = s_.I, E = s_.E, K = s_.K, Nmax = (s_.max_tokens + C_ - 1) / C_;
  AM_CHECK(H > 0 && I > 0 && K > 0 && Nmax >= 0, "[EpMoeCuda] needs H, I, K > 0 (got {}, {}, {})",
           H, I, K);
  AM_CHECK(E % P_ == 0,
           "[EpMoeCuda] {} experts cannot be split evenly over {} expert-parallel ranks; choose an "
           "EP size that divides {}",
           E, P_, E);
  AM_CHECK(K <= E, "[EpMoeCuda] top-{} of {} experts", K, E);
  El_ = E / P_;
  AM_CHECK(El_ <= 1024, "[EpMoeCuda] {} experts per rank: the receiver's moe_layout takes at most "
           "1024; use more EP ranks",
           El_);
  Scap_ = mode_ == EpMode::kPadded ? P_ * Nmax : Nmax * std::min<int64_t>(P_, K);
  Rcap_ = P_ * Nmax;
  Mcap_ = Rcap_ * std::min(K, El_);
  W_ = 2 * P_ + 2;
  AM_CHECK(Mcap_ < (int64_t(1) << 31),
           "[EpMoeCuda] {} tokens per rank x {} ranks x {} picks do not fit int32 rows; use fewer "
           "tokens per micro-batch",
           Nmax, P_, std::min(K, El_));
  const size_t LP = size_t(L_) * P_;
  for (int c = 0; c < C_; ++c) {
    auto ch = std::make_unique<Chunk>();
    ch->idx = c;
    for (int i = 0; i < L_; ++i) {
      auto r = std::make_unique<Rank>();
      r->cnt = Buf<int32_t>(size_t(2 * P_));
      r->info = Buf<int32_t>(size_t((1 + P_) * W_));
      bytes_ += r->cnt.bytes() + r->info.bytes();
      ch->r.push_back(std::move(r));
    }
    ch->send_off.assign(LP, 0);
    ch->send_cnt.assign(LP, 0);
    ch->recv_off.assign(LP, 0);
    ch->recv_cnt.assign(LP, 0);
    ch->R.assign(size_t(L_), 0);
    ch->M.assign(size_t(L_), 0);
    if (C_ > 1)
      for (cudaEvent_t& e : ch->tev) CUDA_CHECK(cudaEventCreate(&e));
    ch_.push_back(std::move(ch));
  }
  if (sc_) {
    AM_CHECK(sc_->chunks == C_,
             "[EpMoeCuda] {} pipelines {} token chunks but its shared scratch was built for {}; "
             "build the EpMoeScratch with the same chunks (train.ep_chunks)",
             label_, C_, sc_->chunks);
    AM_CHECK(sc_->Mcap >= Mcap_ && sc_->Rcap >= Rcap_ && sc_->Scap >= Scap_ &&
                 sc_->local.size() >= size_t(C_ * L_) && sc_->xs.size() >= size_t(Mcap_ * H) &&
                 sc_->dgu.size() >= size_t(Mcap_ * 2 * I) &&
                 sc_->local[0].send_pos.size() >= size_t(Nmax * P_) &&
                 sc_->side_ws.bytes() >= cu::grouped_linear_workspace_bytes(El_, side_sms()) &&
                 (C_ == 1 || sc_->acc_down.size() >= size_t(L_ * El_ * H * I)),
             "internal: [EpMoeCuda] a shared scratch of {} slots, {} send rows and {} local ranks "
             "for a block of {}, {} and {}",
             sc_->Mcap, sc_->Scap, sc_->local.size(), Mcap_, Scap_, L_);
    AM_CHECK(rc_ != EpRecompute::kExperts || sc_->gu.size() >= size_t(Mcap_ * 2 * I),
             "[EpMoeCuda] {} recomputes the experts (EpRecompute::kExperts) but its shared "
             "scratch has no gate|up buffer; build the EpMoeScratch with EpRecompute::kExperts",
             label_);
  } else {
    sc_ = std::make_shared<EpMoeScratch>(s_, P_, L_, mode_, rc_, C_);
    bytes_ += sc_->bytes();
  }
  split_ = C_ == 1 && sc_->comm;  // the split calls' comm stream (a scratch built with `split`)
  if (C_ > 1 || split_)  // the hand-offs between the caller's stream and the comm stream
    for (auto& ch : ch_)
      for (cudaEvent_t* e : {&ch->packed, &ch->arrived, &ch->computed, &ch->returned})
        CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  src_ = std::make_unique<cu::EpRowSources[]>(2);
  if (!arena_) {  // one forward's state at the worst routing, reset at each forward
    arena_ = std::make_shared<EpSavedArena>(ep_arena_worst_bytes(s_, P_, L_, rc_, C_),
                                            "the worst routing of one layer");
    own_arena_ = true;
    bytes_ += arena_->bytes();
  }

  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_cnt_),
                            size_t(C_) * LP * size_t(W_) * sizeof(int32_t)));
  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_tail_),
                            size_t(C_) * size_t(L_) * 2 * sizeof(int32_t)));
  for (int c = 0; c < C_; ++c) {
    ch_[size_t(c)]->host_cnt = host_cnt_ + size_t(c) * LP * size_t(W_);
    ch_[size_t(c)]->host_tail = host_tail_ + size_t(c) * size_t(L_) * 2;
  }
  // The largest all-to-all: dispatch's rows (x, picks, weights), or dispatch's backward with
  // send and receive swapped; at most Rcap >= Scap rows either way (staging transports).
  // Between one rank and one peer, at most Nmax rows of them: a token goes once to each
  // destination rank (padded: N rows per peer), a combine returns at most the rows that came;
  // or one info row (counts) or count (padded). Collective with IPC (see reserve()). With
  // chunks, one call moves one chunk's rows: Nmax here is a chunk's.
  const size_t row_bytes = size_t(2 * H + 8 * K);
  const size_t a2a_bytes = std::max(size_t(std::max(Scap_, Rcap_)) * row_bytes,
                                    size_t(P_ * W_) * sizeof(int32_t)) *
                           size_t(L_);
  const size_t pair_bytes = std::max(size_t(Nmax) * row_bytes, size_t(W_) * sizeof(int32_t));
  t_.reserve(a2a_bytes, a2a_bytes, pair_bytes);
  unit_off_.resize(LP);
  unit_cnt_.assign(LP, 1);
  zero_off_.assign(LP, 0);
  for (size_t i = 0; i < LP; ++i) unit_off_[i] = int64_t(i % P_);
  ptr_send_.assign(size_t(3 * L_), nullptr);
  ptr_recv_.assign(size_t(3 * L_), nullptr);
  for (cudaEvent_t& e : ev_) CUDA_CHECK(cudaEventCreate(&e));
  for (cudaEvent_t& e : evb_) CUDA_CHECK(cudaEventCreate(&e));
  for (cudaEvent_t& e : evd_) CUDA_CHECK(cudaEventCreate(&e));
  if (C_ > 1 || split_) CUDA_CHECK(cudaEventCreateWithFlags(&laid_out_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&wgrad_done_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&counted_, cudaEventDisableTiming));
  wgrad_overlap_ = env_on("AUTOMOE_EP_WGRAD_OVERLAP");
  wgrad_sms_ = wgrad_sms_env();
  push_ = env_on("AUTOMOE_EP_PUSH");
  {  // the broadcast layout: opt-in (AUTOMOE_EP_BROADCAST=1); it did not pay at W2 (RESULTS
     // 2026-11-30)
    const char* v = std::getenv("AUTOMOE_EP_BROADCAST");
    AM_CHECK(!v || std::string(v) == "0" || std::string(v) == "1",
             "[EpMoeCuda] AUTOMOE_EP_BROADCAST={}: give 1 (on) or 0 (off, the default)", v);
    bcast_ = v && std::string(v) == "1" && P_ > 1 && P_ <= K;  // P * N own rows fit x_send
  }
  const char* ahead_sm = std::getenv("AUTOMOE_EP_AHEAD_SM");
  ahead_sm_ = ahead_sm && std::string(ahead_sm) == "1";
  ahead_dst_ = std::make_unique<cu::EpPushDst>();
  CUDA_CHECK(cudaEventCreateWithFlags(&ahead_ev_, cudaEventDisableTiming));
  inplace_ = env_on("AUTOMOE_EP_INPLACE");
}

EpMoeCuda::~EpMoeCuda() {
  // our weight gradients may still read an arena freed with us (the scratch waits for itself)
  if (wgrad_done_) {
    cudaEventSynchronize(wgrad_done_);
    cudaEventDestroy(wgrad_done_);
  }
  if (counted_) cudaEventDestroy(counted_);
  if (ahead_ev_) cudaEventDestroy(ahead_ev_);
  for (cudaEvent_t e : ev_)
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : evd_)
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : evb_)
    if (e) cudaEventDestroy(e);
  if (laid_out_) cudaEventDestroy(laid_out_);
  for (auto& ch : ch_) {
    for (cudaEvent_t e : {ch->packed, ch->arrived, ch->computed, ch->returned})
      if (e) cudaEventDestroy(e);
    for (cudaEvent_t e : ch->tev)
      if (e) cudaEventDestroy(e);
  }
  if (host_cnt_) cudaFreeHost(host_cnt_);
  if (host_tail_) cudaFreeHost(host_tail_);
}

template <class S, class D>
EpA2aTensor EpMoeCuda::tensor(int slot, EpDtype dt, int64_t row_elems, S send_of, D recv_of) {
  for (int i = 0; i < L_; ++i) {
    ptr_send_[slot * L_ + i] = send_of(i);
    ptr_recv_[slot * L_ + i] = recv_of(i);
  }
  return {dt, row_elems, ptr_send_.data() + slot * L_, ptr_recv_.data() + slot * L_};
}

void EpMoeCuda::join(cudaStream_t stream) const {
  CUDA_CHECK(cudaStreamWaitEvent(stream, wgrad_done_, 0));
}

int64_t EpMoeCuda::rows_received(int i) const {
  if (mode_ != EpMode::kCounts) return -1;
  int64_t R = 0;
  for (const auto& ch : ch_) R += ch->R.at(size_t(i));
  return R;
}

int64_t EpMoeCuda::picks_received(int i) const {
  if (mode_ != EpMode::kCounts) return -1;
  int64_t M = 0;
  for (const auto& ch : ch_) M += ch->M.at(size_t(i));
  return M;
}

bool EpMoeCuda::use_push(const bf16* rows) const {
  // the kernel moves 16-byte pieces of rows (the regions and scratch are 256-byte aligned)
  return push_ && C_ == 1 && L_ == 1 && t_.can_push() && s_.H % 8 == 0 &&
         reinterpret_cast<uintptr_t>(rows) % 16 == 0;
}

bool EpMoeCuda::use_bcast(const bf16* rows) const {
  return bcast_ && mode_ == EpMode::kCounts && use_push(rows);
}

bool EpMoeCuda::use_inplace(const bf16* out) const {
  // ep_combine_unpack_sources reads and writes 16-byte pieces of rows (the transport's row
  // sources are aligned: staging regions, or send and receive buffers at whole rows)
  return inplace_ && C_ == 1 && L_ == 1 && P_ <= cu::kEpPushMaxRanks && s_.H % 8 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

void EpMoeCuda::return_inplace(Chunk& ch, int nt, cu::EpRowSources* src, cudaStream_t s) {
  const int P = P_;
  const void* at[2 * cu::kEpPushMaxRanks] = {};
  const EpA2aTensor t[2] = {
      tensor(0, EpDtype::kBf16, s_.H, [&](int) { return local(ch.idx, 0).y_recv.get(); },
             [&](int) { return local(ch.idx, 0).x_send.get(); }),
      tensor(1, EpDtype::kF32, s_.K, [&](int) { return local(ch.idx, 0).dw_recv.get(); },
             [&](int) { return local(ch.idx, 0).w_send.get(); })};
  const EpA2aRows rows = ch.back_rows();
  t_.alltoallv_inplace(t, nt, rows, s, at);
  for (int k = 0; k < nt; ++k)
    for (int d = 0; d < P; ++d) {
      src[k].rows[d] = at[k * P + d];
      src[k].first[d] = rows.recv_off[d];  // where d's rows would start in x_send / w_send
    }
}

// The combine: chunk ch's rows back to their tokens' ranks, on the comm stream s (nt = 1: the
// forward's y rows; 2: the backward's dx and dw rows): in place (the sum reads them where they
// came; src_) or into x_send (and w_send).
void EpMoeCuda::combine_back(Chunk& ch, int nt, bool inplace, cudaStream_t s) {
  if (inplace) {
    return_inplace(ch, nt, src_.get(), s);
    return;
  }
  EpA2aTensor t[2] = {
      tensor(0, EpDtype::kBf16, s_.H, [&](int i) { return local(ch.idx, i).y_recv.get(); },
             [&](int i) { return local(ch.idx, i).x_send.get(); }),
      tensor(1, EpDtype::kF32, s_.K, [&](int i) { return local(ch.idx, i).dw_recv.get(); },
             [&](int i) { return local(ch.idx, i).w_send.get(); })};
  t_.alltoallv(t, nt, ch.back_rows(), s);
}

// The split calls' combine, once the experts' rows (nt = 1: y; 2: dx and dw) are written on the
// caller's stream: on the comm stream after them (`ev` recorded first when timing), in place or
// not as inplace_now_ says; `returned` when the rows are back.
void EpMoeCuda::combine_after_experts(Chunk& ch, int nt, cudaEvent_t ev, const char* what,
                                      const cu::Ctx& ctx) {
  const cudaStream_t cs = comm_stream(ctx);
  signal(ch.computed, ctx.stream);
  await(cs, ch.computed);
  if (timing_) CUDA_CHECK(cudaEventRecord(ev, cs));
  combine_back(ch, nt, inplace_now_, cs);
  cu::trace_mark(cs, label_, what);
  signal(ch.returned, cs);
}

// The combine's sum: once chunk ch's rows are back (`returned`), every local rank's token rows
// summed in rank order into out(i) (and, with the backward's dw rows, dw(i)); in place from
// src_, then the transport may reuse its staging (inplace_end).
template <class Out, class Dw>
void EpMoeCuda::sum_back(Chunk& ch, bool inplace, Out out, Dw dw, const cu::Ctx& ctx) {
  await(ctx.stream, ch.returned);
  if (inplace) {
    float* d = dw(0);
    cu::ep_combine_unpack_sources(out(0), d, src_[0], d ? &src_[1] : nullptr, ch.r[0]->send_pos,
                                  ch.n, s_.H, s_.K, P_, ctx);
    t_.inplace_end(ctx.stream);
    return;
  }
  for (int i = 0; i < L_; ++i) {
    float* d = dw(i);
    cu::ep_combine_unpack(out(i), d, local(ch.idx, i).x_send.get(),
                          d ? local(ch.idx, i).w_send.get() : nullptr, ch.r[i]->send_pos, ch.n,
                          s_.H, s_.K, P_, ctx);
  }
}

cu::EpPushDst EpMoeCuda::push_begin(cudaStream_t s) {
  cu::EpPushDst dst;
  size_t cap = 0;
  t_.push_begin(s, dst.region, &cap);
  dst.cap = int64_t(cap);
  return dst;
}

cudaStream_t EpMoeCuda::comm_stream(const cu::Ctx& ctx) const {
  return C_ > 1 || split_ ? sc_->comm : ctx.stream;
}

void EpMoeCuda::signal(cudaEvent_t e, cudaStream_t s) const {
  if (C_ > 1 || split_) CUDA_CHECK(cudaEventRecord(e, s));
}

void EpMoeCuda::await(cudaStream_t s, cudaEvent_t e) const {
  if (C_ > 1 || split_) CUDA_CHECK(cudaStreamWaitEvent(s, e, 0));
}

void EpMoeCuda::mark(Chunk& c, int k, cudaStream_t s) const {
  if (timing_ && C_ > 1) CUDA_CHECK(cudaEventRecord(c.tev[k], s));
}

// The [rows, H] bf16 rows of chunk ch's buffers `from` to the peers' `to`, every local rank.
void EpMoeCuda::move_rows(Chunk& ch, cu::DeviceBuffer<bf16> EpMoeScratch::Local::*from,
                          cu::DeviceBuffer<bf16> EpMoeScratch::Local::*to, const EpA2aRows& rows,
                          cudaStream_t s) {
  EpA2aTensor t = tensor(0, EpDtype::kBf16, s_.H, [&](int i) { return (local(ch.idx, i).*from).get(); },
                         [&](int i) { return (local(ch.idx, i).*to).get(); });
  t_.alltoallv(&t, 1, rows, s);
}

// Padded: each rank's send counts (cnt[0,P)) to every peer, landing in the peer's cnt[P, 2P) at
// the sender's index: one int32 per (rank, peer).
void EpMoeCuda::exchange_counts(Chunk& ch, const cu::Ctx& ctx) {
  EpA2aTensor c = tensor(0, EpDtype::kI32, 1, [&](int i) { return ch.r[i]->cnt.get(); },
                         [&](int i) { return ch.r[i]->cnt.get() + P_; });
  EpA2aRows rows{unit_off_.data(), unit_cnt_.data(), unit_off_.data(), unit_cnt_.data()};
  t_.alltoallv(&c, 1, rows, ctx.stream);
}

// Counts: every rank's info row (its send rows and picks per destination, from ep_layout; its N
// and the room left in its arena, from here) to every rank: info row 0 goes to every peer and
// lands at row 1+s of the peer's info, s the sender. P*W int32 per rank, the same all-to-all as
// the counts alone, so no extra sync; every rank then knows every rank's need and room. Every
// chunk reports the room left before the layer's first carve (check_room() adds the chunks).
// info_tail writes that N and room into the info row; the direct dispatch sends the row as its
// call's mail instead (EpTransport::push_mail).
void EpMoeCuda::info_tail(Chunk& ch, cudaStream_t s) {
  const size_t room = arena_->bump.left() / kEpArenaAlign;  // whole units: carves are aligned
  for (int i = 0; i < L_; ++i) {
    ch.host_tail[2 * i] = int32_t(ch.n);
    ch.host_tail[2 * i + 1] = int32_t(std::min<size_t>(room, INT32_MAX));
    CUDA_CHECK(cudaMemcpyAsync(ch.r[i]->info.get() + 2 * P_, ch.host_tail + 2 * i,
                               2 * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  }
}

void EpMoeCuda::exchange_info(Chunk& ch, const cu::Ctx& ctx) {
  info_tail(ch, ctx.stream);
  EpA2aTensor c = tensor(0, EpDtype::kI32, W_, [&](int i) { return ch.r[i]->info.get(); },
                         [&](int i) { return ch.r[i]->info.get() + W_; });
  EpA2aRows rows{zero_off_.data(), unit_cnt_.data(), unit_off_.data(), unit_cnt_.data()};
  t_.alltoallv(&c, 1, rows, ctx.stream);
}

// Counts, after the sync: every rank's need for this layer (all its chunks' carves) from the
// info rows (the same on every process), against the room it reported. The ranks of this
// process share its arena and carve one after another (loopback); a rank of another process
// has its own (one rank per process over NCCL or MPI). The first rank that does not fit names
// the error, on every rank.
void EpMoeCuda::check_room() {
  const int P = P_;
  std::vector<bool> local(size_t(P), false);
  for (int i = 0; i < L_; ++i) local[size_t(t_.rank_of(i))] = true;
  const size_t left0 = arena_->bump.left();
  size_t local_used = 0;
  for (int d = 0; d < P; ++d) {
    int64_t R = 0, M = 0;
    size_t need = 0;
    for (const auto& ch : ch_) {
      const int32_t* row = ch->host_cnt;  // local rank 0's copy of every rank's row: [P][W]
      int64_t Rc = 0, Mc = 0;
      for (int s = 0; s < P; ++s) {
        Rc += row[s * W_ + d];
        Mc += row[s * W_ + P + d];
      }
      const int64_t N = row[d * W_ + 2 * P];
      need += ep_align(ep_saved_layout(s_, P, N, Rc, Mc, rc_).bytes);
      R += Rc;
      M += Mc;
    }
    const size_t room = local[size_t(d)]
                            ? left0 - std::min(left0, local_used)
                            : size_t(ch_[0]->host_cnt[d * W_ + 2 * P + 1]) * kEpArenaAlign;
    if (need > room)
      AM_FAIL("{} ({})", ep_arena_overflow_message(label_, d, need, room, arena_->bump.capacity(), R, M),
              arena_->what);
    if (local[size_t(d)]) local_used += need;
  }
}

// Padded: every local rank carves the worst case of each chunk's tokens, whatever the routing:
// the same bytes on every rank for the same N and arena, so all ranks decide alike without an
// exchange.
void EpMoeCuda::check_room_padded() {
  size_t need = 0;
  int64_t N = 0;
  for (const auto& ch : ch_) {
    N += ch->n;
    for (int i = 0; i < L_; ++i)
      need += ep_align(ep_saved_layout(s_, P_, ch->n, ch->R[i], ch->M[i], rc_).bytes);
  }
  if (need > arena_->bump.left())
    AM_FAIL("{} ({})",
            ep_arena_padded_overflow_message(label_, need, arena_->bump.left(),
                                             arena_->bump.capacity(), N),
            arena_->what);
}

void EpMoeCuda::set_plan(Chunk& ch) {
  const int P = P_;
  const int64_t N = ch.n;
  for (int i = 0; i < L_; ++i) {
    const int d = t_.rank_of(i);
    const int32_t* row = ch.host_cnt + size_t(i) * P * W_;  // counts: every rank's info row
    int64_t so = 0, ro = 0, picks = 0;
    for (int p = 0; p < P; ++p) {
      const size_t k = size_t(i) * P + p;
      if (mode_ == EpMode::kPadded) {  // regions of N rows, whatever the counts
        ch.send_off[k] = ch.recv_off[k] = p * N;
        ch.send_cnt[k] = ch.recv_cnt[k] = N;
      } else {  // packed, from the counts read back
        ch.send_cnt[k] = row[d * W_ + p];
        ch.recv_cnt[k] = row[p * W_ + d];
        picks += row[p * W_ + P + d];
        ch.send_off[k] = so;
        ch.recv_off[k] = ro;
        so += ch.send_cnt[k];
        ro += ch.recv_cnt[k];
      }
    }
    ch.R[i] = mode_ == EpMode::kPadded ? P * N : ro;
    ch.M[i] = mode_ == EpMode::kPadded ? ch.R[i] * std::min(s_.K, El_) : picks;
    AM_CHECK(so <= Scap_ && ch.R[i] <= Rcap_ && ch.M[i] <= Mcap_,
             "internal: EP rank {} sends {} rows (capacity {}) and receives {} (capacity {}) with "
             "{} picks (capacity {})",
             d, so, Scap_, ch.R[i], Rcap_, ch.M[i], Mcap_);
  }
}

// This forward's saved state of every local rank of chunk ch, in local order, and the layout
// copied in.
void EpMoeCuda::carve(Chunk& ch, const cu::Ctx& ctx) {
  unsigned char* base = arena_->mem.get();
  for (int i = 0; i < L_; ++i) {
    Rank& r = *ch.r[i];
    const EpSavedLayout l = ep_saved_layout(s_, P_, ch.n, ch.R[i], ch.M[i], rc_);
    const int64_t at = arena_->bump.take(l.bytes);
    AM_CHECK(at >= 0, "internal: [EpMoeCuda] {}: {} bytes passed the room check but do not fit "
             "the {} left",
             label_, l.bytes, arena_->bump.left());
    unsigned char* p = base + at;
    r.send_pos = reinterpret_cast<int32_t*>(p + l.send_pos);
    r.offsets = reinterpret_cast<int32_t*>(p + l.offsets);
    r.slot_row = reinterpret_cast<int32_t*>(p + l.slot_row);
    r.w_recv = reinterpret_cast<float*>(p + l.w_recv);
    r.x_recv = reinterpret_cast<bf16*>(p + l.x_recv);
    r.gu = l.gu == kEpNotSaved ? nullptr : reinterpret_cast<bf16*>(p + l.gu);
    r.ys = l.ys == kEpNotSaved ? nullptr : reinterpret_cast<bf16*>(p + l.ys);
    if (mode_ == EpMode::kCounts && ch.n > 0)  // padded: ep_layout wrote it in place
      CUDA_CHECK(cudaMemcpyAsync(r.send_pos, local(ch.idx, i).send_pos.get(),
                                 size_t(ch.n * P_) * sizeof(int32_t), cudaMemcpyDeviceToDevice,
                                 ctx.stream));
  }
  carved_gen_ = arena_->bump.generation();
}

// Padded: the received rows of local rank i in regions of the chunk's n rows per source, the
// first r.cnt[P + s] of region s holding tokens (ops_cuda.h, RowRegions); counts: none (packed).
// The padding rows' outputs are left unwritten, and nothing reads them: the sender's
// ep_combine_unpack reads its returned rows at send_pos only, i.e. rows [d*n, d*n + send_cnt[d])
// of region d, and send_cnt[d] is the receiver's cnt[P + s]; the rest of y_recv's and dw_recv's
// regions travels back over the wire unread. Rows past offsets[El] of the expert buffers (xs,
// gu, act, ys, dys, dact, dgu) are in no group: the grouped GEMMs neither read nor write them,
// so SwiGLU stops there too and no padding reaches a weight gradient.
cu::RowRegions EpMoeCuda::padding(const Chunk& ch, int i) const {
  if (mode_ == EpMode::kCounts || ch.n <= 0) return {};  // n = 0: no rows, no kernel runs
  return {ch.r[size_t(i)]->cnt.get() + P_, ch.n};
}

// Padded: the expert rows that came, on the device (offsets[El] of the last forward's layout),
// for SwiGLU; counts: null (M is exact).
const int32_t* EpMoeCuda::expert_rows(const Chunk& ch, int i) const {
  return mode_ == EpMode::kCounts ? nullptr : ch.r[size_t(i)]->offsets + El_;
}

// The local experts over chunk ch's received rows of local rank i (M: their picks, the expert
// rows). Padded: R and M are the host's bounds (P*n rows, P*n*min(K, El) picks); the work
// follows the rows that came (see padding()): moe_layout does not read the padding rows' picks
// (their slot_row is -1, so permute_fwd skips them), the grouped GEMMs and SwiGLU stop at
// offsets[El], and unpermute leaves the padding rows of y_recv unwritten.
void EpMoeCuda::experts_fwd(Chunk& ch, int i, const EpMoeFwdArgs& a, const cu::Ctx& ctx) {
  const int64_t H = s_.H, I = s_.I, K = s_.K, El = El_;
  Rank& r = *ch.r[i];
  EpMoeScratch::Local& l = local(ch.idx, i);
  const int64_t R = ch.R[i], M = ch.M[i];
  const cu::RowRegions rows = padding(ch, i);
  const int32_t* m_rows = expert_rows(ch, i);
  // kept in the carve, or (recompute) in the scratch for this call only
  bf16* gu = r.gu ? r.gu : sc_->gu.get();  // [M,2I]
  bf16* ys = r.ys ? r.ys : sc_->xs.get();  // [M,H]: xs is dead after the gate_up GEMM
  cu::moe_layout(r.offsets, r.slot_row, l.idx_recv.get(), R, El, K, ctx, rows);
  cu::permute_fwd(sc_->xs.get(), r.x_recv, r.slot_row, R, K, H, ctx);
  cu::grouped_linear_fwd(gu, sc_->xs.get(), a.w_gu, r.offsets, M, El, H, 2 * I, ctx);
  cu::swiglu_fwd(sc_->act.get(), gu, M, I, ctx, m_rows);
  cu::grouped_linear_fwd(ys, sc_->act.get(), a.w_down, r.offsets, M, El, I, H, ctx);
  cu::unpermute_fwd(l.y_recv.get(), ys, r.w_recv, r.slot_row, R, K, H, ctx, rows);
}

// The pipeline (chunks > 1; with one chunk every stream below is the caller's, and the launches
// are those of the unchunked block, in its order):
//   compute (ctx.stream)  layouts | packs | [carves] | experts 0 | experts 1 | unpack 0 | ...
//   comm                  counts exchanges | [sync] | dispatch 0 | dispatch 1 | combine 0 | ...
// dispatch c waits for the packs, experts c for dispatch c, combine c for experts c, unpack c
// for combine c: dispatch c+1 runs beside experts c, combine c beside experts c+1. Every rank
// enqueues the same transport calls in the same order (IPC's rule), on one stream.
void EpMoeCuda::fwd(const EpMoeFwdArgs* a, int64_t N, const cu::Ctx& ctx) {
  const int64_t H = s_.H, K = s_.K, El = El_;
  const int P = P_;
  // The direct dispatch (one chunk, one rank per process, a transport that can): the split
  // calls in a row (on the caller's stream, unless the scratch has a comm stream)
  if (mode_ == EpMode::kCounts && use_push(a[0].x)) {
    fwd_begin(a[0], N, ctx);
    fwd_end(ctx);
    fwd_finish(ctx);
    return;
  }
  start_forward("fwd", N, ctx);
  const bool counts = mode_ == EpMode::kCounts;
  const cudaStream_t cs = comm_stream(ctx);
  cu::Ctx cctx = ctx;  // the transport calls' (exchange_*)
  cctx.stream = cs;
  for (int c = 0; c < C_; ++c) {
    ch_[c]->t0 = ep_chunk_begin(N, C_, c);
    ch_[c]->n = ep_chunk_tokens(N, C_, c);
  }
  if (!counts) {  // padded: the plans and the carves need N only, so they come first, on the host
    for (auto& ch : ch_) set_plan(*ch);
    check_room_padded();  // throws on every rank alike, before anything is enqueued
    for (auto& ch : ch_) carve(*ch, ctx);
  }
  // the layout's send_pos: counts mode's carve is not known yet (it needs the counts), so the
  // scratch holds it until the carve; padded mode's goes straight into the carve
  auto pos = [&](Chunk& ch, int i) {
    return counts ? local(ch.idx, i).send_pos.get() : ch.r[i]->send_pos;
  };
  if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(ev_[0], ctx.stream));
  // ---- layout and dispatch: the counts (counts: every rank's info row; padded: the counts
  // only), the pack, and after the host's plan the rows' all-to-all
  for (auto& chp : ch_) {
    Chunk& ch = *chp;
    for (int i = 0; i < L_; ++i) {
      int32_t* cnt = counts ? ch.r[i]->info.get() : ch.r[i]->cnt.get();
      cu::ep_layout(pos(ch, i), cnt, counts ? cnt + P : nullptr, a[i].topk_idx + ch.t0 * K, ch.n,
                    K, El, P, counts ? 0 : ch.n, ctx);
    }
  }
  signal(laid_out_, ctx.stream);
  await(cs, laid_out_);
  for (auto& chp : ch_) {
    mark(*chp, 0, cs);
    if (counts) exchange_info(*chp, cctx);
    else exchange_counts(*chp, cctx);
    mark(*chp, 1, cs);
  }
  for (auto& chp : ch_) {
    Chunk& ch = *chp;
    for (int i = 0; i < L_; ++i) {
      EpMoeScratch::Local& l = local(ch.idx, i);
      cu::ep_dispatch_pack(l.x_send.get(), l.idx_send.get(), l.w_send.get(), a[i].x + ch.t0 * H,
                           a[i].topk_idx + ch.t0 * K, a[i].topk_w + ch.t0 * K, pos(ch, i), ch.n,
                           H, K, El, P, ctx);
    }
    signal(ch.packed, ctx.stream);
  }
  if (counts) {  // the one host sync (for all chunks): the counts size the all-to-all-v and the
                 // saved state
    for (auto& chp : ch_)
      for (int i = 0; i < L_; ++i)
        CUDA_CHECK(cudaMemcpyAsync(chp->host_cnt + size_t(i) * P * W_, chp->r[i]->info.get() + W_,
                                   size_t(P * W_) * sizeof(int32_t), cudaMemcpyDeviceToHost, cs));
    t_.sync(cs);
    check_room();  // throws on every rank alike, before any rows move
    for (auto& ch : ch_) set_plan(*ch);
    for (auto& ch : ch_) carve(*ch, ctx);
  }
  N_ = N;
  pushed_ = false;
  bwd_timed_ = false;  // until this forward's backward records its events
  for (auto& chp : ch_) {
    Chunk& ch = *chp;
    await(cs, ch.packed);
    mark(ch, 2, cs);
    EpA2aTensor t[3] = {
        tensor(0, EpDtype::kBf16, H, [&](int i) { return local(ch.idx, i).x_send.get(); },
               [&](int i) { return ch.r[i]->x_recv; }),
        tensor(1, EpDtype::kI32, K, [&](int i) { return local(ch.idx, i).idx_send.get(); },
               [&](int i) { return local(ch.idx, i).idx_recv.get(); }),
        tensor(2, EpDtype::kF32, K, [&](int i) { return local(ch.idx, i).w_send.get(); },
               [&](int i) { return ch.r[i]->w_recv; })};
    t_.alltoallv(t, 3, ch.fwd_rows(), cs);
    mark(ch, 3, cs);
    signal(ch.arrived, cs);
  }
  if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(ev_[1], ctx.stream));
  // ---- the local experts over the received rows; combine: rows back along the dispatch's
  // path, summed per token in rank order
  const bool inplace = use_inplace(a[0].out);
  auto unpack = [&](Chunk& ch) {
    sum_back(
        ch, inplace, [&](int i) { return a[i].out + ch.t0 * H; },
        [](int) -> float* { return nullptr; }, ctx);
  };
  for (int c = 0; c < C_; ++c) {
    Chunk& ch = *ch_[c];
    await(ctx.stream, ch.arrived);
    for (int i = 0; i < L_; ++i) experts_fwd(ch, i, a[i], ctx);
    signal(ch.computed, ctx.stream);
    await(cs, ch.computed);
    if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(ev_[2], ctx.stream));
    mark(ch, 4, cs);
    combine_back(ch, 1, inplace, cs);
    mark(ch, 5, cs);
    signal(ch.returned, cs);
    if (c > 0) unpack(*ch_[c - 1]);
  }
  unpack(*ch_[C_ - 1]);
  if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(ev_[3], ctx.stream));
}

// What every forward does first: no call pending, N within the buffers, no valid state until
// the carve, the last backward's weight gradients done with the scratch and the carves (the comm
// stream's first call waits for the caller's stream, so for them too), our own arena released.
void EpMoeCuda::start_forward(const char* call, int64_t N, const cu::Ctx& ctx) {
  expect(Step::kIdle, call);
  AM_CHECK(N >= 0 && N <= s_.max_tokens,
           "[EpMoeCuda] {} tokens, but the buffers were sized for at most {}; construct it with "
           "a larger max_tokens",
           N, s_.max_tokens);
  N_ = -1;
  sc_->wait_wgrad(ctx.stream);
  if (own_arena_) arena_->reset();
}

void EpMoeCuda::expect(Step want, const char* call) const {
  static const char* const after[] = {"nothing pending", "fwd_begin", "fwd_end", "bwd_begin",
                                      "bwd_end"};
  AM_CHECK(step_ == want,
           "internal: [EpMoeCuda] {}: {} called after {}; the split calls go fwd_begin, fwd_end, "
           "fwd_finish, then bwd_begin, bwd_end, bwd_finish",
           label_, call, after[int(step_)]);
}

// The broadcast layout puts token n's row for peer d at row n of d's region, so the rows can go
// before the routing: the transport call opens here, on the side stream (idle in a forward),
// and fwd_begin continues it (the mail, the picks, the end) on its stream after our event.
void EpMoeCuda::rows_ahead(const bf16* x, int64_t N, const cu::Ctx& ctx) {
  expect(Step::kIdle, "rows_ahead");
  AM_CHECK(!ahead_, "internal: [EpMoeCuda] {}: rows_ahead twice without a forward between",
           label_);
  if (!use_bcast(x) || N == 0) return;
  AM_CHECK(N <= s_.max_tokens,
           "[EpMoeCuda] {} tokens, but the buffers were sized for at most {}; construct it with "
           "a larger max_tokens",
           N, s_.max_tokens);
  const cudaStream_t side = sc_->side;
  CUDA_CHECK(cudaEventRecord(ahead_ev_, ctx.stream));  // x is written
  CUDA_CHECK(cudaStreamWaitEvent(side, ahead_ev_, 0));
  *ahead_dst_ = push_begin(side);
  const int64_t bytes = N * s_.H * int64_t(sizeof(bf16));
  AM_CHECK(bytes <= ahead_dst_->cap,
           "internal: [EpMoeCuda] {}: {} rows ahead do not fit a region of {} bytes", label_, N,
           ahead_dst_->cap);
  if (ahead_sm_) {  // the SMs' copy kernel (it slowed the router beside it: RESULTS 2026-11-30)
    cu::CopyMany c;
    for (int d = 0; d < P_; ++d)
      if (ahead_dst_->region[d]) c.add(ahead_dst_->region[d], x, bytes);
    cu::copy_many(c, side);
  } else {  // the copy engines: no SMs taken from the router
    for (int d = 0; d < P_; ++d)
      if (ahead_dst_->region[d])
        CUDA_CHECK(cudaMemcpyAsync(ahead_dst_->region[d], x, size_t(bytes),
                                   cudaMemcpyDeviceToDevice, side));
  }
  CUDA_CHECK(cudaEventRecord(ahead_ev_, side));
  cu::trace_mark(side, label_, "rows ahead");
  ahead_ = true;
  ahead_x_ = x;
  ahead_n_ = N;
}

// The direct dispatch's forward, first step: the layout on the caller's stream; then, on the
// comm stream, the counts' mail and the push (the kernel stores the rows straight into the
// peers' regions), so they travel while the host does other work and then waits in fwd_end.
void EpMoeCuda::fwd_begin(const EpMoeFwdArgs& a, int64_t N, const cu::Ctx& ctx) {
  const int64_t H = s_.H, K = s_.K, El = El_;
  const int P = P_;
  start_forward("fwd_begin", N, ctx);
  AM_CHECK(mode_ == EpMode::kCounts && use_push(a.x),
           "[EpMoeCuda] {}: the split forward needs the direct dispatch: counts mode, one chunk, "
           "one rank per process, a transport that can push (ipc), H a multiple of 8 and "
           "16-byte aligned rows (AUTOMOE_EP_PUSH not 0)",
           label_);
  const cudaStream_t cs = comm_stream(ctx);
  cu::Ctx cctx = ctx;
  cctx.stream = cs;
  Chunk& ch = *ch_[0];
  EpMoeScratch::Local& l = local(0, 0);
  ch.t0 = 0;
  ch.n = N;
  const bool ahead = ahead_;
  ahead_ = false;
  AM_CHECK(!ahead || (a.x == ahead_x_ && N == ahead_n_),
           "internal: [EpMoeCuda] {}: rows_ahead sent other rows ({} tokens) than this forward's "
           "({})",
           label_, ahead_n_, N);
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[0], ctx.stream));
  if (use_bcast(a.x))
    cu::ep_layout_all(l.send_pos.get(), ch.r[0]->info.get(), ch.r[0]->info.get() + P, a.topk_idx,
                      N, K, El, P, ctx);
  else
    cu::ep_layout(l.send_pos.get(), ch.r[0]->info.get(), ch.r[0]->info.get() + P, a.topk_idx, N,
                  K, El, P, 0, ctx);
  if (timing_) CUDA_CHECK(cudaEventRecord(evd_[2], ctx.stream));
  cu::trace_mark(ctx.stream, label_, "laid out");
  // the comm stream after everything of the caller's so far (the layout, the rows, and what
  // last read the buffers the push writes)
  signal(laid_out_, ctx.stream);
  await(cs, laid_out_);
  info_tail(ch, cs);
  cu::EpPushDst dst;
  if (ahead) {  // the call rows_ahead opened, once its copies are done
    CUDA_CHECK(cudaStreamWaitEvent(cs, ahead_ev_, 0));
    dst = *ahead_dst_;
  } else {
    dst = push_begin(cs);
  }
  // every rank's info row into host_cnt (rank s's at row s), as the all-to-all would
  t_.push_mail(cs, ch.r[0]->info.get(), W_, ch.host_cnt, counted_);
  if (timing_) CUDA_CHECK(cudaEventRecord(evd_[0], cs));
  cu::ep_dispatch_push(dst, l.x_send.get(), l.idx_send.get(), l.w_send.get(), a.x, a.topk_idx,
                       a.topk_w, l.send_pos.get(), ch.r[0]->info.get(), N, H, K, El, P,
                       t_.rank_of(0), cctx, ahead);
  t_.push_end(cs);
  if (timing_) CUDA_CHECK(cudaEventRecord(evd_[1], cs));
  cu::trace_mark(cs, label_, "pushed");
  fa_ = a;
  step_ = Step::kFwdBegun;
}

// Second step: the host waits for the mail only (the rows are still on their way), checks the
// room, plans and carves; then the copy-out (comm), the experts (caller's stream, once the rows
// are there) and the combine (comm, once the experts are done).
void EpMoeCuda::fwd_end(const cu::Ctx& ctx) {
  const int64_t H = s_.H, K = s_.K;
  const int P = P_;
  expect(Step::kFwdBegun, "fwd_end");
  step_ = Step::kIdle;  // a throw below leaves nothing pending
  const cudaStream_t cs = comm_stream(ctx);
  Chunk& ch = *ch_[0];
  EpMoeScratch::Local& l = local(0, 0);
  t_.wait_event(counted_);
  try {
    check_room();
  } catch (...) {
    // The rows were pushed already: every rank (check_room's verdict is the same on all) ends
    // the transport's call taking none of them, so the next call's waits are met.
    const std::vector<int64_t> none(size_t(P), 0);
    const EpA2aTensor t = tensor(0, EpDtype::kBf16, H, [&](int) { return l.x_send.get(); },
                                 [&](int) { return ch.r[0]->x_recv; });
    t_.push_recv(&t, 1, EpA2aRows{none.data(), none.data(), none.data(), none.data()}, cs);
    throw;
  }
  set_plan(ch);
  cu::trace_mark(ctx.stream, label_, "carve (host had the mail)");
  carve(ch, ctx);
  N_ = ch.n;
  pushed_ = true;
  bwd_timed_ = false;  // until this forward's backward records its events
  EpA2aTensor t[3] = {
      tensor(0, EpDtype::kBf16, H, [&](int) { return l.x_send.get(); },
             [&](int) { return ch.r[0]->x_recv; }),
      tensor(1, EpDtype::kI32, K, [&](int) { return l.idx_send.get(); },
             [&](int) { return l.idx_recv.get(); }),
      tensor(2, EpDtype::kF32, K, [&](int) { return l.w_send.get(); },
             [&](int) { return ch.r[0]->w_recv; })};
  t_.push_recv(t, 3, ch.fwd_rows(), cs);
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[1], cs));
  cu::trace_mark(cs, label_, "copied out");
  signal(ch.arrived, cs);
  await(ctx.stream, ch.arrived);
  experts_fwd(ch, 0, fa_, ctx);
  cu::trace_mark(ctx.stream, label_, "experts");
  inplace_now_ = use_inplace(fa_.out);
  combine_after_experts(ch, 1, ev_[2], "combined", ctx);
  step_ = Step::kFwdEnded;
}

// Third step: the caller's stream waits for the combine and sums each token's rows into out.
void EpMoeCuda::fwd_finish(const cu::Ctx& ctx) {
  expect(Step::kFwdEnded, "fwd_finish");
  step_ = Step::kIdle;
  sum_back(
      *ch_[0], inplace_now_, [&](int) { return fa_.out; }, [](int) -> float* { return nullptr; },
      ctx);
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[3], ctx.stream));
  cu::trace_mark(ctx.stream, label_, "unpacked");
}

// The backward of chunk ch's experts of local rank i: xs and the SwiGLU output always
// recomputed (as the model does), gu and ys too when the carve does not keep them (rc_): the
// forward's kernels on the forward's inputs, so the same bits. The data gradients first, on
// ctx; the weight gradients on wctx: the scratch's side stream and workspace, or ctx itself
// with the overlap off (the same launches in the same order: the same bits). With chunks the
// weight gradients of the chunks add up in the scratch's fp32 accumulators (acc_gu, acc_down),
// folded into g (g = g_beta * g + dW, one rounding) after the last chunk.
void EpMoeCuda::experts_bwd(Chunk& ch, int i, const EpMoeBwdArgs& a, float g_beta,
                            const cu::Ctx& ctx, const cu::Ctx& wctx, bool overlap) {
  const int64_t H = s_.H, I = s_.I, K = s_.K, El = El_;
  Rank& r = *ch.r[i];
  EpMoeScratch::Local& l = local(ch.idx, i);
  const int64_t R = ch.R[i], M = ch.M[i];
  const cu::RowRegions rows = padding(ch, i);  // as in fwd: the work follows the rows that came
  const int32_t* m_rows = expert_rows(ch, i);
  bf16* gu = r.gu ? r.gu : sc_->gu.get();  // [M,2I]
  bf16* ys = r.ys ? r.ys : sc_->xs.get();  // [M,H]: xs is dxs, then xs again, below
  bf16* const no_dw = nullptr;
  // the weight gradients of the previous local rank or chunk, or of an earlier call, still read
  // dys, act, dgu and xs (the dispatches write only x_send and y_recv, which they do not read)
  sc_->wait_wgrad(ctx.stream);
  if (rc_ == EpRecompute::kExperts) {
    cu::permute_fwd(sc_->xs.get(), r.x_recv, r.slot_row, R, K, H, ctx);
    cu::grouped_linear_fwd(gu, sc_->xs.get(), a.w_gu, r.offsets, M, El, H, 2 * I, ctx);
  }
  cu::swiglu_fwd(sc_->act.get(), gu, M, I, ctx, m_rows);
  if (rc_ != EpRecompute::kNone)
    cu::grouped_linear_fwd(ys, sc_->act.get(), a.w_down, r.offsets, M, El, I, H, ctx);
  // data gradients: dys, dact, dgu, dxs, the dx rows
  cu::unpermute_bwd(sc_->dys.get(), l.dw_recv.get(), l.y_recv.get(), ys, r.w_recv, r.slot_row, R,
                    K, H, ctx, rows);
  cu::grouped_linear_bwd(sc_->dact.get(), no_dw, 0.f, sc_->dys.get(), nullptr, a.w_down, r.offsets,
                         M, El, I, H, ctx);
  cu::swiglu_bwd(sc_->dgu.get(), sc_->dact.get(), gu, M, I, ctx, m_rows);
  // dxs [M,H] in xs: dead here (ys, when it lived there, was read above); dys stays for g_down
  bf16* dxs = sc_->xs.get();
  cu::grouped_linear_bwd(dxs, no_dw, 0.f, sc_->dgu.get(), nullptr, a.w_gu, r.offsets, M, El, H,
                         2 * I, ctx);
  cu::permute_bwd(l.y_recv.get() /*dx rows*/, dxs, r.slot_row, R, K, H, ctx, rows);
  // weight gradients, once their inputs exist and permute_bwd has read dxs (xs is rewritten)
  if (overlap) {
    CUDA_CHECK(cudaEventRecord(sc_->inputs_ready, ctx.stream));
    CUDA_CHECK(cudaStreamWaitEvent(wctx.stream, sc_->inputs_ready, 0));
    // the other half's weight gradients of this layer first (the same tensors; set_wgrad_after)
    if (wgrad_after_) CUDA_CHECK(cudaStreamWaitEvent(wctx.stream, wgrad_after_->wgrad_done_, 0));
  }
  if (C_ == 1) {
    cu::grouped_linear_bwd(nullptr, a.g_down, g_beta, sc_->dys.get(), sc_->act.get(), nullptr,
                           r.offsets, M, El, I, H, wctx);
    cu::permute_fwd(sc_->xs.get(), r.x_recv, r.slot_row, R, K, H, wctx);
    cu::grouped_linear_bwd(nullptr, a.g_gu, g_beta, sc_->dgu.get(), sc_->xs.get(), nullptr,
                           r.offsets, M, El, H, 2 * I, wctx);
  } else {
    const int64_t n_down = El * H * I, n_gu = El * 2 * I * H;
    float* acc_down = sc_->acc_down.get() + size_t(i) * n_down;
    float* acc_gu = sc_->acc_gu.get() + size_t(i) * n_gu;
    if (ch.idx == 0) {  // the accumulators are free: the last fold read them on this stream
      CUDA_CHECK(cudaMemsetAsync(acc_down, 0, size_t(n_down) * sizeof(float), wctx.stream));
      CUDA_CHECK(cudaMemsetAsync(acc_gu, 0, size_t(n_gu) * sizeof(float), wctx.stream));
    }
    cu::grouped_linear_bwd(nullptr, acc_down, sc_->dys.get(), sc_->act.get(), nullptr, r.offsets,
                           M, El, I, H, wctx);
    cu::permute_fwd(sc_->xs.get(), r.x_recv, r.slot_row, R, K, H, wctx);
    cu::grouped_linear_bwd(nullptr, acc_gu, sc_->dgu.get(), sc_->xs.get(), nullptr, r.offsets, M,
                           El, H, 2 * I, wctx);
    if (ch.idx == C_ - 1) {
      cu::accumulate_grad(a.g_down, acc_down, g_beta, n_down, wctx);
      cu::accumulate_grad(a.g_gu, acc_gu, g_beta, n_gu, wctx);
    }
  }
  if (overlap) CUDA_CHECK(cudaEventRecord(sc_->wgrad_done, wctx.stream));
}

// Mirrors the forward's pipeline: the d(out) rows of chunk c+1 travel while chunk c's experts
// run their backward, the dx rows of chunk c while chunk c+1's do; the weight gradients run on
// the side stream (overlap on) as with one chunk.
//   compute  packs | experts' bwd 0 | experts' bwd 1 | unpack 0 | ...      side: wgrad 0 | wgrad 1
//   comm     dispatch 0 | dispatch 1 | combine 0 | combine 1 | ...
void EpMoeCuda::bwd(const EpMoeBwdArgs* a, float g_beta, const cu::Ctx& ctx) {
  const int64_t H = s_.H, K = s_.K, El = El_;
  const int P = P_;
  // the direct dispatch as in the forward (one pass over the rows instead of pack + copies; the
  // forward's counts are still in info on the device): the split calls in a row
  if (mode_ == EpMode::kCounts && use_push(a[0].dout)) {
    bwd_begin(a[0], g_beta, ctx);
    bwd_end(ctx);
    bwd_finish(ctx);
    return;
  }
  expect(Step::kIdle, "bwd");
  check_saved();
  const cudaStream_t cs = comm_stream(ctx);
  // ---- combine's backward: a dispatch of d(out) rows
  if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(evb_[0], ctx.stream));
  for (auto& chp : ch_) {
    Chunk& ch = *chp;
    for (int i = 0; i < L_; ++i)
      cu::ep_dispatch_pack(local(ch.idx, i).x_send.get(), nullptr, nullptr, a[i].dout + ch.t0 * H,
                           nullptr, nullptr, ch.r[i]->send_pos, ch.n, H, K, El, P, ctx);
    signal(ch.packed, ctx.stream);
  }
  for (auto& chp : ch_) {
    Chunk& ch = *chp;
    await(cs, ch.packed);
    mark(ch, 6, cs);
    move_rows(ch, &EpMoeScratch::Local::x_send, &EpMoeScratch::Local::y_recv, ch.fwd_rows(), cs);
    mark(ch, 7, cs);
    signal(ch.arrived, cs);
  }
  if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(evb_[1], ctx.stream));
  // ---- the local experts' backward, then dispatch's backward: a combine of d(x) and
  // d(weights) (with the overlap on, the weight gradients run beside it: evb_[2..3] time the
  // combine alone)
  const bool overlap = wgrad_overlap_;
  const cu::Ctx wctx = wgrad_ctx(ctx);
  const bool inplace = use_inplace(a[0].dx);
  auto unpack = [&](Chunk& ch) {
    sum_back(
        ch, inplace, [&](int i) { return a[i].dx + ch.t0 * H; },
        [&](int i) { return a[i].dtopk_w + ch.t0 * K; }, ctx);
  };
  for (int c = 0; c < C_; ++c) {
    Chunk& ch = *ch_[c];
    await(ctx.stream, ch.arrived);
    for (int i = 0; i < L_; ++i) experts_bwd(ch, i, a[i], g_beta, ctx, wctx, overlap);
    if (overlap) CUDA_CHECK(cudaEventRecord(wgrad_done_, wctx.stream));  // what join() waits on
    signal(ch.computed, ctx.stream);
    await(cs, ch.computed);
    if (timing_ && C_ == 1) CUDA_CHECK(cudaEventRecord(evb_[2], ctx.stream));
    mark(ch, 8, cs);
    combine_back(ch, 2, inplace, cs);
    mark(ch, 9, cs);
    signal(ch.returned, cs);
    if (c > 0) unpack(*ch_[c - 1]);
  }
  unpack(*ch_[C_ - 1]);
  if (timing_) {
    if (C_ == 1) CUDA_CHECK(cudaEventRecord(evb_[3], ctx.stream));
    bwd_timed_ = true;
  }
}

void EpMoeCuda::check_saved() const {
  AM_CHECK(N_ >= 0, "[EpMoeCuda] {}: bwd before any (complete) fwd: the backward reuses the "
           "forward's layout",
           label_);
  AM_CHECK(arena_->bump.generation() == carved_gen_,
           "[EpMoeCuda] {}: backward after its saved state was released (the EP arena was reset "
           "by a newer forward); run each forward's backward before the next forward",
           label_);
}

cu::Ctx EpMoeCuda::wgrad_ctx(const cu::Ctx& ctx) const {
  cu::Ctx wctx = ctx;
  if (wgrad_overlap_) {
    wctx.stream = sc_->side;
    wctx.workspace = sc_->side_ws.get();
    wctx.workspace_bytes = sc_->side_ws.bytes();
    // the persistent grids leave SMs to the compute stream's kernels (its unpack, the
    // attention's backward), which otherwise wait for whole GEMMs: W2 24 layers +0.5%. A
    // count above the GPU's SMs launches more CTAs than fit, each with fewer tiles.
    wctx.num_sms = wgrad_sms_ > 0 ? wgrad_sms_ : std::max(1, wctx.num_sms - kWgradSmsLeft);
  }
  return wctx;
}

// The backward's split calls (the forward's counts are still in info on the device). First step:
// the d(out) rows pushed on the comm stream once the caller's stream has written them.
void EpMoeCuda::bwd_begin(const EpMoeBwdArgs& a, float g_beta, const cu::Ctx& ctx) {
  expect(Step::kIdle, "bwd_begin");
  check_saved();
  AM_CHECK(mode_ == EpMode::kCounts && use_push(a.dout),
           "[EpMoeCuda] {}: the split backward needs the direct dispatch (see fwd_begin) and "
           "16-byte aligned d(out) rows",
           label_);
  const cudaStream_t cs = comm_stream(ctx);
  cu::Ctx cctx = ctx;
  cctx.stream = cs;
  Chunk& ch = *ch_[0];
  EpMoeScratch::Local& l = local(0, 0);
  if (timing_) CUDA_CHECK(cudaEventRecord(evb_[0], ctx.stream));
  signal(laid_out_, ctx.stream);  // dout written; the last readers of x_send and y_recv done
  await(cs, laid_out_);
  cu::ep_dispatch_push(push_begin(cs), l.x_send.get(), nullptr, nullptr, a.dout, nullptr, nullptr,
                       ch.r[0]->send_pos, ch.r[0]->info.get(), ch.n, s_.H, s_.K, El_, P_,
                       t_.rank_of(0), cctx);
  t_.push_end(cs);
  EpA2aTensor t = tensor(0, EpDtype::kBf16, s_.H, [&](int) { return l.x_send.get(); },
                         [&](int) { return l.y_recv.get(); });
  t_.push_recv(&t, 1, ch.fwd_rows(), cs);
  if (timing_) CUDA_CHECK(cudaEventRecord(evb_[1], cs));
  cu::trace_mark(cs, label_, "bwd pushed and copied out");
  signal(ch.arrived, cs);
  ba_ = a;
  g_beta_ = g_beta;
  step_ = Step::kBwdBegun;
}

// Second step: the experts' backward on the caller's stream once the rows came (the weight
// gradients on the side stream with the overlap on), then the dx and dw rows' combine (comm).
void EpMoeCuda::bwd_end(const cu::Ctx& ctx) {
  expect(Step::kBwdBegun, "bwd_end");
  Chunk& ch = *ch_[0];
  const bool overlap = wgrad_overlap_;
  const cu::Ctx wctx = wgrad_ctx(ctx);
  await(ctx.stream, ch.arrived);
  experts_bwd(ch, 0, ba_, g_beta_, ctx, wctx, overlap);
  if (overlap) CUDA_CHECK(cudaEventRecord(wgrad_done_, wctx.stream));  // what join() waits on
  cu::trace_mark(ctx.stream, label_, "bwd experts");
  if (overlap) cu::trace_mark(wctx.stream, label_, "bwd weight gradients");
  inplace_now_ = use_inplace(ba_.dx);
  combine_after_experts(ch, 2, evb_[2], "bwd combined", ctx);
  step_ = Step::kBwdEnded;
}

// Third step: the caller's stream waits for the combine and sums into dx and dtopk_w.
void EpMoeCuda::bwd_finish(const cu::Ctx& ctx) {
  expect(Step::kBwdEnded, "bwd_finish");
  step_ = Step::kIdle;
  sum_back(
      *ch_[0], inplace_now_, [&](int) { return ba_.dx; }, [&](int) { return ba_.dtopk_w; }, ctx);
  cu::trace_mark(ctx.stream, label_, "bwd unpacked");
  if (timing_) {
    CUDA_CHECK(cudaEventRecord(evb_[3], ctx.stream));
    bwd_timed_ = true;
  }
}

void EpMoeCuda::fwd(bf16* out, const bf16* x, const int32_t* topk_idx, const float* topk_w,
                    const bf16* w_gu, const bf16* w_down, int64_t N, const cu::Ctx& ctx) {
  AM_CHECK(L_ == 1, "[EpMoeCuda] this process drives {} ranks ({} transport): pass one "
           "EpMoeFwdArgs per rank",
           L_, t_.name());
  const EpMoeFwdArgs a{out, x, topk_idx, topk_w, w_gu, w_down};
  fwd(&a, N, ctx);
}

void EpMoeCuda::bwd(bf16* dx, float* dtopk_w, bf16* g_gu, bf16* g_down, float g_beta,
                    const bf16* dout, const bf16* w_gu, const bf16* w_down, const cu::Ctx& ctx) {
  AM_CHECK(L_ == 1, "[EpMoeCuda] this process drives {} ranks ({} transport): pass one "
           "EpMoeBwdArgs per rank",
           L_, t_.name());
  const EpMoeBwdArgs a{dx, dtopk_w, g_gu, g_down, dout, w_gu, w_down};
  bwd(&a, g_beta, ctx);
}

EpTimes EpMoeCuda::last_times() const {
  AM_CHECK(timing_ && N_ >= 0, "[EpMoeCuda] last_times() needs set_timing(true) before a forward");
  EpTimes t;
  if (C_ == 1) {
    CUDA_CHECK(cudaEventSynchronize(ev_[3]));
    CUDA_CHECK(cudaEventElapsedTime(&t.dispatch_ms, ev_[0], ev_[1]));
    CUDA_CHECK(cudaEventElapsedTime(&t.combine_ms, ev_[2], ev_[3]));
    if (pushed_) {
      CUDA_CHECK(cudaEventElapsedTime(&t.dispatch_counts_ms, ev_[0], evd_[0]));
      CUDA_CHECK(cudaEventElapsedTime(&t.dispatch_layout_ms, ev_[0], evd_[2]));
      CUDA_CHECK(cudaEventElapsedTime(&t.dispatch_push_ms, evd_[0], evd_[1]));
      CUDA_CHECK(cudaEventElapsedTime(&t.dispatch_recv_ms, evd_[1], ev_[1]));
    }
    if (bwd_timed_) {  // the backward of the last forward
      CUDA_CHECK(cudaEventSynchronize(evb_[3]));
      CUDA_CHECK(cudaEventElapsedTime(&t.bwd_dispatch_ms, evb_[0], evb_[1]));
      CUDA_CHECK(cudaEventElapsedTime(&t.bwd_combine_ms, evb_[2], evb_[3]));
    }
  } else {  // the transport calls alone, summed over the chunks (see EpTimes)
    auto span = [](const Chunk& ch, int k) {
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, ch.tev[k], ch.tev[k + 1]));
      return ms;
    };
    CUDA_CHECK(cudaEventSynchronize(ch_.back()->tev[5]));
    if (bwd_timed_) CUDA_CHECK(cudaEventSynchronize(ch_.back()->tev[9]));
    for (const auto& ch : ch_) {
      t.dispatch_ms += span(*ch, 0) + span(*ch, 2);
      t.combine_ms += span(*ch, 4);
      if (bwd_timed_) {
        t.bwd_dispatch_ms += span(*ch, 6);
        t.bwd_combine_ms += span(*ch, 8);
      }
    }
  }
  std::vector<int32_t> cnt(size_t(2 * P_));
  for (const auto& ch : ch_)
    for (int i = 0; i < L_; ++i) {
      for (int p = 0; p < P_; ++p) t.rows_wire += ch->send_cnt[size_t(i) * P_ + p];
      if (mode_ == EpMode::kCounts) continue;  // packed: the payload is what moved
      CUDA_CHECK(cudaMemcpy(cnt.data(), ch->r[i]->cnt.get(), cnt.size() * sizeof(int32_t),
                            cudaMemcpyDeviceToHost));
      for (int p = 0; p < P_; ++p) t.rows_payload += cnt[p];
    }
  if (mode_ == EpMode::kCounts) t.rows_payload = t.rows_wire;
  return t;
}

}  // namespace automoe::dist
