#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md in one go (the H100 device machine has
# torch, triton, transformers and pytest but no network; hwlm runs from this source checkout).
#
#   bash ci/gpu_h100.sh check   # conformance suite (e2e + ops) and engine tests with --device cuda
#   bash ci/gpu_h100.sh bench   # G3 (with transformers), G2, G1
#   bash ci/gpu_h100.sh prof    # whole-workload and decode-step profiles
#   bash ci/gpu_h100.sh e2e g3  # any of: e2e engine ops g3 g2 g1 wl3 wl2 profile3 profile; or all
#
# Logs and the support-matrix column go to $OUT (default /tmp/hwlm-gpu).
set -u
OUT=${OUT:-/tmp/hwlm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=python3

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

bench="$py -m hwlm.cli --log-level info bench throughput --device cuda"
args=" $* "
run_if() { local name=$1; shift; [[ "$args" == *" $name "* || "$args" == *" all "* ||
    ("$args" == *" check "* && " e2e engine ops " == *" $name "*) ||
    ("$args" == *" bench "* && " g3 g2 g1 " == *" $name "*) ||
    ("$args" == *" prof "* && " wl3 wl2 profile3 profile " == *" $name "*) ]] && step "$name" "$@"; }

# The op grid compiles a few hundred kernel variants: with pytest-xdist (its wheels carried in
# .whl/, the machine has no network) 16 workers compile them in parallel.
XDIST=""
if ls .whl/pytest_xdist-*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-deps .whl/*.whl && XDIST="-n 16"
fi
cp docs/support-matrix.md "$OUT/support-matrix.md"
run_if e2e 240 $py -m pytest -q -x tests/conformance/test_e2e_greedy.py --device cuda
run_if engine 240 $py -m pytest -q tests/test_async_scheduling.py tests/test_decode_runner.py \
    --device cuda
run_if ops 480 $py -m pytest -q $XDIST tests/conformance/test_ops.py --device cuda \
    --support-matrix "$OUT/support-matrix.md"
run_if g3 300 $bench --workload g3 --compare-hf --repeats 3 --output-json "$OUT/g3.json"
run_if g2 150 $bench --workload g2 --repeats 3 --output-json "$OUT/g2.json"
run_if g1 150 $bench --workload g1 --repeats 2 --output-json "$OUT/g1.json"
run_if profile 150 $py ci/profile_decode.py --model llama-3-8b --batch 256 --context 384
run_if profile3 120 $py ci/profile_decode.py --model qwen2.5-0.5b --batch 256 --context 600
run_if wl3 150 $py ci/profile_workload.py --workload g3 --runs 3
run_if wl2 200 $py ci/profile_workload.py --workload g2 --runs 2
