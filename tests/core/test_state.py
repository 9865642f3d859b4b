"""Unit tests of `kira.RuntimeState`, `BranchState` and `Progress`: every method, every
(task state x action) pair of the transition table, and every extra precondition."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

import pytest

import kira
from kira import (
    DoneApplied,
    DoneUnapplied,
    Failed,
    NotStarted,
    RunningApply,
    RunningApplyRetry,
    RunningUnapply,
    RunningUnapplyRetry,
    RuntimeStateError,
    UnapplyFailed,
)
from kira._state import _ALLOWED, ACTIONS, TASK_STATES
from kira.testing import FakeClock


def noop(config, deps):
    return None


def graph(*specs):
    """Branches from `"name"` or `("name", "dep", ...)` specs, in this order."""
    out = []
    for spec in specs:
        name, *deps = (spec,) if isinstance(spec, str) else spec
        out.append(kira.Branch(name, noop, tuple(deps)))
    return out


def make(*specs, clock=None, config=None):
    return kira.RuntimeState.create(config, graph(*specs), clock=clock or FakeClock())


def apply(state, name, value=None, task_id=None):
    """Apply `name` successfully (first attempt)."""
    state.mark_as_applying(name, task_id if task_id is not None else f"apply:{name}")
    state.mark_as_applied(name, value if value is not None else f"value:{name}")


def apply_all(state):
    while (name := state.next_apply_ready()) is not None:
        apply(state, name)


def snapshot(state):
    """Everything observable about `state` through its public interface."""
    p = state.progress
    branches = {
        name: (
            bs.task,
            bs.errors,
            bs.apply_attempts,
            bs.unapply_attempts,
            bs.lingering,
            bs.awaiting,
            bs.awaiting_unapply,
        )
        for name, bs in state.branch_states.items()
    }
    return {
        "order": list(state.branch_states),
        "branches": branches,
        "running": dict(state.running),
        "progress": (
            p.total,
            p.applied,
            p.unapplied,
            frozenset(p.applies_running),
            frozenset(p.applies_retrying),
            frozenset(p.unapplies_running),
            frozenset(p.unapplies_retrying),
        ),
        "apply_ready": state.find_apply_ready(),
        "unapply_ready": state.find_unapply_ready(),
        "next": (state.next_apply_ready(), state.next_unapply_ready()),
        "done": (state.apply_done(), state.unapply_done()),
        "rolling_back": state.rolling_back,
        "errors": state.get_errors(),
        "results": state.get_done(),
    }


def refused(state, fn, *args, **kwargs):
    """Call a transition that must be refused; check it changed nothing."""
    before = snapshot(state)
    with pytest.raises(RuntimeStateError) as info:
        fn(*args, **kwargs)
    assert snapshot(state) == before
    return info.value


# ---------------------------------------------------------------------------------
# create, fields, BranchState, Progress


def test_create_builds_a_fresh_state_in_definition_order():
    config = {"k": 1}
    state = kira.RuntimeState.create(config, graph("b", ("c", "b"), "a"), 3.0)
    assert state.config is config
    assert state.timeout == 3.0
    assert list(state.branch_states) == ["b", "c", "a"]
    assert all(isinstance(bs, kira.BranchState) for bs in state.branch_states.values())
    assert all(bs.task == NotStarted() for bs in state.branch_states.values())
    assert state.running == {}
    assert not state.rolling_back
    p = state.progress
    assert isinstance(p, kira.Progress)
    assert (p.total, p.applied, p.unapplied) == (3, 0, 0)
    assert p.applies_running == p.applies_retrying == set()
    assert p.unapplies_running == p.unapplies_retrying == set()
    assert state.get_errors() == []
    assert state.get_done() == {}


def test_create_keeps_each_branch_definition():
    branches = graph("a", ("b", "a"))
    state = kira.RuntimeState.create(None, branches)
    assert state.get_branch("a").branch is branches[0]
    assert state.get_branch("b").branch is branches[1]
    assert state.get_branch("b").name == "b"


def test_create_with_no_branches():
    state = make()
    assert state.apply_done()
    assert state.unapply_done()
    assert state.find_apply_ready() == frozenset()
    assert state.next_apply_ready() is None


def test_branch_state_edges():
    state = make("a", "b", ("c", "b", "a"), ("d", "a"), ("e", "c", "d"))
    a, c, e = state.get_branch("a"), state.get_branch("c"), state.get_branch("e")
    assert a.blocking == ("c", "d")  # dependents in definition order
    assert c.blocking == ("e",)
    assert e.blocking == ()
    assert c.blocking_unapply == ("b", "a")  # dependencies in the branch's order
    assert a.blocking_unapply == ()
    assert c.awaiting == {"a", "b"}
    assert e.awaiting == {"c", "d"}
    assert a.awaiting == frozenset()
    assert a.awaiting_unapply == frozenset()
    assert a.task == NotStarted()
    assert a.errors == ()
    assert a.apply_attempts == a.unapply_attempts == 0
    assert a.lingering == 0


def test_awaiting_shrinks_as_dependencies_apply():
    state = make("a", "b", ("c", "a", "b"))
    apply(state, "a")
    assert state.get_branch("c").awaiting == {"b"}
    state.mark_as_applying("b", 1)
    assert state.get_branch("c").awaiting == {"b"}
    state.mark_as_applied("b", 2)
    assert state.get_branch("c").awaiting == frozenset()


def test_branch_state_repr_names_branch_and_task():
    state = make("a")
    state.mark_as_applying("a", 42)
    text = repr(state.get_branch("a"))
    assert "'a'" in text
    assert "RunningApply" in text
    assert "42" in text


def test_task_states_are_frozen_values():
    assert RunningApply(1) == RunningApply(1)
    assert RunningApply(1) != RunningApplyRetry(1)
    assert DoneApplied([1]) == DoneApplied([1])
    assert RunningUnapply(1, "v").value == "v"
    assert UnapplyFailed("v").value == "v"
    with pytest.raises(AttributeError):
        RunningApply(1).task_id = 2  # type: ignore[misc]
    assert set(TASK_STATES) == {
        NotStarted,
        RunningApply,
        RunningApplyRetry,
        RunningUnapply,
        RunningUnapplyRetry,
        Failed,
        DoneApplied,
        DoneUnapplied,
        UnapplyFailed,
    }


def test_progress_follows_a_whole_run():
    state = make("a", ("b", "a"), "c")
    p = state.progress
    state.mark_as_applying("a", 1)
    state.mark_as_applying("c", 2)
    assert p.applies_running == {"a", "c"}
    state.record_failure("c", ValueError())
    assert p.applies_running == {"a", "c"}  # failed, awaiting a decision: still running
    state.record_apply_retry("c", 3)
    assert p.applies_running == {"a"}
    assert p.applies_retrying == {"c"}
    state.mark_as_applied("a", "A")
    assert (p.applied, p.applies_running) == (1, set())
    state.record_failure("c", ValueError())
    state.mark_as_failed("c")
    assert p.applies_retrying == set()
    assert p.applied == 1
    state.mark_as_unapplying("a", 4)
    assert p.unapplies_running == {"a"}
    assert p.applied == 1  # counts branches whose apply succeeded, unapplied or not
    state.record_failure("a", OSError())
    state.record_unapply_retry("a", 5)
    assert p.unapplies_running == set()
    assert p.unapplies_retrying == {"a"}
    state.mark_as_unapplied("a")
    assert p.unapplies_retrying == set()
    assert (p.total, p.applied, p.unapplied) == (3, 1, 1)
    assert state.progress is p


# ---------------------------------------------------------------------------------
# queries


def test_apply_done_when_every_branch_applied():
    state = make("a", ("b", "a"))
    assert not state.apply_done()
    apply(state, "a")
    assert not state.apply_done()
    state.mark_as_applying("b", 1)
    assert not state.apply_done()
    state.mark_as_applied("b", 2)
    assert state.apply_done()


def test_apply_done_false_when_a_branch_failed():
    state = make("a", "b")
    apply(state, "a")
    state.mark_as_applying("b", 1)
    state.record_failure("b", ValueError())
    state.mark_as_failed("b")
    assert not state.apply_done()


def test_find_apply_ready_tracks_dependencies():
    state = make("a", "b", ("c", "a", "b"), ("d", "c"), "e")
    assert state.find_apply_ready() == {"a", "b", "e"}
    state.mark_as_applying("a", 1)
    assert state.find_apply_ready() == {"b", "e"}  # running: no longer ready
    state.mark_as_applied("a", 1)
    assert state.find_apply_ready() == {"b", "e"}
    apply(state, "b")
    assert state.find_apply_ready() == {"c", "e"}
    apply(state, "c")
    assert state.find_apply_ready() == {"d", "e"}
    assert isinstance(state.find_apply_ready(), frozenset)


def test_find_apply_ready_is_empty_once_rolling_back():
    state = make("a", "b")
    state.start_rollback()
    assert state.find_apply_ready() == frozenset()
    assert state.next_apply_ready() is None


def test_next_apply_ready_is_the_first_ready_branch_in_definition_order():
    state = make("z", "y", ("m", "y"), ("k", "z"), "x")
    assert state.next_apply_ready() == "z"
    state.mark_as_applying("z", 1)
    assert state.next_apply_ready() == "y"
    state.mark_as_applying("y", 2)
    state.mark_as_applied("y", 0)  # m becomes ready after x, but is defined before it
    assert state.next_apply_ready() == "m"
    state.mark_as_applying("m", 3)
    assert state.next_apply_ready() == "x"
    state.mark_as_applied("z", 0)  # k is defined before x: it goes first
    assert state.next_apply_ready() == "k"
    state.mark_as_applying("k", 4)
    assert state.next_apply_ready() == "x"
    state.mark_as_applying("x", 5)
    assert state.next_apply_ready() is None


def test_next_apply_ready_is_always_a_member_of_find_apply_ready():
    state = make("a", "b", ("c", "a"), ("d", "a", "b"))
    while (name := state.next_apply_ready()) is not None:
        assert name in state.find_apply_ready()
        apply(state, name)
    assert state.find_apply_ready() == frozenset()
    assert state.apply_done()


def test_find_unapply_ready_is_empty_until_rolling_back():
    state = make("a", ("b", "a"))
    apply_all(state)
    assert state.find_unapply_ready() == frozenset()
    assert state.next_unapply_ready() is None
    state.start_rollback()
    assert state.find_unapply_ready() == {"b"}
    assert state.next_unapply_ready() == "b"


def test_next_unapply_ready_walks_the_rollback():
    state = make("a", ("b", "a"), "c", ("d", "c"))
    apply_all(state)
    state.start_rollback()
    order = []
    while (name := state.next_unapply_ready()) is not None:
        assert name in state.find_unapply_ready()
        assert state.next_unapply_ready() == name  # a query: asking again changes nothing
        state.mark_as_unapplying(name, ("u", name))
        assert state.next_unapply_ready() != name
        state.mark_as_unapplied(name)
        order.append(name)
    assert sorted(order) == ["a", "b", "c", "d"]
    assert order.index("b") < order.index("a")
    assert order.index("d") < order.index("c")
    assert state.unapply_done()


def test_ready_to_unapply_when_applied_and_awaiting_unapply_empty():
    state = make("a", ("b", "a"), ("c", "a"), "d")
    apply_all(state)
    state.start_rollback()
    assert state.find_unapply_ready() == {"b", "c", "d"}
    for name in ("a", "b", "c", "d"):
        bs = state.get_branch(name)
        ready = type(bs.task) is DoneApplied and not bs.awaiting_unapply
        assert (name in state.find_unapply_ready()) == ready
    assert state.get_branch("a").awaiting_unapply == {"b", "c"}


def test_unapply_order_on_a_diamond():
    state = make("a", ("b", "a"), ("c", "a"), ("d", "b", "c"))
    apply_all(state)
    state.start_rollback()
    assert state.find_unapply_ready() == {"d"}
    state.mark_as_unapplying("d", "u-d")
    assert state.find_unapply_ready() == frozenset()
    state.mark_as_unapplied("d")
    assert state.find_unapply_ready() == {"b", "c"}
    state.mark_as_unapplying("b", "u-b")
    state.mark_as_unapplied("b")
    assert state.find_unapply_ready() == {"c"}
    assert state.get_branch("a").awaiting_unapply == {"c"}
    state.mark_as_unapplying("c", "u-c")
    state.mark_as_unapplied("c")
    assert state.find_unapply_ready() == {"a"}
    assert not state.unapply_done()
    state.mark_as_unapplying("a", "u-a")
    assert not state.unapply_done()
    state.mark_as_unapplied("a")
    assert state.unapply_done()
    assert state.progress.unapplied == 4


def test_get_branch():
    state = make("a")
    assert state.get_branch("a") is state.branch_states["a"]


@pytest.mark.parametrize("name", ["nope", "", None, 1])
def test_get_branch_unknown(name):
    state = make("a")
    err = refused(state, state.get_branch, name)
    assert err.action == "get_branch"
    assert repr(name) in str(err)


def test_get_branch_unhashable_name():
    state = make("a")
    err = refused(state, state.get_branch, ["a"])
    assert "['a']" in str(err)


def test_unknown_branch_error_names_the_branch():
    state = make("a")
    with pytest.raises(RuntimeStateError) as info:
        state.mark_as_applying("nope", 1)
    # `.branch` names the branch as given, like every other RuntimeStateError
    assert info.value.branch == "nope"
    assert info.value.action == "mark_as_applying"


def test_task_id_lookups():
    state = make("a", "b")
    state.mark_as_applying("a", ("task", 1))
    state.mark_as_applying("b", 7)
    assert state.get_branch_task_id("a") == ("task", 1)
    assert state.get_branch_task_id("b") == 7
    assert state.get_branch_from_task_id(("task", 1)) is state.get_branch("a")
    assert state.get_branch_from_task_id(7) is state.get_branch("b")
    state.record_failure("b", ValueError())
    state.record_apply_retry("b", 8)
    assert state.get_branch_task_id("b") == 8
    assert state.get_branch_from_task_id(8) is state.get_branch("b")
    refused(state, state.get_branch_from_task_id, 7)


@pytest.mark.parametrize("task_id", [99, "x", None, ("task", 2)])
def test_get_branch_from_unknown_task_id(task_id):
    state = make("a")
    state.mark_as_applying("a", ("task", 1))
    err = refused(state, state.get_branch_from_task_id, task_id)
    assert err.action == "get_branch_from_task_id"
    assert repr(task_id) in str(err)


def test_get_branch_from_unhashable_task_id():
    state = make("a")
    state.mark_as_applying("a", 1)
    refused(state, state.get_branch_from_task_id, [1])


def test_get_branch_from_task_id_of_a_finished_attempt():
    state = make("a")
    apply(state, "a", task_id=5)
    refused(state, state.get_branch_from_task_id, 5)


@pytest.mark.parametrize("how", ["not_started", "applied", "failed"])
def test_get_branch_task_id_of_a_branch_not_running(how):
    state = make("a")
    if how == "applied":
        apply(state, "a")
    elif how == "failed":
        state.mark_as_applying("a", 1)
        state.record_failure("a", ValueError())
        state.mark_as_failed("a")
    err = refused(state, state.get_branch_task_id, "a")
    assert err.branch == "a"
    assert "not running" in str(err)


def test_get_branch_task_id_unknown_branch():
    state = make("a")
    refused(state, state.get_branch_task_id, "nope")


def test_resolve_dependencies_of_in_dependency_order():
    state = make("a", "b", ("c", "b", "a"))
    apply(state, "a", value=1)
    apply(state, "b", value=[2])
    deps = state.resolve_dependencies_of("c")
    assert deps == {"b": [2], "a": 1}
    assert list(deps) == ["b", "a"]
    assert state.resolve_dependencies_of("a") == {}
    deps["b"] = "changed"  # a fresh dict: the state is not affected
    assert state.resolve_dependencies_of("c") == {"b": [2], "a": 1}


def test_resolve_dependencies_of_keeps_values_through_unapplying():
    state = make("a", ("b", "a"))
    apply(state, "a", value="A")
    apply(state, "b", value="B")
    state.start_rollback()
    state.mark_as_unapplying("b", 1)
    assert state.resolve_dependencies_of("b") == {"a": "A"}
    state.record_failure("b", ValueError())
    state.record_unapply_retry("b", 2)
    assert state.resolve_dependencies_of("b") == {"a": "A"}


def test_resolve_dependencies_of_without_results():
    state = make("a", "b", ("c", "a", "b"))
    apply(state, "a")
    state.mark_as_applying("b", 1)
    err = refused(state, state.resolve_dependencies_of, "c")
    assert err.branch == "c"
    assert "b" in err.reason
    assert "'a'" not in err.reason and ", a" not in err.reason


def test_resolve_dependencies_of_unknown_branch():
    state = make("a")
    refused(state, state.resolve_dependencies_of, "zzz")


def test_get_done_lists_applied_results_in_definition_order():
    state = make("c", "a", "b", ("d", "a"))
    apply(state, "b", value=2)
    apply(state, "a", value=1)
    state.mark_as_applying("c", 9)
    assert state.get_done() == {"a": 1, "b": 2}
    assert list(state.get_done()) == ["a", "b"]
    apply(state, "d", value=4)
    state.mark_as_applied("c", 3)
    assert list(state.get_done().items()) == [("c", 3), ("a", 1), ("b", 2), ("d", 4)]
    state.start_rollback()
    state.mark_as_unapplying("d", 10)
    assert "d" not in state.get_done()
    state.mark_as_unapplied("d")
    assert state.get_done() == {"c": 3, "a": 1, "b": 2}


# ---------------------------------------------------------------------------------
# applying


def test_mark_as_applying():
    state = make("a", "b", ("c", "a", "b"))
    apply(state, "a")
    apply(state, "b")
    state.mark_as_applying("c", "t")
    c = state.get_branch("c")
    assert c.task == RunningApply("t")
    assert c.apply_attempts == 1
    assert state.running == {"t": "c"}
    assert state.progress.applies_running == {"c"}
    assert "c" not in state.find_apply_ready()


def test_applying_puts_the_branch_in_awaiting_unapply_of_each_dependency():
    state = make("a", "b", ("c", "a", "b"), ("d", "a"))
    apply(state, "a")
    apply(state, "b")
    assert state.get_branch("a").awaiting_unapply == frozenset()
    state.mark_as_applying("c", 1)
    assert state.get_branch("a").awaiting_unapply == {"c"}
    assert state.get_branch("b").awaiting_unapply == {"c"}
    state.mark_as_applying("d", 2)
    assert state.get_branch("a").awaiting_unapply == {"c", "d"}
    state.start_rollback()
    # held by running applies: not ready to unapply
    assert state.find_unapply_ready() == frozenset()
    assert not state.unapply_done()


def test_applying_with_unapplied_dependencies_is_refused():
    state = make("a", "b", ("c", "a", "b"))
    apply(state, "a")
    state.mark_as_applying("b", 1)
    err = refused(state, state.mark_as_applying, "c", 2)
    assert err.branch == "c"
    assert err.action == "mark_as_applying"
    assert "b" in err.reason


def test_applying_during_rollback_is_refused():
    state = make("a", "b")
    state.start_rollback()
    err = refused(state, state.mark_as_applying, "a", 1)
    assert "rolling back" in err.reason


def test_applying_with_a_task_id_of_another_running_branch_is_refused():
    state = make("a", "b")
    state.mark_as_applying("a", "same")
    err = refused(state, state.mark_as_applying, "b", "same")
    assert err.branch == "b"
    assert "'same'" in str(err)


def test_applying_with_an_unhashable_task_id_is_refused():
    state = make("a")
    refused(state, state.mark_as_applying, "a", ["not", "hashable"])


def test_a_finished_task_id_may_be_reused():
    state = make("a", "b")
    apply(state, "a", task_id=1)
    state.mark_as_applying("b", 1)
    assert state.running == {1: "b"}


def test_mark_as_applied_makes_dependents_ready():
    state = make("a", ("b", "a"), ("c", "a"))
    state.mark_as_applying("a", 1)
    state.mark_as_applied("a", {"v": 1})
    a = state.get_branch("a")
    assert a.task == DoneApplied({"v": 1})
    assert state.running == {}
    assert state.progress.applied == 1
    assert state.find_apply_ready() == {"b", "c"}
    assert state.get_done() == {"a": {"v": 1}}


def test_mark_as_applied_after_a_retry():
    state = make("a")
    state.mark_as_applying("a", 1)
    state.record_failure("a", ValueError())
    state.record_apply_retry("a", 2)
    state.mark_as_applied("a", "ok")
    assert state.get_branch("a").task == DoneApplied("ok")
    assert state.get_branch("a").apply_attempts == 2
    assert state.running == {}
    assert state.progress.applies_retrying == set()


def test_mark_as_applied_after_a_recorded_failure_is_refused():
    state = make("a")
    state.mark_as_applying("a", 1)
    state.record_failure("a", ValueError())
    err = refused(state, state.mark_as_applied, "a", 1)
    assert "failed" in err.reason


def test_an_apply_running_when_the_rollback_starts_may_still_succeed():
    state = make("a", ("b", "a"))
    apply(state, "a")
    state.mark_as_applying("b", 1)
    state.start_rollback()
    assert state.find_unapply_ready() == frozenset()
    state.mark_as_applied("b", "B")
    assert state.find_unapply_ready() == {"b"}
    assert not state.unapply_done()


def test_an_apply_running_when_the_rollback_starts_may_fail():
    state = make("a", ("b", "a"))
    apply(state, "a")
    state.mark_as_applying("b", 1)
    state.start_rollback()
    state.record_failure("b", ValueError())
    refused(state, state.record_apply_retry, "b", 2)
    state.mark_as_failed("b")
    assert state.find_unapply_ready() == {"a"}


def test_record_failure_keeps_the_error_stamped():
    clock = FakeClock(datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    state = make("a", clock=clock)
    state.mark_as_applying("a", 1)
    clock.advance(2.5)
    error = ValueError("first")
    record = state.record_failure("a", error)
    assert isinstance(record, kira.BranchError)
    assert record.branch == "a"
    assert record.phase == "apply"
    assert record.error is error
    assert record.attempt == 1
    assert record.at == datetime(2024, 5, 6, 7, 8, 11, 500000, tzinfo=UTC)
    assert record.at.utcoffset() == timedelta(0)
    assert record.handler_error is None
    assert state.get_branch("a").errors == (record,)
    assert state.get_errors() == [record]
    # the branch stays running until retried or given up
    assert state.get_branch("a").task == RunningApply(1)
    assert state.running == {1: "a"}


def test_record_failure_of_an_unapply():
    state = make("a")
    apply(state, "a")
    state.start_rollback()
    state.mark_as_unapplying("a", 1)
    first = state.record_failure("a", OSError("u1"))
    state.record_unapply_retry("a", 2)
    second = state.record_failure("a", OSError("u2"))
    assert (first.phase, first.attempt) == ("unapply", 1)
    assert (second.phase, second.attempt) == ("unapply", 2)
    assert state.get_branch("a").task == RunningUnapplyRetry(2, "value:a")


def test_record_failure_twice_for_one_attempt_is_refused():
    state = make("a")
    state.mark_as_applying("a", 1)
    state.record_failure("a", ValueError())
    err = refused(state, state.record_failure, "a", ValueError())
    assert "already recorded" in err.reason


def test_record_failure_needs_an_exception():
    state = make("a")
    state.mark_as_applying("a", 1)
    before = snapshot(state)
    with pytest.raises(TypeError):
        state.record_failure("a", "not an exception")
    assert snapshot(state) == before


def test_record_failure_uses_the_injected_clock_for_every_record():
    clock = FakeClock()
    state = make("a", "b", clock=clock)
    start = clock()
    state.mark_as_applying("a", 1)
    state.mark_as_applying("b", 2)
    state.record_failure("b", ValueError("b1"))
    clock.advance(1)
    state.record_failure("a", ValueError("a1"))
    clock.advance(1)
    state.record_apply_retry("b", 3)
    state.record_failure("b", ValueError("b2"))
    errors = state.get_errors()
    assert [(e.branch, e.attempt, str(e.error)) for e in errors] == [
        ("b", 1, "b1"),
        ("a", 1, "a1"),
        ("b", 2, "b2"),
    ]
    assert [(e.at - start).total_seconds() for e in errors] == [0, 1, 2]
    assert all(e.at.tzinfo is not None for e in errors)


def test_default_clock_is_aware_utc():
    state = kira.RuntimeState.create(None, graph("a"))
    before = datetime.now(UTC)
    state.mark_as_applying("a", 1)
    record = state.record_failure("a", ValueError())
    after = datetime.now(UTC)
    assert record.at.utcoffset() == timedelta(0)
    assert before <= record.at <= after


def test_record_apply_retry():
    state = make("a", "b", ("c", "a"))
    apply(state, "a")
    state.mark_as_applying("c", 1)
    state.record_failure("c", ValueError())
    state.record_apply_retry("c", 2)
    c = state.get_branch("c")
    assert c.task == RunningApplyRetry(2)
    assert c.apply_attempts == 2
    assert state.running == {2: "c"}
    assert state.progress.applies_running == set()
    assert state.progress.applies_retrying == {"c"}
    assert state.get_branch("a").awaiting_unapply == {"c"}
    state.record_failure("c", ValueError())
    state.record_apply_retry("c", 3)
    assert c.apply_attempts == 3
    assert c.task == RunningApplyRetry(3)
    assert state.running == {3: "c"}


def test_retry_without_a_recorded_failure_is_refused():
    state = make("a", "b")
    state.mark_as_applying("a", 1)
    err = refused(state, state.record_apply_retry, "a", 2)
    assert "not failed" in err.reason
    apply(state, "b")
    state.start_rollback()
    state.mark_as_unapplying("b", 3)
    err = refused(state, state.record_unapply_retry, "b", 4)
    assert "not failed" in err.reason


def test_retrying_an_apply_during_rollback_is_refused():
    state = make("a", "b")
    state.mark_as_applying("a", 1)
    state.record_failure("a", ValueError())
    state.start_rollback()
    err = refused(state, state.record_apply_retry, "a", 2)
    assert "rolling back" in err.reason


def test_retrying_with_a_task_id_of_another_running_branch_is_refused():
    state = make("a", "b")
    state.mark_as_applying("a", 1)
    state.mark_as_applying("b", 2)
    state.record_failure("a", ValueError())
    refused(state, state.record_apply_retry, "a", 2)


def test_mark_as_failed():
    state = make("a", ("b", "a"), "c")
    apply(state, "a")
    state.mark_as_applying("b", 1)
    state.record_failure("b", ValueError())
    state.mark_as_failed("b")
    b = state.get_branch("b")
    assert b.task == Failed()
    assert state.running == {}
    assert state.rolling_back
    assert state.find_apply_ready() == frozenset()  # "c" will never start now
    assert state.progress.applies_running == set()


def test_mark_as_failed_stops_blocking_the_dependencies_unapply():
    state = make("a", ("b", "a"))
    apply(state, "a")
    state.mark_as_applying("b", 1)
    assert state.get_branch("a").awaiting_unapply == {"b"}
    state.record_failure("b", ValueError())
    assert state.get_branch("a").awaiting_unapply == {"b"}
    state.mark_as_failed("b")
    assert state.get_branch("a").awaiting_unapply == frozenset()
    assert state.find_unapply_ready() == {"a"}


def test_give_up_without_a_recorded_failure_is_refused():
    state = make("a", "b")
    state.mark_as_applying("a", 1)
    err = refused(state, state.mark_as_failed, "a")
    assert "failure" in err.reason
    assert not state.rolling_back
    apply(state, "b")
    state.start_rollback()
    state.mark_as_unapplying("b", 2)
    err = refused(state, state.mark_as_unapply_failed, "b")
    assert "failure" in err.reason


def test_start_rollback_is_idempotent():
    state = make("a", ("b", "a"))
    apply(state, "a")
    assert not state.rolling_back
    state.start_rollback()
    first = snapshot(state)
    state.start_rollback()
    assert snapshot(state) == first
    assert state.rolling_back
    assert state.find_unapply_ready() == {"a"}
    assert state.find_apply_ready() == frozenset()


# ---------------------------------------------------------------------------------
# unapplying


def test_mark_as_unapplying():
    state = make("a", ("b", "a"))
    apply(state, "a", value="A")
    apply(state, "b", value="B")
    state.start_rollback()
    state.mark_as_unapplying("b", "u")
    b = state.get_branch("b")
    assert b.task == RunningUnapply("u", "B")
    assert b.unapply_attempts == 1
    assert state.running == {"u": "b"}
    assert state.progress.unapplies_running == {"b"}
    assert state.find_unapply_ready() == frozenset()
    assert state.get_branch("a").awaiting_unapply == {"b"}  # unapplying still holds


def test_unapplying_outside_rollback_is_refused():
    state = make("a")
    apply(state, "a")
    err = refused(state, state.mark_as_unapplying, "a", 1)
    assert "not rolling back" in err.reason


def test_unapplying_while_a_dependent_holds_it_is_refused():
    state = make("a", ("b", "a"), ("c", "a"))
    apply_all(state)
    state.start_rollback()
    err = refused(state, state.mark_as_unapplying, "a", 1)
    assert "b, c" in err.reason
    state.mark_as_unapplying("b", 2)
    err = refused(state, state.mark_as_unapplying, "a", 1)
    assert "b, c" in err.reason
    state.mark_as_unapplied("b")
    err = refused(state, state.mark_as_unapplying, "a", 1)
    assert err.reason.endswith("c")


def test_unapplying_with_a_task_id_of_another_running_branch_is_refused():
    state = make("a", "b")
    apply_all(state)
    state.start_rollback()
    state.mark_as_unapplying("a", 1)
    refused(state, state.mark_as_unapplying, "b", 1)


def test_record_unapply_retry_keeps_the_value():
    state = make("a")
    apply(state, "a", value=("the", "value"))
    state.start_rollback()
    state.mark_as_unapplying("a", 1)
    state.record_failure("a", OSError())
    state.record_unapply_retry("a", 2)
    a = state.get_branch("a")
    assert a.task == RunningUnapplyRetry(2, ("the", "value"))
    assert a.unapply_attempts == 2
    assert state.running == {2: "a"}
    assert state.progress.unapplies_retrying == {"a"}
    assert state.progress.unapplies_running == set()


def test_mark_as_unapplied_releases_the_dependencies():
    state = make("a", ("b", "a"))
    apply_all(state)
    state.start_rollback()
    state.mark_as_unapplying("b", 1)
    state.mark_as_unapplied("b")
    b = state.get_branch("b")
    assert b.task == DoneUnapplied()
    assert state.running == {}
    assert state.progress.unapplied == 1
    assert state.get_branch("a").awaiting_unapply == frozenset()
    assert state.find_unapply_ready() == {"a"}
    assert "b" not in state.find_unapply_ready()


def test_mark_as_unapplied_after_a_retry():
    state = make("a", ("b", "a"))
    apply_all(state)
    state.start_rollback()
    state.mark_as_unapplying("b", 1)
    state.record_failure("b", OSError())
    state.record_unapply_retry("b", 2)
    assert state.find_unapply_ready() == frozenset()
    state.mark_as_unapplied("b")
    assert state.find_unapply_ready() == {"a"}
    assert state.progress.unapplies_retrying == set()


def test_mark_as_unapplied_after_a_recorded_failure_is_refused():
    state = make("a")
    apply(state, "a")
    state.start_rollback()
    state.mark_as_unapplying("a", 1)
    state.record_failure("a", OSError())
    refused(state, state.mark_as_unapplied, "a")


def test_mark_as_unapply_failed_keeps_it_and_its_dependencies_applied():
    state = make("a", ("b", "a"), ("c", "b"))
    apply(state, "a", value="A")
    apply(state, "b", value="B")
    apply(state, "c", value="C")
    state.start_rollback()
    state.mark_as_unapplying("c", 1)
    state.mark_as_unapplied("c")
    state.mark_as_unapplying("b", 2)
    state.record_failure("b", OSError())
    assert not state.unapply_done()
    state.mark_as_unapply_failed("b")
    assert state.get_branch("b").task == UnapplyFailed("B")
    assert state.get_branch("a").awaiting_unapply == {"b"}
    assert state.find_unapply_ready() == frozenset()
    assert state.running == {}
    assert state.get_done() == {"a": "A"}
    assert state.progress.unapplied == 1
    # "a" is stranded by its dependent's UnapplyFailed: rolling back is over
    assert state.unapply_done()
    refused(state, state.mark_as_unapplying, "a", 3)


def test_unblock_dependent_unapplies_is_a_check_when_nothing_is_held():
    state = make("a", ("b", "a"), ("c", "a"))
    apply(state, "a")
    before = snapshot(state)
    state.unblock_dependent_unapplies("b")  # NotStarted
    assert snapshot(state) == before
    state.mark_as_applying("c", 1)
    refused(state, state.unblock_dependent_unapplies, "c")
    state.record_failure("c", ValueError())
    state.mark_as_failed("c")
    before = snapshot(state)
    state.unblock_dependent_unapplies("c")  # Failed
    assert snapshot(state) == before
    assert state.find_unapply_ready() == {"a"}


# ---------------------------------------------------------------------------------
# unapply_done


def test_unapply_done_waits_for_running_applies():
    state = make("a", "b")
    apply(state, "a")
    state.mark_as_applying("b", 1)
    state.start_rollback()
    state.mark_as_unapplying("a", 2)
    state.mark_as_unapplied("a")
    assert not state.unapply_done()  # "b" still applying
    state.record_failure("b", ValueError())
    assert not state.unapply_done()  # failed but not given up yet
    state.mark_as_failed("b")
    assert state.unapply_done()


def test_unapply_done_waits_for_every_applied_branch():
    state = make("a", "b")
    apply_all(state)
    state.start_rollback()
    assert not state.unapply_done()
    state.mark_as_unapplying("a", 1)
    state.mark_as_unapplied("a")
    assert not state.unapply_done()
    state.mark_as_unapplying("b", 2)
    state.record_failure("b", OSError())
    state.record_unapply_retry("b", 3)
    assert not state.unapply_done()
    state.record_failure("b", OSError())
    state.mark_as_unapply_failed("b")
    assert state.unapply_done()


def test_unapply_done_with_a_stranded_diamond():
    state = make("a", ("b", "a"), ("c", "a"), ("d", "b", "c"))
    apply_all(state)
    state.start_rollback()
    state.mark_as_unapplying("d", 1)
    state.mark_as_unapplied("d")
    state.mark_as_unapplying("b", 2)
    state.record_failure("b", OSError())
    state.mark_as_unapply_failed("b")
    assert not state.unapply_done()  # "c" can still unapply
    assert state.find_unapply_ready() == {"c"}
    state.mark_as_unapplying("c", 3)
    state.mark_as_unapplied("c")
    assert state.find_unapply_ready() == frozenset()
    assert state.unapply_done()
    assert type(state.get_branch("a").task) is DoneApplied


def test_unapply_done_when_a_failure_left_nothing_applied():
    state = make("a")
    state.mark_as_applying("a", 1)
    state.record_failure("a", ValueError())
    state.mark_as_failed("a")
    assert state.unapply_done()


# ---------------------------------------------------------------------------------
# errors and handler errors


def test_get_errors_oldest_first_across_branches_and_phases():
    clock = FakeClock()
    state = make("a", "b", clock=clock)
    state.mark_as_applying("a", 1)
    state.mark_as_applying("b", 2)
    e1 = state.record_failure("a", ValueError("1"))
    clock.advance(1)
    state.record_apply_retry("a", 3)
    state.mark_as_applied("a", "A")
    e2 = state.record_failure("b", ValueError("2"))
    clock.advance(1)
    state.mark_as_failed("b")
    state.mark_as_unapplying("a", 4)
    e3 = state.record_failure("a", OSError("3"))
    errors = state.get_errors()
    assert errors == [e1, e2, e3]
    assert [(e.branch, e.phase, e.attempt) for e in errors] == [
        ("a", "apply", 1),
        ("b", "apply", 1),
        ("a", "unapply", 1),
    ]
    assert errors[0].at < errors[1].at < errors[2].at
    assert state.get_branch("a").errors == (e1, e3)
    assert state.get_branch("b").errors == (e2,)
    errors.clear()  # a copy
    assert len(state.get_errors()) == 3


def test_attach_handler_error():
    clock = FakeClock()
    state = make("a", "b", clock=clock)
    state.mark_as_applying("a", 1)
    state.mark_as_applying("b", 2)
    original = state.record_failure("a", ValueError("apply"))
    other = state.record_failure("b", ValueError("other"))
    clock.advance(5)
    handler_error = RuntimeError("handler")
    record = state.attach_handler_error("a", handler_error)
    assert record.handler_error is handler_error
    assert (record.branch, record.phase, record.error, record.attempt, record.at) == (
        original.branch,
        original.phase,
        original.error,
        original.attempt,
        original.at,
    )
    assert state.get_branch("a").errors == (record,)
    assert state.get_errors() == [record, other]
    state.mark_as_failed("a")  # the driver then gives up
    assert state.get_branch("a").task == Failed()


def test_attach_handler_error_replaces_only_the_latest_record():
    state = make("a")
    state.mark_as_applying("a", 1)
    first = state.record_failure("a", ValueError("1"))
    state.record_apply_retry("a", 2)
    state.record_failure("a", ValueError("2"))
    record = state.attach_handler_error("a", KeyError("h"))
    assert state.get_branch("a").errors == (first, record)
    assert state.get_errors() == [first, record]
    assert str(record.error) == "2"


def test_attach_handler_error_without_a_failure_is_refused():
    state = make("a")
    refused(state, state.attach_handler_error, "a", RuntimeError())
    state.mark_as_applying("a", 1)
    refused(state, state.attach_handler_error, "a", RuntimeError())
    state.record_failure("a", ValueError())
    state.record_apply_retry("a", 2)
    refused(state, state.attach_handler_error, "a", RuntimeError())
    refused(state, state.attach_handler_error, "nope", RuntimeError())


# ---------------------------------------------------------------------------------
# lingering attempts


def linger(state, name, task_id):
    """Start `name`'s apply, time it out, and leave the attempt lingering."""
    state.mark_as_applying(name, task_id)
    state.record_failure(name, kira.BranchTimeout(name, "apply", 1.0))
    state.mark_as_lingering(name)


