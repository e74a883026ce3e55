// text/jinja_impl.h: internals of the Jinja interpreter shared by its files: the Value type
// (Python's None/bool/int/float/str/list/tuple/dict plus jinja2's Undefined and namespace), the
// syntax tree, and the evaluator that builtins call back into.
//   jinja_value.cpp    Value, Python printing rules (str/repr), json.dumps, UTF-8 helpers
//   jinja_lexer.cpp    source -> tokens, with jinja2's whitespace control
//   jinja_parser.cpp   tokens -> syntax tree
//   jinja_eval.cpp     statements and expressions; Template
//   jinja_builtins.cpp filters, tests, str/list/dict methods, global functions
#pragma once
#include <fmt/format.h>

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "text/jinja.h"

namespace automoe::jinja {

// A runtime error before it knows its line: the innermost node being evaluated catches it and
// rethrows it as a TemplateError naming its line. Not a std::exception on purpose, so that
// nothing else catches it by accident.
struct Raise {
  std::string msg;
};
template <class... A>
[[noreturn]] void raise(fmt::format_string<A...> f, A&&... a) {
  throw Raise{fmt::format(f, std::forward<A>(a)...)};
}

// Deepest list/dict nesting a value may have: printing, comparing and freeing values recurse.
constexpr int kMaxValueDepth = 400;

class Evaluator;
struct Args;
struct ListData;
struct DictData;
struct NsData;
struct FuncData;
using Str = std::shared_ptr<const std::string>;
using Fn = std::function<class Value(Evaluator&, Args&)>;

// jinja2's Undefined: prints empty and is falsy; `why` is the error raised when it is misused
// (attribute access, arithmetic, calls), e.g. "'foo' is undefined".
struct Undef {
  Str why;
};

class Value {
 public:
  enum Kind { kUndef, kNone, kBool, kInt, kFloat, kStr, kList, kDict, kNs, kFunc };

  Value() : v_(Undef{}) {}
  static Value undefined(std::string why);
  static Value none() { return Value(std::nullptr_t{}); }
  static Value boolean(bool b) { return Value(b); }
  static Value integer(int64_t i) { return Value(i); }
  static Value number(double f) { return Value(f); }
  static Value string(std::string s) { return Value(std::make_shared<const std::string>(std::move(s))); }
  static Value string(Str s) { return Value(std::move(s)); }
  static Value list(std::vector<Value> items, bool tuple = false);
  // Later duplicate keys win (checked unless the caller knows the keys are unique).
  static Value dict(std::vector<std::pair<Value, Value>> items, bool keys_unique = false);
  static Value ns(NsData* n) { return Value(n); }                 // owned by the evaluator
  static Value func(std::string name, Fn fn);
  static Value from_json(const nlohmann::ordered_json& j, int depth = 0);

  Kind kind() const { return Kind(v_.index()); }
  bool is(Kind k) const { return kind() == k; }
  bool is_number() const { return kind() == kBool || kind() == kInt || kind() == kFloat; }

  const std::string& undef_why() const;
  bool b() const { return std::get<kBool>(v_); }
  int64_t i() const { return kind() == kBool ? int64_t(b()) : std::get<kInt>(v_); }  // bool or int
  double f() const { return kind() == kFloat ? std::get<kFloat>(v_) : double(i()); }  // any number
  const std::string& s() const { return *std::get<kStr>(v_); }
  const Str& str_ptr() const { return std::get<kStr>(v_); }
  const ListData& list() const { return *std::get<kList>(v_); }
  const DictData& dict() const { return *std::get<kDict>(v_); }
  NsData& ns() const { return *std::get<kNs>(v_); }
  const FuncData& func() const { return *std::get<kFunc>(v_); }
  const void* identity() const;  // the shared object of a container, for `is sameas`
  int depth() const;             // list/dict nesting: 0 for scalars

 private:
  template <class T>
  explicit Value(T x) : v_(std::move(x)) {}
  std::variant<Undef, std::nullptr_t, bool, int64_t, double, Str, std::shared_ptr<const ListData>,
               std::shared_ptr<const DictData>, NsData*, std::shared_ptr<const FuncData>>
      v_;
};

struct ListData {
  std::vector<Value> items;
  bool tuple = false;
  int depth = 1;
};
struct DictData {
  std::vector<std::pair<Value, Value>> items;  // insertion order, as Python dicts
  int depth = 1;
  const Value* get(std::string_view key) const;
  const Value* get(const Value& key) const;
};
struct NsData {
  std::vector<std::pair<std::string, Value>> attrs;
  Value* get(std::string_view name);
  void set(const std::string& name, Value v);
};
struct FuncData {
  std::string name;
  Fn fn;
};

// Call arguments: positional, then keyword.
struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // Argument `i` given by position or by `name`; `dflt` when absent.
  Value get(size_t i, std::string_view name, Value dflt = {}) const;
  bool has(size_t i, std::string_view name) const;
  Value need(std::string_view fn, size_t i, std::string_view name) const;  // fails when absent
  // Fails on more than `max_pos` positional arguments or a keyword not in `names`.
  void check(std::string_view fn, size_t max_pos, std::initializer_list<std::string_view> names) const;
};

