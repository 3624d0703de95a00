#!/usr/bin/env bash
# Tensor- and data-parallel runs on one host with several GPUs (nvidia-h200-x2 / -x4), in one go:
#   correctness  the conformance end-to-end tests split over 2 GPUs (the same tokens and
#                tolerances as one), and an NCCL all-reduce replayed from a CUDA graph
#   decode       decode-step time at batch 256, Llama-3-8B shape, TP=1, 2 (and 4 with 4 GPUs)
#   g1           G1 (1000 x 256/256, Llama-3-8B shape) at the same sizes: output tok/s and req/s
#   70b          the Llama-3-70B shape (dummy weights) at TP=2 (and 4): G1's prompts, 300 of them
#   dp           S2 (the G3 workload through hwlm serve) with --data-parallel-size 2 against 1
#
#   bash ci/gpu_multi.sh                 # everything
#   bash ci/gpu_multi.sh decode g1       # some steps
# Each step has a time limit; logs and JSON go to $OUT (default /tmp/hwlm-gpu-multi). NCCL's
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the device notes require.
set -u
OUT=${OUT:-/tmp/hwlm-gpu-multi}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
py=python3
if ls .whl/*.whl >/dev/null 2>&1; then  # the server's dependencies, as ci/gpu.sh
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$py -m pip install -q --no-deps --no-build-isolation -e . || exit 1
gpus=$(nvidia-smi --list-gpus | wc -l)
sizes="1 2"
[[ $gpus -ge 4 ]] && sizes="1 2 4"
echo "$gpus GPUs; tensor-parallel sizes: $sizes"
steps=" ${*:-correctness decode g1 70b dp} "
mkdir -p "$OUT/dp1" "$OUT/dp2"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ "$steps" == *" ${name%%-*} "* ]] || return 0
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "exit $? ($(date +%T))"
    grep -E "^==|passed|failed|output tok/s|req/s|Error" "$OUT/$name.log" | tail -n 8
}

step correctness 600 $py -m pytest -q tests/conformance/test_e2e_greedy.py tests/test_collective_capture.py \
    --device cuda --tensor-parallel-size 2
for tp in $sizes; do
    step decode-tp$tp 300 $py ci/tp_decode_step.py --model llama-3-8b --tensor-parallel-size "$tp"
done
for tp in $sizes; do
    step g1-tp$tp 400 hwlm bench throughput --workload g1 --device cuda --repeats 1 \
        --tensor-parallel-size "$tp" --output-json "$OUT/g1-tp$tp.json"
done
for tp in ${sizes#1 }; do
    step 70b-tp$tp 600 hwlm bench throughput --workload g1 --model llama-3-70b --num-prompts 300 \
        --device cuda --repeats 1 --tensor-parallel-size "$tp" --output-json "$OUT/70b-tp$tp.json"
done
step dp-1 400 env DEVICE=cuda OUT="$OUT/dp1" SERVE_FLAGS="--api-server-count 4" bash ci/s2.sh
step dp-2 400 env DEVICE=cuda OUT="$OUT/dp2" SERVE_FLAGS="--api-server-count 4 --data-parallel-size 2" \
    bash ci/s2.sh
