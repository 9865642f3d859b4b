"""Rollback: order, failing unapplies, failing handlers, applies still running."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from _runners_support import Fail, Log, await_event, flavoured, wait

import kira


def recorded(flavour, log, name, value=None):
    """apply and unapply callbacks of `name` that record to `log`."""

    def apply(config, deps):
        log.add(("apply", name))
        return value if value is not None else name.upper()

    def unapply(config, deps, v):
        log.add(("unapply", name))

    return {"apply": flavoured(flavour, apply), "unapply": flavoured(flavour, unapply)}


def failing(flavour, message="failed"):
    def apply(config, deps):
        raise Fail(message)

    return flavoured(flavour, apply)


def test_kiras_rollback_order_b_and_c_before_a(run, flavour):
    log = Log()
    branches = [
        kira.Branch("a", **recorded(flavour, log, "a")),
        kira.Branch("b", dependencies=("a",), **recorded(flavour, log, "b")),
        kira.Branch("c", dependencies=("a",), **recorded(flavour, log, "c")),
        kira.Branch("d", failing(flavour), ("b", "c")),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    undone = log.of("unapply")
    assert set(undone[:2]) == {"b", "c"}
    assert undone[2:] == ["a"]
    assert set(info.value.unapplied[:2]) == {"b", "c"}
    assert info.value.unapplied[2:] == ("a",)
    assert info.value.culprit.branch == "d"
    assert info.value.results == {"a": "A", "b": "B", "c": "C"}


def test_a_branch_without_unapply_is_unapplied_instantly_in_order(run, flavour):
    log = Log()
    branches = [
        kira.Branch("a", flavoured(flavour, lambda config, deps: 1)),  # nothing to undo
        kira.Branch("b", dependencies=("a",), **recorded(flavour, log, "b")),
        kira.Branch("c", failing(flavour), ("b",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    assert info.value.unapplied == ("b", "a")


def test_an_unapply_that_raises_without_handler_leaves_it_and_its_dependencies(run, flavour):
    log = Log()

    def broken_unapply(config, deps, value):
        log.add(("unapply", "b"))
        raise Fail("cannot undo b")

    branches = [
        kira.Branch("a", **recorded(flavour, log, "a")),
        kira.Branch(
            "b",
            flavoured(flavour, lambda config, deps: "B"),
            ("a",),
            unapply=flavoured(flavour, broken_unapply),
        ),
        kira.Branch("x", **recorded(flavour, log, "x")),
        kira.Branch("c", failing(flavour), ("b", "x")),
    ]
    with pytest.raises(kira.RollbackIncomplete) as info:
        run(None, branches)
    err = info.value
    assert isinstance(err, kira.RunFailed)
    assert set(err.still_applied) == {"a", "b"}
    assert err.abandoned == ()
    assert err.unapplied == ("x",)
    assert sorted(log.of("unapply")) == ["b", "x"]  # a stays applied: b still holds it
    assert [(e.branch, e.phase, e.attempt) for e in err.errors] == [
        ("c", "apply", 1),
        ("b", "unapply", 1),
    ]
    assert err.culprit.branch == "c"


def test_an_unapply_retried_by_its_handler_then_succeeding_rolls_back(run, flavour):
    log = Log()
    decisions = Log()

    def flaky_unapply(config, deps, value):
        log.add(("unapply", value))
        if len(log.of("unapply")) == 1:
            raise Fail("busy")

    def on_unapply_error(config, deps, error, attempt):
        decisions.add(("decide", (str(error), attempt, dict(deps))))
        return True

    branches = [
        kira.Branch("a", **recorded(flavour, log, "a")),
        kira.Branch(
            "b",
            flavoured(flavour, lambda config, deps: "B"),
            ("a",),
            unapply=flavoured(flavour, flaky_unapply),
            on_unapply_error=flavoured(flavour, on_unapply_error),
        ),
        kira.Branch("c", failing(flavour), ("b",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    assert log.of("unapply") == ["B", "B", "a"]
    assert decisions.of("decide") == [("busy", 1, {"a": "A"})]
    assert info.value.unapplied == ("b", "a")
    assert [(e.branch, e.phase, e.attempt) for e in info.value.errors] == [
        ("c", "apply", 1),
        ("b", "unapply", 1),
    ]


def test_an_apply_error_handler_that_raises_gives_up_and_records_its_error(run, flavour, caplog):
    log = Log()
    attempts: list[int] = []

    def apply(config, deps):
        attempts.append(1)
        raise Fail("original")

    def handler(config, deps, error, attempt):
        raise RuntimeError("handler broke")

    branches = [
        kira.Branch("a", **recorded(flavour, log, "a")),
        kira.Branch(
            "b", flavoured(flavour, apply), ("a",), on_apply_error=flavoured(flavour, handler)
        ),
    ]
    with caplog.at_level(logging.ERROR, logger="kira"), pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    err = info.value
    assert len(attempts) == 1
    assert err.unapplied == ("a",)
    assert len(err.errors) == 1
    culprit = err.culprit
    assert (culprit.branch, culprit.phase, culprit.attempt) == ("b", "apply", 1)
    assert str(culprit.error) == "original"  # the original error, with the handler's
    assert isinstance(culprit.handler_error, RuntimeError)
    assert str(culprit.handler_error) == "handler broke"
    assert err.errors[0] == culprit
    assert any("handler broke" in r.getMessage() for r in caplog.records)


def test_an_unapply_error_handler_that_raises_gives_up_the_unapply(run, flavour):
    def unapply(config, deps, value):
        raise Fail("undo failed")

    def handler(config, deps, error, attempt):
        raise RuntimeError("handler broke")

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, lambda config, deps: 1),
            unapply=flavoured(flavour, unapply),
            on_unapply_error=flavoured(flavour, handler),
        ),
        kira.Branch("b", failing(flavour), ("a",)),
    ]
    with pytest.raises(kira.RollbackIncomplete) as info:
        run(None, branches)
    assert info.value.still_applied == ("a",)
    last = info.value.errors[-1]
    assert (last.branch, last.phase, last.attempt) == ("a", "unapply", 1)
    assert isinstance(last.handler_error, RuntimeError)


@pytest.mark.parametrize(
    "decision", [42, "yes", 1.5, object()], ids=["42", "str", "float", "object"]
)
def test_an_apply_error_handler_returning_a_non_decision_gives_up(run, flavour, caplog, decision):
    attempts: list[int] = []

    def apply(config, deps):
        attempts.append(1)
        raise Fail("x")

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, apply),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: decision),
        )
    ]
    with caplog.at_level(logging.ERROR, logger="kira"), pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    assert len(attempts) == 1
    assert info.value.culprit.branch == "a"
    assert info.value.culprit.handler_error is None
    assert any(repr(decision) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("decision", [False, None])
def test_an_apply_error_handler_giving_up(run, flavour, decision):
    attempts: list[int] = []

    def apply(config, deps):
        attempts.append(1)
        raise Fail("x")

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, apply),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: decision),
        )
    ]
    with pytest.raises(kira.RolledBack):
        run(None, branches)
    assert len(attempts) == 1


def test_an_on_event_callback_that_raises_is_logged_and_ignored(run, flavour, caplog):
    seen: list[str] = []

    def on_event(event):
        seen.append(event.kind)
        raise RuntimeError("observer broke")

    branches = [
        kira.Branch("a", flavoured(flavour, lambda config, deps: 1)),
        kira.Branch("b", flavoured(flavour, lambda config, deps: deps["a"] + 1), ("a",)),
    ]
    with caplog.at_level(logging.ERROR, logger="kira"):
        assert run(None, branches, on_event=on_event) == {"a": 1, "b": 2}
    assert seen[-1] == "run_finished"
    assert "applied" in seen
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "kira"]
    assert errors
    assert any(r.exc_info and "observer broke" in str(r.exc_info[1]) for r in errors)


def test_an_on_event_callback_that_raises_does_not_change_a_rollback(run, flavour):
    log = Log()

    def on_event(event):
        raise RuntimeError("observer broke")

    branches = [
        kira.Branch("a", **recorded(flavour, log, "a")),
        kira.Branch("b", failing(flavour), ("a",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, on_event=on_event)
    assert info.value.unapplied == ("a",)


def rollback_signal():
    """An on_event callback, and the Event it sets when the rollback starts."""
    started = threading.Event()

    def on_event(event):
        if event.kind == "rollback_started":
            started.set()

    return started, on_event


def test_a_sibling_applying_when_another_fails_is_let_finish_then_unapplied(run, flavour):
    log = Log()
    started, on_event = rollback_signal()

    def sibling_sync(config, deps):
        wait(started)
        log.add(("apply", "sibling"))
        return "S"

    async def sibling_async(config, deps):
        await await_event(started)
        log.add(("apply", "sibling"))
        return "S"

    def unapply_sibling(config, deps, value):
        log.add(("unapply", ("sibling", value)))

    branches = [
        kira.Branch("base", **recorded(flavour, log, "base")),
        kira.Branch(
            "sibling",
            sibling_sync if flavour == "sync" else sibling_async,
            ("base",),
            unapply=flavoured(flavour, unapply_sibling),
        ),
        kira.Branch("after", **recorded(flavour, log, "after"), dependencies=("sibling",)),
        kira.Branch("bad", failing(flavour), ("base",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, on_event=on_event)
    err = info.value
    assert log.of("apply") == ["base", "sibling"]  # "after" never started
    assert log.of("unapply") == [("sibling", "S"), "base"]
    assert err.unapplied == ("sibling", "base")
    assert err.results == {"base": "BASE", "sibling": "S"}
    assert err.culprit.branch == "bad"


def test_a_sibling_failing_during_the_rollback_is_recorded_not_retried(run, flavour):
    log = Log()
    started, on_event = rollback_signal()

    def sibling_sync(config, deps):
        log.add(("apply", "sibling"))
        wait(started)
        raise Fail("sibling failed too")

    async def sibling_async(config, deps):
        log.add(("apply", "sibling"))
        await await_event(started)
        raise Fail("sibling failed too")

    def on_sibling_error(config, deps, error, attempt):
        log.add(("consulted", attempt))
        return True

    branches = [
        kira.Branch("base", **recorded(flavour, log, "base")),
        kira.Branch(
            "sibling",
            sibling_sync if flavour == "sync" else sibling_async,
            ("base",),
            on_apply_error=flavoured(flavour, on_sibling_error),
        ),
        kira.Branch("bad", failing(flavour, "bad"), ("base",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, on_event=on_event)
    err = info.value
    assert log.of("apply") == ["base", "sibling"]
    assert log.of("consulted") == []
    assert err.unapplied == ("base",)
    assert [(e.branch, e.phase, e.attempt) for e in err.errors] == [
        ("bad", "apply", 1),
        ("sibling", "apply", 1),
    ]
    assert err.culprit.branch == "bad"


def test_a_retry_waiting_when_the_rollback_starts_is_given_up(run, flavour):
    log = Log()
    scheduled = threading.Event()

    def on_event(event):
        if event.kind == "retry_scheduled":
            scheduled.set()

    def waiting(config, deps):
        log.add(("apply", "waiting"))
        raise Fail("retry in a minute")

    def bad_sync(config, deps):
        wait(scheduled)
        raise Fail("bad")

    async def bad_async(config, deps):
        await await_event(scheduled)
        raise Fail("bad")

    branches = [
        kira.Branch(
            "waiting",
            flavoured(flavour, waiting),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: kira.RetryAfter(60)),
        ),
        kira.Branch("bad", bad_sync if flavour == "sync" else bad_async),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, on_event=on_event)  # does not wait the minute
    assert log.of("apply") == ["waiting"]
    assert info.value.culprit.branch == "bad"


LEVELS = {
    "r1": (),
    "r2": (),
    "m1": ("r1",),
    "m2": ("r1", "r2"),
    "m3": ("r2",),
    "l1": ("m1", "m2"),
    "l2": ("m2", "m3"),
    "l3": ("m3",),
}


@pytest.mark.parametrize("max_workers", [None, 1])
def test_nested_rollback_unapplies_each_branch_after_its_dependents(run, flavour, max_workers):
    log = Log()
    events = Log()

    def make(name):
        def apply(config, deps):
            return name

        def unapply_sync(config, deps, value):
            log.add(("start", name))
            time.sleep(0.01)  # let siblings overlap
            log.add(("end", name))

        async def unapply_async(config, deps, value):
            log.add(("start", name))
            await asyncio.sleep(0.01)
            log.add(("end", name))

        return kira.Branch(
            name,
            flavoured(flavour, apply),
            LEVELS[name],
            unapply=unapply_sync if flavour == "sync" else unapply_async,
        )

    branches = [make(name) for name in LEVELS]
    branches.append(kira.Branch("f", failing(flavour), ("l1", "l2", "l3")))
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, max_workers=max_workers, on_event=events.add)
    order = [(kind, name) for kind, name in log.items]
    dependents = {name: [d for d, deps in LEVELS.items() if name in deps] for name in LEVELS}
    for name in LEVELS:
        start = order.index(("start", name))
        for dependent in dependents[name]:
            assert order.index(("end", dependent)) < start, (name, dependent, order)
    unapplied = info.value.unapplied
    assert sorted(unapplied) == sorted(LEVELS)
    for name in LEVELS:
        for dependent in dependents[name]:
            assert unapplied.index(dependent) < unapplied.index(name)
    assert list(unapplied) == [e.branch for e in events.items if e.kind == "unapplied"]
    if max_workers == 1:  # one at a time: the finishing order is unambiguous
        assert list(unapplied) == log.of("end")
