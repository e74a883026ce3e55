// dist/zero_cuda.cpp: DeviceZero (dist/zero_cuda.h): ZeRO-1's bucketed reduce-scatter and
// all-gather over a GPU rank's bf16 arenas, through NCCL or staged through host memory and MPI.
#include "dist/zero_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <utility>

#include "core/check.h"
#if defined(AUTOMOE_HAVE_NCCL) && AUTOMOE_HAVE_NCCL
#include "dist/nccl_group.h"
#define AUTOMOE_ZERO_NCCL 1
#else
#define AUTOMOE_ZERO_NCCL 0
#endif

namespace automoe::dist {

using cuda::bf16;

DeviceZero::DeviceZero(const ZeroPartition& part, const Groups& g, std::vector<int64_t> dev_off,
                       NcclGroup* nccl_world, NcclGroup* nccl_dp)
    : part_(part), dev_off_(std::move(dev_off)) {
  AM_CHECK(part_.replicated().ranks == g.world.size() && part_.experts().ranks == g.dp.size(),
           "internal: ZeRO partition over {} x {} ranks for groups of {} x {}",
           part_.replicated().ranks, part_.experts().ranks, g.world.size(), g.dp.size());
  int64_t dev = 0, pin = 0, send = 0, recv = 0;  // buffer sizes, the largest group's
  const Group all[2] = {{&part_.replicated(), &g.world, nccl_world, 0},
                        {&part_.experts(), &g.dp, nccl_dp, 0}};
  for (const Group& a : all) {
    const ZeroGroup* gr = a.gr;
    gr->for_each_piece(gr->begin, gr->begin + gr->shard,
                       [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
                         AM_CHECK(size_t(s.param) < dev_off_.size(),
                                  "internal: ZeRO tensor {} without a device offset", s.param);
                         mine_.push_back({dev_off_[size_t(s.param)] + off, gr->at + pos, n});
                       });
    if (gr->ranks == 1 || gr->shard == 0) continue;
    const int64_t block = std::min(kBucket / gr->ranks, gr->shard);
    groups_.push_back({gr, a.comm, a.nccl, block});
    if (a.nccl) {
      dev = std::max(dev, gr->ranks * block);
    } else {
      pin = std::max(pin, (gr->ranks + 1) * block);
      send = std::max(send, gr->ranks * block);
      recv = std::max(recv, block);
    }
  }
#if !AUTOMOE_ZERO_NCCL
  AM_CHECK(dev == 0, "internal: NCCL ZeRO collectives in a build without NCCL");
#endif
  if (dev > 0) dbuf_ = cuda::DeviceBuffer<bf16>(size_t(dev));
  if (pin > 0) {
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pin_), size_t(pin) * sizeof(bf16)));
    send_.assign(size_t(send), 0.f);
    recv_.assign(size_t(recv), 0.f);
  }
}

DeviceZero::~DeviceZero() {
  if (pin_) cudaFreeHost(pin_);
}

void DeviceZero::pack(bf16* dst, const ZeroGroup& gr, const bf16* arena, int64_t lo, int64_t b,
                      cudaStream_t stream) const {
  gr.for_each_piece(lo, lo + b, [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
    CUDA_CHECK(cudaMemcpyAsync(dst + pos, arena + dev_off_[size_t(s.param)] + off,
                               size_t(n) * sizeof(bf16), cudaMemcpyDefault, stream));
  });
}

void DeviceZero::unpack(bf16* arena, const ZeroGroup& gr, const bf16* src, int64_t lo, int64_t b,
                        cudaStream_t stream) const {
  gr.for_each_piece(lo, lo + b, [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
    CUDA_CHECK(cudaMemcpyAsync(arena + dev_off_[size_t(s.param)] + off, src + pos,
                               size_t(n) * sizeof(bf16), cudaMemcpyDefault, stream));
  });
}

void DeviceZero::reduce_scatter(bf16* grads, cudaStream_t stream) {
  for (const Group& g : groups_) {
    if (g.nccl) reduce_scatter_nccl(g, grads, stream);
    else reduce_scatter_mpi(g, grads, stream);
  }
}

void DeviceZero::allgather(bf16* params, cudaStream_t stream) {
  for (const Group& g : groups_) {
    if (g.nccl) allgather_nccl(g, params, stream);
    else allgather_mpi(g, params, stream);
  }
}

