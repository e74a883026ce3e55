// tests/fuzz/fuzz_tokenizer_load.cpp: libFuzzer target for loading tokenizer.json: arbitrary
// bytes as the file. Loading must either succeed or throw automoe::Error (a clear message);
// a loaded tokenizer must then encode and decode a fixed text without crashing. Any other
// exception, sanitizer report, hang or runaway memory is a bug. Seeds: the real Qwen3
// tokenizer.json and small hand-written ones (run_fuzz.sh).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/check.h"
#include "fuzz_common.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path =
      fuzz::scratch_file("tokenizer.json", std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    const automoe::Tokenizer tok = automoe::Tokenizer::load(path);
    const auto ids = tok.encode("Hello, wörld! 123 <|im_end|>\n\t  x");
    (void)tok.decode(ids);
    (void)tok.vocab_size();
  } catch (const automoe::Error&) {
  }
  return 0;
}