// Python semantics over Values (jinja_value.cpp).
bool truthy(const Value& v);
std::string type_name(const Value& v);                // "int", "str", "NoneType", ...
std::string to_str(const Value& v);                   // str(v); Undefined prints ""
std::string repr(const Value& v);                     // repr(v)
std::string py_float(double d);                       // repr(float)
std::string py_quote(std::string_view s);             // repr(str)
bool equals(const Value& a, const Value& b);          // a == b
int compare(const Value& a, const Value& b, const char* op);  // <0, 0, >0; fails when unordered
bool contains(const Value& container, const Value& x);         // x in container
std::vector<Value> iterate(const Value& v);  // for-loop items: list items, dict keys, characters
struct JsonFormat {
  std::string indent;  // per level; empty without indent
  bool pretty = false;
  std::string item_sep = ", ", key_sep = ": ";
  bool sort_keys = false;
};
void to_json(std::string& out, const Value& v, const JsonFormat& fmt, int level = 0);

// UTF-8: Python strings index code points. Invalid bytes count as one code point each.
size_t u8_len(std::string_view s);
std::vector<size_t> u8_starts(std::string_view s);  // code point offsets, then s.size()
char32_t u8_decode(std::string_view s, size_t i, size_t* len);
void u8_append(std::string& out, char32_t cp);
bool py_space(char32_t cp);  // str.isspace()
std::string py_strip(std::string_view s, bool left, bool right, const Value& chars);

// ---- syntax tree ------------------------------------------------------------------------------
struct Expr;
struct Stmt;
using ExprP = std::unique_ptr<Expr>;
using StmtP = std::unique_ptr<Stmt>;
using Body = std::vector<StmtP>;

struct Builtin;  // a filter or test (jinja_builtins.cpp)

struct Expr {
  enum Kind {
    kConst,    // value
    kName,     // name
    kList,     // kids
    kTuple,    // kids
    kDict,     // kids: key, value, key, value...
    kAttr,     // kids[0].name
    kItem,     // kids[0][kids[1]]
    kSlice,    // kids: start, stop, step (each may be null)
    kCall,     // kids[0](kids[1..]); the last kw.size() args are keyword arguments
    kFilter,   // kids[0] | name(kids[1..]); kw as for calls; fn resolved when parsing
    kTest,     // kids[0] is name(kids[1..]); kw as for calls; fn resolved when parsing
    kNeg,      // -kids[0]
    kPos,      // +kids[0]
    kNot,      // not kids[0]
    kAnd,      // kids[0] and kids[1]
    kOr,       // kids[0] or kids[1]
    kBinary,   // kids[0] op kids[1]: op is one of + - * / // % **
    kCompare,  // kids[0] ops[0] kids[1] ops[1] kids[2]...: == != < > <= >= in notin
    kCond,     // kids[1] if kids[0] else kids[2] (kids[2] may be null)
    kConcat,   // kids[0] ~ kids[1] ~ ...
    kHole,     // the value a {% filter %} or {% set %} block pipes into its filters
  };
  Kind kind;
  int line;
  int depth = 1;  // tree height, bounded by Limits::max_nesting
  Value value;
  std::string name;             // kName, kAttr, kFilter, kTest; the operator of kBinary
  std::vector<ExprP> kids;
  std::vector<std::string> kw;  // keyword argument names of kCall/kFilter/kTest
  std::vector<std::string> ops;  // kCompare
  const Builtin* fn = nullptr;   // kFilter, kTest
};

struct Stmt {
  enum Kind {
    kText,         // text
    kPrint,        // {{ exprs[0] }}, or {% print exprs... %}
    kIf,           // if exprs[i]: bodies[i]; one more body when there is an else
    kFor,          // for names in exprs[0] [if exprs[1]]: bodies[0] else: bodies[1]
    kSet,          // names = exprs[0], or names[0].attr = exprs[0]
    kSetBlock,     // names[0] = bodies[0] piped through exprs[0] (a filter chain, or null)
    kMacro,        // macro text(names...) with defaults exprs (null where none): bodies[0]
    kCallBlock,    // call(names...) exprs[0]: bodies[0]; exprs[1..] the defaults
    kFilterBlock,  // bodies[0] piped through exprs[0]
    kWith,         // with names[i] = exprs[i]: bodies[0]
    kBreak,
    kContinue,
    kGeneration,   // transformers' {% generation %}: bodies[0], output range recorded
  };
  Kind kind;
  int line;
  std::string text;  // kText; the macro name of kMacro
  std::string attr;  // kSet on a namespace attribute
  std::vector<ExprP> exprs;
  std::vector<Body> bodies;
  std::vector<std::string> names;
};

