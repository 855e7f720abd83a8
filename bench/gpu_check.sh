#!/usr/bin/env bash
# The first-GPU check (issue 12, item 3): one command for a machine with an H100/H200, a CUDA
# build of torch and triton preinstalled and no network.  Run `bash bench/download_wheels.sh`
# beforehand on a machine with a package index: it fills .whl/ in the checkout with the wheels
# the GPU machine's image lacks.  Then, on the GPU machine, from anywhere:
#
#   bash bench/gpu_check.sh OUTDIR
#
# Stages, each under `timeout` within an overall budget (GPU_CHECK_BUDGET_S, default 480 s: the
# whole run stays under 8 minutes); a stage that fails or runs out of time is recorded and the
# later stages still run:
#   env            OUTDIR/env.json: device, driver, CUDA, torch, triton, python, date (UTC); it also
#                  decides whether a CUDA device is there (torch.cuda.is_available())
#   install        pip install --no-index --find-links .whl --no-build-isolation -e . plus the
#                  test tools (pytest, pytest-benchmark, hypothesis, numpy); install_peers:
#                  performer-pytorch 1.1.4, flash-linear-attention + fla-core (module fla)
#   profile        python bench/gpu_profile.py --json OUTDIR/profile.json: wall time and per-kernel
#                  device times per call at the target shape (ours causal / non-causal, SDPA), first
#                  because it is the most telling minute of the run
#   compile_report python bench/compile_report.py --target --json OUTDIR/compile_report.json, in
#                  the background (CPU only, niced) while the tests and the sanitizer run
#   cuda_tests     the tests only a GPU runs (tests/test_functional.py -k cuda_autocast: CUDA
#                  autocast training steps); junit in OUTDIR/cuda_tests.xml
#   variants       python bench/gpu_profile.py --variants --json OUTDIR/variants.json: ours under
#                  one launch-configuration override at a time (the tuning table)
#   kernel_tests   pytest on the kernel test files (GPU_CHECK_TESTS) on CUDA: tests/conftest.py
#                  selects CUDA whenever torch sees a device (the interpreter only without one);
#                  no -x; pytest-xdist workers when installed; junit in OUTDIR/kernel_tests.xml
#   sanitize_*     compute-sanitizer memcheck and racecheck on bench/sanitize_case.py (tiny causal
#                  and non-causal fwd+bwd); a warm-up run first fills Triton's cache
#   targets        pytest bench/test_targets.py -k gpu: the GPU targets, our times at the target
#                  shape and the causal fwd+bwd sweep against SDPA (flash), fla's chunk linear
#                  attention and performer-pytorch 1.1.4 at n = GPU_CHECK_SIZES (1k..64k);
#                  pytest-benchmark JSON in OUTDIR/targets.json, junit in OUTDIR/targets.xml
#   generation     pytest bench/test_generation.py bench/test_packed.py (fused pack vs one call per
#                  sequence): ms per token by context length, the cached
#                  (fused) decode step against recomputing, and chunked-prefill tokens/s by chunk
#                  length; OUTDIR/generation.json
#   summary        python bench/gpu_summary.py summary OUTDIR: OUTDIR/summary.md and summary.json
# Logs: OUTDIR/logs/<stage>.log; one line per stage in OUTDIR/stages.tsv.
#
# Without a CUDA device every GPU stage (install included) records "skipped: no CUDA device" and
# the run ends in seconds with the summary written; GPU_CHECK_INSTALL=1 and
# GPU_CHECK_COMPILE_REPORT=1 force those two stages anyway (they need no GPU), =0 skips them.
# GPU_CHECK_ASSUME_CUDA=1 runs the GPU stages' commands without a GPU (to test this script).
# Exit status: 0 when no stage failed or timed out (skips are fine), 1 otherwise, 2 on usage.
#
# Environment: PYTHON (python3), GPU_CHECK_BUDGET_S (480), GPU_CHECK_SIZES
# (1024,2048,4096,8192,16384,32768,65536), GPU_CHECK_TESTS (the kernel and functional test
# files), GPU_CHECK_WORKERS (xdist workers, 12), GPU_CHECK_COMPILE_JOBS (a quarter of the cores),
# GPU_CHECK_COMPILE_ARGS (more compile_report.py arguments: "--arch 90", sm_90 only; "" for all).
set -euo pipefail

