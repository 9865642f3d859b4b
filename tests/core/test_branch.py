"""`kira.Branch`, `kira.RetryAfter` and `kira.retry_policy`: validation and behaviour."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random

import pytest

import kira
from kira.testing import FakeClock


def apply_nothing(config, deps):
    return None


def unapply_nothing(config, deps, value):
    return None


def decide_nothing(config, deps, error, attempt):
    return None


# ---------------------------------------------------------------------------------
# Branch


def test_branch_keeps_its_fields():
    b = kira.Branch(
        "x",
        apply_nothing,
        ("a", "b"),
        unapply=unapply_nothing,
        on_apply_error=decide_nothing,
        on_unapply_error=decide_nothing,
        timeout=2.5,
    )
    assert b.name == "x"
    assert b.apply is apply_nothing
    assert b.dependencies == ("a", "b")
    assert b.unapply is unapply_nothing
    assert b.on_apply_error is decide_nothing
    assert b.on_unapply_error is decide_nothing
    assert b.timeout == 2.5


def test_branch_defaults():
    b = kira.Branch("x", apply_nothing)
    assert b.dependencies == ()
    assert b.unapply is None
    assert b.on_apply_error is None
    assert b.on_unapply_error is None
    assert b.timeout is None


def test_branch_error_handler_by_phase():
    def on_apply(config, deps, error, attempt):
        return True

    def on_unapply(config, deps, error, attempt):
        return False

    b = kira.Branch("x", apply_nothing, on_apply_error=on_apply, on_unapply_error=on_unapply)
    assert b.error_handler("apply") is on_apply
    assert b.error_handler("unapply") is on_unapply


@pytest.mark.parametrize("name", [None, 1, b"x", ("x",), ["x"]])
def test_branch_name_must_be_a_str(name):
    with pytest.raises(TypeError, match="name must be a str"):
        kira.Branch(name, apply_nothing)


def test_branch_name_must_not_be_empty():
    with pytest.raises(ValueError, match="non-empty"):
        kira.Branch("", apply_nothing)


@pytest.mark.parametrize("apply", [None, 1, "apply_nothing", object()])
def test_branch_apply_must_be_callable(apply):
    with pytest.raises(TypeError, match=r"branch 'x': apply must be callable"):
        kira.Branch("x", apply)


@pytest.mark.parametrize("field", ["unapply", "on_apply_error", "on_unapply_error"])
@pytest.mark.parametrize("value", [1, "fn", object()])
def test_branch_optional_callbacks_must_be_callable(field, value):
    with pytest.raises(TypeError, match=rf"branch 'x': {field} must be callable or None"):
        kira.Branch("x", apply_nothing, **{field: value})


def test_branch_accepts_async_callbacks():
    async def apply(config, deps):
        return 1

    async def unapply(config, deps, value):
        return None

    b = kira.Branch("x", apply, unapply=unapply)
    assert b.apply is apply
    assert b.unapply is unapply


def test_dependencies_as_a_bare_str_says_to_write_a_tuple():
    with pytest.raises(TypeError) as info:
        kira.Branch("x", apply_nothing, "abc")
    message = str(info.value)
    assert "'x'" in message
    assert "dependencies=('abc',)" in message


def test_dependencies_as_bytes_rejected():
    with pytest.raises(TypeError, match="dependencies"):
        kira.Branch("x", apply_nothing, b"abc")


@pytest.mark.parametrize("deps", [1, None, 2.5, object()])
def test_dependencies_must_be_iterable(deps):
    with pytest.raises(TypeError, match="dependencies must be an iterable of names"):
        kira.Branch("x", apply_nothing, deps)


@pytest.mark.parametrize("dep", [1, None, b"a", ("a",), ""])
def test_every_dependency_must_be_a_non_empty_str(dep):
    with pytest.raises(TypeError, match="every dependency must be a non-empty str"):
        kira.Branch("x", apply_nothing, ("a", dep))


def test_dependencies_from_any_iterable_become_a_tuple():
    b = kira.Branch("x", apply_nothing, (name for name in ["c", "a", "b"]))
    assert b.dependencies == ("c", "a", "b")
    assert kira.Branch("y", apply_nothing, ["b", "a"]).dependencies == ("b", "a")


def test_repeated_dependencies_are_merged_keeping_first_order():
    b = kira.Branch("x", apply_nothing, ["c", "a", "c", "b", "a", "c"])
    assert b.dependencies == ("c", "a", "b")


def test_branch_depending_on_itself_is_accepted_here_and_rejected_by_the_graph():
    b = kira.Branch("x", apply_nothing, ("x",))
    assert b.dependencies == ("x",)
    with pytest.raises(kira.CycleError) as info:
        kira.RuntimeState.create(None, [b])
    assert info.value.cycle == ("x", "x")


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_timeout_must_be_positive_and_finite(timeout):
    with pytest.raises(ValueError, match="timeout must be positive and finite"):
        kira.Branch("x", apply_nothing, timeout=timeout)


@pytest.mark.parametrize("timeout", [True, False, "1", [1]])
def test_timeout_must_be_a_number(timeout):
    with pytest.raises(TypeError, match="timeout must be a number"):
        kira.Branch("x", apply_nothing, timeout=timeout)


@pytest.mark.parametrize("timeout", [1, 0.001, 3600.5, 1e9])
def test_positive_timeout_accepted(timeout):
    assert kira.Branch("x", apply_nothing, timeout=timeout).timeout == timeout


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "y"),
        ("apply", apply_nothing),
        ("dependencies", ("z",)),
        ("unapply", None),
        ("timeout", 3.0),
    ],
)
def test_branch_is_frozen(field, value):
    b = kira.Branch("x", apply_nothing, ("a",), timeout=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(b, field, value)
    assert b.name == "x"
    assert b.dependencies == ("a",)
    assert b.timeout == 1.0


def test_branch_has_no_instance_dict():
    b = kira.Branch("x", apply_nothing)
    with pytest.raises((AttributeError, TypeError)):
        b.extra = 1  # type: ignore[attr-defined]


def test_branches_compare_by_value():
    assert kira.Branch("x", apply_nothing, ["a", "a"]) == kira.Branch("x", apply_nothing, ("a",))
    assert kira.Branch("x", apply_nothing) != kira.Branch("y", apply_nothing)


# ---------------------------------------------------------------------------------
# RetryAfter


@pytest.mark.parametrize("seconds", [0, 0.0, 1, 2.5, 1e6])
def test_retry_after_accepts_finite_non_negative_numbers(seconds):
    assert kira.RetryAfter(seconds).seconds == seconds


@pytest.mark.parametrize("seconds", [-1, -0.001, math.nan, math.inf, -math.inf])
def test_retry_after_rejects_negative_and_non_finite(seconds):
    with pytest.raises(ValueError, match="RetryAfter seconds"):
        kira.RetryAfter(seconds)


@pytest.mark.parametrize("seconds", ["1", None, True, False, [1], 1j])
def test_retry_after_rejects_non_numbers(seconds):
    with pytest.raises(TypeError, match="RetryAfter seconds must be a number"):
        kira.RetryAfter(seconds)


def test_retry_after_is_a_frozen_value():
    r = kira.RetryAfter(1.5)
    assert r == kira.RetryAfter(1.5)
    assert r != kira.RetryAfter(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seconds = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------
# retry_policy


def decide(policy, attempt, error=None):
    return policy(None, {}, error if error is not None else ValueError("boom"), attempt)


def test_retry_policy_caps_attempts():
    policy = kira.retry_policy(attempts=3, backoff=0, jitter=False)
    # `attempt` counts failures so far: after the 3rd, three attempts were made.
    assert decide(policy, 1) is True
    assert decide(policy, 2) is True
    assert decide(policy, 3) is False
    assert decide(policy, 4) is False
    assert decide(policy, 100) is False


def test_retry_policy_with_one_attempt_never_retries():
    policy = kira.retry_policy(attempts=1, backoff=1.0, jitter=False)
    assert decide(policy, 1) is False


def test_retry_policy_retries_only_the_listed_exception_types():
    policy = kira.retry_policy(attempts=5, backoff=0, jitter=False, on=(KeyError, OSError))
    assert decide(policy, 1, KeyError("k")) is True
    assert decide(policy, 1, FileNotFoundError("f")) is True  # an OSError subclass
    assert decide(policy, 1, ValueError("v")) is False
    assert decide(policy, 1, TimeoutError()) is True  # TimeoutError is an OSError
    assert decide(policy, 1, LookupError()) is False  # a base class of KeyError is not


def test_retry_policy_on_accepts_a_single_type():
    policy = kira.retry_policy(attempts=5, backoff=0, jitter=False, on=TimeoutError)
    assert decide(policy, 1, kira.BranchTimeout("x", "apply", 1.0)) is True
    assert decide(policy, 1, ValueError()) is False


def test_retry_policy_default_retries_exceptions_but_not_base_exceptions():
    policy = kira.retry_policy(backoff=0, jitter=False)
    assert decide(policy, 1, RuntimeError()) is True
    assert decide(policy, 1, KeyboardInterrupt()) is False


def test_retry_policy_exponential_backoff_without_jitter():
    policy = kira.retry_policy(
        attempts=10, backoff=0.5, multiplier=3.0, max_delay=10.0, jitter=False
    )
    delays = [decide(policy, attempt) for attempt in range(1, 10)]
    assert delays == [
        kira.RetryAfter(0.5),
        kira.RetryAfter(1.5),
        kira.RetryAfter(4.5),
        kira.RetryAfter(10.0),  # 13.5 capped
        kira.RetryAfter(10.0),
        kira.RetryAfter(10.0),
        kira.RetryAfter(10.0),
        kira.RetryAfter(10.0),
        kira.RetryAfter(10.0),
    ]
    assert decide(policy, 10) is False


def test_retry_policy_default_backoff_doubles():
    policy = kira.retry_policy(attempts=5, jitter=False)
    assert [decide(policy, a).seconds for a in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_retry_policy_multiplier_one_is_a_constant_delay():
    policy = kira.retry_policy(attempts=4, backoff=2, multiplier=1, jitter=False)
    assert [decide(policy, a) for a in (1, 2, 3)] == [kira.RetryAfter(2)] * 3


def test_retry_policy_returns_true_when_the_delay_is_zero():
    assert decide(kira.retry_policy(backoff=0, jitter=False), 1) is True
    assert decide(kira.retry_policy(backoff=0, jitter=True), 1) is True
    assert decide(kira.retry_policy(backoff=5, max_delay=0, jitter=False), 2) is True
    assert decide(kira.retry_policy(backoff=5, max_delay=0, jitter=True), 2) is True


def test_retry_policy_huge_attempt_numbers_stay_capped():
    policy = kira.retry_policy(
        attempts=10**9, backoff=1.0, multiplier=2.0, max_delay=7.0, jitter=False
    )
    assert decide(policy, 5000) == kira.RetryAfter(7.0)
    assert decide(policy, 10**8) == kira.RetryAfter(7.0)


def test_retry_policy_jitter_draws_from_half_to_full_delay():
    policy = kira.retry_policy(
        attempts=100, backoff=1.0, multiplier=2.0, max_delay=20.0, rng=random.Random(0)
    )
    seen = []
    for attempt in range(1, 40):
        full = min(2.0 ** (attempt - 1), 20.0)
        decision = decide(policy, attempt)
        assert isinstance(decision, kira.RetryAfter)
        assert full / 2 <= decision.seconds <= full
        seen.append(decision.seconds / full)
    # jitter actually varies (not always one end of the range)
    assert len(set(seen)) > 10
    assert min(seen) < 0.75 < max(seen)


def test_retry_policy_jitter_is_reproducible_with_a_seeded_rng():
    first = kira.retry_policy(attempts=10, backoff=1.0, rng=random.Random(42))
    second = kira.retry_policy(attempts=10, backoff=1.0, rng=random.Random(42))
    assert [decide(first, a) for a in range(1, 10)] == [decide(second, a) for a in range(1, 10)]


def test_retry_policy_pickles_and_still_works():
    policy = kira.retry_policy(
        attempts=4, backoff=0.25, multiplier=2.0, max_delay=0.75, jitter=False, on=(OSError,)
    )
    copy = pickle.loads(pickle.dumps(policy))
    assert copy is not policy
    assert [decide(copy, a, OSError()) for a in (1, 2, 3, 4)] == [
        kira.RetryAfter(0.25),
        kira.RetryAfter(0.5),
        kira.RetryAfter(0.75),
        False,
    ]
    assert decide(copy, 1, ValueError()) is False


def test_retry_policy_with_rng_pickles_and_keeps_its_sequence():
    policy = kira.retry_policy(attempts=10, backoff=1.0, rng=random.Random(7))
    copy = pickle.loads(pickle.dumps(policy))
    assert [decide(copy, a) for a in range(1, 8)] == [decide(policy, a) for a in range(1, 8)]


def test_retry_policy_repr_shows_its_settings():
    text = repr(kira.retry_policy(attempts=2, backoff=1.5, on=KeyError))
    assert "attempts=2" in text
    assert "backoff=1.5" in text
    assert "KeyError" in text


@pytest.mark.parametrize("attempts", [0, -1, 1.5, "3", None, True])
def test_retry_policy_rejects_bad_attempts(attempts):
    with pytest.raises(ValueError, match="attempts"):
        kira.retry_policy(attempts=attempts)


@pytest.mark.parametrize("field", ["backoff", "max_delay"])
@pytest.mark.parametrize("value", [-1, -0.1, math.nan, "1", None])
def test_retry_policy_rejects_bad_delays(field, value):
    with pytest.raises(ValueError, match=field):
        kira.retry_policy(**{field: value})


@pytest.mark.parametrize("multiplier", [0.5, 0, -2, math.nan, "2", None])
def test_retry_policy_rejects_bad_multiplier(multiplier):
    with pytest.raises(ValueError, match="multiplier"):
        kira.retry_policy(multiplier=multiplier)


@pytest.mark.parametrize("field", ["backoff", "max_delay", "multiplier"])
def test_retry_policy_rejects_bools_as_numbers(field):
    # RetryAfter and Branch(timeout=) refuse a bool where seconds are expected;
    # retry_policy should be no more lenient.
    with pytest.raises((TypeError, ValueError), match=field):
        kira.retry_policy(**{field: True})


@pytest.mark.parametrize("on", [(), ValueError("x"), (ValueError, "x"), int, (int,), "Exception"])
def test_retry_policy_rejects_bad_on(on):
    with pytest.raises(TypeError, match="on must be exception types"):
        kira.retry_policy(on=on)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backoff": 1.0, "max_delay": math.inf},
        {"backoff": math.inf, "max_delay": math.inf},
        {"backoff": math.inf},
    ],
)
def test_retry_policy_accepted_settings_never_make_an_invalid_decision(kwargs):
    # Either the settings are refused up front, or every call returns a valid
    # decision; a policy must not raise out of an error callback later.
    try:
        policy = kira.retry_policy(attempts=10**6, jitter=False, **kwargs)
    except ValueError:
        return
    for attempt in (1, 2, 50, 2000):
        decision = decide(policy, attempt)
        assert decision is True or isinstance(decision, kira.RetryAfter)


def test_retry_policy_drives_a_real_run():
    clock = FakeClock()
    calls = []

    def flaky(config, deps):
        calls.append(clock())
        if len(calls) < 3:
            raise OSError("not yet")
        return "done"

    policy = kira.retry_policy(attempts=3, backoff=1.0, multiplier=4.0, jitter=False)
    results = kira.testing.run_reference(
        None, [kira.Branch("x", flaky, on_apply_error=policy)], clock=clock
    )
    assert results == {"x": "done"}
    start = calls[0]
    assert [(t - start).total_seconds() for t in calls] == [0.0, 1.0, 5.0]
