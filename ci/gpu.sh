#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md in one go. The GPU machine (one H200) has
# torch, triton, transformers, aiohttp and pytest but no network: hwlm is installed from this
# checkout with the machine's own setuptools (no build isolation, which would download one), and
# the server's dependencies (fastapi, uvicorn, pydantic, pyzmq, msgspec, ...) come as wheels in
# .whl/ (`bash ci/gpu_wheels.sh` downloads them here first).
#
#   bash ci/gpu.sh check   # conformance suite (e2e + ops) and engine tests with --device cuda
#   bash ci/gpu.sh bench   # G3 (with transformers), G2, G1
#   bash ci/gpu.sh serve   # S1 and S2 through `hwlm serve`, with the load generator's ceiling
#   bash ci/gpu.sh prof    # whole-workload and decode-step profiles
#   bash ci/gpu.sh e2e g3  # any of: e2e engine ops g3 g2 g1 textcost s1 s2 profserve wl3 wl2
#                          # structured int4decode
#                          # profile3 profile; all
#
# REPEATS overrides the benchmarks' repeats, HF= drops G3's transformers baseline, OPS_LIMIT the
# op grid's time limit (seconds).
#
# Logs and the support-matrix column go to $OUT (default /tmp/hwlm-gpu).
set -u
OUT=${OUT:-/tmp/hwlm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=python3
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$py -m pip install -q --no-deps --no-build-isolation -e . || exit 1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "exit $? ($(date +%T))"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'

bench="hwlm --log-level info bench throughput --device cuda"
args=" $* "
run_if() { local name=$1; shift; [[ "$args" == *" $name "* || "$args" == *" all "* ||
    ("$args" == *" check "* && " e2e engine ops " == *" $name "*) ||
    ("$args" == *" bench "* && " g3 g2 g1 " == *" $name "*) ||
    ("$args" == *" serve "* && " s1 s2 " == *" $name "*) ||
    ("$args" == *" prof "* && " wl3 wl2 profile3 profile " == *" $name "*) ]] && step "$name" "$@"; }

# The op grid compiles a few hundred kernel variants: pytest-xdist's 16 workers compile them in
# parallel.
XDIST=""
$py -c "import xdist" 2>/dev/null && XDIST="-n 16"
cp docs/support-matrix.md "$OUT/support-matrix.md"
run_if e2e 240 $py -m pytest -q -x tests/conformance/test_e2e_greedy.py --device cuda
run_if engine 240 $py -m pytest -q tests/test_async_scheduling.py tests/test_decode_runner.py \
    --device cuda
run_if ops ${OPS_LIMIT:-480} $py -m pytest -q $XDIST tests/conformance/test_ops.py --device cuda \
    --support-matrix "$OUT/support-matrix.md"
run_if g3 300 $bench --workload g3 ${HF---compare-hf} --repeats ${REPEATS:-3} --output-json "$OUT/g3.json"
run_if textcost 590 env DEVICE=cuda OUT="$OUT" REPEATS=${REPEATS:-3} bash ci/text_cost.sh g3 g2 g1
run_if g2 150 $bench --workload g2 --repeats ${REPEATS:-3} --output-json "$OUT/g2.json"
run_if g1 150 $bench --workload g1 --repeats ${REPEATS:-2} --output-json "$OUT/g1.json"
run_if s1 200 env DEVICE=cuda MODEL=qwen2.5-0.5b RATE=20 CLIENT_PROCESSES=${CLIENT_PROCESSES:-2} OUT="$OUT" bash ci/s1.sh
run_if s2 300 env DEVICE=cuda OUT="$OUT" bash ci/s2.sh
run_if profserve 200 env DEVICE=cuda OUT="$OUT" PATH="/tmp/site/bin:$PATH" bash ci/profile_serve.sh
run_if profile 150 $py ci/profile_decode.py --model llama-3-8b --batch 256 --context 384
run_if profile3 120 $py ci/profile_decode.py --model qwen2.5-0.5b --batch 256 --context 600
run_if wl3 150 $py ci/profile_workload.py --workload g3 --runs 3
run_if wl2 200 $py ci/profile_workload.py --workload g2 --runs 2
# Structured outputs: G3 offline, unconstrained then with a JSON schema on every request, with
# the engine's step phases timed.
run_if structured 200 $py ci/profile_structured.py --device cuda
# Llama-3-8B batch-1 decode with int4 (W4A16) weights: where a step's time goes.
run_if int4decode 150 $py ci/profile_decode.py --model llama-3-8b --batch 1 --context 64 \
    --steps 30 --quantization int4 --modes graphs
