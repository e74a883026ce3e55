// tools/automoe/cmd_encode.cpp: `automoe encode --tokenizer PATH [--add-special-tokens]`: reads
// all of stdin as UTF-8 text (byte for byte, nothing stripped) and prints its token ids on one
// line, separated by spaces.
#include <fmt/format.h>

#include <cstdio>

#include "commands.h"
#include "core/check.h"
#include "text/tokenizer.h"

namespace automoe::cli {

void add_encode(CLI::App& app, Runners& runners) {
  auto* cmd = app.add_subcommand("encode", "Tokenize UTF-8 text from stdin; print the token ids on one line");
  struct Opts {
    std::string tokenizer;
    bool add_special = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "tokenizer.json, or a directory with tokenizer.json or vocab.json + merges.txt")->required();
  cmd->add_flag("--add-special-tokens", o->add_special, "apply the tokenizer's post-processor (e.g. add BOS)");
  runners.push_back([cmd, o]() -> int {
    if (!cmd->parsed()) return -1;
    Tokenizer tok = Tokenizer::load(o->tokenizer);
    std::string text;
    char buf[1 << 16];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, stdin)) > 0;) text.append(buf, n);
    AM_CHECK(!std::ferror(stdin), "reading the text to encode from stdin failed");
    std::vector<int32_t> ids = tok.encode(text, o->add_special);
    std::string out;
    out.reserve(ids.size() * 7 + 1);
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ' ';
      fmt::format_int f(ids[i]);
      out.append(f.data(), f.size());
    }
    out += '\n';
    std::fwrite(out.data(), 1, out.size(), stdout);
    return 0;
  });
}

}  // namespace automoe::cli
