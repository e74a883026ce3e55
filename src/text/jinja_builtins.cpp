// text/jinja_builtins.cpp: jinja2's filters and tests, the str/list/dict methods templates call,
// and the global functions transformers provides (raise_exception, strftime_now) besides
// jinja2's own (range, namespace, dict). Mutating methods (list.append, dict.update, ...) are
// refused as in jinja2's ImmutableSandboxedEnvironment. Case mapping follows Python for the
// Latin, Greek and Cyrillic alphabets; archaic letters and other scripts are left unchanged.
#include <algorithm>
#include <cmath>
#include <ctime>
#include <map>

#include "text/jinja_impl.h"

namespace automoe::jinja {
namespace {

// ---- helpers ---------------------------------------------------------------------------------
std::string text(const Value& v) { return to_str(v); }  // soft_str: Undefined is ""

int64_t as_int(const Value& v, std::string_view what) {
  if (v.is(Value::kInt) || v.is(Value::kBool)) return v.i();
  if (v.is(Value::kUndef)) raise("{}", v.undef_why());
  raise("{} must be an integer, not {}", what, type_name(v));
}

// Python's simple case mapping for ASCII, Latin-1, Latin Extended-A and the basic Greek and
// Cyrillic alphabets: 0 when `c` has no other case (or is outside those ranges).
char32_t to_upper(char32_t c) {
  if (c < 0x80) return c >= 'a' && c <= 'z' ? c - 32 : 0;
  if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c == 0xB5) return 0x39C;
  if (c >= 0x100 && c <= 0x17F) {
    if (c == 0x131) return 'I';
    if (c == 0x17F) return 'S';
    if (c == 0x130 || c == 0x138 || c == 0x149) return 0;
    bool odd_lower = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
    return (c % 2 == 1) == !odd_lower ? c - 1 : 0;
  }
  if (c >= 0x3B1 && c <= 0x3C9) return c == 0x3C2 ? 0x3A3 : c - 32;
  if (c == 0x3AC) return 0x386;
  if (c >= 0x3AD && c <= 0x3AF) return c - 37;
  if (c == 0x3CC) return 0x38C;
  if (c == 0x3CD || c == 0x3CE) return c - 63;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  if (c >= 0x460 && c <= 0x4BF && c % 2 == 1 && !(c >= 0x482 && c <= 0x489)) return c - 1;
  return 0;
}
char32_t to_lower(char32_t c) {
  if (c < 0x80) return c >= 'A' && c <= 'Z' ? c + 32 : 0;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c == 0x178) return 0xFF;
  if (c >= 0x100 && c <= 0x17F) {
    if (c == 0x130) return 'i';  // Python: "i̇"; the dot is dropped here
    if (c == 0x131 || c == 0x138 || c == 0x149 || c == 0x17F) return 0;
    bool odd_lower = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
    return (c % 2 == 0) == !odd_lower ? c + 1 : 0;
  }
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
  if (c == 0x386) return 0x3AC;
  if (c >= 0x388 && c <= 0x38A) return c + 37;
  if (c == 0x38C) return 0x3CC;
  if (c == 0x38E || c == 0x38F) return c + 63;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  if (c >= 0x460 && c <= 0x4BF && c % 2 == 0 && !(c >= 0x482 && c <= 0x489)) return c + 1;
  return 0;
}

std::string map_case(std::string_view s, bool up) {
  std::string out;
  out.reserve(s.size());
  size_t len;
  for (size_t k = 0; k < s.size(); k += len) {
    char32_t c = u8_decode(s, k, &len);
    if (up && c == 0xDF) { out += "SS"; continue; }  // ß
    char32_t m = up ? to_upper(c) : to_lower(c);
    if (m) u8_append(out, m);
    else out.append(s.substr(k, len));
  }
  return out;
}
std::string lower(const std::string& s) { return map_case(s, false); }
std::string upper(const std::string& s) { return map_case(s, true); }
bool is_lower(char32_t c) { return to_upper(c) != 0 || c == 0xDF || c == 0x138 || c == 0x149; }
bool is_upper(char32_t c) { return to_lower(c) != 0; }

// Python's \w, closely enough: ASCII letters, digits, '_', and non-ASCII characters other than
// spaces, punctuation and symbols of the common blocks, and emoji.
bool word_char(char32_t c) {
  if (c < 0x80) return isalnum(int(c)) || c == '_';
  if (c < 0xC0) return c == 0xAA || c == 0xB2 || c == 0xB3 || c == 0xB5 || c == 0xB9 || c == 0xBA || (c >= 0xBC && c <= 0xBE);
  if (c == 0xD7 || c == 0xF7 || py_space(c)) return false;
  if ((c >= 0x2000 && c <= 0x2BFF) || (c >= 0x3000 && c <= 0x303F) || (c >= 0xFF00 && c <= 0xFF0F) || (c >= 0x1F000 && c <= 0x1FAFF))
    return false;
  return !(c >= 0xDC80 && c <= 0xDCFF);
}

// "a.b.0": jinja2's attribute getter for map/sort/selectattr, item lookup first.
Value attr_path(Evaluator& ev, Value v, const Value& attribute) {
  if (attribute.is(Value::kInt)) return ev.getitem(v, attribute);
  std::string path = text(attribute);
  size_t p = 0;
  while (true) {
    size_t q = path.find('.', p);
    std::string part = path.substr(p, q == std::string::npos ? std::string::npos : q - p);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return isdigit((unsigned char)c); });
    v = digits && part.size() < 18 ? ev.getitem(v, Value::integer(std::stoll(part))) : ev.getitem(v, Value::string(part));
    if (q == std::string::npos) return v;
    p = q + 1;
  }
}

// Sort key: the attribute if given, strings lowercased unless case_sensitive.
Value sort_key(Evaluator& ev, const Value& v, const Value& attribute, bool case_sensitive) {
  Value k = attribute.is(Value::kUndef) || attribute.is(Value::kNone) ? v : attr_path(ev, v, attribute);
  if (!case_sensitive && k.is(Value::kStr)) return Value::string(lower(k.s()));
  return k;
}

Value new_list(Evaluator& ev, std::vector<Value> items) {
  ev.check_size(items.size());
  return Value::list(std::move(items));
}

std::string checked(Evaluator& ev, std::string s) {
  ev.check_size(s.size());
  return s;
}

}  // namespace

