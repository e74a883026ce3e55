// backend/cuda/attention_cudnn.cpp: cuDNN SDPA (flash attention) forward and backward for the
// attention op, through cudnn-frontend's graph API (see attention_cudnn.h). Host code only; the
// one file that includes cudnn-frontend (it compiles slowly).
//
// Tensors are described to cuDNN as [B, H, T, D] with BSHD strides (d 1, head D, token H*D,
// batch T*H*D); Stats as [B, nH, T, 1] with strides (nH*T, T, 1, 1), i.e. our lse[b,h,t].
// Causal mask: top-left diagonal alignment with right bound 0 (key s <= query t).
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

#if !AUTOMOE_HAVE_CUDNN

bool compiled_in() { return false; }
bool supported(bool, int64_t, int64_t, int64_t, int64_t, int64_t, bool, std::string* why) {
  if (why)
    *why = "built without cuDNN (CMake found no cudnn.h/libcudnn or no cudnn-frontend headers: "
           "run scripts/setup.sh and reconfigure)";
  return false;
}
size_t workspace_bytes(bool, int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }
void fwd(bf16*, float*, const bf16*, const bf16*, const bf16*, int64_t, int64_t, int64_t,
         int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_fwd] built without cuDNN; use the fallback (AUTOMOE_ATTENTION=fallback)");
}
void bwd(bf16*, bf16*, bf16*, const bf16*, const bf16*, const float*, const bf16*, const bf16*,
         const bf16*, int64_t, int64_t, int64_t, int64_t, int64_t, const Ctx&) {
  AM_FAIL("[attention_bwd] built without cuDNN; use the fallback (AUTOMOE_ATTENTION=fallback)");
}

#else

namespace fe = cudnn_frontend;

namespace {

constexpr int64_t kMinCudnnVersion = 90000;  // cuDNN 9.0: bf16 flash fwd/bwd with GQA
constexpr int64_t kMaxD = 256;

// Tensor uids of the variant packs (fixed: the packs below are keyed by them).
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV };

// The process's cuDNN handle, created on first use on the current device. cudnnCreate is where
// a missing sub-library or a broken install shows, so its error says what to do.
struct Handle {
  cudnnHandle_t h = nullptr;
  int device = -1;
  int cc_major = 0;
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

using Key = std::array<int64_t, 7>;  // bwd, B, T, nH, nKV, D, mask kind (1 = causal)
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
                                                           int64_t T, int64_t nH) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name("Stats")
                      .set_uid(kStats)
                      .set_dim({B, nH, T, 1})
                      .set_stride({nH * T, T, 1, 1})
                      .set_data_type(fe::DataType_t::FLOAT));
}

std::shared_ptr<fe::graph::Graph> make_graph(bool bwd, int64_t B, int64_t T, int64_t nH,
                                             int64_t nKV, int64_t D) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const float scale = 1.0f / std::sqrt(float(D));
  auto Q = bf16_tensor(*g, "Q", kQ, B, T, nH, D);
  auto K = bf16_tensor(*g, "K", kK, B, T, nKV, D);
  auto V = bf16_tensor(*g, "V", kV, B, T, nKV, D);
  if (!bwd) {
    auto attr = fe::graph::SDPA_attributes()
                    .set_name("attention_fwd")
                    .set_generate_stats(true)
                    .set_attn_scale(scale)
                    .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                    .set_diagonal_band_right_bound(0);
    auto [O, Stats] = g->sdpa(Q, K, V, attr);
    O->set_output(true).set_uid(kO).set_dim({B, nH, T, D}).set_stride(bshd_strides(T, nH, D));
    Stats->set_output(true)
        .set_uid(kStats)
        .set_dim({B, nH, T, 1})
        .set_stride({nH * T, T, 1, 1})
        .set_data_type(fe::DataType_t::FLOAT);
  } else {
    auto O = bf16_tensor(*g, "O", kO, B, T, nH, D);
    auto dO = bf16_tensor(*g, "dO", kdO, B, T, nH, D);
    auto Stats = stats_tensor(*g, B, T, nH);
    // Non-deterministic dq accumulation (fp32 atomics), cuDNN's fast default.
    auto attr = fe::graph::SDPA_backward_attributes()
                    .set_name("attention_bwd")
                    .set_attn_scale(scale)
                    .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                    .set_diagonal_band_right_bound(0);
    auto [dQ, dK, dV] = g->sdpa_backward(Q, K, V, O, dO, Stats, attr);
    dQ->set_output(true).set_uid(kdQ).set_dim({B, nH, T, D}).set_stride(bshd_strides(T, nH, D));
    dK->set_output(true).set_uid(kdK).set_dim({B, nKV, T, D}).set_stride(bshd_strides(T, nKV, D));
    dV->set_output(true).set_uid(kdV).set_dim({B, nKV, T, D}).set_stride(bshd_strides(T, nKV, D));
  }
  return g;
}

