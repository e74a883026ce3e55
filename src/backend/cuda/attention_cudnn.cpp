// backend/cuda/attention_cudnn.cpp: cuDNN SDPA (flash attention) forward and backward for the
// attention op, through cudnn-frontend's graph API (see attention_cudnn.h). Host code only; the
// one file that includes cudnn-frontend (it compiles slowly).
//
// Tensors are described to cuDNN as [B, H, T, D] with BSHD strides (d 1, head D, token H*D,
// batch T*H*D); Stats as [B, nH, T, 1] with strides (nH*T, T, 1, 1), i.e. our lse[b,h,t].
// Causal mask: top-left diagonal alignment with right bound 0 (key s <= query t).
// Packed graphs (see attention_cudnn.h): the same tensors as [S, H, T, D] with ragged offsets
// (int64, elements) and seq_len_q/kv (int32) from the segment table, padding mask on, Stats
// [S, nH, T, 1] with token-major strides (nH*T, 1, nH, 1) and a ragged offset, and
// max_total_seq_len_q/kv = B*T so the backward's workspace is sized by the real token count
// (not S*T). The API usage follows cudnn-frontend's docs/operations/Attention.md (ragged layout)
// and TransformerEngine's THD path (fused_attn_f16_arbitrary_seqlen.cu), which runs the same
// bucketed-batch, zero-length-padding scheme on cuDNN >= 9.6.
#include "backend/cuda/attention_cudnn.h"

#if AUTOMOE_HAVE_CUDNN
#define CUDNN_FRONTEND_SKIP_JSON_LIB 1  // no graph serialisation: less to compile
#include <cudnn_frontend.h>

#include <array>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>
#endif

#include <cmath>

namespace automoe::cuda::sdpa {

int64_t segment_bucket(int64_t segments) {
  int64_t b = kMinSegmentBucket;
  while (b < segments) b *= 2;
  return b;
}

int64_t segment_capacity(int64_t B, int64_t T) {
  return (segment_bucket(B * T) + 1 + 3) / 4 * 4;  // a multiple of 4: every array 16-aligned
}

size_t segment_table_bytes(int64_t B, int64_t T) {
  return size_t(segment_capacity(B, T)) * (3 * sizeof(int64_t) + sizeof(int32_t));
}

#if !AUTOMOE_HAVE_CUDNN

bool compiled_in() { return false; }
bool supported(bool, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t,
               std::string* why) {
  if (why)
    *why = "built without cuDNN (CMake found no cudnn.h/libcudnn or no cudnn-frontend headers: "
           "run scripts/setup.sh and reconfigure)";
  return false;
}
size_t workspace_bytes(bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }
void fwd(bf16*, float*, const bf16*, const bf16*, const bf16*, int64_t, int64_t, int64_t,
         int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_fwd] built without cuDNN; use the fallback (AUTOMOE_ATTENTION=fallback)");
}
void bwd(bf16*, bf16*, bf16*, const bf16*, const bf16*, const float*, const bf16*, const bf16*,
         const bf16*, int64_t, int64_t, int64_t, int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_bwd] built without cuDNN; use the fallback (AUTOMOE_ATTENTION=fallback)");
}
void fwd_packed(bf16*, float*, const bf16*, const bf16*, const bf16*, const void*, int64_t,
                int64_t, int64_t, int64_t, int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_fwd] built without cuDNN; use the fallback (AUTOMOE_ATTENTION=fallback)");
}
void bwd_packed(bf16*, bf16*, bf16*, const bf16*, const bf16*, const float*, const bf16*,
                const bf16*, const bf16*, const void*, int64_t, int64_t, int64_t, int64_t,
                int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_bwd] built without cuDNN; use the fallback (AUTOMOE_ATTENTION=fallback)");
}
bool supported_tail(bool bwd, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    std::string* why) {
  return supported(bwd, 0, 0, 0, 0, 0, false, 0, why);
}
size_t workspace_bytes_tail(bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  return 0;
}
void fwd_tail(bf16*, float*, const bf16*, const bf16*, const bf16*, int64_t, int64_t, int64_t,
              int64_t, int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_tail_fwd] built without cuDNN (the tail attention runs on cuDNN only)");
}
void bwd_tail(bf16*, bf16*, bf16*, const bf16*, const bf16*, const float*, const bf16*,
              const bf16*, const bf16*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
              const Ctx&) {
  AM_FAIL("[attention_tail_bwd] built without cuDNN (the tail attention runs on cuDNN only)");
}

