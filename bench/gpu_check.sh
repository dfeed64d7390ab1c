#!/usr/bin/env bash
# The GPU check, in two calls of the lent GPU machine (each fits one `run`; together with one
# machine start they fit a 15-minute device budget). No network is needed there.
#
#   bash bench/gpu_check.sh check OUTDIR   # call 1 (7.5 min): install, preflight, the tests
#                                          # marked cuda (8 workers), bench/sanitize_small.py
#                                          # plain, under memcheck and under racecheck
#   bash bench/gpu_check.sh bench OUTDIR   # call 2 (4.5 min): install, preflight, the full
#                                          # GPU bench but Adafactor: table, JSON, plot; then
#                                          # in more_gpu.txt AdamW with 8-bit state on GPT-2
#                                          # small (bench/lowbit_rows) and Adafactor's quick
#                                          # rows (bench --only adafactor --quick)
#
# Before: build the wheel here, on the machine without a GPU (about 2 minutes):
#   bash bench/build_gpu_wheel.sh          # -> .gpu/ (git-ignored, so it travels only carried)
# The two `run` calls (issue call 2 right after call 1 returns: the machine stays warm for
# 30 s, and a fresh start costs 1-2 minutes of device time; give_back after call 2):
#   run(command="bash bench/gpu_check.sh check $OUT", carry=[".gpu"], timeout_s=510)
#   run(command="bash bench/gpu_check.sh bench $OUT", carry=[".gpu"], timeout_s=330)
# start (1-2 min) + 7.5 + 4.5 min: inside the 15 minutes.
# To re-run failures only, name them (node ids as in failures.log), e.g.
#   run(command="TESTS_ARGS='tests/test_cuda.py::test_plan_starts_empty' bash bench/gpu_check.sh check $OUT", ...)
#
# Install: the wheel in .gpu/ with `pip install --no-deps --target`, if it was built from
# the C++/CUDA sources and build files this checkout has (.gpu/SOURCE_HASH), with the Python
# package copied over it from the checkout; otherwise (no wheel, other sources, or it does
# not import) a build on the device into the same target directory (a few minutes).
#
# OUTDIR gets (at most 8 files each, so that all come back):
#   check: summary.txt preflight.txt install.log tests_cuda.log failures.log
#          sanitize_plain.log memcheck.log racecheck.log
#   bench: summary.txt preflight.txt install.log bench_gpu.txt bench_gpu.stderr
#          bench_gpu.json bench_gpu.png more_gpu.txt
# Every log is written as the stage runs: a call killed at its limit still shows what ran.
# failures.log holds each failing test's traceback the moment it fails, and the stacks of a
# test stopped at TEST_TIMEOUT_S (bench/pytest_live_failures.py). The exit status is 1
# if a stage failed, 2 on bad usage.
#
# Environment (all optional): PYTHON (python3), CUDA_ARCH (90: for the on-device build),
# GPU_CHECK_BUDGET_S (check 450, bench 270: stages are cut to fit), TESTS_CUDA_S (300: the
# test stage's cap), TEST_TIMEOUT_S (120: per test), TEST_WORKERS (8: pytest-xdist workers),
# TESTS_ARGS (tests/: what the test stage runs), BENCH_ARGS (extra bench options, e.g.
# "--only adamw"),
# FASTOPT_SANITIZE_LIBS ("torch,cupy": the array libraries of sanitize_small.py).
set -u -o pipefail