// printf-style formatting: "%s" % x and the format filter. As in Python, a tuple supplies the
// arguments in turn; anything else is one argument, and a mapping-like value (dict, list,
// Undefined) may also go unused.
std::string percent_format(Evaluator& ev, const std::string& f, const Value& args) {
  Args a;
  if (args.is(Value::kList) && args.list().tuple) a.pos = args.list().items;
  else a.pos.push_back(args);
  bool mapping_like = args.is(Value::kDict) || args.is(Value::kUndef) || (args.is(Value::kList) && !args.list().tuple);
  const Value* mapping = args.is(Value::kDict) ? &args : nullptr;
  std::string out;
  size_t next = 0;
  for (size_t k = 0; k < f.size(); ++k) {
    if (f[k] != '%') { out += f[k]; continue; }
    if (++k >= f.size()) raise("incomplete format");
    Value arg;
    bool have_arg = false;
    if (f[k] == '(') {
      size_t e = f.find(')', k);
      if (e == std::string::npos || !mapping) raise("format requires a mapping");
      const Value* v = mapping->dict().get(std::string_view(f).substr(k + 1, e - k - 1));
      if (!v) raise("format key {} is missing", py_quote(f.substr(k + 1, e - k - 1)));
      arg = *v;
      have_arg = true;
      k = e + 1;
    }
    std::string flags;
    while (k < f.size() && std::string_view("-+ #0").find(f[k]) != std::string_view::npos) flags += f[k++];
    auto number = [&]() {
      int n = 0;
      while (k < f.size() && isdigit((unsigned char)f[k])) {
        n = n * 10 + (f[k++] - '0');
        if (n > 10000) raise("format width or precision is too large");
      }
      return n;
    };
    int width = number(), precision = -1;
    if (k < f.size() && f[k] == '.') { ++k; precision = number(); }
    if (k >= f.size()) raise("incomplete format");
    char conv = f[k];
    if (conv == '%') { out += '%'; continue; }
    if (!have_arg) {
      if (next < a.pos.size()) arg = a.pos[next++];
      else raise("not enough arguments for format string");
    }
    std::string spec = "%" + flags + (width ? std::to_string(width) : "") + (precision >= 0 ? "." + std::to_string(precision) : "");
    char buf[20100];
    switch (conv) {
      case 's': case 'r': case 'a': {
        std::string s = conv == 's' ? text(arg) : repr(arg);
        if (precision >= 0) s = s.substr(0, std::min(s.size(), size_t(precision)));  // bytes; fine for ASCII
        size_t len = u8_len(s);
        if (size_t(width) > len) s = flags.find('-') != std::string::npos ? s + std::string(width - len, ' ') : std::string(width - len, ' ') + s;
        out += s;
        break;
      }
      case 'd': case 'i': case 'u': case 'x': case 'X': case 'o': case 'c': {
        if (!arg.is_number()) raise("%{} format: a real number is required, not {}", conv, type_name(arg));
        double d = arg.f();
        if (conv != 'd' && conv != 'i' && conv != 'u' && arg.is(Value::kFloat)) raise("%{} format: an integer is required, not float", conv);
        if (std::isnan(d) || std::isinf(d) || std::fabs(d) > 9e18) raise("cannot convert float {} to integer", py_float(d));
        int64_t n = arg.is(Value::kFloat) ? int64_t(d) : arg.i();
        if (conv == 'c') {
          if (n < 0 || n > 0x10FFFF) raise("%c arg not in range(0x110000)");
          std::string c;
          u8_append(c, char32_t(n));
          std::string fill(width > 1 ? width - 1 : 0, ' ');
          out += flags.find('-') != std::string::npos ? c + fill : fill + c;
          break;
        }
        // Python's rules, which differ from C's for precision 0 and the '0' flag with a precision.
        int base = conv == 'x' || conv == 'X' ? 16 : conv == 'o' ? 8 : 10;
        uint64_t mag = n < 0 ? 0 - uint64_t(n) : uint64_t(n);
        std::string digits;
        do {
          digits.insert(digits.begin(), "0123456789abcdef"[mag % base]);
          mag /= base;
        } while (mag);
        if (conv == 'X') digits = upper(digits);
        if (precision > int(digits.size())) digits.insert(0, precision - digits.size(), '0');
        auto has = [&](char c) { return flags.find(c) != std::string::npos; };
        std::string sign = n < 0 ? "-" : has('+') ? "+" : has(' ') ? " " : "";
        std::string prefix = has('#') && base != 10 ? std::string("0") + (conv == 'o' ? 'o' : conv) : "";
        size_t len = sign.size() + prefix.size() + digits.size();
        if (size_t(width) <= len) out += sign + prefix + digits;
        else if (has('-')) out += sign + prefix + digits + std::string(width - len, ' ');
        else if (has('0')) out += sign + prefix + std::string(width - len, '0') + digits;
        else out += std::string(width - len, ' ') + sign + prefix + digits;
        break;
      }
      case 'f': case 'F': case 'e': case 'E': case 'g': case 'G': {
        if (!arg.is_number()) raise("must be real number, not {}", type_name(arg));
        snprintf(buf, sizeof buf, (spec + conv).c_str(), arg.f());
        out += buf;
        break;
      }
      default: raise("unsupported format character '{}'", conv);
    }
    ev.check_size(out.size());
  }
  if (!mapping_like && next < a.pos.size()) raise("not all arguments converted during string formatting");
  return out;
}

namespace {

// str.format with "{}", "{0}" and "{name}" fields; format specs are not supported.
std::string brace_format(Evaluator& ev, const std::string& f, const Args& a) {
  std::string out;
  size_t auto_index = 0;
  for (size_t k = 0; k < f.size(); ++k) {
    char c = f[k];
    if (c == '}' ) {
      if (k + 1 < f.size() && f[k + 1] == '}') { out += '}'; ++k; continue; }
      raise("single '}}' encountered in format string");
    }
    if (c != '{') { out += c; continue; }
    if (k + 1 < f.size() && f[k + 1] == '{') { out += '{'; ++k; continue; }
    size_t e = f.find('}', k);
    if (e == std::string::npos) raise("single '{{' encountered in format string");
    std::string field = f.substr(k + 1, e - k - 1);
    char conversion = 0;
    if (size_t bang = field.find('!'); bang != std::string::npos) {
      conversion = bang + 1 < field.size() ? field[bang + 1] : 0;
      field.resize(bang);
    }
    if (field.find(':') != std::string::npos) raise("format specs in str.format are not supported");
    Value v;
    if (field.empty()) {
      if (auto_index >= a.pos.size()) raise("Replacement index {} out of range for positional args tuple", auto_index);
      v = a.pos[auto_index++];
    } else if (std::all_of(field.begin(), field.end(), [](char d) { return isdigit((unsigned char)d); })) {
      size_t i = field.size() < 9 ? std::stoul(field) : SIZE_MAX;
      if (i >= a.pos.size()) raise("Replacement index {} out of range for positional args tuple", field);
      v = a.pos[i];
    } else {
      auto it = std::find_if(a.kw.begin(), a.kw.end(), [&](auto& kv) { return kv.first == field; });
      if (it == a.kw.end()) raise("format key '{}' is missing", field);
      v = it->second;
    }
    out += conversion == 'r' ? repr(v) : text(v);
    ev.check_size(out.size());
    k = e;
  }
  return out;
}

std::vector<std::string> split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right) {
  std::vector<std::string> parts;
  if (sep.is(Value::kNone) || sep.is(Value::kUndef)) {  // runs of whitespace, no empty parts
    std::vector<size_t> st = u8_starts(s);
    size_t n = st.size() - 1;
    auto space = [&](size_t k) { size_t l; return py_space(u8_decode(s, st[k], &l)); };
    if (!from_right) {
      size_t k = 0;
      while (true) {
        while (k < n && space(k)) ++k;
        if (k == n) break;
        if (maxsplit >= 0 && int64_t(parts.size()) == maxsplit) {
          size_t e = n;
          while (e > k && space(e - 1)) --e;
          parts.push_back(s.substr(st[k], st[e] - st[k]));
          break;
        }
        size_t j = k;
        while (j < n && !space(j)) ++j;
        parts.push_back(s.substr(st[k], st[j] - st[k]));
        k = j;
      }
    } else {
      size_t k = n;
      while (true) {
        while (k > 0 && space(k - 1)) --k;
        if (k == 0) break;
        if (maxsplit >= 0 && int64_t(parts.size()) == maxsplit) {
          size_t b = 0;
          while (b < k && space(b)) ++b;
          parts.push_back(s.substr(st[b], st[k] - st[b]));
          break;
        }
        size_t j = k;
        while (j > 0 && !space(j - 1)) --j;
        parts.push_back(s.substr(st[j], st[k] - st[j]));
        k = j;
      }
      std::reverse(parts.begin(), parts.end());
    }
    return parts;
  }
  if (!sep.is(Value::kStr)) raise("must be str or None, not {}", type_name(sep));
  const std::string& d = sep.s();
  if (d.empty()) raise("empty separator");
  if (!from_right) {
    size_t p = 0;
    while (maxsplit < 0 || int64_t(parts.size()) < maxsplit) {
      size_t q = s.find(d, p);
      if (q == std::string::npos) break;
      parts.push_back(s.substr(p, q - p));
      p = q + d.size();
    }
    parts.push_back(s.substr(p));
  } else {
    size_t end = s.size();
    while (maxsplit < 0 || int64_t(parts.size()) < maxsplit) {
      if (end < d.size()) break;
      size_t q = s.rfind(d, end - d.size());
      if (q == std::string::npos) break;
      parts.push_back(s.substr(q + d.size(), end - q - d.size()));
      end = q;
    }
    parts.push_back(s.substr(0, end));
    std::reverse(parts.begin(), parts.end());
  }
  return parts;
}

