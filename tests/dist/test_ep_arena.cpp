// tests/dist/test_ep_arena.cpp: the host arithmetic of the GPU EP block's saved-state arena
// (dist/ep_arena.h): one carve's layout (with and without the recomputed expert activations,
// train.ep_recompute), the expected and worst loads, the arena's size from train.ep_capacity,
// bump carving, and the overflow sentence. No GPU, no MPI: world size 1.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "dist/ep_arena.h"
#include "train/train_config.h"

namespace dist = automoe::dist;
using dist::EpRecompute;

namespace {

// Qwen3-30B-A3B's expert shapes, seq 4096, micro-batch 1
const dist::EpMoeShape kQwen{4096, 2048, 768, 128, 8};

}  // namespace

TEST(EpArena, CarveLayoutIsAlignedAndInOrder) {
  const dist::EpMoeShape s{37, 100, 36, 12, 3};
  const dist::EpSavedLayout l = dist::ep_saved_layout(s, 4, 37, 101, 211, EpRecompute::kNone);
  const size_t offs[] = {l.send_pos, l.offsets, l.slot_row, l.w_recv, l.x_recv, l.gu, l.ys, l.bytes};
  for (size_t o : offs) EXPECT_EQ(o % dist::kEpArenaAlign, 0u);
  EXPECT_EQ(l.send_pos, 0u);
  EXPECT_EQ(l.offsets, dist::ep_align(37 * 4 * 4));
  EXPECT_EQ(l.slot_row - l.offsets, dist::ep_align((3 + 1) * 4));
  EXPECT_EQ(l.w_recv - l.slot_row, dist::ep_align(101 * 3 * 4));
  EXPECT_EQ(l.x_recv - l.w_recv, dist::ep_align(101 * 3 * 4));
  EXPECT_EQ(l.gu - l.x_recv, dist::ep_align(101 * 100 * 2));
  EXPECT_EQ(l.ys - l.gu, dist::ep_align(211 * 2 * 36 * 2));
  EXPECT_EQ(l.bytes - l.ys, dist::ep_align(211 * 100 * 2));
  // nothing received: only the layout and the offsets
  const dist::EpSavedLayout z = dist::ep_saved_layout(s, 4, 37, 0, 0, EpRecompute::kNone);
  EXPECT_EQ(z.bytes, dist::ep_align(37 * 4 * 4) + dist::ep_align(4 * 4));
}

TEST(EpArena, RecomputeDropsTheExpertActivationsFromTheCarve) {
  // the carve of CarveLayoutIsAlignedAndInOrder: gu 211 x 72 x 2 -> 30464 bytes, ys 211 x 100 x 2
  // -> 42240 (bench/memory_plan.py's ep_carve gives the same three totals)
  const dist::EpMoeShape s{37, 100, 36, 12, 3};
  const dist::EpSavedLayout none = dist::ep_saved_layout(s, 4, 37, 101, 211, EpRecompute::kNone);
  const dist::EpSavedLayout outs = dist::ep_saved_layout(s, 4, 37, 101, 211, EpRecompute::kOutputs);
  const dist::EpSavedLayout exps = dist::ep_saved_layout(s, 4, 37, 101, 211, EpRecompute::kExperts);
  EXPECT_EQ(none.bytes, 96512u);
  EXPECT_EQ(outs.bytes, 54272u);
  EXPECT_EQ(exps.bytes, 23808u);
  // what stays is laid out as before
  for (const dist::EpSavedLayout& l : {outs, exps}) {
    EXPECT_EQ(l.send_pos, none.send_pos);
    EXPECT_EQ(l.offsets, none.offsets);
    EXPECT_EQ(l.slot_row, none.slot_row);
    EXPECT_EQ(l.w_recv, none.w_recv);
    EXPECT_EQ(l.x_recv, none.x_recv);
  }
  EXPECT_EQ(outs.gu, none.gu);
  EXPECT_EQ(outs.ys, dist::kEpNotSaved);
  EXPECT_EQ(outs.bytes, none.ys);  // ys was last
  EXPECT_EQ(exps.gu, dist::kEpNotSaved);
  EXPECT_EQ(exps.ys, dist::kEpNotSaved);
  EXPECT_EQ(exps.bytes, none.gu);  // the carve ends after x_recv
}

