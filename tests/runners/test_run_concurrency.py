"""Independent branches really run at the same time, up to max_workers."""

from __future__ import annotations

import asyncio
import threading

import pytest
from _runners_support import Fail, PollBarrier, flavoured

import kira
from kira._threads import default_workers


def barrier_apply(flavour, parties, track=None):
    """A callback (apply or unapply) that waits until `parties` callbacks wait with it."""
    if flavour == "sync":
        barrier = threading.Barrier(parties, timeout=5)

        def apply(config, deps, *value):
            if track:
                track.enter()
            try:
                return barrier.wait()
            finally:
                if track:
                    track.leave()

        return apply

    poll = PollBarrier(parties)

    async def async_apply(config, deps, *value):
        if track:
            track.enter()
        try:
            await poll.await_()
            return 0
        finally:
            if track:
                track.leave()

    return async_apply


class Concurrency:
    """Counts the callbacks inside at once, and the most ever seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1


def test_independent_branches_all_run_at_once(run, flavour):
    n = 8
    apply = barrier_apply(flavour, n)
    branches = [kira.Branch(f"b{i}", apply) for i in range(n)]
    results = run(None, branches, max_workers=n)
    assert set(results) == {f"b{i}" for i in range(n)}
    if flavour == "sync":  # Barrier.wait gives each party its own index
        assert sorted(results.values()) == list(range(n))


@pytest.mark.parametrize("limit", [1, 3])
def test_max_workers_bounds_the_applies_running_at_once(run, flavour, limit):
    track = Concurrency()
    apply = barrier_apply(flavour, limit, track)
    branches = [kira.Branch(f"b{i}", apply) for i in range(3 * limit + limit)]
    run(None, branches, max_workers=limit)
    assert track.most == limit  # the barrier makes `limit` certain; never more


def test_max_workers_bounds_the_unapplies_running_at_once(run, flavour):
    limit = 3
    track = Concurrency()
    unapply = barrier_apply(flavour, limit, track)

    def fail(config, deps):
        raise Fail("last")

    names = [f"b{i}" for i in range(2 * limit)]
    branches = [
        *(
            kira.Branch(name, flavoured(flavour, lambda config, deps: 1), unapply=unapply)
            for name in names
        ),
        kira.Branch("last", flavoured(flavour, fail), dependencies=names),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, max_workers=limit)
    assert sorted(info.value.unapplied) == names
    assert track.most == limit


def test_max_workers_counts_a_retry_like_any_attempt(run, flavour):
    # One slot: a retry and an independent branch never overlap.
    track = Concurrency()
    tries: list[int] = []

    def flaky(config, deps):
        track.enter()
        try:
            tries.append(1)
            if len(tries) < 3:
                raise Fail("again")
            return "flaky"
        finally:
            track.leave()

    def steady(config, deps):
        track.enter()
        track.leave()
        return "steady"

    branches = [
        kira.Branch(
            "flaky",
            flavoured(flavour, flaky),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: True),
        ),
        *(kira.Branch(f"s{i}", flavoured(flavour, steady)) for i in range(5)),
    ]
    results = run(None, branches, max_workers=1)
    assert results["flaky"] == "flaky"
    assert len(tries) == 3
    assert track.most == 1


def test_without_max_workers_the_async_runner_runs_every_ready_plain_callback(flavour):
    """run_tasks_async sets no limit by default: even plain callbacks, more than
    a default pool would hold, all run at once (none waits, timed, for a thread)."""
    n = 2 * default_workers() + 1
    apply = barrier_apply(flavour, n)
    branches = [kira.Branch(f"b{i}", apply, timeout=10) for i in range(n)]
    results = asyncio.run(asyncio.wait_for(kira.run_tasks_async(None, branches), 30))
    assert set(results) == {f"b{i}" for i in range(n)}


def test_an_error_handler_given_up_on_does_not_hold_up_the_rollback(run):
    """The inactivity timeout gives up on a hung error handler; the rollback then
    unapplies what was applied, though one slot is all there is."""
    gate = threading.Event()
    undone: list[str] = []

    def fail(config, deps):
        raise Fail("b")

    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=lambda c, d, v: undone.append("a")),
        kira.Branch("b", fail, ["a"], on_apply_error=lambda c, d, e, n: gate.wait(30)),
    ]
    try:
        with pytest.raises(kira.RolledBack) as info:
            run(None, branches, 0.5, max_workers=1, grace_period=0.5)
    finally:
        gate.set()
    assert info.value.unapplied == ("a",)
    assert undone == ["a"]
