// text/jinja_eval.cpp: runs the syntax tree. Scoping follows jinja2: {% set %} writes to the
// innermost frame, and every for-loop iteration and macro call gets a fresh frame, so only a
// namespace() carries values out of a loop. Runtime errors are raised without a line and given
// the line of the innermost node that was being evaluated.
#include <cmath>

#include "text/jinja_impl.h"

namespace automoe::jinja {

// Runs f when the scope ends, also when an error unwinds it (frames live on the C++ stack).
template <class F>
struct Defer {
  F f;
  ~Defer() { f(); }
};
template <class F>
Defer(F) -> Defer<F>;

TemplateError::TemplateError(const std::string& template_name, int line, const std::string& msg)
    : Error(fmt::format("{} line {}: {}", template_name, line, msg)), line(line) {}

Value* Frame::find(std::string_view name) {
  for (auto& [k, v] : vars)
    if (k == name) return &v;
  return nullptr;
}

void Frame::set(const std::string& name, Value v) {
  if (Value* p = find(name)) *p = std::move(v);
  else vars.emplace_back(name, std::move(v));
}

Evaluator::Evaluator(const Program& prog, std::string& out, std::vector<Span>* generation)
    : prog_(prog), out_(&out), top_out_(&out), generation_(generation) {}

void Evaluator::fail(int line, const std::string& msg) const { throw TemplateError(prog_.name, line, msg); }

void Evaluator::run(const nlohmann::ordered_json& vars) {
  try {
    if (!vars.is_null()) {
      AM_CHECK(vars.is_object(), "template variables must be a JSON object, not {}", vars.type_name());
      for (const auto& [k, v] : vars.items()) root_.set(k, Value::from_json(v));
    }
  } catch (const Raise& r) {
    fail(1, r.msg);
  }
  exec(prog_.body);
}

// Runtime guards: one counter for the work a template can do, one for how deep it recurses
// (its syntax nesting is bounded when parsing, macro recursion here).
void Evaluator::step() {
  if (++steps_ > prog_.limits.max_steps)
    raise("the template ran more than {} loop iterations and macro calls (a sandbox limit)", prog_.limits.max_steps);
}

void Evaluator::check_size(size_t n) const {
  if (int64_t(n) > prog_.limits.max_output_bytes)
    raise("the template built a value larger than {} bytes or items (a sandbox limit)", prog_.limits.max_output_bytes);
}

void Evaluator::emit(std::string_view s) {
  if (int64_t(out_->size() + s.size()) > prog_.limits.max_output_bytes)
    raise("the template output exceeds {} bytes (a sandbox limit)", prog_.limits.max_output_bytes);
  out_->append(s);
}

NsData* Evaluator::new_namespace() {
  namespaces_.push_back(std::make_unique<NsData>());
  return namespaces_.back().get();
}

// Renders `body` in `frame` into a string of its own.
std::string Evaluator::capture(const Body& body, Frame& frame) {
  std::string buf;
  std::string* saved_out = out_;
  Frame* saved_frame = frame_;
  Defer restore{[&] { out_ = saved_out, frame_ = saved_frame; }};
  out_ = &buf;
  frame_ = &frame;
  exec(body);
  return buf;
}

Evaluator::Flow Evaluator::exec_in(const Body& body, Frame& frame) {
  Frame* saved = frame_;
  Defer restore{[&] { frame_ = saved; }};
  frame_ = &frame;
  return exec(body);
}

Value Evaluator::lookup(const std::string& name) {
  for (Frame* f = frame_; f; f = f->parent)
    if (Value* v = f->find(name)) return *v;
  if (const Value* g = find_global(name)) return *g;
  return Value::undefined(fmt::format("'{}' is undefined", name));
}

void Evaluator::bind(Frame& f, const std::vector<std::string>& names, const Value& v) {
  if (names.size() == 1) return f.set(names[0], v);
  std::vector<Value> items = iterate(v);
  if (items.size() != names.size()) {
    if (items.size() > names.size()) raise("too many values to unpack (expected {})", names.size());
    raise("not enough values to unpack (expected {}, got {})", names.size(), items.size());
  }
  for (size_t k = 0; k < names.size(); ++k) f.set(names[k], items[k]);
}

// ---- statements ------------------------------------------------------------------------------
Evaluator::Flow Evaluator::exec(const Body& body) {
  for (const StmtP& s : body) {
    Flow f = exec(*s);
    if (f != Flow::kNext) return f;
  }
  return Flow::kNext;
}

Evaluator::Flow Evaluator::exec(const Stmt& s) {
  try {
    Depth depth(*this);
    switch (s.kind) {
      case Stmt::kText: emit(s.text); break;
      case Stmt::kPrint:
        for (const ExprP& e : s.exprs) {
          Value v = eval(*e);
          if (v.is(Value::kStr)) emit(v.s());
          else emit(to_str(v));
        }
        break;
      case Stmt::kIf:
        for (size_t k = 0; k < s.bodies.size(); ++k)
          if (k == s.exprs.size() || truthy(eval(*s.exprs[k]))) return exec(s.bodies[k]);
        break;
      case Stmt::kFor: return exec_for(s);
      case Stmt::kSet: {
        Value v = eval(*s.exprs[0]);
        if (s.attr.empty()) {
          bind(*frame_, s.names, v);
        } else {
          Value ns = lookup(s.names[0]);
          if (!ns.is(Value::kNs)) raise("cannot assign attribute on non-namespace object");
          ns.ns().set(s.attr, std::move(v));
        }
        break;
      }
      case Stmt::kSetBlock: {
        Frame f{frame_, {}};
        hole_ = Value::string(capture(s.bodies[0], f));
        frame_->set(s.names[0], s.exprs[0] ? eval(*s.exprs[0]) : hole_);
        break;
      }
      case Stmt::kFilterBlock: {
        Frame f{frame_, {}};
        hole_ = Value::string(capture(s.bodies[0], f));
        emit(to_str(eval(*s.exprs[0])));
        break;
      }
      case Stmt::kMacro: {
        // A macro sees the variables of the scope it is defined in (loop variables, an outer
        // macro's parameters) as they are now, and the template's top level as it is when called.
        auto scope = std::make_shared<Frame>(Frame{&root_, {}});
        for (Frame* f = frame_; f != &root_; f = f->parent)
          for (const auto& [k, v] : f->vars)
            if (!scope->find(k)) scope->vars.emplace_back(k, v);
        frame_->set(s.text, macro_value(&s, std::move(scope)));
        break;
      }
      case Stmt::kCallBlock: {
        // caller() renders the block in the frame of the call site; it must not outlive it.
        const Stmt* block = &s;
        Frame* site = frame_;
        auto alive = std::make_shared<bool>(true);
        Value caller = Value::func("caller", [block, site, alive](Evaluator& ev, Args& a) {
          if (!*alive) raise("caller() was called after its {{% call %}} block ended");
          return ev.call_macro(*block, a, std::shared_ptr<Frame>(std::shared_ptr<Frame>(), site));  // not owned
        });
        const Expr& call = *s.exprs[0];
        Value fn = eval(*call.kids[0]);
        Args args = eval_args(call, 1);
        args.kw.emplace_back("caller", caller);
        Defer end{[&] { *alive = false; }};
        emit(to_str(this->call(fn, args)));
        break;
      }
      case Stmt::kWith: {
        Frame f{frame_, {}};
        for (size_t k = 0; k < s.names.size(); ++k) f.set(s.names[k], eval(*s.exprs[k]));
        return exec_in(s.bodies[0], f);
      }
      case Stmt::kBreak: return Flow::kBreak;
      case Stmt::kContinue: return Flow::kContinue;
      case Stmt::kGeneration: {
        size_t begin = out_->size();
        Flow f = exec(s.bodies[0]);
        if (generation_ && out_ == top_out_) generation_->push_back(Span{begin, out_->size()});
        return f;
      }
    }
  } catch (const Raise& r) {
    fail(s.line, r.msg);
  }
  return Flow::kNext;
}

Evaluator::Flow Evaluator::exec_for(const Stmt& s) {
  const std::vector<std::string>& names = s.names;
  std::vector<Value> items = iterate(eval(*s.exprs[0]));
  if (const Expr* cond = s.exprs[1].get()) {  // "for x in xs if cond" filters before looping
    std::vector<Value> kept;
    for (Value& v : items) {
      step();
      Frame f{frame_, {}};
      bind(f, names, v);
      Frame* saved = frame_;
      Defer restore{[&] { frame_ = saved; }};
      frame_ = &f;
      if (truthy(eval(*cond))) kept.push_back(std::move(v));
    }
    items = std::move(kept);
  }
  bool completed = false;
  {
    static const Str kIndex = std::make_shared<const std::string>("index"), kIndex0 = std::make_shared<const std::string>("index0"),
                     kRev = std::make_shared<const std::string>("revindex"), kRev0 = std::make_shared<const std::string>("revindex0"),
                     kFirst = std::make_shared<const std::string>("first"), kLast = std::make_shared<const std::string>("last"),
                     kLength = std::make_shared<const std::string>("length"), kDepth = std::make_shared<const std::string>("depth"),
                     kDepth0 = std::make_shared<const std::string>("depth0"), kPrev = std::make_shared<const std::string>("previtem"),
                     kNext = std::make_shared<const std::string>("nextitem"), kCycle = std::make_shared<const std::string>("cycle");
    int64_t n = int64_t(items.size());
    for (int64_t k = 0; k < n; ++k) {
      step();
      Frame f{frame_, {}};
      bind(f, names, items[k]);
      std::vector<std::pair<Value, Value>> loop = {
          {Value::string(kIndex), Value::integer(k + 1)},   {Value::string(kIndex0), Value::integer(k)},
          {Value::string(kRev), Value::integer(n - k)},     {Value::string(kRev0), Value::integer(n - k - 1)},
          {Value::string(kFirst), Value::boolean(k == 0)},  {Value::string(kLast), Value::boolean(k == n - 1)},
          {Value::string(kLength), Value::integer(n)},      {Value::string(kDepth), Value::integer(1)},
          {Value::string(kDepth0), Value::integer(0)},
          {Value::string(kCycle), Value::func("cycle", [k](Evaluator&, Args& a) {
             if (a.pos.empty()) raise("no items for cycling given");
             return a.pos[size_t(k) % a.pos.size()];
           })}};
      if (k > 0) loop.emplace_back(Value::string(kPrev), items[k - 1]);
      if (k + 1 < n) loop.emplace_back(Value::string(kNext), items[k + 1]);
      f.set("loop", Value::dict(std::move(loop), true));
      Flow fl = exec_in(s.bodies[0], f);
      if (fl == Flow::kBreak) break;
      if (fl == Flow::kNext) completed = true;
    }
  }
  // jinja2 runs the else block unless some iteration reached the end of the body: also when
  // every iteration ended in {% continue %}, or the first in {% break %}.
  if (!completed) {
    Frame f{frame_, {}};
    return exec_in(s.bodies[1], f);
  }
  return Flow::kNext;
}

Value Evaluator::macro_value(const Stmt* m, std::shared_ptr<Frame> scope) {
  return Value::func(m->text, [m, scope](Evaluator& ev, Args& a) { return ev.call_macro(*m, a, scope); });
}

Value Evaluator::call_macro(const Stmt& m, Args& a, const std::shared_ptr<Frame>& scope) {
  step();
  if (++call_depth_ > prog_.limits.max_call_depth) {
    --call_depth_;
    raise("macros recurse deeper than {} calls (a sandbox limit)", prog_.limits.max_call_depth);
  }
  struct Depth {
    int& d;
    ~Depth() { --d; }
  } depth{call_depth_};
  Frame f{scope.get(), {}};
  if (m.kind == Stmt::kMacro) f.set(m.text, macro_value(&m, scope));  // so that it can recurse from any scope
  size_t first_default = m.kind == Stmt::kCallBlock ? 1 : 0;
  if (a.pos.size() > m.names.size())
    raise("macro '{}' takes not more than {} argument(s)", m.kind == Stmt::kMacro ? m.text : "caller", m.names.size());
  for (const auto& [k, v] : a.kw) {
    bool known = std::find(m.names.begin(), m.names.end(), k) != m.names.end();
    if (k == "caller" && m.kind == Stmt::kMacro) f.set("caller", v);
    else if (!known) raise("macro '{}' takes no keyword argument '{}'", m.kind == Stmt::kMacro ? m.text : "caller", k);
  }
  {
    Frame* saved = frame_;
    Defer restore{[&] { frame_ = saved; }};
    frame_ = &f;  // defaults may refer to earlier parameters
    for (size_t k = 0; k < m.names.size(); ++k) {
      if (a.has(k, m.names[k])) f.set(m.names[k], a.get(k, m.names[k]));
      else if (const Expr* d = m.exprs[first_default + k].get()) f.set(m.names[k], eval(*d));
      else f.set(m.names[k], Value::undefined(fmt::format("parameter '{}' was not provided", m.names[k])));
    }
  }
  return Value::string(capture(m.bodies[0], f));
}

// ---- expressions -----------------------------------------------------------------------------
Value Evaluator::eval(const Expr& e) {
  try {
    Depth depth(*this);
    return eval_inner(e);
  } catch (const Raise& r) {
    fail(e.line, r.msg);
  }
}

Args Evaluator::eval_args(const Expr& e, size_t first) {
  Args a;
  size_t n_pos = e.kids.size() - e.kw.size();
  for (size_t k = first; k < e.kids.size(); ++k) {
    Value v = eval(*e.kids[k]);
    if (k < n_pos) a.pos.push_back(std::move(v));
    else a.kw.emplace_back(e.kw[k - n_pos], std::move(v));
  }
  return a;
}

Value Evaluator::call(const Value& fn, Args& args) {
  if (fn.is(Value::kUndef)) raise("{}", fn.undef_why());
  if (!fn.is(Value::kFunc)) raise("'{}' object is not callable", type_name(fn));
  return fn.func().fn(*this, args);
}

std::string object_desc(const Value& obj) {
  return obj.is(Value::kNone) ? "None" : type_name(obj) + " object";
}

Value Evaluator::getattr(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::kUndef: raise("{}", obj.undef_why());
    case Value::kNs:
      if (Value* v = obj.ns().get(name)) return *v;
      break;
    case Value::kDict:
      if (!has_method(obj, name))
        if (const Value* v = obj.dict().get(std::string_view(name))) return *v;
      break;
    default: break;
  }
  std::string unsafe = unsafe_method(obj, name);
  if (!unsafe.empty()) return Value::undefined(unsafe);
  if (has_method(obj, name)) {
    Value self = obj;
    return Value::func(name, [self, name](Evaluator& ev, Args& a) {
      Value out;
      call_method(ev, self, name, a, &out);
      return out;
    });
  }
  return Value::undefined(fmt::format("'{}' has no attribute '{}'", object_desc(obj), name));
}

