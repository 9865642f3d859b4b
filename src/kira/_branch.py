"""Branch definitions and retry decisions.

A `Branch` is an immutable description of one step: what it does, what it needs,
how to undo it and whether to retry it. The callback types live here, in one place.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, final

from ._errors import Phase

Deps: TypeAlias = Mapping[str, Any]
"""A read-only mapping of a branch's direct dependencies' names to their results."""


@final
@dataclass(frozen=True, slots=True)
class RetryAfter:
    """A retry decision: try again after `seconds` (a timer, no worker waits)."""

    seconds: float

    def __post_init__(self) -> None:
        s = self.seconds
        if isinstance(s, bool) or not isinstance(s, int | float):
            raise TypeError(f"RetryAfter seconds must be a number, not {type(s).__name__}")
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"RetryAfter seconds must be finite and >= 0, not {s!r}")


Decision: TypeAlias = bool | RetryAfter | None
"""What an error callback returns: True (retry now), False/None (give up), or RetryAfter."""

ApplyFn: TypeAlias = Callable[[Any, Deps], Any]
"""`apply(config, deps) -> result`; may be an `async def` function."""
UnapplyFn: TypeAlias = Callable[[Any, Deps, Any], Any]
"""`unapply(config, deps, value)`; may be an `async def` function."""
ErrorFn: TypeAlias = Callable[[Any, Deps, BaseException, int], "Decision | Awaitable[Decision]"]
"""`on_*_error(config, deps, error, attempt) -> Decision`; may be an `async def` function."""


@final
@dataclass(frozen=True, slots=True)
class Branch:
    """One step of a run: an immutable, validated definition.

    Args:
        name: unique in a run.
        apply: `apply(config, deps)` does the work; its return value is the branch's
            result; raising is failure.
        dependencies: names of the branches whose results this one needs (order kept,
            repeats merged).
        unapply: `unapply(config, deps, value)` undoes the work given the value apply
            returned; None means there is nothing to undo.
        on_apply_error / on_unapply_error: `(config, deps, error, attempt)` decide
            whether to retry a failed attempt (see `Decision`); None gives up at once.
        timeout: seconds one attempt may take, or None for no limit.

    Raises:
        TypeError / ValueError naming the branch and the field that is wrong. A branch
        that depends on itself is accepted here and rejected as a `CycleError` when
        the graph is validated, like any other cycle.
    """

    name: str
    apply: ApplyFn
    dependencies: tuple[str, ...] = field(default=())
    unapply: UnapplyFn | None = None
    on_apply_error: ErrorFn | None = None
    on_unapply_error: ErrorFn | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str):
            raise TypeError(f"Branch name must be a str, not {type(name).__name__}: {name!r}")
        if not name:
            raise ValueError("Branch name must be a non-empty str")
        if not callable(self.apply):
            raise TypeError(f"branch {name!r}: apply must be callable, not {self.apply!r}")
        for fname in ("unapply", "on_apply_error", "on_unapply_error"):
            fn = getattr(self, fname)
            if fn is not None and not callable(fn):
                raise TypeError(f"branch {name!r}: {fname} must be callable or None, not {fn!r}")
        object.__setattr__(self, "dependencies", _dependency_names(name, self.dependencies))
        t = self.timeout
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int | float):
                raise TypeError(
                    f"branch {name!r}: timeout must be a number of seconds or None, "
                    f"not {type(t).__name__}"
                )
            if not (t > 0 and math.isfinite(t)):
                raise ValueError(f"branch {name!r}: timeout must be positive and finite, not {t!r}")

    def error_handler(self, phase: Phase) -> ErrorFn | None:
        """The callback that decides retries for `phase` ("apply" or "unapply")."""
        return self.on_apply_error if phase == "apply" else self.on_unapply_error


def _dependency_names(name: str, deps: object) -> tuple[str, ...]:
    if isinstance(deps, str | bytes):
        raise TypeError(
            f"branch {name!r}: dependencies must be an iterable of names, not a single "
            f"{type(deps).__name__}: write dependencies=({deps!r},)"
        )
    if not isinstance(deps, Iterable):
        raise TypeError(
            f"branch {name!r}: dependencies must be an iterable of names, not {type(deps).__name__}"
        )
    # dict.fromkeys merges repeats and keeps first order.
    merged = tuple(dict.fromkeys(deps))
    for dep in merged:
        if not isinstance(dep, str) or not dep:
            raise TypeError(
                f"branch {name!r}: every dependency must be a non-empty str, not {dep!r}"
            )
    return merged


@final
class _RetryPolicy:
    """The callable `retry_policy` returns: a class, not a closure, so it pickles."""

    __slots__ = ("attempts", "backoff", "jitter", "max_delay", "multiplier", "on", "rng")

    def __init__(
        self,
        attempts: int,
        backoff: float,
        multiplier: float,
        max_delay: float,
        jitter: bool,
        on: tuple[type[BaseException], ...],
        rng: random.Random | None,
    ) -> None:
        self.attempts = attempts
        self.backoff = backoff
        self.multiplier = multiplier
        self.max_delay = max_delay
        self.jitter = jitter
        self.on = on
        self.rng = rng

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failure number `attempt`, before jitter."""
        try:
            raw = self.backoff * self.multiplier ** (attempt - 1)
        except OverflowError:
            raw = math.inf
        return min(raw, self.max_delay)

    def __call__(self, config: Any, deps: Deps, error: BaseException, attempt: int) -> Decision:
        if attempt >= self.attempts or not isinstance(error, self.on):
            return False
        delay = self.delay(attempt)
        if self.jitter and delay > 0:
            # "Equal jitter": half fixed, half random, so retries spread out but
            # never collapse to zero delay.
            rng = self.rng if self.rng is not None else random
            delay = delay / 2 + rng.uniform(0, delay / 2)
        return RetryAfter(delay) if delay > 0 else True

    def __repr__(self) -> str:
        names = ", ".join(t.__name__ for t in self.on)
        return (
            f"retry_policy(attempts={self.attempts}, backoff={self.backoff}, "
            f"multiplier={self.multiplier}, max_delay={self.max_delay}, "
            f"jitter={self.jitter}, on=({names},))"
        )


