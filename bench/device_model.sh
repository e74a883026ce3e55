#!/usr/bin/env bash
# bench/device_model.sh: the CUDA model's checks on the GPU machine (H200), from a fresh copy of
# the repo: builds cuda_op_check, cuda_parity and cuda_bench (no tokenizer needed), then runs
#   1. cuda_op_check on the training path's ops (OPS, default "bf16grad" and "glue"; OPS=all
#      runs every group),
#   2. cuda_parity: the CUDA model (bf16 and fp32_master) against the CPU model on the
#      Transformers fixtures, and a 300-step tiny-moe fine-tune on both (STEPS),
#   3. cuda_bench: a 2-layer smoke run, then W1 (LAYERS=12 SEQ=4096 MBS=2 by default).
#   4. with BASELINE=path/to/hf_moe_baseline.py (a copy of shared/bench, which the GPU machine
#      does not see): native Transformers on the same shapes (IMPLS=grouped_mm), and the ratios.
#   bash bench/device_model.sh            Env: BUILD (default build-device), CUDA_ARCH (90a),
#                                         OPS, STEPS, LAYERS, SEQ, MBS, SKIP_BENCH=1, BASELINE
# Exit code: the number of failed stages. Logs are copied to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device}
mkdir -p "$BUILD/.bin"
if ! command -v ninja >/dev/null 2>&1; then
  python3 -c 'import ninja' 2>/dev/null || { echo "device_model.sh: no ninja (system or pip)"; exit 2; }
  printf '#!/bin/sh\nexec python3 -m ninja "$@"\n' > "$BUILD/.bin/ninja"
  chmod +x "$BUILD/.bin/ninja"
  export PATH="$PWD/$BUILD/.bin:$PATH"
fi
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null

t0=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DAUTOMOE_WERROR=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90a}" > "$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; echo "device_model.sh: configure failed"; exit 3; }
cmake --build "$BUILD" -j "$(nproc)" --target cuda_op_check cuda_parity cuda_bench \
  > "$BUILD/build.log" 2>&1 || { tail -n 60 "$BUILD/build.log"; echo "device_model.sh: build failed"; exit 4; }
echo "device_model.sh: built in $(( $(date +%s) - t0 )) s"

export AUTOMOE_THREADS=0
fails=0
LOGS=()
stage() {  # name, command...
  local name=$1; shift
  local log="$BUILD/$name.log"
  LOGS+=("$log")
  echo "== $name: $*"
  local s=$(date +%s)
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $(( $(date +%s) - s )) s"
  [ "$rc" -ne 0 ] && fails=$((fails + 1))
}

OPS=${OPS:-bf16grad glue}
if [ "$OPS" = all ]; then
  stage op_check "$BUILD/cuda_op_check"
else
  for g in $OPS; do stage "op_check_$g" "$BUILD/cuda_op_check" "$g"; done
fi
stage parity "$BUILD/cuda_parity" --steps "${STEPS:-300}"
if [ -z "${SKIP_BENCH:-}" ]; then
  stage bench_smoke "$BUILD/cuda_bench" --layers 2 --seq 1024 --mbs 1 --warmup 1 --steps 2
  stage bench_w1 "$BUILD/cuda_bench" --layers "${LAYERS:-12}" --seq "${SEQ:-4096}" --mbs "${MBS:-2}"
  if [ -n "${BASELINE:-}" ]; then
    stage baseline env LAYERS="${LAYERS:-12}" SEQ="${SEQ:-4096}" MBS="${MBS:-2}" IMPLS="${IMPLS:-grouped_mm}" \
      python3 "$BASELINE"
    LOGS+=("$BUILD/ratio.log")
    python3 - "$BUILD/bench_w1.log" "$BUILD/baseline.log" > "$BUILD/ratio.log" <<'PY'
import json, sys
def res(path):
    for line in open(path):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
ours, hf = res(sys.argv[1]), res(sys.argv[2])
if ours and hf:
    for k in ("fwd_bwd_tok_per_s", "tok_per_s"):
        print(f"ratio {k}: automoe {ours[k]} / transformers {hf[k]} = {ours[k] / hf[k]:.2f}x")
    print(f"peak memory: automoe {ours['peak_used_GiB']} GiB, transformers {hf['peak_GiB']} GiB")
PY
    cat "$BUILD/ratio.log"
  fi
fi
[ -n "${OUT:-}" ] && cp "${LOGS[@]}" "$BUILD/build.log" "$OUT/" 2>/dev/null

echo
echo "== device_model.sh summary: $fails failed stage(s) =="
grep -hE "^FAIL" "${LOGS[@]}" 2>/dev/null | head -n 40
grep -hE "rel-L2|max \|diff\||^RESULT|^ratio|^peak memory" "${LOGS[@]}" 2>/dev/null | head -n 60
exit "$fails"
