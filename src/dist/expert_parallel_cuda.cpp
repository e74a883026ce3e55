// dist/expert_parallel_cuda.cpp: EpMoeCuda (see expert_parallel_cuda.h): the EP expert block on
// the device over an EpTransport, built from the EP kernels (backend/cuda/ep_kernels.h) and the
// single-GPU MoE ops (moe_layout, permute, grouped_linear, swiglu, unpermute).
#include "dist/expert_parallel_cuda.h"

#include <algorithm>

#include "backend/cuda/ep_kernels.h"
#include "backend/cuda/ops_cuda.h"
#include "core/check.h"

namespace automoe::dist {

namespace cu = automoe::cuda;
using cu::bf16;
template <class T>
using Buf = cu::DeviceBuffer<T>;

const char* ep_mode_name(EpMode m) { return m == EpMode::kCounts ? "counts" : "padded"; }

// One local rank's buffers. Sizes: Nmax tokens, Scap send rows, Rcap receive rows, Mcap slots.
struct EpMoeCuda::Rank {
  Buf<int32_t> cnt;       // [2P] send counts | received counts
  Buf<int32_t> send_pos;  // [Nmax,P] send-buffer row of (token, destination), -1 if not sent
  Buf<bf16> x_send;       // [Scap,H] dispatch rows; then combine's returned rows; in bwd the
                          //          d(out) rows, then the returned dx rows
  Buf<int32_t> idx_send;  // [Scap,K] picks remapped to the destination's local experts
  Buf<float> w_send;      // [Scap,K] their weights; in bwd the returned d(weights) rows
  Buf<bf16> x_recv;       // [Rcap,H] received tokens (kept: the backward recomputes permute)
  Buf<int32_t> idx_recv;  // [Rcap,K] received picks, local experts or -1
  Buf<float> w_recv;      // [Rcap,K] received weights (kept for unpermute's backward)
  Buf<float> dw_recv;     // [Rcap,K] d(weights) of the received picks (bwd)
  Buf<bf16> y_recv;       // [Rcap,H] weighted expert outputs per received row; in bwd the
                          //          d(out) rows, then d(x) rows
  Buf<int32_t> offsets;   // [El+1] rows of each local expert (kept)
  Buf<int32_t> slot_row;  // [Rcap*K] expert-ordered row of each received pick, -1 (kept)
  Buf<bf16> gu;           // [Mcap,2I] gate|up outputs (kept)
  Buf<bf16> ys;           // [Mcap,H] expert outputs (kept)
};

size_t EpMoeCuda::workspace_bytes(const EpMoeShape& s, int P) {
  const int64_t El = s.E / std::max(P, 1);
  return std::max(cu::grouped_linear_workspace_bytes(El),
                  cu::moe_layout_workspace_bytes(int64_t(std::max(P, 1)) * s.max_tokens, s.K, El));
}

EpMoeScratch::EpMoeScratch(const EpMoeShape& s, int P) {
  const int64_t El = s.E / std::max(P, 1);
  Mcap = int64_t(std::max(P, 1)) * s.max_tokens * std::min(s.K, std::max<int64_t>(El, 1));
  xs = Buf<bf16>(size_t(Mcap * s.H));
  act = Buf<bf16>(size_t(Mcap * s.I));
  dys = Buf<bf16>(size_t(Mcap * s.H));
  dact = Buf<bf16>(size_t(Mcap * s.I));
  dgu = Buf<bf16>(size_t(Mcap * 2 * s.I));
}

size_t EpMoeScratch::bytes() const {
  return xs.bytes() + act.bytes() + dys.bytes() + dact.bytes() + dgu.bytes();
}

EpMoeCuda::EpMoeCuda(EpTransport& t, const EpMoeShape& shape, EpMode mode,
                     std::shared_ptr<EpMoeScratch> scratch)
    : t_(t), s_(shape), mode_(mode), P_(t.size()), L_(t.num_local()), sc_(std::move(scratch)) {
  const int64_t H = s_.H, I = s_.I, E = s_.E, K = s_.K, Nmax = s_.max_tokens;
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
  AM_CHECK(Mcap_ < (int64_t(1) << 31),
           "[EpMoeCuda] {} tokens per rank x {} ranks x {} picks do not fit int32 rows; use fewer "
           "tokens per micro-batch",
           Nmax, P_, std::min(K, El_));
  for (int i = 0; i < L_; ++i) {
    auto r = std::make_unique<Rank>();
    r->cnt = Buf<int32_t>(size_t(2 * P_));
    r->send_pos = Buf<int32_t>(size_t(Nmax * P_));
    r->x_send = Buf<bf16>(size_t(Scap_ * H));
    r->idx_send = Buf<int32_t>(size_t(Scap_ * K));
    r->w_send = Buf<float>(size_t(Scap_ * K));
    r->x_recv = Buf<bf16>(size_t(Rcap_ * H));
    r->idx_recv = Buf<int32_t>(size_t(Rcap_ * K));
    r->w_recv = Buf<float>(size_t(Rcap_ * K));
    r->dw_recv = Buf<float>(size_t(Rcap_ * K));
    r->y_recv = Buf<bf16>(size_t(Rcap_ * H));
    r->offsets = Buf<int32_t>(size_t(El_ + 1));
    r->slot_row = Buf<int32_t>(size_t(Rcap_ * K));
    r->gu = Buf<bf16>(size_t(Mcap_ * 2 * I));
    r->ys = Buf<bf16>(size_t(Mcap_ * H));
    bytes_ += r->cnt.bytes() + r->send_pos.bytes() + r->x_send.bytes() + r->idx_send.bytes() +
              r->w_send.bytes() + r->x_recv.bytes() + r->idx_recv.bytes() + r->w_recv.bytes() +
              r->dw_recv.bytes() + r->y_recv.bytes() + r->offsets.bytes() + r->slot_row.bytes() +
              r->gu.bytes() + r->ys.bytes();
    r_.push_back(std::move(r));
  }
  if (sc_) {
    AM_CHECK(sc_->Mcap >= Mcap_ && sc_->xs.size() >= size_t(Mcap_ * H) &&
                 sc_->dgu.size() >= size_t(Mcap_ * 2 * I),
             "internal: [EpMoeCuda] a shared scratch of {} slots for a block of {}", sc_->Mcap,
             Mcap_);
  } else {
    sc_ = std::make_shared<EpMoeScratch>(s_, P_);
    bytes_ += sc_->bytes();
  }

  CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_cnt_), size_t(L_) * 2 * P_ * sizeof(int32_t)));
  // The largest all-to-all: dispatch's rows (x, picks, weights), or dispatch's backward with
  // send and receive swapped; at most Rcap >= Scap rows either way (staging transports).
  const size_t a2a_bytes = size_t(std::max(Scap_, Rcap_)) * size_t(2 * H + 8 * K) * size_t(L_);
  t_.reserve(a2a_bytes, a2a_bytes);
  const size_t LP = size_t(L_) * P_;
  send_off_.assign(LP, 0);
  send_cnt_.assign(LP, 0);
  recv_off_.assign(LP, 0);
  recv_cnt_.assign(LP, 0);
  unit_off_.resize(LP);
  unit_cnt_.assign(LP, 1);
  for (size_t i = 0; i < LP; ++i) unit_off_[i] = int64_t(i % P_);
  R_.assign(L_, 0);
  ptr_send_.assign(size_t(3 * L_), nullptr);
  ptr_recv_.assign(size_t(3 * L_), nullptr);
  for (cudaEvent_t& e : ev_) CUDA_CHECK(cudaEventCreate(&e));
}

