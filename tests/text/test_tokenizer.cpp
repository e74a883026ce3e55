// tests/text/test_tokenizer.cpp: the byte-level BPE tokenizer against llama.cpp's Qwen2 vectors
// and against HF `tokenizers` (one Python run over every text of the SFT data with six tokenizers:
// Qwen3 tokenizer.json, Qwen2.5 and GPT-2 slow files, two Qwen3 variants covering added-token
// flags, templates, DeepSeek-style and unusual splits, and GPT-2 with add_prefix_space saved by HF
// as tokenizer.json), decode round trips, NFC, the `automoe encode` CLI, and load errors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/check.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

using automoe::Tokenizer;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const fs::path kData = fs::path(AUTOMOE_SOURCE_DIR) / ".." / "shared" / "data";

#define REQUIRE_DATA()                                                                              \
  if (!fs::exists(kData / "tokenizers" / "qwen3" / "tokenizer.json"))                               \
  GTEST_SKIP() << "shared test data not found at " << kData.string()                                \
               << " (tokenizers/, tokenizer-vectors/, sft/); these tests need the shared/ checkout"

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
void spit(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

const Tokenizer& qwen3() {
  static const Tokenizer t = Tokenizer::load((kData / "tokenizers/qwen3/tokenizer.json").string());
  return t;
}
const Tokenizer& qwen25() {
  static const Tokenizer t = Tokenizer::load((kData / "tokenizers/qwen2.5").string());
  return t;
}
const Tokenizer& gpt2() {
  static const Tokenizer t = Tokenizer::load((kData / "tokenizers/gpt2").string());
  return t;
}

// A fresh temporary directory, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("automoe_tok_" + std::to_string(getpid()) + "_" + std::to_string(n++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const automoe::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected automoe::Error";
  return "";
}

// llama.cpp's vectors: `.inp` holds strings each followed by "\n__ggml_vocab_test__\n"; `.out`
// one line of ids per string.
std::vector<std::pair<std::string, std::vector<int32_t>>> qwen2_vectors() {
  fs::path base = kData / "tokenizer-vectors" / "ggml-vocab-qwen2.gguf";
  std::string inp = slurp(base.string() + ".inp"), sep = "\n__ggml_vocab_test__\n";
  std::istringstream out(slurp(base.string() + ".out"));
  std::vector<std::pair<std::string, std::vector<int32_t>>> v;
  for (size_t pos = 0, at; (at = inp.find(sep, pos)) != std::string::npos; pos = at + sep.size()) {
    std::string line;
    std::getline(out, line);
    std::istringstream ids(line);
    std::vector<int32_t> want;
    for (int32_t id; ids >> id;) want.push_back(id);
    v.push_back({inp.substr(pos, at - pos), want});
  }
  return v;
}

TEST(Tokenizer, Qwen2VectorsWithQwen3Json) {
  REQUIRE_DATA();
  auto v = qwen2_vectors();
  ASSERT_EQ(v.size(), 46u);
  for (auto& [text, want] : v) EXPECT_EQ(qwen3().encode(text), want) << "text: '" << text << "'";
}

TEST(Tokenizer, Qwen2VectorsWithQwen25SlowFiles) {
  REQUIRE_DATA();
  for (auto& [text, want] : qwen2_vectors()) EXPECT_EQ(qwen25().encode(text), want) << "text: '" << text << "'";
}

