// text/tokenizer.cpp: byte-level BPE as HF `tokenizers` runs it: added tokens split off the raw
// text, NFC, pre-token regexes (PCRE2 with UTF+UCP, JIT), byte-level BPE, post-processor.
// BPE works on raw bytes: vocab strings are mapped back from the GPT-2 byte alphabet at load,
// so no text is ever converted to that alphabet, and results are cached per pre-token.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "text/tokenizer.h"

#include <fmt/format.h>
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <deque>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "core/check.h"
#include "text/unicode.h"

namespace automoe {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// GPT-2's ByteLevel pre-tokenizer pattern (used when ByteLevel has use_regex) and Qwen2's split
// pattern (what transformers' Qwen2 converter puts in tokenizer.json for the slow files).
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, SvHash, std::equal_to<>>;

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  AM_CHECK(f, "cannot open {}: check that the file exists and is readable", p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json read_json(const fs::path& p) {
  std::string s = read_file(p);
  try {
    return json::parse(s);
  } catch (const json::exception& e) {
    AM_FAIL("{} is not valid JSON ({}); re-download or fix the file", p.string(), e.what());
  }
}

// The vocab and merges are most of a tokenizer.json (300k entries): they are streamed into flat
// vectors instead of a JSON tree, and left null in the tree that holds the rest of the file.
// With root_is_vocab the whole document is the vocab (vocab.json).
struct VocabMerges {
  std::vector<std::pair<std::string, int64_t>> vocab;  // id -1: not an integer
  std::vector<std::string> merge_parts;                // "a b" lines or a, b pairs ...
  std::vector<uint8_t> merge_sizes;                    // ... one or two parts per merge
};

class TokenizerSax : public nlohmann::json_sax<json> {
 public:
  TokenizerSax(json& root, VocabMerges& out, bool root_is_vocab) : dom_(root), out_(out), root_vocab_(root_is_vocab) {}

  bool start_object(std::size_t n) override {
    if (mode_ != kNone) return fail_shape();
    ++depth_;
    if ((root_vocab_ && depth_ == 1) || pending_ == kVocab) {
      mode_ = kVocab, pending_ = kNone, cap_depth_ = depth_;
      return true;
    }
    if (pending_ == kModel) model_depth_ = depth_;
    pending_ = kNone;
    return dom_.start_object(n);
  }
  bool end_object() override {
    --depth_;
    if (mode_ == kVocab && depth_ + 1 == cap_depth_) return mode_ = kNone, root_vocab_ || dom_.null();
    if (depth_ + 1 == model_depth_) model_depth_ = -1;
    return dom_.end_object();
  }
  bool start_array(std::size_t n) override {
    ++depth_;
    if (mode_ == kMerges) { out_.merge_sizes.push_back(0); return true; }
    if (mode_ != kNone) return fail_shape();
    if (pending_ == kMerges) return mode_ = kMerges, pending_ = kNone, cap_depth_ = depth_, true;
    pending_ = kNone;
    return dom_.start_array(n);
  }
  bool end_array() override {
    --depth_;
    if (mode_ == kMerges) return depth_ + 1 == cap_depth_ ? (mode_ = kNone, dom_.null()) : true;
    return dom_.end_array();
  }
  bool key(string_t& k) override {
    if (mode_ == kVocab) { out_.vocab.emplace_back(std::move(k), -1); return true; }
    pending_ = depth_ == 1 && k == "model" ? kModel : depth_ == model_depth_ && k == "vocab" ? kVocab
             : depth_ == model_depth_ && k == "merges" ? kMerges : kNone;
    return dom_.key(k);
  }
  bool string(string_t& v) override {
    if (mode_ == kMerges) {
      if (depth_ == cap_depth_) out_.merge_sizes.push_back(1);
      else ++out_.merge_sizes.back();
      out_.merge_parts.push_back(std::move(v));
      return true;
    }
    return mode_ == kVocab || (clear(), dom_.string(v));
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (mode_ == kVocab) { out_.vocab.back().second = v < (1u << 30) ? int64_t(v) : -1; return true; }
    return mode_ == kMerges ? fail_shape() : (clear(), dom_.number_unsigned(v));
  }
  bool null() override { return scalar([&] { return dom_.null(); }); }
  bool boolean(bool v) override { return scalar([&] { return dom_.boolean(v); }); }
  bool number_integer(number_integer_t v) override { return scalar([&] { return dom_.number_integer(v); }); }
  bool number_float(number_float_t v, const string_t& s) override {
    return scalar([&] { return dom_.number_float(v, s); });
  }
  bool binary(binary_t& v) override { return scalar([&] { return dom_.binary(v); }); }
  bool parse_error(std::size_t pos, const std::string& tok, const nlohmann::detail::exception& e) override {
    return dom_.parse_error(pos, tok, e);
  }

 private:
  enum Mode { kNone, kModel, kVocab, kMerges };
  void clear() { pending_ = kNone; }
  bool fail_shape() { throw json::other_error::create(501, "model.vocab must map tokens to ids and model.merges "
                                                           "must list strings or pairs of strings", nullptr); }
  template <class F>
  bool scalar(F&& f) {
    if (mode_ == kVocab) return true;  // the id stays -1: reported when the vocab is read
    if (mode_ == kMerges) return fail_shape();
    clear();
    return f();
  }
  nlohmann::detail::json_sax_dom_parser<json> dom_;
  VocabMerges& out_;
  bool root_vocab_;
  Mode mode_ = kNone, pending_ = kNone;
  int depth_ = 0, model_depth_ = -1, cap_depth_ = -1;
};

// Reads a tokenizer.json (or, with root_is_vocab, a vocab.json) with its vocab and merges streamed.
json read_tokenizer_json(const fs::path& p, VocabMerges& vm, bool root_is_vocab) {
  std::string s = read_file(p);
  json root;
  try {
    TokenizerSax sax(root, vm, root_is_vocab);
    json::sax_parse(s, &sax);
  } catch (const json::exception& e) {
    AM_FAIL("{} is not valid JSON or not shaped like a tokenizer file ({}); re-download or fix it", p.string(),
            e.what());
  }
  return root;
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 become U+0100...
struct ByteAlphabet {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};
  ByteAlphabet() {
    to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      to_cp[b] = printable ? uint32_t(b) : next++;
      to_byte[to_cp[b]] = int16_t(b);
    }
  }
  // The raw bytes a vocab string stands for; false when it has chars outside the alphabet.
  bool to_bytes(std::string_view tok, std::string& out) const {
    out.clear();
    for (size_t i = 0; i < tok.size();) {
      uint32_t cp = unicode::utf8_next(tok, i);
      if (cp >= to_byte.size() || to_byte[cp] < 0) return false;
      out += char(to_byte[cp]);
    }
    return true;
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

// Oniguruma's \s (what HF uses) is Unicode White_Space, which has U+0085; PCRE2's does not.
std::string onig_to_pcre2(std::string_view p) {
  std::string out;
  int depth = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char n = p[++i];
      if (n == 's') out += depth ? "\\s\\x{85}" : "[\\s\\x{85}]";
      else if (n == 'S' && !depth) out += "[^\\s\\x{85}]";
      else out += c, out += n;
      continue;
    }
    if (c == '[') ++depth;
    if (c == ']' && depth) --depth;
    out += c;
  }
  return out;
}

// A compiled PCRE2 pattern; each thread matches with its own match data and JIT stack.
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& file) {
    int err = 0;
    PCRE2_SIZE at = 0;
    std::string p = literal ? pattern : onig_to_pcre2(pattern);
    uint32_t opts = PCRE2_UTF | PCRE2_NO_UTF_CHECK | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(), opts, &err, &at, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      AM_FAIL("{}: the pre-tokenizer pattern /{}/ does not compile with PCRE2 at offset {}: {}", file, pattern, at,
              reinterpret_cast<char*>(msg));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls f(begin, end) for each non-empty match in s, left to right, without overlap.
  template <class F>
  void for_each_match(std::string_view s, F&& f) const {
    struct Tls {
      pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
      pcre2_match_context* mc = pcre2_match_context_create(nullptr);
      pcre2_jit_stack* js = pcre2_jit_stack_create(32 << 10, 8 << 20, nullptr);
      Tls() { pcre2_jit_stack_assign(mc, nullptr, js); }
      ~Tls() { pcre2_match_data_free(md), pcre2_match_context_free(mc), pcre2_jit_stack_free(js); }
    };
    thread_local Tls t;
    auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    for (size_t off = 0; off < s.size();) {
      int rc = jit_ ? pcre2_jit_match(code_, subject, s.size(), off, PCRE2_NO_UTF_CHECK, t.md, t.mc)
                    : pcre2_match(code_, subject, s.size(), off, PCRE2_NO_UTF_CHECK, t.md, t.mc);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      AM_CHECK(rc >= 0, "pre-tokenizer regex failed with PCRE2 error {} on a {}-byte piece of text", rc, s.size());
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(t.md);
      if (ov[1] == ov[0]) {  // an empty match: step over one char
        off = ov[1] + 1;
        while (off < s.size() && (uint8_t(s[off]) & 0xC0) == 0x80) ++off;
        continue;
      }
      f(size_t(ov[0]), size_t(ov[1]));
      off = ov[1];
    }
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// One pre-tokenizer step: a Split, or ByteLevel (optional prefix space, optional GPT-2 regex).
struct PreStep {
  std::shared_ptr<Regex> re;  // null: no splitting
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool prefix_space = false;
};

// (a, b) -> (rank, merged id), open addressing on the key a << 32 | b.
class MergeMap {
 public:
  struct Slot {
    uint64_t key = ~0ull;
    int32_t rank = 0, id = 0;
  };
  void reserve(size_t n) {
    bits_ = 4;
    while ((size_t(1) << bits_) < 2 * n) ++bits_;
    slots_.assign(size_t(1) << bits_, {});
  }
  void put(int32_t a, int32_t b, int32_t rank, int32_t id) {  // a later duplicate wins, as in HF
    uint64_t k = key(a, b);
    size_t i = index(k);
    while (slots_[i].key != ~0ull && slots_[i].key != k) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = {k, rank, id};
  }
  const Slot* find(int32_t a, int32_t b) const {
    uint64_t k = key(a, b);
    for (size_t i = index(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].key == k) return &slots_[i];
      if (slots_[i].key == ~0ull) return nullptr;
    }
  }

 private:
  static uint64_t key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }
  size_t index(uint64_t k) const { return size_t((k * 0x9E3779B97F4A7C15ull) >> (64 - bits_)); }
  std::vector<Slot> slots_;
  int bits_ = 4;
};

