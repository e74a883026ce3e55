// tools/automoe/cmd_finetune.cpp: `automoe finetune [RECIPE.yaml] [--section.key value ...]`.
#include "commands.h"
#include "core/check.h"
#include "train/trainer.h"

namespace automoe::cli {

void add_finetune(CLI::App& app, Runners& runners) {
  auto* cmd = app.add_subcommand("finetune", "Fine-tune a model: finetune [RECIPE.yaml] [--section.key value ...]");
  cmd->allow_extras();
  auto recipe = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  cmd->add_flag("--resume", *resume, "continue from the newest checkpoint in output.dir");
  cmd->footer(
      "Overrides: any recipe key as --section.key value, e.g. --train.lr 3e-4 --train.steps 200\n"
      "Example: automoe finetune examples/demo.yaml --output.dir out/demo");
  runners.push_back([cmd, recipe, resume]() -> int {
    if (!cmd->parsed()) return -1;
    std::vector<std::pair<std::string, std::string>> overrides;
    auto extras = cmd->remaining();
    size_t first = 0;
    if (!extras.empty() && extras[0].rfind("-", 0) != 0) *recipe = extras[first++];  // RECIPE.yaml
    for (size_t i = first; i < extras.size(); ++i) {
      std::string a = extras[i];
      AM_CHECK(a.rfind("--", 0) == 0 && a.size() > 2,
               "unexpected argument '{}': overrides look like --train.lr 3e-4", a);
      std::string key = a.substr(2), value;
      auto eq = key.find('=');
      if (eq != std::string::npos) {
        value = key.substr(eq + 1);
        key = key.substr(0, eq);
      } else {
        AM_CHECK(i + 1 < extras.size(), "override --{} needs a value", key);
        value = extras[++i];
      }
      overrides.emplace_back(key, value);
    }
    if (*resume) overrides.emplace_back("output.resume", "true");
    TrainConfig cfg = load_train_config(*recipe, overrides);
    run_finetune(cfg);
    return 0;
  });
}

}  // namespace automoe::cli
