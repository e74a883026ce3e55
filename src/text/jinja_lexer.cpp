// text/jinja_lexer.cpp: template source -> tokens, following jinja2's lexer rule for rule, since
// chat templates lean on its whitespace handling: "{%-"/"-%}" strip all whitespace on that side,
// trim_blocks drops the first newline after a block or comment tag, lstrip_blocks drops spaces
// and tabs before a block or comment tag that starts its line, "+" turns either off.
#include <cstring>

#include "text/jinja_impl.h"

namespace automoe::jinja {
namespace {

class Lexer {
 public:
  Lexer(std::string_view source, const std::string& name) : name_(name) {
    // jinja2 reads "\r\n" and "\r" as "\n" and drops one trailing newline.
    src_.reserve(source.size());
    for (size_t k = 0; k < source.size(); ++k) {
      if (source[k] == '\r') {
        src_ += '\n';
        if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
      } else {
        src_ += source[k];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    while (pos_ < src_.size()) root();
    push(Tok::kEof, "");
    return std::move(out_);
  }

 private:
  [[noreturn]] void fail(const std::string& msg) const { throw TemplateError(name_, line_, msg); }
  bool at(size_t p, std::string_view s) const { return src_.compare(p, s.size(), s) == 0; }
  void push(Tok t, std::string text) { out_.push_back(Token{t, std::move(text), 0, 0, line_}); }
  void advance_to(size_t p) {
    for (; pos_ < p; ++pos_) line_ += src_[pos_] == '\n';
  }
  // Length of the whitespace code point at p (Python's \s), or 0.
  size_t space_at(size_t p) const {
    if (p >= src_.size()) return 0;
    size_t len;
    return py_space(u8_decode(src_, p, &len)) ? len : 0;
  }
  size_t skip_space(size_t p) const {
    while (size_t n = space_at(p)) p += n;
    return p;
  }

  // Text before a tag, after whitespace control: `sign` is '-', '+' or 0; lstrip applies to
  // block and comment tags only.
  void data_before(size_t tag, char sign, bool lstrip) {
    std::string_view text(src_.data() + pos_, tag - pos_);
    if (sign == '-') {
      std::string t = py_strip(text, false, true, Value::none());
      if (!t.empty()) push(Tok::kData, std::move(t));
    } else {
      size_t keep = text.size();
      if (sign != '+' && lstrip) {
        size_t l = text.rfind('\n');
        l = l == std::string_view::npos ? 0 : l + 1;
        bool line_starting = pos_ == 0 || src_[pos_ - 1] == '\n';
        if ((l > 0 || line_starting) && l < text.size() && skip_space(pos_ + l) == tag) keep = l;
      }
      if (keep) push(Tok::kData, std::string(text.substr(0, keep)));
    }
    advance_to(tag);
  }

  void root() {
    size_t tag = pos_;
    while ((tag = src_.find('{', tag)) != std::string::npos) {
      char c = tag + 1 < src_.size() ? src_[tag + 1] : 0;
      if (c == '{' || c == '%' || c == '#') break;
      ++tag;
    }
    if (tag == std::string::npos) {
      push(Tok::kData, src_.substr(pos_));
      advance_to(src_.size());
      return;
    }
    char kind = src_[tag + 1];
    size_t p = tag + 2;
    char sign = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p++] : 0;
    if (kind == '%' && raw_begin(tag, p, sign)) return;
    data_before(tag, sign, kind != '{');
    if (kind == '#') return comment(p);
    push(kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, "");
    advance_to(p);
    tag_body(kind == '{');
  }

  // {% raw %}...{% endraw %}: the text between is data, untouched.
  bool raw_begin(size_t tag, size_t p, char sign) {
    p = skip_space(p);
    if (!at(p, "raw")) return false;
    p = skip_space(p + 3);
    if (at(p, "-%}")) p = skip_space(p + 3);
    else if (at(p, "%}")) p += 2;
    else return false;
    data_before(tag, sign, true);
    advance_to(p);
    if (pos_ == src_.size()) return true;  // jinja2 only complains when text follows
    for (size_t q = src_.find("{%", pos_); q != std::string::npos; q = src_.find("{%", q + 1)) {
      size_t r = q + 2;
      char end_sign = r < src_.size() && (src_[r] == '-' || src_[r] == '+') ? src_[r++] : 0;
      r = skip_space(r);
      if (!at(r, "endraw")) continue;
      r = skip_space(r + 6);
      if (at(r, "+%}")) r += 3;
      else if (at(r, "-%}")) r = skip_space(r + 3);
      else if (at(r, "%}")) r += at(r + 2, "\n") ? 3 : 2;
      else continue;
      data_before(q, end_sign, true);
      advance_to(r);
      return true;
    }
    fail("missing end of raw directive");
  }

  void comment(size_t p) {
    for (size_t q = src_.find("#}", p); q != std::string::npos; q = src_.find("#}", q + 1)) {
      size_t end;
      if (q > p && src_[q - 1] == '-') end = skip_space(q + 2);
      else if (q > p && src_[q - 1] == '+') end = q + 2;
      else end = q + (at(q + 2, "\n") ? 3 : 2);
      advance_to(end);
      return;
    }
    fail("missing end of comment tag");
  }

  // Tokens of an expression or statement up to its closing "}}" or "%}"; an end tag counts only
  // when brackets are balanced, so "{{ {'a': {}}}}" works as in jinja2.
  void tag_body(bool var) {
    std::string closers;
    while (pos_ < src_.size()) {
      if (closers.empty()) {
        size_t p = pos_;
        if (var && at(p, "-}}")) { push(Tok::kVarEnd, ""); return advance_to(skip_space(p + 3)); }
        if (var && at(p, "}}")) { push(Tok::kVarEnd, ""); return advance_to(p + 2); }
        if (!var && at(p, "+%}")) { push(Tok::kBlockEnd, ""); return advance_to(p + 3); }
        if (!var && at(p, "-%}")) { push(Tok::kBlockEnd, ""); return advance_to(skip_space(p + 3)); }
        if (!var && at(p, "%}")) { push(Tok::kBlockEnd, ""); return advance_to(p + (at(p + 2, "\n") ? 3 : 2)); }
      }
      if (size_t n = space_at(pos_)) { advance_to(pos_ + n); continue; }
      if (number() || name() || string()) continue;
      op(closers);
    }
    // Unclosed tag: the parser reports the unexpected end of the template.
  }

  static bool digit(char c, int base = 10) {
    if (base == 16) return isxdigit((unsigned char)c);
    return c >= '0' && c < '0' + base;
  }
  // (\d+_)*\d+ at p: its end, or p when there is none.
  size_t digits(size_t p, int base = 10) const {
    size_t q = p;
    while (q < src_.size() && digit(src_[q], base)) {
      ++q;
      if (q + 1 < src_.size() && src_[q] == '_' && digit(src_[q + 1], base)) ++q;
    }
    return q;
  }
  static std::string without_underscores(std::string_view s) {
    std::string out;
    for (char c : s)
      if (c != '_') out += c;
    return out;
  }

  bool number() {
    size_t p = pos_;
    if (!digit(src_[p])) return false;
    // Float first, as jinja2: digits, then a fraction and/or an exponent; never right after '.'.
    size_t q = digits(p), end = 0;
    if (p == 0 || src_[p - 1] != '.') {
      size_t frac = q < src_.size() && src_[q] == '.' ? digits(q + 1) : 0;
      if (frac == q + 1) frac = 0;
      size_t e = frac ? frac : q;
      if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t s = e + 1 < src_.size() && (src_[e + 1] == '+' || src_[e + 1] == '-') ? e + 2 : e + 1;
        size_t x = digits(s);
        if (x > s) end = x;
      }
      if (!end && frac) end = frac;
    }
    if (end) {
      std::string text = without_underscores(std::string_view(src_).substr(p, end - p));
      push(Tok::kFloat, text);
      out_.back().f = std::strtod(text.c_str(), nullptr);
      advance_to(end);
      return true;
    }
    int base = 10;
    size_t start = p;
    char x = p + 1 < src_.size() ? char(tolower((unsigned char)src_[p + 1])) : 0;
    if (src_[p] == '0' && (x == 'b' || x == 'o' || x == 'x')) {
      base = x == 'b' ? 2 : x == 'o' ? 8 : 16;
      // (_?[digit])+ after the prefix
      size_t r = p + 2;
      while (r < src_.size() && (digit(src_[r], base) || (src_[r] == '_' && r + 1 < src_.size() && digit(src_[r + 1], base))))
        r += src_[r] == '_' ? 2 : 1;
      if (r == p + 2) { q = p + 1; base = 10; }  // just "0"
      else { q = r; start = p + 2; }
    } else if (src_[p] == '0') {
      q = p + 1;  // 0(_?0)*
      while (q < src_.size() && (src_[q] == '0' || (src_[q] == '_' && q + 1 < src_.size() && src_[q + 1] == '0'))) q += src_[q] == '_' ? 2 : 1;
    }
    std::string text = without_underscores(std::string_view(src_).substr(start, q - start));
    uint64_t v = 0;
    for (char c : text) {
      int d = isdigit((unsigned char)c) ? c - '0' : tolower((unsigned char)c) - 'a' + 10;
      if (v > (uint64_t(INT64_MAX) - d) / base) fail("integer literal " + src_.substr(p, q - p) + " is too large");
      v = v * base + d;
    }
    push(Tok::kInt, src_.substr(p, q - p));
    out_.back().i = int64_t(v);
    advance_to(q);
    return true;
  }

