// dist/ep_arena.cpp: the EP block's saved-state sizes and bump arena (see ep_arena.h).
#include "dist/ep_arena.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/check.h"

namespace automoe::dist {

const char* ep_recompute_name(EpRecompute r) {
  switch (r) {
    case EpRecompute::kNone: return "none";
    case EpRecompute::kOutputs: return "outputs";
    case EpRecompute::kExperts: return "experts";
  }
  return "?";
}

EpRecompute parse_ep_recompute(const std::string& name) {
  if (name == "none") return EpRecompute::kNone;
  if (name == "outputs") return EpRecompute::kOutputs;
  if (name == "experts") return EpRecompute::kExperts;
  AM_FAIL("train.ep_recompute '{}' is not known; use none (the EP backward keeps the expert "
          "activations), outputs (recomputes the expert outputs: one GEMM more per layer) or "
          "experts (recomputes gate|up and the outputs from the received rows: two GEMMs more)",
          name);
}

const char* ep_mode_name(EpMode m) { return m == EpMode::kCounts ? "counts" : "padded"; }

EpMode parse_ep_dispatch(const std::string& name) {
  if (name == "counts") return EpMode::kCounts;
  if (name == "padded") return EpMode::kPadded;
  AM_FAIL("train.ep_dispatch '{}' is not known; use counts (the per-destination counts are "
          "exchanged and read on the host once per MoE layer forward: exact sizes) or padded "
          "(no host sync: every peer gets a region of N rows; needs train.ep_recompute experts)",
          name);
}

EpSavedLayout ep_saved_layout(const EpMoeShape& s, int P, int64_t N, int64_t R, int64_t M,
                              EpRecompute rc) {
  const int64_t El = s.E / std::max(P, 1);
  EpSavedLayout l;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t off = at;
    at += ep_align(bytes);
    return off;
  };
  l.send_pos = take(size_t(N * P) * 4);
  l.offsets = take(size_t(El + 1) * 4);
  l.slot_row = take(size_t(R * s.K) * 4);
  l.w_recv = take(size_t(R * s.K) * 4);
  l.x_recv = take(size_t(R * s.H) * 2);
  l.gu = rc == EpRecompute::kExperts ? kEpNotSaved : take(size_t(M * 2 * s.I) * 2);
  l.ys = rc == EpRecompute::kNone ? take(size_t(M * s.H) * 2) : kEpNotSaved;
  l.bytes = at;
  return l;
}

EpLoad ep_expected_load(const EpMoeShape& s, int P, int64_t N) {
  const int64_t El = s.E / std::max(P, 1);
  // P(a token has none of its K distinct picks among this rank's El experts) = C(E-El,K)/C(E,K)
  double none = 1.0;
  for (int64_t i = 0; i < s.K; ++i)
    none *= s.E - El - i > 0 ? double(s.E - El - i) / double(s.E - i) : 0.0;
  return {double(P) * double(N) * (1.0 - none), double(N) * double(s.K)};
}

EpLoad ep_worst_load(const EpMoeShape& s, int P, int64_t N) {
  const int64_t El = s.E / std::max(P, 1);
  const double R = double(P) * double(N);
  return {R, R * double(std::min(s.K, El))};
}

void check_ep_chunks(int C) {
  AM_CHECK(C >= 1 && C <= kEpMaxChunks,
           "train.ep_chunks must be between 1 (no pipelining, the default) and {} (the EP block "
           "pipelines its tokens in that many chunks; 1 unless measured faster), got {}",
           kEpMaxChunks, C);
}

size_t ep_arena_worst_bytes(const EpMoeShape& s, int P, int local_ranks, EpRecompute rc,
                            int chunks) {
  check_ep_chunks(chunks);
  size_t b = 0;
  for (int c = 0; c < chunks; ++c) {
    const int64_t n = ep_chunk_tokens(s.max_tokens, chunks, c);
    const EpLoad w = ep_worst_load(s, P, n);
    b += ep_align(ep_saved_layout(s, P, n, int64_t(w.rows), int64_t(w.picks), rc).bytes);
  }
  return size_t(local_ranks) * b;
}

size_t ep_arena_bytes(const EpMoeShape& s, int P, int64_t layers, int local_ranks,
                      double capacity, EpRecompute rc, int chunks) {
  AM_CHECK(capacity > 0 && std::isfinite(capacity),
           "train.ep_capacity must be a positive number (the EP arena's size over the balanced "
           "load; 2 is the default), got {}",
           capacity);
  check_ep_chunks(chunks);
  size_t expected = 0;
  for (int c = 0; c < chunks; ++c) {
    const int64_t n = ep_chunk_tokens(s.max_tokens, chunks, c);
    const EpLoad e = ep_expected_load(s, P, n);
    expected += ep_align(
        ep_saved_layout(s, P, n, int64_t(std::ceil(e.rows)), int64_t(std::ceil(e.picks)), rc)
            .bytes);
  }
  const double want = std::ceil(capacity * double(expected) * double(layers) * double(local_ranks));
  const size_t worst = size_t(layers) * ep_arena_worst_bytes(s, P, local_ranks, rc, chunks);
  return want >= double(worst) ? worst : ep_align(size_t(want));
}

size_t ep_arena_padded_bytes(const EpMoeShape& s, int P, int64_t layers, int local_ranks,
                             EpRecompute rc, int chunks) {
  return size_t(layers) * ep_arena_worst_bytes(s, P, local_ranks, rc, chunks);
}

double ep_padded_wire_ratio(const EpMoeShape& s, int P) {
  const EpLoad e = ep_expected_load(s, P, s.max_tokens);  // rows received = rows sent, balanced
  return e.rows > 0 ? double(P) * double(s.max_tokens) / e.rows : 1.0;
}

int64_t EpBumpArena::take(size_t bytes) {
  const size_t b = ep_align(bytes);
  if (b > cap_ - used_) return -1;
  const size_t off = used_;
  used_ += b;
  return int64_t(off);
}

std::string ep_arena_overflow_message(const std::string& label, int rank, size_t need,
                                      size_t left, size_t capacity, int64_t rows, int64_t picks) {
  const double MiB = double(1 << 20);
  return fmt::format(
      "[EpMoeCuda] {}: EP rank {} needs {:.1f} MiB for this layer's saved state ({} received "
      "rows, {} expert rows), but only {:.1f} MiB of the {:.1f} MiB EP arena are left this step "
      "(the routing is more skewed than the arena allows); raise train.ep_capacity (the arena "
      "over the balanced load, default 2), or use fewer tokens per micro-batch",
      label, rank, double(need) / MiB, rows, picks, double(left) / MiB, double(capacity) / MiB);
}

std::string ep_arena_padded_overflow_message(const std::string& label, size_t need, size_t left,
                                             size_t capacity, int64_t N) {
  const double MiB = double(1 << 20);
  return fmt::format(
      "[EpMoeCuda] {}: padded mode needs {:.1f} MiB for this layer's saved state (the worst case "
      "of {} tokens per rank, whatever the routing), but only {:.1f} MiB of the {:.1f} MiB EP "
      "arena are left this step; size the arena with ep_arena_padded_bytes for every layer, "
      "rank and token that carves from it",
      label, double(need) / MiB, N, double(left) / MiB, double(capacity) / MiB);
}

}  // namespace automoe::dist
