// dist/ep_ipc.h: the EP transport over CUDA IPC buffers (dist/ep_transport.h), one rank per
// process, all ranks of the EP group on ONE node. Each rank owns a receive staging buffer and a
// few flags in its GPU memory; every peer maps both (cudaIpcOpenMemHandle), writes its rows
// straight into its own region of the staging (one cuda::copy_many kernel for every peer and
// tensor of a call: SM stores over NVLink; AUTOMOE_IPC_SM_COPY=0: a copy-engine cudaMemcpyAsync
// each) and then raises a flag there; the owner waits for the flags on its stream and copies
// the regions out into the caller's receive buffers (one copy_many), or, in place
// (alltoallv_inplace), lets the caller read them there until inplace_end(). Each group of flag
// waits or writes is one cuStreamBatchMemOp (single operations where the driver lacks it): six
// operations per call instead of about 20 at P = 4, where each cost a few microseconds of the
// GPU's queue. DeepEP's normal mode is the design reference (a registered buffer per rank that
// peers write into, with per-source regions and flags), with stream memory operations for the
// flags, not spinning kernels.
//
// Why: a call enqueues everything and returns: no host collective and no host wait per call
// (MpiStagedTransport waits on both; the first IPC version all-gathered the counts and held a
// barrier in every call), so padded mode's forward (train.ep_dispatch padded) never waits on
// the host, and no NCCL kernels on the SMs. Two processes on one GPU also work (CUDA IPC within
// a device), which is how a single GPU checks it; stream waits do not spin SMs, which matters
// there: the two processes' contexts time-slice the GPU.
// Status: auto's choice within a node (dist/gpu_rank.h). Checked with two processes on one H200
// (bench/RESULTS.md, fourth session of 2026-11-29: ep_check 550/550 per rank, the padded
// forward's enqueue 0.2 ms behind a held stream, the stall drill, training bit-identical to MPI
// staging), and between two H200s over NVLink (106 ep_check checks, dispatch/combine bandwidth,
// EP = 2 training; stage gpu2). bench/device.sh stages ep, ep_model and gpu2 check it.
//
// Staging of rank p: P-1 regions of pair_cap bytes (the same on every rank), one per source
// s != p in rank order (slot s, or s-1 past p). Source s writes its rows for p at the start of
// its region, for tensor k in call order: cnt[s][p] rows of tensor k. No rank needs another's
// counts. EpMoeCuda bounds one pair's rows by max_tokens (a token goes once to each destination
// rank; padded mode sends N rows per peer; a combine returns at most what came), so
// pair_cap = max_tokens x (2H + 8K) bytes, the dispatch's row, and the staging is
// (P-1) x pair_cap: below the P x max_tokens rows of the receive-all worst case the counts-
// sized staging reserved before. Qwen3-30B-A3B (H 2048, K 8, 4,160-byte rows) at max_tokens
// 4096: pair_cap 16.25 MiB, 48.75 MiB per rank at P = 4, 113.75 MiB at P = 8. A call whose rows
// for one peer exceed pair_cap throws an internal error naming the ranks and bytes before it
// enqueues anything (never writes out of bounds).
//
// Sizing: reserve() is COLLECTIVE over the EP group: a max all-reduce of pair_bytes, and, when
// it grows, a reallocation on every rank at once (device synchronize: every rank has enqueued
// every earlier call, so its waits are met; a barrier, mappings closed, a barrier, freed,
// allocated, handles all-gathered and opened). It is
// the one collective outside the constructor: every rank must construct its EpMoeCuda blocks
// (which call it) in the same order. That holds in the model (plan() builds one block per MoE
// layer in layer order, when the micro-batch shape changes; every rank gets the same shape:
// the trainer's [micro_batch, seq_len], `automoe forward`'s even split; padded mode also
// checks N over the group per forward), in bench/ep_check.cpp (every rank runs the same
// checks) and bench/cuda_bench.cpp (the model, with the same flags on every rank). A rank that
// re-planned alone would block in that all-reduce while the others' device waits time out.
//
// Flags (uint32, in a second IPC-shared allocation of each rank, never reallocated):
//   ready[s]  source s's rows of call e are in my region s: written e by s
//   done[p]   peer p copied my rows of call e out of its staging: written e by p
//   ready[me] my own call e finished (written last in each call; the destructor reads it)
//   mailed[s] source s's mail of call e is in my mail[s]: written e by s (push_mail)
// then the mail, [P][kEpMailWords] int32: mail[s] holds source s's words of its last push call
// (mail[me] this rank's own, so one read-back returns every rank's row). Source s writes it in
// call e after its step a)'s waits (my done[s] >= e-1), as it writes its region; I read it back
// before my copy-out of call e, and the host waits for that read before it enqueues the copy-out
// whose done write lets s write call e+1's mail. So the mail needs no flags of its own beyond
// mailed[], which only says it arrived ahead of the rows' ready[].
// Call number e (a per-transport counter, the same on every rank: every rank makes the same
// calls) on rank r, all on the caller's stream, waits on LOCAL memory, writes into the peer's:
//   a) for every peer p: wait until my done[p] >= e-1 (p is done with my region of call e-1);
//      copy my rows for p into p's region r; write p's ready[r] = e (a stream write, fenced
//      after the copies). Every peer is signalled every call, also with 0 rows.
//   b) rows to itself: send -> recv directly, never through the staging.
//   c) for every source s: wait until my ready[s] >= e; copy region s out into recv; write s's
//      done[r] = e. (Batched: all of a)'s waits, then all its copies, then all its writes; all
//      of c)'s waits, then b) and c)'s copies, then c)'s writes. Each wait still depends only
//      on writes of an earlier step, so the argument below holds as it stands. In place, c)'s
//      copies are the caller's reads and its writes come with inplace_end(), after them; the
//      next call's copy-out cannot run ahead of them, since its ready waits need the sources'
//      call e+1 writes, which wait for this rank's done = e.)
// Correct data: s writes region s of p in call e only after p wrote done = e-1 (after its
// copy-out of call e-1), and p copies it out only after ready = e (after s's copies of call e,
// fenced); ready cannot already hold e+1 then, since s's call e+1 waits for p's done = e.
// No deadlock (every rank enqueues the same calls): by induction on e, if every rank's steps of
// the calls before e complete, then every a) wait of call e completes (done = e-1 was written
// at the end of call e-1), so every rank's ready writes of call e happen, so every c) wait of
// call e completes. A wait depends only on writes of an earlier step, never on a later one,
// so there is no cycle, whatever order the ranks' processes run in. (The ordering does not
// lean on the stream's order between calls, only within one; EpMoeCuda uses one stream.)
// Epochs are uint32 and the waits compare cyclically (the driver's GEQ is (int32)(*addr - v)
// >= 0), so the wrap after 2^32 calls (about 40 million steps of 100 all-to-alls) is harmless.
// The copies need no flush on the reader's side: the writer's stream write carries a memory
// fence (__threadfence_system semantics) after its copies, as NVSHMEM's put-with-signal on
// stream does for P2P peers; CU_STREAM_WAIT_VALUE_FLUSH (NIC writes over PCIe) is not needed
// for NVLink or the same GPU.
// Stream memory operations: cuStreamWaitValue32 (CU_STREAM_WAIT_VALUE_GEQ) and
// cuStreamWriteValue32 (default flags: fenced), from the driver at run time
// (cudaGetDriverEntryPoint*): the binary does not link libcuda. The constructor probes them
// (a local write and wait, a write into each peer's flags) and refuses with a sentence where
// they fail. Caveat: a stream blocked in a wait may hold back other streams of the process that
// share its hardware queue (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default), as the interprocess
// events before did.
//
// Host waits: sync() polls the stream (50 us naps) for at most AUTOMOE_DIST_TIMEOUT seconds
// (default 600), then throws that the EP group's device waits did not finish (a peer stalled or
// died). Before it throws it releases this rank's waits (its flags set past the current epoch
// from a separate stream), so the unwinding's frees and synchronizes do not hang on them.
//
// Refused with a sentence (on every rank of the group): ranks on different nodes, two GPUs
// without peer access (a PCIe machine without P2P), a cudaIpc call that fails (containers
// without a shared IPC namespace, MPS setups), no stream memory operations (a driver before
// CUDA 12): use AUTOMOE_EP_TRANSPORT=nccl or mpi there.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dist/ep_transport.h"
#include "dist/process_group.h"

