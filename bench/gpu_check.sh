#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine (issues 4, 5, 7 and 13), in one run of ~9 minutes:
#
#   bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT (the device tool's folder)
#
# Writes exactly two files to OUTDIR, rewritten after every stage and on exit (also when a stage
# or the whole script is stopped by a timeout or a signal):
#   gpu_check_summary.txt   one line per stage: status, time, timeout, the result that matters
#   gpu_check.tar.gz        gpu_check/: every stage's log (env.log: versions, card), the JUnit XML, the bench
#                           JSON, summary.json, meta.json
# For a fresh machine with torch (CUDA build), the CUDA toolkit, pytest-timeout and
# compute-sanitizer preinstalled and no network (/opt/torch/.venv/bin/python is used when
# present): nothing is downloaded; the extension is built in place for the card's own compute
# capability (or taken from prebuilt/ when bench/prebuild.sh made it for exactly this source,
# Python and torch).  Stages, in order of value, each under `timeout` and what is left of the
# budget (GPU_CHECK_BUDGET_S, default 540 s; expected times in bench/NOTES.md):
#   env               nvidia-smi, python, torch, CUDA, cuDNN, SM count
#   build             RNN_EXT_FORCE_CUDA=1 for this card; loads with backend_info()['cuda']
#   cuda_tests        pytest -m cuda on the step kernels (gating; persistent cases excluded)
#   persistent_tests  the opt-in persistent kernels: tests/test_cuda_persistent.py and the
#                     persistent cases of tests/test_cuda.py
#   sanitizer_TOOL    compute-sanitizer memcheck, racecheck, synccheck, initcheck, one pass each
#                     over bench/sanitizer_workload.py (step and persistent kernels, forward and
#                     backward), only rnn_ext's kernels instrumented (initcheck: all, float32
#                     cases; racecheck: float32 and float16 cases), no caching allocator,
#                     CUDA_LAUNCH_BLOCKING=1; where the process dies in case K (a crash under
#                     the tool), sanitizer_TOOL_rest runs the cases after K
#   bench_default     issue 5's grid, rnn_ext (its default kernel choice, "auto") vs cuDNN, TF32
#                     off for both
#   bench_tf32_off    the same with the persistent kernels everywhere (tuning data)
#   issue5_summary    issue 5's targets from the default's grid (else the persistent one's)
#   bench_row_split   B in {32,128}, every H, fp32 and bf16, the persistent kernels with P5's
#                     row groups (RNN_EXT_CUDA_ROW_SPLIT=8), if >= 60 s are left
#   row_split_compare with against without on those points (bench/ab_compare.py)
#   bench_grouped_a   bf16, B in {32,128}, H in {512,1024}: the tensor-core kernels' A loads per
#                     group of m-tiles (RNN_EXT_CUDA_MMA_GROUPED_A=1, P3b), if >= 60 s are left
#   grouped_a_compare with against without on those points (bench/ab_compare.py)
#   bench_crossover   the persistent and the step kernels at B in {48, 64, 96}, H in {512, 1024}
#                     ("auto"'s crossover), if >= 75 s are left
#   bench_tf32_on     the same grid with TF32 on for both, if >= 90 s are left
# A persistent stage that hangs (its timeout, pytest-timeout's, or a sanitizer's timeout in a
# persistent case) makes the later stages run the step kernels only.  No CPU-only test runs here.  Exit status: non-zero when the build or the
# cuda tests fail or time out.
#
# GPU_CHECK_DRY_RUN=1: the same control flow on any machine, each GPU stage replaced by a stub
# that prints its command line (GPU_CHECK_DRY_HANG=stage,... makes those stubs hang,
# GPU_CHECK_DRY_FAIL=stage,... fail; GPU_CHECK_DRY_TIMEOUT_S caps every stage).  Tested by
# tests/test_gpu_check.py.
set -uo pipefail

