// text/unicode.h: the UTF-8 and Unicode pieces the tokenizer needs: validation, decoding, lossy
// repair, White_Space, and NFC normalisation (tables generated into unicode_data.inc).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace automoe::unicode {

// Offset of the first byte that is not part of valid UTF-8 (overlongs and surrogates are
// invalid), or s.size() when all of s is valid.
size_t utf8_valid_upto(std::string_view s);

// Decodes the code point at s[i] (s must be valid UTF-8) and advances i past it.
inline uint32_t utf8_next(std::string_view s, size_t& i) {
  auto b = [&](size_t k) { return uint32_t(uint8_t(s[i + k])); };
  uint32_t c = b(0);
  if (c < 0x80) { i += 1; return c; }
  if (c < 0xE0) { c = (c & 0x1F) << 6 | (b(1) & 0x3F); i += 2; return c; }
  if (c < 0xF0) { c = (c & 0x0F) << 12 | (b(1) & 0x3F) << 6 | (b(2) & 0x3F); i += 3; return c; }
  c = (c & 0x07) << 18 | (b(1) & 0x3F) << 12 | (b(2) & 0x3F) << 6 | (b(3) & 0x3F);
  i += 4;
  return c;
}
void utf8_append(std::string& out, uint32_t cp);

// s with every invalid UTF-8 sequence replaced by U+FFFD (as Rust's from_utf8_lossy does).
std::string utf8_lossy(std::string_view s);

// Unicode White_Space (what Rust's char::is_whitespace and Oniguruma's \s accept).
bool is_white_space(uint32_t cp);

// NFC quick check on valid UTF-8: true when s may not be in NFC and needs nfc(). ASCII and
// ordinary composed text answer false without any table lookup beyond one per non-ASCII char.
bool nfc_needed(std::string_view s);
// The NFC form of valid UTF-8 s (Unicode canonical decomposition, reordering, composition).
std::string nfc(std::string_view s);

}  // namespace automoe::unicode
