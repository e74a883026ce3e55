#!/usr/bin/env bash
# tests/fuzz/run_fuzz.sh: builds the Jinja fuzz target (tests/fuzz/fuzz_jinja.cpp) with clang's
# libFuzzer, AddressSanitizer and UBSan, seeds it with real chat templates and the golden test
# templates, and runs it for a bounded time. Crashing inputs land in $FUZZ_OUT/crashes/.
#
#   tests/fuzz/run_fuzz.sh [seconds, default 60] [more libFuzzer flags, e.g. -jobs=2]
#
# Needs clang++ with libFuzzer. On Debian bookworm: apt-get install clang-14 libclang-rt-14-dev
# (the packages clang and libclang-rt-14-dev; other releases: clang-N and libclang-rt-N-dev).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
secs=${1:-60}
shift || true
out=${FUZZ_OUT:-$root/build-fuzz}
cxx=${CXX:-clang++}

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "run_fuzz.sh: $cxx not found. Install clang and libFuzzer, e.g.: apt-get install clang-14 libclang-rt-14-dev" >&2
  exit 1
fi
mkdir -p "$out/corpus" "$out/crashes"

echo "building $out/fuzz_jinja with $("$cxx" --version | head -1)"
if ! "$cxx" -std=c++20 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$root/src" "$root"/src/text/jinja_*.cpp "$root/tests/fuzz/fuzz_jinja.cpp" -lfmt -o "$out/fuzz_jinja"; then
  echo "run_fuzz.sh: build failed. If libFuzzer is missing (libclang_rt.fuzzer), install it:" \
       "apt-get install libclang-rt-14-dev (matching your clang version)" >&2
  exit 1
fi

# Seeds: the official templates and every template of the golden tests.
for t in "$root"/../shared/data/tokenizers/*/chat_template.jinja; do
  [ -f "$t" ] && cp "$t" "$out/corpus/seed_$(basename "$(dirname "$t")").jinja"
done
if command -v python3 >/dev/null 2>&1; then
  python3 - "$root/tests/chat/jinja_cases.json" "$out/corpus" <<'PY'
import json, sys
for c in json.load(open(sys.argv[1]))["cases"]:
    open(f"{sys.argv[2]}/seed_{c['name']}.jinja", "w").write(c["template"])
PY
fi

# Jinja's vocabulary helps the fuzzer reach the parser's corners.
cat > "$out/jinja.dict" <<'DICT'
"{{"
"}}"
"{%"
"%}"
"{%-"
"-%}"
"{#"
"#}"
"if"
"elif"
"else"
"endif"
"for"
" in "
"endfor"
"set"
"endset"
"macro"
"endmacro"
"call"
"endcall"
"caller()"
"filter"
"endfilter"
"raw"
"endraw"
"break"
"continue"
"namespace("
"loop.index"
"messages"
"tojson"
"|"
" is "
" not "
" and "
" or "
"[::-1]"
"range("
"~"
"**"
"//"
DICT

echo "fuzzing for ${secs}s"
"$out/fuzz_jinja" -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -dict="$out/jinja.dict" -artifact_prefix="$out/crashes/" -print_final_stats=1 "$@" "$out/corpus"
