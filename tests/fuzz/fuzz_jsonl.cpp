// tests/fuzz/fuzz_jsonl.cpp: libFuzzer target for dataset files: arbitrary bytes as a .jsonl
// SFT file (every format, auto-detected, rendered with the Qwen3 chat template and tokenized),
// as a .json array, and as pre-tokenized JSONL. Reading must either succeed or throw
// automoe::Error naming the file and line; with skip_bad the bad records are counted instead.
// Every example must have ids and labels of equal length, and ids and labels (other than
// -100) inside the vocabulary.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/check.h"
#include "fuzz_common.h"
#include "text/chat_template.h"
#include "text/dataset.h"
#include "text/sft.h"
#include "text/tokenizer.h"

namespace {

void check_examples(const std::vector<automoe::Example>& ex, int64_t vocab) {
  for (const auto& e : ex) {
    if (e.ids.size() != e.labels.size()) {
      std::fprintf(stderr, "ids and labels differ in length\n");
      std::abort();
    }
    for (size_t i = 0; i < e.ids.size(); ++i) {
      if (e.ids[i] < 0 || e.ids[i] >= vocab) {
        std::fprintf(stderr, "id %lld outside the vocabulary\n", static_cast<long long>(e.ids[i]));
        std::abort();
      }
      if (e.labels[i] != -100 && (e.labels[i] < 0 || e.labels[i] >= vocab)) {
        std::fprintf(stderr, "label %lld outside the vocabulary\n", static_cast<long long>(e.labels[i]));
        std::abort();
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const automoe::Tokenizer tok = automoe::Tokenizer::load(fuzz::tokenizers_dir() + "/qwen3");
  static const automoe::ChatTemplate chat = [] {
    automoe::jinja::Limits limits;
    limits.max_steps = 200000;
    return automoe::ChatTemplate::load(fuzz::tokenizers_dir() + "/qwen3", limits);
  }();
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const int64_t vocab = tok.vocab_size();

  for (const char* name : {"data.jsonl", "data.json"}) {
    const std::string path = fuzz::scratch_file(name, bytes);
    for (bool skip : {false, true}) {
      automoe::SftOptions opt;
      opt.skip_bad = skip;
      automoe::SftStats stats;
      try {
        check_examples(automoe::load_sft_file(path, tok, &chat, opt, &stats), vocab);
      } catch (const automoe::Error&) {
      }
    }
  }
  const std::string path = fuzz::scratch_file("tokens.jsonl", bytes);
  try {
    check_examples(automoe::load_tokenized_jsonl(path, vocab), vocab);
  } catch (const automoe::Error&) {
  }
  return 0;
}
