"""The driver: decides what happens next, in one place, for every runner.

A runner reports what happened (an attempt returned, raised, a handler decided, a
timer fired, the user interrupted) and carries out the commands the driver puts in
`outbox`: start an apply, start an unapply, consult an error handler, schedule a
retry, finish. The driver owns the `RuntimeState`, the concurrency limit, the
retry decisions, the rollback, the events and the outcome; runners own only
threads, event loops, timers and clocks. No scheduling rule exists in a runner.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias, final

from ._branch import RetryAfter
from ._errors import (
    BranchError,
    KiraError,
    Phase,
    RollbackIncomplete,
    RolledBack,
    RunFailed,
)
from ._events import Event, EventHandler, EventKind
from ._journal import INTENT, WITHDRAWN
from ._state import (
    DoneApplied,
    NotStarted,
    RunningApply,
    RunningApplyRetry,
    RunningUnapply,
    RunningUnapplyRetry,
    RuntimeState,
    UnapplyFailed,
)

_UNAPPLYING = (RunningUnapply, RunningUnapplyRetry)
_RUNNING_KINDS = (RunningApply, RunningApplyRetry, RunningUnapply, RunningUnapplyRetry)

log = logging.getLogger("kira")

# ---------------------------------------------------------------------------------
# Commands: what a runner must do. `task_id` names the attempt in every report.


class StartApply(NamedTuple):
    """Call `apply(config, deps)` of branch `name`; report `applied` or `failed`."""

    task_id: int
    name: str
    attempt: int
    deps: Mapping[str, Any]
    covered: bool = False
    """The journal already holds a committed intent for this start: launch it
    without waiting for a commit."""


class StartUnapply(NamedTuple):
    """Call `unapply(config, deps, value)`; report `unapplied` or `failed`."""

    task_id: int
    name: str
    attempt: int
    deps: Mapping[str, Any]
    value: Any


class Consult(NamedTuple):
    """Call the branch's error handler for `phase`; report `decided`."""

    task_id: int
    name: str
    phase: Phase
    error: BaseException
    attempt: int
    deps: Mapping[str, Any]


class ScheduleRetry(NamedTuple):
    """After `delay` seconds, report `retry_due(task_id)` (it may be ignored then)."""

    task_id: int
    name: str
    phase: Phase
    delay: float


class Compensate(NamedTuple):
    """Call `unapply(config, deps, value)` for a value a timed-out apply returned late;
    report `compensated(task_id, error)`."""

    task_id: int
    name: str
    deps: Mapping[str, Any]
    value: Any


class Finish(NamedTuple):
    """The run is over: `outcome` says how."""

    outcome: Outcome


Command: TypeAlias = StartApply | StartUnapply | Consult | ScheduleRetry | Compensate | Finish

OutcomeKind: TypeAlias = Literal["applied", "rolled_back", "rollback_incomplete"]


@final
class Outcome:
    """How a run ended, and what to return or raise."""

    __slots__ = (
        "abandoned",
        "culprit",
        "errors",
        "kind",
        "results",
        "run_id",
        "still_applied",
        "unapplied",
    )

    def __init__(
        self,
        kind: OutcomeKind,
        run_id: str,
        results: dict[str, Any],
        errors: list[BranchError],
        culprit: BranchError | None,
        unapplied: list[str],
        still_applied: list[str],
        abandoned: list[str],
    ) -> None:
        self.kind = kind
        self.run_id = run_id
        self.results = results
        self.errors = errors
        self.culprit = culprit
        self.unapplied = unapplied
        self.still_applied = still_applied
        self.abandoned = abandoned

    def error(self) -> RunFailed | None:
        """The exception a runner raises for this outcome (None when applied)."""
        common: dict[str, Any] = {
            "run_id": self.run_id,
            "errors": self.errors,
            "culprit": self.culprit,
            "results": self.results,
        }
        if self.kind == "rolled_back":
            return RolledBack(unapplied=self.unapplied, **common)
        if self.kind == "rollback_incomplete":
            return RollbackIncomplete(
                unapplied=self.unapplied,
                still_applied=self.still_applied,
                abandoned=self.abandoned,
                **common,
            )
        return None

    def result(self) -> dict[str, Any]:
        """The results dict, or raise the run's error."""
        err = self.error()
        if err is not None:
            raise err
        return self.results


