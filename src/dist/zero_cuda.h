// dist/zero_cuda.h: ZeRO-1 for GPU ranks (train.zero 1 with train.device cuda; dist/zero.h is the
// CPU's): the partition of dist/zero_partition.h (the same shards, so the same per-rank moment
// files) over a device arena whose tensors sit at their own aligned offsets.
//
// The full-size bf16 gradient arena stays (ZeRO-1); what shrinks is the optimizer state: AdamW
// moments exist for this rank's shard only. This rank's shard is a list of pieces of the
// parameter and gradient arenas (pieces(): arena elements [dev, dev + n) are optimizer-arena
// elements [pos, pos + n)); the model runs AdamW piece by piece on (params + dev, grads + dev,
// m + pos, v + pos), so no parameter or gradient shard is ever copied out.
//
// A step, per group (replicated tensors over the world, this EP rank's experts over its DP group;
// a group of one rank has nothing to move), in rounds of at most kBucket elements over all ranks
// (the same sub-block [j, j+b) of every rank's shard):
//   reduce_scatter  pack each rank's sub-block from the gradient arena, sum over the group,
//                   unpack this rank's block into its own pieces of the arena: the arena then
//                   holds the summed gradient on this rank's shard (elsewhere the stale local one)
//   allgather       pack this rank's updated parameters, gather every rank's block, unpack the
//                   others' blocks into their pieces: the replicas are identical again
// Over NCCL (the world's / DP group's communicator given): one device buffer of ranks*b bf16,
// pieces copied device -> device, ncclReduceScatter / ncclAllGather in place on the stream
// (bf16; with 2 ranks one rounding of the fp32 sum), then a timed wait.
// Otherwise (MPI staging, as DeviceGradReducer): pieces copied device -> pinned host, one host
// sync per round, widened to fp32, Comm::reduce_scatter_sum (MPI_Reduce_scatter_block), rounded
// to bf16 once, host -> device; the all-gather moves the bf16 bits (Comm::allgather).
// With 2 ranks both give the bits of the all-reduce path (a + b, one rounding). Buffers are
// allocated once, in the constructor; nothing per step.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/common.cuh"
#include "dist/process_group.h"
#include "dist/zero_partition.h"

namespace automoe::dist {

class NcclGroup;

class DeviceZero {
 public:
  static constexpr int64_t kBucket = int64_t(1) << 24;  // elements of all ranks' blocks per round

  // A piece of this rank's shard: arena elements [dev, dev + n) are optimizer-arena elements
  // [pos, pos + n).
  struct Piece {
    int64_t dev, pos, n;
  };

  // `part`: this rank's partition of the model's layout; dev_off[k]: the device-arena offset of
  // layout tensor k. nccl_world / nccl_dp: the groups' NCCL communicators (null: MPI staging).
  // The groups and communicators must outlive this object.
  DeviceZero(const ZeroPartition& part, const Groups& g, std::vector<int64_t> dev_off,
             NcclGroup* nccl_world = nullptr, NcclGroup* nccl_dp = nullptr);
  ~DeviceZero();
  DeviceZero(const DeviceZero&) = delete;
  DeviceZero& operator=(const DeviceZero&) = delete;

  const ZeroPartition& partition() const { return part_; }
  int64_t shard_numel() const { return part_.shard_numel(); }
  const std::vector<Piece>& pieces() const { return mine_; }  // in optimizer-arena order
  size_t device_bytes() const { return dbuf_.bytes(); }

  // grads [arena]: this rank's pieces <- their sum over each group. Work enqueued on `stream`
  // before is waited for; the result is enqueued on it. Collective over world and dp.
  void reduce_scatter(cuda::bf16* grads, cudaStream_t stream);
  // params [arena]: every other rank's pieces <- the values their owner holds (after AdamW ran
  // on each rank's own pieces). Collective over world and dp.
  void allgather(cuda::bf16* params, cudaStream_t stream);

 private:
  struct Group {
    const ZeroGroup* gr;
    const Comm* comm;
    NcclGroup* nccl;
    int64_t block;  // elements per rank per round: min(kBucket / ranks, shard)
  };
  // Copies between flat elements [lo, lo + b) of a group and a buffer (device or pinned host:
  // cudaMemcpyDefault), enqueued on the stream; padding is skipped.
  void pack(cuda::bf16* dst, const ZeroGroup& gr, const cuda::bf16* arena, int64_t lo,
            int64_t b, cudaStream_t stream) const;
  void unpack(cuda::bf16* arena, const ZeroGroup& gr, const cuda::bf16* src, int64_t lo,
              int64_t b, cudaStream_t stream) const;
  void reduce_scatter_mpi(const Group& g, cuda::bf16* grads, cudaStream_t stream);
  void reduce_scatter_nccl(const Group& g, cuda::bf16* grads, cudaStream_t stream);
  void allgather_mpi(const Group& g, cuda::bf16* params, cudaStream_t stream);
  void allgather_nccl(const Group& g, cuda::bf16* params, cudaStream_t stream);

  ZeroPartition part_;
  std::vector<int64_t> dev_off_;  // [layout tensors]
  std::vector<Group> groups_;     // those of more than one rank
  std::vector<Piece> mine_;
  cuda::DeviceBuffer<cuda::bf16> dbuf_;  // NCCL: [ranks * block], a round's blocks in rank order
  cuda::bf16* pin_ = nullptr;  // MPI: cudaMallocHost [(ranks + 1) * block]: blocks, own block
  std::vector<float> send_, recv_;  // MPI: [ranks * block], [block] fp32 sums
};

}  // namespace automoe::dist
