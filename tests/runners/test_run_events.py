"""on_event: one Event per transition, in an order consistent with the run."""

from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest
from _runners_support import Fail, Log, flavoured

import kira

KINDS = {
    "apply_started",
    "applied",
    "apply_failed",
    "retry_scheduled",
    "failed",
    "rollback_started",
    "unapply_started",
    "unapplied",
    "unapply_failed",
    "run_finished",
}


def check_timeline(events, branches, run_id, finished):
    """Assert what holds for the events of any run."""
    deps = {b.name: b.dependencies for b in branches}
    assert events, "no events"
    assert {e.kind for e in events} <= KINDS
    for e in events:
        assert e.run_id == run_id
        assert e.at.utcoffset() == timedelta(0)
    assert [e.at for e in events] == sorted(e.at for e in events)

    assert [e.kind for e in events].count("run_finished") == 1
    last = events[-1]
    assert (last.kind, last.branch, last.value) == ("run_finished", None, finished)

    rollbacks = [i for i, e in enumerate(events) if e.kind == "rollback_started"]
    assert len(rollbacks) == (0 if finished == "applied" else 1)
    rollback_at = rollbacks[0] if rollbacks else len(events)

    open_attempts: set[tuple[str, str, int]] = set()
    applied: set[str] = set()
    for i, e in enumerate(events):
        if e.kind in ("apply_started", "unapply_started"):
            phase = e.kind.split("_")[0]
            open_attempts.add((e.branch, phase, e.attempt))
            if phase == "apply":
                assert i < rollback_at, f"apply started after the rollback: {e}"
                assert set(deps[e.branch]) <= applied, f"{e.branch} started too early"
            else:
                assert i > rollback_at, f"unapply started before the rollback: {e}"
        elif e.kind in ("applied", "apply_failed", "unapplied", "unapply_failed"):
            phase = "apply" if e.kind in ("applied", "apply_failed") else "unapply"
            key = (e.branch, phase, e.attempt)
            assert key in open_attempts, f"{e.kind} of an attempt never started: {e}"
            open_attempts.discard(key)
            if e.kind == "applied":
                applied.add(e.branch)
    assert not open_attempts, f"attempts started but never ended: {open_attempts}"


def flaky_graph(flavour, log):
    """a; b(a) fails once and is retried; c(b) fails twice, for good."""
    b_calls: list[int] = []

    def b(config, deps):
        b_calls.append(1)
        if len(b_calls) == 1:
            raise Fail("b once")
        return "B"

    def c(config, deps):
        raise Fail("c for good")

    def unapply(config, deps, value):
        log.add(("unapply", value))

    return [
        kira.Branch(
            "a",
            flavoured(flavour, lambda config, deps: "A"),
            unapply=flavoured(flavour, unapply),
        ),
        kira.Branch(
            "b",
            flavoured(flavour, b),
            ("a",),
            unapply=flavoured(flavour, unapply),
            on_apply_error=flavoured(flavour, lambda cfg, d, e, n: True),
        ),
        kira.Branch(
            "c",
            flavoured(flavour, c),
            ("b",),
            on_apply_error=flavoured(flavour, lambda cfg, d, e, n: n < 2),
        ),
    ]


def test_events_of_a_rolled_back_run(run, flavour):
    events = Log()
    log = Log()
    branches = flaky_graph(flavour, log)
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, run_id="r-1", on_event=events.add)
    err = info.value
    assert err.run_id == "r-1"
    timeline = events.items
    check_timeline(timeline, branches, "r-1", "rolled_back")
    brief = [(e.kind, e.branch, e.attempt) for e in timeline]
    assert brief == [
        ("apply_started", "a", 1),
        ("applied", "a", 1),
        ("apply_started", "b", 1),
        ("apply_failed", "b", 1),
        ("retry_scheduled", "b", 2),
        ("apply_started", "b", 2),
        ("applied", "b", 2),
        ("apply_started", "c", 1),
        ("apply_failed", "c", 1),
        ("retry_scheduled", "c", 2),
        ("apply_started", "c", 2),
        ("apply_failed", "c", 2),
        ("failed", "c", 2),
        ("rollback_started", "c", None),
        ("unapply_started", "b", 1),
        ("unapplied", "b", 1),
        ("unapply_started", "a", 1),
        ("unapplied", "a", 1),
        ("run_finished", None, None),
    ]
    rollback = next(e for e in timeline if e.kind == "rollback_started")
    assert rollback.error is err.culprit.error
    applied = {e.branch: e.value for e in timeline if e.kind == "applied"}
    assert applied == {"a": "A", "b": "B"} == err.results
    failures = [e for e in timeline if e.kind == "apply_failed"]
    assert [e.error for e in failures] == [x.error for x in err.errors]
    assert [e.value for e in timeline if e.kind == "unapplied"] == ["B", "A"]


