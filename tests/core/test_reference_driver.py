"""`kira.testing.run_reference`: the driver's decisions, run inline and deterministically."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

import kira
from kira.testing import FakeClock, InjectedFault, Returns, ScriptedFailure, run_reference

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Recorder:
    """Callbacks that log their calls; results are given per branch."""

    def __init__(self, results=None, fail=()):
        self.results = results or {}
        self.fail = set(fail)
        self.calls = []

    def apply(self, name):
        def apply(config, deps):
            self.calls.append(("apply", name, dict(deps)))
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            result = self.results.get(name, f"{name}-value")
            return result(config, deps) if callable(result) else result

        return apply

    def unapply(self, name):
        def unapply(config, deps, value):
            self.calls.append(("unapply", name, dict(deps), value))

        return unapply

    def branch(self, name, deps=(), *, unapply=True, **kwargs):
        return kira.Branch(
            name,
            self.apply(name),
            deps,
            unapply=self.unapply(name) if unapply else None,
            **kwargs,
        )

    def order(self, kind):
        return [c[1] for c in self.calls if c[0] == kind]


def run(branches, **kwargs):
    """run_reference with a fake clock at T0 and events collected; returns
    (results or the RunFailed raised, events)."""
    events = []
    kwargs.setdefault("clock", FakeClock(T0))
    try:
        outcome = run_reference(
            kwargs.pop("config", None), branches, on_event=events.append, **kwargs
        )
    except kira.RunFailed as exc:
        outcome = exc
    return outcome, events


def kinds(events):
    return [(e.kind, e.branch) for e in events]


def always(decision):
    calls = []

    def handler(config, deps, error, attempt):
        calls.append((error, attempt))
        return decision

    handler.calls = calls
    return handler


# ---------------------------------------------------------------------------------
# applying


def test_kiras_example():
    # a = 1 and b = 2 computed in parallel, then c = a + b
    config = {"a": 1, "b": 2}

    def get_a(config, deps):
        return config["a"] + 1

    def get_b(config, deps):
        return config["b"] + 1

    def get_c(config, deps):
        return deps["get_a"] + deps["get_b"]

    branches = [
        kira.Branch("get_a", get_a),
        kira.Branch("get_b", get_b),
        kira.Branch("get_c", get_c, ("get_a", "get_b")),
    ]
    results, events = run(branches, config=config)
    assert results == {"get_a": 2, "get_b": 3, "get_c": 5}
    # get_a and get_b both started before either finished: in parallel
    seq = kinds(events)
    assert seq.index(("apply_started", "get_b")) < seq.index(("applied", "get_a"))
    assert seq.index(("apply_started", "get_c")) > seq.index(("applied", "get_b"))


def test_diamond_results_and_deps():
    rec = Recorder(
        {
            "a": 1,
            "b": lambda config, deps: deps["a"] * 10,
            "c": lambda config, deps: deps["a"] + 5,
            "d": lambda config, deps: deps["b"] + deps["c"],
        }
    )
    branches = [
        rec.branch("d", ("c", "b")),
        rec.branch("b", ("a",)),
        rec.branch("c", ("a",)),
        rec.branch("a"),
    ]
    results, _ = run(branches)
    assert results == {"a": 1, "b": 10, "c": 6, "d": 16}
    (d_call,) = [c for c in rec.calls if c[1] == "d"]
    assert d_call[2] == {"c": 6, "b": 10}
    assert list(d_call[2]) == ["c", "b"]  # the branch's dependency order
    assert rec.order("apply")[0] == "a"
    assert rec.order("apply")[-1] == "d"
    assert rec.order("unapply") == []


def test_callbacks_get_the_config_and_a_read_only_deps_mapping():
    config = object()
    seen = []

    def apply(cfg, deps):
        seen.append((cfg, deps))
        return len(seen)

    results, _ = run([kira.Branch("a", apply), kira.Branch("b", apply, ("a",))], config=config)
    assert results == {"a": 1, "b": 2}
    assert all(cfg is config for cfg, _ in seen)
    deps = seen[1][1]
    assert isinstance(deps, Mapping)
    assert dict(deps) == {"a": 1}
    with pytest.raises(TypeError):
        deps["a"] = 2  # type: ignore[index]


def test_async_callbacks():
    async def apply(config, deps):
        return sum(deps.values()) + 1

    unapplied = []

    async def unapply(config, deps, value):
        unapplied.append(value)

    async def on_error(config, deps, error, attempt):
        return attempt < 2

    branches = [
        kira.Branch("a", apply, unapply=unapply),
        kira.Branch("b", apply, ("a",), on_apply_error=on_error),
    ]
    assert run_reference(None, branches, script={"b": ["fail"]}) == {"a": 1, "b": 2}
    with pytest.raises(kira.RolledBack):
        run_reference(None, branches, script={"b": ["fail", "fail"]})
    assert unapplied == [1]


def test_empty_branch_list_returns_an_empty_dict():
    results, events = run([])
    assert results == {}
    assert kinds(events) == [("run_finished", None)]
    assert events[0].value == "applied"


def test_scripted_returns_skips_the_callback():
    rec = Recorder()
    results, _ = run([rec.branch("a"), rec.branch("b", ("a",))], script={"a": [Returns({"k": 1})]})
    assert results == {"a": {"k": 1}, "b": "b-value"}
    assert rec.calls == [("apply", "b", {"a": {"k": 1}})]


def test_scripted_exception_reaches_the_handler():
    error = KeyError("scripted")
    handler = always(False)
    outcome, _ = run(
        [kira.Branch("a", Recorder().apply("a"), on_apply_error=handler)], script={"a": [error]}
    )
    assert isinstance(outcome, kira.RolledBack)
    assert handler.calls == [(error, 1)]
    assert outcome.culprit.error is error


# ---------------------------------------------------------------------------------
# retries


def test_fail_then_succeed_with_a_retry_callback():
    rec = Recorder()
    handler_calls = []

    def on_error(config, deps, error, attempt):
        handler_calls.append((type(error), error.attempt, attempt, dict(deps)))
        return True

    branches = [rec.branch("a"), rec.branch("x", ("a",), on_apply_error=on_error)]
    results, events = run(branches, script={"x": ["fail", "fail"]})
    assert results == {"a": "a-value", "x": "x-value"}
    assert handler_calls == [
        (ScriptedFailure, 1, 1, {"a": "a-value"}),
        (ScriptedFailure, 2, 2, {"a": "a-value"}),
    ]
    assert rec.order("apply") == ["a", "x"]  # the real apply ran once, on attempt 3
    started = [e.attempt for e in events if e.kind == "apply_started" and e.branch == "x"]
    assert started == [1, 2, 3]
    applied = [e for e in events if e.kind == "applied" and e.branch == "x"]
    assert [(e.attempt, e.value) for e in applied] == [(3, "x-value")]
    retries = [e for e in events if e.kind == "retry_scheduled"]
    assert [(e.branch, e.attempt, e.value) for e in retries] == [("x", 2, 0.0), ("x", 3, 0.0)]


def test_retry_after_advances_the_fake_clock():
    clock = FakeClock(T0)
    times = []

    def apply(config, deps):
        times.append(clock())
        return "ok"

    def on_error(config, deps, error, attempt):
        return kira.RetryAfter(30 * attempt)

    branches = [kira.Branch("x", apply, on_apply_error=on_error)]
    results, events = run(branches, clock=clock, script={"x": ["fail", "fail"]})
    assert results == {"x": "ok"}
    assert times == [T0 + timedelta(seconds=90)]
    at = {(e.kind, e.attempt): e.at - T0 for e in events if e.branch == "x"}
    assert at[("apply_started", 1)] == timedelta(0)
    assert at[("apply_failed", 1)] == timedelta(0)
    assert at[("retry_scheduled", 2)] == timedelta(0)
    assert at[("apply_started", 2)] == timedelta(seconds=30)
    assert at[("retry_scheduled", 3)] == timedelta(seconds=30)
    assert at[("apply_started", 3)] == timedelta(seconds=90)
    assert at[("applied", 3)] == timedelta(seconds=90)
    scheduled = [e.value for e in events if e.kind == "retry_scheduled"]
    assert scheduled == [30, 60]
    assert events[-1].at == T0 + timedelta(seconds=90)


def test_retry_after_zero_retries_at_once():
    clock = FakeClock(T0)
    results, events = run(
        [kira.Branch("x", Recorder().apply("x"), on_apply_error=always(kira.RetryAfter(0)))],
        clock=clock,
        script={"x": ["fail"]},
    )
    assert results == {"x": "x-value"}
    assert clock() == T0
    assert all(e.at == T0 for e in events)


def test_other_branches_go_on_while_a_retry_waits():
    rec = Recorder()
    branches = [
        rec.branch("slow", on_apply_error=always(kira.RetryAfter(10))),
        rec.branch("other"),
        rec.branch("after_other", ("other",)),
    ]
    results, events = run(branches, script={"slow": ["fail"]})
    assert set(results) == {"slow", "other", "after_other"}
    done_at = {e.branch: e.at - T0 for e in events if e.kind == "applied"}
    assert done_at == {
        "other": timedelta(0),
        "after_other": timedelta(0),
        "slow": timedelta(seconds=10),
    }


def test_retry_policy_exhausted_rolls_back():
    rec = Recorder()
    policy = kira.retry_policy(attempts=3, backoff=1.0, multiplier=2.0, jitter=False)
    branches = [rec.branch("ok"), rec.branch("x", ("ok",), on_apply_error=policy)]
    outcome, events = run(branches, script={"x": ["fail", "fail", "fail", "fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert [(e.branch, e.phase, e.attempt) for e in outcome.errors] == [
        ("x", "apply", 1),
        ("x", "apply", 2),
        ("x", "apply", 3),
    ]
    assert [e.at - T0 for e in outcome.errors] == [
        timedelta(0),
        timedelta(seconds=1),
        timedelta(seconds=3),
    ]
    assert outcome.culprit is outcome.errors[-1]
    assert outcome.culprit.attempt == 3
    assert outcome.unapplied == ("ok",)
    assert outcome.results == {"ok": "ok-value"}
    assert [e.attempt for e in events if e.kind == "apply_started" and e.branch == "x"] == [
        1,
        2,
        3,
    ]
    (failed,) = [e for e in events if e.kind == "failed"]
    assert (failed.branch, failed.attempt, failed.value) == ("x", 3, "apply")


def test_no_callback_gives_up_at_once():
    outcome, events = run([kira.Branch("x", Recorder().apply("x"))], script={"x": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert len(outcome.errors) == 1
    assert [e.kind for e in events].count("apply_started") == 1


@pytest.mark.parametrize("decision", [False, None])
def test_false_or_none_gives_up(decision):
    handler = always(decision)
    outcome, _ = run(
        [kira.Branch("x", Recorder().apply("x"), on_apply_error=handler)], script={"x": ["fail"]}
    )
    assert isinstance(outcome, kira.RolledBack)
    assert len(handler.calls) == 1


# ---------------------------------------------------------------------------------
# rolling back


def test_rollback_order_on_a_chain():
    rec = Recorder({"a": "A", "b": "B", "c": "C"})
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",)),
        rec.branch("c", ("b",)),
        rec.branch("d", ("c",)),
    ]
    outcome, _ = run(branches, script={"d": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.unapplied == ("c", "b", "a")
    assert rec.order("unapply") == ["c", "b", "a"]
    unapplies = {c[1]: (c[2], c[3]) for c in rec.calls if c[0] == "unapply"}
    assert unapplies == {"c": ({"b": "B"}, "C"), "b": ({"a": "A"}, "B"), "a": ({}, "A")}
    assert outcome.results == {"a": "A", "b": "B", "c": "C"}
    assert outcome.culprit.branch == "d"
    assert outcome.culprit.phase == "apply"
    assert isinstance(outcome.culprit.error, ScriptedFailure)
    assert outcome.run_id == "reference"


def test_rollback_order_on_a_diamond():
    rec = Recorder()
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",)),
        rec.branch("c", ("a",)),
        rec.branch("d", ("b", "c")),
        rec.branch("e", ("d",)),
    ]
    outcome, _ = run(branches, script={"e": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    order = outcome.unapplied
    assert order[0] == "d"
    assert set(order[1:3]) == {"b", "c"}
    assert order[3] == "a"
    assert len(order) == 4
    assert rec.order("unapply") == list(order)


def test_rollback_unapplies_only_what_applied():
    rec = Recorder()
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",)),
        rec.branch("bad", ("a",)),
        rec.branch("never", ("bad",)),
    ]
    outcome, _ = run(branches, script={"bad": ["fail"], "b": ["ok"]})
    assert isinstance(outcome, kira.RolledBack)
    assert set(outcome.unapplied) == {"a", "b"}
    assert outcome.unapplied[-1] == "a"
    assert "never" not in rec.order("apply")


def test_unapply_none_counts_as_unapplied_in_order():
    rec = Recorder()
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",), unapply=False),
        rec.branch("c", ("b",)),
        rec.branch("x", ("c",)),
    ]
    outcome, events = run(branches, script={"x": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.unapplied == ("c", "b", "a")
    assert rec.order("unapply") == ["c", "a"]
    seq = kinds(events)
    assert seq.index(("unapplied", "c")) < seq.index(("unapply_started", "b"))
    assert seq.index(("unapply_started", "b")) < seq.index(("unapplied", "b"))
    assert seq.index(("unapplied", "b")) < seq.index(("unapply_started", "a"))
    (b_done,) = [e for e in events if e.kind == "unapplied" and e.branch == "b"]
    assert b_done.value == "b-value"


def test_an_apply_still_running_at_rollback_is_not_retried():
    rec = Recorder()
    handler = always(True)
    branches = [rec.branch("bad"), rec.branch("late", on_apply_error=handler)]
    outcome, events = run(branches, script={"bad": ["fail"], "late": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert handler.calls == []
    assert [(e.branch, e.attempt) for e in outcome.errors] == [("bad", 1), ("late", 1)]
    assert outcome.culprit.branch == "bad"
    assert [e.attempt for e in events if e.kind == "apply_started" and e.branch == "late"] == [1]


def test_an_apply_still_running_at_rollback_that_succeeds_is_unapplied():
    rec = Recorder()
    branches = [rec.branch("bad"), rec.branch("late")]
    outcome, events = run(branches, script={"bad": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.unapplied == ("late",)
    assert outcome.results == {"late": "late-value"}
    seq = kinds(events)
    assert seq.index(("rollback_started", "bad")) < seq.index(("applied", "late"))


def test_a_pending_retry_is_dropped_when_the_rollback_starts():
    rec = Recorder()
    waiting = always(kira.RetryAfter(60))
    branches = [
        rec.branch("waits", on_apply_error=waiting),
        rec.branch("ok"),
        rec.branch("bad", ("ok",)),
    ]
    outcome, events = run(branches, script={"waits": ["fail"], "bad": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.culprit.branch == "bad"
    assert [e.attempt for e in events if e.kind == "apply_started" and e.branch == "waits"] == [1]
    assert outcome.unapplied == ("ok",)
    assert "waits" not in rec.order("apply")


def test_unapply_failure_without_retry_leaves_it_and_its_dependencies_applied():
    rec = Recorder()
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",)),
        rec.branch("c", ("b",)),
        rec.branch("side"),
        rec.branch("x", ("c", "side")),
    ]
    outcome, events = run(branches, script={"x": ["fail"], ("c", "unapply"): ["fail"]})
    assert isinstance(outcome, kira.RollbackIncomplete)
    assert set(outcome.still_applied) == {"a", "b", "c"}
    assert outcome.unapplied == ("side",)
    assert outcome.abandoned == ()
    assert [(e.branch, e.phase, e.attempt) for e in outcome.errors] == [
        ("x", "apply", 1),
        ("c", "unapply", 1),
    ]
    assert outcome.culprit.branch == "x"
    assert rec.order("unapply") == ["side"]
    assert outcome.results == {"a": "a-value", "b": "b-value", "c": "c-value", "side": "side-value"}
    assert ("failed", "c") in kinds(events)
    assert events[-1].value == "rollback_incomplete"


def test_unapply_failure_with_a_successful_retry():
    rec = Recorder()
    handler = always(True)
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",), on_unapply_error=handler),
        rec.branch("x", ("b",)),
    ]
    outcome, events = run(branches, script={"x": ["fail"], ("b", "unapply"): ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.unapplied == ("b", "a")
    assert len(handler.calls) == 1
    assert isinstance(handler.calls[0][0], ScriptedFailure)
    assert handler.calls[0][1] == 1
    started = [e.attempt for e in events if e.kind == "unapply_started" and e.branch == "b"]
    assert started == [1, 2]
    assert [(e.branch, e.phase, e.attempt) for e in outcome.errors] == [
        ("x", "apply", 1),
        ("b", "unapply", 1),
    ]


def test_unapply_failure_with_retries_exhausted():
    rec = Recorder()
    policy = kira.retry_policy(attempts=2, backoff=5.0, jitter=False)
    branches = [
        rec.branch("a"),
        rec.branch("b", ("a",), on_unapply_error=policy),
        rec.branch("x", ("b",)),
    ]
    outcome, _ = run(branches, script={"x": ["fail"], ("b", "unapply"): ["fail", "fail"]})
    assert isinstance(outcome, kira.RollbackIncomplete)
    assert set(outcome.still_applied) == {"a", "b"}
    assert outcome.unapplied == ()
    unapply_errors = [e for e in outcome.errors if e.phase == "unapply"]
    assert [(e.attempt, e.at - T0) for e in unapply_errors] == [
        (1, timedelta(0)),
        (2, timedelta(seconds=5)),
    ]


def test_rolled_back_error_lists_errors_oldest_first():
    clock = FakeClock(T0)
    branches = [
        kira.Branch("a", Recorder().apply("a"), on_apply_error=always(kira.RetryAfter(1))),
        kira.Branch("b", Recorder().apply("b"), ("a",)),
    ]
    outcome, _ = run(branches, clock=clock, script={"a": ["fail"], "b": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert [(e.branch, e.at - T0) for e in outcome.errors] == [
        ("a", timedelta(0)),
        ("b", timedelta(seconds=1)),
    ]
    assert all(e.at.utcoffset() == timedelta(0) for e in outcome.errors)


def test_custom_run_id_is_carried():
    outcome, events = run(
        [kira.Branch("x", Recorder().apply("x"))], run_id="run-42", script={"x": ["fail"]}
    )
    assert outcome.run_id == "run-42"
    assert {e.run_id for e in events} == {"run-42"}


# ---------------------------------------------------------------------------------
# misbehaving callbacks


def test_error_handler_raising_gives_up_and_is_recorded(caplog):
    broken = RuntimeError("handler broke")

    def on_error(config, deps, error, attempt):
        raise broken

    rec = Recorder()
    branches = [rec.branch("ok"), rec.branch("x", ("ok",), on_apply_error=on_error)]
    with caplog.at_level(logging.ERROR, logger="kira"):
        outcome, events = run(branches, script={"x": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.culprit.branch == "x"
    assert isinstance(outcome.culprit.error, ScriptedFailure)
    assert outcome.culprit.handler_error is broken
    assert outcome.errors == [outcome.culprit]
    assert outcome.unapplied == ("ok",)
    assert [e.attempt for e in events if e.kind == "apply_started" and e.branch == "x"] == [1]
    assert "handler broke" in caplog.text


def test_unapply_error_handler_raising_gives_up(caplog):
    broken = ValueError("unapply handler broke")

    def on_error(config, deps, error, attempt):
        raise broken

    rec = Recorder()
    branches = [rec.branch("a", on_unapply_error=on_error), rec.branch("x", ("a",))]
    with caplog.at_level(logging.ERROR, logger="kira"):
        outcome, _ = run(branches, script={"x": ["fail"], ("a", "unapply"): ["fail"]})
    assert isinstance(outcome, kira.RollbackIncomplete)
    assert outcome.still_applied == ("a",)
    unapply_error = outcome.errors[-1]
    assert (unapply_error.branch, unapply_error.phase) == ("a", "unapply")
    assert unapply_error.handler_error is broken
    assert "unapply handler broke" in caplog.text


@pytest.mark.parametrize("decision", [42, 1, 0, "yes", 2.5, [True]])
def test_handler_returning_a_non_decision_gives_up_and_logs(decision, caplog):
    handler = always(decision)
    rec = Recorder()
    branches = [rec.branch("ok"), rec.branch("x", ("ok",), on_apply_error=handler)]
    with caplog.at_level(logging.ERROR, logger="kira"):
        outcome, events = run(branches, script={"x": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert len(handler.calls) == 1
    assert outcome.culprit.branch == "x"
    assert [e.attempt for e in events if e.kind == "apply_started" and e.branch == "x"] == [1]
    assert repr(decision) in caplog.text
    assert "'x'" in caplog.text
    assert any(r.levelno >= logging.ERROR for r in caplog.records)


def test_on_event_raising_does_not_break_the_run(caplog):
    seen = []

    def on_event(event):
        seen.append(event.kind)
        raise RuntimeError("listener broke")

    rec = Recorder()
    branches = [rec.branch("a"), rec.branch("b", ("a",))]
    with caplog.at_level(logging.ERROR, logger="kira"):
        results = run_reference(None, branches, on_event=on_event)
    assert results == {"a": "a-value", "b": "b-value"}
    assert seen == ["apply_started", "applied", "apply_started", "applied", "run_finished"]
    assert "listener broke" in caplog.text
    assert "on_event" in caplog.text


def test_on_event_raising_during_a_rollback(caplog):
    def on_event(event):
        raise KeyError("listener broke")

    rec = Recorder()
    branches = [rec.branch("a"), rec.branch("x", ("a",))]
    with caplog.at_level(logging.ERROR, logger="kira"), pytest.raises(kira.RolledBack) as info:
        run_reference(None, branches, on_event=on_event, script={"x": ["fail"]})
    assert info.value.unapplied == ("a",)
    assert "listener broke" in caplog.text


# ---------------------------------------------------------------------------------
# limits and faults


def in_flight_profile(events):
    """The number of attempts under way after each event."""
    running = 0
    profile = []
    for e in events:
        if e.kind in ("apply_started", "unapply_started"):
            running += 1
        elif e.kind in ("applied", "apply_failed", "unapplied", "unapply_failed"):
            running -= 1
        profile.append(running)
    return profile


@pytest.mark.parametrize("max_workers", [1, 2, 3])
def test_max_workers_is_respected(max_workers):
    rec = Recorder()
    branches = [rec.branch(f"r{i}") for i in range(6)]
    branches += [rec.branch(f"s{i}", (f"r{i}",)) for i in range(6)]
    results, events = run(branches, max_workers=max_workers)
    assert len(results) == 12
    profile = in_flight_profile(events)
    assert max(profile) == max_workers
    assert profile[-1] == 0


def test_max_workers_is_respected_through_retries_and_rollback():
    rec = Recorder()
    branches = [rec.branch(f"r{i}", on_apply_error=always(True)) for i in range(5)]
    branches.append(rec.branch("bad", tuple(f"r{i}" for i in range(5))))
    script = {f"r{i}": ["fail"] for i in range(5)}
    script["bad"] = ["fail"]
    outcome, events = run(branches, max_workers=2, script=script)
    assert isinstance(outcome, kira.RolledBack)
    assert len(outcome.unapplied) == 5
    profile = in_flight_profile(events)
    assert max(profile) == 2
    assert min(profile) >= 0


def test_no_limit_starts_every_ready_branch_at_once():
    rec = Recorder()
    branches = [rec.branch(f"r{i}") for i in range(7)]
    _, events = run(branches)
    assert max(in_flight_profile(events)) == 7
    assert [e.kind for e in events[:7]] == ["apply_started"] * 7


def test_fault_at_raises_injected_fault_before_that_command():
    rec = Recorder()
    branches = [rec.branch("a"), rec.branch("b"), rec.branch("c", ("a", "b"))]
    with pytest.raises(InjectedFault):
        run_reference(None, branches, fault_at=1)
    assert rec.calls == []
    with pytest.raises(InjectedFault) as info:
        run_reference(None, branches, fault_at=3)
    assert rec.order("apply") == ["a", "b"]
    assert "3" in str(info.value)
    assert not isinstance(info.value, Exception)  # nothing may swallow it


def test_fault_past_the_end_changes_nothing():
    rec = Recorder()
    assert run_reference(None, [rec.branch("a")], fault_at=100) == {"a": "a-value"}


# ---------------------------------------------------------------------------------
# exact event sequences


def test_events_of_a_small_successful_run():
    rec = Recorder({"a": 1, "b": 2})
    results, events = run([rec.branch("a"), rec.branch("b", ("a",))])
    assert results == {"a": 1, "b": 2}
    assert [(e.kind, e.branch, e.attempt) for e in events] == [
        ("apply_started", "a", 1),
        ("applied", "a", 1),
        ("apply_started", "b", 1),
        ("applied", "b", 1),
        ("run_finished", None, None),
    ]
    assert [e.value for e in events if e.kind == "applied"] == [1, 2]
    assert events[-1].value == "applied"
    assert all(e.at == T0 and e.run_id == "reference" for e in events)


def test_events_of_a_small_rolled_back_run():
    rec = Recorder({"a": 1})
    outcome, events = run([rec.branch("a"), rec.branch("b", ("a",))], script={"b": ["fail"]})
    assert isinstance(outcome, kira.RolledBack)
    assert kinds(events) == [
        ("apply_started", "a"),
        ("applied", "a"),
        ("apply_started", "b"),
        ("apply_failed", "b"),
        ("failed", "b"),
        ("rollback_started", "b"),
        ("unapply_started", "a"),
        ("unapplied", "a"),
        ("run_finished", None),
    ]
    by_kind = {e.kind: e for e in events}
    assert isinstance(by_kind["apply_failed"].error, ScriptedFailure)
    assert by_kind["rollback_started"].error is by_kind["apply_failed"].error
    assert by_kind["unapplied"].value == 1
    assert by_kind["run_finished"].value == "rolled_back"


def test_events_of_a_retried_branch():
    rec = Recorder()
    _, events = run([rec.branch("x", on_apply_error=always(True))], script={"x": ["fail"]})
    assert [(e.kind, e.branch, e.attempt) for e in events] == [
        ("apply_started", "x", 1),
        ("apply_failed", "x", 1),
        ("retry_scheduled", "x", 2),
        ("apply_started", "x", 2),
        ("applied", "x", 2),
        ("run_finished", None, None),
    ]


def test_events_of_an_incomplete_rollback():
    rec = Recorder()
    outcome, events = run(
        [rec.branch("a"), rec.branch("b", ("a",))],
        script={"b": ["fail"], ("a", "unapply"): ["fail"]},
    )
    assert isinstance(outcome, kira.RollbackIncomplete)
    assert outcome.still_applied == ("a",)
    assert kinds(events) == [
        ("apply_started", "a"),
        ("applied", "a"),
        ("apply_started", "b"),
        ("apply_failed", "b"),
        ("failed", "b"),
        ("rollback_started", "b"),
        ("unapply_started", "a"),
        ("unapply_failed", "a"),
        ("failed", "a"),
        ("run_finished", None),
    ]
    assert [e.value for e in events if e.kind == "failed"] == ["apply", "unapply"]


_DETERMINISM_SCRIPT = """
import kira
from kira.testing import run_reference

def apply(config, deps):
    return sorted(deps)

names = ["n%d" % i for i in range(12)]
branches = []
for i, name in enumerate(names):
    deps = tuple(names[j] for j in range(i) if (i * 7 + j * 3) % 5 == 0)
    branches.append(kira.Branch(name, apply, deps, unapply=lambda c, d, v: None))
events = []
try:
    run_reference(None, branches, script={"n11": ["fail"]}, max_workers=3,
                  on_event=events.append)
except kira.RolledBack as exc:
    print(exc.unapplied)
print([(e.kind, e.branch, e.attempt) for e in events])
"""


def test_runs_do_not_depend_on_hash_seed():
    outputs = set()
    for seed in ("0", "1", "4242"):
        result = subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1
    unapplied, sequence = outputs.pop().splitlines()
    assert "n0" in unapplied
    assert "'rollback_started', 'n11'" in sequence