std::vector<std::string> splitlines(const std::string& s, bool keep) {
  std::vector<std::string> lines;
  size_t p = 0, len;
  for (size_t k = 0; k < s.size(); k += len) {
    char32_t c = u8_decode(s, k, &len);
    bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) continue;
    size_t e = k + len;
    if (c == '\r' && e < s.size() && s[e] == '\n') e++, len++;
    lines.push_back(s.substr(p, (keep ? e : k) - p));
    p = e;
  }
  if (p < s.size()) lines.push_back(s.substr(p));
  return lines;
}

Value str_list(Evaluator& ev, const std::vector<std::string>& parts) {
  std::vector<Value> items;
  items.reserve(parts.size());
  for (const std::string& p : parts) items.push_back(Value::string(p));
  return new_list(ev, std::move(items));
}

std::string replace(Evaluator& ev, const std::string& s, const std::string& old, const std::string& with, int64_t count) {
  std::string out;
  if (old.empty()) {  // Python inserts `with` between characters
    std::vector<size_t> st = u8_starts(s);
    int64_t done = 0;
    for (size_t k = 0; k + 1 <= st.size(); ++k) {
      if (count < 0 || done < count) { out += with; ++done; }
      if (k + 1 < st.size()) out.append(s, st[k], st[k + 1] - st[k]);
      ev.check_size(out.size());
    }
    return out;
  }
  size_t p = 0;
  for (int64_t done = 0; count < 0 || done < count; ++done) {
    size_t q = s.find(old, p);
    if (q == std::string::npos) break;
    out.append(s, p, q - p);
    out += with;
    ev.check_size(out.size());
    p = q + old.size();
  }
  out.append(s, p);
  return checked(ev, std::move(out));
}

// str.islower() / str.isupper(): some cased character, none of the other case.
bool is_cased_lower(const std::string& s, bool want_lower) {
  bool cased = false;
  size_t len;
  for (size_t k = 0; k < s.size(); k += len) {
    char32_t c = u8_decode(s, k, &len);
    if (is_upper(c)) { if (want_lower) return false; cased = true; }
    if (is_lower(c)) { if (!want_lower) return false; cased = true; }
  }
  return cased;
}

std::string capitalize(const std::string& s) {
  if (s.empty()) return s;
  size_t len;
  u8_decode(s, 0, &len);
  return upper(s.substr(0, len)) + lower(s.substr(len));
}

int64_t find_sub(const std::string& s, const std::string& sub, bool from_right) {
  size_t q = from_right ? s.rfind(sub) : s.find(sub);
  return q == std::string::npos ? -1 : int64_t(u8_len(std::string_view(s).substr(0, q)));
}

std::string pad(Evaluator& ev, const std::string& s, const Value& width_v, const Value& fill_v, int align) {
  int64_t width = as_int(width_v, "width");
  std::string fill = fill_v.is(Value::kUndef) ? " " : text(fill_v);
  if (u8_len(fill) != 1) raise("The fill character must be exactly one character long");
  int64_t n = int64_t(u8_len(s));
  if (width <= n) return s;
  ev.check_size(size_t(width) * fill.size());
  int64_t total = width - n, left = align < 0 ? 0 : align > 0 ? total : total / 2 + (total & width & 1);
  std::string out;
  for (int64_t k = 0; k < left; ++k) out += fill;
  out += s;
  for (int64_t k = 0; k < total - left; ++k) out += fill;
  return out;
}

// ---- methods -----------------------------------------------------------------------------------
const std::vector<std::string_view> kStrMethods = {
    "startswith", "endswith", "split", "rsplit", "splitlines", "strip", "lstrip", "rstrip", "lower", "upper",
    "title", "capitalize", "casefold", "swapcase", "replace", "find", "rfind", "index", "rindex", "count", "join",
    "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper", "isnumeric", "isdecimal", "format",
    "removeprefix", "removesuffix", "center", "ljust", "rjust", "zfill", "partition", "rpartition"};
const std::vector<std::string_view> kListMethods = {"index", "count", "copy"};
const std::vector<std::string_view> kDictMethods = {"get", "items", "keys", "values", "copy"};
const std::vector<std::string_view> kListUnsafe = {"append", "clear", "pop", "reverse", "insert", "sort", "extend", "remove"};
const std::vector<std::string_view> kDictUnsafe = {"clear", "pop", "popitem", "setdefault", "update"};

bool in(const std::vector<std::string_view>& names, std::string_view n) {
  return std::find(names.begin(), names.end(), n) != names.end();
}

Value str_method(Evaluator& ev, const std::string& s, std::string_view m, Args& a) {
  auto arg = [&](size_t i, std::string_view name = "") { return a.get(i, name); };
  auto str_arg = [&](size_t i) {
    Value v = arg(i);
    if (!v.is(Value::kStr)) raise("{}() argument must be str, not {}", m, type_name(v));
    return v.s();
  };
  if (m == "startswith" || m == "endswith") {
    Value p = arg(0);
    std::vector<Value> options = p.is(Value::kList) && p.list().tuple ? p.list().items : std::vector<Value>{p};
    for (const Value& o : options) {
      if (!o.is(Value::kStr)) raise("{} first arg must be str or a tuple of str, not {}", m, type_name(o));
      const std::string& x = o.s();
      if (x.size() <= s.size() && (m == "startswith" ? s.compare(0, x.size(), x) == 0 : s.compare(s.size() - x.size(), x.size(), x) == 0))
        return Value::boolean(true);
    }
    return Value::boolean(false);
  }
  if (m == "split" || m == "rsplit") {
    int64_t maxsplit = a.has(1, "maxsplit") ? as_int(arg(1, "maxsplit"), "maxsplit") : -1;
    return str_list(ev, split(s, arg(0, "sep"), maxsplit, m == "rsplit"));
  }
  if (m == "splitlines") {
    Value keep = arg(0, "keepends");
    if (a.has(0, "keepends")) as_int(keep, "keepends");
    return str_list(ev, splitlines(s, truthy(keep)));
  }
  if (m == "strip" || m == "lstrip" || m == "rstrip") return Value::string(py_strip(s, m != "rstrip", m != "lstrip", arg(0)));
  if (m == "lower" || m == "casefold") return Value::string(lower(s));
  if (m == "upper") return Value::string(upper(s));
  if (m == "capitalize") return Value::string(capitalize(s));
  if (m == "swapcase" || m == "title") {  // title: a cased letter after an uncased one starts a word
    std::string out;
    bool prev_cased = false;
    size_t len;
    for (size_t k = 0; k < s.size(); k += len) {
      char32_t c = u8_decode(s, k, &len);
      std::string ch = s.substr(k, len);
      bool cased = is_lower(c) || is_upper(c);
      if (m == "swapcase") out += is_lower(c) ? upper(ch) : lower(ch);
      else out += !cased ? ch : prev_cased ? lower(ch) : upper(ch);
      prev_cased = cased;
    }
    return Value::string(out);
  }
  if (m == "replace") {
    int64_t count = a.has(2, "count") ? as_int(arg(2, "count"), "count") : -1;
    return Value::string(replace(ev, s, str_arg(0), str_arg(1), count));
  }
  if (m == "find" || m == "rfind" || m == "index" || m == "rindex") {
    int64_t r = find_sub(s, str_arg(0), m[0] == 'r');
    if (r < 0 && (m == "index" || m == "rindex")) raise("substring not found");
    return Value::integer(r);
  }
  if (m == "count") {
    std::string sub = str_arg(0);
    if (sub.empty()) return Value::integer(int64_t(u8_len(s)) + 1);
    int64_t n = 0;
    for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
    return Value::integer(n);
  }
  if (m == "join") {
    std::string out;
    bool first = true;
    for (const Value& v : iterate(arg(0))) {
      if (!v.is(Value::kStr)) raise("sequence item: expected str instance, {} found", type_name(v));
      if (!first) out += s;
      first = false;
      out += v.s();
      ev.check_size(out.size());
    }
    return Value::string(out);
  }
  if (m.substr(0, 2) == "is") {
    if (s.empty()) return Value::boolean(false);
    if (m == "islower" || m == "isupper") return Value::boolean(is_cased_lower(s, m == "islower"));
    auto all = [&](auto pred) { return Value::boolean(std::all_of(s.begin(), s.end(), [&](char c) { return pred((unsigned char)c); })); };
    if (m == "isdigit" || m == "isnumeric" || m == "isdecimal") return all([](unsigned char c) { return isdigit(c) != 0; });
    if (m == "isalpha") return all([](unsigned char c) { return isalpha(c) != 0; });
    if (m == "isalnum") return all([](unsigned char c) { return isalnum(c) != 0; });
    if (m == "isspace") {
      size_t len;
      for (size_t k = 0; k < s.size(); k += len)
        if (!py_space(u8_decode(s, k, &len))) return Value::boolean(false);
      return Value::boolean(true);
    }
  }
  if (m == "format") return Value::string(brace_format(ev, s, a));
  if (m == "removeprefix") {
    std::string p = str_arg(0);
    return Value::string(s.compare(0, p.size(), p) == 0 ? s.substr(p.size()) : s);
  }
  if (m == "removesuffix") {
    std::string p = str_arg(0);
    bool ends = p.size() <= s.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
    return Value::string(ends && !p.empty() ? s.substr(0, s.size() - p.size()) : s);
  }
  if (m == "center" || m == "ljust" || m == "rjust")
    return Value::string(pad(ev, s, arg(0, "width"), arg(1, "fillchar"), m == "ljust" ? -1 : m == "rjust" ? 1 : 0));
  if (m == "zfill") {
    int64_t width = as_int(arg(0), "width"), n = int64_t(u8_len(s));
    if (width <= n) return Value::string(s);
    ev.check_size(size_t(width));
    size_t sign = !s.empty() && (s[0] == '-' || s[0] == '+') ? 1 : 0;
    return Value::string(s.substr(0, sign) + std::string(width - n, '0') + s.substr(sign));
  }
  if (m == "partition" || m == "rpartition") {
    std::string sep = str_arg(0);
    if (sep.empty()) raise("empty separator");
    size_t q = m == "partition" ? s.find(sep) : s.rfind(sep);
    std::vector<Value> parts;
    if (q == std::string::npos) {
      Value e = Value::string("");
      parts = m == "partition" ? std::vector<Value>{Value::string(s), e, e} : std::vector<Value>{e, e, Value::string(s)};
    } else {
      parts = {Value::string(s.substr(0, q)), Value::string(sep), Value::string(s.substr(q + sep.size()))};
    }
    return Value::list(std::move(parts), true);
  }
  raise("str has no method '{}'", m);
}

