// tools/automoe/cmd_encode.cpp: `automoe encode --tokenizer PATH [--add-special-tokens]`: reads
// all of stdin as UTF-8 text (byte for byte, nothing stripped) and prints its token ids on one
// line, separated by spaces. With `--chat FILE.json` ({"messages": [...], "tools": [...]}) it
// renders the chat template beside the tokenizer, prints the text, a newline, then the ids line.
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "core/check.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace automoe::cli {

void add_encode(CLI::App& app, Runners& runners) {
  auto* cmd = app.add_subcommand("encode", "Tokenize UTF-8 text from stdin; print the token ids on one line");
  struct Opts {
    std::string tokenizer, chat, thinking;
    bool add_special = false, gen_prompt = false;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "tokenizer.json, or a directory with tokenizer.json or vocab.json + merges.txt")->required();
  cmd->add_flag("--add-special-tokens", o->add_special, "apply the tokenizer's post-processor (e.g. add BOS)");
  cmd->add_option("--chat", o->chat, "render {\"messages\", \"tools\"} from this JSON file with the chat template");
  cmd->add_flag("--add-generation-prompt", o->gen_prompt, "with --chat: end with the assistant prompt");
  cmd->add_option("--enable-thinking", o->thinking, "with --chat: true | false, passed to the template")
      ->check(CLI::IsMember({"true", "false"}));
  runners.push_back([cmd, o]() -> int {
    if (!cmd->parsed()) return -1;
    Tokenizer tok = Tokenizer::load(o->tokenizer);
    std::string text;
    if (!o->chat.empty()) {
      namespace fs = std::filesystem;
      std::ifstream f(o->chat);
      AM_CHECK(f.good(), "cannot open chat file '{}'", o->chat);
      std::stringstream ss;
      ss << f.rdbuf();
      nlohmann::ordered_json j;
      try {
        j = nlohmann::ordered_json::parse(ss.str());
      } catch (const std::exception& e) {
        AM_FAIL("chat file '{}' is not valid JSON ({})", o->chat, e.what());
      }
      AM_CHECK(j.is_object() && j.contains("messages"), "chat file '{}' must be an object with \"messages\"", o->chat);
      std::string dir = fs::is_directory(o->tokenizer) ? o->tokenizer : fs::path(o->tokenizer).parent_path().string();
      ChatTemplate chat = ChatTemplate::load(dir.empty() ? "." : dir);
      nlohmann::ordered_json vars = nullptr;
      if (!o->thinking.empty()) vars = {{"enable_thinking", o->thinking == "true"}};
      text = chat.render(j["messages"], j.contains("tools") ? j["tools"] : nlohmann::ordered_json(nullptr),
                         o->gen_prompt, vars);
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fputc('\n', stdout);
    } else {
      char buf[1 << 16];
      for (size_t n; (n = std::fread(buf, 1, sizeof buf, stdin)) > 0;) text.append(buf, n);
      AM_CHECK(!std::ferror(stdin), "reading the text to encode from stdin failed");
    }
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