TEST(EpArena, RecomputeShrinksTheArenaOfQwen3_30B_A3B_EP4) {
  // 48 MoE layers, seq 4096, micro-batch 1, EP = 4, train.ep_capacity 2: the figures of
  // docs/DISTRIBUTED.md's table (bench/memory_plan.py --ep-recompute none|outputs|experts)
  const int P = 4;
  EXPECT_EQ(dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kNone), 28491423744u);
  EXPECT_EQ(dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kOutputs), 15606521856u);
  EXPECT_EQ(dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kExperts), 3274715136u);
  EXPECT_EQ(dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kNone), 1007747328u);
  EXPECT_EQ(dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kOutputs), 470876416u);
  EXPECT_EQ(dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kExperts), 68223232u);
  // without gate|up and outputs 2x the balanced rows pass the worst case: the worst case it is
  EXPECT_EQ(dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kExperts),
            48 * dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kExperts));
}

TEST(EpArena, RecomputeNames) {
  for (EpRecompute r : {EpRecompute::kNone, EpRecompute::kOutputs, EpRecompute::kExperts})
    EXPECT_EQ(dist::parse_ep_recompute(dist::ep_recompute_name(r)), r);
  try {
    dist::parse_ep_recompute("ys");
    ADD_FAILURE() << "parse_ep_recompute(\"ys\") did not throw";
  } catch (const std::exception& e) {
    const std::string m = e.what();
    for (const char* part : {"train.ep_recompute 'ys'", "none", "outputs", "experts"})
      EXPECT_NE(m.find(part), std::string::npos) << part << " not in: " << m;
  }
}

TEST(EpArena, ExpectedAndWorstLoad) {
  // one rank: every token comes back to it, K picks each
  const dist::EpLoad one = dist::ep_expected_load(kQwen, 1, 4096);
  EXPECT_DOUBLE_EQ(one.rows, 4096.0);
  EXPECT_DOUBLE_EQ(one.picks, 4096.0 * 8);
  // P = 4: a token misses one rank's 32 experts with probability C(96,8)/C(128,8)
  double none = 1;
  for (int i = 0; i < 8; ++i) none *= (96.0 - i) / (128.0 - i);
  const dist::EpLoad e = dist::ep_expected_load(kQwen, 4, 4096);
  EXPECT_NEAR(e.rows, 4 * 4096 * (1 - none), 1e-6);
  EXPECT_GT(e.rows, 0.89 * 4 * 4096);
  EXPECT_LT(e.rows, 0.91 * 4 * 4096);
  EXPECT_DOUBLE_EQ(e.picks, 4096.0 * 8);
  const dist::EpLoad w = dist::ep_worst_load(kQwen, 4, 4096);
  EXPECT_DOUBLE_EQ(w.rows, 4.0 * 4096);
  EXPECT_DOUBLE_EQ(w.picks, 4.0 * 4096 * 8);
  // more ranks than picks: every pick on its own rank at most, K per token
  const dist::EpLoad w16 = dist::ep_worst_load({64, 64, 32, 16, 4}, 16, 64);
  EXPECT_DOUBLE_EQ(w16.picks, 16.0 * 64 * 1);
}