def test_a_lingering_attempt_holds_dependencies_until_it_finishes():
    state = make("a", ("b", "a"))
    apply(state, "a")
    linger(state, "b", 1)
    assert state.get_branch("b").lingering == 1
    state.mark_as_failed("b")
    assert state.get_branch("a").awaiting_unapply == {"b"}
    assert state.find_unapply_ready() == frozenset()
    assert not state.unapply_done()
    refused(state, state.unblock_dependent_unapplies, "b")
    refused(state, state.mark_as_unapplying, "a", 2)
    state.mark_lingering_finished("b")
    assert state.get_branch("b").lingering == 0
    assert state.get_branch("a").awaiting_unapply == frozenset()
    assert state.find_unapply_ready() == {"a"}
    state.unblock_dependent_unapplies("b")
    state.mark_as_unapplying("a", 2)
    state.mark_as_unapplied("a")
    assert state.unapply_done()


def test_an_abandoned_attempt_holds_forever_but_lets_the_rollback_end():
    state = make("a", ("b", "a"), "c")
    apply(state, "a")
    apply(state, "c")
    linger(state, "b", 1)
    state.mark_as_failed("b")
    state.mark_as_unapplying("c", 2)
    state.mark_as_unapplied("c")
    assert not state.unapply_done()
    state.mark_lingering_finished("b", abandoned=True)
    assert state.get_branch("b").lingering == 0
    assert state.get_branch("a").awaiting_unapply == {"b"}
    assert state.find_unapply_ready() == frozenset()
    assert state.unapply_done()
    assert type(state.get_branch("a").task) is DoneApplied
    refused(state, state.unblock_dependent_unapplies, "b")
    refused(state, state.mark_lingering_finished, "b")


