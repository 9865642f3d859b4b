"""Benchmark: the runners against hand-written loops and Dask, and their makespan.

One process run. No-op branches (each returns the sum of its dependencies'
results) on the layered DAG of `state_machine.py`, at 10k and 100k branches:

- `run_tasks(max_workers=8)` against a hand-written `graphlib.TopologicalSorter` +
  `ThreadPoolExecutor(8)` loop (completions through done-callbacks and a queue,
  the fast way to write it) and against `dask.threaded.get(num_workers=8)`;
- `run_tasks_async` (async def callbacks) against a hand-written asyncio
  ready-queue loop.

Makespan: 200 branches in layers of 20, each sleeping 5-20 ms (fixed per branch),
max_workers=8: makespan / max(critical path, total work / 8), on run_tasks, on
run_tasks_async with `async def` sleeps, and on run_tasks_async with plain sleeps
(in threads); also against the same bound computed from the sleeps as measured.

Run: `.venv/bin/python benchmarks/runners.py [--quick]` (needs `dask`, from
the `kira[dask]` extra, for the Dask column).
"""

from __future__ import annotations

import asyncio
import heapq
import queue
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import kira
from state_machine import layered_graph, median_seconds, medians_in_turns

WORKERS = 8


def _sum_apply(config: object, deps: Any) -> int:
    return sum(deps.values()) + 1


async def _async_sum_apply(config: object, deps: Any) -> int:
    return sum(deps.values()) + 1


def _sum(*values: int) -> int:
    return sum(values) + 1


async def _async_sum(*values: int) -> int:
    return sum(values) + 1


def sync_branches(graph: dict[str, list[str]]) -> list[kira.Branch]:
    return [kira.Branch(n, _sum_apply, deps) for n, deps in graph.items()]


def async_branches(graph: dict[str, list[str]]) -> list[kira.Branch]:
    return [kira.Branch(n, _async_sum_apply, deps) for n, deps in graph.items()]


# The branch lists are built outside the timed section, as the baselines' graph
# dicts are; validating them (RuntimeState.create) is timed, as graphlib's is.
def kira_threads(branches: list[kira.Branch]) -> dict[str, Any]:
    return kira.run_tasks(None, branches, max_workers=WORKERS)


def kira_async(branches: list[kira.Branch]) -> dict[str, Any]:
    return asyncio.run(kira.run_tasks_async(None, branches))


def handwritten_threads(graph: dict[str, list[str]]) -> dict[str, Any]:
    ts = TopologicalSorter(graph)
    ts.prepare()
    results: dict[str, Any] = {}
    done: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    active = 0
    with ThreadPoolExecutor(WORKERS) as pool:
        while ts.is_active():
            for name in ts.get_ready():
                future = pool.submit(_sum, *[results[d] for d in graph[name]])
                future.add_done_callback(lambda f, n=name: done.put((n, f)))
                active += 1
            name, future = done.get()
            active -= 1
            results[name] = future.result()
            ts.done(name)
    return results