#else

namespace fe = cudnn_frontend;

namespace {

constexpr int64_t kMinCudnnVersion = 90000;  // cuDNN 9.0: bf16 flash fwd/bwd with GQA
// Packed: GQA with ragged offsets and ragged Stats need 9.6 (cudnn-frontend's sdpa_backward
// checks; TransformerEngine's THD path uses ragged Stats and max_total_seq_len from 9.6 on).
constexpr int64_t kMinCudnnVersionPacked = 90600;
constexpr int64_t kMaxD = 256;

// Tensor uids of the variant packs (fixed: the packs below are keyed by them).
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV,
  // packed graphs only: ragged offsets and sequence lengths from the segment table
  kOffQ, kOffO, kOffK, kOffV, kOffStats, kSeqQ, kSeqKV
};

// The process's cuDNN handle, created on first use on the current device. cudnnCreate is where
// a missing sub-library or a broken install shows, so its error says what to do.
struct Handle {
  cudnnHandle_t h = nullptr;
  int device = -1;
  int cc_major = 0;
  int cc_minor = 0;
};

Handle& handle() {
  static Handle hd = [] {
    Handle r;
    const size_t ver = cudnnGetVersion();
    AM_CHECK(ver >= size_t(kMinCudnnVersion),
             "[attention] cuDNN {} found at run time is too old for SDPA (need >= 9.0; built "
             "against {}). Install a newer cuDNN (pip install nvidia-cudnn-cu13) or set "
             "AUTOMOE_ATTENTION=fallback",
             ver, CUDNN_VERSION);
    const cudnnStatus_t st = cudnnCreate(&r.h);
    AM_CHECK(st == CUDNN_STATUS_SUCCESS,
             "[attention] cudnnCreate failed: {} (cuDNN {}). Check that the cuDNN libraries next "
             "to libcudnn.so.9 are complete and match the driver, or set "
             "AUTOMOE_ATTENTION=fallback",
             cudnnGetErrorString(st), ver);
    CUDA_CHECK(cudaGetDevice(&r.device));
    CUDA_CHECK(cudaDeviceGetAttribute(&r.cc_major, cudaDevAttrComputeCapabilityMajor, r.device));
    CUDA_CHECK(cudaDeviceGetAttribute(&r.cc_minor, cudaDevAttrComputeCapabilityMinor, r.device));
    return r;
  }();
  return hd;
}

// One cached graph: built and checked once, executed many times.
struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;  // null when cuDNN cannot run the case
  std::string why;                          // why not, when graph is null
  int64_t workspace = 0;
  // uid -> device pointer; the keys are inserted at build time, so filling the pack at each
  // call allocates nothing.
  std::unordered_map<int64_t, void*> pack;
};

// bwd, B, T, nH, nKV, D, mask kind (1 = causal, 2 = packed: causal within ragged sequences,
// 3 = tail: the last Tq queries over T keys, causal aligned bottom-right), then the packed
// graph's sequences (its bucket) or the tail's Tq (0 for causal)
using Key = std::array<int64_t, 8>;
std::mutex g_mu;                     // guards the cache and the handle's stream binding
// Never destroyed (nor is the handle): at exit their destructors would run after the CUDA
// runtime's own teardown.
std::map<Key, std::unique_ptr<Plan>>& g_plans = *new std::map<Key, std::unique_ptr<Plan>>;

std::vector<int64_t> bshd_strides(int64_t T, int64_t H, int64_t D) {
  return {T * H * D, D, H * D, 1};  // dims [B, H, T, D] over memory [B, T, H, D]
}