if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,40p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
cd "$ROOT"
rm -f "$OUT"/{stages.tsv,env.json,cuda_tests.xml,profile.json,variants.json,kernel_tests.xml,targets.json,targets.xml,compile_report.json,summary.md,summary.json}
rm -f "$LOGS"/*.log

PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
SIZES="${GPU_CHECK_SIZES:-1024,2048,4096,8192,16384,32768,65536}"
read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests/test_kernels_causal.py tests/test_kernels_noncausal.py tests/test_functional.py}"
WORKERS="${GPU_CHECK_WORKERS:-12}"
NPROC="$(nproc 2>/dev/null || echo 2)"
JOBS="${GPU_CHECK_COMPILE_JOBS:-$(( NPROC / 4 > 0 ? NPROC / 4 : 1 ))}"
START="$(date +%s)"
DEADLINE=$(( START + BUDGET ))
SUMMARY_RESERVE=20  # seconds kept for the summary at the end
unset TRITON_INTERPRET  # the compiled kernels, never the interpreter
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
: > "$OUT/stages.tsv"
FAILED=0
STAGE_DETAIL=""

now() { date +%s; }

# record NAME STATUS RC SECONDS DETAIL: one line of stages.tsv (tabs and newlines in DETAIL flattened)
record() {
  local detail
  detail="$(printf '%s' "$5" | tr '\t\n\r' '   ')"
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$detail" >> "$OUT/stages.tsv"
  local shown="$2${detail:+: $detail}"
  case "$detail" in "$2:"*) shown="$detail" ;; esac
  echo "[gpu_check $(( $(now) - START ))s] $1: $shown"
  case "$2" in failed|timeout) FAILED=1 ;; esac
}

# stage NAME BUDGET RESERVE COMMAND: run COMMAND (a bash string) with its output in logs/NAME.log,
# under timeout min(BUDGET, time left - RESERVE), where RESERVE is what the later stages need at
# least.  SIGINT first (pytest then still writes its junit and benchmark files), SIGKILL 15 s
# later.  Sets STAGE_RC; never fails the script.
STAGE_RC=0
stage() {
  local name="$1" budget="$2" reserve="$3" cmd="$4" log="$LOGS/$1.log"
  local avail=$(( DEADLINE - $(now) - reserve ))
  local limit=$(( budget < avail ? budget : avail ))
  STAGE_RC=0
  if [ "$limit" -lt 5 ]; then
    STAGE_RC=124
    record "$name" skipped "" 0 "skipped: out of time (the run's budget is ${BUDGET} s)"
    return 0
  fi
  local t0
  t0="$(now)"
  timeout -s INT -k 15 "$limit" bash -c "$cmd" > "$log" 2>&1 || STAGE_RC=$?
  local dt=$(( $(now) - t0 ))
  case "$STAGE_RC" in
    0) record "$name" ok 0 "$dt" "${STAGE_DETAIL:-}" ;;
    124|137) record "$name" timeout "$STAGE_RC" "$dt" "timed out after ${limit} s (logs/$name.log)" ;;
    *) record "$name" failed "$STAGE_RC" "$dt" "exit $STAGE_RC${STAGE_DETAIL:+; $STAGE_DETAIL} (logs/$name.log: $(tail -n 1 "$log" | cut -c1-160))" ;;
  esac
  STAGE_DETAIL=""
  return 0
}
skip() { record "$1" skipped "" 0 "skipped: $2"; }
has_module() { "$PY" -c "import $1" > /dev/null 2>&1; }
export PY ROOT OUT LOGS

# ----------------------------------------------------------------------------- env
stage env 60 $SUMMARY_RESERVE '"$PY" bench/gpu_summary.py env "$OUT"'
CUDA=0
if grep -q '"cuda_available": true' "$OUT/env.json" 2>/dev/null; then CUDA=1; fi
NO_CUDA="no CUDA device"
if [ "$CUDA" = 0 ] && grep -q '"torch_error"' "$OUT/env.json" 2> /dev/null; then
  NO_CUDA="no CUDA device ($(sed -n 's/.*"torch_error": "\([^"]*\)".*/\1/p' "$OUT/env.json" | cut -c1-200))"
fi
if [ "${GPU_CHECK_ASSUME_CUDA:-0}" = 1 ]; then  # testing the plumbing on a CPU machine only
  CUDA=1
  echo "[gpu_check] GPU_CHECK_ASSUME_CUDA=1: running the GPU stages' commands without a GPU"
fi

# ----------------------------------------------------------------------------- install
INSTALL="${GPU_CHECK_INSTALL:-auto}"
if [ "$INSTALL" = 0 ]; then
  skip install "GPU_CHECK_INSTALL=0"
  skip install_peers "GPU_CHECK_INSTALL=0"