def test_lingering_then_retried_and_applied():
    state = make("a", ("b", "a"))
    apply(state, "a")
    linger(state, "b", 1)
    state.record_apply_retry("b", 2)
    state.mark_as_applied("b", "B")
    state.start_rollback()
    assert state.find_unapply_ready() == {"b"}
    state.mark_as_unapplying("b", 3)
    state.mark_as_unapplied("b")
    # the first attempt is still out: "a" stays held
    assert state.get_branch("a").awaiting_unapply == {"b"}
    assert state.find_unapply_ready() == frozenset()
    assert not state.unapply_done()
    state.mark_lingering_finished("b")
    assert state.find_unapply_ready() == {"a"}


def test_lingering_finished_while_the_branch_still_holds():
    state = make("a", ("b", "a"))
    apply(state, "a")
    linger(state, "b", 1)
    state.record_apply_retry("b", 2)
    state.mark_lingering_finished("b")
    assert state.get_branch("a").awaiting_unapply == {"b"}  # the retry still holds
    state.mark_as_applied("b", "B")
    state.start_rollback()
    state.mark_as_unapplying("b", 3)
    state.mark_as_unapplied("b")
    assert state.find_unapply_ready() == {"a"}


def test_two_lingering_attempts_must_both_finish():
    state = make("a", ("b", "a"))
    apply(state, "a")
    linger(state, "b", 1)
    state.record_apply_retry("b", 2)
    state.record_failure("b", kira.BranchTimeout("b", "apply", 1.0))
    state.mark_as_lingering("b")
    assert state.get_branch("b").lingering == 2
    state.mark_as_failed("b")
    state.mark_lingering_finished("b")
    assert state.find_unapply_ready() == frozenset()
    assert not state.unapply_done()
    state.mark_lingering_finished("b")
    assert state.find_unapply_ready() == {"a"}


