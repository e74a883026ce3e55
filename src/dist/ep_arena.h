// dist/ep_arena.h: the host arithmetic of the GPU expert-parallel block's saved state
// (dist/expert_parallel_cuda.h): what one layer's backward needs on one rank, how much a model's
// arena holds for all its MoE layers, and the bump carving out of it. No CUDA here, so CI tests
// it on the CPU (tests/dist/test_ep_arena.cpp).
//
// One carve (one MoE layer, one rank), byte offsets from its start, each buffer 256-byte aligned
// (the grouped GEMMs' TMA wants 16-byte bases):
//   send_pos [N,P] i32     send-buffer row of (token, destination), -1
//   offsets  [El+1] i32    rows of each local expert
//   slot_row [R*K] i32     expert-ordered row of each received pick, -1
//   w_recv   [R,K] f32     received routing weights (unpermute's backward)
//   x_recv   [R,H] bf16    received tokens (the backward recomputes permute)
//   gu       [M,2I] bf16   gate|up outputs            (not with EpRecompute::kExperts)
//   ys       [M,H] bf16    expert outputs (unpermute's backward; not with kOutputs, kExperts)
// N tokens of this rank, R received rows, M received picks (expert rows), El = E/P.
// gu and ys are most of a carve (at Qwen3-30B-A3B's shapes, EP = 4: 80%); the backward can
// recompute them from x_recv with the forward's kernels on the forward's inputs, so the
// gradients are bit-identical whichever is kept (EpRecompute, train.ep_recompute).
//
// Dispatch (EpMode, train.ep_dispatch): in counts mode a carve holds what the layer received
// (R, M read back with the counts); in padded mode every peer's region of N rows arrives
// whatever the routing, so every carve is the worst case, known on the host from N alone
// (R = P*N, M = P*N*min(K, El)): ep_arena_padded_bytes.
//
// The expected load (balanced routing: every token's K distinct experts uniform over E): a
// rank receives R = P*N*(1 - C(E-El, K)/C(E, K)) rows (a token travels once per rank it has a
// pick on) and M = N*K picks (P*N tokens x K picks x 1/P). The worst: R = P*N, M = R*min(K, El).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace automoe::dist {

struct EpMoeShape {
  int64_t max_tokens = 0;  // N of any call is <= this
  int64_t H = 0, I = 0, E = 0, K = 0;
};

// What the EP backward recomputes instead of keeping in the carve (train.ep_recompute):
//   kNone     gu and ys kept
//   kOutputs  ys not kept: the backward re-runs the down GEMM on swiglu(gu) (one GEMM)
//   kExperts  neither: the backward re-permutes x_recv and re-runs the gate_up GEMM, SwiGLU and
//             the down GEMM (two GEMMs), as the single-GPU memory-saving mode does; the
//             scratch then holds one gate|up buffer for the worst routing of one layer
enum class EpRecompute { kNone, kOutputs, kExperts };

// How the EP block sizes its receive (train.ep_dispatch; dist/expert_parallel_cuda.h):
//   kCounts  counts exchanged, one device-to-host sync per layer forward, exact carves
//   kPadded  a region of N rows per peer, no host sync, worst-case carves
enum class EpMode { kCounts, kPadded };
const char* ep_mode_name(EpMode m);  // "counts", "padded"
// "counts" | "padded"; anything else throws naming the accepted values.
EpMode parse_ep_dispatch(const std::string& name);
const char* ep_recompute_name(EpRecompute r);  // "none", "outputs", "experts"
// "none" | "outputs" | "experts"; anything else throws naming the accepted values.
EpRecompute parse_ep_recompute(const std::string& name);

constexpr size_t kEpArenaAlign = 256;
inline size_t ep_align(size_t bytes) { return (bytes + kEpArenaAlign - 1) / kEpArenaAlign * kEpArenaAlign; }

// Offset of a buffer the carve does not hold (recomputed in the backward).
constexpr size_t kEpNotSaved = SIZE_MAX;