def retry_policy(
    attempts: int = 3,
    backoff: float = 0.1,
    multiplier: float = 2.0,
    max_delay: float = 30.0,
    jitter: bool = True,
    on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
    *,
    rng: random.Random | None = None,
) -> ErrorFn:
    """Build an error callback that retries with exponential backoff.

    Args:
        attempts: the most attempts in all (the first included); 1 never retries.
        backoff: the delay after the first failure, in seconds.
        multiplier: each further failure multiplies the delay by this.
        max_delay: the delay never exceeds this.
        jitter: when true, each delay is drawn uniformly from [d/2, d].
        on: retry only failures that are instances of these exception types.
        rng: the random source for jitter (for reproducible tests).

    Returns:
        A picklable callable usable as `on_apply_error` or `on_unapply_error`.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"retry_policy: attempts must be an int >= 1, not {attempts!r}")
    for label, value in (("backoff", backoff), ("max_delay", max_delay)):
        if not (_is_number(value) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"retry_policy: {label} must be a finite number >= 0, not {value!r}")
    if not (_is_number(multiplier) and multiplier >= 1 and math.isfinite(multiplier)):
        raise ValueError(f"retry_policy: multiplier must be a number >= 1, not {multiplier!r}")
    kinds = on if isinstance(on, tuple) else (on,)
    if not kinds or not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
        raise TypeError(f"retry_policy: on must be exception types, not {on!r}")
    return _RetryPolicy(attempts, backoff, multiplier, max_delay, jitter, kinds, rng)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
