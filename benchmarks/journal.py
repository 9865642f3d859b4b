"""Benchmark: what the journal costs.

10k no-op branches (each returns the sum of its dependencies' results) on the
layered DAG of `state_machine.py`, `run_tasks(max_workers=8)`, in one process run:
without a journal, with `Journal(durable=True)` (fsync per group commit, the
default) and with `Journal(durable=False)` (WAL, synced by the OS: survives a
process crash, not a power cut). Medians of 5 runs, each in a fresh journal file.

Run: `.venv/bin/python benchmarks/journal.py [N]`.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import kira
from state_machine import layered_graph

WORKERS = 8


def _sum_apply(config: object, deps: Any) -> int:
    return sum(deps.values()) + 1


def timed(branches: list[kira.Branch], durable: bool | None, folder: Path, i: int) -> float:
    journal = (
        None if durable is None else kira.Journal(folder / f"j{durable}{i}.db", durable=durable)
    )
    gc.collect()
    start = time.perf_counter()
    results = kira.run_tasks(None, branches, max_workers=WORKERS, journal=journal)
    elapsed = time.perf_counter() - start
    assert len(results) == len(branches)
    if journal is not None:
        journal.close()
    return elapsed


def _io_apply(config: object, deps: Any) -> int:
    time.sleep(0.005)  # a branch with real work: 5 ms of I/O
    return sum(deps.values()) + 1


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    graph = layered_graph(n)
    branches = [kira.Branch(name, _sum_apply, deps) for name, deps in graph.items()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for label, durable in (
            ("no journal", None),
            ("durable=False", False),
            ("durable=True", True),
        ):
            times = [timed(branches, durable, folder, i) for i in range(5)]
            rows.append((label, statistics.median(times)))
        io_graph = layered_graph(1_000)
        io_branches = [kira.Branch(name, _io_apply, deps) for name, deps in io_graph.items()]
        io_rows = []
        for label, durable in (
            ("no journal", None),
            ("durable=False", False),
            ("durable=True", True),
        ):
            times = [timed(io_branches, durable, folder, 10 + i) for i in range(3)]
            io_rows.append((label, statistics.median(times)))
    base = rows[0][1]
    print(f"{n} no-op branches, layered DAG, max_workers={WORKERS}; medians of 5")
    for label, t in rows:
        print(f"  {label:<14} {t:8.3f} s  {n / t:10,.0f} branches/s  x{t / base:.2f}")
    base = io_rows[0][1]
    print(f"1000 branches of 5 ms I/O each, layered DAG, max_workers={WORKERS}; medians of 3")
    for label, t in io_rows:
        print(f"  {label:<14} {t:8.3f} s  {1000 / t:10,.0f} branches/s  x{t / base:.2f}")
    print("target: the journal costs <= 3x the in-memory run")


if __name__ == "__main__":
    main()
