// tests/chat/test_jinja.cpp: the Jinja interpreter against real jinja2 (golden outputs recorded by
// make_jinja_cases.py in jinja_cases.json), plus error messages, undefined values, sandbox limits
// and inputs the fuzzer found (fuzz_regressions below).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "text/jinja.h"

using automoe::jinja::Limits;
using automoe::jinja::Span;
using automoe::jinja::Template;
using automoe::jinja::TemplateError;
using json = nlohmann::ordered_json;

namespace {

std::string render(std::string_view src, const json& vars = json::object(), Limits limits = {}) {
  return Template(src, "template", limits).render(vars);
}

// The message of the TemplateError that rendering `src` throws ("" when it renders).
std::string error_of(std::string_view src, const json& vars = json::object(), Limits limits = {}) {
  try {
    render(src, vars, limits);
  } catch (const TemplateError& e) {
    return e.what();
  }
  return "";
}

json load_golden() {
  std::ifstream in(std::string(AUTOMOE_SOURCE_DIR) + "/tests/chat/jinja_cases.json");
  if (!in) return json();
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

const json& golden() {
  static const json g = load_golden();
  return g;
}

std::vector<std::string> golden_names() {
  std::vector<std::string> names;
  if (golden().is_object())
    for (const auto& c : golden()["cases"]) names.push_back(c["name"].get<std::string>());
  return names;
}

class JinjaGolden : public testing::TestWithParam<std::string> {};

TEST_P(JinjaGolden, MatchesJinja2) {
  const json* found = nullptr;
  for (const auto& c : golden()["cases"])
    if (c["name"] == GetParam()) found = &c;
  ASSERT_TRUE(found);
  const json& c = *found;
  const std::string src = c["template"].get<std::string>();
  SCOPED_TRACE("template: " + src);
  if (c.contains("text")) {
    std::string out;
    ASSERT_NO_THROW(out = render(src, golden()["vars"])) << error_of(src, golden()["vars"]);
    EXPECT_EQ(out, c["text"].get<std::string>());
  } else {
    try {
      std::string out = render(src, golden()["vars"]);
      ADD_FAILURE() << "rendered '" << out << "' where jinja2 fails with: " << c["error"].get<std::string>();
    } catch (const TemplateError& e) {
      if (c["line"].is_number()) {
        EXPECT_EQ(e.line, c["line"].get<int>()) << e.what();
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, JinjaGolden, testing::ValuesIn(golden_names()),
                         [](const testing::TestParamInfo<std::string>& p) { return p.param; });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(JinjaGolden);

TEST(Jinja, GoldenFileIsPresent) {
  ASSERT_TRUE(golden().is_object()) << "tests/chat/jinja_cases.json is missing; run tests/chat/make_jinja_cases.py";
  EXPECT_GE(golden()["cases"].size(), 100u);
}

// ---- whitespace control ----------------------------------------------------------------------
TEST(Jinja, TrimBlocksAndLstripBlocks) {
  EXPECT_EQ(render("{% if true %}\nA\n{% endif %}\nB"), "A\nB");
  EXPECT_EQ(render("  {% if true %}\n  x\n  {% endif %}\n"), "  x\n");
  EXPECT_EQ(render("a  {{- 'b' -}}  c"), "abc");
  EXPECT_EQ(render("a\n  {%+ if true %}b{% endif %}"), "a\n  b");
  EXPECT_EQ(render("{% if true +%}\nx{% endif %}"), "\nx");
  EXPECT_EQ(render("x  {{ 'y' }}\n"), "x  y");  // variables neither lstrip nor trim
  EXPECT_EQ(render("a {# c #}\nb"), "a b");
}

// ---- errors name the template line ---------------------------------------------------------------
TEST(Jinja, ErrorsNameTheLine) {
  EXPECT_EQ(error_of("line one\n{{ x | foo }}"), "template line 2: unknown filter 'foo'");
  EXPECT_EQ(error_of("\n\n{{ raise_exception('roles must alternate') }}"), "template line 3: roles must alternate");
  EXPECT_EQ(error_of("{% for m in messages %}\n{{ m.x.y }}\n{% endfor %}", json{{"messages", json::array({json::object()})}}),
            "template line 2: 'dict object' has no attribute 'x'");
  EXPECT_EQ(error_of("{% if true %}\n"), "template line 1: unexpected end of template; expected 'elif' or 'else' or 'endif' to close the 'if' on line 1");
  EXPECT_EQ(error_of("{{ 'a' + 1 }}"), "template line 1: can only concatenate str (not \"int\") to str");
  EXPECT_EQ(error_of("{{ [1][5].x }}"), "template line 1: list object has no element 5");
  EXPECT_EQ(error_of("{{ missing.x }}"), "template line 1: 'missing' is undefined");
  EXPECT_EQ(error_of("{% endif %}"), "template line 1: unexpected 'endif'");
  EXPECT_EQ(error_of("{% frob %}"), "template line 1: unknown tag 'frob'");
  EXPECT_EQ(error_of("{{ x is nosuch }}"), "template line 1: unknown test 'nosuch'");
  // A multi-line expression reports the line of the failing part.
  EXPECT_EQ(error_of("{{ 1 +\n  (2 / 0) }}"), "template line 2: division by zero");
  try {
    render("a\nb\n{{ 1 // 0 }}");
    FAIL();
  } catch (const TemplateError& e) {
    EXPECT_EQ(e.line, 3);
  }
}

// ---- undefined values behave like jinja2's default Undefined ------------------------------------
TEST(Jinja, UndefinedLikeJinja2) {
  json vars = {{"d", {{"a", 1}}}};
  EXPECT_EQ(render("[{{ nope }}][{{ d.zz }}][{{ d['zz'] }}]", vars), "[][][]");
  EXPECT_EQ(render("{{ nope is defined }}{{ d.zz is defined }}{{ nope|default('x') }}{{ nope|length }}", vars), "FalseFalsex0");
  EXPECT_EQ(render("{% if nope %}y{% else %}n{% endif %}{% for x in nope %}!{% endfor %}"), "n");
  EXPECT_EQ(render("{{ nope ~ 'a' }}{{ 'a' in nope }}{{ nope == nope }}"), "aFalseTrue");
  EXPECT_NE(error_of("{{ d.zz.q }}", vars), "");
  EXPECT_NE(error_of("{{ nope + 1 }}"), "");
  EXPECT_NE(error_of("{{ nope() }}"), "");
  EXPECT_NE(error_of("{{ nope < 1 }}"), "");
  EXPECT_NE(error_of("{{ nope|tojson }}"), "");
  EXPECT_NE(error_of("{{ nope.startswith('a') }}"), "");
}

// ---- tojson is Python's json.dumps(ensure_ascii=False) ------------------------------------------
TEST(Jinja, ToJsonMatchesPython) {
  json v = json::parse(R"({"z": 1, "a": [1.0, 0.1, 1e100, -0.0, 12345678901234567890, "é\u0007\"/"], "e": {}, "l": []})");
  EXPECT_EQ(render("{{ v|tojson }}", {{"v", v}}),
            R"({"z": 1, "a": [1.0, 0.1, 1e+100, -0.0, 1.2345678901234567e+19, "é\u0007\"/"], "e": {}, "l": []})");
  EXPECT_EQ(render("{{ v|tojson(indent=1) }}", {{"v", json::parse(R"({"a": [1, {}], "b": []})")}}),
            "{\n \"a\": [\n  1,\n  {}\n ],\n \"b\": []\n}");
  EXPECT_EQ(render("{{ {'b': 1, 'a': 2}|tojson(sort_keys=true, separators=(',', ':')) }}"), R"({"a":2,"b":1})");
}

// ---- Python printing -------------------------------------------------------------------------------
TEST(Jinja, PrintsLikePython) {
  EXPECT_EQ(render("{{ 1e16 }} {{ 1e15 }} {{ 0.1 }} {{ 1e-5 }} {{ 2.5e-4 }} {{ 3.0 }} {{ 1e308 * 10 }} {{ -(1e308 * 10) }}"),
            "1e+16 1000000000000000.0 0.1 1e-05 0.00025 3.0 inf -inf");
  EXPECT_EQ(render("{{ [none, true, 'a\\'b', \"x\"] }} {{ {'k': (1,)} }}"), R"([None, True, "a'b", 'x'] {'k': (1,)})");
}

// ---- scoping: loops get fresh frames, namespaces carry values out --------------------------------
TEST(Jinja, LoopScopesAndNamespace) {
  EXPECT_EQ(render("{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}"), "231");
  EXPECT_EQ(render("{% set ns = namespace(x=1) %}{% for i in [1, 2] %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}"), "4");
  EXPECT_EQ(render("{% for i in [1, 2] %}{% for j in [3, 4] %}{% if j == 4 %}{% break %}{% endif %}{{ i }}{{ j }} {% endfor %}{% endfor %}"),
            "13 23 ");
}

// ---- generation blocks report their output ranges -------------------------------------------------
TEST(Jinja, GenerationSpans) {
  Template t("a{% for m in ms %}<{% generation %}{{ m }}{% endgeneration %}>{% endfor %}");
  std::vector<Span> spans;
  std::string out = t.render({{"ms", {"xy", "z"}}}, &spans);
  EXPECT_EQ(out, "a<xy><z>");
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(out.substr(spans[0].begin, spans[0].end - spans[0].begin), "xy");
  EXPECT_EQ(out.substr(spans[1].begin, spans[1].end - spans[1].begin), "z");
}

// ---- sandbox limits ----------------------------------------------------------------------------------
TEST(Jinja, SandboxBoundsLoops) {
  Limits lim;
  lim.max_steps = 10000;
  std::string e = error_of("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}", json::object(), lim);
  EXPECT_NE(e.find("more than 10000 loop iterations"), std::string::npos) << e;
  EXPECT_NE(error_of("{% for i in range(100001) %}{% endfor %}").find("Range too big"), std::string::npos);
}

TEST(Jinja, SandboxBoundsRecursion) {
  std::string e = error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_NE(e.find("macros recurse deeper than 64"), std::string::npos) << e;
  // Exponential fan-out stops at the step limit rather than running for ages.
  Limits lim;
  lim.max_steps = 5000;
  e = error_of("{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}", json::object(), lim);
  EXPECT_NE(e.find("loop iterations and macro calls"), std::string::npos) << e;
  // Deep syntax is refused while parsing.
  EXPECT_NE(error_of("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").find("nests deeper"), std::string::npos);
  EXPECT_NE(error_of("{{ 1" + std::string(3000, '+') + "}}").find("template line 1"), std::string::npos);
  std::string chain = "{{ 0";
  for (int k = 0; k < 5000; ++k) chain += " + 1";
  EXPECT_NE(error_of(chain + " }}").find("nests deeper"), std::string::npos);
}

TEST(Jinja, SandboxBoundsOutputAndValues) {
  Limits lim;
  lim.max_output_bytes = 1000;
  EXPECT_NE(error_of("{% for i in range(2000) %}x{% endfor %}", json::object(), lim).find("output exceeds 1000 bytes"), std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 5000 }}", json::object(), lim).find("larger than 1000"), std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", json::object(), lim)
                .find("larger than 1000"),
            std::string::npos);
  // Values cannot nest without bound (printing and freeing them recurse).
  EXPECT_NE(error_of("{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = [ns.l] %}{% endfor %}").find("nested deeper"),
            std::string::npos);
  EXPECT_EQ(error_of("{{ x }}", {{"x", 1}}), "");
}

