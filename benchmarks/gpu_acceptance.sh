#!/usr/bin/env bash
# The acceptance run for the first GPU (issue 12, build item 9): under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_acceptance.sh
#
# With a CUDA GPU it runs, each step under its own `timeout`, and writes everything to
# benchmarks/results/gpu-acceptance-<UTC date>/:
#   environment.json    device name, capability, driver, CUDA, torch, triton, date
#   gpu-tests.log       python -m pytest -m gpu tests (what only a GPU can check)
#   triton-tests.log    the Triton test files on CUDA (the triton_device fixture is the GPU there)
#   verify.log          attn-fast verify
#   bench/ bench.log    attn-fast bench --full (JSON + PNG)
#   numerics.json       tanh.approx / libdevice / exp / factorized and tl.dot ieee / tf32x3 / tf32 / fp16 / bf16
#                       errors against float64
#   determinism.json    Triton forward+backward twice under torch.use_deterministic_algorithms, bitwise equal
#   graphs.json         CUDA-graph capture of AdditiveAttention.step (AttentionMemory, beam index) and of a
#                       Seq2Seq greedy step; a failed capture is a failure in the JSON, not a crash
#   prepared-keys.json  fp32 all-steps forward with the key pre-pass off and on (caption, long, long_prepared)
#   steps.jsonl         exit code and seconds of every step;  summary.json: all of it, "ok" overall
# Without a GPU it says so in one line and exits 0 (a dry run). Exit code: 0 when everything passed, 1 otherwise.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_acceptance: no CUDA GPU found (torch.cuda.is_available() is False): dry run, nothing run, exit 0"
    exit 0
fi

OUT="benchmarks/results/gpu-acceptance-$(date -u +%Y-%m-%d)"
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
export CUBLAS_WORKSPACE_CONFIG=:4096:8
unset TRITON_INTERPRET
BUDGET_S=470  # the whole run, under 8 minutes; every step also has its own limit below

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, log to $OUT/NAME.log, record rc and seconds.
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    local left=$((BUDGET_S - SECONDS))
    if ((left < 10)); then
        echo "{\"step\": \"$name\", \"rc\": 124, \"seconds\": 0, \"limit_s\": 0, \"note\": \"over the time budget\"}" \
            >> "$OUT/steps.jsonl"
        echo "  $name: skipped (time budget spent)"
        return
    fi
    ((limit > left)) && limit=$left
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started)), \"limit_s\": $limit}" \
        >> "$OUT/steps.jsonl"
    echo "  $name: rc=$rc in $((SECONDS - started)) s (limit $limit s)"
}

echo "gpu_acceptance: writing $OUT"
step environment 30 "$PYTHON" benchmarks/gpu_acceptance.py env "$OUT/environment.json"
step gpu-tests 60 "$PYTHON" -m pytest -q -m gpu tests
step triton-tests 95 "$PYTHON" -m pytest -q -m "not slow" tests/kernels tests/backends/test_triton_backend.py \
    tests/backends/test_triton_ops.py
step verify 40 attn-fast verify
step bench 130 attn-fast bench --full --quiet --out-dir "$OUT/bench"
step numerics 35 "$PYTHON" benchmarks/gpu_acceptance.py numerics "$OUT/numerics.json"
step determinism 25 "$PYTHON" benchmarks/gpu_acceptance.py determinism "$OUT/determinism.json"
step graphs 25 "$PYTHON" benchmarks/gpu_acceptance.py graphs "$OUT/graphs.json"
step prepared-keys 25 "$PYTHON" benchmarks/gpu_acceptance.py prepared-keys "$OUT/prepared-keys.json"

"$PYTHON" benchmarks/gpu_acceptance.py summary "$OUT"
