// tools/automoe/main.cpp: the `automoe` command line. Each subcommand lives in its own file
// (cmd_*.cpp) and registers itself here; errors print one line and exit non-zero.
// With several ranks an error on any rank stops every rank (dist::abort_all: MPI_Abort, or under
// TCP closing the connections): a rank that failed must not leave the others waiting in a
// collective. The catch below runs only after the error has unwound through the GPU objects'
// destructors, which wait on the device: a failed collective (host or NCCL) prints its message
// and aborts the NCCL communicators where it happens (dist::collective_failed), and an error
// mid-step aborts them as it unwinds the model, so those waits return and this prints or exits.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "core/check.h"
#include "commands.h"
#include "dist/process_group.h"
#include "ops/ops.h"
#ifdef AUTOMOE_HAVE_CUDA
#include "train/trainer_cuda.h"
#endif

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
#ifdef AUTOMOE_HAVE_CUDA
  automoe::register_cuda_trainer();  // train.device cuda
#endif
  int rc = 0;
  try {
    for (auto& r : runners)
      if (rc = r(); rc != -1) break;
    if (rc == -1) rc = 0;
  } catch (const std::exception& e) {  // automoe::Error and the rest: one line, every rank stops
    automoe::dist::abort_all(e.what());
  }
  automoe::dist::finalize();
  return rc;
}
