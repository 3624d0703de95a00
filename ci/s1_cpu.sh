#!/usr/bin/env bash
# Serving workload S1 on the CPU: `hwlm serve` with the C1 model, `hwlm bench serve` with 200
# streamed requests (Poisson arrivals at a fixed rate, then all at once for saturation), and
# the offline figure for the same prompts (ci/s1_offline.py).
set -euo pipefail
PORT=${PORT:-8765}
hwlm serve c1-llama --load-format dummy --device cpu --max-model-len 1024 --port "$PORT" \
    >/tmp/hwlm-s1-server.log 2>&1 &
server=$!
trap 'kill -TERM $server; wait $server' EXIT
for _ in $(seq 120); do curl -sf "http://localhost:$PORT/health" >/dev/null && break; sleep 1; done
common=(--base-url "http://localhost:$PORT" --num-prompts 200 --input-len 64 --output-len 64)
echo "== Poisson arrivals, ${RATE:-2} req/s"
hwlm bench serve "${common[@]}" --request-rate "${RATE:-2}"
# Other prompts than the first run's (seed 1), or the prefix cache would serve their prefill.
echo "== saturation: all 200 at once"
hwlm bench serve "${common[@]}" --seed 1
echo "== offline, the saturation run's prompts"
python ci/s1_offline.py --num-prompts 200 --input-len 64 --output-len 64 --seed 1
