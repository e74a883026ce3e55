#!/usr/bin/env bash
# tests/fuzz/run_fuzz.sh: builds a libFuzzer target with clang (AddressSanitizer + UBSan), seeds
# it, and runs it for a bounded time. Crashing inputs land in $FUZZ_OUT/crashes/; each one found
# is fixed and kept as a regression test (tests/chat/test_jinja.cpp FuzzRegressions,
# tests/text/test_tokenizer.cpp and tests/sft/test_sft.cpp FuzzRegressions).
#
#   tests/fuzz/run_fuzz.sh TARGET [seconds, default 60] [more libFuzzer flags, e.g. -jobs=2]
#   TARGET: jinja (template parse + render), tokenizer_load (tokenizer.json bytes),
#           encode (arbitrary bytes through the Qwen3 and GPT-2 tokenizers), jsonl (dataset
#           files in every format), or all (each in turn, for the given seconds each).
#
# Needs clang++ with libFuzzer. On Debian bookworm: apt-get install clang-14 libclang-rt-14-dev
# (the packages clang and libclang-rt-14-dev; other releases: clang-N and libclang-rt-N-dev).
# encode and jsonl need ../shared/data/tokenizers (or AUTOMOE_TOKENIZERS).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${1:-}
case "$target" in
  jinja|tokenizer_load|encode|jsonl) ;;
  all)
    secs=${2:-60}; shift 2 || shift $#
    for t in jinja tokenizer_load encode jsonl; do "$0" "$t" "$secs" "$@" || exit $?; done
    exit 0 ;;
  *) echo "usage: run_fuzz.sh jinja|tokenizer_load|encode|jsonl|all [seconds] [libFuzzer flags]" >&2; exit 2 ;;
esac
shift
secs=${1:-60}
shift || true
out=${FUZZ_OUT:-$root/build-fuzz}/$target
cxx=${CXX:-clang++}
toks=${AUTOMOE_TOKENIZERS:-$root/../shared/data/tokenizers}

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "run_fuzz.sh: $cxx not found. Install clang and libFuzzer, e.g.: apt-get install clang-14 libclang-rt-14-dev" >&2
  exit 1
fi
if [ "$target" = encode ] || [ "$target" = jsonl ]; then
  # 77: ctest's skip code (tests/fuzz.cmake): the shared data is absent, as on a bare clone.
  [ -d "$toks/qwen3" ] || { echo "run_fuzz.sh: skipped: $toks/qwen3 not found (set AUTOMOE_TOKENIZERS)" >&2; exit 77; }
  export AUTOMOE_TOKENIZERS=$toks
fi
mkdir -p "$out/corpus" "$out/crashes"

if [ "$target" = jinja ]; then
  srcs=("$root"/src/text/jinja_*.cpp); libs=(-lfmt)
else
  srcs=("$root"/src/core/*.cpp "$root"/src/text/*.cpp); libs=(-lfmt -lpcre2-8)
fi
# The library sources are compiled once into objects shared by the targets (in parallel); any
# change under src/core or src/text (headers too) rebuilds them all.
flags=(-std=c++20 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined
       -fno-sanitize-recover=undefined -DAUTOMOE_SOURCE_DIR="\"$root\"" -I"$root/src")
objdir=${FUZZ_OUT:-$root/build-fuzz}/obj
stamp=$(cat "$root"/src/core/* "$root"/src/text/* | md5sum | cut -c1-32)
if [ "$(cat "$objdir/stamp" 2>/dev/null)" != "$stamp" ]; then rm -rf "$objdir"; fi
mkdir -p "$objdir" && echo "$stamp" > "$objdir/stamp"
echo "building $out/fuzz_$target with $("$cxx" --version | head -1)"
export cxx objdir; export FLAGS="${flags[*]}"
if ! printf '%s\n' "${srcs[@]}" | xargs -P "$(nproc)" -I{} sh -c \
     'o="$objdir/$(basename {} .cpp).o"; [ -f "$o" ] || $cxx $FLAGS -c {} -o "$o"' ||
   ! "$cxx" "${flags[@]}" -fsanitize=fuzzer "$root/tests/fuzz/fuzz_$target.cpp" \
       $(for f in "${srcs[@]}"; do echo "$objdir/$(basename "$f" .cpp).o"; done) "${libs[@]}" -o "$out/fuzz_$target"; then
  echo "run_fuzz.sh: build failed. If libFuzzer is missing (libclang_rt.fuzzer), install it:" \
       "apt-get install libclang-rt-14-dev (matching your clang version)" >&2
  exit 1
fi

dict=()
case "$target" in
jinja)
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

  dict=(-dict="$out/jinja.dict") ;;
tokenizer_load)
  # Seeds: small tokenizer.json files of each model shape (the 11 MB Qwen3 one is too slow to
  # mutate usefully; its structure is in these).
  cat > "$out/corpus/seed_bpe.json" <<'J'
{"version":"1.0","added_tokens":[{"id":5,"content":"<|im_end|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
 "normalizer":{"type":"NFC"},
 "pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}]},
 "post_processor":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false},
 "decoder":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false},
 "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":"","end_of_word_suffix":"","fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
  "vocab":{"H":0,"e":1,"l":2,"o":3,"He":4,"ll":6,"Hell":7},"merges":["H e","l l",["He","ll"]]}}
J
  printf '{"model":{"type":"WordPiece","vocab":{}}}' > "$out/corpus/seed_wordpiece.json"
  printf '{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":true,"use_regex":true}}' > "$out/corpus/seed_gpt2.json" ;;
encode)
  printf 'Hello, world! 123 4567' > "$out/corpus/seed_ascii"
  printf 'Grüße 你好 🙂 ﬁ e\xcc\x81 \xe1\x84\x80\xe1\x85\xa1 <|im_end|><|im_start|>user\n' > "$out/corpus/seed_unicode"
  printf '   \t\r\n\n  x  \xf0\x9f\x98\x80\xf0\x9f\x98' > "$out/corpus/seed_space" ;;
jsonl)
  # Seeds: the first records of each real SFT set (cut short: libFuzzer mutates small inputs).
  for f in "$root"/../shared/data/sft/*/*.json*; do
    [ -f "$f" ] && head -c 3000 "$f" > "$out/corpus/seed_$(basename "$f")"
  done
  printf '{"input_ids":[1,2,3],"labels":[-100,2,3]}\n{"input_ids":[]}\n' > "$out/corpus/seed_tokens"
  printf '[{"prompt":"a","completion":"b"},{"instruction":"i","input":"","output":"o"}]' > "$out/corpus/seed_array" ;;
esac

echo "fuzzing $target for ${secs}s"
"$out/fuzz_$target" -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  "${dict[@]}" -artifact_prefix="$out/crashes/" -print_final_stats=1 "$@" "$out/corpus"
