// tests/sft/test_sft.cpp: SFT records -> ids and loss masks with the real Qwen3 tokenizer and chat
// template (../shared/data; skipped when absent): every format, assistant-only masks, the
// shared SFT sets, and malformed records.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "core/check.h"
#include "text/chat_template.h"
#include "text/sft.h"
#include "text/tokenizer.h"

using namespace automoe;
using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

namespace {
const std::string kData = std::string(AUTOMOE_SOURCE_DIR) + "/../shared/data";

// A model directory as the hub ships Qwen3 instruct models: tokenizer.json, chat template and a
// tokenizer_config.json naming the eos token.
std::string qwen_dir() {
  auto d = fs::temp_directory_path() / ("automoe_qwen3_" + std::to_string(::getpid()));
  fs::create_directories(d);
  for (const char* f : {"tokenizer.json", "chat_template.jinja"})
    fs::copy_file(kData + "/tokenizers/qwen3/" + f, d / f, fs::copy_options::overwrite_existing);
  std::ofstream(d / "tokenizer_config.json") << R"({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})";
  return d.string();
}

struct Qwen {
  std::string dir = qwen_dir();
  Tokenizer tok = Tokenizer::load(dir);
  ChatTemplate chat = ChatTemplate::load(dir);
};

Qwen* qwen() {
  static Qwen* q = fs::exists(kData + "/tokenizers/qwen3/tokenizer.json") ? new Qwen : nullptr;
  return q;
}

#define NEED_DATA() \
  if (!qwen()) GTEST_SKIP() << "../shared/data/tokenizers/qwen3 not found: the SFT tests need the shared data"

// The text of the labelled tokens, concatenated.
std::string labelled_text(const Example& ex, const Tokenizer& tok) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < ex.ids.size(); ++i)
    if (ex.labels[i] != -100) ids.push_back(int32_t(ex.ids[i]));
  return tok.decode(ids);
}
}  // namespace

TEST(Sft, PromptCompletionMasksThePrompt) {
  NEED_DATA();
  SftStats st;
  Example ex = sft_example(ojson{{"prompt", "2+2="}, {"completion", "4"}}, qwen()->tok, nullptr, {}, "t", &st);
  EXPECT_EQ(labelled_text(ex, qwen()->tok), "4<|im_end|>");  // the completion and the eos token
}

TEST(Sft, MessagesLabelOnlyAssistantTurns) {
  NEED_DATA();
  ojson rec = {{"messages", {{{"role", "system"}, {"content", "Be brief."}},
                             {{"role", "user"}, {"content", "Hi"}},
                             {{"role", "assistant"}, {"content", "Hello!"}},
                             {{"role", "user"}, {"content", "2+2?"}},
                             {{"role", "assistant"}, {"content", "4"}}}}};
  SftStats st;
  std::string text;
  Example ex = sft_example(rec, qwen()->tok, &qwen()->chat, {}, "t", &st, &text);
  EXPECT_EQ(qwen()->tok.decode(std::vector<int32_t>(ex.ids.begin(), ex.ids.end())), text);
  // Qwen3 renders the last assistant turn with an empty think block; earlier turns without.
  EXPECT_EQ(labelled_text(ex, qwen()->tok), "Hello!<|im_end|>\n<think>\n\n</think>\n\n4<|im_end|>\n") << text;
  EXPECT_EQ(st.boundary_mismatch, 0);
  SftOptions all;
  all.train_on_prompt = true;
  Example ex2 = sft_example(rec, qwen()->tok, &qwen()->chat, all, "t", &st);
  EXPECT_EQ(labelled_text(ex2, qwen()->tok), text);
}

TEST(Sft, ReasoningOfEarlierTurnsDroppedStillMasksTheTurn) {
  NEED_DATA();
  ojson rec = {{"messages", {{{"role", "user"}, {"content", "3*7?"}},
                             {{"role", "assistant"}, {"content", "21"}, {"reasoning_content", "3 sevens"}},
                             {{"role", "user"}, {"content", "4*5?"}},
                             {{"role", "assistant"}, {"content", "20"}, {"reasoning_content", "four fives"}}}}};
  SftStats st;
  Example ex = sft_example(rec, qwen()->tok, &qwen()->chat, {}, "t", &st);
  EXPECT_EQ(labelled_text(ex, qwen()->tok), "21<|im_end|>\n<think>\nfour fives\n</think>\n\n20<|im_end|>\n");
}