namespace automoe::dist {

class IpcTransport final : public EpTransport {
 public:
  // Collective over `ep`, on the current device (place_on_gpu made it current).
  explicit IpcTransport(const Comm& ep);
  ~IpcTransport() override;  // local: closes the peers' mappings, frees its own (no collective)
  IpcTransport(const IpcTransport&) = delete;
  IpcTransport& operator=(const IpcTransport&) = delete;

  const char* name() const override { return "ipc"; }
  int size() const override { return ep_.size(); }
  int num_local() const override { return 1; }
  int rank_of(int) const override { return ep_.rank(); }
  // Collective (see "Sizing"): pair_cap becomes the largest pair_bytes over the group and
  // calls so far; every rank reallocates together when that grows.
  void reserve(size_t send_bytes, size_t recv_bytes, size_t pair_bytes) override;
  // Enqueues the call's steps a-c on `stream`; no host collective, no host wait.
  void alltoallv(const EpA2aTensor* t, int nt, const EpA2aRows& rows,
                 cudaStream_t stream) override;
  // With the timeout (AUTOMOE_DIST_TIMEOUT).
  void sync(cudaStream_t stream) override;
  // Direct dispatch (see EpTransport): push_begin is step a)'s waits, the caller's kernel its
  // copies, push_end its ready flags, push_recv steps b) and c); one call number for all three.
  bool can_push() const override { return ep_.size() <= kMaxPushRanks; }
  void push_begin(cudaStream_t stream, unsigned char** region, size_t* cap) override;
  // Copies the words into every rank's mail[me] (one copy kernel), writes the peers' mailed[me]
  // (fenced), and on mail_s_ (after `stream`) waits for every source's mailed[s] and reads the
  // whole mail back into `host`, recording `done` there.
  void push_mail(cudaStream_t stream, const int32_t* words_dev, int words, int32_t* host,
                 cudaEvent_t done) override;
  void push_end(cudaStream_t stream) override;
  void push_recv(const EpA2aTensor* t, int nt, const EpA2aRows& rows, cudaStream_t stream) override;
  // Steps a) and c)'s waits of one call; src into the staging regions (and into t[k].send for
  // this rank's own rows), held until inplace_end() writes the done flags (step c)'s writes)
  // on the reader's stream.
  void alltoallv_inplace(const EpA2aTensor* t, int nt, const EpA2aRows& rows, cudaStream_t stream,
                         const void** src) override;
  void inplace_end(cudaStream_t stream) override;
  void wait_event(cudaEvent_t ev) override;  // sync()'s timeout and failure
  static constexpr int kMaxPushRanks = 8;    // cuda::kEpPushMaxRanks

