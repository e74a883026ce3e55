// tests/fuzz/fuzz_jinja.cpp: libFuzzer target for the Jinja interpreter: parses and renders
// arbitrary template text against a fixed conversation. Any exception other than a template
// error, any sanitizer report, hang or runaway memory is a bug. Built by tests/fuzz/run_fuzz.sh
// with clang (-fsanitize=fuzzer,address,undefined); every input it ever broke on is kept as a
// regression test in tests/chat/test_jinja.cpp (FuzzRegressions).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "text/jinja.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nlohmann::ordered_json vars = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Grüße 你好 🙂 {{ not jinja }}"},
      {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nok", "reasoning_content": null,
       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": [2.5, null, true]}}}]},
      {"role": "tool", "content": "3"}
    ],
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}],
    "add_generation_prompt": true, "enable_thinking": false, "bos_token": "<s>", "eos_token": "</s>"
  })");
  // Small limits keep each input fast; the limits themselves are what is being exercised.
  automoe::jinja::Limits limits;
  limits.max_steps = 20000;
  limits.max_output_bytes = 1 << 20;
  try {
    automoe::jinja::Template t(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz", limits);
    t.render(vars);
  } catch (const automoe::jinja::TemplateError&) {
  }
  return 0;
}