// ---- filters ---------------------------------------------------------------------------------
using FilterFn = Value (*)(Evaluator&, const Value&, Args&);

Value f_abs(Evaluator&, const Value& x, Args& a) {
  a.check("abs", 0, {});
  if (x.is(Value::kFloat)) return Value::number(std::fabs(x.f()));
  if (x.is(Value::kInt) || x.is(Value::kBool)) {
    if (x.i() == INT64_MIN) raise("integer overflow: the result does not fit in 64 bits");
    return Value::integer(std::abs(x.i()));
  }
  raise("bad operand type for abs(): '{}'", type_name(x));
}

Value f_attr(Evaluator& ev, const Value& x, Args& a) {
  a.check("attr", 1, {"name"});
  std::string n = text(a.need("attr", 0, "name"));
  if (x.is(Value::kUndef)) raise("{}", x.undef_why());
  if (x.is(Value::kNs)) {
    if (Value* v = x.ns().get(n)) return *v;
  } else if (has_method(x, n) || !unsafe_method(x, n).empty()) {
    return ev.getattr(x, n);
  }
  return Value::undefined(fmt::format("'{}' has no attribute '{}'", x.is(Value::kNone) ? "None" : type_name(x) + " object", n));
}

Value f_batch(Evaluator& ev, const Value& x, Args& a) {
  a.check("batch", 2, {"linecount", "fill_with"});
  int64_t n = as_int(a.need("batch", 0, "linecount"), "linecount");
  if (n <= 0) raise("batch size must be positive");
  Value fill = a.get(1, "fill_with", Value::none());
  bool do_fill = !fill.is(Value::kNone);
  std::vector<Value> out, cur;
  for (Value& v : iterate(x)) {
    cur.push_back(std::move(v));
    if (int64_t(cur.size()) == n) out.push_back(Value::list(std::move(cur))), cur.clear();
  }
  if (!cur.empty()) {
    while (do_fill && int64_t(cur.size()) < n) cur.push_back(fill);
    out.push_back(Value::list(std::move(cur)));
  }
  return new_list(ev, std::move(out));
}

Value f_capitalize(Evaluator&, const Value& x, Args& a) {
  a.check("capitalize", 0, {});
  return Value::string(capitalize(text(x)));
}

Value f_center(Evaluator& ev, const Value& x, Args& a) {
  a.check("center", 1, {"width"});
  return Value::string(pad(ev, text(x), a.get(0, "width", Value::integer(80)), Value(), 0));
}

Value f_default(Evaluator&, const Value& x, Args& a) {
  a.check("default", 2, {"default_value", "boolean"});
  bool boolean = truthy(a.get(1, "boolean"));
  if (x.is(Value::kUndef) || (boolean && !truthy(x))) return a.get(0, "default_value", Value::string(""));
  return x;
}

Value f_dictsort(Evaluator& ev, const Value& x, Args& a) {
  a.check("dictsort", 3, {"case_sensitive", "by", "reverse"});
  if (!x.is(Value::kDict)) raise("dictsort requires a mapping, not {}", type_name(x));
  bool cs = truthy(a.get(0, "case_sensitive")), rev = truthy(a.get(2, "reverse"));
  std::string by = text(a.get(1, "by", Value::string("key")));
  if (by != "key" && by != "value") raise("You can only sort by either 'key' or 'value'");
  std::vector<std::pair<Value, Value>> items = x.dict().items;
  std::stable_sort(items.begin(), items.end(), [&](auto& p, auto& q) {
    Value kp = sort_key(ev, by == "key" ? p.first : p.second, Value(), cs);
    Value kq = sort_key(ev, by == "key" ? q.first : q.second, Value(), cs);
    return rev ? compare(kq, kp, "<") < 0 : compare(kp, kq, "<") < 0;
  });
  std::vector<Value> out;
  for (auto& [k, v] : items) out.push_back(Value::list({k, v}, true));
  return Value::list(std::move(out));
}

Value f_escape(Evaluator& ev, const Value& x, Args& a) {
  a.check("escape", 0, {});
  std::string out;
  for (char c : text(x)) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return Value::string(checked(ev, std::move(out)));
}

Value f_first(Evaluator&, const Value& x, Args& a) {
  a.check("first", 0, {});
  if (x.is(Value::kList)) {
    if (!x.list().items.empty()) return x.list().items.front();
  } else {
    std::vector<Value> items = iterate(x);
    if (!items.empty()) return items.front();
  }
  return Value::undefined("No first item, sequence was empty.");
}

Value f_last(Evaluator&, const Value& x, Args& a) {
  a.check("last", 0, {});
  if (x.is(Value::kList)) {
    if (!x.list().items.empty()) return x.list().items.back();
  } else {
    std::vector<Value> items = iterate(x);
    if (!items.empty()) return items.back();
  }
  return Value::undefined("No last item, sequence was empty.");
}

