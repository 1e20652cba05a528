#!/usr/bin/env bash
# The one GPU check (issue 13): run it first whenever a CUDA machine is available.
#
#   bash scripts/gpu_check.sh OUT_DIR [ARCHIVE]
#
# It writes ~40 files to OUT_DIR; with ARCHIVE (a .tgz path) it also packs OUT_DIR into that one
# file at the end, for a device tool that returns only a few files (this project's returns 8):
# `bash scripts/gpu_check.sh /tmp/gc "$OUT/gc.tgz"`.
#
# On a CUDA machine, in at most ~10 minutes on an H100/H200 (each stage has a time cap, so the
# script always finishes and says which stage ran out of time):
#   1. build   the extension for the GPU's own architecture only (RMKERNELS_CUDA_ARCHS=<cc>);
#      extension   it loads, with its CUDA kernels and no libstdc++ of its own, its check messages
#                  keep their numbers (a failure here is one, not skipped or crashed GPU tests)
#   2. gpu cuda issue 14 / gpu cuda / gpu triton issue 14 / gpu triton   the GPU tests of the
#              suite (pytest -m cuda, in parallel processes), the cuda backend's first (the
#              critic-free advantages' files of issue 14 before the rest), then the triton
#              backend's (its group advantages first); -v, so a stage stopped at its cap still
#              names every test it finished
#   3. memcheck / racecheck   compute-sanitizer on a small forward+backward of every public
#              op on the cuda and triton backends (scripts/gpu_check_ops.py sanitize)
#   4. graphs  CUDA-graph capture + replay of every public op, compared with eager
#   5. bench   benchmarks/run.py at the named shapes of BENCHMARKS.md (--quick): the critic-free
#              group advantages' own kernels first in a stage of their own (issue 14's GPU
#              target: one launch, within 1.25x of the memory floor) and Nsight Compute on those
#              kernels (profile grpo: speed of light, memory, occupancy), the host overhead of
#              every public function's call against its kernel ops (overhead: bench_overhead.py,
#              BENCHMARKS.md's <= 15 us a call), then run by run, each
#              into OUT_DIR/bench-<name>: REINFORCE++ and ReMax's own kernels at rpp-l / remax-l
#              and at the few long rows of rpp-xl / remax-xl (judged against the same floor),
#              the critic-free baselines, then the other ops
#   6. suite   the rest of the test suite (not GPU, not CUDA-on-CPU, not slow) in the time left;
#              reaching its cap is reported, not a failure (CI runs these on CPU)
# Every log and result goes to OUT_DIR; OUT_DIR/summary.md is the table of stages.
#
# On a machine without a CUDA GPU it runs to completion in seconds: every GPU stage is
# marked "skipped: no CUDA GPU" in the summary (tests/test_gpu_check.py runs this mode).
# Exit status: 0 when no stage failed (skipped stages do not fail).
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [ARCHIVE]}
ARCHIVE=${2:-}
case $ARCHIVE in "" | /*) ;; *) ARCHIVE=$(pwd)/$ARCHIVE ;; esac  # before the cd below
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.md"
START=$(date +%s)
FAILED=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# Per-stage time caps in seconds (sum 555 s, the sanitizer's twice: 575, under the 600 s that
# the device tool allows one command; tests/test_gpu_check.py checks the sum). Each is the time a
# stage took on an H200 with room to spare, or what its stage is worth. Seen on the H200 lent on
# 2026-12-04 (16 cores; 8 test workers): build 55 and 82 s, extension 4 s, issue 14's cuda tests
# 32 s, the other cuda tests 67 s of pytest (659 tests), issue 14's triton tests 32 s, the other
# triton tests 97 s with 12 workers (507 tests), memcheck 10 s, racecheck 8 s, graphs 5 s, ncu 13 s.
# A run where every stage passes should take about 450 s (these times added up, the bench stages
# at their caps): with the ~40 s a machine takes to start, a
# second call still fits the 900 s of a session (no machine starts with under 240 s left).
CAP_BUILD=${CAP_BUILD:-95}
CAP_EXT=${CAP_EXT:-15}  # the built extension loads, with its CUDA kernels
CAP_GPU_CUDA=${CAP_GPU_CUDA:-135}  # ISSUE14_CUDA_S s of it for issue 14's tests first
CAP_GPU_TRITON=${CAP_GPU_TRITON:-170}  # ISSUE14_TRITON_S s of it for issue 14's tests first
CAP_SANITIZER=${CAP_SANITIZER:-20}
CAP_GRAPHS=${CAP_GRAPHS:-10}
CAP_BENCH_GRPO=${CAP_BENCH_GRPO:-40}
CAP_PROFILE=${CAP_PROFILE:-20}
CAP_OVERHEAD=${CAP_OVERHEAD:-15}  # bench_overhead.py, cuda backend: 13 functions, ~1 s of timing (not yet run on a GPU)
CAP_BENCH=${CAP_BENCH:-30}
CAP_SUITE=${CAP_SUITE:-5}
ISSUE14_CUDA_S=${ISSUE14_CUDA_S:-40}
ISSUE14_TRITON_S=${ISSUE14_TRITON_S:-45}
# The GPU test stages run in parallel pytest processes (pytest-xdist, where installed: the
# device image has it): the Triton tests spend most of their time compiling kernels on the
# CPU, one specialisation after another (on the H200 a single process got through 28 of them
# in 35 s), and a test that crashes its process (a segfault) is reported as a failure while
# the other processes go on.
GPU_TEST_WORKERS=${GPU_TEST_WORKERS:-12}
# The files that hold GPU tests (pytest -m "cuda and not cuda_on_cpu"; tests/test_gpu_check.py
# checks the list against pytest's collection): each worker collects only these, not the whole
# of tests/, whose imports (transformers, trl, datasets) cost every worker seconds of the cap.
GPU_TEST_FILES=(tests/test_adapters.py tests/test_autocast.py tests/test_bt_loss.py tests/test_eager_path.py
                tests/test_gae.py tests/test_gae_kernels.py tests/test_group_advantages.py
                tests/test_kernel_layouts_numerics.py tests/test_pairwise.py tests/test_pooling.py tests/test_ppo.py
                tests/test_ranking.py tests/test_reinforce.py tests/test_token_logprobs.py)

{
  echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo
  echo "| stage | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

finish() {  # the summary on stdout, OUT_DIR packed into ARCHIVE if given, the exit status
  cat "$SUMMARY"
  if [ -n "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")"
    tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "[gpu_check] packed into $ARCHIVE"
  fi
  exit $FAILED
}

record() {  # stage status seconds log
  echo "| $1 | $2 | $3 | $4 |" >> "$SUMMARY"
  echo "[gpu_check] $1: $2 ($3 s)"
}

# run_stage NAME CAP LOGFILE CMD...: runs CMD with a time limit, records the outcome.
run_stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    record "$name" "ok" "$dt" "$log"
  elif { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ "${SOFT_CAP:-0}" = 1 ]; then
    record "$name" "stopped at its ${cap} s cap (not a failure: CI runs these on CPU)" "$dt" "$log"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" "**TIMEOUT** after ${cap} s" "$dt" "$log"
    FAILED=1
  else
    record "$name" "**FAILED** (exit $rc)" "$dt" "$log"
    FAILED=1
  fi
  return $rc
}

# ---- environment -----------------------------------------------------------------------
$PY - > "$OUT/env.txt" 2>&1 <<'EOF'
import platform, shutil, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
for tool in ("nvcc", "compute-sanitizer", "ncu", "nvidia-smi", "ninja"):
    print(f"{tool}: {shutil.which(tool)}")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print("native arch:", f"{c[0]}.{c[1]}" if c else "none")
# The C++ compilers and the libstdc++ torch loaded (setup.py links the extension against that
# one and refuses a build that carries a copy of its own: rmkernels/_libstdcxx.py). If the build
# stage says "a static copy of libstdc++", these lines say which other g++ to rebuild with (CXX=).
import importlib.util, os, re
spec = importlib.util.spec_from_file_location("_libstdcxx", "rmkernels/_libstdcxx.py")  # not the package: no _C
_libstdcxx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_libstdcxx)
print("CXX:", os.environ.get("CXX"), "CC:", os.environ.get("CC"))
for cxx in dict.fromkeys(filter(None, (os.environ.get("CXX"), "c++", "g++", "/usr/bin/g++"))):
    path = shutil.which(cxx)
    if path is None:
        print(f"{cxx}: not found")
        continue
    def ask(*args):
        r = subprocess.run([path, *args], capture_output=True, text=True)
        return (r.stdout.splitlines() or ["?"])[0]
    print(f"{cxx}: {os.path.realpath(path)} ({ask('--version')}); libstdc++.so: "
          f"{ask('-print-file-name=libstdc++.so')}; libstdc++.a: {ask('-print-file-name=libstdc++.a')}")
lib = _libstdcxx.loaded_libstdcxx()
if lib:
    with open(lib, "rb") as f:
        versions = {int(v) for v in re.findall(rb"GLIBCXX_3\.4\.(\d+)", f.read())}
    print(f"torch's libstdc++: {os.path.realpath(lib)}, newest GLIBCXX_3.4.{max(versions, default=0)}")
else:
    print("torch's libstdc++: none found")
EOF
# (not CC: the device machine exports CC as its host compiler, and nvcc would get -ccbin <arch>)
NATIVE_ARCH=$(sed -n 's/^native arch: \([0-9][0-9.]*\)$/\1/p' "$OUT/env.txt")

if [ -z "$NATIVE_ARCH" ]; then
  SKIP="skipped: no CUDA GPU (torch.cuda.is_available() is False)"
  for s in build extension "gpu cuda issue 14" "gpu cuda" "gpu triton issue 14" "gpu triton" memcheck racecheck graphs "bench grpo" \
           "profile grpo" overhead bench suite; do record "$s" "$SKIP" 0 "-"; done
  # The cheap part that runs anywhere: the op list the GPU stages cover imports and resolves.
  run_stage "ops-list (cpu)" 60 ops-list.txt $PY scripts/gpu_check_ops.py list
  echo >> "$SUMMARY"
  echo "CPU-only machine: the GPU stages did not run. Total $(( $(date +%s) - START )) s." >> "$SUMMARY"
  finish
fi

# ---- 1. build for the native architecture ------------------------------------------------
if run_stage build "$CAP_BUILD" build.log env RMKERNELS_CUDA_ARCHS="$NATIVE_ARCH" RMKERNELS_FORCE_CUDA_BUILD=1 \
     MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY setup.py build_ext --inplace; then
  $PY -m rmkernels.info > "$OUT/info.txt" 2>&1
  # A build that links but does not load (a libstdc++ of another compiler, a missing symbol)
  # would turn every cuda-backend test into a skip and every stage "ok": a stage of its own.
  # (and one whose own static libstdc++ crashes its check messages and huge_pages(): 2026-12-04)
  run_stage extension "$CAP_EXT" extension.log $PY scripts/gpu_check_ops.py extension
else
  record extension "skipped: the build failed" 0 "-"
  echo "build failed: the GPU stages that need the extension still run (cuda backend unavailable)" >> "$SUMMARY"
  if grep -q "static copy of libstdc++" "$OUT/build.log"; then
    echo "the build was refused for a static libstdc++: rerun with CXX= another g++ of env.txt" >> "$SUMMARY"
  fi
fi

# ---- 2. GPU tests ----------------------------------------------------------------------
XDIST=()
if $PY -c "import xdist" > /dev/null 2>&1 && [ "$GPU_TEST_WORKERS" -gt 1 ]; then XDIST=(-n "$GPU_TEST_WORKERS"); fi
# The critic-free advantages of the open issue 14 first, in a stage of their own (ISSUE14_CUDA_S of the cap).
FIRST_TESTS=(tests/test_reinforce.py tests/test_group_advantages.py)
# GPU_TEST_FILES less the files named after it (pytest's --ignore does not apply to files named
# on its command line)
files_without() {
  local f
  for f in "${GPU_TEST_FILES[@]}"; do
    case " $* " in *" $f "*) ;; *) printf '%s\n' "$f" ;; esac
  done
}
mapfile -t CUDA_REST < <(files_without "${FIRST_TESTS[@]}")
mapfile -t TRITON_REST < <(files_without tests/test_group_advantages.py)
run_stage "gpu cuda issue 14" "$ISSUE14_CUDA_S" pytest-gpu-cuda-14.log $PY -m pytest "${FIRST_TESTS[@]}" -v ${XDIST[@]+"${XDIST[@]}"} -p no:cacheprovider \
  -m "cuda and not cuda_on_cpu and not triton" -rfEs --junitxml="$OUT/pytest-gpu-cuda-14.xml"
run_stage "gpu cuda" $(( CAP_GPU_CUDA - ISSUE14_CUDA_S )) pytest-gpu-cuda.log $PY -m pytest "${CUDA_REST[@]}" -v ${XDIST[@]+"${XDIST[@]}"} -p no:cacheprovider \
  -m "cuda and not cuda_on_cpu and not triton" -rfEs --durations=15 \
  --junitxml="$OUT/pytest-gpu-cuda.xml"
# The Triton group advantages first too: one launch with grid barriers (a barrier that never
# opens would stop at this stage's cap, not the next stage's).
run_stage "gpu triton issue 14" "$ISSUE14_TRITON_S" pytest-gpu-triton-14.log $PY -m pytest tests/test_group_advantages.py -v ${XDIST[@]+"${XDIST[@]}"} \
  -p no:cacheprovider -m "cuda and triton and not cuda_on_cpu" -rfEs --junitxml="$OUT/pytest-gpu-triton-14.xml"
run_stage "gpu triton" $(( CAP_GPU_TRITON - ISSUE14_TRITON_S )) pytest-gpu-triton.log $PY -m pytest "${TRITON_REST[@]}" -v ${XDIST[@]+"${XDIST[@]}"} -p no:cacheprovider \
  -m "cuda and triton and not cuda_on_cpu" -rfEs --durations=15 \
  --junitxml="$OUT/pytest-gpu-triton.xml"

# ---- 3. compute-sanitizer ------------------------------------------------------------------
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    run_stage "$tool" "$CAP_SANITIZER" "sanitizer-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --target-processes all $PY scripts/gpu_check_ops.py sanitize
  done
else
  record memcheck "skipped: compute-sanitizer not found" 0 "-"
  record racecheck "skipped: compute-sanitizer not found" 0 "-"
fi

# ---- 4. CUDA graphs ----------------------------------------------------------------------
run_stage graphs "$CAP_GRAPHS" graphs.log $PY scripts/gpu_check_ops.py graphs "$OUT/graphs.json"

# ---- 5. benchmarks, op by op (what finishes is kept) -----------------------------------------
# The group advantages' own kernels at grpo-l / grpo-xl, judged against the floors timed with
# them, at grpo-xl-bb (grpo-xl's rows randomly permuted, as verl's default balance_batch
# leaves them: no runs of equal ids; information) and at grpo-l-t1 (grpo-l's batch with T = 1:
# the statistics phases and grid syncs without the [B, T] write, so grpo-l's time splits into
# that fixed cost and the write; information); the baselines come later, in the bench stage
# (their torch.compile alone can take the cap).
BENCH_GRPO="--ops grpo --shapes grpo-l grpo-xl grpo-xl-bb grpo-l-t1 --providers rmk-cuda rmk-cuda-op rmk-triton rmk-triton-op"
read -r -a grpo_args <<< "$BENCH_GRPO"
run_stage "bench grpo" "$CAP_BENCH_GRPO" bench-grpo.log $PY benchmarks/run.py --device cuda --quick "${grpo_args[@]}" \
  --out "$OUT/bench-grpo"
# Nsight Compute on the group-advantage kernels themselves (issue 14: why the op is several times
# its memory floor): speed of light, memory workload, occupancy and launch statistics of each
# launch at grpo-l and grpo-xl (grpo, cuda and triton, two calls each: 8 launches).
if command -v ncu > /dev/null; then
  run_stage "profile grpo" "$CAP_PROFILE" profile-grpo.log ncu --clock-control none --target-processes all \
    --kernel-name regex:group_adv --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section SchedulerStats $PY scripts/gpu_check_ops.py profile
else
  record "profile grpo" "skipped: ncu not found" 0 "-"
fi
# The host overhead of each public function's call on the cuda backend against its kernel ops
# called directly (BENCHMARKS.md: <= 15 us CPU overhead per call on a GPU machine; judged in the
# table the log ends with).
run_stage overhead "$CAP_OVERHEAD" bench-overhead.log $PY benchmarks/bench_overhead.py --device cuda --quick \
  --threads 1 --providers rmk-cuda kernels-cuda
# name|run.py arguments, each run into its own directory OUT/bench-<name> (a run replaces the
# (op, shape) groups it measures in its directory's CSV, so the baselines' runs must not share
# one with the rmk runs). REINFORCE++ / ReMax first, the rmk providers only (judged against the
# memory floor): at the many-row shapes, then at the few-long-row shapes the CUDA kernel splits;
# then the baselines (verl's vectorized GRPO, verl's REINFORCE++ loop over 128 time steps and
# ReMax formula, torch, torch.compile: compiling can take tens of seconds, so they come after
# what issue 14 measures; verl's GRPO loop is a CPU-only baseline); then the other ops.
BENCH_RUNS=(
  "rpp|--ops rpp --shapes rpp-l --providers rmk-cuda rmk-triton"
  "remax|--ops remax --shapes remax-l --providers rmk-cuda rmk-triton"
  "rpp-xl|--ops rpp --shapes rpp-xl --providers rmk-cuda rmk-triton"
  "remax-xl|--ops remax --shapes remax-xl --providers rmk-cuda rmk-triton"
  "grpo-base|--ops grpo --shapes grpo-l --providers verl-vec torch compile"
  "rpp-base|--ops rpp --shapes rpp-l --providers hf torch compile"
  "remax-base|--ops remax --shapes remax-l --providers hf compile"
  "gae|--ops gae" "bt|--ops bt" "pooling|--ops pooling" "pair|--ops pair" "e2e|--ops e2e"
)
BENCH_END=$(( $(date +%s) + CAP_BENCH ))
for item in "${BENCH_RUNS[@]}"; do
  name=${item%%|*}
  read -r -a bench_args <<< "${item#*|}"
  left=$(( BENCH_END - $(date +%s) ))
  if [ $left -le 5 ]; then
    record "bench $name" "skipped: the bench stage's ${CAP_BENCH} s were used up" 0 "-"
    continue
  fi
  run_stage "bench $name" "$left" "bench-$name.log" $PY benchmarks/run.py --device cuda --quick "${bench_args[@]}" \
    --out "$OUT/bench-$name"
done

# ---- 6. the rest of the suite --------------------------------------------------------------
SOFT_CAP=1 run_stage suite "$CAP_SUITE" pytest-rest.log $PY -m pytest tests -q -p no:cacheprovider \
  -m "not cuda and not cuda_on_cpu and not triton and not slow" --junitxml="$OUT/pytest-rest.xml"

echo >> "$SUMMARY"
echo "Total $(( $(date +%s) - START )) s on $(grep '^device 0' "$OUT/env.txt" || echo 'an unknown device')." >> "$SUMMARY"
finish
