#!/usr/bin/env bash
# Builds the fastopt wheel for the lent GPU machine on a machine without a GPU, so that the
# GPU run spends no device time compiling: CPython 3.12 (the GPU machine has 3.12.3), the
# CUDA module for sm_90 (H100/H200), into .gpu/ (git-ignored; bench/gpu_check.sh installs
# it there with `pip install --no-deps` and builds on the device only if it will not import).
#
#   bash bench/build_gpu_wheel.sh            # -> .gpu/fastopt-*-cp312-cp312-linux_x86_64.whl
#   bash bench/build_gpu_wheel.sh --hash     # the hash of what the wheel is built from
#
# .gpu/SOURCE_HASH holds the hash of the C++/CUDA sources and build files the wheel was built
# from; gpu_check.sh uses the wheel only if the checkout there has the same (the Python
# package it copies from the checkout, so a Python-only change needs no new wheel).
#
# Environment (all optional): PYTHON312 (a CPython 3.12; default: pyenv's, else python3.12
# on PATH), CUDA_ARCH (90), BUILD_VENV (/tmp/fastopt-gpu-wheel-venv: a throwaway venv with
# the build requirements, made from PyPI on first use).
set -eu -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# The C++/CUDA sources and build files (paths relative to the checkout's root).
native_hash() {
  find csrc CMakeLists.txt pyproject.toml -type f ! -name '*.pyc' | LC_ALL=C sort |
    xargs sha256sum | sha256sum | cut -c1-16
}
if [ "${1:-}" = --hash ]; then native_hash; exit 0; fi
ARCH=${CUDA_ARCH:-90}
VENV=${BUILD_VENV:-/tmp/fastopt-gpu-wheel-venv}
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  for c in /root/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then PY312=$c; break; fi
  done
fi
[ -n "$PY312" ] || { echo "build_gpu_wheel: no CPython 3.12 found (set PYTHON312)" >&2; exit 2; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] ||
  { echo "build_gpu_wheel: nvcc not found" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
fi
# numpy: for the import check below (fastopt imports it)
"$VENV/bin/python" -c 'import numpy' 2>/dev/null || "$VENV/bin/python" -m pip install -q numpy
"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version'

mkdir -p .gpu
rm -f .gpu/fastopt-*.whl .gpu/SOURCE_HASH
hash=$(native_hash)
# The build tree is build/cp312-cp312-linux_x86_64 (pyproject's build-dir): incremental, and
# apart from the 3.11 builds.
PATH="$VENV/bin:$PATH" FASTOPT_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w .gpu .
whl=$(ls .gpu/fastopt-*-cp312-cp312-*.whl)

# The wheel must hold both modules and the whole package (fastopt/bench/ too), and import
# under 3.12: CUDA built for this arch, not usable here (no GPU).
"$VENV/bin/python" - "$whl" "$ARCH" <<'EOF'
import json, os, subprocess, sys, tempfile, zipfile
whl, arch = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(whl).namelist()
for want in ("fastopt/_cpu.", "fastopt/_cuda.", "fastopt/bench/gpu.py", "fastopt/__main__.py"):
    assert any(n.startswith(want) for n in names), f"{whl}: no {want}*"
with tempfile.TemporaryDirectory() as site:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", site, whl], check=True)
    code = "import fastopt, json; print(json.dumps(fastopt.info()['cuda']))"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd="/", text=True,
                         capture_output=True, env=dict(os.environ, PYTHONPATH=site)).stdout
cuda = json.loads(out)
print("fastopt.info()['cuda'] under 3.12:", json.dumps(cuda))
assert cuda.get("built"), "fastopt._cuda is not in the wheel"
assert arch in str(cuda.get("architectures")), f"architectures {cuda.get('architectures')!r}"
EOF
[ "$(native_hash)" = "$hash" ] || { echo "build_gpu_wheel: sources changed during the build" >&2; exit 1; }
echo "$hash" > .gpu/SOURCE_HASH
size=$(stat -c %s "$whl")
echo "build_gpu_wheel: $whl ($((size / 1024)) KiB)"
# Everything in the tree travels to the GPU machine under a 64 MiB cap.
(( size < 16 * 1024 * 1024 )) || { echo "build_gpu_wheel: wheel over 16 MiB" >&2; exit 1; }
