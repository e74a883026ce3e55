#!/usr/bin/env bash
# bench/device.sh: the one script run on the GPU machine (H200). From a fresh copy of the repo:
# configures and builds the CUDA backend and its op check (CMake + Ninja, sm_90a), runs
# cuda_op_check (every CUDA op against the CPU op), and prints a short table last.
#   bash bench/device.sh [FILTER]      FILTER: only the op groups whose name contains it
# Env: BUILD (build dir, default build-device), CUDA_ARCH (default 90a). Exit code: the op
# check's (its number of failures), or the build's. The log is copied to $OUT when set.
# cuDNN SDPA (attention): cuDNN comes with torch there (site-packages/nvidia/cudnn); the
# cudnn-frontend headers do not, so carry its wheel in .whl/ (ignored by git), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: nvidia-cudnn-frontend==1.32.0 -d .whl
# and CMake unpacks include/ from it (cmake/cudnn.cmake). Without it attention runs the fallback
# kernel only and the attention_*.cudnn checks SKIP.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device}
mkdir -p "$BUILD/.bin"

# Ninja: the system's, else pip's (the GPU machine has no ninja-build package).
if ! command -v ninja >/dev/null 2>&1; then
  python3 -c 'import ninja' 2>/dev/null || { echo "device.sh: no ninja (system or pip)"; exit 2; }
  printf '#!/bin/sh\nexec python3 -m ninja "$@"\n' > "$BUILD/.bin/ninja"
  chmod +x "$BUILD/.bin/ninja"
  export PATH="$PWD/$BUILD/.bin:$PATH"
fi
# PCRE2 from bench/fetch_deps.sh when the machine has none (the tokenizer, hence the CLI, needs
# it): a copy of its pkg-config file pointing at the extracted Debian package.
if ! pkg-config --exists libpcre2-8 2>/dev/null && [ -d .deps/pcre2/usr/include ]; then
  pc=$(find .deps/pcre2 -name libpcre2-8.pc | head -n 1)
  mkdir -p "$BUILD/.pkgconfig"
  sed "s|^prefix=.*|prefix=$PWD/.deps/pcre2/usr|" "$pc" > "$BUILD/.pkgconfig/libpcre2-8.pc"
  export PKG_CONFIG_PATH="$PWD/$BUILD/.pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
fi
# CUTLASS headers (sm90 grouped GEMMs): the nvidia-cutlass wheel, installed here from a carried
# .whl/nvidia_cutlass-*.whl when pip has none (the GPU machine has no network). Without them
# CMake builds the grouped GEMM fallback only and says so.
if ! python3 -c "import importlib.util as u; assert u.find_spec('cutlass_library')" 2>/dev/null; then
  for w in .whl/nvidia_cutlass-*.whl; do
    [ -f "$w" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$BUILD/.py" "$w" \
      && export PYTHONPATH="$PWD/$BUILD/.py${PYTHONPATH:+:$PYTHONPATH}"
  done
fi
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null

t0=$(date +%s)
# Warnings stay warnings here (a newer host compiler must not stop the run); CI has -Werror.
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DAUTOMOE_WERROR=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90a}" > "$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; echo "device.sh: configure failed"; exit 3; }
grep -E "PCRE2|CUDA compiler identification|cuDNN|CUTLASS" "$BUILD/configure.log"
cmake --build "$BUILD" -j "$(nproc)" --target cuda_op_check > "$BUILD/build.log" 2>&1 \
  || { tail -n 60 "$BUILD/build.log"; echo "device.sh: build failed"; exit 4; }
t1=$(date +%s)
echo "device.sh: built in $((t1 - t0)) s"

export AUTOMOE_THREADS=0  # the CPU reference on every core
"$BUILD/cuda_op_check" "$@" 2>&1 | tee "$BUILD/op_check.log"
rc=${PIPESTATUS[0]}
t2=$(date +%s)
[ -n "${OUT:-}" ] && cp "$BUILD/op_check.log" "$BUILD/build.log" "$OUT/" 2>/dev/null

# The short table, last: the failures, then one row per op.
echo
echo "== device.sh summary (build $((t1 - t0)) s, op check $((t2 - t1)) s, exit $rc) =="
grep -E "^FAIL" "$BUILD/op_check.log" | head -n 40
sed -n '/^op  *checks/,$p' "$BUILD/op_check.log"
exit "$rc"
