"""Benchmark: what the journal costs.

10k no-op branches (each returns the sum of its dependencies' results) on the
layered DAG of `state_machine.py`, `max_workers=8`, on `run_tasks` and on
`run_tasks_async`, in one process run: without a journal, with
`Journal(durable=True)` (fsync per group commit, the default) and with
`Journal(durable=False)` (WAL, synced by the OS: survives a process crash, not a
power cut). Medians of 7 runs taken in turns, each in a fresh journal file.

Run: `.venv/bin/python benchmarks/journal.py [N]`.
"""

from __future__ import annotations

import asyncio
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


def timed(
    branches: list[kira.Branch], durable: bool | None, folder: Path, tag: str, runner: str
) -> float:
    journal = (
        None if durable is None else kira.Journal(folder / f"j{durable}{tag}.db", durable=durable)
    )
    gc.collect()
    start = time.perf_counter()
    if runner == "threads":
        results = kira.run_tasks(None, branches, max_workers=WORKERS, journal=journal)
    else:
        results = asyncio.run(
            kira.run_tasks_async(None, branches, max_workers=WORKERS, journal=journal)
        )
    elapsed = time.perf_counter() - start
    assert len(results) == len(branches)
    if journal is not None:
        journal.close()
    return elapsed


def _io_apply(config: object, deps: Any) -> int:
    time.sleep(0.005)  # a branch with real work: 5 ms of I/O
    return sum(deps.values()) + 1


MODES: tuple[tuple[str, bool | None], ...] = (
    ("no journal", None),
    ("durable=False", False),
    ("durable=True", True),
)


def measure(
    branches: list[kira.Branch], folder: Path, runner: str, repeats: int
) -> list[tuple[str, float]]:
    """Medians per mode; the modes take turns, so a slow spell of the machine
    weighs on all of them alike."""
    times: dict[str, list[float]] = {label: [] for label, _ in MODES}
    for i in range(repeats):
        for label, durable in MODES:
            times[label].append(timed(branches, durable, folder, f"{runner}{i}", runner))
    return [(label, statistics.median(times[label])) for label, _ in MODES]


def report(title: str, rows: list[tuple[str, float]], n: int) -> None:
    print(title)
    base = rows[0][1]
    for label, t in rows:
        print(f"  {label:<14} {t:8.3f} s  {n / t:10,.0f} branches/s  x{t / base:.2f}")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    graph = layered_graph(n)
    branches = [kira.Branch(name, _sum_apply, deps) for name, deps in graph.items()]
    io_graph = layered_graph(1_000)
    io_branches = [kira.Branch(name, _io_apply, deps) for name, deps in io_graph.items()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for runner in ("threads", "asyncio"):
            rows = measure(branches, folder, runner, 7)
            report(
                f"{runner}: {n} no-op branches, layered DAG, max_workers={WORKERS}; medians of 7",
                rows,
                n,
            )
        rows = measure(io_branches, folder, "threads", 3)
        report(
            f"threads: 1000 branches of 5 ms I/O each, layered DAG, max_workers={WORKERS}; "
            "medians of 3",
            rows,
            1000,
        )
    print("target: the journal costs <= 3x the in-memory run")


if __name__ == "__main__":
    main()