elif [ "$CUDA" = 1 ] || [ "$INSTALL" = 1 ]; then
  LINKS=""
  [ -d "$ROOT/.whl" ] && LINKS="--find-links \"$ROOT/.whl\""
  [ -d "$ROOT/.whl" ] || STAGE_DETAIL="no .whl/ (run bash bench/download_wheels.sh where pip reaches an index)"
  # the project (editable, else a plain install of the checkout, which the run does not change)
  # with the test tools
  TOOLS="'pytest>=8' 'pytest-benchmark>=4' 'hypothesis>=6' numpy"
  stage install 120 300 "\"\$PY\" -m pip install --no-index $LINKS --no-build-isolation -e . $TOOLS \
      || { echo 'retrying without -e'; \"\$PY\" -m pip install --no-index $LINKS --no-build-isolation . $TOOLS; }"
  # the peers, each on its own: performer-pytorch 1.1.4; fla with its dependencies (transformers is
  # on the image), else without them
  stage install_peers 90 300 "rc=0; \"\$PY\" -m pip install --no-index $LINKS performer-pytorch==1.1.4 || rc=1
      \"\$PY\" -m pip install --no-index $LINKS flash-linear-attention fla-core \
      || { echo 'retrying fla without dependencies'; \"\$PY\" -m pip install --no-index --no-deps $LINKS flash-linear-attention fla-core; } \
      || rc=1
      exit \$rc"
else
  skip install "$NO_CUDA (GPU_CHECK_INSTALL=1 forces it)"
  skip install_peers "$NO_CUDA"
fi

# ----------------------------------------------------------------------------- compile report (background)
CR_PID=""
CR_T0="$(now)"
REPORT="${GPU_CHECK_COMPILE_REPORT:-auto}"
if [ "$REPORT" = 0 ]; then
  skip compile_report "GPU_CHECK_COMPILE_REPORT=0"
elif [ "$CUDA" = 1 ] || [ "$REPORT" = 1 ]; then
  if ! grep -q -- '"--target"' bench/compile_report.py; then
    skip compile_report "bench/compile_report.py has no --target option yet"
  else
    CR_LIMIT=$(( DEADLINE - $(now) - SUMMARY_RESERVE - 15 ))
    # shellcheck disable=SC2086  # GPU_CHECK_COMPILE_ARGS: words on purpose
    timeout -k 10 "$CR_LIMIT" nice -n 10 "$PY" bench/compile_report.py --target \
      --json "$OUT/compile_report.json" -j "$JOBS" ${GPU_CHECK_COMPILE_ARGS---arch 90} \
      > "$LOGS/compile_report.log" 2>&1 &
    CR_PID=$!
    echo "[gpu_check $(( $(now) - START ))s] compile_report: started in the background (-j $JOBS, at most ${CR_LIMIT} s)"
  fi
else
  skip compile_report "$NO_CUDA (GPU_CHECK_COMPILE_REPORT=1 forces it: it needs no GPU)"
fi

# finish_compile_report SECONDS: wait at most SECONDS for the background report, then record it;
# returns 1 while it still runs
finish_compile_report() {
  [ -n "$CR_PID" ] || return 0
  local waited=0 rc=0
  while kill -0 "$CR_PID" 2> /dev/null && [ "$waited" -lt "$1" ]; do sleep 1; waited=$(( waited + 1 )); done
  if kill -0 "$CR_PID" 2> /dev/null; then return 1; fi
  wait "$CR_PID" 2> /dev/null || rc=$?
  CR_PID=""
  local dt=$(( $(now) - CR_T0 ))
  if [ "$rc" = 0 ] && [ -s "$OUT/compile_report.json" ]; then record compile_report ok 0 "$dt" "compile_report.json"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then record compile_report timeout "$rc" "$dt" "timed out (logs/compile_report.log)"
  elif [ -s "$OUT/compile_report.json" ]; then
    # exit 1 with the JSON written: the report ran and flags a kernel (spill, shared memory, MMA,
    # duplication, pipelining): its failures are in the JSON and the log
    record compile_report failed "$rc" "$dt" "exit $rc: the report flags problems (JSON written; logs/compile_report.log)"
  else record compile_report failed "$rc" "$dt" "exit $rc, no JSON (logs/compile_report.log: $(tail -n 1 "$LOGS/compile_report.log" | cut -c1-160))"
  fi
  return 0
}

# ----------------------------------------------------------------------------- profile
# first, as the most telling minute: per-kernel device times and wall time per call at the target
# shape (wall far above the kernels' sum: the host is the bottleneck)
if [ "$CUDA" = 1 ]; then
  stage profile 120 330 '"$PY" bench/gpu_profile.py --json "$OUT/profile.json"'
else
  skip profile "$NO_CUDA"
fi

# ----------------------------------------------------------------------------- tests on CUDA, variants
PYTEST_OPTS="-q -rfE -p no:cacheprovider"
if has_module xdist; then PYTEST_OPTS="$PYTEST_OPTS -n $WORKERS"; fi
if has_module pytest_timeout; then PYTEST_OPTS="$PYTEST_OPTS --timeout 240"; fi
# the tests that only a GPU runs (CUDA autocast training) first: the first run's kernel tests ran
# out of time before most of them
if [ "$CUDA" = 1 ]; then
  stage cuda_tests 60 320 "\"\$PY\" -m pytest tests/test_functional.py -k cuda_autocast $PYTEST_OPTS \
      --junitxml \"\$OUT/cuda_tests.xml\""
