"""Testing helpers: a synchronous reference driver, a fake clock, scripted outcomes.

`run_reference` runs a graph to completion in the calling thread, calling each
callback inline, through the same `Driver` the real runners use: what it decides
is what they decide. Scripted outcomes make a branch's attempts fail or succeed
without touching its callbacks; `fault_at` stops the run abruptly before the n-th
command, as a crash would.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeAlias, final

from ._branch import Branch
from ._driver import Consult, Driver, Finish, ScheduleRetry, StartApply, StartUnapply
from ._errors import Phase
from ._events import EventHandler
from ._state import RuntimeState

__all__ = [
    "FakeClock",
    "InjectedFault",
    "Outcome",
    "Returns",
    "ScriptedFailure",
    "run_reference",
]


@final
class FakeClock:
    """A clock that moves only when told: call it for an aware UTC datetime."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2000, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")

    def __call__(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (>= 0)."""
        if seconds < 0:
            raise ValueError("a clock cannot go back")
        self._now += timedelta(seconds=seconds)


@final
class ScriptedFailure(Exception):
    """Raised in place of a branch's callback by a scripted "fail" outcome."""

    def __init__(self, branch: str, phase: Phase, attempt: int) -> None:
        super().__init__(f"scripted failure of {phase} of {branch!r}, attempt {attempt}")
        self.branch = branch
        self.phase = phase
        self.attempt = attempt


@final
class InjectedFault(BaseException):
    """Raised by `run_reference` at a `fault_at` point, as a crash would stop a run.

    A BaseException so that no `except Exception` on the way swallows it.
    """


@final
@dataclass(frozen=True, slots=True)
class Returns:
    """A scripted outcome: the attempt succeeds with `value`, the callback not called."""

    value: Any


Outcome: TypeAlias = Literal["ok", "fail"] | Returns | BaseException
"""One attempt's scripted outcome: "ok" calls the real callback, "fail" raises
`ScriptedFailure`, `Returns(v)` succeeds with v, an exception instance is raised."""


def run_reference(
    config: Any,
    branches: Iterable[Branch],
    *,
    script: Mapping[str | tuple[str, Phase], Sequence[Outcome]] | None = None,
    timeout: float | None = None,
    max_workers: int | None = None,
    clock: FakeClock | None = None,
    on_event: EventHandler | None = None,
    fault_at: int | None = None,
    run_id: str = "reference",
) -> dict[str, Any]:
    """Run `branches` to completion in this thread; return results or raise.

    Args:
        script: per branch (key `name` for its applies, `(name, "unapply")` for
            its unapplies), the outcome of each attempt in turn; attempts past the
            end of the list (and unscripted branches) call the real callbacks.
        clock: stamps errors and events; retry delays advance it instead of
            sleeping (default: a new `FakeClock`).
        fault_at: raise `InjectedFault` just before carrying out the n-th command
            (1-based), leaving the state as it is.

    Raises:
        The same as `kira.run_tasks`: `GraphError`, `RolledBack`, `RollbackIncomplete`.
    """
    clock = clock if clock is not None else FakeClock()
    state = RuntimeState.create(config, branches, timeout, clock=clock)
    driver = Driver(state, run_id=run_id, limit=max_workers, on_event=on_event)
    plan = {k: list(v) for k, v in (script or {}).items()}
    timers: list[tuple[datetime, int, int]] = []  # (due, sequence, task_id)
    outbox = driver.outbox
    executed = 0
    driver.start()
    while True:
        if outbox:
            command = outbox.popleft()
        elif timers:
            due, _, task_id = heapq.heappop(timers)
            if due > clock():
                clock.advance((due - clock()).total_seconds())
            driver.retry_due(task_id)
            continue
        else:
            raise AssertionError(f"the driver stalled: {state!r}")  # a driver bug
        executed += 1
        if fault_at is not None and executed == fault_at:
            raise InjectedFault(f"fault injected before command {executed}: {command!r}")
        match command:
            case StartApply(task_id, name, attempt, deps):
                branch = state.branch_states[name].branch
                try:
                    value = _attempt(plan, name, "apply", attempt, branch.apply, config, deps)
                except Exception as exc:
                    driver.failed(task_id, exc)
                else:
                    driver.applied(task_id, value)
            case StartUnapply(task_id, name, attempt, deps, value):
                branch = state.branch_states[name].branch
                assert branch.unapply is not None
                try:
                    _attempt(plan, name, "unapply", attempt, branch.unapply, config, deps, value)
                except Exception as exc:
                    driver.failed(task_id, exc)
                else:
                    driver.unapplied(task_id)
            case Consult(task_id, name, phase, error, attempt, deps):
                handler = state.branch_states[name].branch.error_handler(phase)
                assert handler is not None
                try:
                    decision = _call(handler, config, deps, error, attempt)
                except Exception as exc:
                    driver.decided(task_id, None, exc)
                else:
                    driver.decided(task_id, decision)
            case ScheduleRetry(task_id, _, _, delay):
                due = clock() + timedelta(seconds=delay)
                heapq.heappush(timers, (due, executed, task_id))
            case Finish(outcome):
                return outcome.result()


def _attempt(
    plan: dict[Any, list[Outcome]],
    name: str,
    phase: Phase,
    attempt: int,
    fn: Any,
    *args: Any,
) -> Any:
    outcomes = plan.get(name if phase == "apply" else (name, phase)) if plan else None
    outcome: Outcome = "ok"
    if outcomes and attempt <= len(outcomes):
        outcome = outcomes[attempt - 1]
    if outcome == "ok":
        return _call(fn, *args)
    if outcome == "fail":
        raise ScriptedFailure(name, phase, attempt)
    if isinstance(outcome, Returns):
        return outcome.value
    if isinstance(outcome, BaseException):
        raise outcome
    raise ValueError(f"not a scripted outcome: {outcome!r}")


def _call(fn: Any, *args: Any) -> Any:
    result = fn(*args)
    if hasattr(type(result), "__await__"):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable
