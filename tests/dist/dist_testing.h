// tests/dist/dist_testing.h: what the multi-rank test files share: this process's world rank and
// size (set by main in test_dist.cpp), a folder every rank names the same, the tiny-moe recipe.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>

#include "dist/process_group.h"
#include "train/train_config.h"

namespace automoe::dist_test {

inline int g_world = 1, g_rank = 0;  // set in main (test_dist.cpp)

// A folder every rank names the same (rank 0's pid), empty.
inline std::string shared_tmpdir(const dist::Comm& world, const std::string& name) {
  int64_t pid = ::getpid();
  world.broadcast(&pid, sizeof pid, 0);
  auto d = std::filesystem::temp_directory_path() / ("automoe_dist_" + name + "_" + std::to_string(pid));
  if (world.rank() == 0) std::filesystem::remove_all(d);
  world.barrier();
  return d.string();
}

// Built-in tiny-moe on the addition task: `micro_batch` rows per rank, expert parallelism `ep`.
inline TrainConfig tiny_recipe(const std::string& dir, int64_t steps, int64_t micro_batch, int64_t ep) {
  return load_train_config("", {{"model.builtin", "tiny-moe"},
                                {"data.builtin", "addition"},
                                {"data.examples", "500"},
                                {"data.seq_len", "32"},
                                {"data.micro_batch", std::to_string(micro_batch)},
                                {"train.steps", std::to_string(steps)},
                                {"train.lr", "2e-3"},
                                {"train.warmup", "2"},
                                {"train.log_every", "1000"},
                                {"train.ep", std::to_string(ep)},
                                {"output.export_hf", "false"},
                                {"output.dir", dir}});
}

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace automoe::dist_test

#define NEEDS_RANKS()                                                                    \
  if (::automoe::dist_test::g_world == 1) GTEST_SKIP() << "runs under mpirun or tools/launch_local.sh (tests/dist.cmake)"
