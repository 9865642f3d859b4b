"""Timeouts: per attempt, lingering thread attempts, the grace period, inactivity."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from _runners_support import WAIT, Fail, Log, flavoured, wait

import kira


def on_kind(kind, event):
    """An on_event callback that sets `event` on the first event of `kind`."""

    def on_event(e):
        if e.kind == kind:
            event.set()

    return on_event


def test_a_timed_out_attempt_fails_with_branch_timeout_and_can_be_retried(run, flavour):
    log = Log()
    release = threading.Event()  # lets a timed-out thread attempt return
    cancelled = threading.Event()

    def sync_apply(config, deps):
        log.add(("attempt", deps["d"]))
        if len(log.of("attempt")) == 1:
            wait(release)
            return "late"
        release.set()
        return "fresh"

    async def async_apply(config, deps):
        log.add(("attempt", deps["d"]))
        if len(log.of("attempt")) == 1:
            try:
                await asyncio.sleep(WAIT)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "late"
        return "fresh"

    def on_error(config, deps, error, attempt):
        log.add(("error", (type(error), attempt, error.branch, error.phase, error.seconds)))
        assert isinstance(error, TimeoutError)
        return True

    branches = [
        kira.Branch("d", flavoured(flavour, lambda config, deps: "D")),
        kira.Branch(
            "t",
            sync_apply if flavour == "sync" else async_apply,
            ("d",),
            on_apply_error=flavoured(flavour, on_error),
            timeout=0.2,
        ),
    ]
    assert run(None, branches) == {"d": "D", "t": "fresh"}
    assert log.of("attempt") == ["D", "D"]
    assert log.of("error") == [(kira.BranchTimeout, 1, "t", "apply", 0.2)]
    if flavour == "async":
        wait(cancelled)  # the timed-out coroutine was cancelled


def test_a_timed_out_async_attempt_is_cancelled_before_its_dependencies_unapply(run):
    log = Log()

    async def slow(config, deps):
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            log.add(("cancelled", "t"))
            await asyncio.sleep(0.05)  # cleanup still using what d provides
            log.add(("cleaned up", "t"))
            raise
        return "never"

    async def unapply(config, deps, value):
        log.add(("unapply", value))

    branches = [
        kira.Branch("d", flavoured("async", lambda config, deps: "D"), unapply=unapply),
        kira.Branch("t", slow, ("d",), timeout=0.2),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    err = info.value
    assert isinstance(err.culprit.error, kira.BranchTimeout)
    assert (err.culprit.branch, err.culprit.phase) == ("t", "apply")
    assert err.unapplied == ("d",)
    # the attempt ended (its cancellation handled) before d was unapplied
    assert log.items == [("cancelled", "t"), ("cleaned up", "t"), ("unapply", "D")]


def test_a_timed_out_async_attempt_that_returns_anyway_has_its_value_unapplied(run):
    # A coroutine may swallow its cancellation and return: the value is real work.
    log = Log()

    async def stubborn(config, deps):
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
            log.add(("returned", "t"))
            return ("late", deps["d"])
        return "never"

    async def unapply(config, deps, value):
        log.add(("unapply", value))

    branches = [
        kira.Branch("d", flavoured("async", lambda config, deps: "D"), unapply=unapply),
        kira.Branch("t", stubborn, ("d",), unapply=unapply, timeout=0.2),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, grace_period=5)
    assert info.value.unapplied == ("d",)
    assert log.items == [("returned", "t"), ("unapply", ("late", "D")), ("unapply", "D")]


def test_a_late_value_of_a_timed_out_thread_attempt_is_unapplied_before_its_deps(run):
    log = Log()
    release = threading.Event()

    def slow(config, deps):
        wait(release)  # set when the rollback starts, long after the timeout
        log.add(("returned", "t"))
        return ("late", deps["d"])

    def unapply(config, deps, value):
        log.add(("unapply", value))

    branches = [
        kira.Branch("d", lambda config, deps: "D", unapply=unapply),
        kira.Branch("t", slow, ("d",), unapply=unapply, timeout=0.2),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, on_event=on_kind("rollback_started", release), grace_period=5)
    err = info.value
    assert isinstance(err.culprit.error, kira.BranchTimeout)
    assert err.culprit.branch == "t"
    # the late value is compensated, and only then is d unapplied
    assert log.items == [("returned", "t"), ("unapply", ("late", "D")), ("unapply", "D")]


def test_a_late_value_is_unapplied_even_when_the_run_applies(run):
    log = Log()
    release = threading.Event()

    def apply(config, deps):
        log.add(("attempt", len(log.of("attempt")) + 1))
        if len(log.of("attempt")) == 1:
            wait(release)  # times out; returns once the retry is under way
            return "late"
        release.set()
        return "fresh"

    def unapply(config, deps, value):
        log.add(("unapply", value))

    branches = [
        kira.Branch(
            "t", apply, unapply=unapply, on_apply_error=lambda c, d, e, n: True, timeout=0.2
        )
    ]
    assert run(None, branches, grace_period=5) == {"t": "fresh"}
    assert log.of("unapply") == ["late"]  # the retry's value stands; the late one is undone


def test_a_thread_attempt_that_never_returns_within_the_grace_period_is_abandoned(run):
    log = Log()
    forever = threading.Event()

    def stuck(config, deps):
        forever.wait(WAIT * 4)
        log.add(("returned", "t"))
        return "too late"

    def unapply(config, deps, value):
        log.add(("unapply", value))

    branches = [
        kira.Branch("d", lambda config, deps: "D", unapply=unapply),
        kira.Branch("free", lambda config, deps: "F", unapply=unapply),
        kira.Branch("t", stuck, ("d",), unapply=unapply, timeout=0.1),
    ]
    try:
        with pytest.raises(kira.RollbackIncomplete) as info:
            run(None, branches, grace_period=0.2)
    finally:
        forever.set()  # release the thread
    err = info.value
    assert err.abandoned == ("t",)
    assert err.still_applied == ("d",)  # t may still be using it
    assert err.unapplied == ("free",)
    assert log.items == [("unapply", "F")]
    assert isinstance(err.culprit.error, kira.BranchTimeout)


def test_the_run_inactivity_timeout_fails_what_runs_and_rolls_back(run, flavour):
    log = Log()
    release = threading.Event()
    cancelled = threading.Event()

    def blocked_sync(config, deps):
        wait(release)
        return "late"

    async def blocked_async(config, deps):
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    def unapply(config, deps, value):
        log.add(("unapply", value))

    branches = [
        kira.Branch(
            "a", flavoured(flavour, lambda config, deps: "A"), unapply=flavoured(flavour, unapply)
        ),
        kira.Branch("blocked", blocked_sync if flavour == "sync" else blocked_async, ("a",)),
        kira.Branch("never", flavoured(flavour, lambda config, deps: "N"), ("blocked",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, 0.3, on_event=on_kind("rollback_started", release), grace_period=5)
    err = info.value
    timeout = err.culprit.error
    assert isinstance(timeout, kira.BranchTimeout)
    assert isinstance(timeout, TimeoutError)
    assert (timeout.branch, timeout.inactivity, timeout.seconds) == ("blocked", True, 0.3)
    assert [(e.branch, e.phase) for e in err.errors] == [("blocked", "apply")]
    assert err.unapplied == ("a",)
    assert log.items == [("unapply", "A")]
    if flavour == "async":
        wait(cancelled)


def test_the_inactivity_timeout_is_not_a_limit_on_the_whole_run(run, flavour):
    steps = 6

    def step_sync(config, deps):
        time.sleep(0.1)
        return 1

    async def step_async(config, deps):
        await asyncio.sleep(0.1)
        return 1

    step = step_sync if flavour == "sync" else step_async
    branches = [kira.Branch("s0", step)]
    branches += [kira.Branch(f"s{i}", step, (f"s{i - 1}",)) for i in range(1, steps)]
    # 6 steps of 0.1 s take longer than 0.4 s, but something finishes every 0.1 s
    assert len(run(None, branches, 0.4)) == steps


def test_an_unapply_that_times_out_goes_to_its_handler(run, flavour):
    log = Log()
    release = threading.Event()

    def unapply_sync(config, deps, value):
        log.add(("unapply", value))
        if len(log.of("unapply")) == 1:
            wait(release)
            raise Fail("late and failed")

    async def unapply_async(config, deps, value):
        log.add(("unapply", value))
        if len(log.of("unapply")) == 1:
            await asyncio.sleep(WAIT)

    def on_unapply_error(config, deps, error, attempt):
        log.add(("error", (type(error), error.phase, attempt)))
        release.set()
        return True

    def fail(config, deps):
        raise Fail("b")

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, lambda config, deps: "A"),
            unapply=unapply_sync if flavour == "sync" else unapply_async,
            on_unapply_error=flavoured(flavour, on_unapply_error),
            timeout=0.2,
        ),
        kira.Branch("b", flavoured(flavour, fail), ("a",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, grace_period=5)
    assert log.of("unapply") == ["A", "A"]
    assert log.of("error") == [(kira.BranchTimeout, "unapply", 1)]
    assert info.value.unapplied == ("a",)


def test_a_timeout_that_is_not_hit_changes_nothing(run, flavour):
    branches = [
        kira.Branch("a", flavoured(flavour, lambda config, deps: 1), timeout=5),
        kira.Branch("b", flavoured(flavour, lambda config, deps: 2), ("a",), timeout=5),
    ]
    assert run(None, branches, 5) == {"a": 1, "b": 2}