void DeviceZero::reduce_scatter_mpi(const Group& g, bf16* grads, cudaStream_t stream) {
  const ZeroGroup& gr = *g.gr;
  const int ranks = gr.ranks;
  for (int64_t j = 0; j < gr.shard; j += g.block) {  // round: sub-block [j, j+b) of every shard
    const int64_t b = std::min(g.block, gr.shard - j);
    for (int r = 0; r < ranks; ++r) pack(pin_ + r * b, gr, grads, r * gr.shard + j, b, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));  // the blocks are on the host
    for (int r = 0; r < ranks; ++r) {
      const int64_t lo = r * gr.shard + j, valid = std::clamp(gr.numel - lo, int64_t(0), b);
      for (int64_t i = 0; i < b; ++i)  // widened; padding (past numel) is zero
        send_[size_t(r * b + i)] = i < valid ? __bfloat162float(pin_[r * b + i]) : 0.f;
    }
    g.comm->reduce_scatter_sum(recv_.data(), send_.data(), b);
    for (int64_t i = 0; i < b; ++i) pin_[i] = __float2bfloat16_rn(recv_[size_t(i)]);
    // the next round's device -> host copies queue behind these uploads on the same stream
    unpack(grads, gr, pin_, gr.begin + j, b, stream);
  }
}

void DeviceZero::allgather_mpi(const Group& g, bf16* params, cudaStream_t stream) {
  const ZeroGroup& gr = *g.gr;
  const int ranks = gr.ranks;
  bf16* own = pin_ + ranks * g.block;  // this rank's block (MPI's send must not overlap recv)
  for (int64_t j = 0; j < gr.shard; j += g.block) {
    const int64_t b = std::min(g.block, gr.shard - j);
    pack(own, gr, params, gr.begin + j, b, stream);
    CUDA_CHECK(cudaStreamSynchronize(stream));  // (padding is never unpacked: no need to clear it)
    g.comm->allgather(pin_, own, b * int64_t(sizeof(bf16)));
    for (int r = 0; r < ranks; ++r)
      if (r != gr.rank) unpack(params, gr, pin_ + r * b, r * gr.shard + j, b, stream);
    // the next round's device -> host copy queues behind these uploads on the same stream
  }
}

void DeviceZero::reduce_scatter_nccl(const Group& g, bf16* grads, cudaStream_t stream) {
#if AUTOMOE_ZERO_NCCL
  const ZeroGroup& gr = *g.gr;
  bf16* buf = dbuf_.get();
  for (int64_t j = 0; j < gr.shard; j += g.block) {
    const int64_t b = std::min(g.block, gr.shard - j);
    for (int r = 0; r < gr.ranks; ++r) {
      const int64_t lo = r * gr.shard + j, valid = std::clamp(gr.numel - lo, int64_t(0), b);
      if (valid < b)  // the last shard's padding sums zeros
        CUDA_CHECK(cudaMemsetAsync(buf + r * b + valid, 0, size_t(b - valid) * sizeof(bf16), stream));
      pack(buf + r * b, gr, grads, lo, b, stream);
    }
    g.nccl->reduce_scatter_sum(buf, size_t(b), ncclBfloat16, stream);
    unpack(grads, gr, buf + gr.rank * b, gr.begin + j, b, stream);
  }
  g.nccl->wait(stream, "ZeRO gradient reduce-scatter");
#else
  AM_FAIL("internal: NCCL ZeRO reduce-scatter in a build without NCCL");
#endif
}

void DeviceZero::allgather_nccl(const Group& g, bf16* params, cudaStream_t stream) {
#if AUTOMOE_ZERO_NCCL
  const ZeroGroup& gr = *g.gr;
  bf16* buf = dbuf_.get();
  for (int64_t j = 0; j < gr.shard; j += g.block) {
    const int64_t b = std::min(g.block, gr.shard - j);
    pack(buf + gr.rank * b, gr, params, gr.begin + j, b, stream);
    g.nccl->allgather(buf, size_t(b), ncclBfloat16, stream);
    for (int r = 0; r < gr.ranks; ++r)
      if (r != gr.rank) unpack(params, gr, buf + r * b, r * gr.shard + j, b, stream);
  }
  g.nccl->wait(stream, "ZeRO parameter all-gather");
#else
  AM_FAIL("internal: NCCL ZeRO all-gather in a build without NCCL");
#endif
}

}  // namespace automoe::dist