if [ $# -ne 2 ] || { [ "$1" != check ] && [ "$1" != bench ]; }; then
  echo "usage: $0 check|bench OUTDIR" >&2
  exit 2
fi
MODE=$1
mkdir -p "$2" || exit 2
OUT=$(cd "$2" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-python3}
ARCH=${CUDA_ARCH:-90}
if [ "$MODE" = check ]; then BUDGET=${GPU_CHECK_BUDGET_S:-450}; else BUDGET=${GPU_CHECK_BUDGET_S:-270}; fi
SITE="${TMPDIR:-/tmp}/fastopt_gpu_site"
# Seconds an on-device build leaves for the stages after it.
if [ "$MODE" = check ]; then AFTER_BUILD=200; else AFTER_BUILD=120; fi
START=$(date +%s)
export PYTHONUNBUFFERED=1
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
# limit CAP [RESERVE]: seconds a stage may take -- CAP, or what is left of the budget after
# RESERVE seconds kept for the stages after it.
# At least 1 (`timeout 0` would mean no limit).
limit() {
  local left=$(( BUDGET - $(elapsed) - ${2:-0} ))
  if (( left < 1 )); then echo 1; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
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

echo "gpu_check $MODE: $ROOT -> $OUT (budget ${BUDGET}s)"

# ---- 1. preflight: the machine ------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(uname -a); cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not on PATH') $(timeout 30 compute-sanitizer --version 2>&1 | grep -i version | head -1)"
  echo "nvcc: $(nvcc --version 2>&1 | tail -2 | tr '\n' ' ')"
  echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib
for m in ["numpy", "pytest", "xdist", "pytest_timeout", "hypothesis", "ml_dtypes", "matplotlib",
          "cupy", "torch"]:
    try:
        mod = importlib.import_module(m)
        print(f"{m:15s} {getattr(mod, '__version__', 'present')}")
    except Exception as exc:
        print(f"{m:15s} NOT USABLE: {exc}")
try:
    import torch
    print("torch: cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception:
    pass
try:
    import cupy
    print("cupy: runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver",
          cupy.cuda.runtime.driverGetVersion(), "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print("cupy: not usable:", exc)
EOF
} 2>&1 | tee "$OUT/preflight.txt"

# ---- 2. install ----------------------------------------------------------------------------
# fastopt_ok: imports from outside the checkout, with fastopt._cuda built.
fastopt_ok() {
  (cd / && PYTHONPATH="$SITE" "$PY" -c "import fastopt; assert fastopt.info()['cuda']['built'], fastopt.info()['cuda']")
}
install() {
  local whl want have rc pybind11_dir
  whl=$(ls .gpu/fastopt-*-cp312-*.whl 2>/dev/null | head -1)
  want=$(cat .gpu/SOURCE_HASH 2>/dev/null)
  have=$(bash bench/build_gpu_wheel.sh --hash)
  rm -rf "$SITE"
  if [ -n "$whl" ] && [ "$want" = "$have" ]; then
    echo "# the wheel $whl (sources $have): pip install --no-deps --target $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$whl" &&
       cp -r python/fastopt/. "$SITE/fastopt/" && fastopt_ok; then
      echo "# installed the wheel, the Python package copied over it from the checkout"
      return 0
    fi
    echo "# the wheel did not install or import: building on the device"
  elif [ -n "$whl" ]; then
    echo "# the wheel was built from other sources ($want, this checkout: $have): building on the device"
  else
    echo "# no wheel in .gpu/ (bench/build_gpu_wheel.sh, carry .gpu): building on the device"
  fi
  rm -rf "$SITE"
  export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" FASTOPT_CUDA=ON
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  if have_module pip; then
    echo "# CMAKE_ARGS=$CMAKE_ARGS FASTOPT_CUDA=ON $PY -m pip install --no-build-isolation --no-deps --target $SITE ."
    timeout -k 10 "$(limit 300 "$AFTER_BUILD")" "$PY" -m pip install --no-index --no-build-isolation \
      --no-deps -v --target "$SITE" . || return
  else  # CMake directly: the modules, then the whole Python package (fastopt/bench/ too)
    echo "# pip is not installed: cmake + ninja into $SITE"
    pybind11_dir=$("$PY" -m pybind11 --cmakedir) || return
    mkdir -p "$SITE/fastopt" || return
    timeout -k 10 "$(limit 300 "$AFTER_BUILD")" bash -c "
      cmake -S . -B build/gpu_check -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTOPT_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES='$ARCH' -Dpybind11_DIR='$pybind11_dir' \
        -DPython_EXECUTABLE='$(command -v "$PY")' &&
      cmake --build build/gpu_check && cmake --install build/gpu_check --prefix '$SITE'" || return
    cp -r python/fastopt/. "$SITE/fastopt/" || return
  fi
  fastopt_ok
}
install > "$OUT/install.log" 2>&1
rc=$?
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
how=$(grep -m1 -oE "installed the wheel|building on the device" "$OUT/install.log")
record install "$(status $rc)" install.log "${how:-see install.log}"

# ---- 3. preflight: fastopt -----------------------------------------------------------------
USABLE=0
(cd / && timeout -k 5 60 "$PY" -c "import fastopt, json; print('fastopt', fastopt.__version__, fastopt.__file__); print(json.dumps(fastopt.info(), indent=1))") 2>&1 |
  tee -a "$OUT/preflight.txt" | grep -E '"(usable|reason|architectures|name|cpu_path)"|^fastopt|Error'
(cd / && timeout -k 5 60 "$PY" -c "import fastopt, sys; sys.exit(0 if fastopt.cuda_available() else 1)") >/dev/null 2>&1 && USABLE=1
if (( USABLE )); then
  record cuda PASS preflight.txt "fastopt.cuda_available()"
else
  record cuda FAIL preflight.txt "CUDA not usable by fastopt: see preflight.txt; the GPU stages are skipped"
fi

# ---- check: the CUDA tests -----------------------------------------------------------------
run_tests() {
  local t args=() summary rc
  # Test files importing an optional module that is missing at top level would fail to
  # collect: leave them out (the others still run).
  local ignored=""
  for m in hypothesis ml_dtypes; do
    if ! have_module "$m"; then
      for f in $(grep -lE "^(import|from)[[:space:]]+$m([[:space:].]|$)" tests/*.py 2>/dev/null); do
        args+=("--ignore=$f")
        ignored="$ignored $(basename "$f")"
      done
    fi
  done
  # The bench's own tests start whole benchmarks (torch.compile peers): call 2 runs the bench.
  args+=(--ignore=tests/test_bench.py)
  t=$(limit "${TESTS_CUDA_S:-300}" 200)  # 200 s kept for the sanitizer stages
  if ! have_module pytest; then
    echo "pytest is not installed" > "$OUT/tests_cuda.log"
    record tests-cuda FAIL tests_cuda.log "pytest not installed"
    return
  fi
  if (( t < 30 )); then record tests-cuda "NOT RUN" tests_cuda.log "out of time (${t}s left)"; return; fi
  : > "$OUT/failures.log"
  # pytest over the tests marked $1 (a -m expression), with the workers where $2 is "-n",
  # for at most $3 seconds, keeping $4 for what follows
  cuda_pytest() {
    local marks=$1 workers=() cap
    [ "$2" = "-n" ] && have_module xdist && workers=(-n "${TEST_WORKERS:-8}")
    cap=$(limit "$3" "$4")
    echo "# $PY -m pytest -q -rfE --tb=short -p no:cacheprovider -p pytest_live_failures ${args[*]} ${workers[*]} -m '$marks' ${TESTS_ARGS:-tests/}   (cap ${cap}s; left out, a module missing:${ignored:- none})"
    # shellcheck disable=SC2086  # TESTS_ARGS is a list of arguments
    # bench/pytest_live_failures.py: failures.log as tests fail, and the per-test limit
    # (a test past it has its stacks logged and its worker ended; xdist goes on).
    PYTHONPATH="$ROOT/bench:$PYTHONPATH" FASTOPT_FAILURES_LOG="$OUT/failures.log" \
      FASTOPT_TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-120}" \
      timeout -k 10 "$cap" "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider \
      -p pytest_live_failures --continue-on-collection-errors --durations=15 "${args[@]}" \
      "${workers[@]}" -m "$marks" ${TESTS_ARGS:-tests/}
  }
  (
    cuda_pytest "cuda and not device_wide" -n "$t" 230  # (30 s kept for the run below)
    rc=$?
    # the tests that fill the GPU's memory, after the others and on one worker: beside
    # other tests they would make those run out of memory
    if (( rc != 124 && rc != 137 )); then
      if (( $(limit 30 200) < 15 )); then
        echo "# the device_wide tests: NOT RUN (out of time)"
      else
        cuda_pytest "cuda and device_wide" "" 30 200
        wide=$?
        # one of the two collecting nothing (5) is no failure; either failing is
        if (( wide != 5 )) && (( rc == 0 || rc == 5 )); then rc=$wide; fi
      fi
    fi
    exit "$rc"
  ) > "$OUT/tests_cuda.log" 2>&1
  rc=$?
  # (the last summary line of each of the two runs)
  summary=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT/tests_cuda.log" | tail -2 |
    paste -sd ';' -)
  if (( rc == 5 )); then
    record tests-cuda FAIL tests_cuda.log "no test marked cuda was collected"
  elif (( rc == 124 || rc == 137 )); then
    record tests-cuda TIMEOUT tests_cuda.log "stopped at ${t}s; $(grep -c '^==== FAILED' "$OUT/failures.log") failed before (failures.log)"
  else
    record tests-cuda "$(status $rc)" tests_cuda.log "$summary${ignored:+; left out:$ignored}"
  fi
}

# ---- check: compute-sanitizer --------------------------------------------------------------
SAN=$(command -v compute-sanitizer 2>/dev/null || true)
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$c" ] && SAN=$c
done
sanitize_plain() {
  local t rc
  t=$(limit 45 150)
  if (( t < 15 )); then record sanitize-plain "NOT RUN" sanitize_plain.log "out of time"; return; fi
  # The same script without a sanitizer: its own checks (parity with the CPU kernels).
  timeout -k 10 "$t" "$PY" bench/sanitize_small.py > "$OUT/sanitize_plain.log" 2>&1
  rc=$?
  record sanitize-plain "$(status $rc)" sanitize_plain.log "$(tail -1 "$OUT/sanitize_plain.log")"
}
# sanitizer TOOL LOG CAP RESERVE: bench/sanitize_small.py under compute-sanitizer --tool TOOL.
sanitizer() {
  local tool=$1 log=$2 t rc line errors
  t=$(limit "$3" "$4")
  if [ -z "$SAN" ]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin)" > "$OUT/$log"
    record "$tool" FAIL "$log" "compute-sanitizer not found"
    return
  fi
  if (( t < 20 )); then record "$tool" "NOT RUN" "$log" "out of time (${t}s left)"; return; fi
  {
    echo "# $SAN --tool $tool --error-exitcode 99 $PY bench/sanitize_small.py   (cap ${t}s)"
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

# ---- bench: the full GPU benchmark ---------------------------------------------------------
run_bench() {
  local t rc
  t=$(limit 270 80)  # 80 s left for run_lowbit and run_adafactor
  if (( t < 60 )); then record bench "NOT RUN" bench_gpu.txt "out of time (${t}s left)"; return; fi
  # Every case but Adafactor's (run_adafactor's), unless BENCH_ARGS names others.
  local cases
  cases=$("$PY" -c "from fastopt.bench.common import OPTIMIZERS; print(','.join([*OPTIMIZERS, 'quant', 'newton']))")
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  timeout -k 10 "$t" "$PY" -m fastopt bench --device cuda --json "$OUT/bench_gpu.json" \
    --plot "$OUT/bench_gpu.png" --progress --only "$cases" ${BENCH_ARGS:-} \
    > "$OUT/bench_gpu.txt" 2> "$OUT/bench_gpu.stderr"
  rc=$?
  if (( rc == 0 )) && grep -q "cuda: skipped" "$OUT/bench_gpu.txt"; then
    record bench FAIL bench_gpu.txt "$(grep -m1 'cuda: skipped' "$OUT/bench_gpu.txt")"
  else
    record bench "$(status $rc)" bench_gpu.txt "$(grep -cE '(FAIL|ERROR):' "$OUT/bench_gpu.txt") failing rows (cap ${t}s)"
  fi
}

# ---- bench: AdamW with 8-bit and bfloat16 state on GPT-2 small's params -------------------
run_lowbit() {
  local t rc
  t=$(limit 50 30)  # 30 s left for run_adafactor
  if (( t < 20 )); then record lowbit "NOT RUN" more_gpu.txt "out of time (${t}s left)"; return; fi
  echo "# AdamW, fp32 / bf16 / int8 state (fastopt.bench.lowbit_rows)" >> "$OUT/more_gpu.txt"
  timeout -k 5 "$t" "$PY" -m fastopt.bench.lowbit_rows --device cuda --model gpt2-small \
    --rounds 5 --calls 5 >> "$OUT/more_gpu.txt" 2>&1
  rc=$?
  record lowbit "$(status $rc)" more_gpu.txt "AdamW fp32 / bf16 / int8 state vs torch fused (cap ${t}s)"
}

# ---- bench: Adafactor's quick rows (a square matrix, 2 GPT-2 blocks, ResNet-50's stage 1) ---
run_adafactor() {
  local t rc
  t=$(limit 45)
  if (( t < 20 )); then record adafactor "NOT RUN" more_gpu.txt "out of time (${t}s left)"; return; fi
  echo "# Adafactor (python -m fastopt bench --device cuda --only adafactor --quick)" >> "$OUT/more_gpu.txt"
  timeout -k 5 "$t" "$PY" -m fastopt bench --device cuda --only adafactor --quick \
    >> "$OUT/more_gpu.txt" 2>&1
  rc=$?
  record adafactor "$(status $rc)" more_gpu.txt "fastopt vs torch.optim.Adafactor on CUDA (cap ${t}s)"
}

if (( USABLE )); then
  if [ "$MODE" = check ]; then
    run_tests
    sanitize_plain
    sanitizer memcheck memcheck.log 100 75
    sanitizer racecheck racecheck.log 75 0
  else
    run_bench
    run_lowbit
    run_adafactor
  fi
fi

# ---- summary -------------------------------------------------------------------------------
failed=0
for s in "${STATES[@]}"; do
  case "$s" in PASS | SKIP) ;; *) failed=1 ;; esac
done
{
  echo "gpu_check $MODE summary ($(elapsed)s of ${BUDGET}s)"
  grep -A1 "^name," "$OUT/preflight.txt" 2>/dev/null | tail -1 | sed 's/^/  gpu: /'
  for i in "${!NAMES[@]}"; do
    printf '  %-15s %-8s %s\n' "${NAMES[$i]}" "${STATES[$i]}" "${NOTES[$i]}"
  done
  if [ -f "$OUT/bench_gpu.txt" ]; then
    echo
    grep -E "^(GPU|ceiling|parity)|NOT MET|: met$" "$OUT/bench_gpu.txt" | sed 's/^/  /'
  fi
  if [ -s "$OUT/failures.log" ]; then
    echo
    echo "---- failing tests ($(grep -c '^==== FAILED' "$OUT/failures.log"); tracebacks in failures.log) ----"
    grep -E '^==== (FAILED|TIMEOUT)' "$OUT/failures.log" | head -n 40
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
  if (( failed )); then echo "gpu_check $MODE: FAILED"; else echo "gpu_check $MODE: all stages passed"; fi
} | tee "$OUT/summary.txt"
exit "$failed"