def test_a_lingering_unapply_holds_dependencies_after_the_branch_unapplied():
    state = make("a", ("b", "a"))
    apply_all(state)
    state.start_rollback()
    state.mark_as_unapplying("b", 1)
    state.record_failure("b", kira.BranchTimeout("b", "unapply", 1.0))
    state.mark_as_lingering("b")
    state.record_unapply_retry("b", 2)
    state.mark_as_unapplied("b")
    assert state.find_unapply_ready() == frozenset()
    assert not state.unapply_done()
    state.mark_lingering_finished("b")
    assert state.find_unapply_ready() == {"a"}


def test_mark_as_lingering_needs_a_recorded_failure():
    state = make("a")
    state.mark_as_applying("a", 1)
    err = refused(state, state.mark_as_lingering, "a")
    assert "failure" in err.reason


def test_mark_as_lingering_twice_for_one_attempt_is_refused():
    # One timed-out attempt is one lingering thread; counting it twice would keep the
    # rollback from ever ending (only one mark_lingering_finished will come).
    state = make("a")
    linger(state, "a", 1)
    refused(state, state.mark_as_lingering, "a")


def test_a_new_attempt_after_set_branch_task_may_linger_too():
    # Restarting a branch with set_branch_task (as when restoring a run) begins new
    # attempts; one that times out is a second thread, distinct from the first.
    state = make("a")
    linger(state, "a", 1)
    state.set_branch_task("a", NotStarted())
    state.mark_as_applying("a", 2)
    state.record_failure("a", kira.BranchTimeout("a", "apply", 1.0))
    state.mark_as_lingering("a")
    assert state.get_branch("a").lingering == 2