struct Program {
  std::string name;
  Limits limits;
  Body body;
};

// ---- lexer and parser -------------------------------------------------------------------------
enum class Tok { kData, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };
struct Token {
  Tok type;
  std::string text;  // data, name, operator, or the unescaped string
  int64_t i = 0;
  double f = 0;
  int line = 1;
};
std::vector<Token> lex(std::string_view source, const std::string& template_name);
Body parse(std::vector<Token> tokens, const std::string& template_name, int max_nesting);

// ---- builtins ---------------------------------------------------------------------------------
struct Builtin {
  Value (*filter)(Evaluator&, const Value&, Args&) = nullptr;
  bool (*test)(Evaluator&, const Value&, Args&) = nullptr;
  int test_args = 0;  // arguments a test takes besides the value
  bool needs_context = false;  // jinja2 cannot fold it at compile time (map, select, ...)
};
const Builtin* find_filter(std::string_view name);
const Builtin* find_test(std::string_view name);
// Global functions: range, namespace, dict, raise_exception, strftime_now.
const Value* find_global(std::string_view name);
// Attribute access on str/list/dict: a bound method, an "unsafe" Undefined for mutating methods,
// or nullptr when `name` is no method.
bool call_method(Evaluator& ev, const Value& obj, std::string_view name, Args& args, Value* out);
bool has_method(const Value& obj, std::string_view name);
// Python's str % args: args is a tuple, a mapping, or one value.
std::string percent_format(Evaluator& ev, const std::string& format, const Value& args);
std::string object_desc(const Value& obj);  // "dict object", "None": how jinja2 names a value
std::string unsafe_method(const Value& obj, std::string_view name);  // "" when safe

// ---- evaluator --------------------------------------------------------------------------------
struct Frame {
  Frame* parent = nullptr;
  std::vector<std::pair<std::string, Value>> vars;
  Value* find(std::string_view name);
  void set(const std::string& name, Value v);
};

class Evaluator {
 public:
  Evaluator(const Program& prog, std::string& out, std::vector<Span>* generation);
  void run(const nlohmann::ordered_json& vars);

  Value eval(const Expr& e);
  Value call(const Value& fn, Args& args);
  Value getattr(const Value& obj, const std::string& name);
  Value getitem(const Value& obj, const Value& key);
  NsData* new_namespace();
  // Replaces expressions without variables by their values, as jinja2's optimizer does.
  void fold_tree(Body& body);
  void check_size(size_t bytes_or_items) const;  // fails past Limits::max_output_bytes
  const Limits& limits() const { return prog_.limits; }

 private:
  enum class Flow { kNext, kBreak, kContinue };
  Flow exec(const Body& body);
  Flow exec(const Stmt& s);
  Flow exec_for(const Stmt& s);
  Flow exec_in(const Body& body, Frame& frame);
  Value eval_inner(const Expr& e);
  Value eval_binary(const Expr& e, const Value& a, const Value& b);
  Args eval_args(const Expr& e, size_t first);
  Value lookup(const std::string& name);
  void bind(Frame& f, const std::vector<std::string>& names, const Value& v);
  void emit(std::string_view s);
  std::string capture(const Body& body, Frame& frame);
  // Runs a macro, or a call block's body for caller(), in a frame under `scope`.
  Value call_macro(const Stmt& m, Args& args, const std::shared_ptr<Frame>& scope);
  Value macro_value(const Stmt* m, std::shared_ptr<Frame> scope);
  struct Impossible {};  // thrown while folding: the expression needs the runtime
  bool fold(const Expr& e, bool any_value, Value* out);
  void fold_tree(ExprP& e, bool any_value);
  void step();
  // Bounds the evaluator's recursion: syntax nesting times macro recursion.
  struct Depth {
    Evaluator& ev;
    explicit Depth(Evaluator& e) : ev(e) {
      if (++ev.depth_ > 8 * ev.prog_.limits.max_nesting) {
        --ev.depth_;
        raise("the template recurses deeper than {} levels (a sandbox limit)", 8 * ev.prog_.limits.max_nesting);
      }
    }
    ~Depth() { --ev.depth_; }
  };
  [[noreturn]] void fail(int line, const std::string& msg) const;

  const Program& prog_;
  std::string* out_;      // where output goes now: the result, or a macro's or block's capture
  std::string* top_out_;  // the result
  std::vector<Span>* generation_;
  Frame root_;
  Frame* frame_ = &root_;
  Value hole_;
  bool folding_ = false;  // evaluating at parse time, as jinja2's optimizer does
  int64_t steps_ = 0;
  int depth_ = 0, call_depth_ = 0;
  std::vector<std::unique_ptr<NsData>> namespaces_;  // namespaces live as long as the render
};

}  // namespace automoe::jinja
