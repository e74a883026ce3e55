// dist/zero3_cuda.h: ZeRO-3 for GPU ranks (train.zero 3 with train.device cuda; dist/zero3.h is
// the CPU's): the parameters, gradients and AdamW moments of a rank are its shard of the
// partition of dist/zero_partition.h (flat: [replicated shard | expert shard], the CPU's ZeRO
// optimizer arena, so the same checkpoint files), and the full device arenas do not exist. The
// model (model/qwen3_moe_cuda.cpp) reads a block's weights from a window the size of the largest
// block's device range, and writes its gradients into another:
//
//   blocks      forward order: 0 wte, 1 + l layer l, L+1 ln_f and lm_head. Each is a run of
//               consecutive layout tensors, so one device range [dev_lo, dev_hi) (the model's
//               aligned offsets) and, per group, one flat range [lo, hi)
//   gather      window[dev_lo, dev_hi) <- block b's parameters: per group, per owner rank of
//               a part of [lo, hi), that rank's shard elements broadcast to the group
//   reduce      grad_shard (= on a step's first micro-batch, += later) <- the group's sum of
//               the window's gradients: per owner, its part summed to it
//   keep_own    param_shard <- this rank's elements of a window (upload, init: no message)
//
// Over NCCL (the world's / DP group's communicator): ncclBroadcast from the shard into a device
// buffer, unpacked into the window's tensors; the window's tensors packed into it, ncclReduce
// in place (bf16; with 2 ranks one rounding of the fp32 sum, as ZeRO-1's ncclReduceScatter).
// Otherwise (MPI staging, as DeviceZero): pieces through pinned host memory, one host sync per
// round, Comm::broadcast of the bf16 bits; for the reduce widened to fp32, Comm::allreduce_sum,
// rounded to bf16 once (the sum ZeRO-1's MPI reduce-scatter takes, so with 2 ranks the same
// bits), uploaded. Each owner's part moves in rounds of at most kBucket elements. A group of one
// rank copies on the device. Buffers, the comm stream and its events are allocated once, in the
// constructor.
//
// Two ways to run them, the same collectives in the same rounds, so the same bits:
//   gather / reduce               synchronous on the caller's stream: a timed host wait per
//                                 group (NcclGroup::wait), as before; MPI staging always is
//   gather_async / reduce_async   NCCL (or groups of one rank) only: on this object's comm stream
//                                 (non-blocking, highest priority, as DeviceGradReducer's), after
//                                 the work enqueued on the caller's stream so far (one event), an
//                                 event of the caller's recorded on the comm stream when done; no
//                                 host wait. The caller orders its stream behind that event, and
//                                 join() behind everything (model/qwen3_moe_cuda.cpp:
//                                 State::z3_need, z3_grads, z3_reduce).
// NCCL's rule, every collective of a communicator issued in the same order on every rank from one
// stream at a time: the world and DP communicators carry only this object's collectives under
// ZeRO-3 (DeviceZero is not built beside it, DeviceGradReducer's overlapped and per-tensor
// all-reduces are off under ZeRO-3, and the EP transport has its own communicator, GpuComms), one
// host thread issues them in an order fixed by the block schedule, and the async ones all go to
// the comm stream. A synchronous call after async ones first waits on the host (timed) for the
// comm stream to drain, so the two streams never hold these communicators' kernels at once (and
// the synchronous calls end with a host wait, so nothing of theirs is in flight after them).
// Deadlock freedom beside the EP all-to-alls (the EP communicator, on the compute stream): every
// cross-stream wait is on an event recorded earlier in the one host order that every rank
// follows, so by induction over that order each collective's dependencies on every rank complete
// without a later host action; what is left is NCCL's caveat that both communicators' kernels
// must fit on the GPU at once (a few SMs each), the one DeviceGradReducer's overlap rests on.
// A stall ends in a timed host wait (the model's loss and norm readbacks, drain()) rather than a
// hang. Memory: none added here (both forms share the round buffer, in stream order); the
// model's second gradient window is its own (model/qwen3_moe_cuda.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "backend/cuda/common.cuh"
#include "dist/process_group.h"
#include "dist/zero_cuda.h"
#include "dist/zero_partition.h"

namespace automoe::dist {

class NcclGroup;

class DeviceZero3 {
 public:
  static constexpr int64_t kBucket = int64_t(1) << 24;  // elements per round

  // `part`: this rank's partition (level 3); dev_off[k]: the device offset of layout tensor k;
  // blocks[b]: block b's layout tensors [first, second). nccl_world / nccl_dp: the groups'
  // NCCL communicators (null: MPI staging). Groups and communicators must outlive this object.
  DeviceZero3(const ZeroPartition& part, const Groups& g, std::vector<int64_t> dev_off,
              const std::vector<std::pair<int64_t, int64_t>>& blocks,
              NcclGroup* nccl_world = nullptr, NcclGroup* nccl_dp = nullptr);
  ~DeviceZero3();
  DeviceZero3(const DeviceZero3&) = delete;
  DeviceZero3& operator=(const DeviceZero3&) = delete;

