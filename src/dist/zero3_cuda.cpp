// dist/zero3_cuda.cpp: DeviceZero3 (dist/zero3_cuda.h): ZeRO-3's per-block gather and reduce
// between a GPU rank's flat shards and its block windows, through NCCL or staged through host
// memory and MPI.
#include "dist/zero3_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <utility>

#include "backend/cuda/ops_cuda.h"
#include "core/check.h"
#if defined(AUTOMOE_HAVE_NCCL) && AUTOMOE_HAVE_NCCL
#include "dist/nccl_group.h"
#define AUTOMOE_ZERO3_NCCL 1
#else
#define AUTOMOE_ZERO3_NCCL 0
#endif

namespace automoe::dist {

using cuda::bf16;

DeviceZero3::DeviceZero3(const ZeroPartition& part, const Groups& g, std::vector<int64_t> dev_off,
                         const std::vector<std::pair<int64_t, int64_t>>& blocks,
                         NcclGroup* nccl_world, NcclGroup* nccl_dp)
    : part_(part), dev_off_(std::move(dev_off)) {
  AM_CHECK(part_.level() == 3, "internal: DeviceZero3 needs a level-3 partition, got {}", part_.level());
  AM_CHECK(part_.replicated().ranks == g.world.size() && part_.experts().ranks == g.dp.size(),
           "internal: ZeRO partition over {} x {} ranks for groups of {} x {}",
           part_.replicated().ranks, part_.experts().ranks, g.world.size(), g.dp.size());
  groups_[0] = {&part_.replicated(), &g.world, nccl_world};
  groups_[1] = {&part_.experts(), &g.dp, nccl_dp};
  int64_t need = 0;  // the largest owner part of any block: a round's size
  int64_t next = 0;  // blocks cover the layout's tensors in order
  for (const auto& [k0, k1] : blocks) {
    AM_CHECK(k0 == next && k1 > k0 && size_t(k1) <= dev_off_.size(),
             "internal: ZeRO-3 block of tensors [{}, {}) after {}", k0, k1, next);
    next = k1;
    Block bl{};
    bl.dev_lo = dev_off_[size_t(k0)];
    bl.dev_hi = dev_off_[size_t(k1 - 1)];  // + the last tensor's size, below
    for (int gi = 0; gi < 2; ++gi) {
      const ZeroGroup& gr = *groups_[gi].gr;
      bl.flat[gi] = gr.flat_range(k0, k1);
      for (const ZeroSeg& s : gr.segs)
        if (s.param == k1 - 1) bl.dev_hi += s.numel;
      for (const ZeroOwnerPart& p : owner_parts(gr, bl.flat[gi].first, bl.flat[gi].second))
        need = std::max(need, p.hi - p.lo);
    }
    window_ = std::max(window_, bl.dev_hi - bl.dev_lo);
    blocks_.push_back(bl);
  }
  AM_CHECK(size_t(next) == dev_off_.size(), "internal: ZeRO-3 blocks cover {} of {} tensors", next,
           dev_off_.size());
  bool mpi = false, nccl = false;
  for (const Group& gp : groups_) {
    const ZeroGroup* gr = gp.gr;
    gr->for_each_piece(gr->begin, gr->begin + gr->shard,
                       [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t n) {
                         mine_.push_back({dev_off_[size_t(s.param)] + off, gr->at + pos, n});
                       });
    if (gr->ranks > 1 && gr->numel > 0) (gp.nccl ? nccl : mpi) = true;
  }
#if !AUTOMOE_ZERO3_NCCL
  AM_CHECK(!nccl, "internal: NCCL ZeRO-3 collectives in a build without NCCL");
#endif
  cap_ = std::min(kBucket, std::max<int64_t>(need, 1));
  dbuf_ = cuda::DeviceBuffer<bf16>(size_t(cap_));  // NCCL's round, or the += source
  if (mpi) {
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pin_), size_t(cap_) * sizeof(bf16)));
    sum_.assign(size_t(cap_), 0.f);
  }
  nccl_any_ = nccl_world ? nccl_world : nccl_dp;
  comm_ = cuda::create_priority_stream();
  CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&joined_, cudaEventDisableTiming));
}

DeviceZero3::~DeviceZero3() {
  // the comm stream's copies may still read dbuf_ and the caller's windows and shards: timed
  // over NCCL first (on a timeout every communicator is aborted, which stops their kernels), so
  // the plain synchronize after it cannot hang on a peer that is gone
  try {
    drain("ZeRO-3 teardown");
  } catch (...) {  // the job is ending with an error already; nothing to add from a destructor
  }
  if (comm_) cudaStreamSynchronize(comm_);
  if (ready_) cudaEventDestroy(ready_);
  if (joined_) cudaEventDestroy(joined_);
  if (comm_) cudaStreamDestroy(comm_);
  if (pin_) cudaFreeHost(pin_);
}

