// text/jinja.h: a small sandboxed Jinja2 interpreter for Hugging Face chat templates. It renders
// what jinja2 renders when configured as transformers' apply_chat_template configures it
// (trim_blocks, lstrip_blocks, loopcontrols, tojson without HTML escaping, raise_exception,
// strftime_now), byte for byte, for the subset of Jinja that chat templates use.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/check.h"

namespace automoe::jinja {

// Sandbox bounds. A template is untrusted text, so every way it could run long, recurse deep or
// grow large is capped; passing a cap is an error that names the template line.
struct Limits {
  int64_t max_steps = 1'000'000;        // loop iterations plus macro calls, in total
  int64_t max_output_bytes = 64 << 20;  // the output, and any one string or list built on the way
  int max_nesting = 200;                // syntax nesting (blocks, operators, filter chains); the
                                        // evaluator may recurse 8x this, macros included
  int max_call_depth = 64;              // macro recursion
  int64_t max_range = 100'000;          // longest range(), as jinja2's sandbox (MAX_RANGE)
};

// A syntax or runtime error in a template: "chat template line 12: unknown filter 'foo'".
struct TemplateError : Error {
  TemplateError(const std::string& template_name, int line, const std::string& msg);
  int line;
};

// A byte range [begin, end) of rendered output.
struct Span {
  size_t begin = 0, end = 0;
};

struct Program;  // the parsed template (jinja_impl.h)

class Template {
 public:
  // Parses `source`; `name` starts every error message ("chat template line 3: ...").
  explicit Template(std::string_view source, std::string name = "template", Limits limits = {});
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;

  // Renders with the members of `vars` (a JSON object, or null) as variables. When `generation`
  // is given it receives the output ranges of {% generation %} blocks (transformers' assistant
  // masks); they are empty for templates without such blocks.
  std::string render(const nlohmann::ordered_json& vars,
                     std::vector<Span>* generation = nullptr) const;

 private:
  std::shared_ptr<const Program> prog_;
};

}  // namespace automoe::jinja
