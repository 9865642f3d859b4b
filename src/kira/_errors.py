"""Every exception kira raises, and the `BranchError` record.

All derive from `KiraError`. Each subclasses the builtin a user would catch for it
(`GraphError` is a `ValueError`, `BranchTimeout` a `TimeoutError`) and carries its
data as attributes, so callers never parse messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, final

Phase = Literal["apply", "unapply"]


class KiraError(Exception):
    """Base of every error kira raises itself."""


class GraphError(KiraError, ValueError):
    """The branches do not form a valid graph.

    Raised by `RuntimeState.create` (and so by every runner) before anything runs.
    Fix the branch definitions; nothing was applied.
    """


@final
class DuplicateBranchError(GraphError):
    """Two branches share the name `.name`. Branch names must be unique in a run."""

    def __init__(self, name: str) -> None:
        super().__init__(f"two branches are named {name!r}: branch names must be unique")
        self.name = name


@final
class MissingDependencyError(GraphError):
    """Branch `.branch` depends on `.dependency`, which names no branch of the run."""

    def __init__(self, branch: str, dependency: str) -> None:
        super().__init__(
            f"branch {branch!r} depends on {dependency!r}, which is not a branch of this run"
        )
        self.branch = branch
        self.dependency = dependency


@final
class CycleError(GraphError):
    """The dependencies form a cycle.

    `.cycle` lists the names in order, each depending on the next, the first name
    repeated last (a branch depending on itself gives `[name, name]`).
    """

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle: tuple[str, ...] = tuple(cycle)
        shown = self.cycle
        if len(shown) > 20:  # the message stays readable; `.cycle` has it all
            shown = (*shown[:10], f"... {len(shown) - 20} more ...", *shown[-10:])
        super().__init__(
            "the dependencies form a cycle: " + " -> ".join(shown) + " (each depends on the next)"
        )


@final
class RuntimeStateError(KiraError):
    """An impossible transition was asked of a `RuntimeState`.

    Raised by the state's methods; the state is left untouched. It means the code
    driving the state has a bug (a runner, or your own driver): `.branch` names the
    branch, `.action` what was asked, `.state` the branch's state at the time.
    """

    def __init__(self, branch: str, action: str, state: str, reason: str) -> None:
        super().__init__(f"cannot {action} branch {branch!r} (state {state}): {reason}")
        self.branch = branch
        self.action = action
        self.state = state
        self.reason = reason


@final
class BranchTimeout(KiraError, TimeoutError):
    """An attempt of branch `.branch` ran past its time limit of `.seconds`.

    Created by the runners and handed to the branch's error callback like any other
    failure (it is never raised out of a run by itself). `.seconds` is the branch's
    `timeout`, or the run's inactivity `timeout` when that expired.
    """

    def __init__(self, branch: str, phase: Phase, seconds: float, *, inactivity: bool = False):
        what = "the run saw no progress for" if inactivity else "the attempt took longer than"
        super().__init__(f"{phase} of branch {branch!r} timed out: {what} {seconds:g} s")
        self.branch = branch
        self.phase = phase
        self.seconds = seconds
        self.inactivity = inactivity


@final
@dataclass(frozen=True, slots=True)
class BranchError:
    """One failed attempt: which branch, which phase, the exception, when.

    `attempt` counts attempts of that phase from 1. `at` is an aware UTC datetime.
    `handler_error` is the exception the branch's error callback raised while deciding
    about this failure, if it raised (the run then gave up on the branch).
    """

    branch: str
    phase: Phase
    error: BaseException
    attempt: int
    at: datetime
    handler_error: BaseException | None = None


class RunFailed(KiraError):
    """A run failed and was rolled back (see the two subclasses).

    Raised by `run_tasks` / `run_tasks_async`. `.errors` lists every failed attempt,
    oldest first; `.culprit` is the first failure the run gave up on (None when the
    run was stopped for another reason); `.results` holds every value an apply
    returned during the run, whether it was later unapplied or not.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        errors: Sequence[BranchError],
        culprit: BranchError | None,
        results: Mapping[str, Any],
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.errors: list[BranchError] = list(errors)
        self.culprit = culprit
        self.results: dict[str, Any] = dict(results)


@final
class RolledBack(RunFailed):
    """The run failed and every applied branch was unapplied.

    `.unapplied` names the branches in the order their unapply finished. The world is
    as it was before the run (as far as the unapply callbacks restore it).
    """

    def __init__(self, *, unapplied: Iterable[str], **kwargs: Any) -> None:
        self.unapplied: tuple[str, ...] = tuple(unapplied)
        culprit: BranchError | None = kwargs.get("culprit")
        why = _describe_culprit(culprit)
        super().__init__(
            f"run {kwargs['run_id']} rolled back ({len(self.unapplied)} unapplied){why}",
            **kwargs,
        )


@final
class RollbackIncomplete(RunFailed):
    """The run failed and could not be rolled back completely.

    `.still_applied` names the branches whose effects remain (an unapply gave up, or
    a dependent's did, so they had to stay); `.abandoned` names branches with an
    attempt that timed out and never returned within the grace period, whose effects
    are unknown. These need a person's attention: see `.errors` for what failed.
    """

    def __init__(
        self,
        *,
        unapplied: Iterable[str],
        still_applied: Iterable[str],
        abandoned: Iterable[str] = (),
        **kwargs: Any,
    ) -> None:
        self.unapplied: tuple[str, ...] = tuple(unapplied)
        self.still_applied: tuple[str, ...] = tuple(still_applied)
        self.abandoned: tuple[str, ...] = tuple(abandoned)
        parts = []
        if self.still_applied:
            parts.append("still applied: " + ", ".join(self.still_applied))
        if self.abandoned:
            parts.append("abandoned: " + ", ".join(self.abandoned))
        culprit: BranchError | None = kwargs.get("culprit")
        super().__init__(
            f"run {kwargs['run_id']} could not be rolled back completely "
            f"({'; '.join(parts)}){_describe_culprit(culprit)}",
            **kwargs,
        )


def _describe_culprit(culprit: BranchError | None) -> str:
    if culprit is None:
        return ""
    return (
        f": {culprit.phase} of {culprit.branch!r} failed "
        f"(attempt {culprit.attempt}): {culprit.error!r}"
    )