void DeviceZero3::after(cudaStream_t stream) {
  // One event serves every call: a wait takes the record made just before it.
  CUDA_CHECK(cudaEventRecord(ready_, stream));
  CUDA_CHECK(cudaStreamWaitEvent(comm_, ready_, 0));
  pending_ = undrained_ = true;
}

void DeviceZero3::join(cudaStream_t stream) {
  if (!pending_) return;
  CUDA_CHECK(cudaEventRecord(joined_, comm_));
  CUDA_CHECK(cudaStreamWaitEvent(stream, joined_, 0));
  pending_ = false;
}

void DeviceZero3::drain(const char* what) {
  if (!undrained_) return;
  undrained_ = false;  // a failed wait has aborted the communicators: no second try
#if AUTOMOE_ZERO3_NCCL
  if (nccl_any_) return nccl_any_->wait(comm_, what);
#endif
  (void)what;
  CUDA_CHECK(cudaStreamSynchronize(comm_));  // no communicator: only device copies on it
}

void DeviceZero3::unpack(bf16* window, int64_t dev_lo, const ZeroGroup& gr, const bf16* src,
                         int64_t lo, int64_t n, cudaStream_t stream) const {
  gr.for_each_piece(lo, lo + n, [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t m) {
    CUDA_CHECK(cudaMemcpyAsync(window + dev_off_[size_t(s.param)] + off - dev_lo, src + pos,
                               size_t(m) * sizeof(bf16), cudaMemcpyDefault, stream));
  });
}

void DeviceZero3::pack(bf16* dst, const ZeroGroup& gr, const bf16* window, int64_t dev_lo,
                       int64_t lo, int64_t n, cudaStream_t stream) const {
  gr.for_each_piece(lo, lo + n, [&](const ZeroSeg& s, int64_t off, int64_t pos, int64_t m) {
    CUDA_CHECK(cudaMemcpyAsync(dst + pos, window + dev_off_[size_t(s.param)] + off - dev_lo,
                               size_t(m) * sizeof(bf16), cudaMemcpyDefault, stream));
  });
}

void DeviceZero3::store(bf16* dst, const bf16* src, int64_t n, bool assign, cudaStream_t stream) {
  if (assign) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(bf16), cudaMemcpyDefault, stream));
    return;
  }
  cuda::Ctx c;
  c.stream = stream;
  cuda::add_inplace(dst, src, n, c);  // fp32 add, one rounding
}

template <class F>
void DeviceZero3::for_each_round(int64_t b, cudaStream_t stream, bool host_wait, const char* what,
                                 F&& f) {
  const Block& bl = blocks_[size_t(b)];
  for (int gi = 0; gi < 2; ++gi) {
    const Group& gp = groups_[gi];
    const auto [lo, hi] = bl.flat[gi];
    for (const ZeroOwnerPart& p : owner_parts(*gp.gr, lo, hi))
      for (int64_t j = p.lo; j < p.hi; j += cap_) f(gp, p, j, std::min(cap_, p.hi - j));
    if (host_wait && gp.nccl && gp.gr->ranks > 1 && hi > lo) gp.nccl->wait(stream, what);
  }
  if (pin_) CUDA_CHECK(cudaStreamSynchronize(stream));  // pin_ is free again
}

void DeviceZero3::gather(bf16* window, const bf16* param_shard, int64_t b, cudaStream_t stream) {
  drain("ZeRO-3 comm stream before a synchronous gather");
  gather_on(window, param_shard, b, stream, true);
}

void DeviceZero3::reduce(bf16* grad_shard, const bf16* window, int64_t b, bool assign,
                         cudaStream_t stream) {
  drain("ZeRO-3 comm stream before a synchronous reduce");
  reduce_on(grad_shard, window, b, assign, stream, true);
}

void DeviceZero3::gather_async(bf16* window, const bf16* param_shard, int64_t b,
                               cudaStream_t stream, cudaEvent_t done) {
  AM_CHECK(can_overlap(), "internal: ZeRO-3 gather_async over MPI staging (it waits on the host "
           "every round: use gather)");
  after(stream);
  gather_on(window, param_shard, b, comm_, false);
  CUDA_CHECK(cudaEventRecord(done, comm_));
}

void DeviceZero3::reduce_async(bf16* grad_shard, const bf16* window, int64_t b, bool assign,
                               cudaStream_t stream, cudaEvent_t done) {
  AM_CHECK(can_overlap(), "internal: ZeRO-3 reduce_async over MPI staging (it waits on the host "
           "every round: use reduce)");
  after(stream);
  reduce_on(grad_shard, window, b, assign, comm_, false);
  CUDA_CHECK(cudaEventRecord(done, comm_));
}

