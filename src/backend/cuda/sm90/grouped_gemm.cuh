// backend/cuda/sm90/grouped_gemm.cuh: the one CUTLASS 3.x sm90 grouped GEMM template behind
// grouped_gemm_sm90.h, and its launcher. Included only by the sm90/grouped_gemm_*.cu files, one
// instantiation each (CUTLASS templates are slow to compile: keep them few and apart).
//
// D_e[M_e,N_e] = A_e[M_e,K_e] B_e[K_e,N_e] + beta * C_e (C_e = D_e), per expert e, with every
// shape, pointer and stride on the device. In CUTLASS's convention B is N x K: LayoutB
// ColumnMajor means K contiguous, RowMajor N contiguous; LayoutA RowMajor means K contiguous.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "backend/cuda/grouped_gemm_sm90.h"

namespace automoe::cuda::sm90 {

// Production configuration (the defaults): cooperative warp-specialised persistent kernel,
// 128x256x64 tiles, 2x1x1 clusters (B tiles multicast to the two M tiles of a cluster), the
// configuration torch._grouped_mm runs on Hopper for groups larger than 128 in M and N. Two
// consumer warpgroups share a tile; one producer warp issues the TMA loads; the epilogue stores
// through TMA. Stages: as many as shared memory holds after the epilogue's buffers.
// bench/grouped_sweep.cu times other tiles, clusters and schedules (KernelSchedule and
// EpilogueSchedule go in pairs: Cooperative/Cooperative, tile M >= 128; or Pingpong/Pingpong,
// one consumer warpgroup per tile, tile M 64 or 128).
using DefaultTileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;  // M, N, K per CTA
using DefaultClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;    // CTAs per cluster
using DefaultKernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using DefaultEpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
// Without clusters: what fwd and dgrad run (the sweep on an H200, 2026-11-29: 1.05-1.10x over
// 2x1x1 on all four W1 fwd/dgrad GEMMs; the wgrads gained nothing from any configuration: their
// bf16 dW read and write bound them).
using NoCluster = cute::Shape<cute::_1, cute::_1, cute::_1>;

template <class LayoutA_, class LayoutB_, class ElementD_, class TileShape_ = DefaultTileShape,
          class ClusterShape_ = DefaultClusterShape,
          class KernelSchedule_ = DefaultKernelSchedule,
          class EpilogueSchedule_ = DefaultEpilogueSchedule>
struct GroupedGemm {
  using ElementA = cutlass::bfloat16_t;
  using ElementB = cutlass::bfloat16_t;
  using ElementD = ElementD_;
  using ElementC = ElementD_;  // read only when beta != 0
  using ElementAcc = float;
  using LayoutA = LayoutA_;
  using LayoutB = LayoutB_;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16 / int(sizeof(ElementA));  // TMA: 16-byte rows
  static constexpr int kAlignD = 16 / int(sizeof(ElementD));
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, ElementC, LayoutD*,
      kAlignD, ElementD, LayoutD*, kAlignD,
      EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, ElementAcc>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA*, kAlignAB, ElementB,
      LayoutB*, kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;  // (M, N, K) int32
  static_assert(std::is_same_v<typename Kernel::InternalStrideC, StrideD>, "C aliases D");
};

// The per-expert arrays in ctx.workspace, each 256-byte aligned, then CUTLASS's workspace:
//   shapes[E] | a[E] | b[E] | c[E] | d[E] (pointers) | sa[E] | sb[E] | sd[E] (strides) | cutlass
template <class G>
struct Arrays {
  typename G::Shape* shapes;
  const typename G::ElementA** a;
  const typename G::ElementB** b;
  const typename G::ElementC** c;
  typename G::ElementD** d;
  typename G::StrideA* sa;
  typename G::StrideB* sb;
  typename G::StrideD* sd;
  void* cutlass_ws;
};

// Lays the arrays out from `base` (0 to only measure); returns the bytes before cutlass_ws.
template <class G>
size_t carve(Arrays<G>& r, uintptr_t base, int64_t E) {
  size_t off = 0;
  auto take = [&](auto*& p, size_t elem_bytes) {
    p = reinterpret_cast<std::remove_reference_t<decltype(p)>>(base + off);
    off += (elem_bytes * size_t(E) + 255) & ~size_t(255);
  };
  take(r.shapes, sizeof(typename G::Shape));
  take(r.a, sizeof(void*));
  take(r.b, sizeof(void*));
  take(r.c, sizeof(void*));
  take(r.d, sizeof(void*));
  take(r.sa, sizeof(typename G::StrideA));
  take(r.sb, sizeof(typename G::StrideB));
  take(r.sd, sizeof(typename G::StrideD));
  r.cutlass_ws = reinterpret_cast<void*>(base + off);
  return off;
}

// Operand X of expert e starts at base + offsets[e] * per_row + e * per_group (elements); ld is
// its leading dimension (elements between rows of its contiguous dimension).
template <class T>
struct Operand {
  T* base;
  int64_t per_row, per_group, ld;
};
constexpr int kRowsOfExpert = -1;  // a GEMM dimension that is the expert's row count

// One thread per expert: problem shape, pointers, strides. Experts with no rows get M = 0, which
// CUTLASS's group scheduler skips (no tile; for K = 0 the kernel would store garbage).
template <class G>
__global__ void prepare_kernel(Arrays<G> arr, const int32_t* __restrict__ offsets, int E, int m,
                               int n, int k, Operand<const typename G::ElementA> a,
                               Operand<const typename G::ElementB> b,
                               Operand<typename G::ElementD> d) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
    const int64_t r0 = offsets[e];
    const int rows = offsets[e + 1] - offsets[e];
    int M = m == kRowsOfExpert ? rows : m;
    const int N = n == kRowsOfExpert ? rows : n;
    const int K = k == kRowsOfExpert ? rows : k;
    if (rows <= 0) M = 0;
    arr.shapes[e] = typename G::Shape(M, N, K);
    arr.a[e] = a.base + r0 * a.per_row + e * a.per_group;
    arr.b[e] = b.base + r0 * b.per_row + e * b.per_group;
    typename G::ElementD* de = d.base + r0 * d.per_row + e * d.per_group;
    arr.d[e] = de;
    arr.c[e] = de;
    // packed-stride helpers set the one dynamic stride from the shape entry it reads
    // (row-major: the 2nd, column-major: the 1st), so both entries carry ld.
    arr.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{},
                                                 {int(a.ld), int(a.ld), 1});
    arr.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{},
                                                 {int(b.ld), int(b.ld), 1});
    arr.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{},
                                                 {int(d.ld), int(d.ld), 1});
  }
}