EpMoeCuda::~EpMoeCuda() {
  for (cudaEvent_t e : ev_)
    if (e) cudaEventDestroy(e);
  if (host_cnt_) cudaFreeHost(host_cnt_);
}

template <class S, class D>
EpA2aTensor EpMoeCuda::tensor(int slot, EpDtype dt, int64_t row_elems, S send_of, D recv_of) {
  for (int i = 0; i < L_; ++i) {
    ptr_send_[slot * L_ + i] = send_of(*r_[i]);
    ptr_recv_[slot * L_ + i] = recv_of(*r_[i]);
  }
  return {dt, row_elems, ptr_send_.data() + slot * L_, ptr_recv_.data() + slot * L_};
}

int64_t EpMoeCuda::rows_received(int i) const {
  return mode_ == EpMode::kCounts ? R_.at(i) : -1;
}

// Each rank's send counts (cnt[0,P)) to every peer, landing in the peer's cnt[P, 2P) at the
// sender's index: one int32 per (rank, peer).
void EpMoeCuda::exchange_counts(const cu::Ctx& ctx) {
  EpA2aTensor c = tensor(0, EpDtype::kI32, 1, [](Rank& r) { return r.cnt.get(); },
                         [this](Rank& r) { return r.cnt.get() + P_; });
  EpA2aRows rows{unit_off_.data(), unit_cnt_.data(), unit_off_.data(), unit_cnt_.data()};
  t_.alltoallv(&c, 1, rows, ctx.stream);
}

