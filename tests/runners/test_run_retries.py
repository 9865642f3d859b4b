"""Retry decisions: now, after a delay, by policy, filtered by exception type."""

from __future__ import annotations

import threading
import time

import pytest
from _runners_support import Fail, Log, await_event, flavoured, wait

import kira


def test_retry_now_runs_apply_again_with_the_same_deps(run, flavour):
    seen = Log()
    base = object()

    def b(config, deps):
        seen.add(("deps", dict(deps)))
        if len(seen.of("deps")) < 3:
            raise Fail("not yet")
        return "b"

    def on_error(config, deps, error, attempt):
        seen.add(("decide", (attempt, str(error))))
        return True

    branches = [
        kira.Branch("a", flavoured(flavour, lambda config, deps: base)),
        kira.Branch(
            "b", flavoured(flavour, b), ("a",), on_apply_error=flavoured(flavour, on_error)
        ),
    ]
    assert run(None, branches) == {"a": base, "b": "b"}
    assert seen.of("deps") == [{"a": base}] * 3
    assert all(d["a"] is base for d in seen.of("deps"))
    assert seen.of("decide") == [(1, "not yet"), (2, "not yet")]


def test_retry_after_waits_at_least_the_delay(run, flavour):
    delay = 0.3
    stamps: list[float] = []

    def apply(config, deps):
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise Fail("later")
        return "done"

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, apply),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: kira.RetryAfter(delay)),
        )
    ]
    assert run(None, branches) == {"a": "done"}
    assert len(stamps) == 2
    assert stamps[1] - stamps[0] >= delay * 0.9  # a lower bound only


def test_retry_policy_exhausted_makes_exactly_its_attempts_then_rolls_back(run, flavour):
    calls = Log()

    def always_fails(config, deps):
        calls.add(("apply", deps["base"]))
        raise Fail(f"attempt {len(calls.items)}")

    branches = [
        kira.Branch(
            "base",
            flavoured(flavour, lambda config, deps: "B"),
            unapply=flavoured(flavour, lambda config, deps, value: calls.add(("unapply", value))),
        ),
        kira.Branch(
            "x",
            flavoured(flavour, always_fails),
            ("base",),
            on_apply_error=kira.retry_policy(attempts=3, backoff=0.01, jitter=False),
        ),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    assert calls.items == [("apply", "B")] * 3 + [("unapply", "B")]
    err = info.value
    assert [(e.branch, e.phase, e.attempt) for e in err.errors] == [
        ("x", "apply", 1),
        ("x", "apply", 2),
        ("x", "apply", 3),
    ]
    assert err.culprit is err.errors[-1]
    assert err.unapplied == ("base",)


@pytest.mark.parametrize(
    ("raised", "retried"), [(ValueError, True), (KeyError, False), (UnicodeError, True)]
)
def test_retry_policy_on_filters_by_exception_type(run, flavour, raised, retried):
    attempts: list[int] = []

    def apply(config, deps):
        attempts.append(1)
        if len(attempts) == 1:
            raise raised("first")
        return "second"

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, apply),
            on_apply_error=kira.retry_policy(attempts=5, backoff=0.0, on=ValueError),
        )
    ]
    if retried:  # UnicodeError is a ValueError
        assert run(None, branches) == {"a": "second"}
        assert len(attempts) == 2
    else:
        with pytest.raises(kira.RolledBack) as info:
            run(None, branches)
        assert len(attempts) == 1
        assert isinstance(info.value.culprit.error, raised)


def test_retry_policy_retries_an_unapply_too(run, flavour):
    undo: list[int] = []

    def unapply(config, deps, value):
        undo.append(value)
        if len(undo) < 3:
            raise Fail("undo later")

    def fail(config, deps):
        raise Fail("b")

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, lambda config, deps: 7),
            unapply=flavoured(flavour, unapply),
            on_unapply_error=kira.retry_policy(attempts=3, backoff=0.01),
        ),
        kira.Branch("b", flavoured(flavour, fail), ("a",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    assert undo == [7, 7, 7]
    assert info.value.unapplied == ("a",)
    assert [(e.branch, e.phase, e.attempt) for e in info.value.errors] == [
        ("b", "apply", 1),
        ("a", "unapply", 1),
        ("a", "unapply", 2),
    ]


@pytest.mark.parametrize("max_workers", [1, None])
def test_a_retry_waiting_does_not_delay_an_independent_branch(run, flavour, max_workers):
    first_failed = threading.Event()
    other_done = threading.Event()
    seen = Log()

    def slow(config, deps):
        seen.add(("attempt", other_done.is_set()))
        if len(seen.items) == 1:
            first_failed.set()
            raise Fail("retry me in a while")
        return "slow"

    def other_sync(config, deps):
        wait(first_failed)
        other_done.set()
        return "other"

    async def other_async(config, deps):
        await await_event(first_failed)
        other_done.set()
        return "other"

    branches = [
        kira.Branch(
            "slow",
            flavoured(flavour, slow),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: kira.RetryAfter(0.5)),
        ),
        kira.Branch("other", other_sync if flavour == "sync" else other_async),
    ]
    assert run(None, branches, max_workers=max_workers) == {"slow": "slow", "other": "other"}
    # the independent branch had finished when the retry came
    assert seen.of("attempt") == [False, True]


def test_a_retry_decision_of_retry_after_zero_retries_at_once(run, flavour):
    attempts: list[int] = []

    def apply(config, deps):
        attempts.append(1)
        if len(attempts) < 2:
            raise Fail("again")
        return len(attempts)

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, apply),
            on_apply_error=flavoured(flavour, lambda c, d, e, a: kira.RetryAfter(0)),
        )
    ]
    assert run(None, branches) == {"a": 2}