// Python's float(str): optional sign, digits, point, exponent, inf/nan; surrounding whitespace.
bool parse_float(const std::string& s0, double* out) {
  std::string s = py_strip(s0, true, true, Value::none());
  std::string t;
  for (size_t k = 0; k < s.size(); ++k)
    if (s[k] != '_' || (k > 0 && k + 1 < s.size() && isdigit((unsigned char)s[k - 1]) && isdigit((unsigned char)s[k + 1]))) t += s[k];
    else return false;
  if (t.empty()) return false;
  std::string l = lower(t);
  size_t sign = l[0] == '+' || l[0] == '-' ? 1 : 0;
  std::string body = l.substr(sign);
  if (body == "inf" || body == "infinity" || body == "nan") {
    double v = body == "nan" ? NAN : INFINITY;
    *out = l[0] == '-' ? -v : v;
    return true;
  }
  if (body.empty() || body.find_first_not_of("0123456789.e+-") != std::string::npos) return false;
  char* end = nullptr;
  *out = std::strtod(t.c_str(), &end);
  return end == t.c_str() + t.size();
}

Value f_float(Evaluator&, const Value& x, Args& a) {
  a.check("float", 1, {"default"});
  if (x.is(Value::kUndef)) raise("{}", x.undef_why());  // float(Undefined) fails in jinja2 too
  if (x.is_number()) return Value::number(x.f());
  double d;
  if (x.is(Value::kStr) && parse_float(x.s(), &d)) return Value::number(d);
  return a.get(0, "default", Value::number(0.0));
}

Value f_format(Evaluator& ev, const Value& x, Args& a) {
  if (!a.kw.empty() && !a.pos.empty()) raise("can't handle positional and keyword arguments at the same time");
  if (!a.kw.empty()) {
    std::vector<std::pair<Value, Value>> m;
    for (auto& [k, v] : a.kw) m.emplace_back(Value::string(k), v);
    return Value::string(percent_format(ev, text(x), Value::dict(std::move(m))));
  }
  return Value::string(percent_format(ev, text(x), Value::list(a.pos, true)));
}

Value f_indent(Evaluator& ev, const Value& x, Args& a) {
  a.check("indent", 3, {"width", "first", "blank"});
  if (x.is(Value::kUndef)) raise("{}", x.undef_why());
  if (!x.is(Value::kStr)) raise("unsupported operand type(s) for +=: '{}' and 'str'", type_name(x));
  Value w = a.get(0, "width", Value::integer(4));
  std::string ind = w.is(Value::kStr) ? w.s() : std::string(size_t(std::clamp<int64_t>(as_int(w, "width"), 0, 10000)), ' ');
  bool first = truthy(a.get(1, "first")), blank = truthy(a.get(2, "blank"));
  // jinja2: (s + "\n").splitlines(), lines after the first indented (blank ones only if `blank`).
  std::vector<std::string> lines = splitlines(text(x) + "\n", false);
  std::string out = first ? ind : "";
  for (size_t k = 0; k < lines.size(); ++k) {
    if (k) out += "\n";
    if (k && (blank || !lines[k].empty())) out += ind;
    out += lines[k];
    ev.check_size(out.size());
  }
  return Value::string(out);
}

Value f_int(Evaluator&, const Value& x, Args& a) {
  a.check("int", 2, {"default", "base"});
  Value dflt = a.get(0, "default", Value::integer(0));
  Value base_v = a.get(1, "base", Value::integer(10));
  // A base that is no integer fails int(value, base); jinja2 then tries int(float(value)).
  int64_t base = base_v.is(Value::kInt) || base_v.is(Value::kBool) ? base_v.i() : 10;
  bool base_ok = base_v.is(Value::kInt) || base_v.is(Value::kBool);
  if (x.is(Value::kUndef)) raise("{}", x.undef_why());  // int(Undefined) fails in jinja2 too
  if (x.is(Value::kInt) || x.is(Value::kBool)) return Value::integer(x.i());
  if (x.is(Value::kFloat)) {
    double d = x.f();
    if (std::isnan(d) || std::isinf(d) || std::fabs(d) >= 9.2e18) return dflt;
    return Value::integer(int64_t(d));
  }
  if (!x.is(Value::kStr)) return dflt;
  std::string s = py_strip(x.s(), true, true, Value::none());
  if (base_ok && base >= 2 && base <= 36 && !s.empty()) {
    size_t k = 0;
    bool neg = false;
    if (s[0] == '+' || s[0] == '-') neg = s[k++] == '-';
    if (base == 16 && s.size() > k + 1 && s[k] == '0' && tolower((unsigned char)s[k + 1]) == 'x') k += 2;
    uint64_t v = 0;
    bool ok = k < s.size();
    for (; k < s.size() && ok; ++k) {
      char c = char(tolower((unsigned char)s[k]));
      int d = isdigit((unsigned char)c) ? c - '0' : isalpha((unsigned char)c) ? c - 'a' + 10 : 99;
      if (c == '_' && k > 0 && k + 1 < s.size()) continue;
      if (d >= base || v > (uint64_t(INT64_MAX) - d) / base) ok = false;
      else v = v * base + d;
    }
    if (ok) return Value::integer(neg ? -int64_t(v) : int64_t(v));
  }
  double d;  // jinja2 falls back to int(float(value))
  if ((base == 10 || !base_ok) && parse_float(s, &d) && std::isfinite(d) && std::fabs(d) < 9.2e18) return Value::integer(int64_t(d));
  return dflt;
}

Value f_items(Evaluator&, const Value& x, Args& a) {
  a.check("items", 0, {});
  if (x.is(Value::kUndef)) return Value::list({});
  if (!x.is(Value::kDict)) raise("Can only get item pairs from a mapping.");
  std::vector<Value> out;
  for (const auto& [k, v] : x.dict().items) out.push_back(Value::list({k, v}, true));
  return Value::list(std::move(out));
}

Value f_join(Evaluator& ev, const Value& x, Args& a) {
  a.check("join", 2, {"d", "attribute"});
  std::string sep = text(a.get(0, "d", Value::string(""))), out;
  Value attribute = a.get(1, "attribute", Value::none());
  bool first = true;
  for (const Value& v : iterate(x)) {
    if (!first) out += sep;
    first = false;
    out += text(attribute.is(Value::kNone) ? v : attr_path(ev, v, attribute));
    ev.check_size(out.size());
  }
  return Value::string(out);
}

Value f_length(Evaluator&, const Value& x, Args& a) {
  a.check("length", 0, {});
  switch (x.kind()) {
    case Value::kUndef: return Value::integer(0);
    case Value::kStr: return Value::integer(int64_t(u8_len(x.s())));
    case Value::kList: return Value::integer(int64_t(x.list().items.size()));
    case Value::kDict: return Value::integer(int64_t(x.dict().items.size()));
    default: raise("object of type '{}' has no len()", type_name(x));
  }
}

Value f_list(Evaluator& ev, const Value& x, Args& a) {
  a.check("list", 0, {});
  return new_list(ev, iterate(x));
}

Value f_lower(Evaluator&, const Value& x, Args& a) {
  a.check("lower", 0, {});
  return Value::string(lower(text(x)));
}

Value f_upper(Evaluator&, const Value& x, Args& a) {
  a.check("upper", 0, {});
  return Value::string(upper(text(x)));
}

Value f_map(Evaluator& ev, const Value& x, Args& a) {
  std::vector<Value> out;
  if (!truthy(x)) return Value::list({});  // jinja2 looks at the arguments only when there are items
  if (a.pos.empty()) {  // map(attribute='name', default=...)
    a.check("map", 0, {"attribute", "default"});
    Value attribute = a.get(99, "attribute");
    if (attribute.is(Value::kUndef)) raise("map requires a filter name or attribute=");
    Value dflt = a.get(99, "default");
    bool has_default = a.has(99, "default");
    for (const Value& v : iterate(x)) {
      Value r = attr_path(ev, v, attribute);
      out.push_back(has_default && r.is(Value::kUndef) ? dflt : r);
    }
  } else {
    std::string name = text(a.pos[0]);
    const Builtin* f = find_filter(name);
    if (!f) raise("No filter named '{}'", name);
    Args rest;
    rest.pos.assign(a.pos.begin() + 1, a.pos.end());
    rest.kw = a.kw;
    for (const Value& v : iterate(x)) {
      Args r = rest;
      out.push_back(f->filter(ev, v, r));
    }
  }
  return new_list(ev, std::move(out));
}

