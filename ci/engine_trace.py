"""Summarise an engine-core turn trace (``HWLM_ENGINE_TRACE``, hwlm/engine/turn_trace.py): for
each busy period (turns from an add until the engine is idle again), when requests arrived at
the engine, how many turns and how long they took, and the time the engine waited between turns.

    python ci/engine_trace.py TRACE.txt
"""

import sys


def periods(rows: list[tuple[float, float, int, int, int, int]]) -> list[list[tuple]]:
    out: list[list[tuple]] = []
    current: list[tuple] = []
    for row in rows:
        current.append(row)
        if row[4] == 0 and row[5] == 0:  # nothing running or waiting: idle again
            if any(r[2] for r in current):
                out.append(current)
            current = []
    if any(r[2] for r in current):
        out.append(current)
    return out


def main(path: str) -> None:
    rows = []
    applied_at: dict[float, float] = {}
    for line in open(path):
        a, applied, b, adds, aborts, running, waiting = line.split()
        rows.append((float(a), float(b), int(adds), int(aborts), int(running), int(waiting)))
        applied_at[float(a)] = float(applied)
    for k, turns in enumerate(periods(rows)):
        t0 = turns[0][0]
        adds = [(r[0] - t0, r[2]) for r in turns if r[2]]
        busy = sum(r[1] - r[0] for r in turns)
        span = turns[-1][1] - t0
        last_add = adds[-1][0]
        total = sum(n for _, n in adds)
        steps = [r for r in turns if r[4] or r[5]]
        print(
            f"== period {k}: {total} requests added in {len(adds)} turns over "
            f"{1e3 * last_add:.1f} ms; {len(turns)} turns, {1e3 * span:.1f} ms in all, "
            f"engine busy {1e3 * busy:.1f} ms ({busy / span:.0%}); "
            f"mean turn {1e3 * busy / max(len(steps), 1):.2f} ms"
        )
        half = [n for t, n in adds if t <= last_add / 2]
        print(f"   requests in the first half of the arrival spread: {sum(half)}")
        print(
            f"   peak running {max(r[4] for r in turns)}, peak waiting {max(r[5] for r in turns)}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
