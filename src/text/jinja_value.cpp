// text/jinja_value.cpp: the Jinja Value type and the Python rules templates observe through it:
// truthiness, str()/repr() printing, ==/</in, json.dumps, and code point indexing of UTF-8 text.
#include <algorithm>
#include <charconv>
#include <cmath>

#include "text/jinja_impl.h"

namespace automoe::jinja {

// ---- construction ------------------------------------------------------------------------------
static int child_depth(const Value& v) { return v.depth(); }

Value Value::undefined(std::string why) { return Value(Undef{std::make_shared<const std::string>(std::move(why))}); }

Value Value::list(std::vector<Value> items, bool tuple) {
  auto l = std::make_shared<ListData>();
  for (const Value& v : items) l->depth = std::max(l->depth, child_depth(v) + 1);
  if (l->depth > kMaxValueDepth) raise("a list is nested deeper than {} levels", kMaxValueDepth);
  l->items = std::move(items);
  l->tuple = tuple;
  return Value(std::shared_ptr<const ListData>(std::move(l)));
}

static bool hashable(const Value& v) {
  switch (v.kind()) {
    case Value::kList: {
      if (!v.list().tuple) return false;
      for (const Value& x : v.list().items)
        if (!hashable(x)) return false;
      return true;
    }
    case Value::kDict: return false;
    default: return true;
  }
}

Value Value::dict(std::vector<std::pair<Value, Value>> items, bool keys_unique) {
  auto d = std::make_shared<DictData>();
  d->items.reserve(items.size());
  for (auto& kv_in : items) {
    Value& k = kv_in.first;
    Value& v = kv_in.second;
    if (!hashable(k)) raise("unhashable type: '{}'", type_name(k));
    d->depth = std::max(d->depth, std::max(child_depth(k), child_depth(v)) + 1);
    auto it = keys_unique ? d->items.end()
                          : std::find_if(d->items.begin(), d->items.end(), [&](auto& kv) { return equals(kv.first, k); });
    if (it != d->items.end()) it->second = std::move(v);  // Python keeps the first position
    else d->items.emplace_back(std::move(k), std::move(v));
  }
  if (d->depth > kMaxValueDepth) raise("a dict is nested deeper than {} levels", kMaxValueDepth);
  return Value(std::shared_ptr<const DictData>(std::move(d)));
}

Value Value::func(std::string name, Fn fn) {
  return Value(std::shared_ptr<const FuncData>(std::make_shared<FuncData>(FuncData{std::move(name), std::move(fn)})));
}

Value Value::from_json(const nlohmann::ordered_json& j, int depth) {
  using J = nlohmann::ordered_json::value_t;
  if (depth > kMaxValueDepth) raise("a variable is nested deeper than {} levels", kMaxValueDepth);
  switch (j.type()) {
    case J::null: return none();
    case J::boolean: return boolean(j.get<bool>());
    case J::number_integer: return integer(j.get<int64_t>());
    case J::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      return u <= uint64_t(INT64_MAX) ? integer(int64_t(u)) : number(double(u));
    }
    case J::number_float: return number(j.get<double>());
    case J::string: return string(j.get<std::string>());
    case J::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& x : j) items.push_back(from_json(x, depth + 1));
      return list(std::move(items));
    }
    case J::object: {
      std::vector<std::pair<Value, Value>> items;
      items.reserve(j.size());
      for (const auto& [k, x] : j.items()) items.emplace_back(string(k), from_json(x, depth + 1));
      return dict(std::move(items), true);
    }
    default: raise("a variable holds binary data, which templates cannot use");
  }
}

const std::string& Value::undef_why() const {
  static const std::string missing = "a required argument is missing";  // Value(): nothing was given
  const Str& why = std::get<kUndef>(v_).why;
  return why ? *why : missing;
}

