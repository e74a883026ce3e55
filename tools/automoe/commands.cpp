// tools/automoe/commands.cpp: the list of subcommands `automoe` offers.
#include "commands.h"

namespace automoe::cli {
void register_all(CLI::App& app, Runners& r) {
  (void)app;
  (void)r;
}
}  // namespace automoe::cli
