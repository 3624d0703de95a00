#!/usr/bin/env bash
# Serving workload S1: `hwlm serve` (the C1 model on the CPU by default; MODEL=qwen2.5-0.5b
# DEVICE=cuda for the GPU), `hwlm bench serve` with 200 streamed requests (Poisson arrivals at
# RATE req/s, then all at once for saturation, after the load generator's ceiling: the same
# workload against the stand-in server), and the offline figure for the same prompts
# (ci/s1_offline.py); prints the saturated run's share of the offline figure. HWLM overrides the
# command (e.g. "python3 -m hwlm.cli" in a checkout), CLIENT_PROCESSES the load generator's
# processes (default 1), OUT the folder for logs and results.
set -euo pipefail
PORT=${PORT:-8765}
MODEL=${MODEL:-c1-llama}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-/tmp}
read -r -a hwlm <<<"${HWLM:-hwlm}"
read -r -a serve_flags <<<"${SERVE_FLAGS:-}"
# TRACE=1: the engine core records its turns (hwlm/engine/turn_trace.py), summarised at the end.
[[ -n ${TRACE:-} ]] && export HWLM_ENGINE_TRACE="$OUT/s1-engine-trace.txt" && rm -f "$HWLM_ENGINE_TRACE"
"${hwlm[@]}" serve "$MODEL" "${serve_flags[@]}" --load-format dummy --device "$DEVICE" --max-model-len 1024 \
    --port "$PORT" >"$OUT/hwlm-s1-server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
for _ in $(seq 180); do
    curl -sf "http://localhost:$PORT/health" >/dev/null && break
    if ! kill -0 $server 2>/dev/null; then
        echo "hwlm serve exited; the end of $OUT/hwlm-s1-server.log:" >&2
        tail -n 5 "$OUT/hwlm-s1-server.log" >&2
        exit 1
    fi
    sleep 1
done
common=(--base-url "http://localhost:$PORT" --num-prompts 200 --input-len 64 --output-len 64
    --client-processes "${CLIENT_PROCESSES:-1}")
echo "== Poisson arrivals, ${RATE:-2} req/s"
"${hwlm[@]}" bench serve "${common[@]}" --request-rate "${RATE:-2}"
# Other prompts than the first run's (seed 1), or the prefix cache would serve their prefill.
echo "== saturation: all 200 at once"
# PROFILE=1: py-spy samples the engine core (hwlm::engine) through the saturated run.
if [[ -n ${PROFILE:-} ]]; then
    py-spy record --idle --nonblocking --rate 1000 --duration 12 --format raw \
        --output "$OUT/prof-s1-engine.txt" --pid "$(pgrep -f 'hwlm::engine' | head -1)" >/dev/null 2>&1 &
    spy=$!
fi
"${hwlm[@]}" bench serve "${common[@]}" --seed 1 --measure-ceiling \
    --result-filename "$OUT/s1-serve.json"
[[ -n ${TRACE:-} ]] && python3 ci/engine_trace.py "$HWLM_ENGINE_TRACE" | tail -n 12
[[ -n ${PROFILE:-} ]] && wait "$spy" && python3 ci/prof_summary.py "$OUT/prof-s1-engine.txt" engine
# The offline figure is measured with the server gone: an idle server still holds its processes'
# memory and threads, and on a GPU its share of the device.
kill -TERM $server 2>/dev/null
wait $server || true
trap - EXIT
echo "== offline, the saturation run's prompts"
python3 ci/s1_offline.py --model "$MODEL" --device "$DEVICE" --num-prompts 200 --input-len 64 \
    --output-len 64 --seed 1 --output-json "$OUT/s1-offline.json"

python3 - "$OUT/s1-offline.json" "$OUT/s1-serve.json" <<'PY'
import json, sys
offline = json.load(open(sys.argv[1]))["output_throughput"]
served = json.load(open(sys.argv[2]))
print(f"== S1: saturated serving {served['output_throughput']:,.1f} output tok/s, offline "
      f"{offline:,.1f}: {served['output_throughput'] / offline:.1%} of offline; load generator "
      f"ceiling {served['ceiling_output_throughput']:,.0f} tok/s")
PY