# ---------------------------------------------------------------------------------


@final
class Driver:
    """Turns reports into commands for one run (see the module docstring).

    Args:
        state: a fresh `RuntimeState`; the driver is the only one to change it.
        run_id: carried by events and errors.
        limit: the most attempts running at once (None: no limit).
        on_event: called with every `Event`, in transition order; exceptions from
            it are logged and ignored.
    """

    __slots__ = (
        "_abandoned",
        "_compensations",
        "_decided",
        "_due",
        "_emit",
        "_in_flight",
        "_intents",
        "_journal",
        "_late_left",
        "_limit",
        "_lingering",
        "_lookahead",
        "_next_id",
        "_pending_value",
        "_reserved",
        "_restored_lingering",
        "_results",
        "_timers",
        "_unapplied",
        "_user_emit",
        "culprit",
        "finished",
        "interrupted",
        "outbox",
        "outcome",
        "run_id",
        "state",
    )

    def __init__(
        self,
        state: RuntimeState,
        *,
        run_id: str,
        limit: int | None = None,
        on_event: EventHandler | None = None,
        journal: JournalLike | None = None,
    ) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"max_workers must be a positive int or None, not {limit!r}")
        self.state = state
        self.run_id = run_id
        self.outbox: deque[Command] = deque()
        self.finished = False
        self.outcome: Outcome | None = None
        self.culprit: BranchError | None = None
        self.interrupted = False
        self._journal = journal
        # events are built when someone listens: the caller or the journal
        self._emit: EventHandler | None = on_event
        if journal is not None and on_event is None:
            self._emit = _ignore
        self._user_emit = on_event
        self._limit = limit if limit is not None else 1 << 62
        # With a journal: branches recorded as maybe starting next (see `reserve`),
        # name -> whether that record is committed yet.
        self._intents: dict[str, bool] = {}
        self._reserved: list[str] = []  # intents recorded since the last `take_reserved`
        self._lookahead = 0 if journal is None else min(16 * self._limit, 1024)
        self._in_flight = 0
        self._next_id = 0
        self._results: dict[str, Any] = {}
        self._pending_value: str | bytes | None = None  # the encoded result being recorded
        # while restoring: branches whose retry was decided; lingering attempts
        self._decided: set[str] = set()
        self._restored_lingering: list[str] = []
        self._unapplied: list[str] = []
        # failed attempts whose retry waits for a timer / for a free slot
        self._timers: dict[int, str] = {}
        self._due: deque[int] = deque()
        # timed-out attempts still out: task id -> (branch, phase, deps)
        self._lingering: dict[int, tuple[str, Phase, Mapping[str, Any]]] = {}
        # late values being compensated: compensation task id -> branch
        self._compensations: dict[int, str] = {}
        self._abandoned: list[str] = []
        self._late_left: list[str] = []  # late values whose compensation failed

    # -- reports ------------------------------------------------------------------

    def start(self) -> None:
        """Begin the run."""
        self._fill()
        self._check_finished()

    def applied(self, task_id: int, value: Any) -> None:
        """The apply attempt `task_id` returned `value`."""
        state = self.state
        name = state.running[task_id]
        if self._journal is not None:
            try:
                encoded = self._journal.encode(name, value)
            except KiraError as exc:
                # The apply happened but cannot be recorded: a failure of the
                # branch, whose value is then compensated like a late one.
                self.failed(task_id, exc, lingering=True, final=True)
                self.late_result(task_id, True, value)
                return
            self._pending_value = encoded
        self._in_flight -= 1
        state.mark_as_applied(name, value)
        self._results[name] = value
        if self._emit is not None:
            self._event("applied", name, state.branch_states[name].apply_attempts, value=value)
        self._fill()
        self._check_finished()

    def unapplied(self, task_id: int) -> None:
        """The unapply attempt `task_id` returned."""
        state = self.state
        name = state.running[task_id]
        self._in_flight -= 1
        bs = state.branch_states[name]
        value = bs.task.value  # type: ignore[union-attr]
        state.mark_as_unapplied(name)
        self._unapplied.append(name)
        self._event("unapplied", name, bs.unapply_attempts, value=value)
        self._fill()
        self._check_finished()

    def failed(
        self, task_id: int, error: BaseException, *, lingering: bool = False, final: bool = False
    ) -> None:
        """The attempt `task_id` raised `error` (or timed out, or its worker died).

        `lingering`: the attempt timed out but goes on (a thread cannot be stopped);
        its outcome is reported later with `late_result` (or `abandon`), and until
        then it holds the branch's dependencies and its slot. `final`: give up
        without consulting the error handler (the run's inactivity timeout).
        """
        state = self.state
        name = state.running[task_id]
        record = state.record_failure(name, error)
        phase = record.phase
        if lingering:
            state.mark_as_lingering(name)
            deps = MappingProxyType(state.resolve_dependencies_of(name))
            self._lingering[task_id] = (name, phase, deps)
        else:
            self._in_flight -= 1
        self._event(
            f"{phase}_failed",  # type: ignore[arg-type]
            name,
            record.attempt,
            error=error,
            value="lingering" if lingering else None,
        )
        branch = state.branch_states[name].branch
        if phase == "apply" and state.rolling_back:
            # Rollback lets running applies finish but retries none of them.
            self._give_up(name, phase)
        elif final or branch.error_handler(phase) is None:
            self._give_up(name, phase)
        else:
            deps = MappingProxyType(state.resolve_dependencies_of(name))
            self.outbox.append(Consult(task_id, name, phase, error, record.attempt, deps))
        self._fill()
        self._check_finished()

    def decided(
        self, task_id: int, decision: object, handler_error: BaseException | None = None
    ) -> None:
        """The error handler consulted for `task_id` returned `decision` (or raised
        `handler_error`)."""
        state = self.state
        name = state.running[task_id]
        bs = state.branch_states[name]
        phase: Phase = "apply" if _is_applying(bs.task) else "unapply"
        if handler_error is not None:
            log.error(
                "kira: the %s error handler of branch %r raised %r; giving up on the branch",
                phase,
                name,
                handler_error,
            )
            state.attach_handler_error(name, handler_error)
            self._give_up(name, phase, handler_error)
        elif phase == "apply" and state.rolling_back:
            self._give_up(name, phase)
        elif decision is True:
            self._retry_now(task_id, name, phase)
        elif decision is False or decision is None:
            self._give_up(name, phase)
        elif isinstance(decision, RetryAfter):
            if decision.seconds > 0:
                self._timers[task_id] = name
                attempt = self._attempts(name, phase) + 1
                self._event("retry_scheduled", name, attempt, value=decision.seconds)
                self.outbox.append(ScheduleRetry(task_id, name, phase, decision.seconds))
            else:
                self._retry_now(task_id, name, phase)
        else:
            log.error(
                "kira: the %s error handler of branch %r returned %r, which is not a retry "
                "decision (True, False, None or kira.RetryAfter); giving up on the branch",
                phase,
                name,
                decision,
            )
            self._give_up(name, phase)
        self._fill()
        self._check_finished()

    def retry_due(self, task_id: int) -> None:
        """The retry timer of `task_id` fired. A timer no longer wanted is ignored."""
        name = self._timers.pop(task_id, None)
        if name is None:
            return
        self._due.append(task_id)
        self._fill()
        self._check_finished()

    def late_result(self, task_id: int, ok: bool, payload: Any) -> None:
        """The lingering attempt `task_id` finished after all: returned `payload`
        (`ok`) or raised it. A value an apply returned is compensated at once: its
        dependencies are still applied, held by the attempt."""
        name, phase, deps = self._lingering.pop(task_id)
        state = self.state
        branch = state.branch_states[name].branch
        if ok and phase == "apply":
            # every value an apply returned is in RunFailed.results; a retry's
            # accepted value, if any, keeps its place
            self._results.setdefault(name, payload)
        if ok and phase == "unapply" and type(state.branch_states[name].task) is UnapplyFailed:
            # the unapply it gave up on did its work after all
            self._in_flight -= 1
            state.mark_lingering_finished(name)
            state.mark_as_unapplied(name)
            self._unapplied.append(name)
            self._event("unapplied", name, state.branch_states[name].unapply_attempts)
        elif ok and phase == "apply" and branch.unapply is not None:
            log.warning(
                "kira: unapplying a value of branch %r that the run could not keep "
                "(returned after its attempt timed out, or not recordable in the journal)",
                name,
            )
            task = self._next_id = self._next_id + 1
            self._compensations[task] = name
            self._event("unapply_started", name, None, value=payload)
            self.outbox.append(Compensate(task, name, deps, payload))
        else:
            self._in_flight -= 1
            state.mark_lingering_finished(name)
        self._fill()
        self._check_finished()

    def compensated(self, task_id: int, error: BaseException | None = None) -> None:
        """The compensation `task_id` of a late value returned, or raised `error`."""
        name = self._compensations.pop(task_id)
        self._in_flight -= 1
        if error is None:
            self.state.mark_lingering_finished(name)
            self._event("unapplied", name, None)
        else:
            log.error("kira: unapplying the late value of branch %r failed: %r", name, error)
            self.state.mark_lingering_finished(name, abandoned=True, error=error)
            self._late_left.append(name)
            self._event("unapply_failed", name, None, error=error)
        self._fill()
        self._check_finished()

    def abandon(self, task_id: int) -> None:
        """Stop waiting for the lingering attempt `task_id` (its grace period is over).

        Its effects are unknown: the branch's dependencies stay applied, and the
        branch is named in the outcome's `abandoned`.
        """
        if task_id not in self._lingering:
            return
        name, _, _ = self._lingering.pop(task_id)
        self._in_flight -= 1
        self.state.mark_lingering_finished(name, abandoned=True)
        log.error(
            "kira: an attempt of branch %r timed out and has not returned; giving up waiting",
            name,
        )
        if name not in self._abandoned:
            self._abandoned.append(name)
        self._fill()
        self._check_finished()

    def inactivity(self, task_ids: list[int], errors: list[BaseException], lingering: bool) -> None:
        """The run's inactivity timeout expired: the attempts `task_ids` fail with
        `errors` and are given up, and the run rolls back."""
        for task_id, error in zip(task_ids, errors, strict=True):
            if task_id in self.state.running:
                self.failed(task_id, error, lingering=lingering, final=True)
        if not self.state.rolling_back:
            self.state.start_rollback()
            self._rollback_started(None, None, "inactivity")
            self._stop_apply_retries()
        self._fill()
        self._check_finished()

    def interrupt(self) -> None:
        """Stop applying and roll back (KeyboardInterrupt, cancellation)."""
        if self.finished:
            return
        self.interrupted = True
        if not self.state.rolling_back:
            self.state.start_rollback()
            self._rollback_started(None, None, "interrupted")
            self._stop_apply_retries()
        self._fill()
        self._check_finished()

    # -- journaling ahead ------------------------------------------------------------

    def reserve(self, minimum: int = 1) -> int:
        """Record in the journal which branches may start next (call before a
        commit); return how many were added. Adds none, without looking, when
        fewer than `minimum` could be.

        Up to a lookahead of 16 x `max_workers` branches ready to apply but waiting
        for a free slot get an intent. Once `committed`, such a branch starts
        without a commit of its own: its `StartApply` says `covered`. So a run
        commits once per many starts, however few run at once.
        """
        intents = self._intents
        # An intent is only given to a ready branch, and taken back when it starts
        # (or at the rollback): so the ready ones without an intent are counted in
        # O(1), and most calls, finding too few, cost no more than that.
        fresh_at_most = min(self._lookahead, self.state.apply_ready_count()) - len(intents)
        if fresh_at_most < max(minimum, 1) or self.finished or self._journal is None:
            return 0
        fresh = [n for n in self.state.first_apply_ready(self._lookahead) if n not in intents]
        if fresh:
            self._journal.record_intents(self.run_id, fresh)
            for name in fresh:
                intents[name] = False
            self._reserved += fresh
        return len(fresh)

    def take_reserved(self) -> list[str]:
        """The intents recorded since the last call: the journal's rows taken for a
        commit hold them (pass them to `committed` when it is done)."""
        taken, self._reserved = self._reserved, []
        return taken

    def intents_low(self) -> bool:
        """Whether fewer than half the lookahead's intents are left: time to commit
        more before the starts catch up with them."""
        return 2 * len(self._intents) < self._lookahead and not self.state.rolling_back

    @property
    def lookahead(self) -> int:
        """How many intents `reserve` keeps ahead of the starts."""
        return self._lookahead

    def committed(self, names: list[str]) -> None:
        """The journal committed the intents of `names` (from `take_reserved`)."""
        intents = self._intents
        for name in names:
            if name in intents:  # (not started, nor withdrawn, since)
                intents[name] = True

    # -- resuming a recorded run ---------------------------------------------------------

    def restore(self, events: list[Event]) -> None:
        """Bring this fresh driver to where a recorded run's `events` left it.

        The events are replayed through the state's own transitions (so a damaged
        or foreign record fails loudly instead of building an impossible state),
        each stamped with its recorded time. Call before `resume`.
        """
        state = self.state
        recorded_at: list[datetime] = [datetime.now(UTC)]
        clock = state._clock
        state._clock = lambda: recorded_at[0]
        task_id = 0
        self._decided = set()
        # An intent never followed by its start nor withdrawn: the branch may have
        # begun (its start was to be committed later), so it counts as started.
        open_intents: dict[str, datetime] = {}
        replay: list[Event] = []
        for event in events:
            kind = event.kind
            if kind in (INTENT, WITHDRAWN):
                for name in event.value:
                    if kind == INTENT:
                        open_intents[name] = event.at
                    else:
                        open_intents.pop(name, None)
                continue
            if kind == "apply_started":
                open_intents.pop(event.branch, None)  # type: ignore[arg-type]
            elif open_intents and kind in ("rollback_started", "failed"):
                # Withdrawals come before the events that start a rollback, so
                # none is open here unless the journal lost its tail mid-group.
                replay += _intent_starts(self.run_id, open_intents)
            replay.append(event)
        replay += _intent_starts(self.run_id, open_intents)
        try:
            for event in replay:
                recorded_at[0] = event.at
                kind, name = event.kind, event.branch
                if event.attempt is None and kind.startswith("unappl"):
                    # the compensation of a value the run could not keep
                    if name is not None and kind != "unapply_started":
                        self._end_lingering(name, kind == "unapply_failed", event.error)
                    continue
                if kind == "rollback_started":
                    state.start_rollback()
                    continue
                if name is None:
                    continue
                bs = state.branch_states[name]
                if kind == "apply_started":
                    if _is_applying(bs.task) and bs.apply_attempts == event.attempt:
                        continue  # the same attempt, made again after a crash
                    task_id += 1
                    if type(bs.task) is NotStarted:
                        state.mark_as_applying(name, task_id)
                    else:
                        state.record_apply_retry(name, task_id)
                    bs.apply_attempts = event.attempt or 1
                elif kind == "applied":
                    state.mark_as_applied(name, event.value)
                    self._results[name] = event.value
                elif kind in ("apply_failed", "unapply_failed"):
                    state.record_failure(name, event.error or RuntimeError("unrecorded error"))
                    self._decided.discard(name)
                    if event.value == "lingering":
                        state.mark_as_lingering(name)
                        self._restored_lingering.append(name)
                elif kind == "retry_scheduled":
                    self._decided.add(name)
                elif kind == "failed":
                    if event.error is not None:
                        state.attach_handler_error(name, event.error)
                    if event.value == "unapply":
                        state.mark_as_unapply_failed(name)
                    else:
                        first = not state.rolling_back
                        state.mark_as_failed(name)
                        if first:
                            self.culprit = bs.errors[-1]
                elif kind == "unapply_started":
                    if type(bs.task) in _UNAPPLYING and bs.unapply_attempts == event.attempt:
                        continue
                    task_id += 1
                    if type(bs.task) is DoneApplied:
                        state.mark_as_unapplying(name, task_id)
                    else:
                        state.record_unapply_retry(name, task_id)
                    bs.unapply_attempts = event.attempt or 1
                elif kind == "unapplied":
                    state.mark_as_unapplied(name)
                    self._unapplied.append(name)
            # The process that ran these attempts is gone, and its threads with it:
            # whatever they did is unknown, so their dependencies must stay applied.
            for name in list(self._restored_lingering):
                self._end_lingering(name, True, None)
        finally:
            state._clock = clock
        self._next_id = task_id

    def _end_lingering(self, name: str, abandoned: bool, error: BaseException | None) -> None:
        if name not in self._restored_lingering:
            return
        self._restored_lingering.remove(name)
        self.state.mark_lingering_finished(name, abandoned=abandoned, error=error)
        if abandoned and error is None and name not in self._abandoned:
            self._abandoned.append(name)
        elif error is not None:
            self._late_left.append(name)

    def conclude(self) -> None:
        """Compute the outcome of a restored run that had finished."""
        self._check_finished()

    def resume(self) -> None:
        """Carry on a restored run: attempts that were under way are made again
        (same attempt numbers, so `current_attempt()` keys repeat), failed ones
        awaiting a decision are retried, and the rest goes on as usual."""
        state = self.state
        for name, bs in state.branch_states.items():
            task = bs.task
            if type(task) not in _RUNNING_KINDS:
                continue
            task_id: int = task.task_id  # type: ignore[union-attr,assignment]
            applying = _is_applying(task)
            phase: Phase = "apply" if applying else "unapply"
            if state.record_pending(name):
                handler = bs.branch.error_handler(phase)
                if name in self._decided:  # the retry was decided before the crash
                    if applying and state.rolling_back:
                        self._give_up(name, phase)
                    else:
                        self._due.append(task_id)
                elif (applying and state.rolling_back) or handler is None:
                    self._give_up(name, phase)
                else:  # the crash came before the decision: ask again
                    record = bs.errors[-1]
                    deps = MappingProxyType(state.resolve_dependencies_of(name))
                    self.outbox.append(
                        Consult(task_id, name, phase, record.error, record.attempt, deps)
                    )
                continue
            self._in_flight += 1
            deps = MappingProxyType(state.resolve_dependencies_of(name))
            if applying:
                self._event("apply_started", name, bs.apply_attempts)
                self.outbox.append(StartApply(task_id, name, bs.apply_attempts, deps))
            else:
                value = task.value  # type: ignore[union-attr]
                self._event("unapply_started", name, bs.unapply_attempts)
                self.outbox.append(StartUnapply(task_id, name, bs.unapply_attempts, deps, value))
        self._fill()
        self._check_finished()

    # -- decisions --------------------------------------------------------------------

    def _attempts(self, name: str, phase: Phase) -> int:
        bs = self.state.branch_states[name]
        return bs.apply_attempts if phase == "apply" else bs.unapply_attempts

    def _retry_now(self, task_id: int, name: str, phase: Phase) -> None:
        """Retry as soon as a slot is free (delays go through `ScheduleRetry`)."""
        self._event("retry_scheduled", name, self._attempts(name, phase) + 1, value=0.0)
        self._due.append(task_id)

    def _give_up(self, name: str, phase: Phase, handler_error: BaseException | None = None) -> None:
        state = self.state
        if phase == "apply":
            first = not state.rolling_back
            state.mark_as_failed(name)
            if first:
                self._withdraw_intents()  # (the first give-up starts the rollback)
            attempts = state.branch_states[name].apply_attempts
            self._event("failed", name, attempts, error=handler_error, value="apply")
            if first:
                self.culprit = state.branch_states[name].errors[-1]
                self._rollback_started(name, self.culprit.error, "failure")
                self._stop_apply_retries()
        else:
            state.mark_as_unapply_failed(name)
            self._event("failed", name, state.branch_states[name].unapply_attempts, value="unapply")

    def _rollback_started(self, name: str | None, error: BaseException | None, why: str) -> None:
        self._withdraw_intents()
        self._event("rollback_started", name, error=error, value=why)

    def _withdraw_intents(self) -> None:
        """No apply starts any more: withdraw the intents, in the journal before the
        events that start the rollback, so that no record of the rollback can be
        read back with an intent still open."""
        if self._intents:
            assert self._journal is not None
            self._journal.record_intents(self.run_id, list(self._intents), WITHDRAWN)
            self._intents.clear()

    def _stop_apply_retries(self) -> None:
        """Rolling back: give up every apply waiting for a retry."""
        state = self.state
        for task_id in [t for t in self._timers if self._is_apply(t)]:
            self._give_up(self._timers.pop(task_id), "apply")
        keep = deque(t for t in self._due if not self._is_apply(t))
        for task_id in self._due:
            if self._is_apply(task_id):
                self._give_up(state.running[task_id], "apply")
        self._due = keep

    def _is_apply(self, task_id: int) -> bool:
        name = self.state.running[task_id]
        return _is_applying(self.state.branch_states[name].task)

    def _fill(self) -> None:
        """Start whatever may start, retries first, up to the limit."""
        state = self.state
        outbox = self.outbox
        limit = self._limit
        while self._in_flight < limit:
            if self._due:
                self._start_retry(self._due.popleft())
                continue
            if not state.rolling_back:
                # the hot loop of every run: kept lean on purpose
                peek = state.next_apply_ready
                emit = self._emit
                intents = self._intents
                while self._in_flight < limit:
                    name = peek()
                    if name is None:
                        return
                    task_id = self._next_id = self._next_id + 1
                    state.mark_as_applying(name, task_id)
                    self._in_flight += 1
                    deps = MappingProxyType(state.resolve_dependencies_of(name))
                    if emit is not None:
                        self._event("apply_started", name, 1)
                    if intents:
                        covered = intents.pop(name, False)
                        outbox.append(StartApply(task_id, name, 1, deps, covered))
                    else:
                        outbox.append(StartApply(task_id, name, 1, deps))
                return
            name = state.next_unapply_ready()
            if name is None:
                return
            task_id = self._next_id = self._next_id + 1
            bs = state.branch_states[name]
            value = bs.task.value  # type: ignore[union-attr]
            state.mark_as_unapplying(name, task_id)
            self._event("unapply_started", name, 1)
            if bs.branch.unapply is None:
                # Nothing to undo: an instant success, still in order.
                state.mark_as_unapplied(name)
                self._unapplied.append(name)
                self._event("unapplied", name, 1, value=value)
                continue
            self._in_flight += 1
            deps = MappingProxyType(state.resolve_dependencies_of(name))
            outbox.append(StartUnapply(task_id, name, 1, deps, value))

    def _start_retry(self, old_id: int) -> None:
        state = self.state
        name = state.running[old_id]
        bs = state.branch_states[name]
        task_id = self._next_id = self._next_id + 1
        deps = MappingProxyType(state.resolve_dependencies_of(name))
        self._in_flight += 1
        if _is_applying(bs.task):
            state.record_apply_retry(name, task_id)
            self._event("apply_started", name, bs.apply_attempts)
            self.outbox.append(StartApply(task_id, name, bs.apply_attempts, deps))
        else:
            value = bs.task.value  # type: ignore[union-attr]
            state.record_unapply_retry(name, task_id)
            self._event("unapply_started", name, bs.unapply_attempts)
            self.outbox.append(StartUnapply(task_id, name, bs.unapply_attempts, deps, value))

    def _check_finished(self) -> None:
        if self.finished:
            return
        state = self.state
        if state.rolling_back:
            if not state.unapply_done() or self._compensations:
                return
            still = [
                name
                for name, bs in state.branch_states.items()
                if type(bs.task) in (DoneApplied, UnapplyFailed)
            ]
            incomplete = still or self._abandoned or self._late_left
            kind: OutcomeKind = "rollback_incomplete" if incomplete else "rolled_back"
        elif state.apply_done() and not state.running and not self._lingering:
            if self._compensations:
                return
            kind, still = "applied", []
            if self._abandoned:
                log.warning(
                    "kira: run %s applied, but timed-out attempts of %s never returned: "
                    "their effects are unknown",
                    self.run_id,
                    ", ".join(self._abandoned),
                )
        else:
            return
        still += [n for n in self._late_left if n not in still]
        self.finished = True
        results = self._results
        self.outcome = Outcome(
            kind,
            self.run_id,
            # definition order, whatever order the applies finished in
            {name: results[name] for name in state.branch_states if name in results},
            state.get_errors(),
            self.culprit,
            list(self._unapplied),
            still,
            list(self._abandoned),
        )
        self._event("run_finished", None, value=kind)
        self.outbox.append(Finish(self.outcome))

    # -- events -----------------------------------------------------------------------

    def _event(
        self,
        kind: EventKind,
        branch: str | None,
        attempt: int | None = None,
        *,
        error: BaseException | None = None,
        value: Any = None,
    ) -> None:
        emit = self._emit
        if emit is None:
            return
        at = self.state._clock()
        journal = self._journal
        if journal is not None:
            encoded = None
            if kind == "applied":
                encoded, self._pending_value = self._pending_value, None
            journal.record_fields(self.run_id, kind, branch, at, attempt, error, value, encoded)
            if self._user_emit is None:
                return  # no Event to build: only the journal listens
            emit = self._user_emit
        event = Event(self.run_id, kind, branch, at, attempt, error, value)
        try:
            emit(event)
        except BaseException:  # SystemExit too: the rollback must not be skipped
            log.exception("kira: the on_event callback raised on %s; the run goes on", kind)


class JournalLike(Protocol):
    """What the driver needs of a journal (see `kira.Journal`)."""

    def encode(self, branch: str, value: Any) -> str | bytes: ...

    def record_fields(
        self,
        run_id: str,
        kind: str,
        branch: str | None,
        at: datetime,
        attempt: int | None,
        error: BaseException | None,
        value: Any,
        encoded: str | bytes | None = None,
    ) -> None: ...

    def record_intents(self, run_id: str, names: Sequence[str], kind: str = ...) -> None: ...


def _intent_starts(run_id: str, open_intents: dict[str, datetime]) -> list[Event]:
    """Starts for the intents still open: those branches may have begun."""
    starts = [Event(run_id, "apply_started", name, at, 1) for name, at in open_intents.items()]
    open_intents.clear()
    return starts


def _ignore(event: Event) -> None:
    return None


def _is_applying(task: object) -> bool:
    return type(task) is RunningApply or type(task) is RunningApplyRetry