TEST(Sft, ShareGptAlpacaAndToolCalls) {
  NEED_DATA();
  SftStats st;
  ojson sg = {{"conversations", {{{"from", "human"}, {"value", "Who?"}}, {{"from", "gpt"}, {"value", "Me."}}}}};
  EXPECT_EQ(labelled_text(sft_example(sg, qwen()->tok, &qwen()->chat, {}, "t", &st), qwen()->tok),
            "<think>\n\n</think>\n\nMe.<|im_end|>\n");
  ojson al = {{"instruction", "Add"}, {"input", "1 and 2"}, {"output", "3"}};
  std::string text;
  Example ex = sft_example(al, qwen()->tok, &qwen()->chat, {}, "t", &st, &text);
  EXPECT_NE(text.find("<|im_start|>user\nAdd\n1 and 2<|im_end|>"), std::string::npos) << text;
  ojson tc = {{"conversations", {{{"from", "human"}, {"value", "Add 1 and 2"}},
                                 {{"from", "function_call"}, {"value", "{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}"}},
                                 {{"from", "observation"}, {"value", "3"}},
                                 {{"from", "gpt"}, {"value", "It is 3."}}}},
              {"tools", "[{\"name\": \"add\", \"description\": \"adds\", \"parameters\": {}}]"}};
  ex = sft_example(tc, qwen()->tok, &qwen()->chat, {}, "t", &st, &text);
  EXPECT_NE(text.find("<tools>"), std::string::npos) << text;
  std::string lab = labelled_text(ex, qwen()->tok);
  EXPECT_NE(lab.find("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call><|im_end|>"), std::string::npos) << lab;
  EXPECT_NE(lab.find("It is 3."), std::string::npos) << lab;
  EXPECT_EQ(lab.find("<tool_response>"), std::string::npos) << "tool results carry no loss: " << lab;
}

TEST(Sft, SharedDatasetsLoad) {
  NEED_DATA();
  for (const char* f : {"/sft/sharegpt/dummy_conversation.json", "/sft/alpaca/alpaca_en_demo.json",
                        "/sft/toolcall/glaive_toolcall_en_demo.json"}) {
    SftStats st;
    auto ex = load_sft_file(kData + f, qwen()->tok, &qwen()->chat, {}, &st);
    EXPECT_GT(ex.size(), 200u) << f;
    EXPECT_GT(st.labelled, 0) << f;
    EXPECT_LT(st.labelled, st.tokens) << f;
    EXPECT_EQ(st.boundary_mismatch, 0) << f << ": span-wise encoding must equal whole-text encoding";
  }
  // GSM8K (question/answer) without a template: the first 300 lines.
  std::string small = (fs::temp_directory_path() / ("gsm8k_" + std::to_string(::getpid()) + ".jsonl")).string();
  {
    std::ifstream in(kData + "/sft/gsm8k/train.jsonl");
    std::ofstream out(small);
    std::string line;
    for (int i = 0; i < 300 && std::getline(in, line); ++i) out << line << "\n";
  }
  SftStats st;
  auto ex = load_sft_file(small, qwen()->tok, nullptr, {}, &st);
  EXPECT_EQ(ex.size(), 300u);
}

TEST(Sft, MalformedRecordsNameFileAndLineOrAreSkippedAndCounted) {
  NEED_DATA();
  std::string p = (fs::temp_directory_path() / ("bad_" + std::to_string(::getpid()) + ".jsonl")).string();
  std::ofstream(p) << "{\"text\": \"ok\"}\n{\"text\": 5}\n{not json\n{\"foo\": 1}\n";
  SftStats st;
  try {
    load_sft_file(p, qwen()->tok, nullptr, {}, &st);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p + ":2: \"text\" must be a string"), std::string::npos) << e.what();
  }
  SftOptions skip;
  skip.skip_bad = true;
  SftStats st2;
  auto ex = load_sft_file(p, qwen()->tok, nullptr, skip, &st2);
  EXPECT_EQ(ex.size(), 1u);
  EXPECT_EQ(st2.skipped, 3);
  EXPECT_NE(st2.first_error.find(":2:"), std::string::npos) << st2.first_error;
}

// Inputs the fuzzer (tests/fuzz/fuzz_jsonl.cpp) broke on, kept so they stay fixed.
TEST(Sft, FuzzRegressions) {
  NEED_DATA();
  const std::string p = (fs::temp_directory_path() / ("fuzz_" + std::to_string(::getpid()) + ".jsonl")).string();
  const std::pair<const char*, const char*> cases[] = {
      // A label below -100 was accepted and would have reached the loss as a negative class.
      {"{\"input_ids\":[1,2,3],\"labels\":[-106,2,3]}\n", ":1: label -106 is neither -100 nor inside"},
      {"{\"input_ids\":[1,2,3],\"labels\":[1,2,\"x\"]}\n", ":1: labels must hold integers"},
      {"{\"input_ids\":[1,99999999]}\n", ":1: token id 99999999 is outside the tokenizer's vocabulary"},
  };
  for (const auto& [text, expect] : cases) {
    std::ofstream(p) << text;
    try {
      load_sft_file(p, qwen()->tok, nullptr, {}, nullptr);
      ADD_FAILURE() << "expected an error for " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
    }
  }
}
