// text/unicode.cpp: UTF-8 validation and repair, White_Space, and NFC normalisation
// (UAX #15: canonical decomposition, canonical ordering, canonical composition) with the
// quick-check fast path, so ASCII and already-composed text are scanned once and copied.
#include "text/unicode.h"

#include <cstring>
#include <unordered_map>
#include <vector>

namespace automoe::unicode {

namespace {
#include "text/unicode_data.inc"

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;
enum : uint16_t { kQcMaybe = 1 << 8, kQcNo = 2 << 8 };

// Per code point: ccc in the low byte, NFC quick-check (yes 0, maybe, no) above; stored as
// 256-entry blocks shared between identical blocks (most of the code space is all zero).
struct Tables {
  std::vector<uint16_t> stage1, blocks;
  std::unordered_map<uint32_t, std::pair<uint32_t, uint32_t>> decomp;
  std::unordered_map<uint64_t, uint32_t> comp;

  Tables() {
    std::vector<uint16_t> prop(0x110000, 0);
    for (auto& r : kCccRanges)
      for (uint32_t c = r[0]; c <= r[1]; ++c) prop[c] = uint16_t(r[2]);
    for (auto& d : kDecompositions) {
      decomp[d[0]] = {d[1], d[2]};
      if (d[3]) {
        comp[uint64_t(d[1]) << 32 | d[2]] = d[0];
        prop[d[2]] |= kQcMaybe;  // may combine with what precedes it
      } else {
        prop[d[0]] |= kQcNo;  // never survives NFC (singleton, exclusion, non-starter decomposition)
      }
    }
    for (uint32_t c = kVBase; c < kVBase + kVCount; ++c) prop[c] |= kQcMaybe;
    for (uint32_t c = kTBase + 1; c < kTBase + kTCount; ++c) prop[c] |= kQcMaybe;
    std::unordered_map<std::string, uint16_t> seen;
    for (uint32_t hi = 0; hi < 0x1100; ++hi) {
      std::string key(reinterpret_cast<const char*>(&prop[hi << 8]), 512);
      auto [it, fresh] = seen.try_emplace(key, uint16_t(blocks.size() / 256));
      if (fresh) blocks.insert(blocks.end(), &prop[hi << 8], &prop[hi << 8] + 256);
      stage1.push_back(it->second);
    }
  }
  uint16_t prop(uint32_t cp) const { return blocks[size_t(stage1[cp >> 8]) * 256 + (cp & 0xFF)]; }
  uint8_t ccc(uint32_t cp) const { return uint8_t(prop(cp)); }

  void decompose(uint32_t cp, std::vector<uint32_t>& out) const {
    if (cp >= kSBase && cp < kSBase + kSCount) {
      uint32_t s = cp - kSBase;
      out.push_back(kLBase + s / kNCount);
      out.push_back(kVBase + s % kNCount / kTCount);
      if (s % kTCount) out.push_back(kTBase + s % kTCount);
      return;
    }
    auto it = decomp.find(cp);
    if (it == decomp.end()) { out.push_back(cp); return; }
    decompose(it->second.first, out);
    if (it->second.second) decompose(it->second.second, out);
  }
  uint32_t compose(uint32_t a, uint32_t b) const {
    if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
      return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
    if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
      return a + (b - kTBase);
    auto it = comp.find(uint64_t(a) << 32 | b);
    return it == comp.end() ? 0 : it->second;
  }