std::shared_ptr<fe::graph::Tensor_attributes> bf16_tensor(fe::graph::Graph& g, const char* name,
                                                          int64_t uid, int64_t B, int64_t T,
                                                          int64_t H, int64_t D) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({B, H, T, D})
                      .set_stride(bshd_strides(T, H, D))
                      .set_data_type(fe::DataType_t::BFLOAT16));
}

std::shared_ptr<fe::graph::Tensor_attributes> stats_tensor(fe::graph::Graph& g, int64_t B,
                                                           int64_t T, int64_t nH) {  // T queries
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name("Stats")
                      .set_uid(kStats)
                      .set_dim({B, nH, T, 1})
                      .set_stride({nH * T, T, 1, 1})
                      .set_data_type(fe::DataType_t::FLOAT));
}

// sm: the device's compute capability (90 for sm_90), given to the graph before its nodes so
// cudnn-frontend's support checks use it rather than query the current device.
// Tq queries over Tkv keys: Tq = Tkv with the top-left diagonal (causal), or (tail) the last Tq
// positions with the bottom-right one (query i at position Tkv - Tq + i sees keys <= it).
std::shared_ptr<fe::graph::Graph> make_graph(bool bwd, int64_t B, int64_t Tq, int64_t Tkv,
                                             int64_t nH, int64_t nKV, int64_t D, int sm,
                                             bool tail) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_sm_version(sm);
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const float scale = 1.0f / std::sqrt(float(D));
  const auto align = tail ? fe::DiagonalAlignment_t::BOTTOM_RIGHT : fe::DiagonalAlignment_t::TOP_LEFT;
  auto Q = bf16_tensor(*g, "Q", kQ, B, Tq, nH, D);
  auto K = bf16_tensor(*g, "K", kK, B, Tkv, nKV, D);
  auto V = bf16_tensor(*g, "V", kV, B, Tkv, nKV, D);
  if (!bwd) {
    auto attr = fe::graph::SDPA_attributes()
                    .set_name("attention_fwd")
                    .set_generate_stats(true)
                    .set_attn_scale(scale)
                    .set_diagonal_alignment(align)
                    .set_diagonal_band_right_bound(0);
    auto [O, Stats] = g->sdpa(Q, K, V, attr);
    O->set_output(true).set_uid(kO).set_dim({B, nH, Tq, D}).set_stride(bshd_strides(Tq, nH, D));
    Stats->set_output(true)
        .set_uid(kStats)
        .set_dim({B, nH, Tq, 1})
        .set_stride({nH * Tq, Tq, 1, 1})
        .set_data_type(fe::DataType_t::FLOAT);
  } else {
    auto O = bf16_tensor(*g, "O", kO, B, Tq, nH, D);
    auto dO = bf16_tensor(*g, "dO", kdO, B, Tq, nH, D);
    auto Stats = stats_tensor(*g, B, Tq, nH);
    // Non-deterministic dq accumulation (fp32 atomics), cuDNN's fast default.
    auto attr = fe::graph::SDPA_backward_attributes()
                    .set_name("attention_bwd")
                    .set_attn_scale(scale)
                    .set_diagonal_alignment(align)
                    .set_diagonal_band_right_bound(0);
    auto [dQ, dK, dV] = g->sdpa_backward(Q, K, V, O, dO, Stats, attr);
    dQ->set_output(true).set_uid(kdQ).set_dim({B, nH, Tq, D}).set_stride(bshd_strides(Tq, nH, D));
    dK->set_output(true).set_uid(kdK).set_dim({B, nKV, Tkv, D}).set_stride(bshd_strides(Tkv, nKV, D));
    dV->set_output(true).set_uid(kdV).set_dim({B, nKV, Tkv, D}).set_stride(bshd_strides(Tkv, nKV, D));
  }
  return g;
}