void EpMoeCuda::set_plan(int64_t N) {
  const int P = P_;
  for (int i = 0; i < L_; ++i) {
    int64_t so = 0, ro = 0;
    for (int p = 0; p < P; ++p) {
      const size_t k = size_t(i) * P + p;
      if (mode_ == EpMode::kPadded) {  // regions of N rows, whatever the counts
        send_off_[k] = recv_off_[k] = p * N;
        send_cnt_[k] = recv_cnt_[k] = N;
      } else {  // packed, from the counts read back
        send_cnt_[k] = host_cnt_[i * 2 * P + p];
        recv_cnt_[k] = host_cnt_[i * 2 * P + P + p];
        send_off_[k] = so;
        recv_off_[k] = ro;
        so += send_cnt_[k];
        ro += recv_cnt_[k];
      }
    }
    R_[i] = mode_ == EpMode::kPadded ? P * N : ro;
    AM_CHECK(so <= Scap_ && R_[i] <= Rcap_,
             "internal: EP rank {} sends {} rows (capacity {}) and receives {} (capacity {})",
             t_.rank_of(i), so, Scap_, R_[i], Rcap_);
  }
}

void EpMoeCuda::fwd(const EpMoeFwdArgs* a, int64_t N, const cu::Ctx& ctx) {
  const int64_t H = s_.H, I = s_.I, K = s_.K, El = El_;
  const int P = P_;
  AM_CHECK(N >= 0 && N <= s_.max_tokens,
           "[EpMoeCuda] {} tokens, but the buffers were sized for at most {}; construct it with "
           "a larger max_tokens",
           N, s_.max_tokens);
  N_ = N;
  const int64_t region = mode_ == EpMode::kPadded ? N : 0;
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[0], ctx.stream));
  // ---- layout and dispatch
  for (int i = 0; i < L_; ++i)
    cu::ep_layout(r_[i]->send_pos.get(), r_[i]->cnt.get(), a[i].topk_idx, N, K, El, P, region, ctx);
  exchange_counts(ctx);
  for (int i = 0; i < L_; ++i)
    cu::ep_dispatch_pack(r_[i]->x_send.get(), r_[i]->idx_send.get(), r_[i]->w_send.get(), a[i].x,
                         a[i].topk_idx, a[i].topk_w, r_[i]->send_pos.get(), N, H, K, El, P, ctx);
  if (mode_ == EpMode::kCounts) {  // the one host sync: counts size the all-to-all-v
    for (int i = 0; i < L_; ++i)
      CUDA_CHECK(cudaMemcpyAsync(host_cnt_ + i * 2 * P, r_[i]->cnt.get(), 2 * P * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost, ctx.stream));
    t_.sync(ctx.stream);
  }
  set_plan(N);
  const EpA2aRows fwd_rows{send_off_.data(), send_cnt_.data(), recv_off_.data(), recv_cnt_.data()};
  const EpA2aRows back_rows{recv_off_.data(), recv_cnt_.data(), send_off_.data(), send_cnt_.data()};
  {
    EpA2aTensor t[3] = {
        tensor(0, EpDtype::kBf16, H, [](Rank& r) { return r.x_send.get(); },
               [](Rank& r) { return r.x_recv.get(); }),
        tensor(1, EpDtype::kI32, K, [](Rank& r) { return r.idx_send.get(); },
               [](Rank& r) { return r.idx_recv.get(); }),
        tensor(2, EpDtype::kF32, K, [](Rank& r) { return r.w_send.get(); },
               [](Rank& r) { return r.w_recv.get(); })};
    t_.alltoallv(t, 3, fwd_rows, ctx.stream);
  }
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[1], ctx.stream));
  // ---- the local experts over the received rows
  for (int i = 0; i < L_; ++i) {
    Rank& r = *r_[i];
    const int64_t R = R_[i], M = R * std::min(K, El);
    if (mode_ == EpMode::kPadded) cu::ep_recv_mask(r.idx_recv.get(), r.cnt.get() + P, N, K, P, ctx);
    cu::moe_layout(r.offsets.get(), r.slot_row.get(), r.idx_recv.get(), R, El, K, ctx);
    cu::permute_fwd(sc_->xs.get(), r.x_recv.get(), r.slot_row.get(), R, K, H, ctx);
    cu::grouped_linear_fwd(r.gu.get(), sc_->xs.get(), a[i].w_gu, r.offsets.get(), M, El, H, 2 * I,
                           ctx);
    cu::swiglu_fwd(sc_->act.get(), r.gu.get(), M, I, ctx);
    cu::grouped_linear_fwd(r.ys.get(), sc_->act.get(), a[i].w_down, r.offsets.get(), M, El, I, H,
                           ctx);
    cu::unpermute_fwd(r.y_recv.get(), r.ys.get(), r.w_recv.get(), r.slot_row.get(), R, K, H, ctx);
  }
  // ---- combine: rows back along the dispatch's path, summed per token in rank order
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[2], ctx.stream));
  {
    EpA2aTensor t = tensor(0, EpDtype::kBf16, H, [](Rank& r) { return r.y_recv.get(); },
                           [](Rank& r) { return r.x_send.get(); });
    t_.alltoallv(&t, 1, back_rows, ctx.stream);
  }
  for (int i = 0; i < L_; ++i)
    cu::ep_combine_unpack(a[i].out, nullptr, r_[i]->x_send.get(), nullptr, r_[i]->send_pos.get(),
                          N, H, K, P, ctx);
  if (timing_) CUDA_CHECK(cudaEventRecord(ev_[3], ctx.stream));
}

