// bench/grouped_sweep_candidate.cuh: one candidate configuration of the sm90 grouped GEMM
// (src/backend/cuda/sm90/grouped_gemm.cuh) for bench/grouped_sweep.cu. With
// AUTOMOE_GROUPED_SWEEP=ON, CMakeLists.txt writes one small .cu per (layout, configuration) into
// the build tree that defines the macros below and includes this file, so every CUTLASS
// instantiation is its own translation unit and they compile in parallel.
//   SWEEP_OP        0 fwd, 1 dgrad, 2 wgrad (operand layouts of sm90/grouped_gemm_{fwd,dgrad,
//                   wgrad_bf16}.cu; wgrad: bf16 dw, beta = 1 as in training)
//   SWEEP_PINGPONG  0: KernelPtrArrayTmaWarpSpecializedCooperative + epilogue
//                   PtrArrayTmaWarpSpecializedCooperative (two consumer warpgroups share a tile,
//                   tile M >= 128); 1: the Pingpong pair (one consumer warpgroup per tile, the
//                   two alternate mainloop and epilogue; tile M 64 or 128)
//   SWEEP_TILE_M, SWEEP_TILE_N, SWEEP_TILE_K, SWEEP_CLUSTER_M, SWEEP_CLUSTER_N
//   SWEEP_NAME      the candidate's name, e.g. "pingpong_64x256x64_c2x1x1"
#pragma once
#include <type_traits>

#include "backend/cuda/sm90/grouped_gemm.cuh"
#include "grouped_sweep.h"

#if !defined(SWEEP_OP) || !defined(SWEEP_PINGPONG) || !defined(SWEEP_TILE_M) || \
    !defined(SWEEP_TILE_N) || !defined(SWEEP_TILE_K) || !defined(SWEEP_CLUSTER_M) ||  \
    !defined(SWEEP_CLUSTER_N) || !defined(SWEEP_NAME)
#error "define the SWEEP_* macros first (CMakeLists.txt, AUTOMOE_GROUPED_SWEEP)"
#endif

namespace {

namespace sm90 = automoe::cuda::sm90;
using automoe::sweep::Op;

constexpr Op kOp = Op(SWEEP_OP);
using T = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
// fwd: A = x (K contiguous), B = w[e] [O,I] (K contiguous); dgrad: A = dout, B = w[e] read as
// [I x O] (N contiguous); wgrad: A = dout_e^T (M contiguous), B = x_e (N contiguous).
using LayoutA = std::conditional_t<kOp == Op::wgrad, ColumnMajor, RowMajor>;
using LayoutB = std::conditional_t<kOp == Op::fwd, ColumnMajor, RowMajor>;
using Tile =
    cute::Shape<cute::Int<SWEEP_TILE_M>, cute::Int<SWEEP_TILE_N>, cute::Int<SWEEP_TILE_K>>;
using Cluster = cute::Shape<cute::Int<SWEEP_CLUSTER_M>, cute::Int<SWEEP_CLUSTER_N>, cute::_1>;
using KernelSchedule =
    std::conditional_t<SWEEP_PINGPONG != 0, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                       cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
using EpilogueSchedule =
    std::conditional_t<SWEEP_PINGPONG != 0, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                       cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
using G = sm90::GroupedGemm<LayoutA, LayoutB, T, Tile, Cluster, KernelSchedule, EpilogueSchedule>;

size_t candidate_workspace_bytes(int64_t E, int num_sms) {
  return sm90::workspace_bytes<G>(E, num_sms);
}

// The production launchers (sm90::run_fwd / run_dgrad / run_wgrad) with this configuration.
void run_candidate(const automoe::sweep::Call& c, const automoe::cuda::Ctx& ctx) {
  T* out = reinterpret_cast<T*>(c.out);
  if constexpr (kOp == Op::fwd) {
    sm90::run_fwd<G>(out, c.a, c.b, c.offsets, c.E, c.I, c.O, ctx);
  } else if constexpr (kOp == Op::dgrad) {
    sm90::run_dgrad<G>(out, c.a, c.b, c.offsets, c.E, c.I, c.O, ctx);
  } else {
    sm90::run_wgrad<G>(out, 1.0f, c.a, c.b, c.offsets, c.E, c.I, c.O, ctx);
  }
}

struct Register {
  Register() {
    automoe::sweep::add_candidate(
        {kOp, SWEEP_NAME, &candidate_workspace_bytes, &run_candidate});
  }
} const register_candidate;

}  // namespace
