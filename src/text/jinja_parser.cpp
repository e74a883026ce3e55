// text/jinja_parser.cpp: tokens -> syntax tree, a recursive descent parser with jinja2's grammar
// and precedence (condexpr < or < and < not < compare < +- < ~ < */ // % < ** < unary < filters,
// tests and postfix). Filters and tests are resolved here, so an unknown one is a syntax error
// as in jinja2 (inside if blocks and conditional expressions only when reached, as jinja2's "soft
// frames"). Nesting is bounded so that hostile input cannot exhaust the stack.
#include <set>

#include "text/jinja_impl.h"

namespace automoe::jinja {
namespace {

class Parser {
 public:
  Parser(std::vector<Token> toks, const std::string& name, int max_nesting)
      : t_(std::move(toks)), name_(name), max_nesting_(max_nesting) {}

  Body parse_template() {
    Body body = subparse({});
    if (cur().type != Tok::kEof) fail("unexpected '" + describe(cur()) + "'");
    return body;
  }

 private:
  // ---- token stream --------------------------------------------------------------------------
  const Token& cur() const { return t_[i_]; }
  const Token& look() const { return t_[std::min(i_ + 1, t_.size() - 1)]; }
  const Token& next() {
    const Token& t = t_[i_];
    if (i_ + 1 < t_.size()) ++i_;
    return t;
  }
  bool is_op(std::string_view op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool is_name(std::string_view n) const { return cur().type == Tok::kName && cur().text == n; }
  bool skip_op(std::string_view op) { return is_op(op) ? (next(), true) : false; }
  bool skip_name(std::string_view n) { return is_name(n) ? (next(), true) : false; }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::kEof: return "end of template";
      case Tok::kVarBegin: return "begin of print statement";
      case Tok::kVarEnd: return "end of print statement";
      case Tok::kBlockBegin: return "begin of statement block";
      case Tok::kBlockEnd: return "end of statement block";
      case Tok::kData: return "template data";
      case Tok::kString: return "string";
      default: return t.text;
    }
  }
  [[noreturn]] void fail(const std::string& msg, int line = 0) const {
    throw TemplateError(name_, line ? line : cur().line, msg);
  }
  void expect_op(std::string_view op) {
    if (!skip_op(op)) fail(fmt::format("expected '{}', got '{}'", op, describe(cur())));
  }
  void expect(Tok type, const char* what) {
    if (cur().type != type) fail(fmt::format("expected {}, got '{}'", what, describe(cur())));
    next();
  }
  std::string expect_name() {
    if (cur().type != Tok::kName) fail(fmt::format("expected a name, got '{}'", describe(cur())));
    return next().text;
  }

  // Recursion guard for the parser's own stack.
  struct Nest {
    Parser& p;
    explicit Nest(Parser& p) : p(p) {
      if (++p.nesting_ > p.max_nesting_) p.fail(fmt::format("the template nests deeper than {} levels", p.max_nesting_));
    }
    ~Nest() { --p.nesting_; }
  };

  ExprP mk(Expr::Kind k, int line, std::vector<ExprP> kids = {}) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line;
    for (const ExprP& c : kids)
      if (c) e->depth = std::max(e->depth, c->depth + 1);
    if (e->depth > max_nesting_) fail(fmt::format("the template nests deeper than {} levels", max_nesting_), line);
    e->kids = std::move(kids);
    return e;
  }
  template <class... E>
  std::vector<ExprP> kids(E&&... e) {
    std::vector<ExprP> v;
    (v.push_back(std::move(e)), ...);
    return v;
  }

