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

# clang with libFuzzer for the bounded fuzz tests (tests/fuzz.cmake); optional: without it those
# tests are not registered. The runtime package is versioned (libclang-rt-N-dev, N = clang's).
if ! command -v clang++ >/dev/null 2>&1 || [ ! -f "$(clang++ -print-file-name=libclang_rt.fuzzer-x86_64.a 2>/dev/null)" ]; then
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends clang || true
  ver=$(clang++ --version 2>/dev/null | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -n 1)
  [ -n "$ver" ] && { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "libclang-rt-$ver-dev" \
    || echo "[setup] warning: libclang-rt-$ver-dev not installed; the fuzz tests will not be registered"; }
fi

# Python helpers for parity tests (tokenizers vs HF, fixture reading). Optional at run time.
PY=${PYTHON:-python3}
if ! $PY -c "import tokenizers, safetensors, numpy" 2>/dev/null; then
  echo "[setup] pip install tokenizers safetensors numpy"
  $PY -m pip install -q tokenizers safetensors numpy || echo "[setup] warning: pip install failed; the tests that compare against HF tokenizers will skip"
fi
# cuDNN SDPA for the CUDA backend's attention (cmake/cudnn.cmake finds both through Python):
# cudnn-frontend's C++ headers (header-only; --no-deps: its Python side pulls in the CUTLASS DSL,
# which the C++ build does not need), and cuDNN itself from PyPI where the CUDA toolkit has none.
# Without them the CUDA backend builds with the fallback attention kernel only.
if command -v nvcc >/dev/null 2>&1; then
  FE_VERSION=1.32.0
  if [ "$($PY -c "import importlib.metadata as m; print(m.version('nvidia-cudnn-frontend'))" 2>/dev/null)" != "$FE_VERSION" ]; then
    echo "[setup] pip install --no-deps nvidia-cudnn-frontend==$FE_VERSION"
    $PY -m pip install -q --no-deps "nvidia-cudnn-frontend==$FE_VERSION" || echo "[setup] warning: pip install nvidia-cudnn-frontend failed; attention will use the fallback kernel"
  fi
  CUDA_INC="$(dirname "$(dirname "$(command -v nvcc)")")/include"
  if [ ! -f "$CUDA_INC/cudnn_version.h" ] && ! $PY -c "import nvidia.cudnn" 2>/dev/null; then
    echo "[setup] pip install nvidia-cudnn-cu13"
    $PY -m pip install -q "nvidia-cudnn-cu13>=9.10" || echo "[setup] warning: pip install nvidia-cudnn-cu13 failed; attention will use the fallback kernel"
  fi
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
