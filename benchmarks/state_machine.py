"""Benchmark: the state machine and its driver against graphlib's own loop.

Builds a layered random DAG (width ~ sqrt(N), each branch depending on 1 to 3
branches of the previous layer, fixed seed) of 10k and 100k branches and times,
in one process run:

- graphlib: `TopologicalSorter(graph)`, `prepare()`, `get_ready()`/`done()` loop;
- apply: `RuntimeState.create` + `kira.testing.run_reference` applying every branch;
- rollback: the same, with the last branch failing, so every other branch is
  unapplied.

Each figure is the median of several repeats. Memory is tracemalloc's peak while
building and running the apply-only case, per branch, including the branch
definitions. Run: `.venv/bin/python benchmarks/state_machine.py [--quick]`.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from graphlib import TopologicalSorter

import kira
from kira.testing import run_reference

SEED = 20261203


def layered_graph(n: int, seed: int = SEED) -> dict[str, list[str]]:
    """name -> dependencies, in definition order (layer by layer)."""
    rng = random.Random(seed)
    width = max(1, round(n**0.5))
    graph: dict[str, list[str]] = {}
    previous: list[str] = []
    i = 0
    while i < n:
        layer = []
        for _ in range(min(width, n - i)):
            name = f"b{i}"
            deps = rng.sample(previous, k=min(len(previous), rng.randint(1, 3))) if previous else []
            graph[name] = deps
            layer.append(name)
            i += 1
        previous = layer
    return graph


def _noop(config: object, deps: object) -> int:
    return 0


def _undo(config: object, deps: object, value: object) -> None:
    return None


def make_branches(graph: dict[str, list[str]]) -> list[kira.Branch]:
    return [kira.Branch(name, _noop, deps, unapply=_undo) for name, deps in graph.items()]


def run_graphlib(graph: dict[str, list[str]]) -> None:
    ts = TopologicalSorter(graph)
    ts.prepare()
    while ts.is_active():
        ready = ts.get_ready()
        ts.done(*ready)


def run_apply(branches: list[kira.Branch]) -> None:
    results = run_reference(None, branches)
    assert len(results) == len(branches)


def run_rollback(branches: list[kira.Branch]) -> None:
    last = branches[-1].name
    try:
        run_reference(None, branches, script={last: ["fail"]})
    except kira.RolledBack as exc:
        assert exc.culprit is not None and exc.culprit.branch == last
    else:
        raise AssertionError("the run did not roll back")


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def medians_in_turns(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns: a slow spell of
    the machine weighs on all of them alike, so their ratios hold."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def peak_bytes(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = [1_000, 10_000] if quick else [10_000, 100_000]
    rows = []
    for n in sizes:
        graph = layered_graph(n)
        branches = make_branches(graph)
        repeats = 5 if n <= 10_000 else 3
        t_graphlib = median_seconds(lambda g=graph: run_graphlib(g), repeats)
        t_apply = median_seconds(lambda b=branches: run_apply(b), repeats)
        t_rollback = median_seconds(lambda b=branches: run_rollback(b), repeats)
        mem = peak_bytes(lambda g=graph: run_apply(make_branches(g))) / n
        rows.append((n, t_graphlib, t_apply, t_rollback, mem))

    print(f"layered random DAG, width ~sqrt(N), 1-3 deps per branch, seed {SEED}")
    print(f"python {sys.version.split()[0]}; medians of 5 (10k) / 3 (100k) runs\n")
    header = (
        f"{'N':>8} {'case':<10} {'seconds':>9} {'branches/s':>12} "
        f"{'x graphlib':>11} {'bytes/branch':>13}"
    )
    print(header)
    print("-" * len(header))
    for n, tg, ta, tr, mem in rows:
        print(f"{n:>8} {'graphlib':<10} {tg:>9.4f} {n / tg:>12,.0f} {1.0:>11.2f} {'':>13}")
        print(f"{n:>8} {'apply':<10} {ta:>9.4f} {n / ta:>12,.0f} {ta / tg:>11.2f} {mem:>13,.0f}")
        print(f"{n:>8} {'rollback':<10} {tr:>9.4f} {n / tr:>12,.0f} {tr / tg:>11.2f} {'':>13}")
    if len(rows) == 2:
        (n1, g1, a1, r1, _), (n2, g2, a2, r2, _) = rows
        print(
            f"\ngrowth {n2 // 1000}k/{n1 // 1000}k: graphlib x{g2 / g1:.2f}, apply x{a2 / a1:.2f} "
            f"({a2 / a1 / (g2 / g1):.2f} of graphlib's), rollback x{r2 / r1:.2f} "
            f"({r2 / r1 / (g2 / g1):.2f} of graphlib's)"
        )
        print(
            "targets: apply <= 4x graphlib at the larger N; growth <= 1.3x graphlib's; "
            "<= 2048 bytes/branch"
        )


if __name__ == "__main__":
    main()