if [ "${1:-}" = "--dry-stub" ]; then  # one stubbed stage of a dry run: NAME CMD...
  name=$2
  shift 2
  echo "DRY RUN stub for stage $name: $*"
  case ",${GPU_CHECK_DRY_HANG:-}," in *",$name,"*) echo "hanging"; exec sleep 3600 ;; esac
  case ",${GPU_CHECK_DRY_FAIL:-}," in
    *",$name,"*)
      case "$name" in  # a sanitizer's process dying in the workload's second case
        sanitizer_*) echo "case 1 of 7 starts: step"; echo "failing"; exit 99 ;;
      esac
      echo "failing"; exit 1 ;;
  esac
  for a in "$@"; do
    case "$a" in
      --junitxml=*)
        printf '<?xml version="1.0"?>\n<testsuites><testsuite name="pytest" tests="2" failures="0" errors="0" skipped="1"><testcase classname="dry" name="test_a"/><testcase classname="dry" name="test_b"><skipped/></testcase></testsuite></testsuites>\n' \
          > "${a#--junitxml=}" ;;
    esac
  done
  case "$name" in
    sanitizer_*) echo "========= ERROR SUMMARY: 0 errors" ;;
    *_tests) echo "1 passed, 1 skipped in 0.01s" ;;
  esac
  exit 0
fi

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTDIR=${1:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
TOTAL=${GPU_CHECK_BUDGET_S:-540}
MIN_STAGE=$([ "$DRY" = 1 ] && echo 1 || echo 15)  # a stage needs at least this many seconds
T0=$SECONDS
TMPW=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
WORK=$TMPW/gpu_check
mkdir -p "$WORK"
ARCHIVE=$OUTDIR/gpu_check.tar.gz
SUMMARY=$OUTDIR/gpu_check_summary.txt
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x /opt/torch/.venv/bin/python ]; then PY=/opt/torch/.venv/bin/python
else PY=python3; fi
SYSPY=$(command -v python3 || echo "$PY")  # the summary needs only the standard library
declare -A RC
STAGE_PID=""
CURRENT=""
VERDICT="running"
PERSISTENT_HUNG=0

left() { echo $((TOTAL - (SECONDS - T0))); }

