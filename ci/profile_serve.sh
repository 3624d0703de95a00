#!/usr/bin/env bash
# Where the server's time goes: S2's workload (ci/s2.sh) through `hwlm serve`, with py-spy
# sampling the API process and the engine-core process (hwlm::engine) for DURATION seconds
# mid-run. Prints each process's busiest functions (self and inclusive share of samples,
# idle waits excluded) and leaves the collapsed stacks in $OUT/prof-{api,engine}.txt.
#   DEVICE=cuda bash ci/profile_serve.sh     # the G3 workload on a GPU; C1 on the CPU
# WORKLOAD picks another workload, MODEL_OVERRIDE another model for its prompts (say hwlm-tiny
# with SERVE_FLAGS="--tokenizer DIR": the API process's share on a small machine), NUM_PROMPTS
# lengthens the run (default: 4x the workload's), SERVE_FLAGS adds server flags.
set -euo pipefail
PORT=${PORT:-8767}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-/tmp}
DURATION=${DURATION:-3}
read -r -a hwlm <<<"${HWLM:-hwlm}"
read -r -a serve_flags <<<"${SERVE_FLAGS:-}"
if [[ $DEVICE == cpu ]]; then workload=c1 cp=1; else workload=g3 cp=4; fi
read -r MODEL N IN_MIN IN_MAX OUT_LEN < <(python3 -c "
from hwlm.bench.throughput import WORKLOADS
w = WORKLOADS['${WORKLOAD:-$workload}']
print(w['model'], w['num_prompts'], w['input_len_min'], w['input_len_max'], w['output_len'])")
MODEL=${MODEL_OVERRIDE:-$MODEL}
"${hwlm[@]}" serve "$MODEL" "${serve_flags[@]}" --load-format dummy --device "$DEVICE" \
    --port "$PORT" --max-model-len $((IN_MAX + OUT_LEN + 1)) --max-num-seqs 256 \
    >"$OUT/hwlm-profile-server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
for _ in $(seq 300); do
    curl -sf "http://localhost:$PORT/health" >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -n 5 "$OUT/hwlm-profile-server.log" >&2; exit 1; }
    sleep 1
done
engine=$(pgrep -P "$server" -f 'hwlm::engine' || true)
"${hwlm[@]}" bench serve --base-url "http://localhost:$PORT" --num-prompts "${NUM_PROMPTS:-$((4 * N))}" \
    --dataset-name random --random-input-range "$IN_MIN" "$IN_MAX" --random-output-len "$OUT_LEN" \
    --client-processes "$cp" --seed 2 >"$OUT/hwlm-profile-bench.log" 2>&1 &
bench=$!
# Sample mid-run: wait until the engine reports running requests (the load generator first
# builds its prompts and starts its processes), then DELAY more seconds.
for _ in $(seq 600); do
    curl -s "http://localhost:$PORT/metrics" | grep -qE '^hwlm:num_requests_running\{[^}]*\} [1-9]' && break
    sleep 0.1
done
sleep "${DELAY:-1}"
api=$server
# With --api-server-count N the server process supervises: profile its first API process.
api_child=$(pgrep -P "$server" -f 'hwlm::api0' || true)
[[ -n $api_child ]] && api=$api_child
pids=("api:$api")
[[ -n $engine ]] && pids+=("engine:$engine")
for entry in "${pids[@]}"; do
    py-spy record --idle --nonblocking --rate 250 --duration "$DURATION" --format raw \
        --output "$OUT/prof-${entry%%:*}.txt" --pid "${entry#*:}" >/dev/null 2>&1 &
done
wait "$bench"
grep -E "output_throughput|median_itl|median_ttft" "$OUT/hwlm-profile-bench.log" || true
for entry in "${pids[@]}"; do
    python3 ci/prof_summary.py "$OUT/prof-${entry%%:*}.txt" "${entry%%:*}"
done