// Byte offsets of one carve's buffers (see the file comment) and its total size; gu and ys are
// kEpNotSaved when `rc` recomputes them.
struct EpSavedLayout {
  size_t send_pos = 0, offsets = 0, slot_row = 0, w_recv = 0, x_recv = 0, gu = 0, ys = 0;
  size_t bytes = 0;
};
EpSavedLayout ep_saved_layout(const EpMoeShape& s, int P, int64_t N, int64_t R, int64_t M,
                              EpRecompute rc);

// Token chunks (train.ep_chunks): the block pipelines N tokens as C contiguous chunks, each a
// complete EP pass with its own carve; the first N % C chunks hold one token more (at most
// ceil(N/C) each). The same split on every rank for the same N.
constexpr int kEpMaxChunks = 8;
inline int64_t ep_chunk_tokens(int64_t N, int C, int c) { return N / C + (c < N % C ? 1 : 0); }
inline int64_t ep_chunk_begin(int64_t N, int C, int c) {
  return c * (N / C) + (c < N % C ? c : N % C);
}
// Throws unless 1 <= C <= kEpMaxChunks, saying what to set.
void check_ep_chunks(int C);

// Received rows and picks of one rank and layer: expected under balanced routing, and the worst.
struct EpLoad {
  double rows = 0, picks = 0;
};
EpLoad ep_expected_load(const EpMoeShape& s, int P, int64_t N);
EpLoad ep_worst_load(const EpMoeShape& s, int P, int64_t N);

// Arena bytes for `layers` MoE layers x `local_ranks` ranks of this process, carves laid out for
// `rc`: ceil(capacity x the expected carves), at most the worst carves (a larger arena could
// never be used up). capacity > 0 (train.ep_capacity). `chunks`: a layer carves once per token
// chunk (train.ep_chunks), so its carves are those of max_tokens split by ep_chunk_tokens (the
// same rows, plus per carve its offsets and the alignment).
size_t ep_arena_bytes(const EpMoeShape& s, int P, int64_t layers, int local_ranks, double capacity,
                      EpRecompute rc, int chunks = 1);
// The worst case of ONE layer's carves (what a block without a shared arena owns).
size_t ep_arena_worst_bytes(const EpMoeShape& s, int P, int local_ranks, EpRecompute rc,
                            int chunks = 1);
// Padded mode: `layers` x the worst carves (every forward carves P*N rows whatever the routing,
// so this never overflows for N <= max_tokens and there is no capacity to choose).
size_t ep_arena_padded_bytes(const EpMoeShape& s, int P, int64_t layers, int local_ranks,
                             EpRecompute rc, int chunks = 1);
// Padded over counts mode: rows a rank sends (= wire bytes; rows to itself included on both
// sides), P*N against the expected N*P*(1 - C(E-El, K)/C(E, K)) of balanced routing.
double ep_padded_wire_ratio(const EpMoeShape& s, int P);

// Bump allocation out of [0, capacity): carves in call order, all valid until reset().
class EpBumpArena {
 public:
  explicit EpBumpArena(size_t capacity = 0) : cap_(capacity) {}
  size_t capacity() const { return cap_; }
  size_t used() const { return used_; }
  size_t left() const { return cap_ - used_; }
  // Offset of `bytes` (rounded up to kEpArenaAlign); -1 when they do not fit (nothing taken).
  int64_t take(size_t bytes);
  void reset() {
    used_ = 0;
    ++generation_;
  }
  // Counts reset()s: a carve is valid while the generation it was taken in is current.
  uint64_t generation() const { return generation_; }

 private:
  size_t cap_ = 0, used_ = 0;
  uint64_t generation_ = 0;
};

// The sentence of an overflow, the same on every rank: which layer, which rank, what it needed
// and what was left, and what to do.
std::string ep_arena_overflow_message(const std::string& label, int rank, size_t need,
                                      size_t left, size_t capacity, int64_t rows, int64_t picks);
// Padded mode's: no routing can cause it (every carve is the worst case of N tokens), only an
// arena sized for fewer layers, ranks or tokens than carve from it.
std::string ep_arena_padded_overflow_message(const std::string& label, size_t need, size_t left,
                                             size_t capacity, int64_t N);

}  // namespace automoe::dist