TEST(EpArena, SizeFollowsTheCapacityFactorAndStopsAtTheWorstCase) {
  const int P = 4;
  const int64_t layers = 48;
  const dist::EpLoad e = dist::ep_expected_load(kQwen, P, 4096);
  const size_t one = dist::ep_saved_layout(kQwen, P, 4096, int64_t(std::ceil(e.rows)),
                                           int64_t(std::ceil(e.picks)), EpRecompute::kNone)
                         .bytes;
  const size_t a2 = dist::ep_arena_bytes(kQwen, P, layers, 1, 2.0, EpRecompute::kNone);
  EXPECT_EQ(a2, dist::ep_align(size_t(2 * one * layers)));
  EXPECT_EQ(a2 % dist::kEpArenaAlign, 0u);
  EXPECT_LT(dist::ep_arena_bytes(kQwen, P, layers, 1, 1.0, EpRecompute::kNone), a2);
  // 2x the balanced load is about half the worst case at EP = 4 (picks: N*K against 4*N*K)
  const size_t worst = size_t(layers) * dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kNone);
  EXPECT_LT(double(a2), 0.6 * double(worst));
  EXPECT_GT(double(a2), 0.4 * double(worst));
  // a factor past the worst case is the worst case (it could never be used up)
  EXPECT_EQ(dist::ep_arena_bytes(kQwen, P, layers, 1, 100.0, EpRecompute::kNone), worst);
  // loopback: P local ranks carve from one arena
  EXPECT_EQ(dist::ep_arena_worst_bytes(kQwen, P, P, EpRecompute::kNone),
            size_t(P) * dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kNone));
  EXPECT_THROW(dist::ep_arena_bytes(kQwen, P, layers, 1, 0.0, EpRecompute::kNone), std::exception);
  EXPECT_THROW(dist::ep_arena_bytes(kQwen, P, layers, 1, -1.0, EpRecompute::kNone), std::exception);
}

TEST(EpArena, BumpCarvesInOrderUntilReset) {
  dist::EpBumpArena a(4096);
  EXPECT_EQ(a.take(1), 0);
  EXPECT_EQ(a.take(256), 256);
  EXPECT_EQ(a.take(300), 512);  // rounded up to 512 bytes
  EXPECT_EQ(a.used(), 1024u);
  EXPECT_EQ(a.left(), 3072u);
  EXPECT_EQ(a.take(3073), -1);  // does not fit: nothing taken
  EXPECT_EQ(a.used(), 1024u);
  EXPECT_EQ(a.take(3072), 1024);
  EXPECT_EQ(a.left(), 0u);
  EXPECT_EQ(a.take(0), 1024 + 3072);  // an empty carve always fits
  const uint64_t g = a.generation();
  a.reset();
  EXPECT_EQ(a.generation(), g + 1);
  EXPECT_EQ(a.used(), 0u);
  EXPECT_EQ(a.take(4096), 0);
}

TEST(EpArena, LayersOfARealisticStepFitTwiceTheBalancedLoad) {
  // 48 layers at 1.5x the balanced load each fit an arena of 2x; 48 at 2.5x do not, and the
  // first layer that does not fit is about index 38 (38 x 2.5 = 95 <= 96 < 97.5)
  const int P = 4;
  const dist::EpLoad e = dist::ep_expected_load(kQwen, P, 4096);
  dist::EpBumpArena a(dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kNone));
  auto carve = [&](double x) {
    return a.take(dist::ep_saved_layout(kQwen, P, 4096, int64_t(e.rows * x), int64_t(e.picks * x),
                                        EpRecompute::kNone)
                      .bytes);
  };
  for (int l = 0; l < 48; ++l) EXPECT_GE(carve(1.5), 0) << "layer " << l;
  a.reset();
  int first_fail = -1;
  for (int l = 0; l < 48 && first_fail < 0; ++l)
    if (carve(2.5) < 0) first_fail = l;
  EXPECT_GE(first_fail, 37);
  EXPECT_LE(first_fail, 39);
}

TEST(EpArena, OverflowMessageSaysWhatToDo) {
  const std::string m = dist::ep_arena_overflow_message("MoE layer 7 (model layer 7)", 2,
                                                        size_t(300) << 20, size_t(100) << 20,
                                                        size_t(28) << 30, 16000, 70000);
  for (const char* part : {"MoE layer 7", "EP rank 2", "300.0 MiB", "100.0 MiB", "28672.0 MiB",
                           "16000 received rows", "70000 expert rows", "raise train.ep_capacity"})
    EXPECT_NE(m.find(part), std::string::npos) << part << " not in: " << m;
}