const void* Value::identity() const {
  switch (kind()) {
    case kStr: return std::get<kStr>(v_).get();
    case kList: return std::get<kList>(v_).get();
    case kDict: return std::get<kDict>(v_).get();
    case kNs: return std::get<kNs>(v_);
    case kFunc: return std::get<kFunc>(v_).get();
    default: return nullptr;
  }
}

int Value::depth() const {
  if (kind() == kList) return list().depth;
  if (kind() == kDict) return dict().depth;
  return 0;
}

const Value* DictData::get(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k.is(Value::kStr) && k.s() == key) return &v;
  return nullptr;
}

const Value* DictData::get(const Value& key) const {
  if (key.is(Value::kStr)) return get(std::string_view(key.s()));
  for (const auto& [k, v] : items)
    if (equals(k, key)) return &v;
  return nullptr;
}

Value* NsData::get(std::string_view name) {
  for (auto& [k, v] : attrs)
    if (k == name) return &v;
  return nullptr;
}

void NsData::set(const std::string& name, Value v) {
  if (Value* p = get(name)) *p = std::move(v);
  else attrs.emplace_back(name, std::move(v));
}

// ---- arguments -------------------------------------------------------------------------------------
Value Args::get(size_t i, std::string_view name, Value dflt) const {
  if (i < pos.size()) return pos[i];
  for (const auto& [k, v] : kw)
    if (k == name) return v;
  return dflt;
}

bool Args::has(size_t i, std::string_view name) const {
  if (i < pos.size()) return true;
  for (const auto& [k, v] : kw)
    if (k == name) return true;
  return false;
}

Value Args::need(std::string_view fn, size_t i, std::string_view name) const {
  if (!has(i, name)) raise("{}() missing required argument '{}'", fn, name);
  return get(i, name);
}

void Args::check(std::string_view fn, size_t max_pos, std::initializer_list<std::string_view> names) const {
  if (pos.size() > max_pos) raise("{}() takes at most {} argument(s), {} given", fn, max_pos, pos.size());
  for (const auto& [k, v] : kw)
    if (std::find(names.begin(), names.end(), k) == names.end())
      raise("{}() got an unexpected keyword argument '{}'", fn, k);
}

// ---- UTF-8 ---------------------------------------------------------------------------------------
char32_t u8_decode(std::string_view s, size_t i, size_t* len) {
  auto b = [&](size_t k) { return (unsigned char)s[i + k]; };
  unsigned char c = b(0);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 1) { *len = 1; return c; }
  if (n == 0 || i + n > s.size()) { *len = 1; return 0xDC00 + c; }  // invalid: one byte, as surrogateescape
  char32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    if ((b(k) & 0xC0) != 0x80) { *len = 1; return 0xDC00 + c; }
    cp = (cp << 6) | (b(k) & 0x3F);
  }
  *len = n;
  return cp;
}

void u8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) out += char(cp);
  else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
  else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
  }
}

size_t u8_len(std::string_view s) {
  size_t n = 0, len;
  for (size_t i = 0; i < s.size(); i += len, ++n) u8_decode(s, i, &len);
  return n;
}

std::vector<size_t> u8_starts(std::string_view s) {
  std::vector<size_t> out;
  size_t len;
  for (size_t i = 0; i < s.size(); i += len) { out.push_back(i); u8_decode(s, i, &len); }
  out.push_back(s.size());
  return out;
}

bool py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string py_strip(std::string_view s, bool left, bool right, const Value& chars) {
  std::vector<size_t> st = u8_starts(s);
  std::vector<char32_t> set;
  bool ws = chars.is(Value::kNone) || chars.is(Value::kUndef);
  if (!ws) {
    if (!chars.is(Value::kStr)) raise("strip arg must be None or str");
    std::vector<size_t> cs = u8_starts(chars.s());
    for (size_t k = 0; k + 1 < cs.size(); ++k) { size_t l; set.push_back(u8_decode(chars.s(), cs[k], &l)); }
  }
  auto strip = [&](size_t k) {
    size_t l;
    char32_t c = u8_decode(s, st[k], &l);
    return ws ? py_space(c) : std::find(set.begin(), set.end(), c) != set.end();
  };
  size_t a = 0, b = st.size() - 1;
  if (left) while (a < b && strip(a)) ++a;
  if (right) while (b > a && strip(b - 1)) --b;
  return std::string(s.substr(st[a], st[b] - st[a]));
}

