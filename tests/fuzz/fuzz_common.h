// tests/fuzz/fuzz_common.h: helpers shared by the libFuzzer targets: a per-process scratch file
// (the loaders under test read paths, as users give them) and the real tokenizers' directory.
#pragma once
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace fuzz {

// Writes `bytes` to /tmp/automoe_fuzz_<pid>/<name> (created once) and returns the path.
inline std::string scratch_file(const std::string& name, std::string_view bytes) {
  static const std::string dir = [] {
    std::string d = "/tmp/automoe_fuzz_" + std::to_string(getpid());
    std::string cmd = "mkdir -p " + d;
    if (std::system(cmd.c_str()) != 0) std::abort();
    return d;
  }();
  const std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) std::abort();
  std::fclose(f);
  return path;
}

// ../shared/data/tokenizers (AUTOMOE_TOKENIZERS overrides); run_fuzz.sh checks it exists.
inline std::string tokenizers_dir() {
  const char* env = std::getenv("AUTOMOE_TOKENIZERS");
  return env ? env : AUTOMOE_SOURCE_DIR "/../shared/data/tokenizers";
}

}  // namespace fuzz
