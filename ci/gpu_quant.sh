#!/usr/bin/env bash
# The GPU quantization checks and benchmarks (docs/quantization.md) on one H200, in one run:
#   a) the quantized-linear conformance cases and tests/test_triton_quant.py, compiled, on cuda
#   b) kernel micro-benchmark: per-layer time of int4 (W4A16) and fp8 against bf16 on the
#      Llama-3-8B projection shapes at M = 1, 16, 256, 4096 (ci/quant_kernels_bench.py)
#   c) G1 (Llama-3-8B, dummy weights) in bf16 and with fp8 weights, one after the other
#   d) Llama-3-8B batch-1 decode (1 prompt of 32 tokens, 256 out), bf16 and int4
#   e) the W4A16 GEMV launch sweep, then quality (KL / top-1 against the unquantized model)
# Each step has its own time limit and the whole run stays within BUDGET seconds (default 530):
# a step starts only with its limit cut to what is left. A failed step is reported and the
# rest still run. Everything goes to $OUT (default /tmp/hwlm-gpu-quant): one log per step, the
# JSON results, summary.txt with the ratios, kernels.txt with the per-layer table, and
# support-matrix.md with only the quantized rows' cuda cells (merge them into
# docs/support-matrix.md by hand: a --support-matrix run replaces its device's whole column).
#
#   bash ci/gpu_quant.sh              # all steps
#   bash ci/gpu_quant.sh a d          # some of them
#   DEVICE=triton-interpret bash ci/gpu_quant.sh a b   # check the script on a CPU (tiny shapes)
set -u
OUT=${OUT:-/tmp/hwlm-gpu-quant}
BUDGET=${BUDGET:-530}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=python3
start=$SECONDS
steps=" ${*:-a b c d e} "

if [[ $DEVICE == cuda ]]; then
    if ls .whl/*.whl >/dev/null 2>&1; then  # the server's dependencies, as ci/gpu.sh
        $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    $py -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install failed"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    export TRITON_INTERPRET=0
else
    export TRITON_INTERPRET=1
fi
$py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

failed=()
step() {  # step NAME SECONDS COMMAND...: run within min(SECONDS, what is left), log to $OUT
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - (SECONDS - start)))
    if ((left < 20)); then
        echo "=== $name: skipped, ${left}s of the budget left"
        failed+=("$name(skipped)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s, $(date +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "exit $rc after $((SECONDS - start))s"
    tail -n 15 "$OUT/$name.log"
    ((rc == 0)) || failed+=("$name(exit $rc)")
}
want() { [[ $steps == *" $1 "* ]]; }

bench=(hwlm --log-level info bench throughput --device "$DEVICE")
decode=(--model llama-3-8b --num-prompts 1 --input-len-min 32 --input-len-max 32
    --output-len 256 --max-num-seqs 8 --repeats 3)
if [[ $DEVICE != cuda ]]; then  # the script's own check: the tiny preset, a few tokens
    decode=(--model hwlm-tiny --num-prompts 1 --input-len-min 8 --input-len-max 8 --output-len 4
        --max-num-seqs 2 --repeats 1)
fi

if want a; then
    quick=()
    [[ $DEVICE == cuda ]] || quick=(--quick)
    step a-conformance 120 $py -m pytest -q tests/conformance/test_quantized_linear.py \
        tests/conformance/test_prequantized_linear.py \
        --device "$DEVICE" "${quick[@]}" --support-matrix "$OUT/support-matrix.md"
    step a-kernels 120 $py -m pytest -q tests/test_triton_quant.py
fi
if want b; then
    step b-kernel-bench 150 $py ci/quant_kernels_bench.py --device "$DEVICE" --quick \
        --output-json "$OUT/kernels.json"
fi
if want c; then
    if [[ $DEVICE == cuda ]]; then
        g1=(--workload g1 --repeats 1)
    else
        g1=(--model hwlm-tiny --num-prompts 4 --input-len-min 8 --input-len-max 8 --output-len 4)
    fi
    step c-g1-bf16 130 "${bench[@]}" "${g1[@]}" --output-json "$OUT/g1-bf16.json"
    step c-g1-fp8 130 "${bench[@]}" "${g1[@]}" --quantization fp8 --output-json "$OUT/g1-fp8.json"
fi
if want d; then
    step d-decode-bf16 80 "${bench[@]}" "${decode[@]}" --output-json "$OUT/decode-bf16.json"
    step d-decode-int4 80 "${bench[@]}" "${decode[@]}" --quantization int4 \
        --output-json "$OUT/decode-int4.json"
fi
if want e; then
    if [[ $DEVICE == cuda ]]; then
        step e-gemv-sweep 150 $py ci/quant_kernels_bench.py --device cuda --rows 1 \
            --output-json "$OUT/kernels-sweep.json"
        quality=(--model llama-3-8b --num-tokens 256)
    else
        quality=(--model hwlm-tiny --num-tokens 16)
    fi
    step e-quality 120 $py ci/quant_quality.py "${quality[@]}" --device "$DEVICE" \
        --quantization fp8 int4 --output-json "$OUT/quality.json"
fi

$py - "$OUT" >"$OUT/summary.txt" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def rate(name: str) -> float | None:
    try:
        data = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    rows = data if isinstance(data, list) else data.get("results", [data])
    return float(next(r for r in rows if r["name"] == "hwlm")["output_tokens_per_s"])


for label, base, quant, target in (
    ("G1 fp8 vs bf16", "g1-bf16", "g1-fp8", 1.5),
    ("batch-1 decode int4 vs bf16", "decode-bf16", "decode-int4", 2.5),
):
    b, q = rate(base), rate(quant)
    if b is None or q is None:
        print(f"{label}: missing ({base}: {b}, {quant}: {q})")
    else:
        verdict = "met" if q / b >= target else "missed"
        print(f"{label}: {q:,.1f} / {b:,.1f} out tok/s = {q / b:.2f}x (target {target}x: {verdict})")
try:
    for r in json.loads((out / "quality.json").read_text()):
        print(f"quality {r['model']} {r['quantization']}: mean KL {r['mean_kl']:.5f} nats, "
              f"top-1 {100 * r['top1_agreement']:.1f}% over {r['tokens']} tokens")
except (OSError, ValueError):
    print("quality: missing")
PY
cat "$OUT/summary.txt"
if [[ -f $OUT/kernels.json ]]; then
    grep -A 40 "^layer" "$OUT/b-kernel-bench.log" >"$OUT/kernels.txt" 2>/dev/null
fi
echo "steps not passed: ${failed[*]:-none}; total $((SECONDS - start))s; results in $OUT"