struct AddedToken {
  std::string content, match;  // match: the content as searched (NFC'd when normalized)
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// Added tokens of one kind (matched on raw or on normalised text), indexed by first byte,
// longest first so the first hit at a position is the leftmost-longest match.
struct AddedMatcher {
  std::array<std::vector<int>, 256> by_first;
  bool empty = true;
};

std::atomic<uint64_t> g_next_uid{1};

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  uint64_t uid = g_next_uid++;  // names this tokenizer's per-thread BPE caches
  // vocab
  StrMap<int32_t> vocab;                  // vocab string -> id
  StrMap<int32_t> vocab_bytes;            // raw bytes -> id (for ignore_merges)
  std::vector<std::string> id_token;      // id -> vocab/added string
  std::vector<std::string> id_bytes;      // id -> bytes it decodes to
  std::vector<uint8_t> id_special;        // id -> special added token
  std::array<int32_t, 256> byte_id{};     // single-byte tokens, -1 when absent
  MergeMap merges;
  bool ignore_merges = false;
  // pipeline
  std::vector<AddedToken> added;
  AddedMatcher raw_added, norm_added;
  StrMap<int32_t> added_by_content;
  bool nfc = false;
  std::vector<PreStep> steps;
  std::shared_ptr<Regex> word_re;  // \w for single_word added tokens
  std::vector<int32_t> prefix, suffix;  // post-processor ids around a single sequence
  // special tokens from tokenizer_config.json
  std::string bos, eos, pad;
  int32_t bos_id = -1, eos_id = -1, pad_id = -1;

