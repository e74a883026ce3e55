// backend/cuda/copy_many.h: many device-to-device copies in ONE kernel launch (the SMs load and
// store; a destination may be a peer GPU's memory mapped here, as CUDA IPC staging is, so the
// stores cross NVLink). dist::IpcTransport moves an all-to-all's rows with it: one launch for
// every peer and tensor of a call where a copy-engine cudaMemcpyAsync per (peer, tensor) cost
// a few microseconds of queue latency each.
// Each span copies `bytes` from src to dst (non-overlapping); spans of 0 bytes are skipped.
// 16-byte vectors where a span's dst, src and bytes allow it, else 4-byte words, else bytes.
#pragma once
#include <cstdint>

#include "backend/cuda/common.cuh"

namespace automoe::cuda {

constexpr int kCopyManyMax = 32;  // spans per launch: 3 tensors x 8 ranks, plus room

struct CopySpan {
  void* dst = nullptr;
  const void* src = nullptr;
  int64_t bytes = 0;
};

struct CopyMany {
  CopySpan span[kCopyManyMax];
  int n = 0;
  // Appends a span (none for 0 bytes); throws past kCopyManyMax spans.
  void add(void* dst, const void* src, int64_t bytes);
};

// Every span of c, on `stream`; nothing is launched when c has no span.
void copy_many(const CopyMany& c, cudaStream_t stream);

}  // namespace automoe::cuda