// The packed graph: S sequences (a bucket) of at most T tokens each, B*T tokens in all, ragged
// views of the [B,T,H,D] buffers (dims [S,H,T,D], the BSHD strides within a sequence; cuDNN
// ignores the batch stride of a ragged tensor and takes the sequence's offset instead).
std::shared_ptr<fe::graph::Graph> make_packed_graph(bool bwd, int64_t B, int64_t T, int64_t nH,
                                                    int64_t nKV, int64_t D, int64_t S, int sm) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_sm_version(sm);
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t total = B * T;  // tokens in the buffers: bounds the ragged token axis
  auto offsets = [&](const char* name, int64_t uid) {
    return g->tensor(fe::graph::Tensor_attributes()
                         .set_name(name)
                         .set_uid(uid)
                         .set_dim({S + 1, 1, 1, 1})
                         .set_stride({1, 1, 1, 1})
                         .set_data_type(fe::DataType_t::INT64));
  };
  auto lengths = [&](const char* name, int64_t uid) {
    return g->tensor(fe::graph::Tensor_attributes()
                         .set_name(name)
                         .set_uid(uid)
                         .set_dim({S, 1, 1, 1})
                         .set_stride({1, 1, 1, 1})
                         .set_data_type(fe::DataType_t::INT32));
  };
  auto off_q = offsets("offset_q", kOffQ), off_o = offsets("offset_o", kOffO);
  auto off_k = offsets("offset_k", kOffK), off_v = offsets("offset_v", kOffV);
  auto off_st = offsets("offset_stats", kOffStats);
  auto seq_q = lengths("seq_len_q", kSeqQ), seq_kv = lengths("seq_len_kv", kSeqKV);
  const std::vector<int64_t> stats_dim{S, nH, T, 1}, stats_stride{nH * T, 1, nH, 1};
  // both passes' masking: causal (top-left) within each ragged sequence of its own length
  auto packed_mask = [&](auto& a) {
    a.set_attn_scale(scale)
        .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
        .set_diagonal_band_right_bound(0)
        .set_padding_mask(true)
        .set_seq_len_q(seq_q)
        .set_seq_len_kv(seq_kv)
        .set_max_total_seq_len_q(total)
        .set_max_total_seq_len_kv(total);
  };

  auto Q = bf16_tensor(*g, "Q", kQ, S, T, nH, D);
  auto K = bf16_tensor(*g, "K", kK, S, T, nKV, D);
  auto V = bf16_tensor(*g, "V", kV, S, T, nKV, D);
  Q->set_ragged_offset(off_q);
  K->set_ragged_offset(off_k);
  V->set_ragged_offset(off_v);
  if (!bwd) {
    auto attr = fe::graph::SDPA_attributes();
    packed_mask(attr.set_name("attention_fwd_packed").set_generate_stats(true));
    auto [O, Stats] = g->sdpa(Q, K, V, attr);
    O->set_output(true)
        .set_uid(kO)
        .set_dim({S, nH, T, D})
        .set_stride(bshd_strides(T, nH, D))
        .set_ragged_offset(off_o);
    Stats->set_output(true)
        .set_uid(kStats)
        .set_dim(stats_dim)
        .set_stride(stats_stride)
        .set_data_type(fe::DataType_t::FLOAT)
        .set_ragged_offset(off_st);
  } else {
    auto O = bf16_tensor(*g, "O", kO, S, T, nH, D);
    auto dO = bf16_tensor(*g, "dO", kdO, S, T, nH, D);
    O->set_ragged_offset(off_o);
    dO->set_ragged_offset(off_o);
    auto Stats = g->tensor(fe::graph::Tensor_attributes()
                               .set_name("Stats")
                               .set_uid(kStats)
                               .set_dim(stats_dim)
                               .set_stride(stats_stride)
                               .set_data_type(fe::DataType_t::FLOAT)
                               .set_ragged_offset(off_st));
    auto attr = fe::graph::SDPA_backward_attributes();
    packed_mask(attr.set_name("attention_bwd_packed"));
    auto [dQ, dK, dV] = g->sdpa_backward(Q, K, V, O, dO, Stats, attr);
    dQ->set_output(true)
        .set_uid(kdQ)
        .set_dim({S, nH, T, D})
        .set_stride(bshd_strides(T, nH, D))
        .set_ragged_offset(off_q);
    dK->set_output(true)
        .set_uid(kdK)
        .set_dim({S, nKV, T, D})
        .set_stride(bshd_strides(T, nKV, D))
        .set_ragged_offset(off_k);
    dV->set_output(true)
        .set_uid(kdV)
        .set_dim({S, nKV, T, D})
        .set_stride(bshd_strides(T, nKV, D))
        .set_ragged_offset(off_v);
  }
  return g;
}