TEST(Jinja, SandboxRefusesMutationAndFiles) {
  EXPECT_NE(error_of("{{ [1].append(2) }}").find("unsafe"), std::string::npos);
  EXPECT_NE(error_of("{{ {}.update({'a': 1}) }}").find("unsafe"), std::string::npos);
  EXPECT_NE(error_of("{% include 'x' %}").find("not supported"), std::string::npos);
  EXPECT_NE(error_of("{% extends 'x' %}").find("not supported"), std::string::npos);
  EXPECT_EQ(render("{{ ''.__class__ }}|{{ {}.__init__ }}"), "|");
}

// ---- inputs found by fuzzing (tests/fuzz/fuzz_jinja.cpp) must fail cleanly or render ------------
TEST(Jinja, FuzzRegressions) {
  const char* inputs[] = {
      "{{",
      "{%",
      "{#",
      "{{ }}",
      "{% %}",
      "{{ (",
      "{{ [1,2][::0] }}",
      "{{ 'abc'[9223372036854775807:] }}",
      "{{ -9223372036854775807 - 1 }}{{ (-9223372036854775807 - 1) // -1 }}",
      "{{ 9223372036854775807 + 1 }}",
      "{{ 2 ** 64 }}",
      "{% raw %}",
      "{% macro m() %}{{ caller() }}{% endmacro %}{{ m() }}",
      "{% set ns = namespace() %}{% set ns.a = ns %}{{ ns }}",
      "{{ '%999999d' % 1 }}",
      "{{ 'x'|center(9999999999) }}",
      "{{ range(-9223372036854775807, 9223372036854775807, 4611686018427387904)|list }}",
      "{{ '\\xff\\xfe'[::-1] }}",
      "\xff\xfe{{ '\xc3' }}",
      "{{ [1][-9223372036854775807 - 1] }}",
      // fuzz crash: a missing method argument was an Undefined without a message (null deref)
      "[{{ '\xab'.center(6, '*') }}][{{ 'ab'.ljust(4) }}][{{ 'ab'.rjust(4, '.') }}][{{ '42'.zfill() }}]",
  };
  EXPECT_EQ(error_of("{{ '42'.zfill() }}"), "template line 1: a required argument is missing");
  for (const char* src : inputs) {
    SCOPED_TRACE(src);
    try {
      Limits lim;
      lim.max_output_bytes = 1 << 20;
      render(src, {{"messages", json::array({{{"role", "user"}, {"content", "hi"}}})}}, lim);
    } catch (const TemplateError&) {
    }
  }
}

}  // namespace
