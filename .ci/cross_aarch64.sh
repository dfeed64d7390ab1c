#!/usr/bin/env bash
# Cross-compiles the CPU module for aarch64 (GH200, Graviton, Apple under Linux) with Debian's
# aarch64-linux-gnu-g++ through the project's own CMakeLists.txt: proves that the scalar path
# builds and links without the AVX2 kernels and that nothing refers to them. Run it from the
# repository root in an environment with pybind11 and cmake (CI's venv); it installs the
# cross compiler with apt-get when missing (needs root).
# Python's headers are the build machine's: they differ from an aarch64 Python's only in
# pyconfig.h facts that are the same on both 64-bit little-endian ABIs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    g++-aarch64-linux-gnu >/dev/null
fi

build=${FASTOPT_CROSS_BUILD_DIR:-build/cross-aarch64}
rm -rf "$build"
cmake -S . -B "$build" -G Ninja \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
  -DFASTOPT_CUDA=OFF \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v python)" \
  -DPython_INCLUDE_DIR="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
cmake --build "$build" --target _cpu -j "$(nproc)"

module=$(ls "$build"/_cpu.*.so)
aarch64-linux-gnu-readelf -h "$module" | grep -q "AArch64" || { echo "not an aarch64 object: $module" >&2; exit 1; }
# A shared module may leave symbols undefined (Python's are), so a stray reference to the AVX2
# kernels would link and fail only at import: check that there is none.
if aarch64-linux-gnu-nm -D --undefined-only "$module" | grep -q isa_avx2; then
  echo "$module refers to AVX2 kernels that aarch64 does not build" >&2
  exit 1
fi
echo "aarch64 cross build OK: $module"