// ---- Python semantics --------------------------------------------------------------------------
bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::kUndef: case Value::kNone: return false;
    case Value::kBool: return v.b();
    case Value::kInt: return v.i() != 0;
    case Value::kFloat: return v.f() != 0;
    case Value::kStr: return !v.s().empty();
    case Value::kList: return !v.list().items.empty();
    case Value::kDict: return !v.dict().items.empty();
    default: return true;
  }
}

std::string type_name(const Value& v) {
  switch (v.kind()) {
    case Value::kUndef: return "Undefined";
    case Value::kNone: return "NoneType";
    case Value::kBool: return "bool";
    case Value::kInt: return "int";
    case Value::kFloat: return "float";
    case Value::kStr: return "str";
    case Value::kList: return v.list().tuple ? "tuple" : "list";
    case Value::kDict: return "dict";
    case Value::kNs: return "Namespace";
    default: return "function";
  }
}

// repr(float): the shortest digits that round-trip, in fixed notation for exponents -4..15.
std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, r.ptr), out, digits;
  if (sci[0] == '-') { out = "-"; sci.erase(0, 1); }
  size_t e = sci.find('e');
  for (size_t k = 0; k < e; ++k)
    if (sci[k] != '.') digits += sci[k];
  int exp = std::stoi(sci.substr(e + 1));
  if (exp >= -4 && exp < 16) {
    int point = exp + 1;  // digits before the decimal point
    if (point <= 0) out += "0." + std::string(-point, '0') + digits;
    else if (point >= int(digits.size())) out += digits + std::string(point - digits.size(), '0') + ".0";
    else out += digits.substr(0, point) + "." + digits.substr(point);
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  }
  return out;
}

// str.isprintable(), for the code points that matter in practice: controls, separators, format
// characters and private use are escaped by repr().
static bool printable(char32_t c) {
  if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) return false;
  if (c >= 0xDC80 && c <= 0xDCFF) return false;  // undecodable bytes
  if (c == 0x1680 || (c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F)) return false;
  if ((c >= 0x205F && c <= 0x206F) || c == 0x3000 || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFB)) return false;
  if ((c >= 0xE000 && c <= 0xF8FF) || c >= 0xF0000) return false;
  return true;
}