// The cached plan for a shape, built on first use (under g_mu). A case cuDNN rejects is cached
// too (graph null, why set), so it is checked once.
// S = 0: the causal graph; S > 0: the packed graph of S sequences (a bucket). Tq > 0: the tail
// graph (Tq queries over the T keys; S must be 0).
Plan& plan_locked(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                  int64_t S = 0, int64_t Tq = 0) {
  const Key key{bwd, B, T, nH, nKV, D, Tq > 0 ? 3 : S > 0 ? 2 : 1, Tq > 0 ? Tq : S};
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return *it->second;
  auto p = std::make_unique<Plan>();
  Handle& hd = handle();
  int device = -1;
  CUDA_CHECK(cudaGetDevice(&device));
  AM_CHECK(device == hd.device,
           "[attention] cuDNN plans are built for device {} but the current device is {}: one "
           "process drives one GPU",
           hd.device, device);
  if (hd.cc_major < 8) {
    p->why = fmt::format("device compute capability {}.x < 8.0", hd.cc_major);
  } else if (S > 0 && hd.cc_major < 9) {
    p->why = fmt::format("packed (ragged) SDPA needs compute capability >= 9.0 (Hopper) in the "
                         "cuDNN versions checked here; the device is {}.x",
                         hd.cc_major);
  } else if (S > 0 && cudnnGetVersion() < size_t(kMinCudnnVersionPacked)) {
    p->why = fmt::format("packed (ragged) SDPA with GQA and ragged Stats needs cuDNN >= 9.6; "
                         "found {} at run time (pip install nvidia-cudnn-cu13)",
                         cudnnGetVersion());
  } else {
    std::shared_ptr<fe::graph::Graph> g;
    fe::error_t e;
    try {  // the frontend reports through error_t, and throws on some paths
      const int sm = hd.cc_major * 10 + hd.cc_minor;
      g = Tq > 0  ? make_graph(bwd, B, Tq, T, nH, nKV, D, sm, true)
          : S > 0 ? make_packed_graph(bwd, B, T, nH, nKV, D, S, sm)
                  : make_graph(bwd, B, T, T, nH, nKV, D, sm, false);
      e = g->validate();
      if (e.is_good()) e = g->build_operation_graph(hd.h);
      if (e.is_good()) e = g->create_execution_plans({fe::HeurMode_t::A});
      if (e.is_good()) e = g->check_support();
      if (e.is_good()) e = g->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE);
      if (e.is_good()) e = g->get_workspace_size(p->workspace);
    } catch (const std::exception& ex) {
      e = fe::error_t(fe::error_code_t::GRAPH_NOT_SUPPORTED, ex.what());
    }
    if (e.is_good()) {
      p->graph = std::move(g);
      const int64_t uids[] = {kQ, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV};
      for (int64_t u : uids)
        if (bwd || u <= kStats) p->pack.emplace(u, nullptr);
      if (S > 0)
        for (int64_t u : {kOffQ, kOffO, kOffK, kOffV, kOffStats, kSeqQ, kSeqKV})
          p->pack.emplace(u, nullptr);
    } else {
      p->why = "cuDNN rejects the graph: " + e.get_message();
    }
  }
  return *g_plans.emplace(key, std::move(p)).first->second;
}

void execute_locked(Plan& p, const Ctx& ctx, const char* op) {
  void* ws = workspace_for(ctx, size_t(p.workspace), op);
  Handle& hd = handle();
  const cudnnStatus_t st = cudnnSetStream(hd.h, ctx.stream);
  AM_CHECK(st == CUDNN_STATUS_SUCCESS, "[{}] cudnnSetStream failed: {}", op,
           cudnnGetErrorString(st));
  fe::error_t e = p.graph->execute(hd.h, p.pack, ws);
  AM_CHECK(e.is_good(), "[{}] cuDNN SDPA execute failed: {} (set AUTOMOE_ATTENTION=fallback to "
           "run the fallback kernel)", op, e.get_message());
}

}  // namespace