TEST(EpArena, RecipeKey) {
  using automoe::load_train_config;
  const auto base = std::vector<std::pair<std::string, std::string>>{
      {"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}};
  EXPECT_DOUBLE_EQ(load_train_config("", base).ep_capacity, 2.0);
  auto o = base;
  o.push_back({"train.ep_capacity", "1.25"});
  const auto c = load_train_config("", o);
  EXPECT_DOUBLE_EQ(c.ep_capacity, 1.25);
  EXPECT_NE(c.to_yaml().find("ep_capacity: 1.25"), std::string::npos) << c.to_yaml();
  o.back().second = "0";
  EXPECT_THROW(load_train_config("", o), std::exception);
}

TEST(EpArena, RecomputeRecipeKey) {
  using automoe::load_train_config;
  const auto base = std::vector<std::pair<std::string, std::string>>{
      {"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}};
  const auto d = load_train_config("", base);
  EXPECT_EQ(d.ep_recompute, "none");
  // the default is not written
  EXPECT_EQ(d.to_yaml().find("ep_recompute"), std::string::npos) << d.to_yaml();
  auto o = base;
  o.push_back({"train.device", "cuda"});
  o.push_back({"train.ep", "2"});
  for (const char* v : {"none", "outputs", "experts"}) {
    auto ov = o;
    ov.push_back({"train.ep_recompute", v});
    const auto c = load_train_config("", ov);
    EXPECT_EQ(c.ep_recompute, v);
    EXPECT_EQ(c.to_yaml().find(std::string("ep_recompute: ") + v) != std::string::npos,
              std::string(v) != "none")
        << c.to_yaml();
  }
  auto bad = o;
  bad.push_back({"train.ep_recompute", "ys"});
  try {
    load_train_config("", bad);
    ADD_FAILURE() << "train.ep_recompute ys accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("use none"), std::string::npos) << e.what();
  }
  // nothing to recompute without the GPU EP block: an error, not a silent no-op
  auto cpu = base;
  cpu.push_back({"train.ep", "2"});
  cpu.push_back({"train.ep_recompute", "experts"});
  EXPECT_THROW(load_train_config("", cpu), std::exception);
  auto one = base;
  one.push_back({"train.device", "cuda"});
  one.push_back({"train.ep_recompute", "outputs"});
  EXPECT_THROW(load_train_config("", one), std::exception);
}

TEST(EpArena, PaddedArenaIsEveryLayersWorstCase) {
  // train.ep_dispatch padded: every forward carves P*N rows, whatever the routing
  const int P = 4;
  for (EpRecompute r : {EpRecompute::kNone, EpRecompute::kOutputs, EpRecompute::kExperts}) {
    EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 48, 1, r),
              48 * dist::ep_arena_worst_bytes(kQwen, P, 1, r));
    const dist::EpLoad w = dist::ep_worst_load(kQwen, P, kQwen.max_tokens);
    EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 1, 1, r),
              dist::ep_saved_layout(kQwen, P, kQwen.max_tokens, int64_t(w.rows), int64_t(w.picks), r)
                  .bytes);
    // loopback: the local ranks carve one after another
    EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 48, P, r),
              size_t(P) * dist::ep_arena_padded_bytes(kQwen, P, 48, 1, r));
  }
  // docs/DISTRIBUTED.md (bench/memory_plan.py --ep-dispatch padded): with experts recomputed
  // padded costs what counts mode's default arena costs (2x balanced passes the worst case)
  EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 48, 1, EpRecompute::kExperts), 3274715136u);
  EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 48, 1, EpRecompute::kExperts),
            dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kExperts));
  // without it, 45 GiB: why train.ep_dispatch padded needs train.ep_recompute experts
  EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 48, 1, EpRecompute::kNone), size_t(48) * 1007747328u);
  EXPECT_GT(dist::ep_arena_padded_bytes(kQwen, P, 48, 1, EpRecompute::kOutputs),
            dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, EpRecompute::kOutputs));
  const std::string m = dist::ep_arena_padded_overflow_message("MoE layer 3", 5 << 20, 1 << 20,
                                                               9 << 20, 4096);
  for (const char* part : {"MoE layer 3", "padded mode", "5.0 MiB", "1.0 MiB", "9.0 MiB", "4096"})
    EXPECT_NE(m.find(part), std::string::npos) << part << " not in: " << m;
}

