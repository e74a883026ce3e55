// backend/cuda/sm90/grouped_gemm_dgrad.cu: dx = dout @ w[e] per expert on sm90 (one CUTLASS
// instantiation, 128x256x64 tiles without clusters: A = dout rows, K contiguous; B = w[e] read
// as [I x O] with I contiguous).
#include "backend/cuda/sm90/grouped_gemm.cuh"

namespace automoe::cuda::sm90 {

namespace {
using T = cutlass::bfloat16_t;
using G = GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::RowMajor, T, DefaultTileShape, NoCluster>;
}  // namespace

size_t dgrad_workspace_bytes(int64_t E, int num_sms) { return workspace_bytes<G>(E, num_sms); }

void dgrad(bf16* dx, const bf16* dout, const bf16* w, const int32_t* offsets, int64_t E,
           int64_t I, int64_t O, const Ctx& ctx) {
  run_dgrad<G>(reinterpret_cast<T*>(dx), dout, w, offsets, E, I, O, ctx);
}

}  // namespace automoe::cuda::sm90