std::string py_quote(std::string_view s) {
  bool sq = s.find('\'') != std::string_view::npos, dq = s.find('"') != std::string_view::npos;
  char q = sq && !dq ? '"' : '\'';
  std::string out(1, q);
  size_t len;
  for (size_t i = 0; i < s.size(); i += len) {
    char32_t c = u8_decode(s, i, &len);
    if (c == char32_t(q) || c == '\\') { out += '\\'; out += char(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c >= 0xDC80 && c <= 0xDCFF) out += fmt::format("\\x{:02x}", unsigned(c - 0xDC00));
    else if (printable(c)) out.append(s.substr(i, len));
    else if (c < 0x100) out += fmt::format("\\x{:02x}", unsigned(c));
    else if (c < 0x10000) out += fmt::format("\\u{:04x}", unsigned(c));
    else out += fmt::format("\\U{:08x}", unsigned(c));
  }
  return out + q;
}

static void repr_into(std::string& out, const Value& v, int depth);

static void str_into(std::string& out, const Value& v, int depth) {
  switch (v.kind()) {
    case Value::kUndef: return;
    case Value::kNone: out += "None"; return;
    case Value::kBool: out += v.b() ? "True" : "False"; return;
    case Value::kInt: out += std::to_string(v.i()); return;
    case Value::kFloat: out += py_float(v.f()); return;
    case Value::kStr: out += v.s(); return;
    default: repr_into(out, v, depth);
  }
}

static void repr_into(std::string& out, const Value& v, int depth) {
  if (depth > kMaxValueDepth) raise("a value is nested too deeply to print");
  switch (v.kind()) {
    case Value::kUndef: out += "Undefined"; return;
    case Value::kStr: out += py_quote(v.s()); return;
    case Value::kList: {
      const ListData& l = v.list();
      out += l.tuple ? '(' : '[';
      for (size_t k = 0; k < l.items.size(); ++k) {
        if (k) out += ", ";
        repr_into(out, l.items[k], depth + 1);
      }
      if (l.tuple && l.items.size() == 1) out += ',';
      out += l.tuple ? ')' : ']';
      return;
    }
    case Value::kDict: {
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.dict().items) {
        if (!first) out += ", ";
        first = false;
        repr_into(out, k, depth + 1);
        out += ": ";
        repr_into(out, x, depth + 1);
      }
      out += '}';
      return;
    }
    case Value::kNs: {
      out += "<Namespace {";
      bool first = true;
      for (const auto& [k, x] : v.ns().attrs) {
        if (!first) out += ", ";
        first = false;
        out += py_quote(k) + ": ";
        repr_into(out, x, depth + 1);
      }
      out += "}>";
      return;
    }
    case Value::kFunc: out += "<function " + v.func().name + ">"; return;
    default: str_into(out, v, depth);
  }
}

std::string to_str(const Value& v) {
  if (v.is(Value::kStr)) return v.s();
  std::string out;
  str_into(out, v, 0);
  return out;
}

std::string repr(const Value& v) {
  std::string out;
  repr_into(out, v, 0);
  return out;
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is(Value::kFloat) || b.is(Value::kFloat)) return a.f() == b.f();
    return a.i() == b.i();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::kUndef: case Value::kNone: return true;
    case Value::kStr: return a.s() == b.s();
    case Value::kList: {
      const ListData &x = a.list(), &y = b.list();
      if (x.tuple != y.tuple || x.items.size() != y.items.size()) return false;
      for (size_t k = 0; k < x.items.size(); ++k)
        if (!equals(x.items[k], y.items[k])) return false;
      return true;
    }
    case Value::kDict: {
      const DictData &x = a.dict(), &y = b.dict();
      if (x.items.size() != y.items.size()) return false;
      for (const auto& [k, v] : x.items) {
        const Value* w = y.get(k);
        if (!w || !equals(v, *w)) return false;
      }
      return true;
    }
    default: return a.identity() == b.identity();
  }
}