  const ZeroPartition& partition() const { return part_; }
  int64_t shard_numel() const { return part_.shard_numel(); }
  // This rank's pieces (arena offset `dev`, shard position `pos`, n), in shard order.
  const std::vector<DeviceZero::Piece>& pieces() const { return mine_; }
  int64_t num_blocks() const { return int64_t(blocks_.size()); }
  int64_t dev_lo(int64_t b) const { return blocks_[size_t(b)].dev_lo; }
  int64_t dev_hi(int64_t b) const { return blocks_[size_t(b)].dev_hi; }
  int64_t window_numel() const { return window_; }  // the largest block's device range
  size_t device_bytes() const { return dbuf_.bytes(); }

  // window [dev_hi - dev_lo] <- block b's parameters. Collective over world and dp.
  void gather(cuda::bf16* window, const cuda::bf16* param_shard, int64_t b, cudaStream_t stream);
  // grad_shard [shard] (=, or += unless `assign`) <- this rank's part of the sum over each group
  // of block b's gradients in window. Collective over world and dp.
  void reduce(cuda::bf16* grad_shard, const cuda::bf16* window, int64_t b, bool assign,
              cudaStream_t stream);
  // param_shard [shard] <- this rank's elements of block b in window (local).
  void keep_own(cuda::bf16* param_shard, const cuda::bf16* window, int64_t b,
                cudaStream_t stream) const;

  // The async forms can run: no group is staged through MPI (its rounds wait on the host).
  bool can_overlap() const { return pin_ == nullptr; }
  // gather() and reduce() on the comm stream, after the work enqueued on `stream` so far (the
  // last reads of `window`; the writes of the shard or of the gradients); `done` is recorded on
  // the comm stream after them. No host wait. Collective, as the synchronous forms.
  void gather_async(cuda::bf16* window, const cuda::bf16* param_shard, int64_t b,
                    cudaStream_t stream, cudaEvent_t done);
  void reduce_async(cuda::bf16* grad_shard, const cuda::bf16* window, int64_t b, bool assign,
                    cudaStream_t stream, cudaEvent_t done);
  // `stream` waits (on the device) for everything enqueued on the comm stream; a no-op when
  // nothing was since the last join.
  void join(cudaStream_t stream);
  // The host waits for the comm stream (over NCCL timed: throws after aborting the
  // communicators); a no-op when nothing was enqueued since the last drain.
  void drain(const char* what);

 private:
  struct Block {
    int64_t dev_lo, dev_hi;
    std::pair<int64_t, int64_t> flat[2];  // per group (0 replicated, 1 experts)
  };
  struct Group {
    const ZeroGroup* gr;
    const Comm* comm;
    NcclGroup* nccl;
  };
  // Window <-> buffer copies of a group's flat elements [lo, lo + n), enqueued on the stream
  // (cudaMemcpyDefault: device or pinned host buffers).
  void unpack(cuda::bf16* window, int64_t dev_lo, const ZeroGroup& gr, const cuda::bf16* src,
              int64_t lo, int64_t n, cudaStream_t stream) const;
  void pack(cuda::bf16* dst, const ZeroGroup& gr, const cuda::bf16* window, int64_t dev_lo,
            int64_t lo, int64_t n, cudaStream_t stream) const;
  // f(group, owner part, j, n) for each round of block b: per group, per owner part, its flat
  // elements [j, j + n); over NCCL a timed wait per group after its rounds when `host_wait`.
  template <class F>
  void for_each_round(int64_t b, cudaStream_t stream, bool host_wait, const char* what, F&& f);
  // The bodies of gather() / reduce(), enqueued on `stream`.
  void gather_on(cuda::bf16* window, const cuda::bf16* param_shard, int64_t b, cudaStream_t stream,
                 bool host_wait);
  void reduce_on(cuda::bf16* grad_shard, const cuda::bf16* window, int64_t b, bool assign,
                 cudaStream_t stream, bool host_wait);
  void after(cudaStream_t stream);  // the comm stream waits for `stream`'s work so far
  // dst[n] (device) =, or += unless assign, src[n] (device)
  void store(cuda::bf16* dst, const cuda::bf16* src, int64_t n, bool assign,
             cudaStream_t stream);

  ZeroPartition part_;
  std::vector<int64_t> dev_off_;  // [layout tensors]
  Group groups_[2];
  std::vector<Block> blocks_;
  std::vector<DeviceZero::Piece> mine_;
  int64_t window_ = 0, cap_ = 0;  // cap_: elements per round
  cuda::DeviceBuffer<cuda::bf16> dbuf_;  // [cap_]: a round's part on the device
  cuda::bf16* pin_ = nullptr;            // MPI: cudaMallocHost [cap_]
  std::vector<float> sum_;               // MPI: [cap_] fp32 sums
  NcclGroup* nccl_any_ = nullptr;        // a communicator to time drain()'s wait with
  cudaStream_t comm_ = nullptr;          // the async forms' stream (highest priority)
  cudaEvent_t ready_ = nullptr;          // recorded on the caller's stream; comm_ waits on it
  cudaEvent_t joined_ = nullptr;         // recorded on comm_ by join(); the caller waits on it
  bool pending_ = false;                 // async work not yet joined
  bool undrained_ = false;               // async work not yet waited for on the host
};

}  // namespace automoe::dist