  // ---- statements ----------------------------------------------------------------------------
  // Parses template data and tags until one of `end` opens a tag; the current token is then
  // that name. Fails at the end of the template when `end` is not empty.
  Body subparse(const std::vector<std::string_view>& end) {
    Body body;
    while (cur().type != Tok::kEof) {
      const Token& t = cur();
      if (t.type == Tok::kData) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::kText;
        s->line = t.line;
        s->text = t.text;
        body.push_back(std::move(s));
        next();
      } else if (t.type == Tok::kVarBegin) {
        next();
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::kPrint;
        s->line = t.line;
        s->exprs.push_back(parse_tuple(false, true, {}));
        expect(Tok::kVarEnd, "'}}'");
        body.push_back(std::move(s));
      } else if (t.type == Tok::kBlockBegin) {
        next();
        for (std::string_view e : end)
          if (is_name(e)) return body;
        body.push_back(parse_statement());
        expect(Tok::kBlockEnd, "'%}'");
      } else {
        fail("unexpected '" + describe(t) + "'");
      }
    }
    if (!end.empty()) {
      std::string want;
      for (std::string_view e : end) want += (want.empty() ? "'" : " or '") + std::string(e) + "'";
      fail(fmt::format("unexpected end of template; expected {} to close the '{}' on line {}", want, tags_.back().first,
                       tags_.back().second));
    }
    return body;
  }

  Body statements(const std::vector<std::string_view>& end, bool drop_end) {
    skip_op(":");
    expect(Tok::kBlockEnd, "'%}'");
    Body body = subparse(end);
    if (drop_end) next();
    return body;
  }

  StmtP stmt(Stmt::Kind k, int line) {
    auto s = std::make_unique<Stmt>();
    s->kind = k;
    s->line = line;
    return s;
  }

  StmtP parse_statement() {
    Nest nest(*this);
    if (cur().type != Tok::kName) fail(fmt::format("expected a tag name, got '{}'", describe(cur())));
    std::string tag = cur().text;
    int line = cur().line;
    tags_.emplace_back(tag, line);
    StmtP s;
    if (tag == "if") s = parse_if();
    else if (tag == "for") s = parse_for();
    else if (tag == "set") s = parse_set();
    else if (tag == "macro" || tag == "call") s = parse_macro(tag == "call");
    else if (tag == "filter") {
      next();
      s = stmt(Stmt::kFilterBlock, line);
      Soft soft(*this, false);
      s->exprs.push_back(parse_filters(mk(Expr::kHole, line), true));
      s->bodies.push_back(statements({"endfilter"}, true));
    } else if (tag == "with") s = parse_with();
    else if (tag == "generation") {
      next();
      s = stmt(Stmt::kGeneration, line);
      s->bodies.push_back(statements({"endgeneration"}, true));
    } else if (tag == "print") {
      next();
      s = stmt(Stmt::kPrint, line);
      while (cur().type != Tok::kBlockEnd) {
        if (!s->exprs.empty()) expect_op(",");
        s->exprs.push_back(parse_expression());
      }
    } else if (tag == "break" || tag == "continue") {
      if (loops_ == 0) fail(fmt::format("'{}' outside of a loop", tag));
      next();
      s = stmt(tag == "break" ? Stmt::kBreak : Stmt::kContinue, line);
    } else if (tag == "include" || tag == "import" || tag == "from" || tag == "extends" || tag == "block") {
      fail(fmt::format("'{}' is not supported: a chat template is one self-contained file", tag));
    } else {
      tags_.pop_back();
      bool closing = tag.rfind("end", 0) == 0 || tag == "else" || tag == "elif";
      fail(closing ? fmt::format("unexpected '{}'", tag) : fmt::format("unknown tag '{}'", tag));
    }
    tags_.pop_back();
    return s;
  }

  // Sets the parser's "soft frame" flag for a scope: inside if blocks and conditional
  // expressions unknown filters and tests fail only when evaluated; loops, macros and blocks
  // start a new frame that is not soft.
  struct Soft {
    Parser& p;
    bool saved;
    Soft(Parser& p, bool soft) : p(p), saved(p.soft_) { p.soft_ = soft; }
    ~Soft() { p.soft_ = saved; }
  };

  StmtP parse_if() {
    Soft soft(*this, true);
    auto s = stmt(Stmt::kIf, next().line);
    while (true) {
      s->exprs.push_back(parse_tuple(false, false, {}));
      s->bodies.push_back(statements({"elif", "else", "endif"}, false));
      std::string t = next().text;
      if (t == "elif") continue;
      if (t == "else") s->bodies.push_back(statements({"endif"}, true));
      return s;
    }
  }

  StmtP parse_for() {
    auto s = stmt(Stmt::kFor, next().line);
    s->names = parse_targets({"in"});
    if (!skip_name("in")) fail(fmt::format("expected 'in', got '{}'", describe(cur())));
    s->exprs.push_back(parse_tuple(false, false, {"recursive"}));
    s->exprs.push_back(skip_name("if") ? parse_expression() : nullptr);
    if (is_name("recursive")) fail("recursive for loops are not supported");
    Soft soft(*this, false);
    ++loops_;
    s->bodies.push_back(statements({"endfor", "else"}, false));
    --loops_;
    s->bodies.push_back(next().text == "else" ? statements({"endfor"}, true) : Body{});
    return s;
  }

  // Assignment targets: a name or names separated by commas ("for k, v in ...").
  std::vector<std::string> parse_targets(const std::vector<std::string_view>& end) {
    std::vector<std::string> names;
    bool paren = skip_op("(");
    while (true) {
      if (is_name("true") || is_name("false") || is_name("True") || is_name("False") || is_name("none") || is_name("None"))
        fail(fmt::format("cannot assign to '{}'", cur().text));
      names.push_back(expect_name());
      if (!skip_op(",")) break;
      if (cur().type != Tok::kName || std::find(end.begin(), end.end(), cur().text) != end.end()) break;
    }
    if (paren) expect_op(")");
    return names;
  }

  StmtP parse_set() {
    auto s = stmt(Stmt::kSet, next().line);
    if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == ".") {
      s->names.push_back(next().text);  // namespace attribute: {% set ns.attr = ... %}
      next();
      s->attr = expect_name();
    } else {
      s->names = parse_targets({});
    }
    if (skip_op("=")) {
      s->exprs.push_back(parse_tuple(false, true, {}));
      return s;
    }
    if (!s->attr.empty() || s->names.size() != 1) fail("a {% set %} block assigns a single name");
    s->kind = Stmt::kSetBlock;
    Soft soft(*this, false);
    s->exprs.push_back(is_op("|") ? parse_filters(mk(Expr::kHole, s->line), false) : nullptr);
    s->bodies.push_back(statements({"endset"}, true));
    return s;
  }

  // {% macro name(a, b=1) %} and {% call(a) macro(...) %}: parameters in names, their defaults
  // (or null) in exprs; for a call block exprs[0] is the call and the defaults follow.
  StmtP parse_macro(bool call_block) {
    auto s = stmt(call_block ? Stmt::kCallBlock : Stmt::kMacro, next().line);
    if (!call_block) s->text = expect_name();
    std::vector<ExprP> defaults;
    if (!call_block || is_op("(")) {
      expect_op("(");
      while (!is_op(")")) {
        if (!s->names.empty()) expect_op(",");
        if (is_op(")")) break;
        s->names.push_back(expect_name());
        if (skip_op("=")) defaults.push_back(parse_expression());
        else if (!defaults.empty() && defaults.back()) fail("a parameter without default follows one with a default");
        else defaults.push_back(nullptr);
      }
      expect_op(")");
    }
    if (call_block) {
      ExprP call = parse_expression();
      if (call->kind != Expr::kCall) fail("{% call %} expects a macro call", s->line);
      s->exprs.push_back(std::move(call));
    }
    for (ExprP& d : defaults) s->exprs.push_back(std::move(d));
    Soft soft(*this, false);
    int loops = loops_;
    loops_ = 0;  // break/continue do not reach through a macro
    s->bodies.push_back(statements({call_block ? "endcall" : "endmacro"}, true));
    loops_ = loops;
    return s;
  }

  StmtP parse_with() {
    Soft soft(*this, false);
    auto s = stmt(Stmt::kWith, next().line);
    while (cur().type != Tok::kBlockEnd) {
      if (!s->names.empty()) expect_op(",");
      s->names.push_back(expect_name());
      expect_op("=");
      s->exprs.push_back(parse_expression());
    }
    s->bodies.push_back(statements({"endwith"}, true));
    return s;
  }

  // ---- expressions -----------------------------------------------------------------------------
  bool tuple_end(const std::vector<std::string_view>& extra) const {
    if (cur().type == Tok::kVarEnd || cur().type == Tok::kBlockEnd || is_op(")")) return true;
    for (std::string_view e : extra)
      if (is_name(e)) return true;
    return false;
  }

  // Comma-separated expressions: one expression, or a tuple when there is a comma.
  ExprP parse_tuple(bool explicit_parens, bool with_condexpr, const std::vector<std::string_view>& extra) {
    int line = cur().line;
    std::vector<ExprP> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (tuple_end(extra)) break;
      args.push_back(with_condexpr ? parse_expression() : parse_or());
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) fail(fmt::format("expected an expression, got '{}'", describe(cur())));
    }
    return mk(Expr::kTuple, line, std::move(args));
  }

  ExprP parse_expression() { return parse_condexpr(); }

  ExprP parse_condexpr() {
    Nest nest(*this);
    int line = cur().line;
    ExprP e = parse_or();
    while (skip_name("if")) {
      Soft soft(*this, true);
      ExprP cond = parse_or();
      ExprP other = skip_name("else") ? parse_condexpr() : nullptr;
      e = mk(Expr::kCond, line, kids(std::move(cond), std::move(e), std::move(other)));
      line = cur().line;
    }
    return e;
  }

  ExprP parse_or() {
    ExprP e = parse_and();
    while (is_name("or")) {
      int line = next().line;
      e = mk(Expr::kOr, line, kids(std::move(e), parse_and()));
    }
    return e;
  }

  ExprP parse_and() {
    ExprP e = parse_not();
    while (is_name("and")) {
      int line = next().line;
      e = mk(Expr::kAnd, line, kids(std::move(e), parse_not()));
    }
    return e;
  }

  ExprP parse_not() {
    if (!is_name("not")) return parse_compare();
    Nest nest(*this);
    int line = next().line;
    return mk(Expr::kNot, line, kids(parse_not()));
  }

  ExprP parse_compare() {
    int line = cur().line;
    ExprP first = parse_math1();
    std::vector<ExprP> operands;
    std::vector<std::string> ops;
    while (true) {
      if (cur().type == Tok::kOp && (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">="))) {
        ops.push_back(next().text);
      } else if (skip_name("in")) {
        ops.push_back("in");
      } else if (is_name("not") && look().type == Tok::kName && look().text == "in") {
        next(), next();
        ops.push_back("notin");
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return first;
    operands.insert(operands.begin(), std::move(first));
    ExprP e = mk(Expr::kCompare, line, std::move(operands));
    e->ops = std::move(ops);
    return e;
  }

  ExprP binary(ExprP a, const std::string& op, ExprP b, int line) {
    ExprP e = mk(Expr::kBinary, line, kids(std::move(a), std::move(b)));
    e->name = op;
    return e;
  }

  ExprP parse_math1() {
    ExprP e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = next();
      e = binary(std::move(e), t.text, parse_concat(), t.line);
    }
    return e;
  }

  ExprP parse_concat() {
    int line = cur().line;
    std::vector<ExprP> args;
    args.push_back(parse_math2());
    while (skip_op("~")) args.push_back(parse_math2());
    if (args.size() == 1) return std::move(args[0]);
    return mk(Expr::kConcat, line, std::move(args));
  }

  ExprP parse_math2() {
    ExprP e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = next();
      e = binary(std::move(e), t.text, parse_pow(), t.line);
    }
    return e;
  }

  ExprP parse_pow() {
    ExprP e = parse_unary(true);
    while (is_op("**")) {
      int line = next().line;
      e = binary(std::move(e), "**", parse_unary(true), line);
    }
    return e;
  }

  ExprP parse_unary(bool with_filter) {
    Nest nest(*this);
    int line = cur().line;
    ExprP e;
    if (skip_op("-")) e = mk(Expr::kNeg, line, kids(parse_unary(false)));
    else if (skip_op("+")) e = mk(Expr::kPos, line, kids(parse_unary(false)));
    else e = parse_primary();
    e = parse_postfix(std::move(e));
    return with_filter ? parse_filter_expr(std::move(e)) : std::move(e);
  }

  ExprP constant(Value v, int line) {
    ExprP e = mk(Expr::kConst, line);
    e->value = std::move(v);
    return e;
  }

  ExprP parse_primary() {
    const Token& t = cur();
    int line = t.line;
    switch (t.type) {
      case Tok::kName: {
        std::string n = next().text;
        if (n == "true" || n == "True") return constant(Value::boolean(true), line);
        if (n == "false" || n == "False") return constant(Value::boolean(false), line);
        if (n == "none" || n == "None") return constant(Value::none(), line);
        ExprP e = mk(Expr::kName, line);
        e->name = n;
        return e;
      }
      case Tok::kString: {
        std::string s;
        while (cur().type == Tok::kString) s += next().text;  // adjacent strings concatenate
        return constant(Value::string(std::move(s)), line);
      }
      case Tok::kInt: return constant(Value::integer(next().i), line);
      case Tok::kFloat: return constant(Value::number(next().f), line);
      default: break;
    }
    if (skip_op("(")) {
      ExprP e = parse_tuple(true, true, {});
      expect_op(")");
      return e;
    }
    if (is_op("[") || is_op("{")) {
      bool dict = next().text == "{";
      const char* close = dict ? "}" : "]";
      std::vector<ExprP> items;
      while (!is_op(close)) {
        if (!items.empty()) expect_op(",");
        if (is_op(close)) break;
        items.push_back(parse_expression());
        if (dict) {
          expect_op(":");
          items.push_back(parse_expression());
        }
      }
      expect_op(close);
      return mk(dict ? Expr::kDict : Expr::kList, line, std::move(items));
    }
    fail(fmt::format("unexpected '{}'", describe(t)));
  }

  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (is_op(".") || is_op("[")) e = parse_subscript(std::move(e));
      else if (is_op("(")) e = parse_call(std::move(e));
      else return e;
    }
  }

  ExprP parse_filter_expr(ExprP e) {
    while (true) {
      if (is_op("|")) e = parse_filters(std::move(e), false);
      else if (is_name("is")) e = parse_test(std::move(e));
      else if (is_op("(")) e = parse_call(std::move(e));
      else return e;
    }
  }

  ExprP parse_subscript(ExprP obj) {
    const Token& t = next();
    int line = t.line;
    if (t.text == ".") {
      if (cur().type == Tok::kName) {
        ExprP e = mk(Expr::kAttr, line, kids(std::move(obj)));
        e->name = next().text;
        return e;
      }
      if (cur().type != Tok::kInt) fail("expected a name or number after '.'");
      int l = cur().line;
      return mk(Expr::kItem, line, kids(std::move(obj), constant(Value::integer(next().i), l)));
    }
    std::vector<ExprP> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");  // x[] is allowed: it looks up the empty tuple, as in jinja2
    ExprP key = args.size() == 1 ? std::move(args[0]) : mk(Expr::kTuple, line, std::move(args));
    return mk(Expr::kItem, line, kids(std::move(obj), std::move(key)));
  }

  ExprP parse_subscribed() {
    int line = cur().line;
    std::vector<ExprP> parts;
    if (skip_op(":")) {
      parts.push_back(nullptr);
    } else {
      ExprP e = parse_expression();
      if (!skip_op(":")) return e;
      parts.push_back(std::move(e));
    }
    if (is_op(":") || is_op("]") || is_op(",")) parts.push_back(nullptr);
    else parts.push_back(parse_expression());
    if (skip_op(":")) parts.push_back(is_op("]") || is_op(",") ? nullptr : parse_expression());
    else parts.push_back(nullptr);
    return mk(Expr::kSlice, line, std::move(parts));
  }

  // "(a, b, k=v)": positional then keyword arguments, appended to e.kids and e.kw.
  void parse_args(Expr& e) {
    expect_op("(");
    for (bool first = true; !is_op(")"); first = false) {
      if (!first) {
        expect_op(",");
        if (is_op(")")) break;  // trailing comma
      }
      if (is_op("*") || is_op("**")) fail("*args and **kwargs in calls are not supported");
      if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == "=") {
        e.kw.push_back(next().text);
        next();
      } else if (!e.kw.empty()) {
        fail("a positional argument follows a keyword argument");
      }
      ExprP a = parse_expression();
      e.depth = std::max(e.depth, a->depth + 1);
      if (e.depth > max_nesting_) fail(fmt::format("the template nests deeper than {} levels", max_nesting_), e.line);
      e.kids.push_back(std::move(a));
    }
    expect_op(")");
  }

  ExprP parse_call(ExprP callee) {
    ExprP e = mk(Expr::kCall, cur().line, kids(std::move(callee)));
    parse_args(*e);
    return e;
  }

  ExprP parse_filters(ExprP operand, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      int line = cur().line;
      std::string n = expect_name();
      while (skip_op(".")) n += "." + expect_name();
      ExprP e = mk(Expr::kFilter, line, kids(std::move(operand)));
      e->name = n;
      e->fn = find_filter(n);
      if (!e->fn && !soft_) fail(fmt::format("unknown filter '{}'", n), line);
      if (is_op("(")) parse_args(*e);
      operand = std::move(e);
    }
    return operand;
  }

  ExprP parse_test(ExprP operand) {
    int line = next().line;
    bool negated = skip_name("not");
    std::string n = expect_name();
    while (skip_op(".")) n += "." + expect_name();
    ExprP e = mk(Expr::kTest, line, kids(std::move(operand)));
    e->name = n;
    e->fn = find_test(n);
    if (!e->fn && !soft_) fail(fmt::format("unknown test '{}'", n), line);
    if (is_op("(")) {
      parse_args(*e);
    } else if ((cur().type == Tok::kName || cur().type == Tok::kString || cur().type == Tok::kInt ||
                cur().type == Tok::kFloat || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) fail("tests cannot be chained with 'is'");
      ExprP arg = parse_postfix(parse_primary());
      e->depth = std::max(e->depth, arg->depth + 1);
      e->kids.push_back(std::move(arg));
    }
    return negated ? mk(Expr::kNot, line, kids(std::move(e))) : std::move(e);
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  const std::string& name_;
  int max_nesting_;
  int nesting_ = 0;
  int loops_ = 0;
  bool soft_ = false;
  std::vector<std::pair<std::string, int>> tags_;  // open tags, for error messages
};

}  // namespace

Body parse(std::vector<Token> tokens, const std::string& template_name, int max_nesting) {
  return Parser(std::move(tokens), template_name, max_nesting).parse_template();
}

}  // namespace automoe::jinja