TEST(EpArena, PaddedWireRatioOfQwen3_30B_A3B) {
  // rows sent per rank, padded (P*N) over counts (N x the ranks a token reaches, balanced):
  // 1 / (1 - C(E-E/P, K)/C(E, K)) at E = 128, K = 8 (docs/DISTRIBUTED.md)
  EXPECT_NEAR(dist::ep_padded_wire_ratio(kQwen, 2), 1.0031, 1e-4);
  EXPECT_NEAR(dist::ep_padded_wire_ratio(kQwen, 4), 1.1022, 1e-4);
  EXPECT_NEAR(dist::ep_padded_wire_ratio(kQwen, 8), 1.4983, 1e-4);
  EXPECT_NEAR(dist::ep_padded_wire_ratio(kQwen, 16), 2.4255, 1e-4);
  EXPECT_DOUBLE_EQ(dist::ep_padded_wire_ratio(kQwen, 1), 1.0);
}

TEST(EpArena, DispatchNames) {
  for (dist::EpMode m : {dist::EpMode::kCounts, dist::EpMode::kPadded})
    EXPECT_EQ(dist::parse_ep_dispatch(dist::ep_mode_name(m)), m);
  try {
    dist::parse_ep_dispatch("fast");
    ADD_FAILURE() << "parse_ep_dispatch(\"fast\") did not throw";
  } catch (const std::exception& e) {
    const std::string m = e.what();
    for (const char* part : {"train.ep_dispatch 'fast'", "counts", "padded"})
      EXPECT_NE(m.find(part), std::string::npos) << part << " not in: " << m;
  }
}

