"""executor=: callbacks on a process pool (or a thread pool of the caller's)."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import _proc_callbacks as cb
import pytest
from _runners_support import Log

import kira


def started_pool(workers):
    """A process pool whose workers have all started.

    spawn: forking a process full of threads risks deadlocks in the child. But
    a spawn pool starts workers on demand, and CPython 3.11 can miss a worker
    started while the pool breaks, then wait for it forever at exit: start
    them all first, so that none is started during a test.
    """
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pids = [executor.submit(cb.pid, None, {}) for _ in range(workers)]
    for future in pids:
        future.result(timeout=30)
    return executor


@pytest.fixture(scope="module")
def pool():
    with started_pool(2) as executor:
        yield executor


def records(path):
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_a_process_pool_gives_the_right_results(run, pool):
    branches = [
        kira.Branch("get_a", partial(cb.constant, "get_a", 2)),
        kira.Branch("get_b", partial(cb.constant, "get_b", 3)),
        kira.Branch("get_c", partial(cb.total, "get_c"), ("get_a", "get_b")),
        kira.Branch("pid", cb.pid),
        kira.Branch("deps", cb.try_to_mutate, ("get_a",)),
    ]
    results = run(None, branches, executor=pool)
    pid = results.pop("pid")
    assert results == {"get_a": 2, "get_b": 3, "get_c": 5, "deps": "refused"}
    assert pid != os.getpid()  # it ran in a worker process


def test_a_process_pool_run_rolls_back_on_failure(run, pool, tmp_path):
    path = tmp_path / "records.txt"
    branches = [
        kira.Branch("a", partial(cb.constant, "a", 1), unapply=partial(cb.unapply, "a")),
        kira.Branch("b", partial(cb.constant, "b", 2), ("a",), unapply=partial(cb.unapply, "b")),
        kira.Branch("c", partial(cb.fail, "c"), ("b",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(str(path), branches, executor=pool)
    err = info.value
    assert records(path) == ["apply a", "apply b", "apply c", "unapply b 2", "unapply a 1"]
    assert err.unapplied == ("b", "a")
    assert isinstance(err.culprit.error, LookupError)  # pickled back from the worker
    assert (err.culprit.branch, err.culprit.attempt) == ("c", 1)


def test_a_process_pool_run_retries_with_a_local_handler(run, pool, tmp_path):
    # error handlers run in the calling process: this one is a closure
    path = tmp_path / "records.txt"
    decisions = Log()

    def on_error(config, deps, error, attempt):
        decisions.add(("decide", (type(error), attempt)))
        return attempt < 2

    branches = [
        kira.Branch("c", partial(cb.fail, "c"), on_apply_error=on_error),
    ]
    with pytest.raises(kira.RolledBack):
        run(str(path), branches, executor=pool)
    assert records(path) == ["apply c", "apply c"]
    assert decisions.of("decide") == [(LookupError, 1), (LookupError, 2)]


def test_a_dying_worker_process_is_a_failed_attempt_not_a_hang(run, tmp_path):
    decisions = Log()

    def on_error(config, deps, error, attempt):
        decisions.add(("decide", (type(error), attempt)))
        return attempt < 2  # retry once: the handler decides, as for any failure

    branches = [
        kira.Branch("ok", partial(cb.constant, "ok", 1)),
        kira.Branch("dies", cb.die, ("ok",), on_apply_error=on_error),
    ]
    with started_pool(1) as broken_soon:
        with pytest.raises(kira.RunFailed) as info:
            run(None, branches, executor=broken_soon)
    err = info.value
    assert isinstance(err, kira.RolledBack)
    assert err.unapplied == ("ok",)
    calls = decisions.of("decide")
    assert [attempt for _, attempt in calls] == [1, 2]
    assert all(issubclass(kind, BrokenProcessPool) for kind, _ in calls)
    assert [(e.branch, e.phase, e.attempt) for e in err.errors] == [
        ("dies", "apply", 1),
        ("dies", "apply", 2),
    ]


def test_a_thread_pool_of_the_callers_runs_the_callbacks(run):
    seen = Log()

    def apply(config, deps):
        seen.add(("thread", threading.current_thread().name))
        return sum(deps.values()) + 1

    branches = [
        kira.Branch("a", apply),
        kira.Branch("b", apply, ("a",)),
    ]
    with ThreadPoolExecutor(2, thread_name_prefix="callers-pool") as executor:
        assert run(None, branches, executor=executor) == {"a": 1, "b": 2}
    assert all(name.startswith("callers-pool") for name in seen.of("thread"))
