#!/usr/bin/env bash
# CPU quantization speed: C1 (as `hwlm bench throughput --workload c1`: 32 prompts, 64 output tokens)
# and single-stream decode (1 prompt of 32 tokens, 128 output tokens), each with float32, int8
# and int4 weights, alternating, ROUNDS times (default 2); then the median of each. The
# quantized graphs are cached (HWLM_QUANT_CACHE), so only the first round quantizes; loading is
# not timed either way. HWLM overrides the command (e.g. "python3 -m hwlm.cli" in a checkout),
# OUT the folder for the JSON results, MODEL the C1-shaped model (default: the c1-llama preset
# with random weights). PEER=1 adds llama.cpp's side to every round, alternating with hwlm's
# (../shared/peers/llamacpp/run.sh after its setup: `single`, and `serve-bench` at f32 and
# Q4_0, the C1 batch end to end through llama-server). KV="auto bfloat16" runs every hwlm
# measurement once per KV-cache dtype listed (default: auto), alternating.
set -euo pipefail
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
read -r -a hwlm <<<"${HWLM:-hwlm}"
MODEL=${MODEL:-c1-llama}
PEER_RUN=$(cd "$(dirname "$0")/.." && pwd)/../shared/peers/llamacpp/run.sh
c1=(--model "$MODEL" --num-prompts 32 --input-len-min 32 --input-len-max 256 --output-len 64)
single=(--model "$MODEL" --num-prompts 1 --input-len-min 32 --input-len-max 32 --output-len 128)
read -r -a kv_dtypes <<<"${KV:-auto}"
for round in $(seq "$ROUNDS"); do
    for q in float32 int8 int4; do
        for kv in "${kv_dtypes[@]}"; do
            flags=(--kv-cache-dtype "$kv")
            [ "$q" = float32 ] || flags+=(--quantization "$q")
            name=$q
            [ "$kv" = auto ] || name=$q-kv$kv
            "${hwlm[@]}" bench throughput "${c1[@]}" "${flags[@]}" \
                --output-json "$OUT/c1-$name-$round.json" >"$OUT/c1-$name-$round.log" 2>&1
            "${hwlm[@]}" bench throughput "${single[@]}" "${flags[@]}" \
                --output-json "$OUT/single-$name-$round.json" >"$OUT/single-$name-$round.log" 2>&1
        done
        echo "round $round $q done" >&2
    done
    if [[ -n ${PEER:-} ]]; then
        bash "$PEER_RUN" single >"$OUT/peer-single-$round.log" 2>&1 || echo "peer single failed" >&2
        for p in f32 Q4_0; do
            bash "$PEER_RUN" serve-bench "$p" >"$OUT/peer-c1-$p-$round.log" 2>&1 ||
                echo "peer serve-bench $p failed" >&2
        done
        echo "round $round llama.cpp done" >&2
    fi
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
def rate(path: Path) -> float:
    data = json.loads(path.read_text())
    rows = data if isinstance(data, list) else data.get("results", [data])
    return float(next(r for r in rows if r["name"] == "hwlm")["output_tokens_per_s"])

print(f"{'workload':10} {'weights':18} {'median tok/s':>13} {'x float32':>10}  runs")
for work in ("c1", "single"):
    base = None
    names = sorted({p.name.split("-", 1)[1].rsplit("-", 1)[0] for p in out.glob(f"{work}-*.json")})
    for q in sorted(names, key=lambda n: (n.split("-")[0] != "float32", n)):
        runs = [rate(p) for p in sorted(out.glob(f"{work}-{q}-[0-9]*.json"))]
        med = statistics.median(runs)
        base = base or med
        listed = " ".join(f"{r:.1f}" for r in runs)
        print(f"{work:10} {q:18} {med:13.1f} {med / base:10.2f}  {listed}")
for log in sorted(out.glob("peer-*.log")):
    lines = [line.strip() for line in log.read_text().splitlines() if "tok/s" in line or "wall" in line]
    print(f"{log.stem}: " + " | ".join(lines[-3:]))
print(f"results and logs: {out}")
PY