Value min_max(Evaluator& ev, const Value& x, Args& a, bool max) {
  a.check(max ? "max" : "min", 2, {"case_sensitive", "attribute"});
  bool cs = truthy(a.get(0, "case_sensitive"));
  Value attribute = a.get(1, "attribute");
  std::vector<Value> items = iterate(x);
  if (items.empty()) return Value::undefined(fmt::format("No aggregated item, sequence was empty."));
  size_t best = 0;
  for (size_t k = 1; k < items.size(); ++k) {
    int c = compare(sort_key(ev, items[k], attribute, cs), sort_key(ev, items[best], attribute, cs), max ? ">" : "<");
    if (max ? c > 0 : c < 0) best = k;
  }
  return items[best];
}
Value f_max(Evaluator& ev, const Value& x, Args& a) { return min_max(ev, x, a, true); }
Value f_min(Evaluator& ev, const Value& x, Args& a) { return min_max(ev, x, a, false); }

Value f_replace(Evaluator& ev, const Value& x, Args& a) {
  a.check("replace", 3, {"old", "new", "count"});
  Value count = a.get(2, "count", Value::none());
  return Value::string(replace(ev, text(x), text(a.need("replace", 0, "old")), text(a.need("replace", 1, "new")),
                               count.is(Value::kNone) ? -1 : as_int(count, "count")));
}

Value f_reverse(Evaluator&, const Value& x, Args& a) {
  a.check("reverse", 0, {});
  if (x.is(Value::kStr)) {
    std::vector<size_t> st = u8_starts(x.s());
    std::string out;
    for (size_t k = st.size() - 1; k > 0; --k) out.append(x.s(), st[k - 1], st[k] - st[k - 1]);
    return Value::string(out);
  }
  std::vector<Value> items = iterate(x);
  std::reverse(items.begin(), items.end());
  return Value::list(std::move(items));
}

Value f_round(Evaluator&, const Value& x, Args& a) {
  a.check("round", 2, {"precision", "method"});
  int64_t p = as_int(a.get(0, "precision", Value::integer(0)), "precision");
  std::string method = text(a.get(1, "method", Value::string("common")));
  if (!x.is_number()) raise("type {} doesn't define __round__ method", type_name(x));
  double scale = std::pow(10.0, double(std::clamp<int64_t>(p, -300, 300))), v = x.f() * scale;
  if (method == "common") v = std::nearbyint(v);  // Python rounds half to even
  else if (method == "ceil") v = std::ceil(v);
  else if (method == "floor") v = std::floor(v);
  else raise("method must be common, ceil or floor");
  double r = v / scale;
  if (method == "common" && (x.is(Value::kInt) || x.is(Value::kBool)))  // round(int, n) stays an int
    return Value::integer(p >= 0 || !std::isfinite(r) || std::fabs(r) > 9e18 ? x.i() : int64_t(r));
  return Value::number(std::isfinite(r) ? r : x.f());
}

Value f_safe(Evaluator&, const Value& x, Args& a) {
  a.check("safe", 0, {});
  return x.is(Value::kStr) ? x : Value::string(text(x));
}

Value f_select_impl(Evaluator& ev, const Value& x, Args& a, bool attr, bool keep) {
  if (!truthy(x)) return Value::list({});  // as map: arguments are looked at only when there are items
  size_t first = 0;
  Value attribute;
  if (attr) {
    if (a.pos.empty()) raise("selectattr/rejectattr need an attribute name");
    attribute = a.pos[first++];
  }
  const Builtin* test = nullptr;
  if (a.pos.size() > first) {
    std::string name = text(a.pos[first++]);
    test = find_test(name);
    if (!test) raise("No test named '{}'", name);
  }
  Args rest;
  rest.pos.assign(a.pos.begin() + std::min(first, a.pos.size()), a.pos.end());
  rest.kw = a.kw;
  std::vector<Value> out;
  for (const Value& v : iterate(x)) {
    Value subject = attr ? attr_path(ev, v, attribute) : v;
    Args r = rest;
    bool ok = test ? test->test(ev, subject, r) : truthy(subject);
    if (ok == keep) out.push_back(v);
  }
  return new_list(ev, std::move(out));
}
Value f_select(Evaluator& ev, const Value& x, Args& a) { return f_select_impl(ev, x, a, false, true); }
Value f_reject(Evaluator& ev, const Value& x, Args& a) { return f_select_impl(ev, x, a, false, false); }
Value f_selectattr(Evaluator& ev, const Value& x, Args& a) { return f_select_impl(ev, x, a, true, true); }
Value f_rejectattr(Evaluator& ev, const Value& x, Args& a) { return f_select_impl(ev, x, a, true, false); }

Value f_sort(Evaluator& ev, const Value& x, Args& a) {
  a.check("sort", 3, {"reverse", "case_sensitive", "attribute"});
  bool rev = truthy(a.get(0, "reverse")), cs = truthy(a.get(1, "case_sensitive"));
  Value attribute = a.get(2, "attribute");
  std::vector<Value> items = iterate(x);
  std::vector<std::pair<Value, size_t>> keyed;
  for (size_t k = 0; k < items.size(); ++k) keyed.emplace_back(sort_key(ev, items[k], attribute, cs), k);
  std::stable_sort(keyed.begin(), keyed.end(), [&](auto& p, auto& q) {
    return rev ? compare(q.first, p.first, "<") < 0 : compare(p.first, q.first, "<") < 0;
  });
  std::vector<Value> out;
  for (auto& [k, i] : keyed) out.push_back(items[i]);
  return Value::list(std::move(out));
}

Value f_string(Evaluator&, const Value& x, Args& a) {
  a.check("string", 0, {});
  return x.is(Value::kStr) ? x : Value::string(text(x));
}

Value f_sum(Evaluator& ev, const Value& x, Args& a) {
  a.check("sum", 2, {"attribute", "start"});
  Value attribute = a.get(0, "attribute", Value::none());
  Value acc = a.get(1, "start", Value::integer(0));
  for (const Value& v : iterate(x)) {
    Value y = attribute.is(Value::kNone) ? v : attr_path(ev, v, attribute);
    if (!acc.is_number() || !y.is_number()) raise("unsupported operand type(s) for +: '{}' and '{}'", type_name(acc), type_name(y));
    if (acc.is(Value::kFloat) || y.is(Value::kFloat)) acc = Value::number(acc.f() + y.f());
    else {
      int64_t r;
      if (__builtin_add_overflow(acc.i(), y.i(), &r)) raise("integer overflow: the result does not fit in 64 bits");
      acc = Value::integer(r);
    }
  }
  return acc;
}

Value f_title(Evaluator&, const Value& x, Args& a) {
  a.check("title", 0, {});
  std::string s = text(x);
  bool start = true;  // jinja2: words begin after runs of [-\s({\[<]
  size_t len;
  std::string out;
  for (size_t k = 0; k < s.size(); k += len) {
    char32_t c = u8_decode(s, k, &len);
    bool sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || py_space(c);
    std::string ch = s.substr(k, len);
    out += sep ? ch : start ? upper(ch) : lower(ch);
    start = sep;
  }
  return Value::string(out);
}

// transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
Value f_tojson(Evaluator& ev, const Value& x, Args& a) {
  a.check("tojson", 4, {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonFormat f;
  bool ascii = truthy(a.get(0, "ensure_ascii", Value::boolean(false)));
  Value indent = a.get(1, "indent", Value::none());
  if (indent.is(Value::kUndef)) raise("{}", indent.undef_why());
  if (!indent.is(Value::kNone)) {
    f.pretty = true;
    if (indent.is(Value::kStr)) f.indent = indent.s();
    else f.indent = std::string(size_t(std::clamp<int64_t>(as_int(indent, "indent"), 0, 1000)), ' ');
    f.item_sep = ",";
  }
  Value seps = a.get(2, "separators", Value::none());
  if (!seps.is(Value::kNone) && !seps.is(Value::kUndef)) {
    if (!seps.is(Value::kList) || seps.list().items.size() != 2) raise("separators must be an (item_separator, key_separator) pair");
    f.item_sep = text(seps.list().items[0]);
    f.key_sep = text(seps.list().items[1]);
  }
  f.sort_keys = truthy(a.get(3, "sort_keys"));
  std::string out;
  to_json(out, x, f);
  ev.check_size(out.size());
  if (!ascii) return Value::string(std::move(out));
  std::string esc;
  size_t len;
  for (size_t k = 0; k < out.size(); k += len) {
    char32_t c = u8_decode(out, k, &len);
    if (c < 0x80) esc += char(c);
    else if (c < 0x10000) esc += fmt::format("\\u{:04x}", unsigned(c));
    else esc += fmt::format("\\u{:04x}\\u{:04x}", unsigned(0xD800 + ((c - 0x10000) >> 10)), unsigned(0xDC00 + ((c - 0x10000) & 0x3FF)));
  }
  return Value::string(checked(ev, std::move(esc)));
}

Value f_trim(Evaluator&, const Value& x, Args& a) {
  a.check("trim", 1, {"chars"});
  return Value::string(py_strip(text(x), true, true, a.get(0, "chars", Value::none())));
}

Value f_unique(Evaluator& ev, const Value& x, Args& a) {
  a.check("unique", 2, {"case_sensitive", "attribute"});
  bool cs = truthy(a.get(0, "case_sensitive"));
  Value attribute = a.get(1, "attribute");
  std::vector<Value> out, seen;
  for (const Value& v : iterate(x)) {
    Value k = sort_key(ev, v, attribute, cs);
    if (k.is(Value::kDict) || (k.is(Value::kList) && !k.list().tuple)) raise("unhashable type: '{}'", type_name(k));
    if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return equals(s, k); })) {
      seen.push_back(k);
      out.push_back(v);
    }
  }
  return Value::list(std::move(out));
}

Value f_wordcount(Evaluator&, const Value& x, Args& a) {
  a.check("wordcount", 0, {});
  std::string s = text(x);  // jinja2 counts runs of \w: letters, digits and underscore
  int64_t n = 0;
  bool in_word = false;
  size_t len;
  for (size_t k = 0; k < s.size(); k += len) {
    bool w = word_char(u8_decode(s, k, &len));
    n += w && !in_word;
    in_word = w;
  }
  return Value::integer(n);
}

// ---- tests -------------------------------------------------------------------------------------
using TestFn = bool (*)(Evaluator&, const Value&, Args&);

Value test_arg(Args& a, std::string_view test) {
  if (a.pos.size() != 1 || !a.kw.empty()) raise("the '{}' test takes one argument", test);
  return a.pos[0];
}
bool t_defined(Evaluator&, const Value& x, Args&) { return !x.is(Value::kUndef); }
bool t_undefined(Evaluator&, const Value& x, Args&) { return x.is(Value::kUndef); }
bool t_none(Evaluator&, const Value& x, Args&) { return x.is(Value::kNone); }
bool t_boolean(Evaluator&, const Value& x, Args&) { return x.is(Value::kBool); }
bool t_true(Evaluator&, const Value& x, Args&) { return x.is(Value::kBool) && x.b(); }
bool t_false(Evaluator&, const Value& x, Args&) { return x.is(Value::kBool) && !x.b(); }
bool t_integer(Evaluator&, const Value& x, Args&) { return x.is(Value::kInt); }
bool t_float(Evaluator&, const Value& x, Args&) { return x.is(Value::kFloat); }
bool t_number(Evaluator&, const Value& x, Args&) { return x.is_number(); }
bool t_string(Evaluator&, const Value& x, Args&) { return x.is(Value::kStr); }
bool t_mapping(Evaluator&, const Value& x, Args&) { return x.is(Value::kDict); }
bool t_iterable(Evaluator&, const Value& x, Args&) {
  return x.is(Value::kStr) || x.is(Value::kList) || x.is(Value::kDict) || x.is(Value::kUndef);
}
bool t_callable(Evaluator&, const Value& x, Args&) { return x.is(Value::kFunc); }
bool t_sameas(Evaluator&, const Value& x, Args& a) {
  Value y = test_arg(a, "sameas");
  if (x.kind() != y.kind() || x.is(Value::kUndef)) return false;  // every Undefined is a new object
  if (x.identity()) return x.identity() == y.identity();
  return equals(x, y);
}
bool t_eq(Evaluator&, const Value& x, Args& a) { return equals(x, test_arg(a, "eq")); }
bool t_ne(Evaluator&, const Value& x, Args& a) { return !equals(x, test_arg(a, "ne")); }
bool t_lt(Evaluator&, const Value& x, Args& a) { return compare(x, test_arg(a, "lt"), "<") < 0; }
bool t_le(Evaluator&, const Value& x, Args& a) { return compare(x, test_arg(a, "le"), "<=") <= 0; }
bool t_gt(Evaluator&, const Value& x, Args& a) { return compare(x, test_arg(a, "gt"), ">") > 0; }
bool t_ge(Evaluator&, const Value& x, Args& a) { return compare(x, test_arg(a, "ge"), ">=") >= 0; }
bool t_in(Evaluator&, const Value& x, Args& a) { return contains(test_arg(a, "in"), x); }
bool t_divisibleby(Evaluator&, const Value& x, Args& a) {
  Value n = test_arg(a, "divisibleby");
  if (x.is(Value::kFloat) || n.is(Value::kFloat)) {
    if (n.f() == 0) raise("float modulo");
    return std::fmod(x.f(), n.f()) == 0;
  }
  int64_t d = as_int(n, "divisibleby's argument");
  if (d == 0) raise("integer division or modulo by zero");
  return d == -1 || as_int(x, "the value tested by divisibleby") % d == 0;
}
// value % 2, with Python's floored modulo for ints and floats.
double py_mod2(const Value& x, std::string_view test) {
  if (x.is(Value::kUndef)) raise("{}", x.undef_why());
  if (!x.is_number()) raise("the value tested by {} must be a number, not {}", test, type_name(x));
  if (!x.is(Value::kFloat)) return double(((x.i() % 2) + 2) % 2);
  double m = std::fmod(x.f(), 2.0);
  return m < 0 ? m + 2.0 : m;
}
bool t_even(Evaluator&, const Value& x, Args&) { return py_mod2(x, "even") == 0; }
bool t_odd(Evaluator&, const Value& x, Args&) { return py_mod2(x, "odd") == 1; }
bool t_lower(Evaluator&, const Value& x, Args&) { return is_cased_lower(text(x), true); }
bool t_upper(Evaluator&, const Value& x, Args&) { return is_cased_lower(text(x), false); }
bool t_escaped(Evaluator&, const Value&, Args&) { return false; }
bool t_filter(Evaluator&, const Value& x, Args&) { return x.is(Value::kStr) && find_filter(x.s()); }
bool t_test(Evaluator&, const Value& x, Args&) { return x.is(Value::kStr) && find_test(x.s()); }

// ---- globals -----------------------------------------------------------------------------------
Value g_range(Evaluator& ev, Args& a) {
  a.check("range", 3, {});
  if (a.pos.empty()) raise("range expected at least 1 argument, got 0");
  int64_t start = 0, stop, step = 1;
  if (a.pos.size() == 1) stop = as_int(a.pos[0], "range's argument");
  else start = as_int(a.pos[0], "range's argument"), stop = as_int(a.pos[1], "range's argument");
  if (a.pos.size() == 3) step = as_int(a.pos[2], "range's argument");
  if (step == 0) raise("range() arg 3 must not be zero");
  // Count in floating point so that extreme bounds cannot overflow.
  double n = std::max(0.0, std::ceil((double(stop) - double(start)) / double(step)));
  if (n > double(ev.limits().max_range))
    raise("Range too big. The sandbox blocks ranges larger than MAX_RANGE ({}).", ev.limits().max_range);
  std::vector<Value> items;
  for (int64_t k = 0; k < int64_t(n); ++k) items.push_back(Value::integer(start + k * step));
  return Value::list(std::move(items));
}

