// bench/grouped_sweep.h: what bench/grouped_sweep.cu (the driver) and the candidate translation
// units (bench/grouped_sweep_candidate.cuh, one CUTLASS configuration each) share: the call of
// one expert GEMM and the registry of candidates. No CUTLASS types here.
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend/cuda/common.cuh"

namespace automoe::sweep {

using cuda::bf16;

// The three operand layouts of the expert GEMMs (src/backend/cuda/sm90/grouped_gemm_*.cu);
// w[e] is [O, I] as in grouped_linear.
enum class Op { fwd, dgrad, wgrad };

// One launch, in grouped_linear's terms. Rows of expert e: [offsets[e], offsets[e+1]).
struct Call {
  bf16* out;      // fwd: out[R,O] =; dgrad: dx[R,I] =; wgrad: dw[E,O,I] += (beta = 1)
  const bf16* a;  // fwd: x[R,I]; dgrad: dout[R,O]; wgrad: dout[R,O]
  const bf16* b;  // fwd: w[E,O,I]; dgrad: w[E,O,I]; wgrad: x[R,I]
  const int32_t* offsets;  // [E+1], on the device
  int64_t E, I, O;
};

// One configuration for one layout. run enqueues the launch on ctx.stream and throws
// automoe::Error when CUTLASS cannot run it (can_implement, initialize, launch).
struct Candidate {
  Op op;
  const char* name;  // e.g. "coop_128x256x64_c2x1x1"; "production" is the library's entry point
  size_t (*workspace_bytes)(int64_t E, int num_sms);
  void (*run)(const Call& call, const cuda::Ctx& ctx);
};

// Called by each candidate translation unit's static initialiser (and by the driver for the
// production entry points); the driver lists them all.
void add_candidate(const Candidate& c);

}  // namespace automoe::sweep