  bool name() {
    size_t p = pos_;
    auto head = [](char c) { return isalpha((unsigned char)c) || c == '_'; };
    if (!head(src_[p])) return false;
    while (p < src_.size() && (head(src_[p]) || isdigit((unsigned char)src_[p]))) ++p;
    push(Tok::kName, src_.substr(pos_, p - pos_));
    advance_to(p);
    return true;
  }

  // A quoted string with Python's escapes ("unicode-escape"); an unterminated quote is no string.
  bool string() {
    char q = src_[pos_];
    if (q != '\'' && q != '"') return false;
    size_t p = pos_ + 1;
    while (p < src_.size() && src_[p] != q) p += src_[p] == '\\' ? 2 : 1;
    if (p >= src_.size()) return false;
    push(Tok::kString, unescape(std::string_view(src_).substr(pos_ + 1, p - pos_ - 1)));
    advance_to(p + 1);
    return true;
  }

  std::string unescape(std::string_view s) {
    std::string out;
    for (size_t k = 0; k < s.size(); ++k) {
      if (s[k] != '\\') { out += s[k]; continue; }
      if (++k == s.size()) fail("\\ at end of string");
      char c = s[k];
      auto hex = [&](int n) {
        char32_t v = 0;
        for (int j = 0; j < n; ++j) {
          if (k + 1 >= s.size() || !isxdigit((unsigned char)s[k + 1])) fail(fmt::format("truncated \\{} escape in a string", c));
          char h = s[++k];
          v = v * 16 + (isdigit((unsigned char)h) ? h - '0' : tolower((unsigned char)h) - 'a' + 10);
        }
        if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) fail("a string escapes an invalid code point");
        u8_append(out, v);
      };
      switch (c) {
        case '\n': break;  // line continuation
        case '\\': case '\'': case '"': out += c; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'v': out += '\v'; break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        case 'N': fail("named unicode escapes (\\N{...}) are not supported");
        default:
          if (c >= '0' && c <= '7') {
            char32_t v = c - '0';
            for (int j = 0; j < 2 && k + 1 < s.size() && s[k + 1] >= '0' && s[k + 1] <= '7'; ++j) v = v * 8 + (s[++k] - '0');
            u8_append(out, v);
          } else {
            out += '\\';  // unknown escapes stay as written
            out += c;
          }
      }
    }
    return out;
  }

  void op(std::string& closers) {
    static const char* kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "<", ">", "=",
                                 ".",  ",",  ":",  "|",  "(",  ")",  "[", "]", "{", "}", ";"};
    for (const char* o : kOps) {
      if (!at(pos_, o)) continue;
      char c = o[0];
      if (o[1] == 0 && (c == '(' || c == '[' || c == '{')) closers += c == '(' ? ')' : c == '[' ? ']' : '}';
      if (o[1] == 0 && (c == ')' || c == ']' || c == '}')) {
        if (closers.empty()) fail(fmt::format("unexpected '{}'", c));
        if (closers.back() != c) fail(fmt::format("unexpected '{}', expected '{}'", c, closers.back()));
        closers.pop_back();
      }
      push(Tok::kOp, o);
      advance_to(pos_ + strlen(o));
      return;
    }
    size_t len;
    u8_decode(src_, pos_, &len);
    fail(fmt::format("unexpected character {}", py_quote(src_.substr(pos_, len))));
  }

  std::string src_;
  const std::string& name_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> out_;
};

}  // namespace

std::vector<Token> lex(std::string_view source, const std::string& template_name) {
  return Lexer(source, template_name).run();
}

}  // namespace automoe::jinja
