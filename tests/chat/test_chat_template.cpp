// tests/chat/test_chat_template.cpp: ChatTemplate renders the official Qwen3 and Qwen2.5 templates
// byte-identically to transformers 5.17 (tests/fixtures/chat/chat_cases.json) and finds templates
// and special tokens the ways Hugging Face model folders store them.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "text/chat_template.h"

using automoe::ChatTemplate;
using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

namespace {

const fs::path kTokenizers = fs::path(AUTOMOE_SOURCE_DIR) / ".." / "shared" / "data" / "tokenizers";

json read_json(const fs::path& p) {
  std::ifstream in(p);
  if (!in) return json();
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

const json& fixture_cases() {
  static const json cases = [] {
    json f = read_json(fs::path(AUTOMOE_SOURCE_DIR) / "tests/fixtures/chat/chat_cases.json");
    return f.is_object() ? f["cases"] : json::array();
  }();
  return cases;
}

// "qwen3_tool_call_roundtrip_gen1_think0": template, case and flags.
std::string case_name(const json& c) {
  std::string n = c["template"].get<std::string>() + "_" + c["case"].get<std::string>();
  n += c["flags"]["add_generation_prompt"].get<bool>() ? "_gen1" : "_gen0";
  if (c["flags"].contains("enable_thinking")) n += c["flags"]["enable_thinking"].get<bool>() ? "_think1" : "_think0";
  for (char& ch : n)
    if (!isalnum((unsigned char)ch)) ch = '_';
  return n;
}

std::vector<size_t> case_indices() {
  std::vector<size_t> idx;
  for (size_t k = 0; k < fixture_cases().size(); ++k) idx.push_back(k);
  return idx;
}

const ChatTemplate* template_for(const std::string& name) {
  static std::map<std::string, std::unique_ptr<ChatTemplate>> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second.get();
  fs::path dir = kTokenizers / name;
  std::unique_ptr<ChatTemplate> t;
  if (fs::exists(dir / "chat_template.jinja")) t = std::make_unique<ChatTemplate>(ChatTemplate::load(dir.string()));
  return (cache[name] = std::move(t)).get();
}

class ChatFixture : public testing::TestWithParam<size_t> {};

TEST_P(ChatFixture, RendersLikeTransformers) {
  const json& c = fixture_cases()[GetParam()];
  const std::string name = c["template"].get<std::string>();
  const ChatTemplate* t = template_for(name);
  if (!t) GTEST_SKIP() << "no chat template at " << (kTokenizers / name).string() << " (shared data not present)";
  json extra = json::object();
  for (const auto& [k, v] : c["flags"].items())
    if (k != "add_generation_prompt") extra[k] = v;
  bool gen = c["flags"]["add_generation_prompt"].get<bool>();
  if (!c["error"].is_null()) {
    EXPECT_THROW(t->render(c["messages"], c["tools"], gen, extra), automoe::Error) << c["error"];
    return;
  }
  EXPECT_EQ(t->render(c["messages"], c["tools"], gen, extra), c["text"].get<std::string>());
}

INSTANTIATE_TEST_SUITE_P(Transformers, ChatFixture, testing::ValuesIn(case_indices()),
                         [](const testing::TestParamInfo<size_t>& p) { return case_name(fixture_cases()[p.param]); });

TEST(ChatTemplate, FixturesArePresent) { EXPECT_EQ(fixture_cases().size(), 88u); }

// A scratch model folder, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("automoe_chat_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  void write(const std::string& name, const std::string& text) const { std::ofstream(path / name) << text; }
};

TEST(ChatTemplate, SpecialTokensFromTokenizerConfig) {
  fs::path dir = kTokenizers / "qwen2.5";
  if (!fs::exists(dir / "tokenizer_config.json")) GTEST_SKIP() << "no " << (dir / "tokenizer_config.json").string();
  ChatTemplate t = ChatTemplate::load(dir.string());
  EXPECT_EQ(t.eos_token(), "<|im_end|>");
  EXPECT_EQ(t.pad_token(), "<|endoftext|>");
  EXPECT_EQ(t.bos_token(), "");  // null in the config: the template sees it undefined
  EXPECT_FALSE(t.special_tokens().contains("bos_token"));
}

TEST(ChatTemplate, LoadsTemplateFromTokenizerConfig) {
  TempDir d;
  d.write("tokenizer_config.json", R"({
    "bos_token": {"content": "<s>", "lstrip": false},
    "eos_token": "</s>",
    "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
  })");
  ChatTemplate t = ChatTemplate::load(d.path.string());
  EXPECT_EQ(t.bos_token(), "<s>");
  json msgs = json::parse(R"([{"role": "user", "content": "hi"}])");
  EXPECT_EQ(t.render(msgs, nullptr, true), "<s>[user] hi</s>[assistant]");
  EXPECT_EQ(t.render(msgs, nullptr, false), "<s>[user] hi</s>");
}

TEST(ChatTemplate, NamedTemplatesPickToolUse) {
  TempDir d;
  d.write("tokenizer_config.json", R"({"chat_template": [
    {"name": "default", "template": "plain{{ extra }}"},
    {"name": "tool_use", "template": "tools={{ tools|length }}"}]})");
  ChatTemplate t = ChatTemplate::load(d.path.string());
  json msgs = json::array();
  EXPECT_EQ(t.render(msgs, nullptr, false, {{"extra", "!"}}), "plain!");
  EXPECT_EQ(t.render(msgs, json::array({json::object()}), false), "tools=1");
}

TEST(ChatTemplate, JinjaFileWinsOverConfig) {
  TempDir d;
  d.write("tokenizer_config.json", R"({"chat_template": "from config", "eos_token": "E"})");
  d.write("chat_template.jinja", "from file {{ eos_token }}\n");
  EXPECT_EQ(ChatTemplate::load(d.path.string()).render(json::array(), nullptr, false), "from file E");
}

TEST(ChatTemplate, ErrorsAreClear) {
  TempDir d;
  try {
    ChatTemplate::load(d.path.string());
    FAIL() << "loaded a folder without a template";
  } catch (const automoe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no chat template in"), std::string::npos) << e.what();
  }
  d.write("chat_template.jinja", "{% for m in messages %}\n{{ m.content | shout }}\n{% endfor %}");
  try {
    ChatTemplate::load(d.path.string());
    FAIL() << "parsed an unknown filter";
  } catch (const automoe::Error& e) {
    EXPECT_EQ(std::string(e.what()), "chat template line 2: unknown filter 'shout'");
  }
  ChatTemplate t(std::map<std::string, std::string>{{"default", "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"}});
  try {
    t.render(json::parse(R"([{"role": "assistant", "content": "x"}])"), nullptr, false);
    FAIL();
  } catch (const automoe::Error& e) {
    EXPECT_EQ(std::string(e.what()), "chat template line 1: first message must be from the user");
  }
}

}  // namespace
