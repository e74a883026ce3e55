// backend/cuda/common.cuh: host-side foundation of the CUDA backend: error checks that throw
// automoe::Error (file:line and the CUDA/cuBLAS error string), a RAII device buffer, and the
// context every op takes last (stream, cuBLASLt handle, workspace). No device code here, so
// plain .cpp files (model, trainer) can include it through ops_cuda.h.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "core/check.h"

namespace automoe::cuda {

using bf16 = __nv_bfloat16;

[[noreturn]] void fail_cuda(const char* file, int line, const char* expr, cudaError_t e);
[[noreturn]] void fail_cublas(const char* file, int line, const char* expr, cublasStatus_t s);

}  // namespace automoe::cuda

// CUDA_CHECK(cudaMalloc(...)): throws automoe::Error "<expr> failed: <cuda error string>".
#define CUDA_CHECK(expr)                                                             \
  do {                                                                               \
    cudaError_t am_err_ = (expr);                                                    \
    if (am_err_ != cudaSuccess) ::automoe::cuda::fail_cuda(__FILE__, __LINE__, #expr, am_err_); \
  } while (0)
#define CUBLAS_CHECK(expr)                                                           \
  do {                                                                               \
    cublasStatus_t am_st_ = (expr);                                                  \
    if (am_st_ != CUBLAS_STATUS_SUCCESS)                                             \
      ::automoe::cuda::fail_cublas(__FILE__, __LINE__, #expr, am_st_);               \
  } while (0)
// After every kernel launch: bad launch configurations surface here; faults inside a kernel
// surface at the next synchronising call (the caller's, never the op's).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace automoe::cuda {

// What every op takes last. Ops enqueue on `stream` and never synchronise with the host.
// `workspace` is scratch for the op in flight: ops on one stream run in order, so every op may
// reuse all of it. An op that needs scratch says how much in its *_workspace_bytes(); the
// caller sizes the workspace once for the largest need (never allocated on the hot path).
struct Ctx {
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;  // linear's GEMMs
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int num_sms = 132;  // multiprocessors of the device, for grid sizes
};

// ctx.workspace when it holds `bytes`; otherwise an Error naming the op and what to do.
void* workspace_for(const Ctx& ctx, size_t bytes, const char* op);
// Throws, saying what to do, when this process has no usable CUDA device (no GPU, no or too
// old a driver, CUDA_VISIBLE_DEVICES empty). `who`: the command or option that needs one.
void require_device(const char* who);
// A non-blocking stream at the current device's highest priority: the side streams whose
// transfers (all-reduces, gathers, all-to-alls) should start before queued compute blocks.
cudaStream_t create_priority_stream();

// Device memory owned by one object (move-only). Allocation is cudaMalloc: do it at set-up.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n) CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Owns what a Ctx points to: a non-blocking stream, a cuBLASLt handle and a workspace of
// `workspace_bytes` (allocated here, once). Lives as long as the ops that use it.
// The stream has one priority level above the default (below create_priority_stream's), so
// that where its kernels and those of a default-priority stream (the EP block's weight
// gradients on their side stream) wait for the same SMs, the block scheduler places its blocks
// first: W2 with 24 layers went from 417.5 to 423.1 TFLOP/s (bench/RESULTS.md, 2026-11-30).
// AUTOMOE_CTX_PRIORITY=0 gives it the default priority (the same bits).
class ScopedCtx {
 public:
  explicit ScopedCtx(size_t workspace_bytes, int device = 0);
  ~ScopedCtx();
  ScopedCtx(const ScopedCtx&) = delete;
  ScopedCtx& operator=(const ScopedCtx&) = delete;
  const Ctx& ctx() const { return ctx_; }

 private:
  Ctx ctx_;
  DeviceBuffer<unsigned char> ws_;
};

}  // namespace automoe::cuda
