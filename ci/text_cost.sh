#!/usr/bin/env bash
# What text costs offline: each workload through LLM.generate (`hwlm bench throughput`) with text
# in every token and with --no-detokenize (token ids only), alternately in one run, then the
# engine core's host time per step early and late in long outputs (ci/step_host_time.py).
#   bash ci/text_cost.sh                         # the CPU: C1
#   DEVICE=cuda bash ci/text_cost.sh g3 g2 g1    # the GPU workloads
# REPEATS sets the timed runs per figure (median; default 3), STEP_TIME=0 skips the step-time
# run (about 8 minutes on a 2-core CPU), OUT the folder for results.
set -euo pipefail
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-/tmp}
REPEATS=${REPEATS:-3}
read -r -a hwlm <<<"${HWLM:-hwlm}"
workloads=("$@")
[[ ${#workloads[@]} -gt 0 ]] || workloads=(c1)
for w in "${workloads[@]}"; do
    for mode in text ids; do
        flag=()
        [[ $mode == ids ]] && flag=(--no-detokenize)
        "${hwlm[@]}" bench throughput --workload "$w" --device "$DEVICE" --repeats "$REPEATS" \
            "${flag[@]}" --output-json "$OUT/text-cost-$w-$mode.json" >"$OUT/text-cost-$w-$mode.log" 2>&1
    done
    python3 - "$OUT/text-cost-$w-text.json" "$OUT/text-cost-$w-ids.json" "$w" <<'PY'
import json, sys
text, ids = (json.load(open(p))["results"][0]["output_tokens_per_s"] for p in sys.argv[1:3])
print(f"== {sys.argv[3]}: text {text:,.0f} out tok/s, token ids only {ids:,.0f}: "
      f"{text / ids:.1%}")
PY
done
[[ ${STEP_TIME:-1} == 1 ]] || exit 0
if [[ $DEVICE == cpu ]]; then seqs=4; else seqs=8; fi  # qwen2.5-0.5b: 32k positions
python3 ci/step_host_time.py --model qwen2.5-0.5b --device "$DEVICE" --num-seqs "$seqs" \
    --output-json "$OUT/step-host-time.json"