// The cached plan for a shape, built on first use (under g_mu). A case cuDNN rejects is cached
// too (graph null, why set), so it is checked once.
Plan& plan_locked(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D) {
  const Key key{bwd, B, T, nH, nKV, D, 1};
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
  } else {
    std::shared_ptr<fe::graph::Graph> g;
    fe::error_t e;
    try {  // the frontend reports through error_t, and throws on some paths
      g = make_graph(bwd, B, T, nH, nKV, D);
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
               std::string* why) {
  auto no = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  if (doc)
    return no("document masking runs the fallback (cuDNN's packed layout needs the number of "
              "documents on the host when the graph is built)");
  if (D % 8 != 0 || D > kMaxD)
    return no(fmt::format("head dim {} (cuDNN: a multiple of 8, at most 256)", D));
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(bwd, B, T, nH, nKV, D);
  if (!p.graph) return no(p.why);
  return true;
}

size_t workspace_bytes(bool bwd, int64_t B, int64_t T, int64_t nH, int64_t nKV, int64_t D) {
  if (D % 8 != 0 || D > kMaxD) return 0;
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(bwd, B, T, nH, nKV, D);
  return p.graph ? size_t(p.workspace) : 0;
}

void fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int64_t B,
         int64_t T, int64_t nH, int64_t nKV, int64_t D, const Ctx& ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(false, B, T, nH, nKV, D);
  AM_CHECK(p.graph, "[attention_fwd] cuDNN cannot run B={} T={} nH={} nKV={} D={}: {}", B, T, nH,
           nKV, D, p.why);
  p.pack[kQ] = const_cast<bf16*>(q);
  p.pack[kK] = const_cast<bf16*>(k);
  p.pack[kV] = const_cast<bf16*>(v);
  p.pack[kO] = out;
  p.pack[kStats] = lse;
  execute_locked(p, ctx, "attention_fwd");
}

void bwd(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
         const bf16* q, const bf16* k, const bf16* v, int64_t B, int64_t T, int64_t nH,
         int64_t nKV, int64_t D, const Ctx& ctx) {
  std::lock_guard<std::mutex> lock(g_mu);
  Plan& p = plan_locked(true, B, T, nH, nKV, D);
  AM_CHECK(p.graph, "[attention_bwd] cuDNN cannot run B={} T={} nH={} nKV={} D={}: {}", B, T, nH,
           nKV, D, p.why);
  p.pack[kQ] = const_cast<bf16*>(q);
  p.pack[kK] = const_cast<bf16*>(k);
  p.pack[kV] = const_cast<bf16*>(v);
  p.pack[kO] = const_cast<bf16*>(out);
  p.pack[kStats] = const_cast<float*>(lse);
  p.pack[kdO] = const_cast<bf16*>(dout);
  p.pack[kdQ] = dq;
  p.pack[kdK] = dk;
  p.pack[kdV] = dv;
  execute_locked(p, ctx, "attention_bwd");
}

#endif  // AUTOMOE_HAVE_CUDNN

}  // namespace automoe::cuda::sdpa