def test_events_of_an_applied_run(run, flavour):
    events = Log()
    branches = [
        kira.Branch("a", flavoured(flavour, lambda config, deps: 1)),
        kira.Branch("b", flavoured(flavour, lambda config, deps: 2)),
        kira.Branch("c", flavoured(flavour, lambda config, deps: 3), ("a", "b")),
    ]
    results = run(None, branches, run_id="r-1", on_event=events.add)
    timeline = events.items
    check_timeline(timeline, branches, "r-1", "applied")
    assert {e.branch: e.value for e in timeline if e.kind == "applied"} == results
    assert [e.kind for e in timeline].count("apply_started") == 3


def test_events_of_an_incomplete_rollback(run, flavour):
    events = Log()

    def unapply(config, deps, value):
        raise Fail("stuck")

    def fail(config, deps):
        raise Fail("b")

    branches = [
        kira.Branch(
            "a", flavoured(flavour, lambda config, deps: 1), unapply=flavoured(flavour, unapply)
        ),
        kira.Branch("b", flavoured(flavour, fail), ("a",)),
    ]
    with pytest.raises(kira.RollbackIncomplete) as info:
        run(None, branches, run_id="r-1", on_event=events.add)
    assert info.value.run_id == "r-1"
    timeline = events.items
    check_timeline(timeline, branches, "r-1", "rollback_incomplete")
    brief = [(e.kind, e.branch, e.value) for e in timeline if e.kind != "apply_started"]
    assert ("unapply_failed", "a", None) in brief
    assert ("failed", "a", "unapply") in brief
    assert ("failed", "b", "apply") in brief


def test_retry_after_is_announced_with_its_delay(run, flavour):
    events = Log()
    calls: list[int] = []

    def apply(config, deps):
        calls.append(1)
        if len(calls) == 1:
            raise Fail("once")
        return "ok"

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, apply),
            on_apply_error=flavoured(flavour, lambda c, d, e, n: kira.RetryAfter(0.05)),
        )
    ]
    run(None, branches, run_id="r-1", on_event=events.add)
    scheduled = [e for e in events.items if e.kind == "retry_scheduled"]
    assert [(e.branch, e.attempt, e.value) for e in scheduled] == [("a", 2, 0.05)]


def test_a_default_run_id_is_a_fresh_hex_string_carried_everywhere(run):
    first, second = Log(), Log()

    def fail(config, deps):
        raise Fail("x")

    branches = [kira.Branch("a", fail)]
    with pytest.raises(kira.RolledBack) as one:
        run(None, branches, on_event=first.add)
    with pytest.raises(kira.RolledBack) as two:
        run(None, branches, on_event=second.add)
    assert re.fullmatch(r"[0-9a-f]{8,}", one.value.run_id)
    assert one.value.run_id != two.value.run_id
    assert {e.run_id for e in first.items} == {one.value.run_id}
    assert {e.run_id for e in second.items} == {two.value.run_id}


def test_on_event_is_called_one_event_at_a_time_in_an_order_the_graph_allows(run):
    # Workers that finish an attempt may schedule (and so call on_event) themselves:
    # never two calls at once, and every start after its dependencies' applied.
    inside = threading.Lock()
    overlaps: list[str] = []
    seen: list[tuple[str, str | None]] = []

    def on_event(event: kira.Event) -> None:
        if not inside.acquire(blocking=False):
            overlaps.append(event.kind)
            return
        try:
            seen.append((event.kind, event.branch))
        finally:
            inside.release()

    width = 40
    branches = [
        kira.Branch(
            f"n{layer}-{i}",
            lambda config, deps: sum(deps.values()) + 1,
            dependencies=(f"n{layer - 1}-{i}", f"n{layer - 1}-{(i + 7) % width}") if layer else (),
        )
        for layer in range(25)
        for i in range(width)
    ]
    results = run(None, branches, max_workers=8, on_event=on_event)
    assert overlaps == []
    assert results["n24-0"] == 2**25 - 1
    applied: set[str] = set()
    deps = {b.name: b.dependencies for b in branches}
    for kind, name in seen:
        if kind == "apply_started":
            assert set(deps[name]) <= applied, name
        elif kind == "applied":
            applied.add(name)
    assert len(applied) == len(branches) and seen[-1] == ("run_finished", None)
