// tools/automoe/commands.cpp: the list of subcommands `automoe` offers.
#include "commands.h"

namespace automoe::cli {
void register_all(CLI::App& app, Runners& r) {
  add_finetune(app, r);
  add_forward(app, r);
  add_encode(app, r);
  add_data(app, r);
}
}  // namespace automoe::cli