// Python's slice.indices(): the positions a slice visits in a sequence of length n.
static std::vector<int64_t> slice_positions(const Value& start, const Value& stop, const Value& step, int64_t n) {
  auto as_int = [](const Value& v, int64_t dflt) {
    if (v.is(Value::kNone) || v.is(Value::kUndef)) return dflt;
    if (!v.is(Value::kInt) && !v.is(Value::kBool))
      raise("slice indices must be integers or None, not {}", type_name(v));
    return v.i();
  };
  int64_t st = as_int(step, 1);
  if (st == 0) raise("slice step cannot be zero");
  if (st == INT64_MIN) st = -INT64_MAX;
  auto clamp = [&](int64_t i, bool is_start) {
    if (i < 0) {
      i = i < -n ? -1 : i + n;
      if (i < 0) i = st < 0 ? -1 : 0;
    } else if (i >= n) {
      i = st < 0 ? n - 1 : n;
    }
    (void)is_start;
    return i;
  };
  int64_t a = start.is(Value::kNone) || start.is(Value::kUndef) ? (st < 0 ? n - 1 : 0) : clamp(as_int(start, 0), true);
  int64_t b = stop.is(Value::kNone) || stop.is(Value::kUndef) ? (st < 0 ? -1 : n) : clamp(as_int(stop, 0), false);
  std::vector<int64_t> out;
  if (st > 0)
    for (int64_t i = a; i < b; i += st) { out.push_back(i); if (i > INT64_MAX - st) break; }
  else
    for (int64_t i = a; i > b; i += st) { out.push_back(i); if (i < INT64_MIN - st) break; }
  return out;
}