TEST(Tokenizer, SpecialTokensVocabAndDecode) {
  REQUIRE_DATA();
  const Tokenizer& t = qwen3();
  EXPECT_EQ(t.vocab_size(), 151669);
  EXPECT_EQ(t.token_to_id("<|im_end|>"), 151645);
  EXPECT_EQ(t.token_to_id("Ġthe"), 279);
  EXPECT_EQ(t.id_to_token(279), "Ġthe");
  EXPECT_EQ(t.token_to_id("not a token"), -1);
  EXPECT_TRUE(t.is_special(151644));
  EXPECT_FALSE(t.is_special(279));
  std::string chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
  std::vector<int32_t> ids = t.encode(chat);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151645), 1);
  EXPECT_EQ(t.decode(ids), chat);
  EXPECT_EQ(t.decode(ids, true), "user\nHi there\nassistant\n");
  EXPECT_EQ(t.encode(chat, true), ids);  // Qwen's post-processor adds nothing
  // A partial multi-byte character decodes to U+FFFD; ids past the vocab are dropped.
  std::vector<int32_t> euro = t.encode("€");
  ASSERT_GT(euro.size(), 0u);
  EXPECT_EQ(t.decode({euro[0], 1 << 20}), euro.size() == 1 ? "€" : "\xEF\xBF\xBD");
  // Slow files: special tokens from tokenizer_config.json.
  EXPECT_EQ(qwen25().eos_id(), 151645);
  EXPECT_EQ(qwen25().pad_id(), 151643);
  EXPECT_EQ(qwen25().bos_id(), -1);
  EXPECT_EQ(gpt2().eos_token(), "<|endoftext|>");
  EXPECT_EQ(gpt2().eos_id(), 50256);
  EXPECT_EQ(gpt2().encode("a<|endoftext|>b"), (std::vector<int32_t>{64, 50256, 65}));
}

TEST(Tokenizer, Nfc) {
  using automoe::unicode::nfc;
  using automoe::unicode::nfc_needed;
  EXPECT_FALSE(nfc_needed("plain ascii"));
  EXPECT_FALSE(nfc_needed("caf\u00e9 \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627 \U0001F600"));
  EXPECT_EQ(nfc("cafe\u0301!"), "caf\u00e9!");
  EXPECT_EQ(nfc("\u212b"), "\u00c5");                             // singleton
  EXPECT_EQ(nfc("\u1100\u1161\u11a8x"), "\uac01x");              // Hangul L V T
  EXPECT_EQ(nfc("q\u0307\u0323"), "q\u0323\u0307");              // canonical reordering
  EXPECT_EQ(nfc("a\u0301\u0301"), "\u00e1\u0301");               // the second accent stays
  EXPECT_EQ(nfc("\u0958"), "\u0915\u093c");                      // composition exclusion
  EXPECT_EQ(nfc("\u00e9\u0323"), "\u1eb9\u0301");                // recomposition after reordering
}

// Every string of the SFT data (gsm8k test split, sharegpt, alpaca, toolcall) plus hard cases.
std::vector<std::string> parity_texts() {
  std::vector<std::string> texts;
  std::function<void(const json&)> walk = [&](const json& j) {
    if (j.is_string()) texts.push_back(j.get<std::string>());
    else if (j.is_structured())
      for (const json& x : j) walk(x);
  };
  std::istringstream gsm(slurp(kData / "sft/gsm8k/test.jsonl"));
  for (std::string line; std::getline(gsm, line);)
    if (!line.empty()) walk(json::parse(line));
  for (const char* f : {"sft/sharegpt/dummy_conversation.json", "sft/alpaca/alpaca_en_demo.json",
                        "sft/toolcall/glaive_toolcall_en_demo.json"})
    walk(json::parse(slurp(kData / f)));
  for (const char* s : {
           "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>",
           "<|endoftext|><|endoftext|>x",
           "cafe\u0301 re\u0301sume\u0301 \u212b \u1100\u1161\u11a8",
           "a\r\nb\r\n\r\n  \n\t\tc   ",
           "line\u0085next\u2028sep\u00a0nbsp a\u0085!",
           "I'M HERE, you'LL see... it's DONE'S",
           "12345678901234567890 3.14159 \u0661\u0662\u0663",
           "\U0001F600\U0001F44D\U0001F3FD x",
           "                                                                   end",
           "<tok> <tok>x x<tok> <mask>  y zqzq zqzqy  zqzq\n",
           "x zqzq_y azqzq zqzq. \u00e9 zqzq\u4e2dzqzq \u4e2d zqzq",
           "[INST]  hi  [INST]\n",
       })
    texts.push_back(s);
  // Long pre-tokens (beyond the BPE cache's piece limit): one letter repeated, and random letters.
  texts.push_back(std::string(3000, 'a'));
  std::string noise;
  for (uint32_t x = 1, i = 0; i < 5000; ++i) x = x * 1664525u + 1013904223u, noise += char('a' + (x >> 24) % 26);
  texts.push_back(noise);
  return texts;
}

