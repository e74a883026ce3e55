// backend/cuda/sm90/grouped_gemm_wgrad_f32.cu: dw[e] = beta * dw[e] + dout_e^T @ x_e on sm90,
// fp32 weight gradients (fp32 master-weight mode; one CUTLASS instantiation).
#include "backend/cuda/sm90/grouped_gemm.cuh"

namespace automoe::cuda::sm90 {

namespace {
using G = GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, float>;
}  // namespace

size_t wgrad_f32_workspace_bytes(int64_t E, int num_sms) {
  return workspace_bytes<G>(E, num_sms);
}

void wgrad(float* dw, float beta, const bf16* dout, const bf16* x, const int32_t* offsets,
           int64_t E, int64_t I, int64_t O, const Ctx& ctx) {
  run_wgrad<G>(dw, beta, dout, x, offsets, E, I, O, ctx);
}

}  // namespace automoe::cuda::sm90
