// backend/cuda/common.cu: error reporting, the workspace check and the owning context.
#include <algorithm>
#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "backend/cuda/common.cuh"

namespace automoe::cuda {

void fail_cuda(const char* file, int line, const char* expr, cudaError_t e) {
  ::automoe::fail_at(file, line,
                     fmt::format("{} failed: {} ({})", expr, cudaGetErrorString(e),
                                 cudaGetErrorName(e)));
}

void fail_cublas(const char* file, int line, const char* expr, cublasStatus_t s) {
  ::automoe::fail_at(file, line,
                     fmt::format("{} failed: {} ({})", expr, cublasLtGetStatusString(s),
                                 cublasLtGetStatusName(s)));
}

void* workspace_for(const Ctx& ctx, size_t bytes, const char* op) {
  if (bytes == 0) return ctx.workspace;
  AM_CHECK(ctx.workspace && ctx.workspace_bytes >= bytes,
           "[{}] needs {} bytes of workspace but the Ctx has {}: size the workspace with the "
           "op's *_workspace_bytes() at set-up",
           op, bytes, ctx.workspace_bytes);
  return ctx.workspace;
}

void require_device(const char* who) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) (void)cudaGetLastError();  // the error is not sticky: clear it
  AM_CHECK(e == cudaSuccess && n > 0,
           "{}: no usable CUDA GPU in this process ({}); run it on a machine with an NVIDIA GPU "
           "and a driver for CUDA {}.{} or newer (check nvidia-smi and CUDA_VISIBLE_DEVICES), or "
           "use the CPU backend",
           who, e != cudaSuccess ? cudaGetErrorString(e) : "0 devices", CUDART_VERSION / 1000,
           CUDART_VERSION % 1000 / 10);
}

cudaStream_t create_priority_stream() {
  int least = 0, greatest = 0;
  CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
  return s;
}

ScopedCtx::ScopedCtx(size_t workspace_bytes, int device) : ws_(0) {
  require_device("the CUDA backend");
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaDeviceGetAttribute(&ctx_.num_sms, cudaDevAttrMultiProcessorCount, device));
  const char* prio = std::getenv("AUTOMOE_CTX_PRIORITY");
  if (!(prio && std::string(prio) == "0")) {
    int least = 0, greatest = 0;  // numerically: greatest <= least
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    CUDA_CHECK(cudaStreamCreateWithPriority(&ctx_.stream, cudaStreamNonBlocking,
                                            std::max(greatest, least - 1)));
  } else {
    CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking));
  }
  CUBLAS_CHECK(cublasLtCreate(&ctx_.lt));
  ws_ = DeviceBuffer<unsigned char>(workspace_bytes);
  ctx_.workspace = ws_.get();
  ctx_.workspace_bytes = workspace_bytes;
}

ScopedCtx::~ScopedCtx() {
  // No throwing from a destructor: errors here only mean the device is already gone.
  if (ctx_.stream) cudaStreamSynchronize(ctx_.stream);
  if (ctx_.lt) cublasLtDestroy(ctx_.lt);
  if (ctx_.stream) cudaStreamDestroy(ctx_.stream);
}

}  // namespace automoe::cuda