  size_t pair_capacity() const { return pair_cap_; }  // bytes of one source's region

 private:
  // alltoallv()'s pieces: the host check that every pair's rows fit a region (before anything
  // is enqueued), and steps b) and c) of call epoch_
  void check_fits(const EpA2aTensor* t, int nt, const EpA2aRows& rows) const;
  void copy_out(const EpA2aTensor* t, int nt, const EpA2aRows& rows, cudaStream_t stream);
  // step a) of call epoch_ (the waits, the copies into the peers' regions, their ready flags)
  void scatter(const EpA2aTensor* t, int nt, const EpA2aRows& rows, cudaStream_t stream);
  // step a)'s waits (every peer's done flag of the previous call) and its writes (every peer's
  // ready flag of call epoch_, fenced after the copies before them), one batch each; scatter
  // and the direct dispatch (push_begin, push_end) share them
  void wait_peers(cudaStream_t stream);
  void signal_peers(cudaStream_t stream);
  // step c)'s waits (every source's ready flag) and its writes (every source's done flag, and
  // this rank's own ready slot) of call epoch_, one batch each
  void wait_sources(cudaStream_t stream);
  void release_sources(cudaStream_t stream);
  // a host wait on `ev` with the timeout; after it ran out, the release and the error
  void wait_or_fail(cudaEvent_t ev);
  void wait_geq(cudaStream_t s, const uint32_t* addr, uint32_t v);
  void write(cudaStream_t s, uint32_t* addr, uint32_t v);
  // The first n of flag_ptr_: waits (>= v) or fenced writes (= v), in order, as one
  // cuStreamBatchMemOp where the driver has it (else single operations); flags_batch is that
  // batch over `addr`, false where the driver refused it.
  void flags(cudaStream_t s, bool wait, int n, uint32_t v);
  // flag_ptr_ = at(p) for every peer p != rank, in rank order; returns their count (P - 1)
  template <class F>
  int peer_flags(F at) {
    int n = 0;
    for (int p = 0; p < ep_.size(); ++p)
      if (p != ep_.rank()) flag_ptr_[size_t(n++)] = at(p);
    return n;
  }
  // throws once a timeout released this rank's waits (the flags order nothing any more)
  void check_live() const;
  bool flags_batch(cudaStream_t s, bool wait, uint32_t* const* addr, int n, uint32_t v);
  // Local: this rank's pending waits released (its flags set past the epoch, from a stream of
  // its own) after a timeout or while an error unwinds; false when that did not finish.
  bool release();
  // Local: whether, within `seconds`, this rank's last call finished (its own ready slot,
  // written at the end of every call) and every peer wrote its done[] of that call into this
  // rank's flags (its copy-out of this rank's rows); read from a stream of its own. The
  // destructor frees nothing a peer may still write before that.
  bool finished(double seconds);
  void close_peers();  // local: the peers' staging mappings
  unsigned char* region(int p, int s) const;  // rank p's region for source s (p's staging)

