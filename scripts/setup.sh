#!/usr/bin/env bash
# scripts/setup.sh: installs every dependency automoe needs to build and test on a Debian machine.
# Debian packages through apt-get, Python tools (parity/test helpers only) through pip. Idempotent.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

DEB_PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  nlohmann-json3-dev libyaml-cpp-dev libcli11-dev libfmt-dev libpcre2-dev
  libopenblas-dev libopenmpi-dev openmpi-bin
  libgtest-dev libgmock-dev libbenchmark-dev
  clang-format python3 python3-pip
)
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python helpers for parity tests (tokenizers vs HF, fixture reading). Optional at run time.
PY=${PYTHON:-python3}
if ! $PY -c "import tokenizers, safetensors, numpy" 2>/dev/null; then
  echo "[setup] pip install tokenizers safetensors numpy"
  $PY -m pip install -q tokenizers safetensors numpy || echo "[setup] warning: pip install failed; the tests that compare against HF tokenizers will skip"
fi
# CUTLASS C++ headers (the sm90 grouped GEMMs of the CUDA backend) ship in the nvidia-cutlass
# wheel under cutlass_library/source/; CMake asks python for the path. Without them the CUDA
# backend builds its slow fallback only. --no-deps: only the headers are used, not its Python
# side (cuda-python, scipy, ...); CMake locates the package without importing it.
if ! $PY -c "import importlib.util as u; assert u.find_spec('cutlass_library')" 2>/dev/null; then
  echo "[setup] pip install --no-deps nvidia-cutlass==4.2.0.0"
  $PY -m pip install -q --no-deps nvidia-cutlass==4.2.0.0 || echo "[setup] warning: pip install nvidia-cutlass failed; the CUDA grouped GEMM builds its fallback only"
fi
echo "[setup] dependencies ready"
