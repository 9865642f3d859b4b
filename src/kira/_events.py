"""Events: one value per transition of a run, enough to draw its timeline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeAlias, final

EventKind: TypeAlias = Literal[
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
]
EVENT_KINDS: tuple[EventKind, ...] = (
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
)


@final
@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened in run `run_id`, at `at` (aware UTC).

    - `apply_started` / `unapply_started`: `attempt` is the attempt's number.
    - `applied`: `value` is the result. `unapplied`: `value` is the undone result.
      `unapply_started` / `unapplied` / `unapply_failed` with `attempt` None are
      the undoing of a value the run could not keep (returned by an attempt
      after it timed out, or refused by the journal's codec), not of the
      branch's accepted result.
    - `apply_failed` / `unapply_failed`: an attempt failed with `error` (it may be
      retried); `value` is "lingering" when the attempt timed out but could not
      be stopped (its outcome comes later), or its value could not be kept.
    - `retry_scheduled`: `value` is the delay in seconds (0: at once); `attempt`
      the number of the attempt to come.
    - `failed`: the run gave up on the branch: `value` is the phase ("apply" or
      "unapply"); `error` is what its error callback raised, if it raised.
    - `rollback_started`: `branch` and `error` name the culprit (None for an
      interruption or inactivity; `value` then says why).
    - `run_finished`: `branch` is None; `value` is "applied", "rolled_back" or
      "rollback_incomplete".
    """

    run_id: str
    kind: EventKind
    branch: str | None
    at: datetime
    attempt: int | None = None
    error: BaseException | None = None
    value: Any = None


EventHandler: TypeAlias = Callable[[Event], object]