void EpMoeCuda::bwd(const EpMoeBwdArgs* a, float g_beta, const cu::Ctx& ctx) {
  const int64_t H = s_.H, I = s_.I, K = s_.K, El = El_, N = N_;
  const int P = P_;
  AM_CHECK(N >= 0, "[EpMoeCuda] bwd before any fwd: the backward reuses the forward's layout");
  const EpA2aRows fwd_rows{send_off_.data(), send_cnt_.data(), recv_off_.data(), recv_cnt_.data()};
  const EpA2aRows back_rows{recv_off_.data(), recv_cnt_.data(), send_off_.data(), send_cnt_.data()};
  // ---- combine's backward: a dispatch of d(out) rows
  for (int i = 0; i < L_; ++i)
    cu::ep_dispatch_pack(r_[i]->x_send.get(), nullptr, nullptr, a[i].dout, nullptr, nullptr,
                         r_[i]->send_pos.get(), N, H, K, El, P, ctx);
  {
    EpA2aTensor t = tensor(0, EpDtype::kBf16, H, [](Rank& r) { return r.x_send.get(); },
                           [](Rank& r) { return r.y_recv.get(); });
    t_.alltoallv(&t, 1, fwd_rows, ctx.stream);
  }
  // ---- the local experts' backward (xs and the SwiGLU output recomputed, as the model does)
  for (int i = 0; i < L_; ++i) {
    Rank& r = *r_[i];
    const int64_t R = R_[i], M = R * std::min(K, El);
    cu::unpermute_bwd(sc_->dys.get(), r.dw_recv.get(), r.y_recv.get(), r.ys.get(), r.w_recv.get(),
                      r.slot_row.get(), R, K, H, ctx);
    cu::swiglu_fwd(sc_->act.get(), r.gu.get(), M, I, ctx);
    cu::grouped_linear_bwd(sc_->dact.get(), a[i].g_down, g_beta, sc_->dys.get(), sc_->act.get(),
                           a[i].w_down, r.offsets.get(), M, El, I, H, ctx);
    cu::swiglu_bwd(sc_->dgu.get(), sc_->dact.get(), r.gu.get(), M, I, ctx);
    cu::permute_fwd(sc_->xs.get(), r.x_recv.get(), r.slot_row.get(), R, K, H, ctx);
    bf16* dxs = sc_->dys.get();  // [M,H], reused: dys was consumed above
    cu::grouped_linear_bwd(dxs, a[i].g_gu, g_beta, sc_->dgu.get(), sc_->xs.get(), a[i].w_gu,
                           r.offsets.get(), M, El, H, 2 * I, ctx);
    cu::permute_bwd(r.y_recv.get() /*dx rows*/, dxs, r.slot_row.get(), R, K, H, ctx);
  }
  // ---- dispatch's backward: a combine of d(x) and d(weights)
  {
    EpA2aTensor t[2] = {
        tensor(0, EpDtype::kBf16, H, [](Rank& r) { return r.y_recv.get(); },
               [](Rank& r) { return r.x_send.get(); }),
        tensor(1, EpDtype::kF32, K, [](Rank& r) { return r.dw_recv.get(); },
               [](Rank& r) { return r.w_send.get(); })};
    t_.alltoallv(t, 2, back_rows, ctx.stream);
  }
  for (int i = 0; i < L_; ++i)
    cu::ep_combine_unpack(a[i].dx, a[i].dtopk_w, r_[i]->x_send.get(), r_[i]->w_send.get(),
                          r_[i]->send_pos.get(), N, H, K, P, ctx);
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
  CUDA_CHECK(cudaEventSynchronize(ev_[3]));
  CUDA_CHECK(cudaEventElapsedTime(&t.dispatch_ms, ev_[0], ev_[1]));
  CUDA_CHECK(cudaEventElapsedTime(&t.combine_ms, ev_[2], ev_[3]));
  std::vector<int32_t> cnt(size_t(2 * P_));
  for (int i = 0; i < L_; ++i) {
    CUDA_CHECK(cudaMemcpy(cnt.data(), r_[i]->cnt.get(), cnt.size() * sizeof(int32_t),
                          cudaMemcpyDeviceToHost));
    for (int p = 0; p < P_; ++p) t.rows_payload += cnt[p];
    for (int p = 0; p < P_; ++p) t.rows_wire += send_cnt_[size_t(i) * P_ + p];
  }
  return t;
}

}  // namespace automoe::dist