int compare(const Value& a, const Value& b, const char* op) {
  if (a.is(Value::kUndef)) raise("{}", a.undef_why());
  if (b.is(Value::kUndef)) raise("{}", b.undef_why());
  if (a.is_number() && b.is_number()) {
    if (a.is(Value::kFloat) || b.is(Value::kFloat)) return a.f() < b.f() ? -1 : a.f() > b.f() ? 1 : 0;
    return a.i() < b.i() ? -1 : a.i() > b.i() ? 1 : 0;
  }
  if (a.is(Value::kStr) && b.is(Value::kStr)) return a.s().compare(b.s()) < 0 ? -1 : a.s() == b.s() ? 0 : 1;
  if (a.is(Value::kList) && b.is(Value::kList) && a.list().tuple == b.list().tuple) {
    const auto &x = a.list().items, &y = b.list().items;
    for (size_t k = 0; k < x.size() && k < y.size(); ++k)
      if (!equals(x[k], y[k])) return compare(x[k], y[k], op);
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  raise("'{}' not supported between instances of '{}' and '{}'", op, type_name(a), type_name(b));
}

bool contains(const Value& c, const Value& x) {
  switch (c.kind()) {
    case Value::kUndef: return false;  // Undefined iterates as empty
    case Value::kStr:
      if (!x.is(Value::kStr)) raise("'in <string>' requires string as left operand, not {}", type_name(x));
      return c.s().find(x.s()) != std::string::npos;
    case Value::kList:
      for (const Value& v : c.list().items)
        if (equals(v, x)) return true;
      return false;
    case Value::kDict:
      if (!hashable(x)) raise("unhashable type: '{}'", type_name(x));
      return c.dict().get(x) != nullptr;
    default: raise("argument of type '{}' is not iterable", type_name(c));
  }
}

std::vector<Value> iterate(const Value& v) {
  switch (v.kind()) {
    case Value::kUndef: return {};
    case Value::kList: return v.list().items;
    case Value::kDict: {
      std::vector<Value> keys;
      keys.reserve(v.dict().items.size());
      for (const auto& kv : v.dict().items) keys.push_back(kv.first);
      return keys;
    }
    case Value::kStr: {
      std::vector<Value> chars;
      std::vector<size_t> st = u8_starts(v.s());
      chars.reserve(st.size());
      for (size_t k = 0; k + 1 < st.size(); ++k) chars.push_back(Value::string(v.s().substr(st[k], st[k + 1] - st[k])));
      return chars;
    }
    default: raise("'{}' object is not iterable", type_name(v));
  }
}

// ---- json.dumps(ensure_ascii=False) ----------------------------------------------------------------
static void json_string(std::string& out, std::string_view s) {
  out += '"';
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if ((unsigned char)c < 0x20) out += fmt::format("\\u{:04x}", unsigned(c));
        else out += c;
    }
  }
  out += '"';
}

static std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return py_float(d);
}

void to_json(std::string& out, const Value& v, const JsonFormat& f, int level) {
  if (level > kMaxValueDepth) raise("a value is nested too deeply for tojson");
  auto newline = [&](int lvl) {
    if (!f.pretty) return;
    out += '\n';
    for (int k = 0; k < lvl; ++k) out += f.indent;
  };
  switch (v.kind()) {
    case Value::kNone: out += "null"; return;
    case Value::kBool: out += v.b() ? "true" : "false"; return;
    case Value::kInt: out += std::to_string(v.i()); return;
    case Value::kFloat: out += json_float(v.f()); return;
    case Value::kStr: json_string(out, v.s()); return;
    case Value::kList: {
      const auto& items = v.list().items;
      if (items.empty()) { out += "[]"; return; }
      out += '[';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += f.item_sep;
        newline(level + 1);
        to_json(out, items[k], f, level + 1);
      }
      newline(level);
      out += ']';
      return;
    }
    case Value::kDict: {
      std::vector<const std::pair<Value, Value>*> items;
      for (const auto& kv : v.dict().items) items.push_back(&kv);
      if (items.empty()) { out += "{}"; return; }
      if (f.sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) { return compare(a->first, b->first, "<") < 0; });
      out += '{';
      bool first = true;
      for (const auto* kv : items) {
        if (!first) out += f.item_sep;
        first = false;
        newline(level + 1);
        const Value& k = kv->first;
        switch (k.kind()) {
          case Value::kStr: json_string(out, k.s()); break;
          case Value::kFloat: json_string(out, json_float(k.f())); break;
          case Value::kBool: case Value::kInt: case Value::kNone: {
            std::string s;
            to_json(s, k, f, level + 1);
            json_string(out, s);
            break;
          }
          default: raise("keys must be str, int, float, bool or None, not {}", type_name(k));
        }
        out += f.key_sep;
        to_json(out, kv->second, f, level + 1);
      }
      newline(level);
      out += '}';
      return;
    }
    default: raise("Object of type {} is not JSON serializable", type_name(v));
  }
}

}  // namespace automoe::jinja
