// tools/automoe/main.cpp: the `automoe` command line. Each subcommand lives in its own file
// (cmd_*.cpp) and registers itself here; errors print one line and exit non-zero.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "core/check.h"
#include "commands.h"
#include "ops/ops.h"

int main(int argc, char** argv) {
  CLI::App app{"automoe: fine-tune Hugging Face Mixture-of-Experts models"};
  app.require_subcommand(1);
  std::vector<std::function<int()>> runners;
  automoe::cli::register_all(app, runners);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  automoe::cpu::set_num_threads_from_env();
  try {
    for (auto& r : runners)
      if (int rc = r(); rc != -1) return rc;
  } catch (const automoe::Error& e) {
    std::fprintf(stderr, "automoe: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "automoe: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