def test_mark_lingering_finished_without_a_lingering_attempt_is_refused():
    state = make("a")
    err = refused(state, state.mark_lingering_finished, "a")
    assert "no lingering" in err.reason
    refused(state, state.mark_lingering_finished, "nope")


# ---------------------------------------------------------------------------------
# set_branch_task


def test_set_branch_task_keeps_the_bookkeeping():
    state = make("a", ("b", "a"))
    state.set_branch_task("a", RunningApply("t1"))
    assert state.running == {"t1": "a"}
    assert state.progress.applies_running == {"a"}
    assert state.get_branch("a").apply_attempts == 1
    assert state.find_apply_ready() == frozenset()
    state.set_branch_task("a", DoneApplied(5))
    assert state.running == {}
    assert state.progress.applies_running == set()
    assert state.progress.applied == 1
    assert state.find_apply_ready() == {"b"}
    assert state.get_done() == {"a": 5}
    assert state.apply_done() is False
    state.set_branch_task("b", DoneApplied(6))
    assert state.apply_done()
    state.set_branch_task("b", RunningUnapplyRetry("t2", 6))
    assert state.progress.unapplies_retrying == {"b"}
    assert state.get_branch("b").unapply_attempts == 1
    assert state.running == {"t2": "b"}
    state.set_branch_task("b", DoneUnapplied())
    assert state.progress.unapplied == 1
    state.start_rollback()
    assert state.find_unapply_ready() == {"a"}
    state.set_branch_task("a", NotStarted())
    assert state.progress.applied == 1  # only "b" now
    assert state.find_unapply_ready() == frozenset()
    assert state.get_branch("b").awaiting == {"a"}


