"""What a run's events tell: every attempt of every branch, progress, the critical path.

The command line builds its live display, its summary table, its `--events` file
and its timeline page from this one model, which it fills from `kira.Event`
values alone (SPEC §6: a run's events are enough to draw its timeline). It does
no I/O and reads no clock except where a caller passes `now`.

Threads: `record` is called by the runner's scheduling thread while a display
thread may read; both hold `lock`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeAlias

from kira import Branch, Event, RestoredError  # the public API only, like the rest of the CLI

Phase: TypeAlias = Literal["apply", "unapply"]
Outcome: TypeAlias = Literal["running", "ok", "failed"]

# What a branch is doing or has become, as the summary shows it.
BranchStatus: TypeAlias = Literal[
    "not started",
    "applying",
    "retry waiting",
    "applied",
    "failed",
    "unapplying",
    "unapplied",
    "unapply failed",
]


@dataclass(slots=True)
class AttemptLog:
    """One attempt of one phase of a branch, as the events tell it."""

    phase: Phase
    number: int | None  # None: the compensation of a value returned after a timeout
    start: datetime
    end: datetime | None = None
    outcome: Outcome = "running"
    error: BaseException | None = None

    def seconds(self, now: datetime | None = None) -> float | None:
        """How long it took (or has taken by `now`); None while running without `now`."""
        end = self.end if self.end is not None else now
        return None if end is None else max(0.0, (end - self.start).total_seconds())


@dataclass(slots=True)
class WaitLog:
    """A retry waiting for its delay (or for a free worker)."""

    phase: Phase
    next_attempt: int | None
    start: datetime
    delay: float
    end: datetime | None = None  # when the retry started (None: it never did)


@dataclass(slots=True)
class BranchLog:
    """Everything the events said about one branch."""

    name: str
    dependencies: tuple[str, ...]
    status: BranchStatus = "not started"
    attempts: list[AttemptLog] = field(default_factory=list)
    waits: list[WaitLog] = field(default_factory=list)
    value: Any = None
    has_value: bool = False  # an apply returned `value`
    last_error: BaseException | None = None

    def count(self, phase: Phase) -> int:
        """How many attempts of `phase` started."""
        return sum(1 for a in self.attempts if a.phase == phase)

    def span(self, phase: Phase, now: datetime | None = None) -> tuple[datetime, datetime] | None:
        """From the first attempt of `phase` to the end of its last (retries and
        their waits included), or None if none started or it is still open."""
        mine = [a for a in self.attempts if a.phase == phase]
        if not mine:
            return None
        last = mine[-1]
        end = last.end if last.end is not None else now
        return None if end is None else (mine[0].start, end)

    def seconds(self, phase: Phase, now: datetime | None = None) -> float | None:
        """The length of `span(phase)` in seconds."""
        span = self.span(phase, now)
        return None if span is None else max(0.0, (span[1] - span[0]).total_seconds())

    def running(self) -> AttemptLog | None:
        """The attempt running now, if any."""
        for attempt in reversed(self.attempts):
            if attempt.outcome == "running":
                return attempt
        return None

    def waiting(self) -> WaitLog | None:
        """The retry waiting now, if any."""
        if self.waits and self.waits[-1].end is None and self.status == "retry waiting":
            return self.waits[-1]
        return None


@dataclass(slots=True)
class Rollback:
    """Why and when the rollback started."""

    at: datetime
    reason: str  # "failure", "interrupted" or "inactivity" (Event.value)
    branch: str | None  # the culprit, for a failure
    error: BaseException | None
    attempts: int  # attempts the culprit made


class RunLog:
    """The model of one run, filled by `record(event)`.

    Args:
        branches: the run's branches, for their names, order and dependencies.
    """

    def __init__(self, branches: Sequence[Branch]) -> None:
        self.lock = threading.Lock()
        self.branches: dict[str, BranchLog] = {
            b.name: BranchLog(b.name, b.dependencies) for b in branches
        }
        self.run_id: str | None = None
        self.started: datetime | None = None  # the first event
        self.ended: datetime | None = None  # run_finished
        self.finished: str | None = None  # "applied", "rolled_back", "rollback_incomplete"
        self.rollback: Rollback | None = None
        self.applied = 0  # branches whose apply succeeded (ever)
        self.unapplied = 0  # branches whose unapply succeeded
        self.events = 0

    @property
    def total(self) -> int:
        """How many branches the run has."""
        return len(self.branches)

    def record(self, event: Event) -> None:
        """Take one event into the model (events must come in the order emitted)."""
        with self.lock:
            self._record(event)

    def _record(self, e: Event) -> None:
        self.events += 1
        if self.run_id is None:
            self.run_id = e.run_id
        if self.started is None:
            self.started = e.at
        kind = e.kind
        if kind == "run_finished":
            self.ended = e.at
            self.finished = str(e.value)
            return
        if kind == "rollback_started":
            culprit = self.branches.get(e.branch) if e.branch is not None else None
            self.rollback = Rollback(
                e.at,
                str(e.value),
                e.branch,
                e.error,
                culprit.count("apply") if culprit is not None else 0,
            )
            return
        if e.branch is None or e.branch not in self.branches:
            return
        b = self.branches[e.branch]
        if kind in ("apply_started", "unapply_started"):
            phase: Phase = "apply" if kind == "apply_started" else "unapply"
            if b.waits and b.waits[-1].end is None and b.waits[-1].phase == phase:
                b.waits[-1].end = e.at
            attempt = AttemptLog(phase, e.attempt, e.at)
            last = b.attempts[-1] if b.attempts else None
            if (
                last is not None
                and last.end is None
                and (last.phase, last.number) == (phase, e.attempt)
                and e.attempt is not None
            ):
                # a resumed run making again the attempt its dead process left open
                b.attempts[-1] = attempt
            else:
                b.attempts.append(attempt)
            if e.attempt is not None:  # None: a late value compensated, status unchanged
                b.status = "applying" if phase == "apply" else "unapplying"
        elif kind in ("applied", "unapplied"):
            phase = "apply" if kind == "applied" else "unapply"
            self._close(b, phase, e, "ok")
            if e.attempt is None:
                return  # a late value compensated: the branch's state is unchanged
            if phase == "apply":
                b.status = "applied"
                b.value, b.has_value = e.value, True
                self.applied += 1
            else:
                b.status = "unapplied"
                self.unapplied += 1
        elif kind in ("apply_failed", "unapply_failed"):
            phase = "apply" if kind == "apply_failed" else "unapply"
            self._close(b, phase, e, "failed")
            b.last_error = e.error
        elif kind == "retry_scheduled":
            phase = "unapply" if b.status == "unapplying" else "apply"
            delay = float(e.value) if isinstance(e.value, int | float) else 0.0
            b.waits.append(WaitLog(phase, e.attempt, e.at, delay))
            b.status = "retry waiting"
        elif kind == "failed":
            b.status = "unapply failed" if e.value == "unapply" else "failed"

    @staticmethod
    def _close(b: BranchLog, phase: Phase, e: Event, outcome: Outcome) -> None:
        for attempt in reversed(b.attempts):
            if (
                attempt.phase == phase
                and attempt.outcome == "running"
                and (e.attempt is None or attempt.number in (e.attempt, None))
            ):
                attempt.end, attempt.outcome, attempt.error = e.at, outcome, e.error
                return

    # -- questions the views ask ---------------------------------------------------------

    def running(self) -> list[tuple[BranchLog, AttemptLog]]:
        """The attempts running now, in branch order."""
        out = []
        for b in self.branches.values():
            attempt = b.running()
            if attempt is not None:
                out.append((b, attempt))
        return out

    def waiting(self) -> list[tuple[BranchLog, WaitLog]]:
        """The retries waiting now, in branch order."""
        out = []
        for b in self.branches.values():
            wait = b.waiting()
            if wait is not None:
                out.append((b, wait))
        return out

    def final_status(self, name: str) -> str:
        """The branch's status for the summary: an applied branch of a run that did
        not end applied is "still applied" (its effects remain)."""
        b = self.branches[name]
        if self.finished not in (None, "applied") and b.status == "applied":
            return "still applied"
        if b.status == "unapply failed":
            return "still applied (unapply failed)"
        return b.status

    def critical_path(self, now: datetime | None = None) -> tuple[list[str], float]:
        """The chain of dependencies with the longest total apply time, and that time.

        Each branch weighs its measured apply span (first attempt's start to last
        attempt's end, retries included); branches that never started weigh nothing
        and are left out. Ties go to the branch defined first, so the answer is
        deterministic.
        """
        weight: dict[str, float] = {}
        for name, b in self.branches.items():
            seconds = b.seconds("apply", now)
            if seconds is not None:
                weight[name] = seconds
        best: dict[str, float] = {}
        via: dict[str, str | None] = {}
        for name in _topological(self.branches.values()):
            if name not in weight:
                continue
            before, source = 0.0, None
            for dep in self.branches[name].dependencies:
                if dep in best and best[dep] > before:
                    before, source = best[dep], dep
            best[name] = before + weight[name]
            via[name] = source
        if not best:
            return [], 0.0
        end = max(best, key=lambda n: best[n])  # first maximum: definition order
        path = [end]
        while (prev := via[path[-1]]) is not None:
            path.append(prev)
        path.reverse()
        return path, best[end]


def _topological(branches: Iterable[BranchLog]) -> list[str]:
    """Names in an order where each comes after its dependencies (Kahn, definition
    order among the ready). Names in a cycle (never, for a validated graph) are left
    out."""
    items = list(branches)
    names = {b.name for b in items}
    waiting = {b.name: sum(1 for d in b.dependencies if d in names) for b in items}
    dependents: dict[str, list[str]] = {b.name: [] for b in items}
    for b in items:
        for d in b.dependencies:
            if d in names:
                dependents[d].append(b.name)
    order = [b.name for b in items if waiting[b.name] == 0]
    for name in order:  # grows while we walk it
        for child in dependents[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                order.append(child)
    return order


# -- serialisation ---------------------------------------------------------------------


def error_dict(error: BaseException | None) -> dict[str, str] | None:
    """An exception as {"type", "message"} (None stays None); one read back from a
    journal as the original was, so that `kira show` says what `kira run` said."""
    if error is None:
        return None
    if isinstance(error, RestoredError):
        return {"type": error.type_name.rpartition(".")[2], "message": error.message}
    return {"type": type(error).__name__, "message": str(error)}


def event_json(event: Event) -> str:
    """One event as one line of JSON: run_id, kind, branch, at (ISO-8601), attempt,
    error ({"type", "message"} or null), value (as JSON if it serialises, else its
    repr)."""
    record = {
        "run_id": event.run_id,
        "kind": event.kind,
        "branch": event.branch,
        "at": event.at.isoformat(),
        "attempt": event.attempt,
        "error": error_dict(event.error),
        "value": event.value,
    }
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # not JSON: keep what repr says
        record["value"] = repr(event.value)
        return json.dumps(record, ensure_ascii=False)