TEST(EpArena, DispatchRecipeKey) {
  using automoe::load_train_config;
  const auto base = std::vector<std::pair<std::string, std::string>>{
      {"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}};
  const auto d = load_train_config("", base);
  EXPECT_EQ(d.ep_dispatch, "counts");
  EXPECT_EQ(d.to_yaml().find("ep_dispatch"), std::string::npos) << d.to_yaml();  // default
  auto gpu = base;
  gpu.push_back({"train.device", "cuda"});
  gpu.push_back({"train.ep", "2"});
  auto ok = gpu;
  ok.push_back({"train.ep_recompute", "experts"});
  ok.push_back({"train.ep_dispatch", "padded"});
  const auto c = load_train_config("", ok);
  EXPECT_EQ(c.ep_dispatch, "padded");
  EXPECT_NE(c.to_yaml().find("ep_dispatch: padded"), std::string::npos) << c.to_yaml();
  auto counts = gpu;
  counts.push_back({"train.ep_dispatch", "counts"});
  EXPECT_EQ(load_train_config("", counts).to_yaml().find("ep_dispatch"), std::string::npos);
  // the error names what is wrong and what to do
  auto expect_error = [](const std::vector<std::pair<std::string, std::string>>& o,
                         std::vector<const char*> parts) {
    try {
      automoe::load_train_config("", o);
      ADD_FAILURE() << "accepted: " << o.back().first << " " << o.back().second;
    } catch (const std::exception& e) {
      const std::string m = e.what();
      for (const char* part : parts)
        EXPECT_NE(m.find(part), std::string::npos) << part << " not in: " << m;
    }
  };
  auto bad = gpu;
  bad.push_back({"train.ep_dispatch", "fast"});
  expect_error(bad, {"train.ep_dispatch 'fast'", "counts", "padded"});
  // padded keeps every layer's worst case: without experts recomputed that is far too large
  for (const char* rc : {"none", "outputs"}) {
    auto big = gpu;
    big.push_back({"train.ep_recompute", rc});
    big.push_back({"train.ep_dispatch", "padded"});
    expect_error(big, {"train.ep_dispatch padded needs train.ep_recompute experts", rc, "worst"});
  }
  auto cpu = base;
  cpu.push_back({"train.ep", "2"});
  cpu.push_back({"train.ep_dispatch", "padded"});
  expect_error(cpu, {"train.ep_dispatch padded applies to the GPU", "train.device cpu"});
  auto cap = ok;
  cap.push_back({"train.ep_capacity", "3"});
  expect_error(cap, {"train.ep_capacity 3 has no effect with train.ep_dispatch padded"});
}

TEST(EpArena, TokenChunksSplitEveryTokenOnce) {
  // train.ep_chunks: contiguous chunks, the first N % C one token longer, at most ceil(N/C)
  for (int64_t N : {0, 1, 2, 7, 37, 4096, 4097})
    for (int C = 1; C <= dist::kEpMaxChunks; ++C) {
      int64_t next = 0;
      for (int c = 0; c < C; ++c) {
        EXPECT_EQ(dist::ep_chunk_begin(N, C, c), next) << N << " " << C << " " << c;
        const int64_t n = dist::ep_chunk_tokens(N, C, c);
        EXPECT_LE(n, (N + C - 1) / C);
        EXPECT_GE(n, N / C);
        next += n;
      }
      EXPECT_EQ(next, N) << N << " " << C;
    }
  EXPECT_EQ(dist::ep_chunk_tokens(37, 3, 0), 13);
  EXPECT_EQ(dist::ep_chunk_tokens(37, 3, 2), 12);
  EXPECT_EQ(dist::ep_chunk_begin(37, 3, 2), 25);
  for (int bad : {0, -1, dist::kEpMaxChunks + 1}) {
    try {
      dist::check_ep_chunks(bad);
      ADD_FAILURE() << "check_ep_chunks(" << bad << ") did not throw";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("train.ep_chunks must be between 1"), std::string::npos)
          << e.what();
    }
  }
}

TEST(EpArena, ChunkedArenaHoldsEveryChunksCarve) {
  // one carve per chunk: the same rows, plus per extra carve its offsets and alignment
  const int P = 4;
  for (EpRecompute r : {EpRecompute::kNone, EpRecompute::kOutputs, EpRecompute::kExperts}) {
    EXPECT_EQ(dist::ep_arena_worst_bytes(kQwen, P, 1, r, 1), dist::ep_arena_worst_bytes(kQwen, P, 1, r));
    EXPECT_EQ(dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, r, 1),
              dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, r));
    for (int C : {2, 3, 8}) {
      const size_t one = dist::ep_arena_worst_bytes(kQwen, P, 1, r);
      const size_t chunked = dist::ep_arena_worst_bytes(kQwen, P, 1, r, C);
      size_t sum = 0;
      for (int c = 0; c < C; ++c) {
        const int64_t n = dist::ep_chunk_tokens(kQwen.max_tokens, C, c);
        const dist::EpLoad w = dist::ep_worst_load(kQwen, P, n);
        sum += dist::ep_saved_layout(kQwen, P, n, int64_t(w.rows), int64_t(w.picks), r).bytes;
      }
      EXPECT_EQ(chunked, sum);
      EXPECT_GE(chunked, one);
      EXPECT_LE(chunked, one + size_t(C) * 7 * dist::kEpArenaAlign);  // 7 buffers' alignment
      EXPECT_EQ(dist::ep_arena_padded_bytes(kQwen, P, 48, 1, r, C), 48 * chunked);
      // loopback: the local ranks carve one after another
      EXPECT_EQ(dist::ep_arena_worst_bytes(kQwen, P, P, r, C), size_t(P) * chunked);
      // the balanced arena: the chunks' expected carves, at most the worst
      const size_t bal = dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, r, C);
      EXPECT_LE(bal, 48 * chunked);
      EXPECT_GE(bal, dist::ep_arena_bytes(kQwen, P, 48, 1, 2.0, r));
    }
  }
  EXPECT_THROW(dist::ep_arena_worst_bytes(kQwen, P, 1, EpRecompute::kNone, 9), std::exception);
}