def handwritten_async(graph: dict[str, list[str]]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        ts = TopologicalSorter(graph)
        ts.prepare()
        results: dict[str, Any] = {}
        done: asyncio.Queue[tuple[str, asyncio.Task[int]]] = asyncio.Queue()
        while ts.is_active():
            for name in ts.get_ready():
                task = asyncio.create_task(_async_sum(*[results[d] for d in graph[name]]))
                task.add_done_callback(lambda t, n=name: done.put_nowait((n, t)))
            name, task = await done.get()
            results[name] = task.result()
            ts.done(name)
        return results

    return asyncio.run(main())


def dask_threaded(graph: dict[str, list[str]]) -> dict[str, Any]:
    import dask.threaded  # noqa: PLC0415 - optional: the kira[dask] extra

    dsk = {name: (_sum, *deps) for name, deps in graph.items()}
    keys = list(graph)
    values = dask.threaded.get(dsk, keys, num_workers=WORKERS)
    return dict(zip(keys, values, strict=True))


# -- makespan ---------------------------------------------------------------------


def makespan_graph(seed: int = 7) -> tuple[dict[str, list[str]], dict[str, float]]:
    rng = random.Random(seed)
    graph: dict[str, list[str]] = {}
    cost: dict[str, float] = {}
    previous: list[str] = []
    for layer in range(10):
        names = [f"L{layer}n{i}" for i in range(20)]
        for name in names:
            graph[name] = rng.sample(previous, k=rng.randint(1, 3)) if previous else []
            cost[name] = rng.uniform(0.005, 0.020)
        previous = names
    return graph, cost


def lower_bound(graph: dict[str, list[str]], cost: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    for name in TopologicalSorter(graph).static_order():
        finish[name] = cost[name] + max((finish[d] for d in graph[name]), default=0.0)
    return max(max(finish.values()), sum(cost.values()) / WORKERS)


def list_schedule(graph: dict[str, list[str]], cost: dict[str, float]) -> float:
    """The makespan of a zero-overhead scheduler taking ready branches in
    definition order (kira's order) onto WORKERS slots, for these durations."""
    position = {name: i for i, name in enumerate(graph)}
    dependents: dict[str, list[str]] = {name: [] for name in graph}
    for name, deps in graph.items():
        for dep in deps:
            dependents[dep].append(name)
    waiting = {name: len(deps) for name, deps in graph.items()}
    ready = [(position[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now, free = 0.0, WORKERS
    while ready or running:
        while ready and free:
            _, name = heapq.heappop(ready)
            heapq.heappush(running, (now + cost[name], name))
            free -= 1
        now, name = heapq.heappop(running)
        free += 1
        for dependent in dependents[name]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, (position[dependent], dependent))
    return now


def makespan(
    runner: str, graph: dict[str, list[str]], cost: dict[str, float]
) -> tuple[float, dict[str, float]]:
    """The run's wall time, and how long each branch's sleep really took (sleeps
    overshoot: the OS's timer slack; asyncio's timers round up to the
    millisecond). `runner` is "threads", "asyncio" (async def sleeps) or
    "asyncio-threads" (plain sleeps, which run_tasks_async runs in threads)."""
    took: dict[str, float] = {}

    def sleeper(name: str) -> Callable[[object, object], None]:
        def apply(config: object, deps: object) -> None:
            start = time.perf_counter()
            time.sleep(cost[name])
            took[name] = time.perf_counter() - start

        return apply

    def async_sleeper(name: str) -> Callable[[object, object], Any]:
        async def apply(config: object, deps: object) -> None:
            start = time.perf_counter()
            await asyncio.sleep(cost[name])
            took[name] = time.perf_counter() - start

        return apply

    make = async_sleeper if runner == "asyncio" else sleeper
    branches = [kira.Branch(n, make(n), d) for n, d in graph.items()]
    start = time.perf_counter()
    if runner == "threads":
        kira.run_tasks(None, branches, max_workers=WORKERS)
    else:
        asyncio.run(kira.run_tasks_async(None, branches, max_workers=WORKERS))
    return time.perf_counter() - start, took


def handwritten_makespan(runner: str, graph: dict[str, list[str]], cost: dict[str, float]) -> float:
    """The hand-written loops above, with sleeping branches: what the same sleeps
    cost without kira (they overshoot alike)."""
    start = time.perf_counter()
    ts = TopologicalSorter(graph)
    ts.prepare()
    if runner == "threads":
        done: queue.SimpleQueue[str] = queue.SimpleQueue()
        with ThreadPoolExecutor(WORKERS) as pool:
            while ts.is_active():
                for name in ts.get_ready():
                    future = pool.submit(time.sleep, cost[name])
                    future.add_done_callback(lambda f, n=name: done.put(n))
                ts.done(done.get())
        return time.perf_counter() - start
    in_threads = runner == "asyncio-threads"

    async def main() -> None:
        gate = asyncio.Semaphore(WORKERS)
        finished: asyncio.Queue[str] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def work(name: str) -> None:
            async with gate:
                if in_threads:
                    await loop.run_in_executor(pool, time.sleep, cost[name])
                else:
                    await asyncio.sleep(cost[name])
            finished.put_nowait(name)

        tasks = set()
        while ts.is_active():
            for name in ts.get_ready():
                tasks.add(asyncio.create_task(work(name)))
            ts.done(await finished.get())

    with ThreadPoolExecutor(WORKERS) as pool:
        asyncio.run(main())
    return time.perf_counter() - start


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = [1_000, 10_000] if quick else [10_000, 100_000]
    version = sys.version.split()[0]
    print(f"no-op branches on the layered DAG; max_workers={WORKERS}; python {version}")
    print("medians of 5 (10k) / 3 (100k) runs, the contenders taking turns\n")
    header = f"{'N':>8} {'runner':<22} {'seconds':>9} {'branches/s':>11} {'ratio':>20}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        graph = layered_graph(n)
        repeats = 5 if n <= 10_000 else 3
        sb, ab = sync_branches(graph), async_branches(graph)
        expected = handwritten_threads(graph)
        assert kira_threads(sb) == expected
        assert kira_async(ab) == expected
        fns: dict[str, Callable[[], object]] = {
            "hand": lambda g=graph: handwritten_threads(g),
            "kira": lambda b=sb: kira_threads(b),
            "ahand": lambda g=graph: handwritten_async(g),
            "akira": lambda b=ab: kira_async(b),
        }
        try:
            assert dask_threaded(graph) == expected
            fns["dask"] = lambda g=graph: dask_threaded(g)
        except ImportError:
            pass
        medians = medians_in_turns(fns, repeats)
        t_hand, t_kira, t_ahand, t_akira = (
            medians["hand"],
            medians["kira"],
            medians["ahand"],
            medians["akira"],
        )
        t_dask = medians.get("dask")
        print(f"{n:>8} {'hand-written threads':<22} {t_hand:>9.3f} {n / t_hand:>11,.0f} {'':>20}")
        print(
            f"{n:>8} {'kira.run_tasks':<22} {t_kira:>9.3f} {n / t_kira:>11,.0f} "
            f"{f'{t_kira / t_hand:.2f}x hand-written':>20}"
        )
        if t_dask is not None:
            print(
                f"{n:>8} {'dask.threaded.get':<22} {t_dask:>9.3f} {n / t_dask:>11,.0f} "
                f"{f'kira {t_dask / t_kira:.2f}x faster':>20}"
            )
        print(f"{n:>8} {'hand-written asyncio':<22} {t_ahand:>9.3f} {n / t_ahand:>11,.0f} {'':>20}")
        print(
            f"{n:>8} {'kira.run_tasks_async':<22} {t_akira:>9.3f} {n / t_akira:>11,.0f} "
            f"{f'{t_akira / t_ahand:.2f}x hand-written':>20}"
        )

    # async def callbacks on the threaded runner: its own event loop thread, against
    # what one asyncio.run per call would cost.
    flat = {f"a{i}": [] for i in range(2_000)}
    own_loop = async_branches(flat)
    per_call = [
        kira.Branch(b.name, lambda config, deps: asyncio.run(_async_sum_apply(config, deps)))
        for b in own_loop
    ]
    t_loop = median_seconds(lambda: kira_threads(own_loop), 5)
    t_run = median_seconds(lambda: kira_threads(per_call), 5)
    print(
        f"\nasync def callbacks on run_tasks, 2000 independent branches: own loop thread "
        f"{t_loop:.3f} s, asyncio.run per call {t_run:.3f} s ({t_run / t_loop:.1f}x slower)"
    )

    graph, cost = makespan_graph()
    bound = lower_bound(graph, cost)
    print(
        f"\nmakespan, 200 branches in layers of 20, 5-20 ms each, max_workers={WORKERS}; "
        f"lower bound max(critical path, work/{WORKERS}) = {bound:.3f} s; medians of 11, "
        "kira and hand-written in turns"
    )
    ideal_nominal = list_schedule(graph, cost) / bound
    print(f"  zero-overhead schedule in definition order: ratio {ideal_nominal:.3f}")
    print(
        "  (ideal: that schedule of the sleeps as measured in the run, against the same"
        " bound: what sleep overshoot alone costs)"
    )
    print(
        "  (measured: kira's makespan against the bound of the sleeps as they really took"
        " in that run)"
    )
    for runner in ("threads", "asyncio", "asyncio-threads"):
        ours, theirs, ideal, measured = [], [], [], []
        for _ in range(11):
            elapsed, took = makespan(runner, graph, cost)
            ours.append(elapsed)
            ideal.append(list_schedule(graph, took))
            measured.append(elapsed / lower_bound(graph, took))
            theirs.append(handwritten_makespan(runner, graph, cost))
        m, h, i = statistics.median(ours), statistics.median(theirs), statistics.median(ideal)
        print(
            f"  {runner:<16} kira {m:.3f} s  ratio {m / bound:.3f} "
            f"(ideal {i / bound:.3f}, measured {statistics.median(measured):.3f})   "
            f"hand-written {h:.3f} s  ratio {h / bound:.3f}"
        )
    print(
        "\ntargets: threads <= 1.5x hand-written and faster than dask; "
        "async <= 1.5x hand-written; makespan ratio <= 1.05"
    )


if __name__ == "__main__":
    main()
