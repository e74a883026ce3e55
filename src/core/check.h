// core/check.h: the one family of error checks. The library throws automoe::Error with
// file:line and a sentence saying what is wrong and what to do; the CLI prints it and exits 1.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace automoe {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail_at(const char* file, int line, const std::string& msg) {
  // Keep only the path below src/ or tools/ so messages stay short.
  std::string f(file);
  for (const char* root : {"/src/", "/tools/", "/tests/"}) {
    auto p = f.rfind(root);
    if (p != std::string::npos) { f = f.substr(p + 1); break; }
  }
  throw Error(msg + "  [" + f + ":" + std::to_string(line) + "]");
}

}  // namespace automoe

// AM_CHECK(cond, "format {}", args...): user-facing check, always on.
#define AM_CHECK(cond, ...)                                                \
  do {                                                                     \
    if (!(cond)) ::automoe::fail_at(__FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)
#define AM_FAIL(...) ::automoe::fail_at(__FILE__, __LINE__, fmt::format(__VA_ARGS__))