template <class G>
typename G::Gemm::Arguments make_arguments(const Arrays<G>& arr, int64_t E, float beta,
                                           int num_sms, int device) {
  typename G::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {int(E), arr.shapes, nullptr};  // device shapes only: no host copy
  args.mainloop.ptr_A = arr.a;
  args.mainloop.dA = arr.sa;
  args.mainloop.ptr_B = arr.b;
  args.mainloop.dB = arr.sb;
  args.epilogue.ptr_C = arr.c;
  args.epilogue.dC = arr.sd;
  args.epilogue.ptr_D = arr.d;
  args.epilogue.dD = arr.sd;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = beta;  // 0: C is not read (CUTLASS skips the source load)
  args.hw_info.device_id = device;
  args.hw_info.sm_count = num_sms;
  return args;
}

template <class G>
size_t workspace_bytes(int64_t E, int num_sms) {
  Arrays<G> arr{};
  const size_t arrays = carve<G>(arr, 0, E);
  return arrays + G::Gemm::get_workspace_size(make_arguments<G>(arr, E, 0.f, num_sms, 0));
}

// The launch: arrays from offsets, then the grouped kernel, both on ctx.stream.
template <class G>
void run(const char* op, int64_t E, int m, int n, int k, Operand<const typename G::ElementA> a,
         Operand<const typename G::ElementB> b, Operand<typename G::ElementD> d, float beta,
         const int32_t* offsets, const Ctx& ctx) {
  AM_CHECK(E >= 1 && E <= (int64_t(1) << 30), "[{}] {} experts", op, E);
  const void* ptrs[] = {a.base, b.base, d.base};
  for (const void* p : ptrs)
    AM_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0,
             "[{}] the sm90 grouped GEMM needs 16-byte aligned operands (TMA); got {}: use the "
             "fallback (AUTOMOE_GROUPED_GEMM=fallback) or align the buffers",
             op, p);
  const int64_t lds[] = {a.ld, b.ld, d.ld};
  for (int64_t ld : lds)
    AM_CHECK(ld % G::kAlignAB == 0 && ld < (int64_t(1) << 31),
             "[{}] the sm90 grouped GEMM needs I and O to be multiples of 8 (16-byte rows for "
             "TMA); got a leading dimension of {}",
             op, ld);
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const size_t need = workspace_bytes<G>(E, ctx.num_sms);
  Arrays<G> arr{};
  carve<G>(arr, reinterpret_cast<uintptr_t>(workspace_for(ctx, need, op)), E);

  const int threads = 128, blocks = int((E + threads - 1) / threads);
  prepare_kernel<G><<<blocks, threads, 0, ctx.stream>>>(arr, offsets, int(E), m, n, k, a, b, d);
  CUDA_CHECK_LAUNCH();

  auto args = make_arguments<G>(arr, E, beta, ctx.num_sms, device);
  typename G::Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  AM_CHECK(st == cutlass::Status::kSuccess, "[{}] CUTLASS cannot run this grouped GEMM: {}", op,
           cutlassGetStatusString(st));
  st = gemm.initialize(args, arr.cutlass_ws, ctx.stream);
  AM_CHECK(st == cutlass::Status::kSuccess, "[{}] CUTLASS initialize failed: {}", op,
           cutlassGetStatusString(st));
  st = gemm.run(ctx.stream);
  CUDA_CHECK_LAUNCH();
  AM_CHECK(st == cutlass::Status::kSuccess, "[{}] CUTLASS launch failed: {}", op,
           cutlassGetStatusString(st));
}

