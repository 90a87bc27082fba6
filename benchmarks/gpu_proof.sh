#!/usr/bin/env bash
# Prove the engine's GPU paths in one time-boxed run (issue 18): Triton kernels, the CUDA-graph
# diffusion step and decode runner, bf16, ONNX Runtime's CUDA provider. See benchmarks/GPU_PROOF.md.
#
#   bash benchmarks/gpu_proof.sh OUT              # GPU machine (H100/H200): ≤ 9 minutes in all
#   bash benchmarks/gpu_proof.sh --dry-run OUT    # CPU: the same steps, shrunk or skipped (~2 min)
#
# Options: --budget S   total seconds for every step (default 530: 9 minutes less a margin)
#          --keep       keep the work folder (twins, caches, step folders) and print its path
# Environment: PYTHON (default python3); GPU_PROOF_INJECT_FAILURE=1 adds two deliberately failing
# steps (an error, a timeout) before the benchmarks, to show that a failed step stops nothing.
#
# Steps, in order, each under `timeout` (its own cap, and never past the total budget), each
# recorded with its exit status and wall time whatever happens to it:
#   install     wheels from .whl/ (pip --no-index, into the work folder) and the package itself
#               (`pip install --no-deps --no-build-isolation -e .`, building the C++ module), unless
#               dglm is importable already; a symlinked source tree if the build fails
#   twins       random shape twins of MiniLM-L6 and SmolLM2-135M (benchmarks/shape_twins.py), then
#               DGLM_SHAPE_TWINS for every later step: the real weights cannot travel, speeds do
#               not depend on weight values; no quality number from this run means anything
#   pytest_gpu  python -m pytest -m gpu tests (on CPU every test skips: "needs a CUDA device")
#   kernels     python -m benchmarks.bench_kernels   (dry run: --device cpu --quick)
#   decode      python -m benchmarks.bench_decode --quick: CUDA graphs vs eager vs HF, bf16, floor
#               (dry run: --device cpu, one 1×8 config)
#   suite       python -m benchmarks.run --suite gpu --quick   (dry run: cpu, one 1×4 cell)
#   onnx        python -m benchmarks.bench_onnx --device cuda --quick; skipped, with the reason,
#               when onnxruntime has no CUDA execution provider (and always in a dry run)
#
# OUT receives four files only (a lent device machine returns at most 8): summary.json,
# summary.md, proof.log (every step's output) and results.tar.gz (every step's folder: log, JSON,
# markdown, junit). The exit status is 0 when no step failed, 1 otherwise, 2 for bad arguments.

set -u -o pipefail

# The install step (run by this script as a child process, under its timeout): wheels from .whl/
# into $WORK/site, then the package unless it imports already; a symlinked tree if the build fails.
if [ "${1:-}" = --install-step ]; then
    set -e
    cd "$ROOT"
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $WORK/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
    fi
    if "$PY" -c "import dglm.engine, dglm.kernels, dglm.export" 2> /dev/null; then
        echo "dglm is importable already: nothing to build"
        exit 0
    fi
    t0=$(date +%s)
    if "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || "$PY" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e .; then
        echo "built and installed dglm-engine (editable) in $(($(date +%s) - t0)) s"
    else
        echo "the build failed: importing dglm from a symlinked source tree (no C++ module)"
        mkdir -p "$WORK/src/dglm"
        for pkg in engine kernels export; do ln -sfn "$ROOT/$pkg" "$WORK/src/dglm/$pkg"; done
    fi
    "$PY" -c "import dglm.engine, dglm.kernels, dglm.export; print('dglm imports')"
    exit 0
fi

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

DRY_RUN=0 BUDGET=530 KEEP=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget) shift; BUDGET="${1:-}" ;;
        --keep) KEEP=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
case "$BUDGET" in ''|*[!0-9]*) echo "--budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
PY="${PYTHON:-python3}"
MODE=gpu; [ "$DRY_RUN" = 1 ] && MODE=dry-run
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dglm-gpu-proof.XXXXXX")"
STEPS="$WORK/steps"; RECORDS="$WORK/steps.jsonl"; LOG="$OUT/proof.log"
mkdir -p "$STEPS"; : > "$RECORDS"; : > "$LOG"
rm -f "$OUT/summary.json" "$OUT/summary.md" "$OUT/results.tar.gz"
export DGLM_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=25  # seconds kept for a killed step's grace period, the summary and the archive
FAILED=0