Value g_namespace(Evaluator& ev, Args& a) {
  NsData* ns = ev.new_namespace();
  for (const Value& p : a.pos) {  // namespace(mapping) copies it
    if (!p.is(Value::kDict)) raise("namespace() takes a mapping or keyword arguments, not {}", type_name(p));
    for (const auto& [k, v] : p.dict().items) ns->set(text(k), v);
  }
  for (const auto& [k, v] : a.kw) ns->set(k, v);
  return Value::ns(ns);
}

Value g_dict(Evaluator&, Args& a) {
  std::vector<std::pair<Value, Value>> items;
  for (const Value& p : a.pos) {
    if (!p.is(Value::kDict)) raise("dict() takes a mapping or keyword arguments, not {}", type_name(p));
    items.insert(items.end(), p.dict().items.begin(), p.dict().items.end());
  }
  for (const auto& [k, v] : a.kw) items.emplace_back(Value::string(k), v);
  return Value::dict(std::move(items));
}

Value g_raise_exception(Evaluator&, Args& a) {
  raise("{}", a.pos.empty() ? std::string("raise_exception() was called") : text(a.pos[0]));
}

Value g_strftime_now(Evaluator&, Args& a) {
  a.check("strftime_now", 1, {});
  std::string f = text(a.get(0, "format"));
  if (f.size() > 1000) raise("strftime_now's format is too long");
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  std::string buf(f.size() * 64 + 64, '\0');
  size_t n = f.empty() ? 0 : std::strftime(buf.data(), buf.size(), f.c_str(), &tm);
  buf.resize(n);
  return Value::string(buf);
}

struct Registry {
  std::map<std::string, Builtin, std::less<>> filters, tests;
  std::map<std::string, Value, std::less<>> globals;
  Registry() {
    const std::pair<const char*, FilterFn> fs[] = {
        {"abs", f_abs}, {"attr", f_attr}, {"batch", f_batch}, {"capitalize", f_capitalize}, {"center", f_center},
        {"count", f_length}, {"d", f_default}, {"default", f_default}, {"dictsort", f_dictsort}, {"e", f_escape},
        {"escape", f_escape}, {"first", f_first}, {"float", f_float}, {"forceescape", f_escape}, {"format", f_format},
        {"indent", f_indent}, {"int", f_int}, {"items", f_items}, {"join", f_join}, {"last", f_last},
        {"length", f_length}, {"list", f_list}, {"lower", f_lower}, {"map", f_map}, {"max", f_max}, {"min", f_min},
{"reject", f_reject}, {"rejectattr", f_rejectattr}, {"replace", f_replace},
        {"reverse", f_reverse}, {"round", f_round}, {"safe", f_safe}, {"select", f_select},
        {"selectattr", f_selectattr}, {"sort", f_sort}, {"string", f_string}, {"sum", f_sum}, {"title", f_title},
        {"tojson", f_tojson}, {"trim", f_trim}, {"unique", f_unique}, {"upper", f_upper}, {"wordcount", f_wordcount}};
    for (auto& [n, f] : fs) filters[n].filter = f;
    for (const char* n : {"map", "select", "reject", "selectattr", "rejectattr"}) filters[n].needs_context = true;
    const std::pair<const char*, TestFn> ts[] = {
        {"defined", t_defined}, {"undefined", t_undefined}, {"none", t_none}, {"boolean", t_boolean},
        {"true", t_true}, {"false", t_false}, {"integer", t_integer}, {"float", t_float}, {"number", t_number},
        {"string", t_string}, {"mapping", t_mapping}, {"sequence", t_iterable}, {"iterable", t_iterable},
        {"callable", t_callable}, {"sameas", t_sameas}, {"eq", t_eq}, {"equalto", t_eq}, {"==", t_eq},
        {"ne", t_ne}, {"!=", t_ne}, {"lt", t_lt}, {"lessthan", t_lt}, {"<", t_lt}, {"le", t_le}, {"<=", t_le},
        {"gt", t_gt}, {"greaterthan", t_gt}, {">", t_gt}, {"ge", t_ge}, {">=", t_ge}, {"in", t_in},
        {"divisibleby", t_divisibleby}, {"even", t_even}, {"odd", t_odd}, {"lower", t_lower}, {"upper", t_upper},
        {"escaped", t_escaped}, {"filter", t_filter}, {"test", t_test}};
    for (auto& [n, t] : ts) tests[n].test = t;
    for (const char* n : {"sameas", "eq", "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le", "<=", "gt", "greaterthan",
                          ">", "ge", ">=", "in", "divisibleby"})
      tests[n].test_args = 1;
    const std::pair<const char*, Value (*)(Evaluator&, Args&)> gs[] = {
        {"range", g_range}, {"namespace", g_namespace}, {"dict", g_dict}, {"raise_exception", g_raise_exception},
        {"strftime_now", g_strftime_now}};
    for (auto& [n, g] : gs) globals.emplace(n, Value::func(n, g));
  }
};

const Registry& registry() {
  static const Registry r;
  return r;
}

}  // namespace

const Builtin* find_filter(std::string_view name) {
  auto it = registry().filters.find(name);
  return it == registry().filters.end() ? nullptr : &it->second;
}

const Builtin* find_test(std::string_view name) {
  auto it = registry().tests.find(name);
  return it == registry().tests.end() ? nullptr : &it->second;
}

const Value* find_global(std::string_view name) {
  auto it = registry().globals.find(name);
  return it == registry().globals.end() ? nullptr : &it->second;
}

bool has_method(const Value& obj, std::string_view name) {
  switch (obj.kind()) {
    case Value::kStr: return in(kStrMethods, name);
    case Value::kList: return in(kListMethods, name);
    case Value::kDict: return in(kDictMethods, name);
    default: return false;
  }
}

std::string unsafe_method(const Value& obj, std::string_view name) {
  bool unsafe = (obj.is(Value::kList) && !obj.list().tuple && in(kListUnsafe, name)) ||
                (obj.is(Value::kDict) && in(kDictUnsafe, name)) || (name.size() > 1 && name.substr(0, 2) == "__");
  if (!unsafe) return "";
  return fmt::format("access to attribute '{}' of '{}' object is unsafe.", name, type_name(obj));
}

bool call_method(Evaluator& ev, const Value& obj, std::string_view m, Args& a, Value* out) {
  if (!has_method(obj, m)) return false;
  if (obj.is(Value::kStr)) {
    *out = str_method(ev, obj.s(), m, a);
  } else if (obj.is(Value::kList)) {
    const auto& items = obj.list().items;
    if (m == "copy") *out = obj;
    else {
      Value x = a.get(0, "value");
      if (m == "count") *out = Value::integer(std::count_if(items.begin(), items.end(), [&](const Value& v) { return equals(v, x); }));
      else {
        auto it = std::find_if(items.begin(), items.end(), [&](const Value& v) { return equals(v, x); });
        if (it == items.end()) raise("{} is not in list", repr(x));
        *out = Value::integer(it - items.begin());
      }
    }
  } else {
    const DictData& d = obj.dict();
    if (m == "get") {
      const Value* v = d.get(a.get(0, "key"));
      *out = v ? *v : a.get(1, "default", Value::none());
    } else if (m == "copy") {
      *out = obj;
    } else {
      std::vector<Value> items;
      for (const auto& [k, v] : d.items)
        items.push_back(m == "keys" ? k : m == "values" ? v : Value::list({k, v}, true));
      *out = Value::list(std::move(items));
    }
  }
  return true;
}

}  // namespace automoe::jinja