TEST(EpArena, ChunksRecipeKey) {
  using automoe::load_train_config;
  const auto base = std::vector<std::pair<std::string, std::string>>{
      {"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}};
  const auto d = load_train_config("", base);
  EXPECT_EQ(d.ep_chunks, 1);
  EXPECT_EQ(d.to_yaml().find("ep_chunks"), std::string::npos) << d.to_yaml();
  auto gpu = base;
  gpu.push_back({"train.device", "cuda"});
  gpu.push_back({"train.ep", "2"});
  for (int c : {1, 2, 3, 8}) {
    auto o = gpu;
    o.push_back({"train.ep_chunks", std::to_string(c)});
    const auto cfg = load_train_config("", o);
    EXPECT_EQ(cfg.ep_chunks, c);
    EXPECT_EQ(cfg.to_yaml().find("ep_chunks: " + std::to_string(c)) != std::string::npos, c != 1)
        << cfg.to_yaml();
  }
  for (const char* bad : {"0", "9", "-2"}) {
    auto o = gpu;
    o.push_back({"train.ep_chunks", bad});
    try {
      load_train_config("", o);
      ADD_FAILURE() << "train.ep_chunks " << bad << " accepted";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("train.ep_chunks must be between 1"), std::string::npos)
          << e.what();
    }
  }
  // nothing to pipeline without the GPU EP block: an error, not a silent no-op
  auto cpu = base;
  cpu.push_back({"train.ep", "2"});
  cpu.push_back({"train.ep_chunks", "2"});
  EXPECT_THROW(load_train_config("", cpu), std::exception);
}

TEST(EpArena, HalvesRecipeKey) {
  using automoe::load_train_config;
  const auto base = std::vector<std::pair<std::string, std::string>>{
      {"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}};
  const auto d = load_train_config("", base);
  EXPECT_FALSE(d.ep_halves);
  EXPECT_EQ(d.to_yaml().find("ep_halves"), std::string::npos) << d.to_yaml();
  auto gpu = base;
  gpu.push_back({"train.device", "cuda"});
  gpu.push_back({"train.ep", "2"});
  gpu.push_back({"train.ep_halves", "true"});
  const auto cfg = load_train_config("", gpu);
  EXPECT_TRUE(cfg.ep_halves);
  EXPECT_NE(cfg.to_yaml().find("ep_halves: true"), std::string::npos) << cfg.to_yaml();
  // the resolved recipe loads back to the same setting
  EXPECT_TRUE(load_train_config("", {{"model.builtin", "tiny-moe"}, {"data.builtin", "addition"},
                                     {"train.device", "cuda"}, {"train.ep", "2"},
                                     {"train.ep_halves", "true"}})
                  .ep_halves);
  // nothing to overlap without the GPU EP block: an error naming both settings
  for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
           {"train.device", "cpu"}, {"train.ep", "1"}}) {
    auto o = base;
    o.push_back({"train.device", k == "train.device" ? v : "cuda"});
    o.push_back({"train.ep", k == "train.ep" ? v : "2"});
    o.push_back({"train.ep_halves", "true"});
    try {
      load_train_config("", o);
      ADD_FAILURE() << "train.ep_halves accepted with " << k << " " << v;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("train.ep_halves applies to the GPU"), std::string::npos)
          << e.what();
    }
  }
}

TEST(EpArena, BalanceRecipeKey) {  // train.ep_balance: the CPU block's, refused on the GPU
  using automoe::load_train_config;
  const auto base = std::vector<std::pair<std::string, std::string>>{
      {"model.builtin", "tiny-moe"}, {"data.builtin", "addition"}};
  const auto d = load_train_config("", base);
  EXPECT_FALSE(d.ep_balance);
  EXPECT_EQ(d.to_yaml().find("ep_balance"), std::string::npos) << d.to_yaml();
  auto on = base;
  on.push_back({"train.ep", "2"});
  on.push_back({"train.ep_balance", "true"});
  const auto cfg = load_train_config("", on);
  EXPECT_TRUE(cfg.ep_balance);
  EXPECT_NE(cfg.to_yaml().find("ep_balance: true"), std::string::npos) << cfg.to_yaml();
  for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
           {"train.device", "cuda"}, {"train.ep", "1"}}) {
    auto o = base;
    o.push_back({"train.device", k == "train.device" ? v : "cpu"});
    o.push_back({"train.ep", k == "train.ep" ? v : "2"});
    o.push_back({"train.ep_balance", "true"});
    try {
      load_train_config("", o);
      ADD_FAILURE() << "train.ep_balance accepted with " << k << " " << v;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("train.ep_balance moves expert work"),
                std::string::npos)
          << e.what();
    }
  }
}