else
  skip cuda_tests "$NO_CUDA"
fi
# the launch-configuration overrides of bench/gpu_profile.py, one at a time, per-kernel times
if [ "$CUDA" = 1 ]; then
  stage variants 120 260 '"$PY" bench/gpu_profile.py --variants --json "$OUT/variants.json"'
else
  skip variants "$NO_CUDA"
fi
if [ "$CUDA" = 1 ]; then
  stage kernel_tests 100 200 "\"\$PY\" -m pytest ${TESTS[*]} -k 'not cuda_autocast' $PYTEST_OPTS \
      --junitxml \"\$OUT/kernel_tests.xml\""
else
  skip kernel_tests "$NO_CUDA"
fi

# ----------------------------------------------------------------------------- compute-sanitizer
find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2> /dev/null || true)" /usr/local/cuda/bin/compute-sanitizer \
           /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           /opt/nvidia/*/compute-sanitizer /opt/nvidia/*/*/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  timeout 20 find / -xdev \( -path /proc -o -path /sys \) -prune -o -name compute-sanitizer -type f -perm -u+x \
    -print 2> /dev/null | head -n 1
}
if [ "$CUDA" = 1 ]; then
  SANITIZER="$(find_sanitizer || true)"
  export SANITIZER
  stage sanitize_warm 60 180 '"$PY" bench/sanitize_case.py'
  if [ -z "$SANITIZER" ]; then
    skip sanitize_memcheck "compute-sanitizer not found (PATH, /usr/local/cuda*/bin, /opt/nvidia, find /)"
    skip sanitize_racecheck "compute-sanitizer not found"
  else
    echo "[gpu_check] compute-sanitizer: $SANITIZER"
    # memcheck: without the caching allocator every tensor is its own allocation, so an access past
    # a tensor's end is outside any allocation
    stage sanitize_memcheck 75 170 'PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 3 --print-limit 20 "$PY" bench/sanitize_case.py'
    STAGE_DETAIL=""
    stage sanitize_racecheck 75 160 '"$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 20 \
        "$PY" bench/sanitize_case.py'
    for tool in memcheck racecheck; do  # the verdict lines, for the console
      grep -h -E "(ERROR|RACECHECK) SUMMARY" "$LOGS/sanitize_$tool.log" 2> /dev/null | sed "s/^/[gpu_check] $tool: /" || true
    done
  fi
else
  skip sanitize_warm "$NO_CUDA"
  skip sanitize_memcheck "$NO_CUDA"
  skip sanitize_racecheck "$NO_CUDA"
fi

# ----------------------------------------------------------------------------- targets
# the report compiles on the CPU: give it a little time to finish before the timing starts; if it
# still runs it goes on (niced) and is waited for after the targets
finish_compile_report 30 || echo "[gpu_check] compile_report: still running, niced, during the targets"
if [ "$CUDA" = 1 ]; then
  stage targets 300 $SUMMARY_RESERVE "\"\$PY\" -m pytest bench/test_targets.py -k gpu -q -rfEs -p no:cacheprovider --durations 20 \
      --sizes $SIZES --benchmark-json \"\$OUT/targets.json\" --junitxml \"\$OUT/targets.xml\""
else
  skip targets "$NO_CUDA"
fi
if [ "$CUDA" = 1 ]; then  # time per token vs context length: the fused decode step, flat
  stage generation 90 $SUMMARY_RESERVE "\"\$PY\" -m pytest bench/test_generation.py bench/test_packed.py -q -rfEs \
      -p no:cacheprovider --benchmark-json \"\$OUT/generation.json\""
else
  skip generation "$NO_CUDA"
fi
if ! finish_compile_report $(( DEADLINE - $(now) - 10 )); then  # its own timeout ends it before this
  kill -TERM "$CR_PID" 2> /dev/null || true
  finish_compile_report 5 || { kill -KILL "$CR_PID" 2> /dev/null || true; CR_PID=""
    record compile_report timeout 124 "$(( $(now) - CR_T0 ))" "out of the run's time budget"; }
fi

# ----------------------------------------------------------------------------- summary
SUMMARY_RC=0
timeout -k 5 60 "$PY" bench/gpu_summary.py summary "$OUT" > "$LOGS/summary.log" 2>&1 || SUMMARY_RC=$?
if [ "$SUMMARY_RC" != 0 ]; then
  FAILED=1
  echo "[gpu_check] summary failed (exit $SUMMARY_RC): $(tail -n 3 "$LOGS/summary.log")"
else
  echo
  cat "$OUT/summary.md"
fi
echo "[gpu_check] done in $(( $(now) - START )) s: $OUT"
exit "$FAILED"
