// dist/data_parallel_cuda.cpp: DeviceGradReducer (dist/data_parallel_cuda.h): gradient
// all-reduce (NCCL, or staged through host memory and MPI; whole arenas, one tensor, or buckets
// overlapped with the backward on a comm stream) and the global norm for GPU ranks.
#include "dist/data_parallel_cuda.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>

#include "core/check.h"
#if defined(AUTOMOE_HAVE_NCCL) && AUTOMOE_HAVE_NCCL
#include "dist/nccl_group.h"
#define AUTOMOE_DP_NCCL 1
#else
#define AUTOMOE_DP_NCCL 0
#endif

namespace automoe::dist {

DeviceGradReducer::DeviceGradReducer(const Groups& g, std::vector<DeviceTensor> tensors)
    : g_(g), t_(std::move(tensors)), sum_(size_t(kBucket)) {
  CUDA_CHECK(cudaMallocHost(&pin_, size_t(kBucket) * sizeof(float)));
  comm_ = cuda::create_priority_stream();
  CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
}

DeviceGradReducer::~DeviceGradReducer() {
  if (comm_) cudaStreamSynchronize(comm_);  // its copies may still read pin_
  if (ready_) cudaEventDestroy(ready_);
  if (done_) cudaEventDestroy(done_);
  if (comm_) cudaStreamDestroy(comm_);
  if (pin_) cudaFreeHost(pin_);
}

template <class T>
void DeviceGradReducer::reduce_mpi(const Comm& c, cudaStream_t stream) {
  if (c.size() == 1) return;
  T* pin = static_cast<T*>(pin_);
  struct Piece {
    T* dev;
    int64_t at, n;
  };
  std::vector<Piece> pieces;  // at most a few per tensor per bucket; small host bookkeeping
  int64_t fill = 0;
  auto flush = [&]() {
    if (fill == 0) return;
    CUDA_CHECK(cudaStreamSynchronize(stream));  // the bucket is on the host
    for (int64_t i = 0; i < fill; ++i) {
      if constexpr (std::is_same_v<T, cuda::bf16>) sum_[size_t(i)] = __bfloat162float(pin[i]);
      else sum_[size_t(i)] = pin[i];
    }
    c.allreduce_sum(sum_.data(), fill);
    for (int64_t i = 0; i < fill; ++i) {
      if constexpr (std::is_same_v<T, cuda::bf16>) pin[i] = __float2bfloat16_rn(sum_[size_t(i)]);
      else pin[i] = sum_[size_t(i)];
    }
    for (const Piece& p : pieces)
      CUDA_CHECK(cudaMemcpyAsync(p.dev, pin + p.at, size_t(p.n) * sizeof(T),
                                 cudaMemcpyHostToDevice, stream));
    // the next bucket's device -> host copies queue behind these uploads on the same stream
    pieces.clear();
    fill = 0;
  };
  for (const Range& r : ranges_) {
    for (int64_t done = 0; done < r.n;) {
      const int64_t n = std::min(r.n - done, kBucket - fill);
      T* dev = static_cast<T*>(r.p) + done;
      CUDA_CHECK(cudaMemcpyAsync(pin + fill, dev, size_t(n) * sizeof(T), cudaMemcpyDeviceToHost,
                                 stream));
      pieces.push_back({dev, fill, n});
      fill += n;
      done += n;
      if (fill == kBucket) flush();
    }
  }
  flush();
}

template <class T>
void DeviceGradReducer::reduce_nccl(NcclGroup& g, bool wait, cudaStream_t stream) {
#if AUTOMOE_DP_NCCL
  bufs_.clear();
  counts_.clear();
  for (const Range& r : ranges_) {
    bufs_.push_back(r.p);
    counts_.push_back(size_t(r.n));
  }
  g.allreduce_sum(bufs_.data(), counts_.data(), int(bufs_.size()),
                  std::is_same_v<T, cuda::bf16> ? ncclBfloat16 : ncclFloat32, stream);
  if (wait) g.wait(stream, "gradient all-reduce");
#else
  (void)g;
  (void)wait;
  (void)stream;
  AM_FAIL("internal: NCCL gradient all-reduce in a build without NCCL");
#endif
}

template <class T>
void DeviceGradReducer::reduce_ranges(bool expert, bool wait, cudaStream_t stream) {
  if (NcclGroup* n = expert ? nccl_dp_ : nccl_world_) reduce_nccl<T>(*n, wait, stream);
  else reduce_mpi<T>(expert ? g_.dp : g_.world, stream);
}

template <class T>
void DeviceGradReducer::reduce(T* grads, cudaStream_t stream) {
  for (const bool expert : {false, true}) {  // replicated over the world, then experts over dp
    ranges_.clear();
    for (const DeviceTensor& t : t_)
      if (t.expert == expert) ranges_.push_back({grads + t.off, t.n});
    reduce_ranges<T>(expert, true, stream);
  }
}

void DeviceGradReducer::allreduce(cuda::bf16* grads, cudaStream_t stream) { reduce(grads, stream); }
void DeviceGradReducer::allreduce(float* grads, cudaStream_t stream) { reduce(grads, stream); }

void DeviceGradReducer::allreduce_tensor(size_t k, cuda::bf16* g, cudaStream_t stream) {
  AM_CHECK(k < t_.size(), "internal: allreduce_tensor({}) of {} tensors", k, t_.size());
  ranges_.assign(1, Range{g, t_[k].n});
  reduce_ranges<cuda::bf16>(t_[k].expert, false, stream);
}

void DeviceGradReducer::allreduce_async(size_t k0, size_t k1, cuda::bf16* grads,
                                        cudaStream_t stream) {
  AM_CHECK(k0 < k1 && k1 <= t_.size(), "internal: allreduce_async([{}, {})) of {} tensors", k0, k1,
           t_.size());
  // the gradients were written on `stream`: the comm stream starts after them. One event serves
  // every call: a wait takes the record made just before it.
  CUDA_CHECK(cudaEventRecord(ready_, stream));
  CUDA_CHECK(cudaStreamWaitEvent(comm_, ready_, 0));
  pending_ = true;
  for (const bool expert : {false, true}) {  // replicated over the world, then experts over dp
    ranges_.clear();
    for (size_t k = k0; k < k1;) {
      if (t_[k].expert != expert) {
        ++k;
        continue;
      }
      size_t e = k + 1;  // a run of adjacent tensors of this group: one range
      for (; e < k1 && t_[e].expert == expert; ++e)
        AM_CHECK(t_[e].off >= t_[e - 1].off + t_[e - 1].n,
                 "internal: allreduce_async: tensor {} does not follow tensor {} in the arena", e,
                 e - 1);
      ranges_.push_back({grads + t_[k].off, t_[e - 1].off + t_[e - 1].n - t_[k].off});
      k = e;
    }
    if (!ranges_.empty()) reduce_ranges<cuda::bf16>(expert, false, comm_);
  }
}

void DeviceGradReducer::join(cudaStream_t stream) {
  if (!pending_) return;
  CUDA_CHECK(cudaEventRecord(done_, comm_));
  CUDA_CHECK(cudaStreamWaitEvent(stream, done_, 0));
  pending_ = false;
}

void DeviceGradReducer::host_sync(cudaStream_t stream, const char* what) {
#if AUTOMOE_DP_NCCL
  if (NcclGroup* g = nccl_world_ ? nccl_world_ : nccl_dp_) return g->wait(stream, what);
#endif
  (void)what;
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

void DeviceGradReducer::host_wait(cudaEvent_t ev, const char* what) {
#if AUTOMOE_DP_NCCL
  if (NcclGroup* g = nccl_world_ ? nccl_world_ : nccl_dp_) return g->wait_event(ev, what);
#endif
  (void)what;
  CUDA_CHECK(cudaEventSynchronize(ev));
}

void DeviceGradReducer::wait(cudaStream_t stream) {
#if AUTOMOE_DP_NCCL
  if (nccl_world_) nccl_world_->wait(stream, "gradient all-reduce");
  if (nccl_dp_) nccl_dp_->wait(stream, "gradient all-reduce");
#else
  (void)stream;
#endif
}

// small_ is pageable: a device-to-host cudaMemcpyAsync into it may return only when the copy is
// done, i.e. after everything queued on the stream before it: an untimed wait inside CUDA, a
// hang when that includes NCCL work of a stopped peer (the aux statistics follow the forward's
// EP all-to-alls). So a timed host_sync drains the stream first, and a second one (only the
// copy left) makes sure the copy has landed.
double DeviceGradReducer::global_sumsq(const double* sumsq, cudaStream_t stream) {
  small_.resize(t_.size());
  host_sync(stream, "the gradient norm's readback");
  CUDA_CHECK(cudaMemcpyAsync(small_.data(), sumsq, t_.size() * sizeof(double),
                             cudaMemcpyDeviceToHost, stream));
  host_sync(stream, "the gradient norm's readback");
  double dense = 0.0, experts = 0.0;  // dense: the same on every rank; experts: this shard
  for (size_t i = 0; i < t_.size(); ++i) (t_[i].expert ? experts : dense) += small_[i];
  g_.ep.allreduce_sum(&experts, 1);
  return dense + experts;
}

void DeviceGradReducer::allreduce_small(double* x, int64_t n, const Comm& c, cudaStream_t stream) {
  if (c.size() == 1) return;
  small_.resize(size_t(n));
  host_sync(stream, "the aux statistics' readback");  // before the copy: see global_sumsq
  CUDA_CHECK(cudaMemcpyAsync(small_.data(), x, size_t(n) * sizeof(double), cudaMemcpyDeviceToHost,
                             stream));
  host_sync(stream, "the aux statistics' readback");
  c.allreduce_sum(small_.data(), n);
  CUDA_CHECK(cudaMemcpyAsync(x, small_.data(), size_t(n) * sizeof(double), cudaMemcpyHostToDevice,
                             stream));
  host_sync(stream, "the aux statistics' upload");  // small_ is pageable and reused
}

}  // namespace automoe::dist
