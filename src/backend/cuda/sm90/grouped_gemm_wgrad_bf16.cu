// backend/cuda/sm90/grouped_gemm_wgrad_bf16.cu: dw[e] = beta * dw[e] + dout_e^T @ x_e on sm90,
// bf16 weight gradients (one CUTLASS instantiation: both operands M/N contiguous, K = rows).
#include "backend/cuda/sm90/grouped_gemm.cuh"

namespace automoe::cuda::sm90 {

namespace {
using G = GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, cutlass::bfloat16_t>;
}  // namespace

size_t wgrad_bf16_workspace_bytes(int64_t E, int num_sms) {
  return workspace_bytes<G>(E, num_sms);
}

void wgrad(bf16* dw, float beta, const bf16* dout, const bf16* x, const int32_t* offsets,
           int64_t E, int64_t I, int64_t O, const Ctx& ctx) {
  run_wgrad<G>(reinterpret_cast<cutlass::bfloat16_t*>(dw), beta, dout, x, offsets, E, I, O, ctx);
}

}  // namespace automoe::cuda::sm90