# meta.json, the summary and the archive, from what WORK holds now (cheap: small files).
write_results() {
  local commit
  commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  printf '{"date": "%s", "commit": "%s", "budget_s": %s, "elapsed_s": %s, "dry_run": %s, "verdict": "%s", "persistent_hung": %s, "python": "%s"}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$commit" "$TOTAL" "$((SECONDS - T0))" \
    "$([ "$DRY" = 1 ] && echo true || echo false)" "$VERDICT" "$PERSISTENT_HUNG" "$PY" \
    > "$WORK/meta.json"
  "$SYSPY" "$REPO/bench/gpu_check_summary.py" "$WORK" "$SUMMARY" >/dev/null 2>"$TMPW/summary_error.txt" \
    || { echo "gpu_check_summary.py failed:"; tail -n 5 "$TMPW/summary_error.txt"; cat "$WORK/stages.tsv"; } > "$SUMMARY"
  cp "$SUMMARY" "$WORK/gpu_check_summary.txt" 2>/dev/null
  # one file, below the 16 MiB a device run may return: logs over 4 MiB keep head and tail
  local f
  for f in "$WORK"/*.log; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt $((4 << 20)) ]; then
      { head -c $((2 << 20)) "$f"; printf '\n... [truncated by gpu_check.sh] ...\n'; tail -c $((2 << 20)) "$f"; } > "$f.cut"
      mv "$f.cut" "$f"
    fi
  done
  tar -czf "$ARCHIVE.tmp" -C "$TMPW" gpu_check && mv "$ARCHIVE.tmp" "$ARCHIVE"
}

# record NAME STATUS RC SECONDS TIMEOUT NOTE: one line of stages.tsv
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"
}

on_signal() {
  echo "== gpu_check: stopped by a signal during ${CURRENT:-no stage}"
  if [ -n "$STAGE_PID" ]; then
    kill -TERM "$STAGE_PID" 2>/dev/null
    sleep 1
    kill -KILL "$STAGE_PID" 2>/dev/null
    record "$CURRENT" interrupted 143 "$((SECONDS - STAGE_T0))" "$STAGE_CAP" "script stopped by a signal"
    STAGE_PID=""
  fi
  VERDICT="interrupted"
  exit 143
}
on_exit() {
  trap - EXIT TERM INT HUP
  write_results
  cat "$SUMMARY"
  rm -rf "$TMPW"
}
trap on_exit EXIT
trap on_signal TERM INT HUP

# run_stage NAME TIMEOUT NOTE CMD...: CMD under `timeout` (at most what is left of the budget),
# its output in WORK/NAME.log; RC[NAME] = its exit code, "timeout" or "skipped".  Runs in the
# background and is waited for, so that a signal to this script is handled at once.
run_stage() {
  local name=$1 want=$2 note=$3
  shift 3
  local t rem rc status
  rem=$(left)
  t=$want
  [ "$rem" -lt "$t" ] && t=$rem
  [ "$DRY" = 1 ] && [ -n "${GPU_CHECK_DRY_TIMEOUT_S:-}" ] && [ "$t" -gt "$GPU_CHECK_DRY_TIMEOUT_S" ] \
    && t=$GPU_CHECK_DRY_TIMEOUT_S
  if [ "$t" -lt "$MIN_STAGE" ]; then
    echo "== $name: skipped (${rem}s left of the budget)"
    RC[$name]=skipped
    record "$name" skipped "" 0 0 "out of time budget${note:+; $note}"
    write_results
    return 0
  fi
  local cmd=("$@")
  [ "$DRY" = 1 ] && cmd=(bash "$REPO/bench/gpu_check.sh" --dry-stub "$name" "$@")
  echo "== $name (timeout ${t}s, $(left)s left of the budget)"
  CURRENT=$name
  STAGE_T0=$SECONDS
  STAGE_CAP=$t
  timeout --signal=TERM --kill-after=10 "$t" "${cmd[@]}" > "$WORK/$name.log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID"
  rc=$?
  STAGE_PID=""
  CURRENT=""
  local secs=$((SECONDS - STAGE_T0))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; RC[$name]=timeout
  elif [ "$rc" = 0 ]; then status=ok; RC[$name]=0
  else status=failed; RC[$name]=$rc; fi
  record "$name" "$status" "$rc" "$secs" "$t" "$note"
  echo "== $name: $status (exit $rc) in ${secs}s"
  if [ "$status" != ok ]; then tail -n 12 "$WORK/$name.log" | sed 's/^/   | /'; fi
  write_results
  return 0
}

skip_stage() {  # NAME REASON
  echo "== $1: skipped ($2)"
  RC[$1]=skipped
  record "$1" skipped "" 0 0 "$2"
  write_results
}

# ---------------------------------------------------------------------------------------------
# env
# the CUDA toolkit: CUDA_HOME must hold bin/nvcc and include/cuda_runtime.h (torch would take
# the folder above the first nvcc on PATH, which may be a wrapper in /usr/local/bin)
if [ -z "${CUDA_HOME:-}" ] || [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /x/x/x)")")")
  for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 "$nvcc_dir"; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then
      export CUDA_HOME="$d"
      break
    fi
  done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo no-git))"
  echo "cores: $(nproc 2>/dev/null)"
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv || true
  echo "CUDA_HOME: ${CUDA_HOME:-unset}"
  if command -v nvcc >/dev/null 2>&1; then nvcc --version; else echo "nvcc: not found"; fi
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo not on PATH)"
  "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.replace("\n", " "), platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda,
          "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        print(" ", i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
    if torch.cuda.is_available():
        print("sms:", torch.cuda.get_device_properties(0).multi_processor_count)
except Exception as e:  # noqa: BLE001
    print("torch import failed:", e)
for mod in ("pytest", "pytest_timeout", "numpy", "ninja", "onnxruntime"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "MISSING", type(e).__name__)
EOF
}
run_stage env 30 "" bash -c "$(declare -f env_report); REPO='$REPO'; PY='$PY'; env_report"

# ---------------------------------------------------------------------------------------------
# build, for this card only (or the prebuilt .so made for this very source, Python and torch)
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
[ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=${CAP:-8.0;9.0}
export RNN_EXT_FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
build() {
  set -e
  if bash bench/prebuild.sh --check "$PY"; then
    echo "using the prebuilt extension (prebuilt/STAMP matches this source, Python and torch)"
    rm -f rnn_ext/_C*.so
    cp prebuilt/_C*.so rnn_ext/
  else
    echo "building: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    rm -f rnn_ext/_C*.so
    "$PY" setup.py build_ext --inplace
  fi
  "$PY" -c "import rnn_ext, torch; info = rnn_ext.backend_info(); print('backend_info', info, rnn_ext.__file__); \
assert info['cuda'] and torch.cuda.is_available(), 'rnn_ext was built without CUDA, or torch sees no GPU'"
}
run_stage build 240 "" bash -c "$(declare -f build); PY='$PY'; build"

# ---------------------------------------------------------------------------------------------
# pytest on the GPU: -m cuda only (no CPU-only test), per-test timeout (pytest-timeout's thread
# method: it ends even a process stuck in a CUDA call, with a stack dump; -v puts every result in
# the log, which then stands in for the XML)
PYTEST=("$PY" -m pytest -m cuda -v -rs --durations=10 -p no:cacheprovider)
if [ "$DRY" = 1 ] || "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  PT_TIMEOUT=(--timeout-method=thread)
else
  PT_TIMEOUT=()
fi
if [ "${RC[build]}" = 0 ]; then
  # gating: the default kernels ("auto": persistent for small batches, the step path elsewhere)
  run_stage cuda_tests 150 "" "${PYTEST[@]}" ${PT_TIMEOUT[@]:+"${PT_TIMEOUT[@]}" --timeout=120} \
    --junitxml="$WORK/cuda_tests.xml" tests/test_cuda.py tests/test_reliability.py \
    tests/test_integration.py -k "not persistent"
  # the opt-in persistent kernels (not gating); the fp16 and B=32 thirds of the parity grid
  # are left out for time (128 of its 288 cases run)
  run_stage persistent_tests 150 "" "${PYTEST[@]}" -s ${PT_TIMEOUT[@]:+"${PT_TIMEOUT[@]}" --timeout=45} \
    --junitxml="$WORK/persistent_tests.xml" tests/test_cuda_persistent.py tests/test_cuda.py \
    -k "persistent and not (test_persistent_parity and (-torch.float16] or B32))"
  if [ "${RC[persistent_tests]}" = timeout ] || grep -q "+ Timeout +" "$WORK/persistent_tests.log" 2>/dev/null; then
    PERSISTENT_HUNG=1
    echo "== a persistent kernel hung: the later stages run the step kernels only"
  fi
else
  skip_stage cuda_tests "no build"
  skip_stage persistent_tests "no build"
fi

# ---------------------------------------------------------------------------------------------
# compute-sanitizer, one pass per tool over a small standalone workload; only kernels whose
# mangled name contains "rnn_ext" are instrumented (cuDNN / cuBLAS are not ours), and no caching
# allocator, so that memcheck sees each tensor's own bounds (with 256 bytes of padding)
SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
  [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SAN="$d/bin/compute-sanitizer"
done
[ "$DRY" = 1 ] && [ -z "$SAN" ] && SAN=compute-sanitizer
for tool in memcheck racecheck synccheck initcheck; do
  if [ "${RC[build]}" != 0 ]; then skip_stage "sanitizer_$tool" "no build"; continue; fi
  if [ -z "$SAN" ]; then skip_stage "sanitizer_$tool" "compute-sanitizer not found"; continue; fi
  WL=()
  note=""
  if [ "$PERSISTENT_HUNG" = 1 ]; then WL=(--no-persistent); note="step kernels only (a persistent stage hung)"; fi
  # Per tool, from the first GPU run (H200, compute-sanitizer 2025.3.1; bench/NOTES.md):
  # - racecheck fails by itself ("Internal Sanitizer Error: failed to handle a hardware
  #   exception") in the bfloat16 cases even with none of rnn_ext's kernels instrumented: it
  #   runs the float32 and float16 cases;
  # - initcheck sees no write made by a kernel it does not instrument, so it instruments every
  #   kernel (no filter), and it does not see cuBLAS's bf16/fp16 GEMM writes either (torch's own
  #   add read a bf16 matmul's output as uninitialised): it runs the float32 cases.
  extra=(--kernel-name kns=rnn_ext)
  case $tool in
    memcheck) extra+=(--padding 256) ;;
    racecheck) WL+=(--dtypes float32,float16) ;;
    initcheck) extra=(); WL+=(--dtypes float32) ;;
  esac
  # CUDA_LAUNCH_BLOCKING: an error is reported at the launch of the kernel that made it
  SANCMD=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUDA_LAUNCH_BLOCKING=1
          "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99
          --print-limit 200 "$PY" bench/sanitizer_workload.py "${WL[@]}")
  run_stage "sanitizer_$tool" 75 "$note" "${SANCMD[@]}"
  log=$WORK/sanitizer_$tool.log
  # the case the workload was in when it crashed or hung ("case K of N starts: KERNEL")
  last=$(grep -E '^case [0-9]+ of [0-9]+ starts: ' "$log" 2>/dev/null | tail -n 1)
  if [ "${RC[sanitizer_$tool]}" = timeout ] && [ "$PERSISTENT_HUNG" = 0 ]; then
    case "$last" in
      *": step") echo "== sanitizer_$tool timed out in a step case: persistent stages go on" ;;
      *)
        PERSISTENT_HUNG=1
        echo "== sanitizer_$tool timed out (${last:-before its first case}): the later stages run the step kernels only" ;;
    esac
  elif [ "${RC[sanitizer_$tool]}" != 0 ] && [ "${RC[sanitizer_$tool]}" != skipped ] && [ -n "$last" ] \
      && ! grep -q '^sanitizer workload:' "$log"; then
    # the process died in case K (a crash under the tool): the cases after it, once more
    k=$(echo "$last" | awk '{print $2}')
    n=$(echo "$last" | awk '{print $4}')
    if [ $((k + 1)) -lt "$n" ]; then
      run_stage "sanitizer_${tool}_rest" 60 "cases $((k + 1))-$((n - 1)); the process died in case $k" \
        "${SANCMD[@]}" --from $((k + 1))
    fi
  fi
done

# ---------------------------------------------------------------------------------------------
# issue 5's grid: T=512, L=2, I=H, B in {1,8,32,128}, H in {256,512,1024}, fp32 and bf16, forward
# and training, rnn_ext (persistent: wavefront forward, persistent backward) and cuDNN in the
# same process; TF32 off for both first (exact fp32 against exact fp32), on if time is left
PGRID=""
for H in 256 512 1024; do for B in 1 8 32 128; do PGRID="$PGRID${PGRID:+;}512,$B,$H,$H,2"; done; done
KERNEL=persistent
[ "$PERSISTENT_HUNG" = 1 ] && KERNEL=step
BENCH=("$PY" bench/bench.py --device cuda --grid "$PGRID" --dtypes float32,bfloat16
       --modes fwd,train --contenders rnn_ext,torch --repeats 5 --warmup 2 --min-sample-ms 5
       --out "$WORK" --no-plots --no-progress)
if [ "${RC[build]}" = 0 ]; then
  # what users get: the default kernel choice ("auto": persistent for small batches), the run
  # issue 5's targets are judged on
  if [ "$KERNEL" = persistent ]; then
    run_stage bench_default 150 "rnn_ext kernel: auto (the default)" env RNN_EXT_CUDA_KERNEL=auto \
      "${BENCH[@]}" --tf32 off --name default_fwd
  else
    skip_stage bench_default "a persistent stage hung"
  fi
  # the persistent kernels everywhere (tuning data: where they lose to the step path)
  name=persistent_fwd
  [ "$KERNEL" = step ] && name=step_fwd
  run_stage bench_tf32_off 150 "rnn_ext kernel: $KERNEL" env RNN_EXT_CUDA_KERNEL=$KERNEL \
    "${BENCH[@]}" --tf32 off --name "$name"
  if [ -f "$WORK/default_fwd.cudnn.json" ]; then
    # (also reads persistent_tests.log for the grid barrier's cost)
    run_stage issue5_summary 20 "on the default kernels" "$PY" bench/issue5_summary.py "$WORK" default_fwd
  elif [ -f "$WORK/persistent_fwd.cudnn.json" ]; then
    run_stage issue5_summary 20 "on the persistent kernels" "$PY" bench/issue5_summary.py "$WORK" persistent_fwd
  else
    skip_stage issue5_summary "no default or persistent bench results"
  fi
  # A/B of one persistent-kernel setting against bench_tf32_off's same rows: ab_stage NAME
  # SETTING GRID DTYPES runs bench_NAME (the setting on) and NAME_compare (bench/ab_compare.py)
  ab_stage() {
    local name=$1 setting=$2 grid=$3 dtypes=$4
    if [ "$KERNEL" != persistent ]; then
      skip_stage "bench_$name" "a persistent stage hung"
      skip_stage "${name}_compare" "a persistent stage hung"
      return
    fi
    if [ "$(left)" -lt 60 ]; then
      skip_stage "bench_$name" "under 60 s left"
      skip_stage "${name}_compare" "under 60 s left"
      return
    fi
    run_stage "bench_$name" 60 "" env RNN_EXT_CUDA_KERNEL=persistent "$setting" \
      "$PY" bench/bench.py --device cuda --grid "$grid" --dtypes "$dtypes" --modes fwd,train \
      --contenders rnn_ext,torch --repeats 5 --warmup 2 --min-sample-ms 5 --out "$WORK" \
      --no-plots --no-progress --tf32 off --name "persistent_fwd_$name"
    if [ -f "$WORK/persistent_fwd_$name.cudnn.json" ] && [ -f "$WORK/persistent_fwd.cudnn.json" ]; then
      run_stage "${name}_compare" 20 "" "$PY" bench/ab_compare.py "$WORK" persistent_fwd "persistent_fwd_$name"
    else
      skip_stage "${name}_compare" "no bench results for both"
    fi
  }
  # P5's row groups where they should matter: B in {32, 128}, every H, fp32 and bf16
  ab_stage row_split RNN_EXT_CUDA_ROW_SPLIT=8 \
    "512,32,256,256,2;512,128,256,256,2;512,32,512,512,2;512,128,512,512,2;512,32,1024,1024,2;512,128,1024,1024,2" \
    float32,bfloat16
  # P3b's grouped A loads of the tensor-core kernels, bf16 where the loads were measured to matter
  ab_stage grouped_a RNN_EXT_CUDA_MMA_GROUPED_A=1 \
    "512,32,512,512,2;512,128,512,512,2;512,32,1024,1024,2;512,128,1024,1024,2" bfloat16
  # "auto"'s crossover between the two kernels (B = 33-127 unmeasured on 2026-11-30): the
  # persistent and the step kernels at B in {48, 64, 96}, H in {512, 1024}
  XGRID="512,48,512,512,2;512,64,512,512,2;512,96,512,512,2;512,48,1024,1024,2;512,64,1024,1024,2;512,96,1024,1024,2"
  XBENCH=("$PY" bench/bench.py --device cuda --grid "$XGRID" --dtypes float32,bfloat16 --modes fwd,train
          --contenders rnn_ext,torch --repeats 5 --warmup 2 --min-sample-ms 5 --out "$WORK"
          --no-plots --no-progress --tf32 off)
  if [ "$KERNEL" != persistent ]; then
    skip_stage bench_crossover "a persistent stage hung"
  elif [ "$(left)" -ge 75 ]; then
    run_stage bench_crossover 75 "" bash -c 'RNN_EXT_CUDA_KERNEL=persistent "$@" --name crossover_persistent && RNN_EXT_CUDA_KERNEL=step "$@" --name crossover_step' _ "${XBENCH[@]}"
  else
    skip_stage bench_crossover "under 75 s left"
  fi
  if [ "$(left)" -ge 90 ]; then
    run_stage bench_tf32_on 150 "rnn_ext kernel: $KERNEL" env RNN_EXT_CUDA_KERNEL=$KERNEL \
      "${BENCH[@]}" --tf32 on --name "${name}_tf32"
  else
    skip_stage bench_tf32_on "under 90 s left"
  fi
else
  skip_stage bench_default "no build"
  skip_stage bench_tf32_off "no build"
  skip_stage issue5_summary "no build"
  skip_stage bench_row_split "no build"
  skip_stage row_split_compare "no build"
  skip_stage bench_grouped_a "no build"
  skip_stage grouped_a_compare "no build"
  skip_stage bench_crossover "no build"
  skip_stage bench_tf32_on "no build"
fi

# ---------------------------------------------------------------------------------------------
status=0
[ "${RC[build]}" = 0 ] || status=1
[ "${RC[cuda_tests]:-}" = 0 ] || status=1
if [ $status = 0 ]; then VERDICT="PASS (build and cuda tests)"
else VERDICT="FAIL (build ${RC[build]:-?}, cuda tests ${RC[cuda_tests]:-?})"; fi
echo "== gpu_check: $VERDICT in $((SECONDS - T0))s; $SUMMARY and $ARCHIVE"
exit $status