// out[r,:] = x[r,:] @ w[e]^T: M = rows of e, N = O (B = w[e] [O,I], K contiguous), K = I.
template <class G>
void run_fwd(typename G::ElementD* out /*[R,O]*/, const bf16* x /*[R,I]*/,
             const bf16* w /*[E,O,I]*/, const int32_t* offsets, int64_t E, int64_t I, int64_t O,
             const Ctx& ctx) {
  using TA = const typename G::ElementA;
  using TB = const typename G::ElementB;
  run<G>("grouped_linear_fwd", E, kRowsOfExpert, int(O), int(I),
         Operand<TA>{reinterpret_cast<TA*>(x), I, 0, I},
         Operand<TB>{reinterpret_cast<TB*>(w), 0, O * I, I},
         Operand<typename G::ElementD>{out, O, 0, O}, 0.f, offsets, ctx);
}

// dx[r,:] = dout[r,:] @ w[e]: M = rows of e, N = I, K = O; B(n = i, k = o) = w[e][o*I + i].
template <class G>
void run_dgrad(typename G::ElementD* dx /*[R,I]*/, const bf16* dout /*[R,O]*/,
               const bf16* w /*[E,O,I]*/, const int32_t* offsets, int64_t E, int64_t I,
               int64_t O, const Ctx& ctx) {
  using TA = const typename G::ElementA;
  using TB = const typename G::ElementB;
  run<G>("grouped_linear_bwd", E, kRowsOfExpert, int(I), int(O),
         Operand<TA>{reinterpret_cast<TA*>(dout), O, 0, O},
         Operand<TB>{reinterpret_cast<TB*>(w), 0, O * I, I},
         Operand<typename G::ElementD>{dx, I, 0, I}, 0.f, offsets, ctx);
}

// Experts with no rows had no tile: their dw[e] = beta * dw[e] here (0 when beta = 0, so no
// NaN from an uninitialised buffer survives). Grid (chunks, E), chunks <= kScaleChunks: the
// blocks of experts with rows exit at once, so few chunks keep the launch cheap (a 256-chunk
// grid, 32k blocks for E = 128, cost ~22 us of block scheduling per call).
constexpr int64_t kScaleChunks = 16;
template <class T>
__global__ void scale_empty_experts_kernel(T* dw, float beta, const int32_t* __restrict__ offsets,
                                           int64_t per_expert) {
  const int64_t e = blockIdx.y;
  if (offsets[e + 1] - offsets[e] > 0) return;
  T* p = dw + e * per_expert;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < per_expert;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = beta == 0.f ? T(0.f) : T(beta * float(p[i]));
}

// dw[e] = beta * dw[e] + dout_e^T @ x_e: M = O (A = dout_e, column-major, ld O), N = I (B = x_e,
// N contiguous, ld I), K = rows of e; D = dw[e] row-major (ld I).
template <class G>
void run_wgrad(typename G::ElementD* dw, float beta, const bf16* dout, const bf16* x,
               const int32_t* offsets, int64_t E, int64_t I, int64_t O, const Ctx& ctx) {
  const char* op = "grouped_linear_bwd";
  AM_CHECK(E <= 65535, "[{}] {} experts: supported 1..65535", op, E);
  using TA = const typename G::ElementA;
  using TB = const typename G::ElementB;
  run<G>(op, E, int(O), int(I), kRowsOfExpert, Operand<TA>{reinterpret_cast<TA*>(dout), O, 0, O},
         Operand<TB>{reinterpret_cast<TB*>(x), I, 0, I},
         Operand<typename G::ElementD>{dw, 0, O * I, I}, beta, offsets, ctx);
  if (beta != 1.f) {
    const int64_t per_expert = O * I;
    const int threads = 256;
    const int64_t chunks =
        std::min<int64_t>((per_expert + threads * 8 - 1) / (threads * 8), kScaleChunks);
    scale_empty_experts_kernel<<<dim3(unsigned(chunks), unsigned(E)), threads, 0, ctx.stream>>>(
        dw, beta, offsets, per_expert);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace automoe::cuda::sm90
