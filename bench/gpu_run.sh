#!/usr/bin/env bash
# bench/gpu_run.sh OUTDIR [densetriton bench options...]
#
# One command for a GPU host without network access (torch, torchvision, triton, safetensors,
# numpy, tqdm, matplotlib and pytest preinstalled): install the project, run the kernel and GPU
# tests (then the rest of the suite while the test budget lasts), run the full bench, and leave in OUTDIR
#   run.log    versions, nvidia-smi, install output, one status line per stage
#   tests.log  pytest output
#   ab.log     the kernel-variant A/B (RUN_AB=1): variant_check, then layer_times per variant
#   bench.log  the bench's output
#   <date>-<device>.json/.md/.png   the results (also copied into bench/results/)
# ending with a short table. A failing stage is recorded and the next one still runs; the exit
# status is 0 only if every stage that ran passed.
#
# Environment knobs:
#   PYTHON=python3          the interpreter that holds torch
#   RUN_INSTALL=1 RUN_TESTS=1 RUN_BENCH=1   set one to 0 to skip that stage
#   RUN_AB=0                1: after the tests, the kernel-variant A/B (DENSETRITON_KERNELS): the
#                           variants' logits compared at the A/B shapes (variant_check), then
#                           `layer_times` for each model x batch x variant, variants interleaved
#   AB_VARIANTS="v1 v2" AB_MODELS="densenet121 densenet201" AB_BATCHES="1 256" AB_DTYPE=float16
#   AB_TIMEOUT_S=240        the A/B's budget; a run that would start with under 20 s left is skipped
#   TEST_BUDGET_S=360       seconds for all tests: kernel tests, GPU tests, the rest with what is left
#   BENCH_TIMEOUT_S=0       >0: the bench starts no record after 80% of this (--budget-s) and is
#                           interrupted (SIGINT, partial results kept) at this many seconds
#   DENSETRITON_BENCH_COMMIT=<sha>   the commit to record (wins over a .git beside the code, which
#                                    on a GPU host may be stale)
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bench/gpu_run.sh OUTDIR [densetriton bench options...]" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
RUN_INSTALL=${RUN_INSTALL:-1}
RUN_TESTS=${RUN_TESTS:-1}
RUN_BENCH=${RUN_BENCH:-1}
TEST_BUDGET_S=${TEST_BUDGET_S:-360}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-0}
RUN_AB=${RUN_AB:-0}
AB_VARIANTS=${AB_VARIANTS:-v1 v2}
AB_MODELS=${AB_MODELS:-densenet121 densenet201}
AB_BATCHES=${AB_BATCHES:-1 256}
AB_DTYPE=${AB_DTYPE:-float16}
AB_TIMEOUT_S=${AB_TIMEOUT_S:-240}
export PYTHONUNBUFFERED=1
LOG=$OUTDIR/run.log
FAILED=0
SUMMARY=()

note() {
    echo "gpu_run: $*" | tee -a "$LOG"
}
stage() {  # stage NAME RC [detail]
    local msg="$1: $([[ $2 == 0 ]] && echo ok || echo "FAILED (exit $2)")${3:+ - $3}"
    [[ $2 == 0 ]] || FAILED=1
    SUMMARY+=("$msg")
    note "$msg"
}

