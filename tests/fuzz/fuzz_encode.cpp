// tests/fuzz/fuzz_encode.cpp: libFuzzer target for encoding arbitrary bytes with the real Qwen3
// (tokenizer.json) and GPT-2 (vocab.json + merges.txt) tokenizers. Invalid UTF-8 must be an
// automoe::Error; valid UTF-8 must round-trip: decode(encode(x)) == NFC(x) for Qwen3 (its
// normalizer is NFC) and == x for GPT-2; every id must be inside the vocabulary.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/check.h"
#include "fuzz_common.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace {

void check_roundtrip(const automoe::Tokenizer& tok, std::string_view text, const std::string& expect,
                     const char* name) {
  std::vector<int32_t> ids;
  try {
    ids = tok.encode(text);
  } catch (const automoe::Error&) {
    return;  // invalid UTF-8: a clear error is the contract
  }
  for (int32_t id : ids)
    if (id < 0 || id >= tok.vocab_size()) {
      std::fprintf(stderr, "%s: id %d outside the vocabulary (%d)\n", name, id, tok.vocab_size());
      std::abort();
    }
  const std::string back = tok.decode(ids);
  if (back != expect) {
    std::fprintf(stderr, "%s: decode(encode(x)) != x (%zu ids, %zu vs %zu bytes)\n", name, ids.size(),
                 back.size(), expect.size());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const automoe::Tokenizer qwen = automoe::Tokenizer::load(fuzz::tokenizers_dir() + "/qwen3");
  static const automoe::Tokenizer gpt2 = automoe::Tokenizer::load(fuzz::tokenizers_dir() + "/gpt2");
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  // nfc() is defined on valid UTF-8 only; the encoders must reject the rest themselves (an
  // encoder that accepted invalid bytes would decode them to U+FFFD and fail the round trip).
  const bool valid = automoe::unicode::utf8_valid_upto(text) == text.size();
  check_roundtrip(qwen, text, valid ? automoe::unicode::nfc(text) : std::string(text), "qwen3");
  check_roundtrip(gpt2, text, std::string(text), "gpt2");
  return 0;
}
