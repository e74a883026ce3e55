#!/usr/bin/env bash
# bench/fetch_deps.sh: run HERE (not on the GPU machine) before a device run. The GPU machine
# has no package registry and does not see ../shared, so this gathers what bench/device.sh needs
# into git-ignored folders that the device call carries (carry: [".whl", ".deps"]):
#   .whl/          header-only PyPI wheels (cudnn-frontend, CUTLASS); CMake unpacks them
#   .deps/pcre2/   libpcre2-dev extracted from the Debian packages (the tokenizer's regex engine)
#   .deps/bench/   a copy of ../shared/bench (the native Transformers baselines)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .deps
pipdl() {
  [ -n "$(ls .whl/"$2"-* 2>/dev/null)" ] && return 0
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$1"
}
pipdl nvidia-cudnn-frontend==1.32.0 nvidia_cudnn_frontend
pipdl nvidia-cutlass==4.2.0.0 nvidia_cutlass
if [ ! -d .deps/pcre2/usr/include ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download libpcre2-dev libpcre2-8-0 >/dev/null 2>&1)
  for f in "$tmp"/*.deb; do dpkg -x "$f" .deps/pcre2; done
  rm -rf "$tmp"
fi
rm -rf .deps/bench && cp -r ../shared/bench .deps/bench
du -sh .whl .deps
