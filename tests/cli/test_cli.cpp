// tests/cli/test_cli.cpp: the `automoe` command line as external tools use it: the forward
// contract (ARCHITECTURE.md "Contracts") on a Transformers fixture, and one-line errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "io/safetensors.h"

using namespace automoe;
namespace fs = std::filesystem;

namespace {
const std::string kFix = std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/hf/";

// Runs the CLI; returns the exit code and fills `out` with stdout+stderr.
int run(const std::string& args, std::string* out) {
  std::string cmd = std::string(AUTOMOE_CLI) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  char buf[4096];
  out->clear();
  while (size_t n = fread(buf, 1, sizeof buf, p)) out->append(buf, n);
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string tmp(const std::string& name) {
  return (fs::temp_directory_path() / ("automoe_cli_" + std::to_string(::getpid()) + "_" + name)).string();
}
}  // namespace

TEST(CliForward, MatchesTransformersWithGradients) {
  // The fixture's reference file carries input_ids and labels: use it as the batch.
  std::string out = tmp("out.safetensors"), log;
  ASSERT_EQ(run("forward --model " + kFix + "tiny_a/model --batch " + kFix +
                    "tiny_a/reference.safetensors --out " + out + " --grads",
                &log),
            0)
      << log;
  SafetensorsFile got(out), ref(kFix + "tiny_a/reference.safetensors");
  EXPECT_EQ(got.info("logits").shape, (Shape{2, 13, 256}));
  EXPECT_EQ(got.info("logits").dtype, DType::F32);
  EXPECT_NEAR(got.load_f32("loss").f32()[0], ref.load_f32("loss").f32()[0], 1e-4);
  EXPECT_NEAR(got.load_f32("aux_loss").f32()[0], ref.load_f32("aux_loss").f32()[0], 1e-5);
  int grads = 0;
  for (auto& n : ref.names())
    if (n.rfind("grad.", 0) == 0) {
      ASSERT_TRUE(got.has(n)) << n;
      EXPECT_EQ(got.info(n).shape, ref.info(n).shape) << n;
      ++grads;
    }
  EXPECT_GT(grads, 20);
}

TEST(CliForward, IdsBeyondVocabularyIsAClearError) {
  std::string batch = tmp("bad_batch.safetensors"), log;
  Tensor ids = Tensor::zeros(DType::I64, {1, 4});
  ids.i64()[2] = 999;  // vocab is 256
  save_safetensors(batch, {{"input_ids", ids}, {"labels", ids}}, {});
  EXPECT_EQ(run("forward --model " + kFix + "tiny_a/model --batch " + batch + " --out " + tmp("o.safetensors"), &log), 1);
  EXPECT_NE(log.find("input id 999"), std::string::npos) << log;
  EXPECT_NE(log.find("outside the vocabulary"), std::string::npos) << log;
}

TEST(CliForward, MissingModelDirectoryIsAClearError) {
  std::string log;
  EXPECT_EQ(run("forward --model /nonexistent/model --batch x --out y", &log), 1);
  EXPECT_NE(log.find("/nonexistent/model"), std::string::npos) << log;
}

TEST(CliFinetune, UnknownOverrideIsAClearError) {
  std::string log;
  EXPECT_EQ(run("finetune --model.builtin tiny-moe --data.builtin addition --train.stepz 3", &log), 1);
  EXPECT_NE(log.find("unknown recipe key 'train.stepz'"), std::string::npos) << log;
}

// Without a usable GPU (CI, this machine) `--device cuda` must stop with a sentence saying so,
// not a raw CUDA error; with one, it runs (then there is nothing to check here).
TEST(CliGpu, NoUsableGpuIsAClearError) {
  std::string log;
  const int rc = run("forward --model " + kFix + "tiny_a/model --batch " + kFix +
                         "tiny_a/reference.safetensors --out " + tmp("gpu.safetensors") +
                         " --device cuda --dtype bf16",
                     &log);
  if (rc == 0) GTEST_SKIP() << "a GPU is here: forward --device cuda ran";
  EXPECT_EQ(rc, 1) << log;
  const bool clear = log.find("no usable CUDA GPU") != std::string::npos ||
                     log.find("built without CUDA") != std::string::npos;
  EXPECT_TRUE(clear) << log;
  const int rc2 = run("finetune " + std::string(AUTOMOE_SOURCE_DIR) +
                          "/examples/demo.yaml --train.device cuda --train.steps 1 "
                      "--output.dir " + tmp("gpu_run"),
                      &log);
  if (rc2 == 0) GTEST_SKIP() << "a GPU is here: finetune on cuda ran";
  EXPECT_EQ(rc2, 1) << log;
  EXPECT_TRUE(log.find("no usable CUDA GPU") != std::string::npos ||
              log.find("built without the cuda backend") != std::string::npos)
      << log;
}

TEST(CliEncode, ChatRendersAndTokenizesAsTransformers) {
  const std::string tok = std::string(AUTOMOE_SOURCE_DIR) + "/../shared/data/tokenizers/qwen3";
  if (!fs::exists(tok + "/tokenizer.json")) GTEST_SKIP() << "../shared/data/tokenizers/qwen3 not found";
  std::ifstream f(std::string(AUTOMOE_SOURCE_DIR) + "/tests/fixtures/chat/chat_cases.json");
  auto all = nlohmann::ordered_json::parse(f);
  int checked = 0, i = 0;
  for (auto& c : all["cases"]) {
    if (c["template"] != "qwen3" || !c.contains("ids") || i++ % 3) continue;  // a third of them: each spawns a process
    std::string in = tmp("chat.json");
    std::ofstream(in) << nlohmann::ordered_json{{"messages", c["messages"]}, {"tools", c["tools"]}}.dump();
    std::string args = "encode --tokenizer " + tok + " --chat " + in;
    if (c["flags"].value("add_generation_prompt", false)) args += " --add-generation-prompt";
    if (c["flags"].contains("enable_thinking"))
      args += std::string(" --enable-thinking ") + (c["flags"]["enable_thinking"].get<bool>() ? "true" : "false");
    std::string out, want = c["text"].get<std::string>() + "\n";
    for (size_t k = 0; k < c["ids"].size(); ++k) want += (k ? " " : "") + std::to_string(c["ids"][k].get<int>());
    want += "\n";
    ASSERT_EQ(run(args, &out), 0) << out;
    EXPECT_EQ(out, want) << c["case"] << " " << c["flags"].dump();
    ++checked;
  }
  EXPECT_GE(checked, 10);
}