constexpr const char* kHfScript = R"PY(
import json, sys
from tokenizers import Tokenizer, AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
texts, out, data = json.load(open(sys.argv[1], encoding="utf-8")), sys.argv[2], sys.argv[3]
QWEN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
def slow(d, qwen):  # what transformers' converters build from vocab.json + merges.txt
    t = Tokenizer(models.BPE.from_file(f"{d}/vocab.json", f"{d}/merges.txt"))
    if qwen:
        t.normalizer = normalizers.NFC()
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    cfg = json.load(open(f"{d}/tokenizer_config.json"))
    added = [AddedToken(v["content"], single_word=v["single_word"], lstrip=v["lstrip"], rstrip=v["rstrip"],
                        normalized=v["normalized"], special=v["special"])
             for _, v in sorted(cfg.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))]
    specials = [cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)]
    t.add_special_tokens(added + [AddedToken(s, special=True, normalized=False) for s in specials])
    return t
toks = {"qwen3": (Tokenizer.from_file(f"{data}/tokenizers/qwen3/tokenizer.json"), False),
        "qwen2.5": (slow(f"{data}/tokenizers/qwen2.5", True), False),
        "gpt2": (slow(f"{data}/tokenizers/gpt2", False), False),
        "flags": (Tokenizer.from_file(sys.argv[4]), True),
        "splits": (Tokenizer.from_file(sys.argv[5]), False)}
prefixed = slow(f"{data}/tokenizers/gpt2", False)  # ByteLevel with add_prefix_space, saved as tokenizer.json
prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
prefixed.save(sys.argv[6])
toks["gpt2-prefix"] = (prefixed, False)
res = {name: [e.ids for e in t.encode_batch(texts, add_special_tokens=special)] for name, (t, special) in toks.items()}
json.dump(res, open(out, "w"))
)PY";

// Variants of the Qwen3 tokenizer.json, written to dir: "flags" has added tokens exercising lstrip,
// rstrip, single_word and normalized, a TemplateProcessing post-processor that adds <|endoftext|>
// in front, DeepSeek-V3's pre-tokenizer and Llama-3's ignore_merges; "splits" has Splits with
// every delimiter behaviour, literal patterns and invert.
void write_variants(const fs::path& dir) {
  const json qwen3 = json::parse(slurp(kData / "tokenizers/qwen3/tokenizer.json"));
  json j = qwen3;
  auto add = [&](int id, const char* content, bool special, bool lstrip, bool rstrip, bool single_word, bool normalized) {
    j["added_tokens"].push_back({{"id", id}, {"content", content}, {"single_word", single_word}, {"lstrip", lstrip},
                                 {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}});
  };
  add(151669, "<mask>", true, true, false, false, false);
  add(151670, "<tok>", false, false, true, false, true);
  add(151671, "zqzq", false, false, false, true, true);  // not in the vocab
  add(151672, "[INST]", true, true, true, false, false);
  add(151673, "re\u0301sume\u0301", false, false, false, false, true);
  j["post_processor"] = json::parse(R"({"type": "Sequence", "processors": [
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
       "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
       "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}}]})");
  auto split = [](const char* kind, const std::string& pattern, const char* behavior, bool invert = false) {
    return json{{"type", "Split"}, {"pattern", {{kind, pattern}}}, {"behavior", behavior}, {"invert", invert}};
  };
  json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {
      split("Regex", R"(\p{N}{1,3})", "Isolated"),
      split("Regex", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", "Isolated"),
      split("Regex", R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|)"
                     R"( ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)", "Isolated"),
      byte_level}}};
  j["model"]["ignore_merges"] = true;
  spit(dir / "flags.json", j.dump());
  j = qwen3;
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {
      split("String", ".", "MergedWithPrevious"), split("String", ",", "MergedWithNext"),
      split("Regex", R"(\d+)", "Contiguous", true), split("String", "-", "Removed"),
      split("Regex", R"(\s+)", "Isolated", true), byte_level}}};
  spit(dir / "splits.json", j.dump());
}

