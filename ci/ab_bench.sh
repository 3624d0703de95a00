#!/usr/bin/env bash
# Two snapshots of hwlm side by side on one machine: each benchmark runs from tree A, then from
# tree B (each a `git archive` tar), alternating, with the same arguments; prints each run's
# output tok/s. Used for no-regression checks (say, before and after a change to the engine).
#   bash ci/ab_bench.sh A.tar B.tar "--workload g3 --device cuda" "--workload g1 --device cuda"
# OUT holds the logs and JSON results; ROUNDS repeats the alternation (default 1).
set -u
a_tar=$1 b_tar=$2
shift 2
OUT=${OUT:-/tmp/ab}
mkdir -p "$OUT" /tmp/ab-a /tmp/ab-b
tar -xf "$a_tar" -C /tmp/ab-a && tar -xf "$b_tar" -C /tmp/ab-b || exit 1
for round in $(seq "${ROUNDS:-1}"); do
    k=0
    for bench_args in "$@"; do
        k=$((k + 1))
        for side in a b; do
            read -r -a args <<<"$bench_args"
            log="$OUT/ab-$k-$side-$round"
            # The side's own editable install: its package maps hwlm.backends and hwlm.kernels
            # onto its tree (a PYTHONPATH entry alone would mix the two trees).
            python3 -m pip install -q --no-deps --no-build-isolation -e "/tmp/ab-$side" \
                >"$log.install.log" 2>&1 || echo "install of $side failed"
            (cd "/tmp/ab-$side" && PYTHONPATH="/tmp/ab-$side${PYTHONPATH:+:$PYTHONPATH}" \
                timeout "${LIMIT:-300}" python3 -m hwlm.cli bench throughput "${args[@]}" \
                --output-json "$log.json" >"$log.log" 2>&1)
            rate=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); rows=d if isinstance(d,list) else d.get('results',[d]); print(round(next(r for r in rows if r['name']=='hwlm')['output_tokens_per_s'],1))" "$log.json" 2>/dev/null || echo failed)
            echo "round $round [$bench_args] $side: $rate output tok/s"
        done
    done
done