  Comm ep_;
  int device_ = 0;
  double timeout_s_ = 600;
  void* wait_op_ = nullptr;   // cuStreamWaitValue32, from the driver at run time
  void* write_op_ = nullptr;  // cuStreamWriteValue32
  void* batch_op_ = nullptr;  // cuStreamBatchMemOp (null: single operations)
  bool sm_copies_ = true;     // AUTOMOE_IPC_SM_COPY (default 1): a call's copies as one kernel
                              //   (cuda::copy_many); 0: a copy-engine memcpy per peer and tensor
  std::vector<uint32_t*> flag_ptr_;  // [P] the flags of one batch (host scratch, no allocation
                                     //   per call)
  std::vector<uint64_t> batch_;      // [P x 6] its CUstreamBatchMemOpParams (48 bytes each;
                                     //   cuda.h stays out of this header)
  unsigned char* own_ = nullptr;       // [(P-1) * pair_cap_] this rank's staging (cudaMalloc)
  size_t pair_cap_ = 0;                // bytes of one source's region, the same on every rank
  std::vector<unsigned char*> peer_;   // [P] the peers' staging, mapped here; [rank] = own_
  uint32_t* flags_ = nullptr;          // [3P + P*kEpMailWords] this rank's ready[P] | done[P] |
                                       //   mailed[P] | mail[P][kEpMailWords] (cudaMalloc);
                                       //   ready[rank]: the last call this rank finished
  cudaStream_t mail_s_ = nullptr;      // push_mail's waits and read-back, beside the rows
  cudaEvent_t mail_ev_ = nullptr;      // push_mail: the caller's stream, up to the mail's sends
  uint32_t* host_word_ = nullptr;      // [2P] pinned: finished()'s read-back of the flags
  std::vector<uint32_t*> peer_flags_;  // [P] the peers' flags, mapped here; [rank] = flags_
  uint32_t epoch_ = 0;                 // calls so far (the same on every rank)
  cudaEvent_t done_ev_ = nullptr;      // sync()'s
  bool in_flight_ = false;             // calls enqueued since the last sync() that returned
  bool inplace_open_ = false;          // an alltoallv_inplace() whose inplace_end() is due
  bool released_ = false;              // after a timeout: the flags no longer order anything
  bool stuck_ = false;                 // a release that did not finish: leak, never free
};

}  // namespace automoe::dist