  // Full NFC of a region that starts and ends at normalisation boundaries.
  void normalize(std::string_view s, std::string& out) const {
    std::vector<uint32_t> d;
    for (size_t i = 0; i < s.size();) decompose(utf8_next(s, i), d);
    for (size_t i = 1; i < d.size(); ++i)  // canonical ordering: stable sort of each mark run by ccc
      for (size_t j = i; j > 0 && ccc(d[j]) && ccc(d[j - 1]) > ccc(d[j]); --j) std::swap(d[j], d[j - 1]);
    std::vector<uint32_t> r;
    long starter = -1;
    int last = -1;  // ccc of the last char kept after the starter, -1 when none
    for (uint32_t c : d) {
      int k = ccc(c);
      if (starter >= 0 && !(last != -1 && (last == 0 || last >= k)))
        if (uint32_t m = compose(r[starter], c)) { r[starter] = m; continue; }
      if (k == 0) starter = long(r.size()), last = -1;
      else last = k;
      r.push_back(c);
    }
    for (uint32_t c : r) utf8_append(out, c);
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}
}  // namespace

size_t utf8_valid_upto(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    if (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (!(w & 0x8080808080808080ull)) { i += 8; continue; }
    }
    uint8_t c = p[i];
    if (c < 0x80) { ++i; continue; }
    size_t len = c >= 0xC2 && c <= 0xDF ? 2 : (c & 0xF0) == 0xE0 ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (len == 0 || i + len > n) return i;
    for (size_t k = 1; k < len; ++k)
      if ((p[i + k] & 0xC0) != 0x80) return i;
    size_t j = i;
    uint32_t cp = utf8_next(s, j);
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return i;
    i += len;
  }
  return n;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) { out += char(cp); return; }
  if (cp < 0x800) { out += char(0xC0 | cp >> 6); }
  else {
    if (cp < 0x10000) out += char(0xE0 | cp >> 12);
    else out += char(0xF0 | cp >> 18), out += char(0x80 | (cp >> 12 & 0x3F));
    out += char(0x80 | (cp >> 6 & 0x3F));
  }
  out += char(0x80 | (cp & 0x3F));
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  while (!s.empty()) {
    size_t ok = utf8_valid_upto(s);
    out.append(s.substr(0, ok));
    if (ok == s.size()) break;
    // Skip the maximal prefix of a well-formed sequence (one U+FFFD for it), else one byte.
    const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + ok;
    size_t avail = s.size() - ok, skip = 1;
    size_t len = p[0] >= 0xC2 && p[0] <= 0xDF ? 2 : (p[0] & 0xF0) == 0xE0 ? 3 : p[0] >= 0xF0 && p[0] <= 0xF4 ? 4 : 1;
    for (size_t k = 1; k < len && k < avail; ++k) {
      uint8_t lo = 0x80, hi = 0xBF;
      if (k == 1 && p[0] == 0xE0) lo = 0xA0;
      if (k == 1 && p[0] == 0xED) hi = 0x9F;
      if (k == 1 && p[0] == 0xF0) lo = 0x90;
      if (k == 1 && p[0] == 0xF4) hi = 0x8F;
      if (p[k] < lo || p[k] > hi) break;
      skip = k + 1;
    }
    out += "\xEF\xBF\xBD";
    s.remove_prefix(ok + skip);
  }
  return out;
}

bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Both entry points walk s with the quick check. A char with ccc 0 and quick-check yes is a
// boundary: nothing before it interacts with it, so only the region between the boundaries
// around a failing char is renormalised.
namespace {
template <class OnFail>
bool scan_nfc(std::string_view s, OnFail on_fail) {
  const Tables& t = tables();
  size_t i = 0, boundary = 0;
  int last = 0;
  bool failed = false;
  while (i < s.size()) {
    size_t at = i;
    if (uint8_t(s[i]) < 0x80) { boundary = at, last = 0, ++i; continue; }
    uint16_t p = t.prop(utf8_next(s, i));
    int k = p & 0xFF;
    if (p == 0) { boundary = at, last = 0; continue; }
    if ((p >> 8) == 0 && last <= k) { last = k; continue; }
    size_t end = i;
    while (end < s.size()) {
      size_t j = end;
      uint32_t q = utf8_next(s, j);
      if (q < 0x80 || t.prop(q) == 0) break;
      end = j;
    }
    failed = true;
    if (!on_fail(boundary, end)) return true;
    i = boundary = end, last = 0;
  }
  return failed;
}
}  // namespace

bool nfc_needed(std::string_view s) {
  return scan_nfc(s, [](size_t, size_t) { return false; });
}

std::string nfc(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 16);
  size_t done = 0;
  scan_nfc(s, [&](size_t from, size_t to) {
    out.append(s.substr(done, from - done));
    tables().normalize(s.substr(from, to - from), out);
    done = to;
    return true;
  });
  out.append(s.substr(done));
  return out;
}

}  // namespace automoe::unicode