def test_set_branch_task_back_to_not_started_unreadies_dependents():
    state = make("a", ("b", "a"))
    apply(state, "a")
    assert state.find_apply_ready() == {"b"}
    state.set_branch_task("a", NotStarted())
    assert state.find_apply_ready() == {"a"}
    assert state.progress.applied == 0
    refused(state, state.mark_as_applying, "b", 1)


def test_set_branch_task_clears_a_recorded_failure():
    state = make("a")
    state.mark_as_applying("a", 1)
    state.record_failure("a", ValueError())
    state.set_branch_task("a", RunningApplyRetry(2))
    assert state.running == {2: "a"}
    state.record_failure("a", ValueError())  # a new attempt may fail again
    assert len(state.get_errors()) == 2


@pytest.mark.parametrize("task", ["DoneApplied", DoneApplied, None, 1, object()])
def test_set_branch_task_needs_a_task_state_value(task):
    state = make("a")
    before = snapshot(state)
    with pytest.raises(TypeError):
        state.set_branch_task("a", task)
    assert snapshot(state) == before


def test_set_branch_task_refuses_a_task_id_of_another_running_branch():
    state = make("a", "b")
    state.mark_as_applying("a", 1)
    refused(state, state.set_branch_task, "b", RunningApply(1))
    refused(state, state.set_branch_task, "b", RunningUnapply(1, "v"))
    state.set_branch_task("a", RunningApplyRetry(1))  # its own id is fine
    assert state.running == {1: "a"}