void DeviceZero3::gather_on(bf16* window, const bf16* param_shard, int64_t b, cudaStream_t stream,
                            bool host_wait) {
  const int64_t dev_lo = blocks_[size_t(b)].dev_lo;
  for_each_round(b, stream, host_wait, "ZeRO-3 parameter gather",
                 [&](const Group& gp, const ZeroOwnerPart& p, int64_t j, int64_t n) {
    const ZeroGroup& gr = *gp.gr;
    const bf16* own = param_shard + gr.at + (j - gr.begin);  // meaningful on the owner only
    if (gr.ranks == 1) {  // this rank owns it all
      unpack(window, dev_lo, gr, own, j, n, stream);
    } else if (gp.nccl) {
#if AUTOMOE_ZERO3_NCCL
      const bf16* send = gr.rank == p.rank ? own : dbuf_.get();  // read on the owner only
      gp.nccl->broadcast(send, dbuf_.get(), size_t(n), ncclBfloat16, p.rank, stream);
      unpack(window, dev_lo, gr, dbuf_.get(), j, n, stream);
#endif
    } else {
      if (gr.rank == p.rank)
        CUDA_CHECK(cudaMemcpyAsync(pin_, own, size_t(n) * sizeof(bf16), cudaMemcpyDeviceToHost,
                                   stream));
      // the part on the owner's host; and the last round's uploads out of pin_ done
      CUDA_CHECK(cudaStreamSynchronize(stream));
      gp.comm->broadcast(pin_, n * int64_t(sizeof(bf16)), p.rank);
      unpack(window, dev_lo, gr, pin_, j, n, stream);
    }
  });
}

void DeviceZero3::reduce_on(bf16* grad_shard, const bf16* window, int64_t b, bool assign,
                            cudaStream_t stream, bool host_wait) {
  const int64_t dev_lo = blocks_[size_t(b)].dev_lo;
  for_each_round(b, stream, host_wait, "ZeRO-3 gradient reduce",
                 [&](const Group& gp, const ZeroOwnerPart& p, int64_t j, int64_t n) {
    const ZeroGroup& gr = *gp.gr;
    bf16* dst = grad_shard + gr.at + (j - gr.begin);  // meaningful on the owner only
    const bool mine = gr.rank == p.rank;
    if (gr.ranks == 1) {
      if (assign) {
        pack(dst, gr, window, dev_lo, j, n, stream);
      } else {
        pack(dbuf_.get(), gr, window, dev_lo, j, n, stream);
        store(dst, dbuf_.get(), n, false, stream);
      }
    } else if (gp.nccl) {
#if AUTOMOE_ZERO3_NCCL
      pack(dbuf_.get(), gr, window, dev_lo, j, n, stream);
      gp.nccl->reduce_sum(dbuf_.get(), dbuf_.get(), size_t(n), ncclBfloat16, p.rank, stream);
      if (mine) store(dst, dbuf_.get(), n, assign, stream);
#endif
    } else {
      pack(pin_, gr, window, dev_lo, j, n, stream);
      CUDA_CHECK(cudaStreamSynchronize(stream));  // the part on the host
      for (int64_t i = 0; i < n; ++i) sum_[size_t(i)] = __bfloat162float(pin_[i]);
      gp.comm->allreduce_sum(sum_.data(), n);
      if (!mine) return;
      for (int64_t i = 0; i < n; ++i) pin_[i] = __float2bfloat16_rn(sum_[size_t(i)]);
      // (the next round's pack into pin_ queues behind these uploads on the same stream)
      if (assign) {
        CUDA_CHECK(cudaMemcpyAsync(dst, pin_, size_t(n) * sizeof(bf16), cudaMemcpyHostToDevice,
                                   stream));
      } else {
        CUDA_CHECK(cudaMemcpyAsync(dbuf_.get(), pin_, size_t(n) * sizeof(bf16),
                                   cudaMemcpyHostToDevice, stream));
        store(dst, dbuf_.get(), n, false, stream);
      }
    }
  });
}

void DeviceZero3::keep_own(bf16* param_shard, const bf16* window, int64_t b,
                           cudaStream_t stream) const {
  const Block& bl = blocks_[size_t(b)];
  for (int gi = 0; gi < 2; ++gi) {
    const ZeroGroup& gr = *groups_[gi].gr;
    const auto [lo, hi] = bl.flat[gi];
    for (const ZeroOwnerPart& p : owner_parts(gr, lo, hi))
      if (p.rank == gr.rank)
        pack(param_shard + gr.at + (p.lo - gr.begin), gr, window, bl.dev_lo, p.lo, p.hi - p.lo,
             stream);
  }
}

}  // namespace automoe::dist
