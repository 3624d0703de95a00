#!/usr/bin/env bash
# The fp8 KV cache (kv_cache_dtype="fp8") on one GPU, in one go (about 5 minutes on an H200):
#   1. ops:     its conformance cases on cuda (write_kv bit for bit, attention against float64 over
#               the same fp8 cache and over the unquantized one), all shapes; support-matrix column
#   2. e2e:     greedy decoding over an fp8 cache (CUDA graphs included) = the reference backend's
#   3. g2-auto, g2-fp8: G2 (Qwen3-0.6B shape, 256 requests, contexts up to 2k) with the bf16 cache
#               and with the fp8 cache, one after the other in this run (target: fp8 >= 1.3x)
#   4. quality: KL divergence and top-1 agreement of fp8 KV against bf16 KV (Qwen2.5-0.5B shape)
#
#   bash ci/gpu_kvfp8.sh            # everything
#   bash ci/gpu_kvfp8.sh g2-auto g2-fp8   # some steps
#
# Machine set-up as ci/gpu.sh (hwlm installed from this checkout without build isolation, the
# server's wheels from .whl/ if present). Each step has its own time limit, and all of them share
# TOTAL_S (default 340 s): a step gets what is left. A failed or timed-out step is reported and
# the next one still runs. REPEATS sets G2's timed runs per cache dtype (default 2).
# Results in $OUT (default /tmp/hwlm-kvfp8): NAME.log per step, g2-auto.json, g2-fp8.json,
# quality.json, support-matrix.md, and summary.txt (one line per step, then the G2 ratio).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hwlm-kvfp8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=python3
start=$SECONDS
total=${TOTAL_S:-340}
summary="$OUT/summary.txt"
: >"$summary"
rm -f "$OUT"/g2-auto.json "$OUT"/g2-fp8.json "$OUT"/quality.json  # no stale figures

if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! timeout 120 $py -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "install: FAILED (see $OUT/install.log)" | tee -a "$summary"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

args=" $* "
wanted() { [[ "$args" == "  " || "$args" == *" $1 "* ]]; }

step() {  # step NAME SECONDS COMMAND...: run under min(SECONDS, what is left of TOTAL_S)
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local left=$((total - (SECONDS - start)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: SKIPPED (the ${total} s budget is spent)" | tee -a "$summary"
        return 0
    fi
    echo "=== $name (limit ${limit} s, $(date +%T))"
    local t0=$SECONDS rc
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local status="ok"
    ((rc == 124)) && status="TIMED OUT"
    ((rc != 0 && rc != 124)) && status="FAILED (exit $rc)"
    echo "$name: $status in $((SECONDS - t0)) s" | tee -a "$summary"
    tail -n 8 "$OUT/$name.log"
}

XDIST=""
$py -c "import xdist" 2>/dev/null && XDIST="-n 16"
[[ -f "$OUT/support-matrix.md" ]] || cp docs/support-matrix.md "$OUT/support-matrix.md"
bench=(hwlm --log-level info bench throughput --workload g2 --device cuda --repeats "${REPEATS:-2}")

step ops 80 $py -m pytest -q $XDIST tests/conformance/test_ops_kv_fp8.py --device cuda \
    --support-matrix "$OUT/support-matrix.md"
step g2-auto 100 "${bench[@]}" --kv-cache-dtype auto --output-json "$OUT/g2-auto.json"
step g2-fp8 100 "${bench[@]}" --kv-cache-dtype fp8 --output-json "$OUT/g2-fp8.json"
step e2e 50 $py -m pytest -q tests/conformance/test_e2e_greedy.py -k fp8 --device cuda
step quality 40 $py -m hwlm.bench.kv_quality --model qwen2.5-0.5b --device cuda \
    --dtype bfloat16 --num-tokens 1024 --output-json "$OUT/quality.json"

$py - "$OUT" <<'PY' | tee -a "$summary"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rates = {}
for kind in ("auto", "fp8"):
    try:
        rates[kind] = json.loads((out / f"g2-{kind}.json").read_text())["results"][0][
            "output_tokens_per_s"
        ]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        print(f"G2 {kind}: no result ({exc.__class__.__name__})")
if len(rates) == 2:
    ratio = rates["fp8"] / rates["auto"]
    verdict = "met" if ratio >= 1.3 else "missed"
    print(f"G2 out tok/s: bf16 KV {rates['auto']:,.0f}, fp8 KV {rates['fp8']:,.0f}: "
          f"{ratio:.2f}x (target 1.3x: {verdict})")
try:
    for r in json.loads((out / "quality.json").read_text()):
        print(f"quality {r['model']} {r['quantization']}: mean KL {r['mean_kl']:.5f} nats, "
              f"top-1 {100 * r['top1_agreement']:.1f}% over {r['tokens']} tokens")
except (OSError, ValueError, KeyError) as exc:
    print(f"quality: no result ({exc.__class__.__name__})")
PY
echo "total $((SECONDS - start)) s; results in $OUT"
