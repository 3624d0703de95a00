#!/usr/bin/env bash
# Serving workload S2: the same token-id prompts through `hwlm serve` at full concurrency and
# through LLM.generate (`hwlm bench throughput`), in one run; prints both figures, their ratio
# and the load generator's ceiling (the same workload against the stand-in server first).
#   CPU (default): the C1 workload (c1-llama: 32 prompts, input uniform in [32, 256], 64 out).
#   DEVICE=cuda:   the G3 workload (qwen2.5-0.5b: 256 prompts, input uniform in [100, 1024],
#                  256 out).
# Greedy, EOS ignored, dummy weights (no download). WORKLOAD picks another named workload,
# CLIENT_PROCESSES the load generator's processes (default: 4 on a GPU, 1 on the CPU), HWLM the
# command (e.g. "python3 -m hwlm.cli" in a checkout), OUT the folder for logs and results.
set -euo pipefail
PORT=${PORT:-8766}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-/tmp}
read -r -a hwlm <<<"${HWLM:-hwlm}"
if [[ $DEVICE == cpu ]]; then default_workload=c1 default_cp=1; else default_workload=g3 default_cp=4; fi
WORKLOAD=${WORKLOAD:-$default_workload}
CP=${CLIENT_PROCESSES:-$default_cp}
read -r MODEL N IN_MIN IN_MAX OUT_LEN < <(python3 -c "
from hwlm.bench.throughput import WORKLOADS
w = WORKLOADS['$WORKLOAD']
print(w['model'], w['num_prompts'], w['input_len_min'], w['input_len_max'], w['output_len'])")

echo "== offline: hwlm bench throughput --workload $WORKLOAD (LLM.generate, median of 3)"
"${hwlm[@]}" bench throughput --workload "$WORKLOAD" --device "$DEVICE" --repeats 3 \
    --output-json "$OUT/s2-offline.json"

echo "== served: hwlm serve $MODEL, $N streams at once, $CP client process(es)"
read -r -a serve_flags <<<"${SERVE_FLAGS:-}"
"${hwlm[@]}" serve "$MODEL" "${serve_flags[@]}" --load-format dummy --device "$DEVICE" --port "$PORT" \
    --max-model-len $((IN_MAX + OUT_LEN + 1)) --max-num-seqs 256 >"$OUT/hwlm-s2-server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT
for _ in $(seq 300); do
    curl -sf "http://localhost:$PORT/health" >/dev/null && break
    if ! kill -0 $server 2>/dev/null; then
        echo "hwlm serve exited; the end of $OUT/hwlm-s2-server.log:" >&2
        tail -n 5 "$OUT/hwlm-s2-server.log" >&2
        exit 1
    fi
    sleep 1
done
# The offline prompts: token ids of hwlm bench throughput's recipe, the same seed (0).
workload=(--base-url "http://localhost:$PORT" --num-prompts "$N" --dataset-name random
    --random-input-range "$IN_MIN" "$IN_MAX" --random-output-len "$OUT_LEN"
    --client-processes "$CP")
# Warm-up with other prompts (seed 1), so that the server's first batch shapes are not timed
# and the prefix cache holds nothing of the measured prompts.
"${hwlm[@]}" bench serve "${workload[@]}" --seed 1 >"$OUT/hwlm-s2-warmup.log"
"${hwlm[@]}" bench serve "${workload[@]}" --seed 0 --measure-ceiling \
    --result-filename "$OUT/s2-serve.json"

python3 - "$OUT/s2-offline.json" "$OUT/s2-serve.json" <<'PY'
import json, sys
offline = json.load(open(sys.argv[1]))["results"][0]["output_tokens_per_s"]
served = json.load(open(sys.argv[2]))
print(f"== S2: served {served['output_throughput']:,.0f} output tok/s, offline {offline:,.0f}: "
      f"{served['output_throughput'] / offline:.1%} of offline; load generator ceiling "
      f"{served['ceiling_output_throughput']:,.0f} tok/s")
PY
