#!/usr/bin/env bash
# One command for a CUDA machine (no network needed). In order: record the machine; build
# and install fastopt from this checkout (CUDA for one architecture); `python -m fastopt
# info`; the tests marked cuda; the GPU benchmark; bench/sanitize_small.py plain, then under
# compute-sanitizer memcheck and racecheck; and -- time allowing -- the rest of the test
# suite. Every stage runs whatever happened before; the summary says which passed, and the
# exit status is 1 if any failed (2: bad usage).
#
#   bash bench/gpu_check.sh OUTDIR
#
# OUTDIR gets: summary.txt, env.txt, nvidia-smi.txt, build.log, info.txt, info.json,
# tests_cuda.log, sanitize_plain.log, memcheck.log, racecheck.log, bench_gpu.txt,
# bench_gpu.stderr, bench_gpu.json, bench_gpu.png, tests_rest.log.
#
# Environment (all optional): PYTHON (python3), CUDA_ARCH (90), GPU_CHECK_BUDGET_S (510:
# the stages are cut to fit in it, the optional last one first), BENCH_ARGS (extra bench
# options, e.g. "--quick" or "--only adamw"), FASTOPT_SANITIZE_LIBS ("torch,cupy": the
# array libraries sanitize_small.py uses), TESTS_CUDA_S (180) and BENCH_S (240): the
# longest those two stages may take; STAGES (tests,bench,sanitize,rest: the optional
# stages to run, e.g. STAGES=bench to time only -- the build and info always run) and
# TESTS_ARGS (tests/: what the CUDA test stage runs, e.g. "tests/test_cuda.py -k sgd" to
# re-run the failures of a previous call).
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
ARCH=${CUDA_ARCH:-90}
BUDGET=${GPU_CHECK_BUDGET_S:-510}
START=$(date +%s)
for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do
  if [ -d "$d" ]; then
    case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
  fi
done
export PATH

NAMES=()
STATES=()
LOGS=()
NOTES=()

