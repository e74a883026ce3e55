#!/usr/bin/env python3
# tests/chat/make_jinja_cases.py: renders small templates with real jinja2, configured as
# transformers' apply_chat_template configures it, and writes tests/chat/jinja_cases.json:
# the golden outputs (or error lines) that test_jinja.cpp compares the C++ interpreter with.
# Run: python3 tests/chat/make_jinja_cases.py   (needs jinja2 3.x; used 3.1.6)
import json
import os
import sys

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Generation(jinja2.ext.Extension):  # transformers' AssistantTracker, minus the tracking
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception

VARS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <there> & \"you\""},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1, "y": [1.5, None, True, "é"]}}}]},
    ],
    "d": {"b": 2, "a": 1, "nested": {"k": [1, 2, {"z": None}]}},
    "n": 7, "f": 2.5, "s": "Hello World", "u": "Grüße 你好 🙂", "empty": "", "none": None, "t": True,
    "l": [3, 1, 2], "words": ["banana", "Apple", "cherry", "apple"],
    "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": True,
    "people": [{"name": "bo", "age": 30, "admin": True}, {"name": "al", "age": 25, "admin": False}, {"name": "cy", "age": 35}],
}

CASES = [
    # whitespace control and trim_blocks / lstrip_blocks
    ("ws_plain", "a\n{% if true %}\nb\n{% endif %}\nc\n"),
    ("ws_lstrip", "x\n    {% if true %}\n    y\n    {% endif %}\nz"),
    ("ws_minus", "a   {%- if true -%}   b   {%- endif -%}   c"),
    ("ws_var_minus", "a \n {{- 'b' -}} \n c"),
    ("ws_plus", "x\n    {%+ if true %}y{% endif +%}\nz"),
    ("ws_comment", "a\n  {# note #}\nb {#- x -#} c"),
    ("ws_trailing_newline", "line\n"),
    ("ws_crlf", "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\nc"),
    ("ws_raw", "{% raw %}{{ not }} {% evaluated %}{% endraw %}!"),
    ("ws_var_no_trim", "{{ 'a' }}\n{{ 'b' }}\n"),
    ("ws_lstrip_not_var", "  {{ 'a' }}\n  {% if true %}b{% endif %}"),
    ("ws_tabs", "\t{% for i in [1,2] %}\n\t{{ i }}\n\t{% endfor %}\n"),
    # literals and printing
    ("print_types", "{{ none }}|{{ true }}|{{ 1 }}|{{ 1.0 }}|{{ 1e20 }}|{{ 1e-5 }}|{{ 0.1 + 0.2 }}|{{ 1/3 }}|{{ -0.0 }}"),
    ("print_containers", "{{ [1, 'a', none, true, 2.5] }}|{{ (1,) }}|{{ (1, 'b') }}|{{ {'k': 'v', 'n': [1]} }}|{{ [] }}|{{ {} }}"),
    ("print_quotes", "{{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'back\\\\slash', 'tab\\there', 'nl\\n'] }}"),
    ("print_unicode_repr", "{{ [u, 'a\\u00a0b', 'x\\x01y'] }}"),
    ("string_escapes", "{{ 'a\\nb\\tc\\\\d\\'e\\x41\\u00e9\\U0001F642' }}|{{ \"q\\\"q\" }}|{{ 'unknown \\q' }}"),
    ("adjacent_strings", "{{ 'a' 'b' \"c\" }}"),
    ("numbers", "{{ 1_000 }}|{{ 0x1F }}|{{ 0o17 }}|{{ 0b101 }}|{{ 1.5e3 }}|{{ 12.5 }}|{{ 00 }}"),
    ("print_dict_items", "{{ d.items()|list }}|{{ d.keys()|list }}|{{ d.values()|list }}"),
    ("print_big_float", "{{ 123456789012345678.0 }}|{{ 1e16 }}|{{ 1e15 }}|{{ 0.0001 }}|{{ 1.5e-7 }}|{{ 2.0 ** 70 }}"),
    # arithmetic
    ("arith", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 4 / 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }}"),
    ("arith_mixed", "{{ 1 + 2.5 }} {{ true + 1 }} {{ 'ab' * 3 }} {{ [1] * 3 }} {{ 3 * 'x' }} {{ [1] + [2] }} {{ 'a' ~ 1 ~ none ~ true }}"),
    ("unary", "{{ -n }} {{ +n }} {{ -f }} {{ - 3 | abs }} {{ -(3) }} {{ not true }} {{ not none }}"),
    ("precedence", "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 2 ** 3 ** 2 }} {{ 1 ~ 2 * 3 }} {{ not 1 == 2 }} {{ 1 < 2 and 2 < 1 or true }}"),
    ("and_or_values", "{{ 0 or 'x' }}|{{ 'a' and 'b' }}|{{ '' and 'b' }}|{{ none or [] }}|{{ missing or 'dflt' }}"),
    # comparisons
    ("compare", "{{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ none == none }} {{ (1, 2) == [1, 2] }}"),
    ("in_operator", "{{ 'ell' in s }} {{ 2 in l }} {{ 'a' in d }} {{ 'zz' not in d }} {{ 5 not in l }} {{ 'x' in missing }}"),
    # conditionals
    ("if_elif", "{% for x in [1, 2, 3, 4] %}{% if x == 1 %}one{% elif x == 2 %}two{% elif x == 3 %}three{% else %}many{% endif %},{% endfor %}"),
    ("ternary", "{{ 'y' if t else 'n' }}|{{ 'y' if none else 'n' }}|{{ 'y' if false }}|{{ 1 if false else 2 if false else 3 }}"),
    ("truthiness", "{% for v in [0, 1, 0.0, '', 'a', [], [0], {}, none] %}{{ 'T' if v else 'F' }}{% endfor %}"),
    # loops
    ("loop_vars", "{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}"),
    ("loop_prev_next", "{% for x in l %}{{ loop.previtem }}-{{ x }}-{{ loop.nextitem }};{% endfor %}"),
    ("loop_cycle", "{% for x in l %}{{ loop.cycle('odd', 'even') }} {% endfor %}"),
    ("loop_else", "{% for x in [] %}x{% else %}empty{% endfor %}|{% for x in none_missing %}x{% else %}undef{% endfor %}"),
    ("loop_filter", "{% for x in [1, 2, 3, 4, 5] if x is odd %}{{ x }}/{{ loop.index }}/{{ loop.length }} {% endfor %}"),
    ("loop_unpack", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for a, b in [[1, 2], (3, 4), 'xy'] %}{{ a }}{{ b }}{% endfor %}"),
    ("loop_dict", "{% for k in d %}{{ k }},{% endfor %}|{% for c in 'héllo' %}[{{ c }}]{% endfor %}"),
    ("loop_break_continue", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}"),
    ("loop_nested", "{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }} {% endfor %}{{ loop.index }}|{% endfor %}"),
    ("loop_reverse_slice", "{% for m in messages[::-1] %}{{ m.role }},{% endfor %}"),
    ("loop_scope", "{% set x = 0 %}{% for i in range(3) %}{{ x }}{% set x = x + 1 %}{{ x }}{% endfor %}{{ x }}"),
    ("loop_scope_fresh", "{% for i in range(3) %}{% if i > 0 %}[{{ y }}]{% endif %}{% set y = i %}{% endfor %}"),
    ("loop_over_string_list", "{% for w in words %}{{ w|upper }}{{ ',' if not loop.last }}{% endfor %}"),
    # set and namespace
    ("set_basic", "{% set a = 1 %}{% set b, c = 2, 3 %}{% set t = 4, 5 %}{{ a }}{{ b }}{{ c }}{{ t }}"),
    ("set_block", "{% set x %}inner {{ n }}{% endset %}[{{ x }}]{% set y | upper %}shout{% endset %}{{ y }}"),
    ("namespace", "{% set ns = namespace(count=0, last=none) %}{% for m in messages %}{% set ns.count = ns.count + 1 %}{% set ns.last = m.role %}{% endfor %}{{ ns.count }} {{ ns.last }} {{ ns.missing }}"),
    ("namespace_repr", "{% set ns = namespace(a=1, b='x') %}{{ ns }}"),
    ("namespace_dict", "{% set ns = namespace({'a': 1}, b=2) %}{{ ns.a }}{{ ns.b }}"),
    ("if_no_scope", "{% if true %}{% set z = 5 %}{% endif %}{{ z }}"),
    # attribute and item access
    ("access", "{{ messages[0].role }}|{{ messages[0]['content'] }}|{{ messages[-1].role }}|{{ d.nested.k[2].z }}|{{ l.1 }}|{{ d['a'] }}"),
    ("access_missing", "[{{ d.zz }}][{{ messages[9] }}][{{ s[99] }}][{{ d.nested.zz }}][{{ none.x }}]"),
    ("access_method_precedence", "{{ d.items is defined }} {{ d['items'] is defined }}"),
    ("slices", "{{ l[1:] }} {{ l[:-1] }} {{ l[::2] }} {{ l[::-1] }} {{ s[6:] }} {{ s[::-1] }} {{ u[::-1] }} {{ u[1:3] }} {{ l[5:] }} {{ l[-99:1] }} {{ s[-3:] }}"),
    ("string_index", "{{ s[0] }}{{ s[-1] }}{{ u[6] }}"),
    # string methods
    ("str_methods", "{{ s.lower() }}|{{ s.upper() }}|{{ s.startswith('Hell') }}|{{ s.endswith(('x', 'ld')) }}|{{ s.split() }}|{{ s.split('o') }}|{{ s.split('o', 1) }}|{{ s.rsplit('o', 1) }}"),
    ("str_strip", "[{{ '  a b  '.strip() }}][{{ '\\n\\nx\\n'.lstrip('\\n') }}][{{ 'xxaxx'.rstrip('x') }}][{{ 'abc'.strip('ca') }}]"),
    ("str_misc", "{{ s.replace('l', 'L') }}|{{ s.replace('l', 'L', 2) }}|{{ s.find('o') }}|{{ s.rfind('o') }}|{{ s.count('l') }}|{{ '-'.join(['a', 'b']) }}|{{ s.title() }}|{{ 'hello world'.capitalize() }}"),
    ("str_is", "{{ '123'.isdigit() }}{{ 'a1'.isalnum() }}{{ 'ab'.isalpha() }}{{ ' '.isspace() }}{{ 'ab'.islower() }}{{ 'AB'.isupper() }}{{ ''.isdigit() }}"),
    ("str_format", "{{ '{} and {}'.format('a', 1) }}|{{ '{1}{0}'.format('x', 'y') }}|{{ '{name}!'.format(name='z') }}|{{ '{{}}'.format() }}"),
    ("str_splitlines", "{{ 'a\\nb\\r\\nc\\n'.splitlines() }}|{{ 'a\\nb'.splitlines(true) }}"),
    ("str_think", "{% set c = messages[2].content %}{{ c.split('</think>')[-1].lstrip('\\n') }}|{{ c.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}"),
    ("str_partition", "{{ 'a=b=c'.partition('=') }}{{ 'a=b=c'.rpartition('=') }}{{ 'abc'.partition('x') }}"),
    ("str_pad", "[{{ 'ab'.center(6, '*') }}][{{ 'ab'.ljust(4) }}][{{ 'ab'.rjust(4, '.') }}][{{ '42'.zfill(5) }}][{{ 'abc'.center(6) }}]"),
    ("str_prefix", "{{ 'prefix-x'.removeprefix('prefix-') }}{{ 'x.py'.removesuffix('.py') }}"),
    # dict and list methods
    ("dict_get", "{{ d.get('a') }}|{{ d.get('zz') }}|{{ d.get('zz', 'dflt') }}"),
    ("list_methods", "{{ l.index(2) }}{{ l.count(3) }}{{ [1, 1, 2].count(1) }}"),
    # filters
    ("f_tojson", "{{ messages[2].tool_calls[0].function.arguments|tojson }}|{{ d|tojson }}|{{ 'é\"\\n\\u0001'|tojson }}|{{ none|tojson }}|{{ [1.0, 1e20, 2.5]|tojson }}"),
    ("f_tojson_indent", "{{ d|tojson(indent=2) }}|{{ [1, [2, []], {}]|tojson(indent=4) }}|{{ {'a': 1}|tojson(indent=0) }}"),
    ("f_tojson_options", "{{ d|tojson(sort_keys=true) }}|{{ d|tojson(separators=(',', ':')) }}|{{ u|tojson(ensure_ascii=true) }}|{{ {1: 'x', none: 'y', true: 'z', 2.5: 'w'}|tojson }}"),
    ("f_tojson_tuple", "{{ (1, 'a')|tojson }}|{{ d.items()|list|tojson }}"),
    ("f_string_case", "{{ s|lower }}|{{ s|upper }}|{{ 'hELLO wORLD'|capitalize }}|{{ 'hello big-world (x)'|title }}|{{ none|string }}|{{ 1.5|string }}"),
    ("f_trim", "[{{ '  x  '|trim }}][{{ 'xxaxx'|trim('x') }}][{{ '\\n a \\n'|trim }}]"),
    ("f_length", "{{ s|length }} {{ u|length }} {{ l|length }} {{ d|length }} {{ missing|length }} {{ l|count }}"),
    ("f_default", "{{ missing|default('x') }}|{{ none|default('x') }}|{{ ''|default('x', true) }}|{{ 0|d('z', boolean=true) }}|{{ s|default('x') }}"),
    ("f_join", "{{ l|join }}|{{ l|join(', ') }}|{{ people|join(', ', attribute='name') }}|{{ missing|join(',') }}"),
    ("f_first_last", "{{ l|first }}{{ l|last }}{{ s|first }}{{ s|last }}[{{ []|first }}]{{ d|first }}"),
    ("f_list_items", "{{ 'abc'|list }}|{{ d|items|list }}|{{ missing|list }}|{{ missing|items|list }}"),
    ("f_replace", "{{ s|replace('o', '0') }}|{{ s|replace('o', '0', 1) }}|{{ 'abc'|replace('', '-') }}"),
    ("f_int_float", "{{ '42'|int }} {{ '4.7'|int }} {{ 'x'|int }} {{ 'x'|int(7) }} {{ 3.9|int }} {{ '0x1A'|int(base=16) }} {{ '2.5'|float }} {{ 'y'|float }} {{ 3|float }} {{ ' 12 '|int }}"),
    ("f_sort", "{{ l|sort }}|{{ l|sort(reverse=true) }}|{{ words|sort }}|{{ words|sort(case_sensitive=true) }}|{{ people|sort(attribute='age')|map(attribute='name')|list }}"),
    ("f_unique", "{{ words|unique|list }}|{{ words|unique(case_sensitive=true)|list }}|{{ [1, 2, 1, 3]|unique|list }}"),
    ("f_map", "{{ people|map(attribute='name')|list }}|{{ people|map(attribute='admin', default='?')|list }}|{{ words|map('upper')|list }}|{{ l|map('string')|join('-') }}"),
    ("f_select", "{{ [1, 2, 3, 4]|select('odd')|list }}|{{ [1, 2, 3, 4]|reject('even')|list }}|{{ [0, 1, '', 'a']|select|list }}|{{ [1, 5, 10]|select('gt', 3)|list }}"),
    ("f_selectattr", "{{ people|selectattr('admin')|map(attribute='name')|list }}|{{ people|rejectattr('admin')|map(attribute='name')|list }}|{{ people|selectattr('age', 'gt', 28)|map(attribute='name')|list }}|{{ people|selectattr('admin', 'defined')|list|length }}|{{ messages|selectattr('role', 'equalto', 'user')|list|length }}"),
    ("f_minmax_sum", "{{ l|max }} {{ l|min }} {{ l|sum }} {{ people|sum(attribute='age') }} {{ words|max }} {{ people|max(attribute='age') }} {{ [1.5, 2]|sum }} {{ l|sum(start=10) }}"),
    ("f_reverse", "{{ l|reverse|list }}|{{ s|reverse }}|{{ u|reverse }}"),
    ("f_round_abs", "{{ 2.5|round }} {{ 3.5|round }} {{ 2.567|round(2) }} {{ 2.1|round(0, 'ceil') }} {{ 2.9|round(method='floor') }} {{ -3|abs }} {{ -2.5|abs }} {{ 3|round }} {{ 3|round(2) }} {{ 3|round(1, 'ceil') }} {{ 1234.5678|round(-2) }}"),
    ("f_escape", "{{ '<a href=\"x\">&\\'</a>'|e }}|{{ '<b>'|escape }}|{{ '<i>'|safe }}"),
    ("f_indent", "{{ 'a\\nb\\n\\nc'|indent }}|{{ 'a\\nb'|indent(2, true) }}|{{ 'a\\n\\nb'|indent(width='>', blank=true) }}"),
    ("f_center_wordcount", "[{{ 'ab'|center(6) }}]{{ 'one two  three'|wordcount }}"),
    ("f_format", "{{ '%s is %d years'|format('bo', 30) }}|{{ '%05.1f|%-4s|%x'|format(3.14159, 'ab', 255) }}|{{ '%(a)s-%(b)s'|format(a=1, b=2) }}|{{ '%s%%' % 5 }}|{{ '%s and %s' % ('x', 'y') }}"),
    ("f_batch", "{{ [1, 2, 3, 4, 5]|batch(2)|list }}|{{ [1, 2, 3]|batch(2, 0)|list }}"),
    ("f_dictsort", "{{ d|dictsort }}|{{ {'b': 1, 'A': 2}|dictsort }}|{{ {'b': 1, 'a': 2}|dictsort(by='value', reverse=true) }}"),
    ("f_attr", "{{ messages[0]|attr('role') }}|{{ d|attr('items') is defined }}"),
    ("f_chain", "{{ words|map('lower')|unique|sort|join(',')|upper }}"),
    # tests
    ("tests_types", "{{ none is none }}{{ 1 is number }}{{ true is number }}{{ true is boolean }}{{ 1 is integer }}{{ 1.0 is float }}{{ 's' is string }}{{ d is mapping }}{{ l is sequence }}{{ s is iterable }}{{ 1 is iterable }}"),
    ("tests_defined", "{{ missing is defined }}{{ missing is undefined }}{{ d.a is defined }}{{ d.zz is defined }}{{ messages[0].reasoning_content is not defined }}{{ none is defined }}"),
    ("tests_bools", "{{ true is true }}{{ 1 is true }}{{ false is false }}{{ 0 is false }}{{ t is sameas true }}{{ none is sameas none }}"),
    ("tests_compare", "{{ 3 is eq 3 }}{{ 3 is equalto(4) }}{{ 3 is ne 4 }}{{ 3 is lt 4 }}{{ 3 is gt 4 }}{{ 3 is ge 3 }}{{ 3 is le 2 }}{{ 2 is in [1, 2] }}{{ 'x' is in 'xyz' }}"),
    ("tests_numbers", "{{ 4 is divisibleby 2 }}{{ 5 is divisibleby(2) }}{{ 3 is odd }}{{ 3 is even }}{{ 'abc' is lower }}{{ 'ABC' is upper }}{{ 'aBc' is lower }}"),
    ("tests_callable", "{{ range is callable }}{{ s.upper is callable }}{{ 's' is callable }}{{ 'upper' is filter }}{{ 'nope' is filter }}{{ 'odd' is test }}"),
    ("tests_in_if", "{% if messages[0].role == 'system' and messages[0].content is string %}sys{% endif %}{% if tools is not defined or tools is none %}notools{% endif %}"),
    # undefined
    ("undefined_print", "[{{ missing }}][{{ missing ~ 'x' }}][{{ missing|string }}][{{ missing|lower }}][{{ missing|trim }}]"),
    ("undefined_test", "{% if missing %}T{% else %}F{% endif %}{{ not missing }}{{ missing == missing }}{{ missing == none }}{{ missing is none }}"),
    ("undefined_iter", "{% for x in missing %}x{% endfor %}{{ missing|length }}{{ missing|list }}{{ 'a' in missing }}"),
    # macros and call blocks
    ("macro_basic", "{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}{{ greet('bo') }} {{ greet('al', '?') }} {{ greet(punct='.', name='cy') }}"),
    ("macro_missing_arg", "{% macro f(a, b) %}[{{ a }}|{{ b }}|{{ b is defined }}]{% endmacro %}{{ f(1) }}"),
    ("macro_recursive", "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif %}{% endmacro %}{{ fact(5) }}"),
    ("macro_globals", "{% set g = 'G' %}{% macro m() %}{{ g }}{{ n }}{% endmacro %}{{ m() }}"),
    ("macro_json_schema", "{% macro render(v) %}{% if v is mapping %}{{ '{' }}{% for k, x in v.items() %}{{ k }}: {{ render(x) }}{{ ', ' if not loop.last }}{% endfor %}{{ '}' }}{% elif v is string %}'{{ v }}'{% elif v is iterable %}[{% for x in v %}{{ render(x) }}{{ ', ' if not loop.last }}{% endfor %}]{% else %}{{ v }}{% endif %}{% endmacro %}{{ render(d) }}"),
    ("macro_closure", "{% for x in [1, 2] %}{% macro m() %}[{{ x }}]{% endmacro %}{{ m() }}{% endfor %}{% macro outer(a) %}{% macro inner(n) %}<{{ a }}{{ n }}>{% if n %}{{ inner(n - 1) }}{% endif %}{% endmacro %}{{ inner(2) }}{% endmacro %}{{ outer(5) }}"),
    ("macro_late_global", "{% set g = 1 %}{% macro m() %}{{ g }}{% endmacro %}{% set g = 2 %}{{ m() }}"),
    ("call_block", "{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call wrap('b') %}bold {{ n }}{% endcall %}"),
    ("call_block_args", "{% macro each(xs) %}{% for x in xs %}{{ caller(x, loop.index) }}{% endfor %}{% endmacro %}{% call(item, i) each(['a', 'b']) %}{{ i }}={{ item }};{% endcall %}"),
    ("filter_block", "{% filter upper %}hello {{ s }}{% endfilter %}|{% filter replace('a', 'b')|title %}a cat{% endfilter %}"),
    ("with_block", "{% with a = 1, b = n %}{{ a + b }}{% endwith %}[{{ a }}]"),
    ("generation_block", "x{% generation %}gen {{ n }}{% endgeneration %}y"),
    ("print_tag", "{% print 'p', 1 %}"),
    # globals
    ("range", "{{ range(3)|list }}{{ range(1, 4)|list }}{{ range(10, 0, -3)|list }}{{ range(0)|list }}"),
    ("dict_global", "{{ dict(a=1, b='x') }}{{ dict(d, c=3)|length }}"),
    # realistic chat template fragments
    ("chatml", "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    ("llama_like", "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = '' %}\n{%- endif %}\n{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n{{- system_message }}\n{{- '<|eot_id|>' }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n"),
    ("mistral_like", "{%- for message in messages %}\n  {%- if message['role'] == 'user' %}\n    {{- '[INST] ' + message['content'] + ' [/INST]' }}\n  {%- elif message['role'] == 'assistant' %}\n    {{- ' ' + message['content'] + eos_token }}\n  {%- endif %}\n{%- endfor %}"),
    # behaviours found by differential fuzzing against jinja2
    ("for_else_quirk", "{% for x in [1, 2] %}{% continue %}{% else %}E{% endfor %}|{% for x in [1, 2] %}{% break %}{% else %}E{% endfor %}|{% for x in [1, 2] %}{% if x == 2 %}{% break %}{% endif %}{% else %}E{% endfor %}"),
    ("unicode_case", "{{ u|upper }}|{{ 'ÀÉÎ ΑΒΓ ДЖ'|lower }}|{{ 'straße'.upper() }}|{{ 'éa'.capitalize() }}|{{ 'ÉCOLE'.islower() }}|{{ 'école'.title() }}"),
    ("const_slices", "{{ none[1:] }}|{{ 2.5[:-1] == 1 }}|{{ 1 if 3[:-1] else 2 }}|{{ false and x[1:] }}"),
    ("percent_quirks", "{{ 'abc' % [1, 2] }}|{{ '%s' % [1, 2] }}|{{ 'x' % missing }}|{{ '%s!' % missing }}"),
    ("percent_ints", "{{ '[%05.0i|%.0d|%+d|% d|%#x|%#o|%-6X|%08.3d|%3c]' % (0, 0, 5, 5, 255, 8, 255, -42, 65) }}"),
    ("raw_unclosed_empty", "text{% raw %}"),
    ("soft_unknown_filter", "{% if false %}{{ x|nosuchfilter }}{% endif %}{{ 'a' if true else b|nosuch }}ok"),
    ("wordcount_unicode", "{{ 'héllo wörld, foo_bar-baz 42 你好'|wordcount }}"),
    ("test_float_parity", "{{ 2.5 is even }}{{ 4.0 is even }}{{ 3.0 is odd }}{{ -3 is odd }}"),
    ("round_int", "{{ 3|round(2) }}|{{ 1250|round(-2) }}|{{ 3|round(1, 'ceil') }}"),
    ("json_in_loop", "{%- for tool in messages[2].tool_calls %}\n{{- tool | tojson }}\n{%- endfor %}"),
]

ERROR_CASES = [
    ("err_unknown_filter", "line one\n{{ x | nosuchfilter }}"),
    ("err_unknown_test", "{% if x is nosuchtest %}{% endif %}"),
    ("err_unclosed_if", "{% if true %}\nabc\n"),
    ("err_unclosed_var", "a\n{{ x "),
    ("err_unknown_tag", "\n\n{% frobnicate %}"),
    ("err_endfor_mismatch", "{% for x in l %}\n{% endif %}"),
    ("err_break_outside", "{% break %}"),
    ("err_bad_token", "{{ 1 ! 2 }}"),
    ("err_unbalanced", "{{ (1 }}"),
    ("err_raise", "ok\n{{ raise_exception('Conversation roles must alternate') }}"),
    ("err_undefined_attr", "\n{{ missing.attr }}"),
    ("err_undefined_math", "{{ missing + 1 }}"),
    ("err_none_len", "{{ none|length }}"),
    ("err_type_add", "{{ 'a' + 1 }}"),
    ("err_concat_precedence", "{{ 1 ~ 2 + 3 }}"),
    ("err_compare", "{{ 1 < 'a' }}"),
    ("err_div_zero", "{{ 1 / 0 }}"),
    ("err_not_namespace", "{% set x = 1 %}{% set x.a = 2 %}"),
    ("err_unsafe_append", "{{ l.append(4) }}"),
    ("err_unsafe_update", "{{ d.update({}) }}"),
    ("err_tojson_undefined", "{{ missing|tojson }}"),
    ("err_call_not_callable", "{{ s() }}"),
    ("err_range_too_big", "{{ range(100001)|length }}"),
    ("err_unpack", "{% for a, b in [[1, 2, 3]] %}{% endfor %}"),
    ("err_split_empty", "{{ 'abc'.split('') }}"),
    ("err_unterminated_comment", "{# never closed"),
    ("err_include", "{% include 'other.jinja' %}"),
    ("err_undefined_int", "{{ missing|int }}"),
    ("err_test_extra_arg", "{{ 1 is odd 2 }}"),
    ("err_slice_runtime", "{% set x = 5 %}{{ x[1:] }}"),
    ("err_slice_dict", "{{ d[1:] }}"),
    ("err_unknown_filter_outside_if", "{{ 'a' }}\n{{ x|nosuch }}"),
    ("err_replace_missing_arg", "{{ 'a'|replace('a') }}"),
    ("err_unique_unhashable", "{{ [{'a': 1}]|unique|list }}"),
    ("err_indent_int", "{{ 3|indent }}"),
    ("err_pow_overflow", "{{ 10.0 ** 400 }}"),
]


def render(src):
    try:
        return {"text": env.from_string(src).render(**VARS)}
    except jinja2.exceptions.TemplateSyntaxError as e:
        return {"error": str(e), "line": e.lineno}
    except Exception as e:  # runtime: the template line is in the traceback
        tb, line = e.__traceback__, None
        while tb:
            if tb.tb_frame.f_code.co_filename == "<template>":
                line = tb.tb_lineno
            tb = tb.tb_next
        return {"error": f"{type(e).__name__}: {e}", "line": line}


def main():
    out = []
    for name, src in CASES + ERROR_CASES:
        r = render(src)
        if name.startswith("err_") != ("error" in r):
            sys.exit(f"{name}: expected {'an error' if name.startswith('err_') else 'text'}, got {r}")
        out.append({"name": name, "template": src, **r})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jinja_cases.json")
    with open(path, "w") as f:
        json.dump({"jinja2": jinja2.__version__, "vars": VARS, "cases": out}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(out)} cases to {path}")


if __name__ == "__main__":
    main()