def test_set_branch_task_unknown_branch():
    state = make("a")
    refused(state, state.set_branch_task, "nope", DoneApplied(1))


def test_repr_of_the_state():
    state = make("a", "b")
    apply(state, "a")
    state.mark_as_applying("b", 1)
    text = repr(state)
    assert "1/2 applied" in text
    assert "1 running" in text
    state.start_rollback()
    assert "rolling back" in repr(state)


# ---------------------------------------------------------------------------------
# the transition table: every task state x every action
#
# The branch under test is "x", in a graph dep -> x -> child ("x" depends on "dep").
# `reach` brings it to a task state through public transitions; `PREPARE` then
# satisfies the action's other preconditions where the task state allows.

EXPECTED_ALLOWED = {
    "mark_as_applying": {NotStarted},
    "record_failure": {RunningApply, RunningApplyRetry, RunningUnapply, RunningUnapplyRetry},
    "record_apply_retry": {RunningApply, RunningApplyRetry},
    "mark_as_applied": {RunningApply, RunningApplyRetry},
    "mark_as_failed": {RunningApply, RunningApplyRetry},
    "unblock_dependent_unapplies": {NotStarted, Failed, DoneUnapplied},
    "mark_as_unapplying": {DoneApplied},
    "record_unapply_retry": {RunningUnapply, RunningUnapplyRetry},
    "mark_as_unapplied": {RunningUnapply, RunningUnapplyRetry, UnapplyFailed},
    "mark_as_unapply_failed": {RunningUnapply, RunningUnapplyRetry},
    "mark_as_lingering": {RunningApply, RunningApplyRetry, RunningUnapply, RunningUnapplyRetry},
    "mark_lingering_finished": set(TASK_STATES),
}

RUNNING_STATES = (RunningApply, RunningApplyRetry, RunningUnapply, RunningUnapplyRetry)


def test_the_transition_table_is_the_specified_one():
    assert set(ACTIONS) == set(EXPECTED_ALLOWED)
    assert {a: set(s) for a, s in _ALLOWED.items()} == EXPECTED_ALLOWED


def reach(state, target, *, linger=False):
    """Bring "x" to task state `target` by public transitions. With `linger`, its first
    apply attempt times out and stays lingering."""
    apply(state, "dep", value="D")
    if target is NotStarted:
        if linger:
            state.mark_as_applying("x", "t1")
            state.record_failure("x", TimeoutError())
            state.mark_as_lingering("x")
            state.set_branch_task("x", NotStarted())
        return
    state.mark_as_applying("x", "t1")
    if linger:
        state.record_failure("x", TimeoutError())
        state.mark_as_lingering("x")
        state.record_apply_retry("x", "t1b")
    if target is RunningApply:
        if linger:
            state.set_branch_task("x", RunningApply("t1b"))
        return
    if target is RunningApplyRetry:
        state.record_failure("x", ValueError())
        state.record_apply_retry("x", "t2")
        return
    if target is Failed:
        state.record_failure("x", ValueError())
        state.mark_as_failed("x")
        return
    state.mark_as_applied("x", "X")
    if target is DoneApplied:
        return
    state.start_rollback()
    state.mark_as_unapplying("x", "t3")
    if target is RunningUnapply:
        return
    if target is RunningUnapplyRetry:
        state.record_failure("x", OSError())
        state.record_unapply_retry("x", "t4")
        return
    if target is DoneUnapplied:
        state.mark_as_unapplied("x")
        return
    assert target is UnapplyFailed
    state.record_failure("x", OSError())
    state.mark_as_unapply_failed("x")


