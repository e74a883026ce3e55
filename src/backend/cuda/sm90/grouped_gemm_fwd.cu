// backend/cuda/sm90/grouped_gemm_fwd.cu: out = x @ w[e]^T per expert on sm90 (one CUTLASS
// instantiation, 128x256x64 tiles without clusters: A = x rows, K contiguous; B = w[e] [O,I],
// K contiguous; D = out rows).
#include "backend/cuda/sm90/grouped_gemm.cuh"

namespace automoe::cuda::sm90 {

namespace {
using T = cutlass::bfloat16_t;
using G = GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, T, DefaultTileShape, NoCluster>;
}  // namespace

size_t fwd_workspace_bytes(int64_t E, int num_sms) { return workspace_bytes<G>(E, num_sms); }

void fwd(bf16* out, const bf16* x, const bf16* w, const int32_t* offsets, int64_t E, int64_t I,
         int64_t O, const Ctx& ctx) {
  run_fwd<G>(reinterpret_cast<T*>(out), x, w, offsets, E, I, O, ctx);
}

}  // namespace automoe::cuda::sm90