Value Evaluator::getitem(const Value& obj, const Value& key) {
  if (obj.is(Value::kUndef)) raise("{}", obj.undef_why());
  bool int_key = key.is(Value::kInt) || key.is(Value::kBool);
  if (int_key && (obj.is(Value::kList) || obj.is(Value::kStr))) {
    int64_t i = key.i();
    if (obj.is(Value::kList)) {
      int64_t n = int64_t(obj.list().items.size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return obj.list().items[size_t(i)];
    } else {
      std::vector<size_t> st = u8_starts(obj.s());
      int64_t n = int64_t(st.size()) - 1;
      if (i < 0) i += n;
      if (i >= 0 && i < n) return Value::string(obj.s().substr(st[i], st[i + 1] - st[i]));
    }
  } else if (obj.is(Value::kDict)) {
    if (const Value* v = obj.dict().get(key)) return *v;
  } else if (obj.is(Value::kNs) && key.is(Value::kStr)) {
    if (Value* v = obj.ns().get(key.s())) return *v;
  }
  if (key.is(Value::kStr)) {  // jinja2 falls back to the attribute: d['items'] is the method
    std::string unsafe = unsafe_method(obj, key.s());
    if (!unsafe.empty()) return Value::undefined(unsafe);
    if (has_method(obj, key.s())) return getattr(obj, key.s());
    return Value::undefined(fmt::format("'{}' has no attribute '{}'", object_desc(obj), key.s()));
  }
  return Value::undefined(fmt::format("{} has no element {}", object_desc(obj), repr(key)));
}

// a op b on 64-bit integers; Python's are unbounded, so overflow is an error rather than a wrap.
static Value int_op(char op, int64_t a, int64_t b) {
  int64_t r = 0;
  bool overflow = op == '+' ? __builtin_add_overflow(a, b, &r) : op == '-' ? __builtin_sub_overflow(a, b, &r) : __builtin_mul_overflow(a, b, &r);
  if (overflow) raise("integer overflow: the result does not fit in 64 bits");
  return Value::integer(r);
}

Value Evaluator::eval_binary(const Expr& e, const Value& a, const Value& b) {
  const std::string& op = e.name;
  // "%s" % x: printf-style formatting; Python lets any x through, Undefined included.
  if (op == "%" && a.is(Value::kStr)) return Value::string(percent_format(*this, a.s(), b));
  if (a.is(Value::kUndef)) raise("{}", a.undef_why());
  if (b.is(Value::kUndef)) raise("{}", b.undef_why());
  auto unsupported = [&]() -> Value {
    raise("unsupported operand type(s) for {}: '{}' and '{}'", op, type_name(a), type_name(b));
  };
  if (a.is_number() && b.is_number()) {
    bool ints = !a.is(Value::kFloat) && !b.is(Value::kFloat);
    if (op == "+") return ints ? int_op('+', a.i(), b.i()) : Value::number(a.f() + b.f());
    if (op == "-") return ints ? int_op('-', a.i(), b.i()) : Value::number(a.f() - b.f());
    if (op == "*") return ints ? int_op('*', a.i(), b.i()) : Value::number(a.f() * b.f());
    if (op == "/") {
      if (b.f() == 0) raise("division by zero");
      return Value::number(a.f() / b.f());
    }
    if (op == "//" || op == "%") {
      if (ints) {
        if (b.i() == 0) raise("integer division or modulo by zero");
        if (a.i() == INT64_MIN && b.i() == -1) {
          if (op == "%") return Value::integer(0);
          raise("integer overflow: the result does not fit in 64 bits");
        }
        int64_t q = a.i() / b.i(), m = a.i() % b.i();
        if (m != 0 && ((m < 0) != (b.i() < 0))) { --q; m += b.i(); }  // Python floors
        return Value::integer(op == "//" ? q : m);
      }
      // CPython's float divmod.
      double x = a.f(), y = b.f();
      if (y == 0) raise("float division by zero");
      double m = std::fmod(x, y), d = (x - m) / y;
      if (m != 0) {
        if ((y < 0) != (m < 0)) m += y, d -= 1.0;
      } else {
        m = std::copysign(0.0, y);
      }
      if (op == "%") return Value::number(m);
      double fd = d != 0 ? std::floor(d) : std::copysign(0.0, x / y);
      if (d != 0 && d - fd > 0.5) fd += 1.0;
      return Value::number(fd);
    }
    if (op == "**") {
      if (ints && b.i() >= 0) {
        int64_t base = a.i(), ex = b.i(), acc = 1;
        bool of = false;
        while (ex > 0 && !of) {
          if (ex & 1) of |= __builtin_mul_overflow(acc, base, &acc);
          ex >>= 1;
          if (ex > 0) of |= __builtin_mul_overflow(base, base, &base);
        }
        if (of) raise("integer overflow: the result does not fit in 64 bits");
        return Value::integer(acc);
      }
      if (a.f() == 0 && b.f() < 0) raise("0.0 cannot be raised to a negative power");
      double r = std::pow(a.f(), b.f());
      if (std::isinf(r) && std::isfinite(a.f()) && std::isfinite(b.f())) raise("numerical result out of range");
      return Value::number(r);
    }
    return unsupported();
  }
  if (op == "+") {
    if (a.is(Value::kStr) && b.is(Value::kStr)) {
      check_size(a.s().size() + b.s().size());
      return Value::string(a.s() + b.s());
    }
    if (a.is(Value::kList) && b.is(Value::kList) && a.list().tuple == b.list().tuple) {
      check_size(a.list().items.size() + b.list().items.size());
      std::vector<Value> items = a.list().items;
      items.insert(items.end(), b.list().items.begin(), b.list().items.end());
      return Value::list(std::move(items), a.list().tuple);
    }
    if (a.is(Value::kStr) || b.is(Value::kStr)) raise("can only concatenate str (not \"{}\") to str", type_name(a.is(Value::kStr) ? b : a));
    return unsupported();
  }
  if (op == "*") {
    const Value& seq = a.is_number() ? b : a;
    const Value& count = a.is_number() ? a : b;
    if (!count.is(Value::kInt) && !count.is(Value::kBool)) return unsupported();
    int64_t n = std::max<int64_t>(count.i(), 0);
    if (seq.is(Value::kStr)) {
      if (n > 0 && !seq.s().empty()) check_size(seq.s().size() > uint64_t(INT64_MAX) / n ? SIZE_MAX : seq.s().size() * n);
      std::string out;
      for (int64_t k = 0; k < n && !seq.s().empty(); ++k) out += seq.s();
      return Value::string(std::move(out));
    }
    if (seq.is(Value::kList)) {
      size_t m = seq.list().items.size();
      if (n > 0 && m > 0) check_size(m > uint64_t(INT64_MAX) / n ? SIZE_MAX : m * n);
      std::vector<Value> items;
      for (int64_t k = 0; k < n && m > 0; ++k) items.insert(items.end(), seq.list().items.begin(), seq.list().items.end());
      return Value::list(std::move(items), seq.list().tuple);
    }
    return unsupported();
  }
  return unsupported();
}

Value Evaluator::eval_inner(const Expr& e) {
  switch (e.kind) {
    case Expr::kConst: return e.value;
    case Expr::kName:
      if (folding_) throw Impossible{};
      return lookup(e.name);
    case Expr::kHole:
      if (folding_) throw Impossible{};
      return hole_;
    case Expr::kList: case Expr::kTuple: {
      std::vector<Value> items;
      items.reserve(e.kids.size());
      for (const ExprP& k : e.kids) items.push_back(eval(*k));
      return Value::list(std::move(items), e.kind == Expr::kTuple);
    }
    case Expr::kDict: {
      std::vector<std::pair<Value, Value>> items;
      for (size_t k = 0; k + 1 < e.kids.size(); k += 2) {
        Value key = eval(*e.kids[k]);
        items.emplace_back(std::move(key), eval(*e.kids[k + 1]));
      }
      return Value::dict(std::move(items));
    }
    case Expr::kAttr: return getattr(eval(*e.kids[0]), e.name);
    case Expr::kItem: {
      Value obj = eval(*e.kids[0]);
      const Expr& k = *e.kids[1];
      if (k.kind != Expr::kSlice) return getitem(obj, eval(k));
      Value parts[3];
      for (int p = 0; p < 3; ++p)
        if (k.kids[p]) parts[p] = eval(*k.kids[p]);
      if (obj.is(Value::kUndef)) raise("{}", obj.undef_why());
      if (obj.is(Value::kList)) {
        std::vector<Value> out;
        for (int64_t i : slice_positions(parts[0], parts[1], parts[2], int64_t(obj.list().items.size())))
          out.push_back(obj.list().items[size_t(i)]);
        return Value::list(std::move(out), obj.list().tuple);
      }
      if (obj.is(Value::kStr)) {
        std::vector<size_t> st = u8_starts(obj.s());
        std::string out;
        for (int64_t i : slice_positions(parts[0], parts[1], parts[2], int64_t(st.size()) - 1))
          out.append(obj.s(), st[i], st[i + 1] - st[i]);
        return Value::string(std::move(out));
      }
      // jinja2 compiles slices to Python's own x[a:b], so they fail where Python's do, except
      // when its optimizer folds them: that goes through getitem, which yields Undefined.
      if (folding_) return Value::undefined(fmt::format("{} has no element slice", object_desc(obj)));
      if (obj.is(Value::kDict)) raise("unhashable type: 'slice'");
      raise("'{}' object is not subscriptable", type_name(obj));
    }
    case Expr::kSlice: raise("a slice is only allowed inside []");
    case Expr::kCall: {
      const Expr& callee = *e.kids[0];
      if (folding_) throw Impossible{};  // jinja2 never folds calls
      if (callee.kind == Expr::kAttr) {  // obj.method(...) without building a bound method
        Value obj = eval(*callee.kids[0]);
        if (!obj.is(Value::kUndef) && !obj.is(Value::kNs) && has_method(obj, callee.name)) {
          Args a = eval_args(e, 1);
          Value out;
          call_method(*this, obj, callee.name, a, &out);
          return out;
        }
        Value fn = getattr(obj, callee.name);
        Args a = eval_args(e, 1);
        return call(fn, a);
      }
      Value fn = eval(callee);
      Args a = eval_args(e, 1);
      return call(fn, a);
    }
    case Expr::kFilter: {
      if (folding_ && (!e.fn || e.fn->needs_context)) throw Impossible{};
      if (!e.fn) raise("unknown filter '{}'", e.name);  // parsed in an if block, as jinja2 allows
      Value x = eval(*e.kids[0]);
      Args a = eval_args(e, 1);
      return e.fn->filter(*this, x, a);
    }
    case Expr::kTest: {
      if (folding_ && !e.fn) throw Impossible{};
      if (!e.fn) raise("unknown test '{}'", e.name);
      Value x = eval(*e.kids[0]);
      Args a = eval_args(e, 1);
      if (a.pos.size() + a.kw.size() > size_t(e.fn->test_args))
        raise("test '{}' takes {} argument(s) besides the value, {} given", e.name, e.fn->test_args, a.pos.size() + a.kw.size());
      return Value::boolean(e.fn->test(*this, x, a));
    }
    case Expr::kNeg: case Expr::kPos: {
      Value x = eval(*e.kids[0]);
      if (x.is(Value::kUndef)) raise("{}", x.undef_why());
      bool neg = e.kind == Expr::kNeg;
      if (x.is(Value::kFloat)) return Value::number(neg ? -x.f() : x.f());
      if (x.is(Value::kInt) || x.is(Value::kBool)) {
        if (neg && x.i() == INT64_MIN) raise("integer overflow: the result does not fit in 64 bits");
        return Value::integer(neg ? -x.i() : x.i());
      }
      raise("bad operand type for unary {}: '{}'", neg ? '-' : '+', type_name(x));
    }
    case Expr::kNot: return Value::boolean(!truthy(eval(*e.kids[0])));
    case Expr::kAnd: {
      Value a = eval(*e.kids[0]);
      return truthy(a) ? eval(*e.kids[1]) : a;
    }
    case Expr::kOr: {
      Value a = eval(*e.kids[0]);
      return truthy(a) ? a : eval(*e.kids[1]);
    }
    case Expr::kBinary: {
      Value a = eval(*e.kids[0]);
      Value b = eval(*e.kids[1]);
      return eval_binary(e, a, b);
    }
    case Expr::kCompare: {
      Value a = eval(*e.kids[0]);
      for (size_t k = 0; k < e.ops.size(); ++k) {
        Value b = eval(*e.kids[k + 1]);
        const std::string& op = e.ops[k];
        bool r;
        if (op == "==") r = equals(a, b);
        else if (op == "!=") r = !equals(a, b);
        else if (op == "in") r = contains(b, a);
        else if (op == "notin") r = !contains(b, a);
        else {
          int c = compare(a, b, op.c_str());
          r = op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
        }
        if (!r) return Value::boolean(false);
        a = std::move(b);
      }
      return Value::boolean(true);
    }
    case Expr::kCond: {
      if (truthy(eval(*e.kids[0]))) return eval(*e.kids[1]);
      if (e.kids[2]) return eval(*e.kids[2]);
      if (folding_) throw Impossible{};
      return Value::undefined(fmt::format("the inline if-expression on line {} evaluated to false and no else section was defined.", e.line));
    }
    case Expr::kConcat: {
      std::string out;
      for (const ExprP& k : e.kids) {
        out += to_str(eval(*k));
        check_size(out.size());
      }
      return Value::string(std::move(out));
    }
  }
  raise("internal error: unknown expression kind");
}

// ---- constant folding ------------------------------------------------------------------------
// jinja2's optimizer evaluates expressions without variables when it compiles a template and
// keeps results it can write as Python literals; a {{ }} keeps any result. The values are the
// same as at runtime except for slices (see kItem), so folding here keeps those semantics.

// Python literals: what jinja2's has_safe_repr accepts.
static bool literal(const Value& v) {
  if (v.is(Value::kList)) return std::all_of(v.list().items.begin(), v.list().items.end(), literal);
  if (v.is(Value::kDict))
    return std::all_of(v.dict().items.begin(), v.dict().items.end(), [](auto& kv) { return literal(kv.first) && literal(kv.second); });
  return !v.is(Value::kUndef) && !v.is(Value::kNs) && !v.is(Value::kFunc);
}

bool Evaluator::fold(const Expr& e, bool any_value, Value* out) {
  if (e.kind == Expr::kConst) return false;
  folding_ = true;
  Defer reset{[&] { folding_ = false; }};
  try {
    *out = eval(e);
  } catch (const Impossible&) {
    return false;
  } catch (const TemplateError&) {
    return false;  // it fails again at runtime, where it reports its line
  }
  return any_value || literal(*out);
}

void Evaluator::fold_tree(ExprP& e, bool any_value) {
  if (!e) return;
  Value v;
  if (fold(*e, any_value, &v)) {
    ExprP c = std::make_unique<Expr>();
    c->kind = Expr::kConst;
    c->line = e->line;
    c->value = std::move(v);
    e = std::move(c);
    return;
  }
  for (ExprP& k : e->kids) fold_tree(k, false);
}

void Evaluator::fold_tree(Body& body) {
  for (StmtP& s : body) {
    for (ExprP& e : s->exprs) fold_tree(e, s->kind == Stmt::kPrint);
    for (Body& b : s->bodies) fold_tree(b);
  }
}

// ---- Template ----------------------------------------------------------------------------------
Template::Template(std::string_view source, std::string name, Limits limits) {
  auto prog = std::make_shared<Program>();
  prog->name = std::move(name);
  prog->limits = limits;
  prog->body = parse(lex(source, prog->name), prog->name, limits.max_nesting);
  std::string scratch;
  Evaluator(*prog, scratch, nullptr).fold_tree(prog->body);
  prog_ = std::move(prog);
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const nlohmann::ordered_json& vars, std::vector<Span>* generation) const {
  std::string out;
  if (generation) generation->clear();
  Evaluator ev(*prog_, out, generation);
  ev.run(vars);
  return out;
}

}  // namespace automoe::jinja
