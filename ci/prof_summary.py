"""Summarise a py-spy raw profile (collapsed stacks): each frame's share of the samples, as the
leaf (self) and anywhere on the stack (inclusive), with waits counted apart.

    python ci/prof_summary.py PROFILE.txt NAME
"""

import collections
import sys


def main(path: str, name: str) -> None:
    # A leaf in one of these is a wait (uvloop's own loop is C: its waits show as Runner.run).
    idle = {
        "poll",
        "select",
        "epoll",
        "wait",
        "run",
        "run_until_complete",
        "_run_once",
        "acquire",
        "sleep",
        "recv",
    }
    self_t, incl, total, busy = collections.Counter(), collections.Counter(), 0, 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        leaf = frames[-1]
        if leaf.split(" (")[0].split(".")[-1] in idle:
            continue
        busy += n
        self_t[leaf] += n
        for frame in set(frames[1:]):
            incl[frame] += n
    print(f"== {name}: {total} samples, {busy / max(total, 1):.0%} busy (not waiting)")
    print("   self:")
    for frame, n in self_t.most_common(15):
        print(f"   {n / total:6.1%}  {frame[:150]}")
    print("   inclusive:")
    for frame, n in incl.most_common(40):
        print(f"   {n / total:6.1%}  {frame[:150]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
