// tools/automoe/commands.h: subcommand registration. Each cmd_*.cpp defines add_<name>(app, runners);
// a runner returns -1 when its subcommand was not chosen, else the exit code.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <vector>

namespace automoe::cli {
using Runners = std::vector<std::function<int()>>;
void add_finetune(CLI::App& app, Runners& r);
void add_forward(CLI::App& app, Runners& r);
void add_encode(CLI::App& app, Runners& r);
void add_data(CLI::App& app, Runners& r);
void register_all(CLI::App& app, Runners& r);
}  // namespace automoe::cli