# record STAGE STATUS LOG [NOTE]: STATUS is PASS, FAIL, TIMEOUT, SKIP or "NOT RUN".
record() {
  NAMES+=("$1")
  STATES+=("$2")
  LOGS+=("$3")
  NOTES+=("${4:-}")
  echo "== $1: $2${4:+ ($4)}   [$(elapsed)s elapsed]"
}
elapsed() { echo $(( $(date +%s) - START )); }
# wants STAGE: whether STAGE is among those asked for.
wants() { case ",${STAGES:-tests,bench,sanitize,rest}," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# limit CAP: seconds a stage may take -- CAP, or what is left of the budget.
limit() {
  local left=$(( BUDGET - $(elapsed) ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}
# status RC: PASS, TIMEOUT or FAIL from an exit status of `timeout`.
status() {
  case "$1" in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    *) echo FAIL ;;
  esac
}
have_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

echo "gpu_check: $ROOT -> $OUT (budget ${BUDGET}s)"

# ---- 0. the machine ----------------------------------------------------------------------
{
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi
    echo
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,clocks.max.mem,power.limit,persistence_mode --format=csv
  else
    echo "nvidia-smi: not found"
  fi
} > "$OUT/nvidia-smi.txt" 2>&1
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  free -g 2>/dev/null | head -2
  echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  for m in numpy pytest hypothesis ml_dtypes cupy torch matplotlib pybind11 scikit_build_core; do
    printf '%-18s %s\n' "$m" "$("$PY" -c "import $m; print(getattr($m, '__version__', 'present'))" 2>/dev/null || echo 'NOT INSTALLED')"
  done
  "$PY" -c "import torch; print('torch cuda:', torch.version.cuda, 'available:', torch.cuda.is_available())" 2>&1 | tail -1
  echo "nvcc: $(nvcc --version 2>&1 | tail -2 | tr '\n' ' ')"
  echo "cmake: $(cmake --version 2>&1 | head -1)"
  echo "ninja: $(ninja --version 2>&1)"
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not on PATH')"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
} > "$OUT/env.txt" 2>&1
MISSING=""
for m in pytest hypothesis ml_dtypes cupy torch matplotlib; do
  have_module "$m" || MISSING="$MISSING $m"
done
echo "gpu_check: not installed:${MISSING:- nothing}"

# ---- 1. build and install ----------------------------------------------------------------
SITE="${TMPDIR:-/tmp}/fastopt_gpu_check_site"  # used only if the environment cannot be
                                               # installed into
# Without pip: CMake directly, the modules and the Python sources into $SITE/fastopt.
cmake_install() {
  local pybind11_dir
  pybind11_dir=$("$PY" -m pybind11 --cmakedir) || return 1
  rm -rf "$SITE" && mkdir -p "$SITE/fastopt" || return 1
  cmake -S . -B build/gpu_check -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTOPT_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -Dpybind11_DIR="$pybind11_dir" \
    -DPython_EXECUTABLE="$(command -v "$PY")" || return 1
  cmake --build build/gpu_check || return 1
  cmake --install build/gpu_check --prefix "$SITE" || return 1
  cp python/fastopt/*.py python/fastopt/py.typed "$SITE/fastopt/" 2>/dev/null || cp python/fastopt/*.py "$SITE/fastopt/"
}

build() {
  local rc
  rm -rf "$SITE"
  export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" FASTOPT_CUDA=ON
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  if ! have_module pip; then
    {
      echo "# pip is not installed: cmake + ninja into $SITE"
      timeout -k 10 "$(limit 330)" bash -c "$(declare -f cmake_install); PY='$PY' SITE='$SITE' ARCH='$ARCH' cmake_install"
    } > "$OUT/build.log" 2>&1
    rc=$?
  else
    {
      echo "# CMAKE_ARGS=$CMAKE_ARGS FASTOPT_CUDA=ON $PY -m pip install --no-index --no-build-isolation --no-deps -v -e ."
      timeout -k 10 "$(limit 330)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
    } > "$OUT/build.log" 2>&1
    rc=$?
    if (( rc != 0 && rc != 124 && rc != 137 )) &&
       grep -qiE "externally.managed|permission denied|read-only file system|not writ(e)?able" "$OUT/build.log"; then
      # The environment cannot be written to: install into a directory of our own instead.
      rm -rf "$SITE"
      {
        echo
        echo "# retry into a target directory: pip install --target $SITE ."
        timeout -k 10 "$(limit 300)" "$PY" -m pip install --no-index --no-build-isolation --no-deps -v --target "$SITE" .
      } >> "$OUT/build.log" 2>&1
      rc=$?
    fi
  fi
  if (( rc == 0 )) && [ -d "$SITE/fastopt" ]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "# installed into $SITE (PYTHONPATH)" >> "$OUT/build.log"
  fi
  if (( rc == 0 )); then
    # Imported from outside the checkout, so that this is the installed package.
    (cd / && "$PY" -c "import fastopt, json; s = fastopt.info()['cuda']; print('fastopt', fastopt.__version__, fastopt.__file__); print(json.dumps(s)); assert s['built'], 'fastopt._cuda was not built'") >> "$OUT/build.log" 2>&1
    rc=$?
    (( rc != 0 )) && { record build FAIL build.log "installed, but fastopt._cuda is missing"; return; }
  fi
  record build "$(status $rc)" build.log
}
build

# ---- 2. info ------------------------------------------------------------------------------
timeout -k 5 60 "$PY" -m fastopt info > "$OUT/info.txt" 2>&1
rc=$?
timeout -k 5 60 "$PY" -m fastopt info --json > "$OUT/info.json" 2>>"$OUT/info.txt"
if (( rc == 0 )) && timeout -k 5 60 "$PY" -c "import fastopt, sys; sys.exit(0 if fastopt.cuda_available() else 1)" 2>>"$OUT/info.txt"; then
  record info PASS info.txt
else
  record info FAIL info.txt "CUDA not usable: see info.txt"
fi

# ---- 3. the CUDA tests -------------------------------------------------------------------
# Test files importing an optional module that is missing at top level (not inside a try)
# would fail to collect: leave them out. Other collection errors are reported, and the
# tests that did collect still run.
IGNORES=()
IGNORED=""
for m in hypothesis ml_dtypes; do
  if ! have_module "$m"; then
    for f in $(grep -lE "^(import|from)[[:space:]]+$m([[:space:].]|$)" tests/*.py 2>/dev/null); do
      IGNORES+=("--ignore=$f")
      IGNORED="$IGNORED $(basename "$f")"
    done
  fi
done
PYTEST=(-m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors
        ${IGNORES[@]+"${IGNORES[@]}"})
t=$(limit "${TESTS_CUDA_S:-180}")
if ! wants tests; then
  record tests-cuda SKIP tests_cuda.log "not in STAGES"
elif ! have_module pytest; then
  echo "pytest is not installed" > "$OUT/tests_cuda.log"
  record tests-cuda SKIP tests_cuda.log "pytest not installed"
elif (( t < 30 )); then
  record tests-cuda "NOT RUN" tests_cuda.log "out of time (${t}s left)"
else
  {
    echo "# $PY ${PYTEST[*]} -m cuda ${TESTS_ARGS:-tests/}   (left out, a module missing:${IGNORED:- none})"
    # shellcheck disable=SC2086  # TESTS_ARGS is a list of arguments
    timeout -k 10 "$t" "$PY" "${PYTEST[@]}" --durations=10 -m cuda ${TESTS_ARGS:-tests/}
  } > "$OUT/tests_cuda.log" 2>&1
  rc=$?
  summary=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/tests_cuda.log" | tail -1)
  if (( rc == 5 )); then
    record tests-cuda FAIL tests_cuda.log "no test marked cuda was collected"
  else
    record tests-cuda "$(status $rc)" tests_cuda.log "$summary${IGNORED:+; left out:$IGNORED}"
  fi
fi

# ---- 4. the GPU benchmark ----------------------------------------------------------------
t=$(limit "${BENCH_S:-240}")
if ! wants bench; then
  record bench SKIP bench_gpu.txt "not in STAGES"
elif (( t < 60 )); then
  record bench "NOT RUN" bench_gpu.txt "out of time (${t}s left)"
else
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  timeout -k 10 "$t" "$PY" -m fastopt bench --device cuda --json "$OUT/bench_gpu.json" \
    --plot "$OUT/bench_gpu.png" --progress ${BENCH_ARGS:-} > "$OUT/bench_gpu.txt" 2> "$OUT/bench_gpu.stderr"
  rc=$?
  if (( rc == 0 )) && grep -q "cuda: skipped" "$OUT/bench_gpu.txt"; then
    record bench FAIL bench_gpu.txt "$(grep -m1 'cuda: skipped' "$OUT/bench_gpu.txt")"
  else
    record bench "$(status $rc)" bench_gpu.txt "$(grep -cE '(FAIL|ERROR):' "$OUT/bench_gpu.txt") failing rows"
  fi
fi

# ---- 5. compute-sanitizer ----------------------------------------------------------------
SAN=$(command -v compute-sanitizer 2>/dev/null || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$c" ] && SAN=$c
done
t=$(limit 60)
if ! wants sanitize; then
  record sanitize-plain SKIP sanitize_plain.log "not in STAGES"
elif (( t < 20 )); then
  record sanitize-plain "NOT RUN" sanitize_plain.log "out of time (${t}s left)"
else
  # The same script without a sanitizer: its own checks (parity with the CPU kernels).
  timeout -k 10 "$t" "$PY" bench/sanitize_small.py > "$OUT/sanitize_plain.log" 2>&1
  rc=$?
  record sanitize-plain "$(status $rc)" sanitize_plain.log "$(tail -1 "$OUT/sanitize_plain.log")"
fi

# sanitizer TOOL LOG CAP: bench/sanitize_small.py under compute-sanitizer --tool TOOL.
sanitizer() {
  local tool=$1 log=$2 cap=$3 t rc line errors
  t=$(limit "$cap")
  if ! wants sanitize; then
    record "$tool" SKIP "$log" "not in STAGES"
    return
  fi
  if [ -z "$SAN" ]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin)" > "$OUT/$log"
    record "$tool" FAIL "$log" "compute-sanitizer not found"
    return
  fi
  if (( t < 30 )); then
    record "$tool" "NOT RUN" "$log" "out of time (${t}s left)"
    return
  fi
  {
    echo "# $SAN --tool $tool --error-exitcode 99 $PY bench/sanitize_small.py"
    timeout -k 10 "$t" "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 100 \
      "$PY" bench/sanitize_small.py
  } > "$OUT/$log" 2>&1
  rc=$?
  line=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/$log" | tail -1)
  errors=$(echo "$line" | grep -oE "[0-9]+ error" | grep -oE "[0-9]+" | head -1)
  if (( rc == 124 || rc == 137 )); then
    record "$tool" TIMEOUT "$log" "${line:-no summary}"
  elif (( rc == 99 )) || [ "${errors:-0}" != "0" ]; then
    record "$tool" FAIL "$log" "SANITIZER ERRORS: ${line:-see log}"
  elif (( rc != 0 )); then
    record "$tool" FAIL "$log" "exit $rc (script checks failed?): ${line:-no summary}"
  elif [ -z "$line" ]; then
    record "$tool" FAIL "$log" "no sanitizer summary in the log"
  else
    record "$tool" PASS "$log" "$line"
  fi
}
sanitizer memcheck memcheck.log 120
sanitizer racecheck racecheck.log 90

# ---- 6. the rest of the suite, time allowing ---------------------------------------------
t=$(limit 150)
if ! wants rest; then
  record tests-rest SKIP tests_rest.log "not in STAGES"
elif ! have_module pytest; then
  record tests-rest SKIP tests_rest.log "pytest not installed"
elif (( t < 45 )); then
  record tests-rest SKIP tests_rest.log "out of time (${t}s left)"
else
  {
    echo "# $PY ${PYTEST[*]} -x -m 'not cuda and not slow' tests/"
    timeout -k 10 "$t" "$PY" "${PYTEST[@]}" -x -m "not cuda and not slow" tests/
  } > "$OUT/tests_rest.log" 2>&1
  rc=$?
  summary=$(grep -E "(passed|failed|error|skipped)" "$OUT/tests_rest.log" | tail -1)
  if (( rc == 124 || rc == 137 )) && grep -qE "^(FAILED|ERROR) |^E  " "$OUT/tests_rest.log"; then
    record tests-rest FAIL tests_rest.log "a test failed before the time limit (${t}s)"
  elif (( rc == 124 || rc == 137 )); then
    # Optional stage: running out of time is not a failure, a failing test is.
    record tests-rest SKIP tests_rest.log "stopped at the time limit (${t}s), no failure before it"
  else
    record tests-rest "$(status $rc)" tests_rest.log "$summary"
  fi
fi

# ---- summary ------------------------------------------------------------------------------
failed=0
for s in "${STATES[@]}"; do
  case "$s" in PASS | SKIP) ;; *) failed=1 ;; esac
done
{
  echo "gpu_check summary ($(elapsed)s; not installed:${MISSING:- nothing})"
  grep -A1 "^name," "$OUT/nvidia-smi.txt" 2>/dev/null | tail -1 | sed 's/^/  gpu: /'
  for i in "${!NAMES[@]}"; do
    printf '  %-15s %-8s %s\n' "${NAMES[$i]}" "${STATES[$i]}" "${NOTES[$i]}"
  done
  if [ -f "$OUT/bench_gpu.txt" ]; then
    echo
    grep -E "^(GPU|ceiling|parity)|NOT MET|: met$" "$OUT/bench_gpu.txt" | sed 's/^/  /'
  fi
  for i in "${!NAMES[@]}"; do
    case "${STATES[$i]}" in
      PASS | SKIP) ;;
      *)
        echo
        echo "---- ${NAMES[$i]}: ${STATES[$i]} -- last lines of ${LOGS[$i]} ----"
        tail -n 25 "$OUT/${LOGS[$i]}" 2>/dev/null
        err="$OUT/${LOGS[$i]%.txt}.stderr"
        if [ -s "$err" ]; then
          echo "---- ${LOGS[$i]%.txt}.stderr (progress, tracebacks) ----"
          tail -c 4000 "$err" | tr '\r' '\n' | sed 's/\x1b\[K//g' | grep -v '^$' | tail -n 20
        fi
        ;;
    esac
  done
  echo
  if (( failed )); then echo "gpu_check: FAILED"; else echo "gpu_check: all stages passed"; fi
} | tee "$OUT/summary.txt"
exit "$failed"