bool compiled_in() { return true; }

bool supported(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D, bool doc,
               int64_t segments, std::string* why) {
  auto no = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  if (doc && segments <= 0)
    return no("document ids without a segment table run the fallback (cuDNN's packed layout "
              "needs the (row, document) runs on the host: pass AttentionSegments from "
              "attention_segments_build)");
  if (D % 8 != 0 || D > kMaxD)
    return no(fmt::format("head dim {} (cuDNN: a multiple of 8, at most 256)", D));
  if (doc && B * T * std::max(nH, nKV) * D >= (int64_t(1) << 40))
    return no("packed batch too large for the segment table's offsets");
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(bwd, B, T, nH, nKV, D, doc ? segment_bucket(segments) : 0);
  if (!p.graph) return no(p.why);
  return true;
}

size_t workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D,
                       int64_t segments) {
  if (D % 8 != 0 || D > kMaxD) return 0;
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(bwd, B, T, nH, nKV, D, segments > 0 ? segment_bucket(segments) : 0);
  return p.graph ? size_t(p.workspace) : 0;
}

namespace {

// The segment table's arrays (see attention_cudnn.h) in a packed plan's variant pack. The
// Q-side and KV-side offsets serve two tensor uids each (cuDNN only reads them).
void bind_segments(Plan& p, const void* table, int64_t B, int64_t T) {
  const int64_t C = segment_capacity(B, T);
  auto* off = static_cast<int64_t*>(const_cast<void*>(table));
  p.pack[kOffQ] = off;
  p.pack[kOffO] = off;
  p.pack[kOffK] = off + C;
  p.pack[kOffV] = off + C;
  p.pack[kOffStats] = off + 2 * C;
  p.pack[kSeqQ] = off + 3 * C;  // int32 len[C]
  p.pack[kSeqKV] = off + 3 * C;
}

// A pass's tensors in the plan's variant pack (its keys were inserted at build time).
void bind_fwd(Plan& p, bf16* out, float* stats, const bf16* q, const bf16* k, const bf16* v) {
  p.pack[kQ] = const_cast<bf16*>(q);
  p.pack[kK] = const_cast<bf16*>(k);
  p.pack[kV] = const_cast<bf16*>(v);
  p.pack[kO] = out;
  p.pack[kStats] = stats;
}

void bind_bwd(Plan& p, bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
              const float* stats, const bf16* q, const bf16* k, const bf16* v) {
  bind_fwd(p, const_cast<bf16*>(out), const_cast<float*>(stats), q, k, v);
  p.pack[kdO] = const_cast<bf16*>(dout);
  p.pack[kdQ] = dq;
  p.pack[kdK] = dk;
  p.pack[kdV] = dv;
}

// One pass on the plan of (shape, bucket); segments > 0: the packed plan, with the table bound.
void run_fwd(bf16* out, float* stats, const bf16* q, const bf16* k, const bf16* v,
             const void* table, int64_t segments, int64_t B, int64_t T, int64_t nH, int64_t nKV,
             int64_t D, const Ctx& ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  const int64_t S = segments > 0 ? segment_bucket(segments) : 0;
  Plan& p = plan_locked(false, B, T, nH, nKV, D, S);
  AM_CHECK(p.graph, "[attention_fwd] cuDNN cannot run {}B={} T={} nH={} nKV={} D={}{}: {}",
           S ? "packed " : "", B, T, nH, nKV, D,
           S ? fmt::format(" sequences={} (bucket {})", segments, S) : std::string(), p.why);
  bind_fwd(p, out, stats, q, k, v);
  if (S) bind_segments(p, table, B, T);
  execute_locked(p, ctx, "attention_fwd");
}

void run_bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* stats,
             const bf16* q, const bf16* k, const bf16* v, const void* table, int64_t segments,
             int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  const int64_t S = segments > 0 ? segment_bucket(segments) : 0;
  Plan& p = plan_locked(true, B, T, nH, nKV, D, S);
  AM_CHECK(p.graph, "[attention_bwd] cuDNN cannot run {}B={} T={} nH={} nKV={} D={}{}: {}",
           S ? "packed " : "", B, T, nH, nKV, D,
           S ? fmt::format(" sequences={} (bucket {})", segments, S) : std::string(), p.why);
  bind_bwd(p, dq, dk, dv, dout, out, stats, q, k, v);
  if (S) bind_segments(p, table, B, T);
  execute_locked(p, ctx, "attention_bwd");
}

}  // namespace

void fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
         int64_t T, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  run_fwd(out, lse, q, k, v, nullptr, 0, B, T, nH, nKV, D, ctx);
}

void bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
         const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t T, int64_t nH,
         int64_t nKV, int64_t D, const Ctx& ctx) {
  run_bwd(dq, dk, dv, dout, out, lse, q, k, v, nullptr, 0, B, T, nH, nKV, D, ctx);
}

void fwd_packed(bf16* out, float* stats, const bf16* q, const bf16* k, const bf16* v,
                const void* table, int64_t segments, int64_t B, int64_t T, int64_t nH,
                int64_t nKV, int64_t D, const Ctx& ctx) {
  AM_CHECK(segments > 0, "[attention_fwd] packed pass without segments");
  run_fwd(out, stats, q, k, v, table, segments, B, T, nH, nKV, D, ctx);
}

void bwd_packed(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out,
                const float* stats, const bf16* q, const bf16* k, const bf16* v,
                const void* table, int64_t segments, int64_t B, int64_t T, int64_t nH,
                int64_t nKV, int64_t D, const Ctx& ctx) {
  AM_CHECK(segments > 0, "[attention_bwd] packed pass without segments");
  run_bwd(dq, dk, dv, dout, out, stats, q, k, v, table, segments, B, T, nH, nKV, D, ctx);
}

bool supported_tail(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV,
                    int64_t D, std::string* why) {
  auto no = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  if (Tq < 1 || Tq > Tkv) return no(fmt::format("{} queries over {} keys (1 <= Tq <= Tkv)", Tq, Tkv));
  if (D % 8 != 0 || D > kMaxD)
    return no(fmt::format("head dim {} (cuDNN: a multiple of 8, at most 256)", D));
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(bwd, B, Tkv, nH, nKV, D, 0, Tq);
  if (!p.graph) return no(p.why);
  return true;
}

size_t workspace_bytes_tail(bool bwd, int64_t B, int64_t Tq, int64_t Tkv, int64_t nH,
                            int64_t nKV, int64_t D) {
  if (!supported_tail(bwd, B, Tq, Tkv, nH, nKV, D, nullptr)) return 0;
  std::lock_guard<std::mutex> lock(g_mu);
  return size_t(plan_locked(bwd, B, Tkv, nH, nKV, D, 0, Tq).workspace);
}

void fwd_tail(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
              int64_t Tq, int64_t Tkv, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(false, B, Tkv, nH, nKV, D, 0, Tq);
  AM_CHECK(p.graph, "[attention_tail_fwd] cuDNN cannot run B={} Tq={} Tkv={} nH={} nKV={} D={}: {}",
           B, Tq, Tkv, nH, nKV, D, p.why);
  bind_fwd(p, out, lse, q, k, v);
  execute_locked(p, ctx, "attention_tail_fwd");
}

void bwd_tail(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
              const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t Tq, int64_t Tkv,
              int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(true, B, Tkv, nH, nKV, D, 0, Tq);
  AM_CHECK(p.graph, "[attention_tail_bwd] cuDNN cannot run B={} Tq={} Tkv={} nH={} nKV={} D={}: {}",
           B, Tq, Tkv, nH, nKV, D, p.why);
  bind_bwd(p, dq, dk, dv, dout, out, lse, q, k, v);
  execute_locked(p, ctx, "attention_tail_bwd");
}

#endif  // AUTOMOE_HAVE_CUDNN

}  // namespace automoe::cuda::sdpa