: >"$LOG"
note "started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd)"
{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' || echo "python: version report failed"
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for name in ("torchvision", "triton", "safetensors", "numpy", "matplotlib", "tqdm", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
EOF
    git rev-parse HEAD 2>/dev/null || echo "git: no checkout here (DENSETRITON_BENCH_COMMIT=${DENSETRITON_BENCH_COMMIT:-unset})"
} >>"$LOG" 2>&1

if [[ $RUN_INSTALL == 1 ]]; then
    rc=0
    "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || rc=$?
    stage install "$rc"
fi

pytest_tail() {  # the closing line of the last pytest run in tests.log (none when it was cut)
    awk '/^=== python -m pytest/ { last = "" } /(passed|failed|error|skipped|no tests ran)/ { last = $0 } END { print last }' \
        "$OUTDIR/tests.log"
}

run_tests() {  # run_tests NAME LIMIT_S PYTEST_ARGS...: one pytest run, its status line
    local name=$1 limit=$2 rc=0
    shift 2
    echo "=== python -m pytest $* (limit ${limit}s)" >>"$OUTDIR/tests.log"
    # SIGINT, not SIGTERM, at the limit: pytest then still prints which tests failed and how long each took.
    # -o addopts=: one process for the one GPU (pyproject's pytest-xdist workers may not even be installed).
    timeout -s INT -k 15 "$limit" "$PY" -m pytest "$@" -o addopts= -q -rfEs --durations=15 -p no:cacheprovider \
        >>"$OUTDIR/tests.log" 2>&1 || rc=$?
    [[ $rc == 5 ]] && rc=0  # no test collected
    stage "$name" "$rc" "$( [[ $rc == 124 ]] && echo "cut at the test budget; " )$(pytest_tail)"
    # The failing tests' names in run.log and on stdout too: tests.log may not come back whole.
    awk '/^=== python -m pytest/ { n = 0 } /^(FAILED|ERROR) / && n < 20 { line[n++] = $0 }
         END { for (i = 0; i < n; i++) print "  " line[i] }' "$OUTDIR/tests.log" | tee -a "$LOG"
}

if [[ $RUN_TESTS == 1 ]]; then
    : >"$OUTDIR/tests.log"
    start=$SECONDS
    # Cheapest and most telling first: every kernel, compiled, at small awkward shapes against
    # float64 (float32, float16 and bfloat16); then the GPU-marked tests (registry models at 224,
    # CUDA graphs, threads and streams, the soak); then the rest while the budget lasts.
    # tests/test_kernel_variants.py: whole engines under DENSETRITON_KERNELS=v2 against v1.
    run_tests "kernel tests" $((TEST_BUDGET_S * 2 / 5)) tests/kernels tests/test_kernel_variants.py
    left=$((TEST_BUDGET_S - (SECONDS - start)))
    if ((left >= 30)); then
        # Files in the order a cut budget should spare them: threads, streams and the soak, the
        # bench, then the executor's graph tests and its long registry sweep (last in its file).
        # These three hold every gpu-marked test outside tests/kernels (naming "tests" as well
        # would make pytest collect in folder order instead).
        run_tests "gpu tests" "$left" -m gpu tests/test_reliability.py tests/bench tests/test_executor.py
    else
        SUMMARY+=("gpu tests: not run (${left}s of TEST_BUDGET_S left)")
        note "gpu tests: not run (${left}s left)"
        FAILED=1
    fi
    left=$((TEST_BUDGET_S - (SECONDS - start)))
    if ((left >= 60)); then
        run_tests "rest of the suite" "$left" -m "not gpu" tests --ignore=tests/kernels
    else
        SUMMARY+=("rest of the suite: not run (${left}s of TEST_BUDGET_S left)")
        note "rest of the suite: not run (${left}s left)"
    fi
fi

ab_run() {  # ab_run LIMIT_S VARIANT MODULE ARGS...: one A/B command into ab.log; its exit status
    local limit=$1 variant=$2 rc=0
    shift 2
    echo "=== DENSETRITON_KERNELS=$variant $PY -m densetriton.bench.$* (limit ${limit}s)" >>"$OUTDIR/ab.log"
    DENSETRITON_KERNELS=$variant timeout -s INT -k 10 "$limit" "$PY" -m "densetriton.bench.$@" \
        >>"$OUTDIR/ab.log" 2>&1 || rc=$?
    return "$rc"
}

if [[ $RUN_AB == 1 ]]; then
    : >"$OUTDIR/ab.log"
    start=$SECONDS
    read -r -a variants <<<"$AB_VARIANTS"
    read -r -a models <<<"$AB_MODELS"
    read -r -a batches <<<"$AB_BATCHES"
    rc=0
    # Correct first: a faster variant that is wrong at the bench's shapes is no result.
    ab_run $((AB_TIMEOUT_S / 3)) "${variants[0]}" variant_check --model "${models[@]}" \
        --batch-size "${batches[@]}" --dtype "$AB_DTYPE" --kernels "${variants[@]}" || rc=$?
    stage "A/B variant check" "$rc" "$(grep -E '^(ok|FAILED):' "$OUTDIR/ab.log" | tail -1)"
    done_runs=0 failed_runs=0 skipped_runs=0
    for model in "${models[@]}"; do
        for batch in "${batches[@]}"; do
            for variant in "${variants[@]}"; do  # interleaved: a cut budget leaves whole pairs
                left=$((AB_TIMEOUT_S - (SECONDS - start)))
                if ((left < 20)); then
                    skipped_runs=$((skipped_runs + 1))
                    continue
                fi
                rc=0
                ab_run "$left" "$variant" layer_times --model "$model" --batch-size "$batch" --dtype "$AB_DTYPE" || rc=$?
                done_runs=$((done_runs + 1))
                ((rc == 0)) || failed_runs=$((failed_runs + 1))
            done
        done
    done
    stage "A/B layer times" "$((failed_runs > 0))" \
        "$done_runs run, $failed_runs failed, $skipped_runs skipped at AB_TIMEOUT_S=${AB_TIMEOUT_S}s"
fi

if [[ $RUN_BENCH == 1 ]]; then
    args=(bench --out "$OUTDIR" --no-progress)
    limit=()
    if ((BENCH_TIMEOUT_S > 0)); then
        args+=(--budget-s $((BENCH_TIMEOUT_S * 4 / 5)))
        limit=(timeout -s INT -k 20 "$BENCH_TIMEOUT_S")
    fi
    args+=("$@")
    note "bench: $PY -m densetriton ${args[*]}"
    rc=0
    ${limit[@]+"${limit[@]}"} "$PY" -m densetriton "${args[@]}" 2>&1 | tee "$OUTDIR/bench.log" || rc=$?
    stage bench "$rc" "$( ((rc == 124)) && echo "interrupted at BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S}s; partial results kept" )"
    mkdir -p bench/results
    copied=0
    while read -r path; do
        case "$path" in
            "$OUTDIR"/*.json | "$OUTDIR"/*.md | "$OUTDIR"/*.png)
                cp "$path" bench/results/ && copied=$((copied + 1)) ;;
        esac
    done < <(sed -n 's/^wrote //p' "$OUTDIR/bench.log")
    if ((copied == 0)); then  # interrupted before it printed: take the files it left
        for path in "$OUTDIR"/20??-??-??-*.json "$OUTDIR"/20??-??-??-*.md "$OUTDIR"/20??-??-??-*.png; do
            if [[ -e $path ]]; then
                cp "$path" bench/results/
                copied=$((copied + 1))
            fi
        done
    fi
    note "copied $copied results file(s) into bench/results/"
fi

echo
echo "=== summary"
for line in ${SUMMARY[@]+"${SUMMARY[@]}"}; do
    echo "  $line"
done | tee -a "$LOG"
if [[ $RUN_BENCH == 1 ]]; then
    latest=$(ls -t "$OUTDIR"/20??-??-??-*.json 2>/dev/null | head -1 || true)
    if [[ -n $latest ]]; then
        "$PY" -m densetriton.bench.report --short "$latest" | tee -a "$LOG" || true
    fi
fi
exit "$FAILED"
