#!/usr/bin/env bash
# Serving workload S1: `hwlm serve` (the C1 model on the CPU by default; MODEL=qwen2.5-0.5b
# DEVICE=cuda for the GPU), `hwlm bench serve` with 200 streamed requests (Poisson arrivals at
# RATE req/s, then all at once for saturation), and the offline figure for the same prompts
# (ci/s1_offline.py). HWLM overrides the command (e.g. "python3 -m hwlm.cli" in a checkout).
set -euo pipefail
PORT=${PORT:-8765}
MODEL=${MODEL:-c1-llama}
DEVICE=${DEVICE:-cpu}
read -r -a hwlm <<<"${HWLM:-hwlm}"
"${hwlm[@]}" serve "$MODEL" --load-format dummy --device "$DEVICE" --max-model-len 1024 \
    --port "$PORT" >"${OUT:-/tmp}/hwlm-s1-server.log" 2>&1 &
server=$!
trap 'kill -TERM $server; wait $server' EXIT
for _ in $(seq 180); do curl -sf "http://localhost:$PORT/health" >/dev/null && break; sleep 1; done
common=(--base-url "http://localhost:$PORT" --num-prompts 200 --input-len 64 --output-len 64)
echo "== Poisson arrivals, ${RATE:-2} req/s"
"${hwlm[@]}" bench serve "${common[@]}" --request-rate "${RATE:-2}"
# Other prompts than the first run's (seed 1), or the prefix cache would serve their prefill.
echo "== saturation: all 200 at once"
"${hwlm[@]}" bench serve "${common[@]}" --seed 1
echo "== offline, the saturation run's prompts"
python3 ci/s1_offline.py --model "$MODEL" --device "$DEVICE" --num-prompts 200 --input-len 64 \
    --output-len 64 --seed 1
