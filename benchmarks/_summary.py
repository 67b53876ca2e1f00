"""One summary table for all benchmarks (issue 9): each script, besides its own table, records
its headline figures with :func:`record`; ``benchmarks/run_all.sh`` sets ``DISTILL_BENCH_SUMMARY``
to a file, collects the rows and prints them as one table at the end (:func:`print_table`).

A row: figure (what is measured), engine (our number, with units), peer (the baseline or peer
and its number), ratio (engine / peer, oriented so that > 1 is better unless the goal says ≤),
goal (as the issue states it), met (True / False / None when the goal does not apply).
Without ``DISTILL_BENCH_SUMMARY`` :func:`record` does nothing, so every script still runs alone.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["record", "print_table"]


def record(figure: str, engine: str, peer: str, ratio: float | None, goal: str, met: bool | None) -> None:
    path = os.environ.get("DISTILL_BENCH_SUMMARY")
    if not path:
        return
    row = {"figure": figure, "engine": engine, "peer": peer,
           "ratio": None if ratio is None else round(float(ratio), 3), "goal": goal, "met": met}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def print_table(path: str) -> None:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    headers = ("figure", "engine", "peer / baseline", "ratio", "goal", "met")
    cells = [(r["figure"], r["engine"], r["peer"], "" if r["ratio"] is None else f"{r['ratio']:.2f}x",
              r["goal"], {True: "yes", False: "NO", None: "-"}[r["met"]]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


if __name__ == "__main__":
    print_table(sys.argv[1])
