#!/usr/bin/env bash
# One-shot GPU check: on a GPU machine with no network, in one call of at most 8 minutes,
#   1. record the machine (nvidia-smi, torch / CUDA / Triton / Python versions),
#   2. build paca_kernels._C with its CUDA kernels (all cores, the GPU's own architecture),
#   3. run the GPU tests (-m gpu) and the backend-parametrized op suites on cuda and triton,
#   4. benchmark both ops in bf16 at PaCa-Small stage 1 and the detection size, forward and
#      forward+backward, every provider,
# and write everything under one folder (default: gpu-check-out/): versions.txt, nvidia-smi.txt,
# build.log, tests-*.log/.xml, bench-*.json/.log and summary.txt (one line per step: status, seconds).
#
#     bash scripts/gpu_check.sh [OUT_DIR]          (make gpu-check; no bootstrap, no downloads)
#
# Every step has a time box (seconds, overridable: GPU_CHECK_BOX_<STEP>=N); a step that runs out is
# killed and recorded as "timeout", and the next one starts, so the folder always holds what finished.
# Python packages missing on the GPU machine (e.g. an xformers wheel, for that benchmark provider)
# can travel as wheels in .whl/ (see the device notes): they are installed into /tmp/site first.
#
# GPU_CHECK_DRY_RUN=1 checks the script's structure on any machine (make test does, on the CPU):
# it prints the plan, records the versions, skips the build, and has pytest *collect* each selection
# instead of running it, failing if a selection collects no test (a renamed test or shape id).
set -uo pipefail
cd "${GPU_CHECK_ROOT:-$(dirname "$0")/..}"  # the repository root

OUT=${1:-gpu-check-out}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Time boxes (s): together within 480 s, the 8-minute budget, with room for start-up.
BOX_VERSIONS=${GPU_CHECK_BOX_VERSIONS:-20}
BOX_BUILD=${GPU_CHECK_BOX_BUILD:-150}
BOX_GPU_TESTS=${GPU_CHECK_BOX_GPU_TESTS:-40}
BOX_SUITES=${GPU_CHECK_BOX_SUITES:-120}
BOX_BENCH=${GPU_CHECK_BOX_BENCH:-35}   # per (op, shape): four of them
TOTAL=$((BOX_VERSIONS + BOX_BUILD + BOX_GPU_TESTS + BOX_SUITES + 4 * BOX_BENCH))

elapsed() { echo $(($(date +%s) - START)); }

# step NAME BOX LOG CMD...: run CMD under `timeout BOX`, output to OUT/LOG and the terminal.
step() {
    local name=$1 box=$2 log=$3
    shift 3
    echo "[gpu-check +$(elapsed)s] $name (time box ${box}s)"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$box" "$@" 2>&1 | tee "$OUT/$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        5) status="no tests ran" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%-28s %-18s %4ss of %ss  %s\n' "$name" "$status" $(($(date +%s) - t0)) "$box" "$log" | tee -a "$OUT/summary.txt"
}

# pytest_step NAME BOX LOG PYTEST-ARGS...: a pytest run, or in the dry run its collection (which
# must find at least one test).
pytest_step() {
    local name=$1 box=$2 log=$3
    shift 3
    if [ "$DRY" = 1 ]; then
        step "$name (collect)" "$box" "$log" "$PY" -m pytest --collect-only -q -p no:cacheprovider "$@"
        # pytest -q --collect-only ends with "N tests collected" or, quieter, one "file.py: N" line per file.
        if ! grep -Eq '^[0-9]+(/[0-9]+)? tests? collected|\.py: [1-9][0-9]*$' "$OUT/$log"; then
            echo "gpu-check dry run: '$name' collects no test" | tee -a "$OUT/summary.txt"
            DRY_FAILED=1
        fi
    else
        step "$name" "$box" "$log" "$PY" -m pytest -p no:cacheprovider "$@"
    fi
}

echo "[gpu-check] out: $OUT; time boxes: versions $BOX_VERSIONS, build $BOX_BUILD, gpu tests $BOX_GPU_TESTS," \
     "op suites $BOX_SUITES, benchmarks 4 x $BOX_BENCH = ${TOTAL}s of 480s$([ "$DRY" = 1 ] && echo ' (dry run)')"
[ "$TOTAL" -le 480 ] || echo "gpu-check: the time boxes add up to ${TOTAL}s, over the 480 s budget" | tee -a "$OUT/summary.txt"
DRY_FAILED=0

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    step "carried wheels" 60 wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# 1. The machine.
{ nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } >"$OUT/nvidia-smi.txt"
step "versions" "$BOX_VERSIONS" versions.txt "$PY" - <<'PYEOF'
import datetime, json, platform, shutil, subprocess
import torch
info = {"date": datetime.datetime.now(datetime.UTC).isoformat(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": torch.cuda.get_device_capability() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    info["triton"] = f"unavailable: {exc}"
nvcc = shutil.which("nvcc")
info["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None
info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
print(json.dumps(info, indent=1))
PYEOF

# 2. The build: CUDA kernels for this GPU's architecture only (what the tests run), all cores.
if [ "$DRY" = 1 ]; then
    echo "[gpu-check] build skipped (dry run): would run PACA_KERNELS_BUILD_CUDA=1 $PY setup.py build_ext --inplace" \
        | tee "$OUT/build.log"
else
    ARCH=$("$PY" -c 'import torch; print("".join(map(str, torch.cuda.get_device_capability())))' 2>/dev/null || echo 90)
    step "build (sm_$ARCH)" "$BOX_BUILD" build.log env PACA_KERNELS_BUILD_CUDA=1 PACA_KERNELS_CUDA_ARCHS="$ARCH" \
        MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi

# 3. The tests: everything marked gpu, then the op suites' cuda and triton cases (same bodies as
# the CPU backends', on the GPU).
pytest_step "gpu tests (-m gpu)" "$BOX_GPU_TESTS" tests-gpu.log tests -m gpu -q -rfE \
    --junitxml="$OUT/tests-gpu.xml"
# (Deselected: what runs on the CPU anywhere and make test runs: the Triton resource gate, the nvcc
# compile checks and the CUDA emulation.)
pytest_step "op suites: cuda, triton" "$BOX_SUITES" tests-suites.log tests/ops tests/backends \
    -k "(cuda or triton) and not h100_budget and not test_cuda_compile and not test_cuda_emulation" -q -rfE --maxfail=50 --junitxml="$OUT/tests-suites.xml"

# 4. The benchmarks: bf16, PaCa-Small stage 1 (the tiny-s1 shape: stage 1 of Tiny and Small is the
# same layer) and the detection size, one run per (op, shape) so that a time-out loses one JSON only.
for op in cluster_pool p2c_attention; do
    for shape in tiny-s1 det800x1216-s1; do
        pytest_step "bench $op $shape" "$BOX_BENCH" "bench-$op-$shape.log" benchmarks/test_bench_ops.py \
            -k "test_$op and $shape" --bench-device cuda --bench-dtype bfloat16 -q \
            $([ "$DRY" = 1 ] || echo "--benchmark-only --benchmark-json=$OUT/bench-$op-$shape.json")
    done
done

echo "[gpu-check +$(elapsed)s] done; summary:"
cat "$OUT/summary.txt"
[ "$DRY_FAILED" = 0 ]