  void encode(std::string_view text, bool add_special, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view seg, std::vector<int32_t>& out) const;
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  template <class OnText>
  void split_added(std::string_view s, const AddedMatcher& m, OnText&& on_text, std::vector<int32_t>& out) const;
  bool word_char_at(std::string_view s, size_t i, bool before) const;
};

namespace {

// ---------------------------------------------------------------------------------------------
// Per-thread BPE cache: pre-token bytes -> ids, one table per live tokenizer.
struct BpeCache {
  StrMap<std::vector<int32_t>> map;
};
constexpr size_t kCacheMaxEntries = 1 << 19, kCacheMaxPiece = 256;

BpeCache& cache_for(uint64_t uid) {
  thread_local std::unordered_map<uint64_t, BpeCache> caches;
  thread_local uint64_t last_uid = 0;
  thread_local BpeCache* last = nullptr;
  if (uid == last_uid) return *last;
  if (caches.size() >= 8 && !caches.count(uid)) caches.clear();
  last_uid = uid;
  last = &caches[uid];
  return *last;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Encoding

void Tokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  struct Sym {
    int32_t id, prev, next;
  };
  struct Cand {  // a pair (pos, next of pos) that merges into `id` at `rank`
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  thread_local std::vector<Sym> sym;
  thread_local std::vector<Cand> heap;
  sym.clear();
  heap.clear();
  for (char c : piece) {
    int32_t id = byte_id[uint8_t(c)];
    if (id < 0) continue;  // a byte the vocab lacks is dropped (no unk token), as in HF
    int32_t k = int32_t(sym.size());
    sym.push_back({id, k - 1, k + 1});
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  auto push = [&](int32_t pos) {
    if (const MergeMap::Slot* m = merges.find(sym[pos].id, sym[sym[pos].next].id)) {
      heap.push_back({m->rank, pos, m->id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    }
  };
  for (int32_t k = 0; k + 1 < int32_t(sym.size()); ++k) push(k);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    Cand c = heap.back();
    heap.pop_back();
    Sym& s = sym[c.pos];
    if (s.id < 0 || s.next < 0) continue;  // merged away, or now the last symbol
    const MergeMap::Slot* m = merges.find(s.id, sym[s.next].id);
    if (!m || m->id != c.id) continue;  // the pair changed since it was queued
    Sym& r = sym[s.next];
    s.id = c.id;
    s.next = r.next;
    r.id = -1;
    if (s.next >= 0) sym[s.next].prev = c.pos, push(c.pos);
    if (s.prev >= 0) push(s.prev);
  }
  for (int32_t k = 0; k >= 0; k = sym[k].next) out.push_back(sym[k].id);
}

void Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.size() == 1 && byte_id[uint8_t(piece[0])] >= 0) { out.push_back(byte_id[uint8_t(piece[0])]); return; }
  if (ignore_merges)
    if (auto it = vocab_bytes.find(piece); it != vocab_bytes.end()) { out.push_back(it->second); return; }
  if (piece.size() > kCacheMaxPiece) { bpe(piece, out); return; }
  BpeCache& cache = cache_for(uid);
  if (auto it = cache.map.find(piece); it != cache.map.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  size_t from = out.size();
  bpe(piece, out);
  if (cache.map.size() >= kCacheMaxEntries) cache.map.clear();
  cache.map.emplace(std::string(piece), std::vector<int32_t>(out.begin() + from, out.end()));
}

// Pre-tokenizes one stretch of normalised text (no added tokens in it) and BPE-encodes the pieces.
void Tokenizer::Impl::encode_segment(std::string_view seg, std::vector<int32_t>& out) const {
  thread_local std::vector<std::string_view> cur, next;
  thread_local std::vector<std::pair<size_t, bool>> ends;  // (end, is_match) of consecutive stretches
  std::deque<std::string> prefixed;  // pieces given a leading space (rare)
  cur.assign(1, seg);
  for (const PreStep& st : steps) {
    next.clear();
    for (std::string_view p : cur) {
      if (st.prefix_space && p[0] != ' ') p = prefixed.emplace_back(" " + std::string(p));
      if (!st.re) { next.push_back(p); continue; }
      ends.clear();
      size_t last = 0;
      st.re->for_each_match(p, [&](size_t b, size_t e) {
        if (b > last) ends.push_back({b, st.invert});
        ends.push_back({e, !st.invert});
        last = e;
      });
      if (last < p.size()) ends.push_back({p.size(), st.invert});
      // Fold the stretches into pieces by the split behaviour (HF's SplitDelimiterBehavior).
      size_t start = 0, piece_start = 0;
      bool prev_match = false, open = false;
      auto flush = [&](size_t e) {
        if (open && e > piece_start) next.push_back(p.substr(piece_start, e - piece_start));
      };
      for (auto [e, is_match] : ends) {
        switch (st.behavior) {
          case Behavior::kIsolated: next.push_back(p.substr(start, e - start)); break;
          case Behavior::kRemoved: if (!is_match) next.push_back(p.substr(start, e - start)); break;
          case Behavior::kMergedWithPrevious:  // a delimiter joins the piece before it
            if (!(is_match && !prev_match && open)) flush(start), piece_start = start, open = true;
            break;
          case Behavior::kMergedWithNext:  // a delimiter starts the piece after it
            if (!(!is_match && prev_match && open)) flush(start), piece_start = start, open = true;
            break;
          case Behavior::kContiguous:  // runs of matches (and of non-matches) stay together
            if (!(is_match == prev_match && open)) flush(start), piece_start = start, open = true;
            break;
        }
        prev_match = is_match;
        start = e;
      }
      flush(p.size());
    }
    std::swap(cur, next);
  }
  for (std::string_view p : cur)
    if (!p.empty()) encode_piece(p, out);
}

// Whether the char just before (before=true) or at byte i of s is a word char (\w).
bool Tokenizer::Impl::word_char_at(std::string_view s, size_t i, bool before) const {
  if (before) {
    if (i == 0) return false;
    size_t b = i - 1;
    while (b > 0 && (uint8_t(s[b]) & 0xC0) == 0x80) --b;
    s = s.substr(b, i - b);
  } else {
    if (i >= s.size()) return false;
    size_t e = i;
    unicode::utf8_next(s, e);
    s = s.substr(i, e - i);
  }
  bool hit = false;
  word_re->for_each_match(s, [&](size_t, size_t) { hit = true; });
  return hit;
}

// Splits s at the added tokens of m: text between them goes to on_text, their ids to out.
template <class OnText>
void Tokenizer::Impl::split_added(std::string_view s, const AddedMatcher& m, OnText&& on_text,
                                  std::vector<int32_t>& out) const {
  if (m.empty) { if (!s.empty()) on_text(s); return; }
  size_t pos = 0;
  for (size_t i = 0; i < s.size();) {
    const AddedToken* hit = nullptr;
    for (int k : m.by_first[uint8_t(s[i])]) {
      const AddedToken& t = added[k];
      if (s.compare(i, t.match.size(), t.match) != 0) continue;
      if (t.single_word && (word_char_at(s, i, true) || word_char_at(s, i + t.match.size(), false))) continue;
      hit = &t;
      break;
    }
    if (!hit) { ++i; continue; }
    size_t b = i, e = i + hit->match.size();
    auto space_before = [&](size_t at, size_t* start) {
      size_t k = at - 1;
      while (k > 0 && (uint8_t(s[k]) & 0xC0) == 0x80) --k;
      size_t j = k;
      if (!unicode::is_white_space(unicode::utf8_next(s, j))) return false;
      *start = k;
      return true;
    };
    if (hit->lstrip)
      while (b > pos && space_before(b, &b)) {}
    if (hit->rstrip)
      for (size_t j = e; j < s.size() && unicode::is_white_space(unicode::utf8_next(s, j));) e = j;
    if (b > pos) on_text(s.substr(pos, b - pos));
    out.push_back(hit->id);
    pos = i = e;
  }
  if (pos < s.size()) on_text(s.substr(pos));
}

void Tokenizer::Impl::encode(std::string_view text, bool add_special, std::vector<int32_t>& out) const {
  size_t ok = unicode::utf8_valid_upto(text);
  AM_CHECK(ok == text.size(), "text to encode is not valid UTF-8 (bad byte 0x{:02X} at offset {} of {}); fix or "
           "re-decode the input before tokenizing", uint8_t(text[ok]), ok, text.size());
  out.reserve(out.size() + text.size() / 3 + 8);
  if (add_special) out.insert(out.end(), prefix.begin(), prefix.end());
  split_added(text, raw_added, [&](std::string_view seg) {
    std::string normalized;
    if (nfc && unicode::nfc_needed(seg)) seg = normalized = unicode::nfc(seg);
    split_added(seg, norm_added, [&](std::string_view s) { encode_segment(s, out); }, out);
  }, out);
  if (add_special) out.insert(out.end(), suffix.begin(), suffix.end());
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

bool jbool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : def;
}
std::string jtype(const json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "";
}

// Normalizer: null, NFC, or a Sequence of those.
void parse_normalizer(const json& j, Tokenizer::Impl& t, const std::string& file) {
  if (j.is_null()) return;
  std::string type = jtype(j);
  if (type == "NFC") { t.nfc = true; return; }
  if (type == "Sequence") {
    for (const json& n : j.value("normalizers", json::array())) parse_normalizer(n, t, file);
    return;
  }
  AM_FAIL("{}: normalizer '{}' is not supported; automoe reads byte-level BPE tokenizers whose normalizer is "
          "NFC or none (Qwen, GPT-2, Llama-3, DeepSeek)", file, type.empty() ? j.dump() : type);
}

void parse_pre_tokenizer(const json& j, Tokenizer::Impl& t, const std::string& file, bool& byte_level) {
  std::string type = jtype(j);
  if (type == "Sequence") {
    for (const json& p : j.value("pretokenizers", json::array())) parse_pre_tokenizer(p, t, file, byte_level);
  } else if (type == "ByteLevel") {
    PreStep st;
    st.prefix_space = jbool(j, "add_prefix_space", true);
    if (jbool(j, "use_regex", true)) st.re = std::make_shared<Regex>(kGpt2Pattern, false, file);
    t.steps.push_back(st);
    byte_level = true;
  } else if (type == "Split") {
    PreStep st;
    const json& pat = j.at("pattern");
    if (pat.contains("Regex")) st.re = std::make_shared<Regex>(pat["Regex"].get<std::string>(), false, file);
    else st.re = std::make_shared<Regex>(pat.at("String").get<std::string>(), true, file);
    std::string b = j.value("behavior", "Isolated");
    static const std::pair<const char*, Behavior> kinds[] = {
        {"Removed", Behavior::kRemoved}, {"Isolated", Behavior::kIsolated},
        {"MergedWithPrevious", Behavior::kMergedWithPrevious}, {"MergedWithNext", Behavior::kMergedWithNext},
        {"Contiguous", Behavior::kContiguous}};
    auto it = std::find_if(std::begin(kinds), std::end(kinds), [&](auto& k) { return b == k.first; });
    AM_CHECK(it != std::end(kinds), "{}: Split behavior '{}' is unknown", file, b);
    st.behavior = it->second;
    st.invert = jbool(j, "invert", false);
    t.steps.push_back(st);
  } else {
    AM_FAIL("{}: pre_tokenizer '{}' is not supported; automoe reads byte-level BPE tokenizers (pre-tokenizers "
            "Split, ByteLevel and Sequence)", file, type.empty() ? j.dump() : type);
  }
}

// Post-processor ids around a single sequence: (prefix, suffix).
void parse_post_processor(const json& j, Tokenizer::Impl& t, const std::string& file) {
  std::string type = jtype(j);
  if (j.is_null() || type == "ByteLevel") return;
  if (type == "Sequence") {
    for (const json& p : j.value("processors", json::array())) parse_post_processor(p, t, file);
  } else if (type == "TemplateProcessing") {
    const json& specials = j.value("special_tokens", json::object());
    bool seen_seq = false;
    for (const json& item : j.at("single")) {
      if (item.contains("Sequence")) { seen_seq = true; continue; }
      std::string name = item.at("SpecialToken").at("id").get<std::string>();
      AM_CHECK(specials.contains(name), "{}: TemplateProcessing uses special token '{}' but does not define it", file,
               name);
      for (const json& id : specials[name].at("ids")) (seen_seq ? t.suffix : t.prefix).push_back(id.get<int32_t>());
    }
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    t.prefix.push_back(j.at("cls").at(1).get<int32_t>());
    t.suffix.push_back(j.at("sep").at(1).get<int32_t>());
  } else {
    AM_FAIL("{}: post_processor '{}' is not supported (supported: ByteLevel, TemplateProcessing, "
            "RobertaProcessing, BertProcessing, Sequence)", file, type);
  }
}

AddedToken parse_added(const json& j, const std::string& content_default) {
  AddedToken a;
  a.content = j.is_string() ? j.get<std::string>() : j.value("content", content_default);
  if (j.is_object()) {
    a.special = jbool(j, "special", false);
    a.lstrip = jbool(j, "lstrip", false);
    a.rstrip = jbool(j, "rstrip", false);
    a.single_word = jbool(j, "single_word", false);
    a.normalized = jbool(j, "normalized", !a.special);
  }
  return a;
}

void set_vocab(Tokenizer::Impl& t, std::vector<std::pair<std::string, int64_t>>& vocab, const std::string& file) {
  AM_CHECK(!vocab.empty(), "{}: the vocab is empty or missing; expected an object of token -> id", file);
  const ByteAlphabet& ab = byte_alphabet();
  t.vocab.reserve(vocab.size());
  t.byte_id.fill(-1);
  std::string raw;
  for (auto& [tok, id] : vocab) {
    AM_CHECK(id >= 0, "{}: vocab entry '{}' does not have a non-negative integer id", file, tok);
    if (size_t(id) >= t.id_token.size()) t.id_token.resize(id + 1), t.id_bytes.resize(id + 1);
    // Decoding follows HF's ByteLevel decoder: a token outside the byte alphabet stays as it is.
    bool in_alphabet = ab.to_bytes(tok, raw);
    t.id_bytes[id] = in_alphabet ? raw : tok;
    if (in_alphabet) {
      if (raw.size() == 1) t.byte_id[uint8_t(raw[0])] = int32_t(id);
      if (t.ignore_merges) t.vocab_bytes.emplace(raw, int32_t(id));
    }
    t.id_token[id] = tok;
    t.vocab.emplace(std::move(tok), int32_t(id));
  }
}

// Merge `rank`: (a, b) -> a + b. All three must be vocab tokens, as HF requires.
void add_merge(Tokenizer::Impl& t, std::string_view a, std::string_view b, int32_t rank, const std::string& file) {
  thread_local std::string joined;
  joined.assign(a).append(b);
  auto ia = t.vocab.find(a), ib = t.vocab.find(b), im = t.vocab.find(joined);
  AM_CHECK(ia != t.vocab.end() && ib != t.vocab.end() && im != t.vocab.end(),
           "{}: merge {} '{} {}' uses a token that is not in the vocab; the vocab and merges do not belong together",
           file, rank, a, b);
  t.merges.put(ia->second, ib->second, rank, im->second);
}
// A merge written as "a b": exactly one space. `line_no` > 0 for merges.txt.
void add_merge_line(Tokenizer::Impl& t, std::string_view line, int32_t rank, const std::string& file, int line_no = 0) {
  size_t sp = line.find(' ');
  AM_CHECK(sp != std::string::npos && line.find(' ', sp + 1) == std::string::npos,
           "{}{}: expected a merge of two tokens separated by one space, got '{}'", file,
           line_no ? fmt::format(" line {}", line_no) : "", line);
  add_merge(t, line.substr(0, sp), line.substr(sp + 1), rank, file);
}

void add_token(Tokenizer::Impl& t, AddedToken a, const std::string& file) {
  AM_CHECK(!a.content.empty(), "{}: added token {} has empty content", file, a.id);
  if (auto it = t.added_by_content.find(a.content); it != t.added_by_content.end()) return;
  if (a.id < 0) {
    auto v = t.vocab.find(a.content);
    AM_CHECK(v != t.vocab.end(), "{}: special token '{}' is neither an added token nor in the vocab", file, a.content);
    a.id = v->second;
  }
  t.added_by_content[a.content] = a.id;
  t.added.push_back(std::move(a));
}

// Builds the added-token matchers and the id tables once all tokens are known.
void finish(Tokenizer::Impl& t) {
  int32_t n = int32_t(t.id_token.size());
  for (const AddedToken& a : t.added) n = std::max(n, a.id + 1);
  t.id_token.resize(n), t.id_bytes.resize(n), t.id_special.assign(n, 0);
  std::vector<int> order(t.added.size());
  for (size_t k = 0; k < t.added.size(); ++k) {
    AddedToken& a = t.added[k];
    a.match = t.nfc && a.normalized && unicode::nfc_needed(a.content) ? unicode::nfc(a.content) : a.content;
    t.id_token[a.id] = a.content;
    t.id_bytes[a.id] = a.content;
    t.id_special[a.id] = a.special;
    order[k] = int(k);
    if (a.single_word && !t.word_re) t.word_re = std::make_shared<Regex>(R"(\w)", false, t.source);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int x, int y) { return t.added[x].match.size() > t.added[y].match.size(); });
  for (int k : order) {
    AddedMatcher& m = t.nfc && t.added[k].normalized ? t.norm_added : t.raw_added;
    m.by_first[uint8_t(t.added[k].match[0])].push_back(k);
    m.empty = false;
  }
}

// bos/eos/pad (strings or AddedToken objects) from tokenizer_config.json.
void read_special_names(Tokenizer::Impl& t, const json& cfg, const std::string& file, bool add_as_tokens) {
  auto name = [&](const char* key) -> std::string {
    auto it = cfg.find(key);
    if (it == cfg.end() || it->is_null()) return "";
    return it->is_string() ? it->get<std::string>() : it->value("content", "");
  };
  if (add_as_tokens) {  // the slow tokenizers never split their special tokens
    for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"})
      if (auto s = name(key); !s.empty()) {
        AddedToken a = parse_added(cfg[key], s);
        a.special = true, a.normalized = false;
        add_token(t, a, file);
      }
    for (const json& s : cfg.value("additional_special_tokens", json::array())) {
      AddedToken a = parse_added(s, "");
      a.special = true, a.normalized = false;
      add_token(t, a, file);
    }
  }
  auto resolve = [&](const char* key, std::string& tok, int32_t& id) {
    tok = name(key);
    if (tok.empty()) return;
    auto a = t.added_by_content.find(tok);
    auto v = t.vocab.find(tok);
    id = a != t.added_by_content.end() ? a->second : v != t.vocab.end() ? v->second : -1;
    AM_CHECK(id >= 0, "{}: {} '{}' is not a token of this tokenizer; fix tokenizer_config.json", file, key, tok);
  };
  resolve("bos_token", t.bos, t.bos_id);
  resolve("eos_token", t.eos, t.eos_id);
  resolve("pad_token", t.pad, t.pad_id);
}

std::shared_ptr<Tokenizer::Impl> load_tokenizer_json(const fs::path& path) {
  auto t = std::make_shared<Tokenizer::Impl>();
  const std::string file = path.string();
  t->source = file;
  VocabMerges vm;
  json j = read_tokenizer_json(path, vm, false);
  AM_CHECK(j.is_object() && j.contains("model"), "{} has no \"model\"; it is not a Hugging Face tokenizer.json", file);
  const json& model = j["model"];
  std::string type = jtype(model);
  if (type.empty() && model.contains("merges")) type = "BPE";
  AM_CHECK(type == "BPE", "{}: tokenizer model type '{}' is not supported; automoe reads byte-level BPE tokenizers "
           "(Qwen, GPT-2, Llama-3, DeepSeek), not WordPiece, Unigram or WordLevel", file, type.empty() ? "?" : type);
  AM_CHECK(!jbool(model, "byte_fallback", false), "{}: BPE with byte_fallback (SentencePiece style) is not supported; "
           "automoe reads byte-level BPE tokenizers", file);
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    AM_CHECK(!model.contains(k) || model[k].is_null() || model[k] == "", "{}: BPE {} '{}' is not supported", file, k,
             model[k].dump());
  try {
    t->ignore_merges = jbool(model, "ignore_merges", false);
    set_vocab(*t, vm.vocab, file);
    t->merges.reserve(vm.merge_sizes.size());
    for (size_t r = 0, k = 0; r < vm.merge_sizes.size(); k += vm.merge_sizes[r++]) {
      if (vm.merge_sizes[r] == 1) add_merge_line(*t, vm.merge_parts[k], int32_t(r), file);
      else if (vm.merge_sizes[r] == 2) add_merge(*t, vm.merge_parts[k], vm.merge_parts[k + 1], int32_t(r), file);
      else AM_FAIL("{}: merge {} has {} parts; merges are \"a b\" or [\"a\", \"b\"]", file, r, vm.merge_sizes[r]);
    }
    parse_normalizer(j.value("normalizer", json()), *t, file);
    bool byte_level = false;
    if (!j.value("pre_tokenizer", json()).is_null()) parse_pre_tokenizer(j["pre_tokenizer"], *t, file, byte_level);
    AM_CHECK(byte_level, "{}: no ByteLevel pre-tokenizer; automoe reads byte-level BPE tokenizers only", file);
    std::string dec = jtype(j.value("decoder", json()));
    AM_CHECK(dec.empty() || dec == "ByteLevel", "{}: decoder '{}' is not supported; byte-level BPE uses ByteLevel",
             file, dec);
    for (const json& a : j.value("added_tokens", json::array())) {
      AddedToken tok = parse_added(a, "");
      tok.id = a.at("id").get<int32_t>();
      add_token(*t, tok, file);
    }
    parse_post_processor(j.value("post_processor", json()), *t, file);
  } catch (const json::exception& e) {
    AM_FAIL("{}: unexpected tokenizer.json structure ({}); is it a Hugging Face tokenizer.json?", file, e.what());
  }
  finish(*t);
  fs::path cfg = path.parent_path() / "tokenizer_config.json";
  if (fs::exists(cfg)) read_special_names(*t, read_json(cfg), cfg.string(), false);
  return t;
}

std::shared_ptr<Tokenizer::Impl> load_slow(const fs::path& dir) {
  auto t = std::make_shared<Tokenizer::Impl>();
  fs::path vocab_path = dir / "vocab.json", merges_path = dir / "merges.txt", cfg_path = dir / "tokenizer_config.json";
  t->source = vocab_path.string() + " + " + merges_path.string();
  json cfg = fs::exists(cfg_path) ? read_json(cfg_path) : json::object();
  std::string cls = cfg.value("tokenizer_class", "GPT2Tokenizer");
  if (cls.ends_with("Fast")) cls.resize(cls.size() - 4);
  AM_CHECK(cls == "GPT2Tokenizer" || cls == "Qwen2Tokenizer",
           "{}: tokenizer_class '{}' with vocab.json + merges.txt is not supported (supported: GPT2Tokenizer, "
           "Qwen2Tokenizer); provide a tokenizer.json", cfg_path.string(), cls);
  VocabMerges vm;
  read_tokenizer_json(vocab_path, vm, true);
  set_vocab(*t, vm.vocab, vocab_path.string());
  std::string text = read_file(merges_path);
  t->merges.reserve(std::count(text.begin(), text.end(), '\n') + 1);
  int32_t rank = 0, n = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = std::min(text.find('\n', pos), text.size());
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1, ++n;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (n == 1 && line.starts_with("#version"))) continue;
    add_merge_line(*t, line, rank++, merges_path.string(), n);
  }
  PreStep bl;
  if (cls == "Qwen2Tokenizer") {  // as transformers' Qwen2 converter: NFC, Qwen split, ByteLevel
    t->nfc = true;
    PreStep split;
    split.re = std::make_shared<Regex>(kQwen2Pattern, false, t->source);
    t->steps.push_back(split);
  } else {
    bl.re = std::make_shared<Regex>(kGpt2Pattern, false, t->source);
    bl.prefix_space = jbool(cfg, "add_prefix_space", false);
  }
  t->steps.push_back(bl);
  if (cfg.contains("added_tokens_decoder"))
    for (auto& [id, a] : cfg["added_tokens_decoder"].items()) {
      AddedToken tok = parse_added(a, "");
      tok.id = std::stoi(id);
      add_token(*t, tok, cfg_path.string());
    }
  read_special_names(*t, cfg, cfg_path.string(), true);
  finish(*t);
  if (jbool(cfg, "add_bos_token", false) && t->bos_id >= 0) t->prefix.push_back(t->bos_id);
  if (jbool(cfg, "add_eos_token", false) && t->eos_id >= 0) t->suffix.push_back(t->eos_id);
  return t;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

Tokenizer Tokenizer::load(const std::string& path) {
  fs::path p(path);
  AM_CHECK(fs::exists(p), "tokenizer path {} does not exist; pass a tokenizer.json or a model directory", path);
  Tokenizer tok;
  if (!fs::is_directory(p)) {
    tok.impl_ = load_tokenizer_json(p);
  } else if (fs::exists(p / "tokenizer.json")) {
    tok.impl_ = load_tokenizer_json(p / "tokenizer.json");
  } else if (fs::exists(p / "vocab.json") && fs::exists(p / "merges.txt")) {
    tok.impl_ = load_slow(p);
  } else {
    AM_FAIL("{} has no tokenizer.json and no vocab.json + merges.txt{}; automoe reads byte-level BPE tokenizers "
            "in those formats", path,
            fs::exists(p / "tokenizer.model") ? " (a SentencePiece tokenizer.model is not supported)" : "");
  }
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> out;
  impl_->encode(text, add_special_tokens, out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    AM_CHECK(id >= 0, "cannot decode token id {}: ids are non-negative", id);
    if (size_t(id) >= impl_->id_bytes.size() || (skip_special && impl_->id_special[id])) continue;
    bytes += impl_->id_bytes[id];
  }
  return unicode::utf8_valid_upto(bytes) == bytes.size() ? bytes : unicode::utf8_lossy(bytes);
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return it->second;
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}
std::string Tokenizer::id_to_token(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->id_token.size() ? impl_->id_token[id] : std::string();
}
int32_t Tokenizer::vocab_size() const { return int32_t(impl_->id_token.size()); }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->id_special.size() && impl_->id_special[id];
}
int32_t Tokenizer::bos_id() const { return impl_->bos_id; }
int32_t Tokenizer::eos_id() const { return impl_->eos_id; }
int32_t Tokenizer::pad_id() const { return impl_->pad_id; }
const std::string& Tokenizer::bos_token() const { return impl_->bos; }
const std::string& Tokenizer::eos_token() const { return impl_->eos; }
const std::string& Tokenizer::pad_token() const { return impl_->pad; }
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace automoe