def fail_if_running(state):
    if type(state.get_branch("x").task) in RUNNING_STATES:
        state.record_failure("x", ValueError("prepared"))


PREPARE = {
    "mark_as_applying": lambda state: None,
    "record_failure": lambda state: None,
    "record_apply_retry": fail_if_running,
    "mark_as_applied": lambda state: None,
    "mark_as_failed": fail_if_running,
    "unblock_dependent_unapplies": lambda state: None,
    "mark_as_unapplying": lambda state: state.start_rollback(),
    "record_unapply_retry": fail_if_running,
    "mark_as_unapplied": lambda state: None,
    "mark_as_unapply_failed": fail_if_running,
    "mark_as_lingering": fail_if_running,
    "mark_lingering_finished": lambda state: None,
}

CALL = {
    "mark_as_applying": lambda state: state.mark_as_applying("x", "new"),
    "record_failure": lambda state: state.record_failure("x", RuntimeError("new")),
    "record_apply_retry": lambda state: state.record_apply_retry("x", "new"),
    "mark_as_applied": lambda state: state.mark_as_applied("x", "new value"),
    "mark_as_failed": lambda state: state.mark_as_failed("x"),
    "unblock_dependent_unapplies": lambda state: state.unblock_dependent_unapplies("x"),
    "mark_as_unapplying": lambda state: state.mark_as_unapplying("x", "new"),
    "record_unapply_retry": lambda state: state.record_unapply_retry("x", "new"),
    "mark_as_unapplied": lambda state: state.mark_as_unapplied("x"),
    "mark_as_unapply_failed": lambda state: state.mark_as_unapply_failed("x"),
    "mark_as_lingering": lambda state: state.mark_as_lingering("x"),
    "mark_lingering_finished": lambda state: state.mark_lingering_finished("x"),
}

# The task state an accepted action leads to (None: unchanged).
RESULT = {
    "mark_as_applying": RunningApply,
    "record_failure": None,
    "record_apply_retry": RunningApplyRetry,
    "mark_as_applied": DoneApplied,
    "mark_as_failed": Failed,
    "unblock_dependent_unapplies": None,
    "mark_as_unapplying": RunningUnapply,
    "record_unapply_retry": RunningUnapplyRetry,
    "mark_as_unapplied": DoneUnapplied,
    "mark_as_unapply_failed": UnapplyFailed,
    "mark_as_lingering": None,
    "mark_lingering_finished": None,
}


def test_the_matrix_covers_every_action():
    assert set(PREPARE) == set(CALL) == set(RESULT) == set(ACTIONS)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("task_state", TASK_STATES, ids=lambda t: t.__name__)
def test_every_task_state_and_action(task_state, action):
    state = make("dep", ("x", "dep"), ("child", "x"))
    reach(state, task_state, linger=action == "mark_lingering_finished")
    assert type(state.get_branch("x").task) is task_state
    PREPARE[action](state)
    before = snapshot(state)
    if task_state in _ALLOWED[action]:
        CALL[action](state)
        task = state.get_branch("x").task
        expected = RESULT[action] or task_state
        assert type(task) is expected
        if action == "mark_lingering_finished":
            assert state.get_branch("x").lingering == 0
        elif action == "mark_as_lingering":
            assert state.get_branch("x").lingering == 1
        elif action == "record_failure":
            assert len(state.get_errors()) == len(before["errors"]) + 1
        elif expected is not task_state:
            assert snapshot(state) != before
    else:
        with pytest.raises(RuntimeStateError) as info:
            CALL[action](state)
        err = info.value
        message = str(err)
        assert "'x'" in message
        assert task_state.__name__ in message
        assert action in message
        assert err.branch == "x"
        assert err.action == action
        assert task_state.__name__ in err.state
        assert snapshot(state) == before


@pytest.mark.parametrize("task_state", TASK_STATES, ids=lambda t: t.__name__)
def test_every_task_state_keeps_the_neighbours_consistent(task_state):
    state = make("dep", ("x", "dep"), ("child", "x"))
    reach(state, task_state)
    x = state.get_branch("x")
    holds = task_state in {
        RunningApply,
        RunningApplyRetry,
        DoneApplied,
        RunningUnapply,
        RunningUnapplyRetry,
        UnapplyFailed,
    }
    assert state.get_branch("dep").awaiting_unapply == ({"x"} if holds else frozenset())
    succeeded = task_state in {
        DoneApplied,
        RunningUnapply,
        RunningUnapplyRetry,
        DoneUnapplied,
        UnapplyFailed,
    }
    assert state.get_branch("child").awaiting == (frozenset() if succeeded else {"x"})
    assert ("child" in state.find_apply_ready()) == (succeeded and not state.rolling_back)
    running = task_state in RUNNING_STATES
    assert (x.task.task_id in state.running) if running else ("x" not in state.running.values())
    expected_ready = state.rolling_back and not holds and task_state is not NotStarted
    assert ("dep" in state.find_unapply_ready()) == expected_ready


def test_an_unapply_given_up_on_may_be_found_done_once_its_lingering_attempt_returned():
    state = make("a", ("b", "a"))
    apply(state, "a")
    apply(state, "b")
    state.start_rollback()
    state.mark_as_unapplying("b", 10)
    state.record_failure("b", kira.BranchTimeout("b", "unapply", 1.0))
    state.mark_as_lingering("b")
    state.mark_as_unapply_failed("b")
    assert state.find_unapply_ready() == frozenset()  # b holds a
    refused(state, state.mark_as_unapplied, "b")  # its attempt is still out
    state.mark_lingering_finished("b")
    assert state.find_unapply_ready() == frozenset()  # UnapplyFailed still holds a
    state.mark_as_unapplied("b")  # the late attempt did undo b
    assert state.get_branch("b").task == DoneUnapplied()
    assert state.progress.unapplied == 1
    assert state.find_unapply_ready() == frozenset({"a"})


def test_create_leaves_the_garbage_collector_as_it_found_it():
    branches = [kira.Branch("a", lambda c, d: 1), kira.Branch("b", lambda c, d: 2, ["a"])]
    assert gc.isenabled()
    kira.RuntimeState.create(None, branches)
    assert gc.isenabled()
    with pytest.raises(kira.MissingDependencyError):
        kira.RuntimeState.create(None, [kira.Branch("x", lambda c, d: 1, ["nope"])])
    assert gc.isenabled()  # restored after a refused graph too
    gc.disable()
    try:
        kira.RuntimeState.create(None, branches)
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.enable()