cleanup() { [ "$KEEP" = 1 ] && echo "work folder kept: $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT

say() { echo "[gpu_proof $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

# record NAME STATUS RC WALL TIMEOUT REASON COMMAND...: one JSON line per step
record() {
    "$PY" -m benchmarks.gpu_proof record "$RECORDS" "$@" || say "could not record step $1"
}

summarise() {
    "$PY" -m benchmarks.gpu_proof summary "$RECORDS" "$STEPS" "$OUT" --mode "$MODE" \
        --budget "$BUDGET" --wall "$(($(date +%s) - START))" >> "$LOG" 2>&1 \
        || say "could not write the summary"
}

# skip NAME REASON
skip() {
    say "skip $1: $2"
    record "$1" skipped "" 0 0 "$2"
    summarise
}

# step NAME CAP COMMAND...: run COMMAND in $STEPS/NAME under timeout min(CAP, time left)
step() {
    local name="$1" cap="$2"; shift 2
    local dir="$STEPS/$name" left=$((DEADLINE - $(date +%s) - RESERVE))
    if [ "$left" -lt 10 ]; then
        skip "$name" "the total budget of ${BUDGET} s is spent"
        return
    fi
    local limit=$((cap < left ? cap : left))
    mkdir -p "$dir"
    say "run $name (timeout ${limit} s): $*"
    local t0 rc status
    t0=$(date +%s.%N)
    STEP_DIR="$dir" timeout -k 10 "$limit" "$@" > "$dir/log.txt" 2>&1
    rc=$?
    local wall
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$status" = ok ] || FAILED=1
    { echo "----- $name: $status (rc $rc, ${wall} s) -----"; cat "$dir/log.txt"; } >> "$LOG"
    say "$name: $status (rc $rc, ${wall} s)"
    record "$name" "$status" "$rc" "$wall" "$limit" "" "$@"
    summarise
}

say "mode $MODE, budget ${BUDGET} s, python $("$PY" -c 'import sys; print(sys.version.split()[0])'), output $OUT"

# ------------------------------------------------------------------------------ install
export PYTHONPATH="$WORK/site:$WORK/src${PYTHONPATH:+:$PYTHONPATH}" WORK ROOT PY
step install 180 bash "$ROOT/benchmarks/gpu_proof.sh" --install-step

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
NO_GPU=""
if [ "$DRY_RUN" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
    NO_GPU="torch.cuda.is_available() is False: run on a CUDA machine, or use --dry-run on CPU"
    FAILED=1
fi
say "CUDA available: $HAS_CUDA"

# ------------------------------------------------------------------------------ shape twins
step twins 90 "$PY" -m benchmarks.shape_twins "$WORK/twins"
export DGLM_SHAPE_TWINS="$WORK/twins"

if [ "${GPU_PROOF_INJECT_FAILURE:-0}" = 1 ]; then
    step injected_error 30 "$PY" -c "raise SystemExit('injected failure (GPU_PROOF_INJECT_FAILURE=1)')"
    step injected_timeout 2 sleep 30
fi

# gpu_step NAME CAP GPU_COMMAND... -- DRY_RUN_COMMAND...
gpu_step() {
    local name="$1" cap="$2"; shift 2
    local gpu=() dry=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do gpu+=("$1"); shift; done
    shift
    dry=("$@")
    if [ -n "$NO_GPU" ]; then
        skip "$name" "$NO_GPU"
    elif [ "$DRY_RUN" = 1 ]; then
        step "$name" "$cap" "${dry[@]}"
    else
        step "$name" "$cap" "${gpu[@]}"
    fi
}

# ------------------------------------------------------------------------------ the proof
# caps (s) on an H100/H200 sum past the budget on purpose: a fast step leaves its time to the next
PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors
        --junitxml="$STEPS/pytest_gpu/junit.xml" tests)
gpu_step pytest_gpu 120 "${PYTEST[@]}" -- "${PYTEST[@]}"
gpu_step kernels 100 \
    "$PY" -m benchmarks.bench_kernels --device cuda --out "$STEPS/kernels" -- \
    "$PY" -m benchmarks.bench_kernels --device cpu --quick --out "$STEPS/kernels"
gpu_step decode 130 \
    "$PY" -m benchmarks.bench_decode --device cuda --quick --out "$STEPS/decode" -- \
    "$PY" -m benchmarks.bench_decode --device cpu --configs 1x8 --out "$STEPS/decode"
gpu_step suite 200 \
    "$PY" -m benchmarks.run --suite gpu --quick --out "$STEPS/suite" -- \
    "$PY" -m benchmarks.run --suite cpu --quick --lengths 4 --batches 1 --repeats 1 \
    --out "$STEPS/suite"

ORT=$("$PY" -c "import onnxruntime as o; print(o.__version__, ','.join(o.get_available_providers()))" 2>&1 | tail -1)
if [ -n "$NO_GPU" ]; then
    skip onnx "$NO_GPU"
elif [[ "$ORT" != *CUDAExecutionProvider* ]]; then
    skip onnx "onnxruntime has no CUDAExecutionProvider (onnxruntime ${ORT}): install onnxruntime-gpu to measure the ONNX Runtime CUDA path"
elif [ "$DRY_RUN" = 1 ]; then
    skip onnx "dry run: the ONNX Runtime CUDA benchmark needs a GPU"
else
    step onnx 150 "$PY" -m benchmarks.bench_onnx --device cuda --quick --out "$STEPS/onnx"
fi

# ------------------------------------------------------------------------------ what comes back
summarise
tar -czf "$OUT/results.tar.gz" -C "$WORK" steps steps.jsonl 2>> "$LOG" || say "could not archive the step folders"
say "done in $(($(date +%s) - START)) s: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.md" 2> /dev/null
exit "$FAILED"