TEST(Tokenizer, MatchesHfTokenizersOnSftData) {
  REQUIRE_DATA();
  if (std::system("python3 -c 'import tokenizers' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with the `tokenizers` module is not available (pip install tokenizers)";
  TempDir tmp;
  std::vector<std::string> texts = parity_texts();
  ASSERT_GT(texts.size(), 5000u);
  spit(tmp.path / "texts.json", json(texts).dump());
  spit(tmp.path / "hf.py", kHfScript);
  write_variants(tmp.path);
  std::string cmd = "TOKENIZERS_PARALLELISM=true python3 " + (tmp.path / "hf.py").string();
  for (const char* f : {"texts.json", "ids.json", "", "flags.json", "splits.json", "gpt2_prefix.json"})
    cmd += " " + (*f ? (tmp.path / f).string() : kData.string());
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  json hf = json::parse(slurp(tmp.path / "ids.json"));
  Tokenizer flags = Tokenizer::load((tmp.path / "flags.json").string()),
            splits = Tokenizer::load((tmp.path / "splits.json").string()),
            prefixed = Tokenizer::load((tmp.path / "gpt2_prefix.json").string());
  std::vector<std::tuple<std::string, const Tokenizer*, bool>> cases = {
      {"qwen3", &qwen3(), false}, {"qwen2.5", &qwen25(), false}, {"gpt2", &gpt2(), false},
      {"flags", &flags, true},    {"splits", &splits, false},   {"gpt2-prefix", &prefixed, false}};
  for (auto& [name, tok, special] : cases) {
    int mismatches = 0, bad_roundtrips = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<int32_t> ids = tok->encode(texts[i], special);
      auto want = hf[name][i].get<std::vector<int32_t>>();
      if (ids != want && ++mismatches <= 5)
        ADD_FAILURE() << name << ": text " << i << " '" << texts[i].substr(0, 200) << "' encodes differently from HF";
      std::string back = tok->decode(ids, special);
      bool lossless = name == "qwen3" || name == "qwen2.5" || name == "gpt2";  // the variants add, strip or drop text
      if (lossless && back != texts[i] && !automoe::unicode::nfc_needed(texts[i]) && ++bad_roundtrips <= 5)
        ADD_FAILURE() << name << ": decode(encode(x)) != x for text " << i << " '" << texts[i].substr(0, 200) << "'";
    }
    EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << texts.size() << " texts differ from HF";
    EXPECT_EQ(bad_roundtrips, 0) << name;
  }
  // The BOS template applies only when asked.
  EXPECT_EQ(flags.encode("hi", true), (std::vector<int32_t>{151643, 6023}));
  EXPECT_EQ(flags.encode("hi", false), (std::vector<int32_t>{6023}));
}

TEST(Tokenizer, EncodeCli) {
  REQUIRE_DATA();
  TempDir tmp;
  std::string text = "Hello world!\n<|im_end|>\n  trailing newline kept\n\n";
  spit(tmp.path / "in.txt", text);
  std::string cmd = std::string(AUTOMOE_CLI) + " encode --tokenizer " + (kData / "tokenizers/qwen3").string() + " < " +
                    (tmp.path / "in.txt").string() + " > " + (tmp.path / "out.txt").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::istringstream got(slurp(tmp.path / "out.txt"));
  std::vector<int32_t> ids;
  for (int32_t id; got >> id;) ids.push_back(id);
  EXPECT_EQ(ids, qwen3().encode(text));
  EXPECT_EQ(qwen3().decode(ids), text);
}

TEST(Tokenizer, LoadErrorsNameFileAndProblem) {
  TempDir tmp;
  auto err = [&](const std::string& json_text) {
    fs::path p = tmp.path / "tokenizer.json";
    spit(p, json_text);
    return expect_error([&] { Tokenizer::load(p.string()); });
  };
  std::string e = err(R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
  EXPECT_NE(e.find("WordPiece"), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer.json"), std::string::npos) << e;
  e = err(R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})");
  EXPECT_NE(e.find("Unigram"), std::string::npos) << e;
  e = err(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}})");
  EXPECT_NE(e.find("Metaspace"), std::string::npos) << e;
  e = err(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, "pre_tokenizer": {"type": "ByteLevel"}})");
  EXPECT_NE(e.find("not in the vocab"), std::string::npos) << e;
  e = err(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": {"type": "Lowercase"}})");
  EXPECT_NE(e.find("Lowercase"), std::string::npos) << e;
  e = err(R"({"model": {"type": "BPE", "vocab": )");
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer.json"), std::string::npos) << e;
  e = err(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Split",
           "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}})");
  EXPECT_NE(e.find("does not compile"), std::string::npos) << e;
  e = expect_error([&] { Tokenizer::load((tmp.path / "nope.json").string()); });
  EXPECT_NE(e.find("nope.json does not exist"), std::string::npos) << e;
  fs::create_directories(tmp.path / "empty");
  spit(tmp.path / "empty" / "tokenizer.model", "x");
  e = expect_error([&] { Tokenizer::load((tmp.path / "empty").string()); });
  EXPECT_NE(e.find("no tokenizer.json"), std::string::npos) << e;
  EXPECT_NE(e.find("SentencePiece"), std::string::npos) << e;
  // Slow files: a merge line with three parts, an unsupported tokenizer class.
  fs::create_directories(tmp.path / "slow");
  spit(tmp.path / "slow" / "vocab.json", R"({"a": 0, "b": 1, "ab": 2})");
  spit(tmp.path / "slow" / "merges.txt", "#version: 0.2\r\na b\r\na b c\r\n");
  e = expect_error([&] { Tokenizer::load((tmp.path / "slow").string()); });
  EXPECT_NE(e.find("merges.txt line 3"), std::string::npos) << e;
  spit(tmp.path / "slow" / "merges.txt", "#version: 0.2\r\na b\r\n");
  EXPECT_EQ(Tokenizer::load((tmp.path / "slow").string()).encode("abba"), (std::vector<int32_t>{2, 1, 0}));
  spit(tmp.path / "slow" / "tokenizer_config.json", R"({"tokenizer_class": "BertTokenizer"})");
  e = expect_error([&] { Tokenizer::load((tmp.path / "slow").string()); });
  EXPECT_NE(e.find("BertTokenizer"), std::string::npos) << e;
}

TEST(Tokenizer, InvalidUtf8IsAnError) {
  REQUIRE_DATA();
  std::string e = expect_error([&] { qwen3().encode("ok \xff bad"); });
  EXPECT_NE(e.find("not valid UTF-8"), std::string::npos) << e;
  EXPECT_NE(e.find("offset 3"), std::string::npos) << e;
  expect_error([&] { qwen3().encode("\xed\xa0\x80"); });  // a UTF-16 surrogate
  expect_error([&] { qwen3().encode("\xc0\xaf"); });      // overlong
  EXPECT_EQ(automoe::unicode::utf8_lossy("a\xff" "b\xe2\x82"), "a\xEF\xBF\xBD" "b\xEF\xBF\xBD");
}

}  // namespace
