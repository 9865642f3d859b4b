"""The runtime state: every scheduling rule of kira lives in this file.

`RuntimeState` is a pure state machine (no threads, no I/O, no clock of its own).
Runners tell it what happened (`mark_as_*`, `record_*`) and ask it what may start
(`find_apply_ready`, `find_unapply_ready`). Each branch's `task` is one of the
frozen task-state values below; which action is allowed from which task state is
written once, in `_ALLOWED`. A method checks everything first, then changes the
state; a refused transition raises `RuntimeStateError` and changes nothing.

Invariants (tested by property tests in tests/core):
- A branch starts applying only when all its dependencies have applied, and never
  once the run is rolling back.
- While a branch applies, is applied, unapplies or has given up unapplying, it
  *holds* each of its dependencies: a held branch cannot start unapplying. A branch
  stops holding when it gives up applying (`Failed`) or finishes unapplying. A
  timed-out attempt still out in a thread ("lingering") holds too, because the
  value it may yet return was computed from those dependencies.
- So unapplies run in reverse dependency order, and a branch whose unapply gave up
  keeps its dependencies applied.

Readiness is kept incrementally, as graphlib does: each branch counts its
dependencies that have not applied (`_waiting`) and its dependents that hold it
(`_holders`). A transition updates only the branch and its direct neighbours, and
the two ready sets (heaps of definition positions, so order never depends on hashing)
gain or lose only those. Every transition costs O(own edges).
"""

from __future__ import annotations

import gc
import heapq
import reprlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias, final

from ._branch import Branch
from ._errors import BranchError, Phase, RuntimeStateError
from ._graph import validate

# ---------------------------------------------------------------------------------
# Task states: values, matched by type.


@final
@dataclass(frozen=True, slots=True)
class NotStarted:
    """The branch has not started applying."""


@final
@dataclass(frozen=True, slots=True)
class RunningApply:
    """The first apply attempt is under way (or failed and awaits a decision)."""

    task_id: Hashable


@final
@dataclass(frozen=True, slots=True)
class RunningApplyRetry:
    """A retry of the apply is under way (or failed and awaits a decision)."""

    task_id: Hashable


@final
@dataclass(frozen=True, slots=True)
class RunningUnapply:
    """The first unapply attempt of `value` is under way."""

    task_id: Hashable
    value: Any


@final
@dataclass(frozen=True, slots=True)
class RunningUnapplyRetry:
    """A retry of the unapply of `value` is under way."""

    task_id: Hashable
    value: Any


@final
@dataclass(frozen=True, slots=True)
class Failed:
    """The apply was given up; nothing of it remains to undo."""


@final
@dataclass(frozen=True, slots=True)
class DoneApplied:
    """The apply succeeded with `value`."""

    value: Any


@final
@dataclass(frozen=True, slots=True)
class DoneUnapplied:
    """The branch was applied and then unapplied."""


@final
@dataclass(frozen=True, slots=True)
class UnapplyFailed:
    """The unapply of `value` was given up: the branch stays applied."""

    value: Any


TaskState: TypeAlias = (
    NotStarted
    | RunningApply
    | RunningApplyRetry
    | RunningUnapply
    | RunningUnapplyRetry
    | Failed
    | DoneApplied
    | DoneUnapplied
    | UnapplyFailed
)
TASK_STATES: tuple[type[TaskState], ...] = (
    NotStarted,
    RunningApply,
    RunningApplyRetry,
    RunningUnapply,
    RunningUnapplyRetry,
    Failed,
    DoneApplied,
    DoneUnapplied,
    UnapplyFailed,
)

_NOT_STARTED = NotStarted()
_FAILED = Failed()
_DONE_UNAPPLIED = DoneUnapplied()

# What each kind of task state means for the bookkeeping.
_APPLYING = frozenset({RunningApply, RunningApplyRetry})
_UNAPPLYING = frozenset({RunningUnapply, RunningUnapplyRetry})
_RUNNING = _APPLYING | _UNAPPLYING
# The apply succeeded at some point: dependents no longer wait for the branch.
_SUCCEEDED = frozenset(
    {DoneApplied, RunningUnapply, RunningUnapplyRetry, DoneUnapplied, UnapplyFailed}
)
# The branch holds its dependencies: they may not start unapplying.
_HOLDING = frozenset({RunningApply, RunningApplyRetry, DoneApplied} | _UNAPPLYING | {UnapplyFailed})
HOLDING = _HOLDING  # for runners naming what an abrupt stop leaves applied
# States that carry the value the apply returned.
_VALUED = frozenset({DoneApplied, RunningUnapply, RunningUnapplyRetry, UnapplyFailed})

# The transition table: which task states each action may start from. Conditions
# beyond the task state (dependencies, phase, attempt) are checked by each method.
_ALLOWED: dict[str, frozenset[type]] = {
    "mark_as_applying": frozenset({NotStarted}),
    "record_failure": _RUNNING,
    "record_apply_retry": _APPLYING,
    "mark_as_applied": _APPLYING,
    "mark_as_failed": _APPLYING,
    "unblock_dependent_unapplies": frozenset({NotStarted, Failed, DoneUnapplied}),
    "mark_as_unapplying": frozenset({DoneApplied}),
    "record_unapply_retry": _UNAPPLYING,
    # from UnapplyFailed: an unapply given up on (timed out) returned after all
    "mark_as_unapplied": _UNAPPLYING | {UnapplyFailed},
    "mark_as_unapply_failed": _UNAPPLYING,
    "mark_as_lingering": _RUNNING,
    "mark_lingering_finished": frozenset(TASK_STATES),
}
ACTIONS: tuple[str, ...] = tuple(_ALLOWED)


def _effects(old: type[TaskState], new: type[TaskState]) -> tuple[bool, int, int, int, int]:
    """What moving from `old` to `new` changes: whether the running map and the
    progress sets change, then the change (-1, 0, +1) of: applied-ness (dependents'
    waiting counts), holding of dependencies, DoneApplied count, DoneUnapplied count.
    """

    def delta(group: frozenset[type]) -> int:
        return (new in group) - (old in group)

    running = old in _RUNNING or new in _RUNNING
    return (
        running,
        delta(_SUCCEEDED),
        delta(_HOLDING),
        delta(frozenset({DoneApplied})),
        delta(frozenset({DoneUnapplied})),
    )


_EFFECTS = {(a, b): _effects(a, b) for a in TASK_STATES for b in TASK_STATES}


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _describe(task: TaskState) -> str:
    tid = getattr(task, "task_id", None)
    name = type(task).__name__
    return f"{name}(task_id={reprlib.repr(tid)})" if tid is not None else name


# ---------------------------------------------------------------------------------


@final
class _ReadyQueue:
    """A set of branches with O(log n) add and take-first, first = definition order.

    Membership is a flag per branch position; order a heap of positions that may
    hold stale entries (discarded since), skipped lazily. Each add pushes at most
    once, so the total work stays O(adds * log n). Definition order makes starts
    predictable, and it packs work well: earlier branches tend to have more
    downstream work.
    """

    __slots__ = ("_count", "_flags", "_heap", "_names")

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._flags = bytearray(len(names))
        self._heap: list[int] = []
        self._count = 0

    def add(self, position: int) -> None:
        if not self._flags[position]:
            self._flags[position] = 1
            self._count += 1
            heapq.heappush(self._heap, position)

    def discard(self, position: int) -> None:
        if self._flags[position]:
            self._flags[position] = 0
            self._count -= 1

    def peek(self) -> str | None:
        heap, flags = self._heap, self._flags
        while heap:
            position = heap[0]
            if flags[position]:
                return self._names[position]
            heapq.heappop(heap)
        return None

    def first(self, k: int) -> list[str]:
        """The first `k` members, in order, without taking them: O(k log n).

        Pops them (dropping stale and repeated entries, as `peek` would) and pushes
        them back: in C, this is cheaper than walking the heap in Python.
        """
        heap, flags = self._heap, self._flags
        taken: list[int] = []
        pop = heapq.heappop
        while heap and len(taken) < k:
            position = pop(heap)
            if flags[position] and (not taken or taken[-1] != position):
                taken.append(position)
        push = heapq.heappush
        for position in taken:
            push(heap, position)
        names = self._names
        return [names[p] for p in taken]

    def __bool__(self) -> bool:
        return self._count > 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        flags, names = self._flags, self._names
        return (names[p] for p in sorted(set(self._heap)) if flags[p])


@final
class BranchState:
    """One branch's place in a run. Read it; change it only through `RuntimeState`.

    Attributes:
        branch: the definition.
        task: the current task state (`NotStarted`, `RunningApply`, ...).
        errors: this branch's failed attempts, oldest first.
        apply_attempts / unapply_attempts: attempts started in each phase.
        awaiting: names of dependencies that have not applied yet.
        blocking: names of dependents (they wait for this branch to apply).
        awaiting_unapply: names of dependents that must unapply first (they are
            applying, applied, unapplying, or have an attempt still out).
        blocking_unapply: names of dependencies (they unapply after this branch).
    """

    __slots__ = (
        "_abandoned",
        "_attempt_failed",
        "_dependents",
        "_deps",
        "_holders",
        "_index",
        "_lingered",
        "_lingering",
        "_waiting",
        "apply_attempts",
        "branch",
        "errors",
        "task",
        "unapply_attempts",
    )

    def __init__(self, branch: Branch, index: int = 0) -> None:
        self.branch = branch
        self._index = index  # position in definition order
        self.task: TaskState = _NOT_STARTED
        self.errors: tuple[BranchError, ...] = ()
        self.apply_attempts = 0
        self.unapply_attempts = 0
        self._deps: tuple[BranchState, ...] = ()
        self._dependents: tuple[BranchState, ...] = ()
        # dependencies whose apply has not succeeded: 0 means ready to apply
        self._waiting = 0
        # dependents that hold this branch: 0 (and applied) means ready to unapply
        self._holders = 0
        # timed-out attempts whose threads have not returned; they hold dependencies
        self._lingering = 0
        # lingering attempts no longer waited for; they hold dependencies for good
        self._abandoned = 0
        # the task value of the last attempt marked lingering, so it is marked once
        self._lingered: TaskState | None = None
        # the current attempt failed and awaits a retry or a give-up
        self._attempt_failed = False

    @property
    def name(self) -> str:
        """The branch's name."""
        return self.branch.name

    @property
    def awaiting(self) -> frozenset[str]:
        """Dependencies that have not applied yet."""
        return frozenset(d.branch.name for d in self._deps if type(d.task) not in _SUCCEEDED)

    @property
    def blocking(self) -> tuple[str, ...]:
        """Dependents, in definition order."""
        return tuple(d.branch.name for d in self._dependents)

    @property
    def awaiting_unapply(self) -> frozenset[str]:
        """Dependents that must finish unapplying (or give up applying) first."""
        return frozenset(d.branch.name for d in self._dependents if _holds(d, d.task))

    @property
    def blocking_unapply(self) -> tuple[str, ...]:
        """Dependencies, in the branch's order."""
        return self.branch.dependencies

    @property
    def lingering(self) -> int:
        """Timed-out attempts of this branch whose threads have not returned yet."""
        return self._lingering

    def __repr__(self) -> str:
        return f"BranchState({self.branch.name!r}, {_describe(self.task)})"


def _holds(bs: BranchState, task: TaskState) -> bool:
    return type(task) in _HOLDING or bs._lingering > 0 or bs._abandoned > 0


@final
@dataclass(eq=False)
class Progress:
    """Counters of a run; always equal to a recount from the branch states.

    `applied` counts branches whose apply succeeded (including those unapplied
    since), `unapplied` those whose unapply succeeded. The sets name the branches
    in each running task state.
    """

    total: int = 0
    applied: int = 0
    unapplied: int = 0
    applies_running: set[str] = field(default_factory=set)
    applies_retrying: set[str] = field(default_factory=set)
    unapplies_running: set[str] = field(default_factory=set)
    unapplies_retrying: set[str] = field(default_factory=set)


# ---------------------------------------------------------------------------------


@final
class RuntimeState:
    """The pure state machine of a run (see the module docstring for the rules).

    Create it with `RuntimeState.create`. Fields: `config`, `timeout`,
    `branch_states` (name -> `BranchState`, definition order), `running`
    (task id -> branch name, for every branch in a running task state) and
    `progress`. Every method raises `RuntimeStateError` for an impossible
    transition and then leaves the state untouched.
    """

    __slots__ = (
        "_apply_ready",
        "_clock",
        "_errors",
        "_lingering_total",
        "_n_done_applied",
        "_progress_sets",
        "_rolling_back",
        "_unapply_ready",
        "branch_states",
        "config",
        "progress",
        "running",
        "timeout",
    )

    def __init__(
        self,
        config: Any,
        branch_states: dict[str, BranchState],
        timeout: float | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.config = config
        self.timeout = timeout
        self.branch_states = branch_states
        self.running: dict[Hashable, str] = {}
        self.progress = Progress(total=len(branch_states))
        self._clock = clock
        self._errors: list[BranchError] = []
        self._rolling_back = False
        self._lingering_total = 0
        self._n_done_applied = 0  # branches in DoneApplied right now
        # NotStarted with every dependency applied; DoneApplied and held by nobody
        names = list(branch_states)
        self._apply_ready = _ReadyQueue(names)
        self._unapply_ready = _ReadyQueue(names)
        p = self.progress
        self._progress_sets: dict[type[TaskState], set[str]] = {
            RunningApply: p.applies_running,
            RunningApplyRetry: p.applies_retrying,
            RunningUnapply: p.unapplies_running,
            RunningUnapplyRetry: p.unapplies_retrying,
        }
        for bs in branch_states.values():
            if bs._waiting == 0:
                self._apply_ready.add(bs._index)

    @classmethod
    def create(
        cls,
        config: Any,
        branches: Iterable[Branch],
        timeout: float | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> RuntimeState:
        """Validate the graph and build the state of a run that has not started.

        Args:
            config: shared by every callback of the run.
            branches: the branch definitions; their order is the definition order.
            timeout: the run's inactivity limit in seconds (kept for the runner).
            clock: returns an aware UTC datetime; stamps errors (default: wall clock).

        Raises:
            DuplicateBranchError, MissingDependencyError, CycleError (all GraphError),
            TypeError for something that is not a Branch, ValueError for a bad timeout.
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise ValueError(
                f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        # Building N linked objects makes the cyclic GC traverse the growing graph
        # again and again (a third of the time at 100k branches); nothing built
        # here is garbage, so the collector waits until the state is complete.
        collecting = gc.isenabled()
        gc.disable()
        try:
            graph = validate(branches)
            states = [BranchState(b, i) for i, b in enumerate(graph.branches)]
            at = states.__getitem__
            for bs, deps, dependents in zip(
                states, graph.dependencies, graph.dependents, strict=True
            ):
                if deps:
                    bs._deps = tuple(map(at, deps))
                    bs._waiting = len(deps)
                if dependents:
                    bs._dependents = tuple(map(at, dependents))
        finally:
            if collecting:
                gc.enable()
        return cls(config, {bs.branch.name: bs for bs in states}, timeout, clock or _utc_now)

    # -- queries ----------------------------------------------------------------

    @property
    def rolling_back(self) -> bool:
        """Whether the run has started rolling back (a give-up or `start_rollback`)."""
        return self._rolling_back

    def apply_done(self) -> bool:
        """Whether every branch is applied."""
        return self._n_done_applied == self.progress.total

    def unapply_done(self) -> bool:
        """Whether rolling back has finished.

        True when nothing is running, no timed-out attempt is still out, and no
        applied branch can still be unapplied: each is unapplied, or its unapply gave
        up, or a dependent's did (so it must stay applied).
        """
        if self.running or self._lingering_total:
            return False
        return self._n_done_applied == 0 or (self._rolling_back and not self._unapply_ready)

    def find_apply_ready(self) -> frozenset[str]:
        """Branches that may start applying now (none once rolling back)."""
        if self._rolling_back:
            return frozenset()
        return frozenset(self._apply_ready)

    def find_unapply_ready(self) -> frozenset[str]:
        """Branches that may start unapplying now (none until rolling back)."""
        if not self._rolling_back:
            return frozenset()
        return frozenset(self._unapply_ready)

    def next_apply_ready(self) -> str | None:
        """The first branch, in definition order, that is ready to apply, or None.

        O(log n) amortized: drivers use it instead of building `find_apply_ready()`
        after every event.
        """
        return None if self._rolling_back else self._apply_ready.peek()

    def apply_ready_count(self) -> int:
        """How many branches are ready to apply (0 while rolling back): O(1)."""
        return 0 if self._rolling_back else len(self._apply_ready)

    def first_apply_ready(self, k: int) -> list[str]:
        """Up to `k` branches ready to apply, first in definition order first (the
        order `next_apply_ready` gives them), without changing anything: O(k log k).

        Journaling drivers use it to record, ahead of time, which branches may start
        next (see `Journal`).
        """
        return [] if self._rolling_back else self._apply_ready.first(k)

    def next_unapply_ready(self) -> str | None:
        """The first branch, in definition order, ready to unapply (None until
        rolling back)."""
        return self._unapply_ready.peek() if self._rolling_back else None

    def get_branch(self, name: str) -> BranchState:
        """The `BranchState` of `name`."""
        return self._get(name, "get_branch")

    def get_branch_from_task_id(self, task_id: Hashable) -> BranchState:
        """The `BranchState` of the branch whose running task is `task_id`."""
        try:
            name = self.running[task_id]
        except (KeyError, TypeError):
            raise RuntimeStateError(
                repr(task_id), "get_branch_from_task_id", "unknown", "no running task has this id"
            ) from None
        return self.branch_states[name]

    def get_branch_task_id(self, name: str) -> Hashable:
        """The task id of `name`'s running attempt."""
        bs = self._get(name, "get_branch_task_id")
        task = bs.task
        if type(task) not in _RUNNING:
            raise RuntimeStateError(
                name, "get_branch_task_id", _describe(task), "it is not running"
            )
        return task.task_id  # type: ignore[union-attr]

    def resolve_dependencies_of(self, name: str) -> dict[str, Any]:
        """`name`'s direct dependencies' results, in its dependency order."""
        bs = self.branch_states.get(name) if type(name) is str else None
        if bs is None:
            bs = self._get(name, "resolve_dependencies_of")
        try:
            return {d.branch.name: d.task.value for d in bs._deps}  # type: ignore[union-attr]
        except AttributeError:
            missing = [d.branch.name for d in bs._deps if type(d.task) not in _VALUED]
            raise RuntimeStateError(
                name,
                "resolve_dependencies_of",
                _describe(bs.task),
                f"dependencies without a result: {', '.join(missing)}",
            ) from None

    def record_pending(self, name: str) -> bool:
        """Whether `name`'s current attempt failed and awaits a retry or a give-up."""
        return self._get(name, "record_pending")._attempt_failed

    def get_done(self) -> dict[str, Any]:
        """Results of the branches that are applied now, in definition order."""
        return {
            name: bs.task.value
            for name, bs in self.branch_states.items()
            if type(bs.task) is DoneApplied
        }

    def get_errors(self) -> list[BranchError]:
        """Every recorded failure, oldest first."""
        return list(self._errors)

    # -- transitions: applying ------------------------------------------------------

    def mark_as_applying(self, name: str, task_id: Hashable) -> None:
        """The first apply attempt of `name` started as task `task_id`.

        From now on `name` holds its dependencies: none may unapply until it ends.
        """
        bs = self.branch_states.get(name) if type(name) is str else None
        if (
            bs is None
            or type(bs.task) is not NotStarted
            or bs._waiting
            or self._rolling_back
            or type(task_id) is not int  # anything else: checked for hashability below
            or task_id in self.running
        ):
            bs = self._check(name, "mark_as_applying")
            if bs._waiting:
                self._refuse(
                    bs,
                    "mark_as_applying",
                    "dependencies not applied yet: " + ", ".join(sorted(bs.awaiting)),
                )
            if self._rolling_back:
                self._refuse(bs, "mark_as_applying", "the run is rolling back: no apply may start")
            self._check_task_id(bs, "mark_as_applying", task_id)
        # The hot path of every run, so `_move(bs, RunningApply(task_id))` written
        # out for this one pair of states (the property tests check they agree).
        bs.apply_attempts = 1
        bs._attempt_failed = False
        bs.task = RunningApply(task_id)
        self.running[task_id] = name
        self.progress.applies_running.add(name)
        self._apply_ready.discard(bs._index)
        if not (bs._lingering or bs._abandoned):
            unready = self._unapply_ready
            for d in bs._deps:
                if not d._holders:
                    unready.discard(d._index)
                d._holders += 1

    def record_failure(self, name: str, error: BaseException) -> BranchError:
        """The running attempt of `name` failed with `error`; keep it, stamped.

        The branch stays in its running state until it is retried
        (`record_apply_retry` / `record_unapply_retry`) or given up
        (`mark_as_failed` / `mark_as_unapply_failed`). Returns the record.
        """
        bs = self._check(name, "record_failure")
        if not isinstance(error, BaseException):
            raise TypeError(f"record_failure needs an exception, not {type(error).__name__}")
        if bs._attempt_failed:
            self._refuse(bs, "record_failure", "its current attempt's failure is already recorded")
        phase: Phase = "apply" if type(bs.task) in _APPLYING else "unapply"
        attempt = bs.apply_attempts if phase == "apply" else bs.unapply_attempts
        record = BranchError(name, phase, error, attempt, self._clock())
        bs._attempt_failed = True
        bs.errors = (*bs.errors, record)
        self._errors.append(record)
        return record

    def attach_handler_error(self, name: str, error: BaseException) -> BranchError:
        """The error callback raised `error` while deciding about `name`'s last failure.

        Replaces that failure's record with one carrying `handler_error`.
        """
        bs = self._get(name, "attach_handler_error")
        if not bs._attempt_failed or not bs.errors:
            self._refuse(bs, "attach_handler_error", "its current attempt has not failed")
        last = bs.errors[-1]
        record = BranchError(last.branch, last.phase, last.error, last.attempt, last.at, error)
        bs.errors = (*bs.errors[:-1], record)
        # the record is the newest of this branch: search the global list from the end
        for i in range(len(self._errors) - 1, -1, -1):
            if self._errors[i] is last:
                self._errors[i] = record
                break
        return record

    def record_apply_retry(self, name: str, task_id: Hashable) -> None:
        """A new apply attempt of `name` started as task `task_id`."""
        bs = self._check(name, "record_apply_retry")
        if not bs._attempt_failed:
            self._refuse(bs, "record_apply_retry", "its current attempt has not failed")
        if self._rolling_back:
            self._refuse(
                bs, "record_apply_retry", "the run is rolling back: no apply may be retried"
            )
        self._check_task_id(bs, "record_apply_retry", task_id)
        bs.apply_attempts += 1
        bs._attempt_failed = False
        self._move(bs, RunningApplyRetry(task_id))

    def mark_as_applied(self, name: str, value: Any) -> None:
        """The apply of `name` succeeded with `value`; dependents may become ready."""
        bs = self.branch_states.get(name) if type(name) is str else None
        if bs is None or type(bs.task) not in _APPLYING or bs._attempt_failed:
            bs = self._check(name, "mark_as_applied")
            if bs._attempt_failed:
                self._refuse(bs, "mark_as_applied", "its current attempt failed")
        # `_move(bs, DoneApplied(value))` written out, as in `mark_as_applying`.
        task = bs.task
        del self.running[task.task_id]  # type: ignore[union-attr]
        self._progress_sets[type(task)].discard(name)
        bs.task = DoneApplied(value)
        self._n_done_applied += 1
        self.progress.applied += 1
        ready = self._apply_ready
        for d in bs._dependents:
            d._waiting -= 1
            if not d._waiting and type(d.task) is NotStarted:
                ready.add(d._index)
        if not bs._holders:
            self._unapply_ready.add(bs._index)

    def mark_as_failed(self, name: str) -> None:
        """Give up on `name`'s apply (after `record_failure`); the run rolls back.

        `name` stops holding its dependencies (unless an attempt is still out).
        """
        bs = self._check(name, "mark_as_failed")
        if not bs._attempt_failed:
            self._refuse(bs, "mark_as_failed", "record its failure first")
        self._rolling_back = True
        bs._attempt_failed = False
        self._move(bs, _FAILED)

    def start_rollback(self) -> None:
        """Roll back without a branch giving up (an interruption). Idempotent."""
        self._rolling_back = True

    def unblock_dependent_unapplies(self, name: str) -> None:
        """Make sure `name` no longer keeps its dependencies from unapplying.

        Allowed once `name` holds nothing by its state: `NotStarted`, `Failed` or
        `DoneUnapplied` (`mark_as_failed` and `mark_as_unapplied` release the hold
        themselves, so this is then a check). A timed-out attempt still out keeps its
        hold until `mark_lingering_finished`.
        """
        bs = self._check(name, "unblock_dependent_unapplies")
        if bs._lingering or bs._abandoned:
            self._refuse(
                bs,
                "unblock_dependent_unapplies",
                "a timed-out attempt of it may still return a value",
            )

    # -- transitions: unapplying ----------------------------------------------------

    def mark_as_unapplying(self, name: str, task_id: Hashable) -> None:
        """The first unapply attempt of `name` started as task `task_id`."""
        bs = self._check(name, "mark_as_unapplying")
        if not self._rolling_back:
            self._refuse(bs, "mark_as_unapplying", "the run is not rolling back")
        if bs._holders:
            self._refuse(
                bs,
                "mark_as_unapplying",
                "dependents must unapply first: " + ", ".join(sorted(bs.awaiting_unapply)),
            )
        self._check_task_id(bs, "mark_as_unapplying", task_id)
        bs.unapply_attempts = 1
        bs._attempt_failed = False
        self._move(bs, RunningUnapply(task_id, bs.task.value))  # type: ignore[union-attr]

    def record_unapply_retry(self, name: str, task_id: Hashable) -> None:
        """A new unapply attempt of `name` started as task `task_id`."""
        bs = self._check(name, "record_unapply_retry")
        if not bs._attempt_failed:
            self._refuse(bs, "record_unapply_retry", "its current attempt has not failed")
        self._check_task_id(bs, "record_unapply_retry", task_id)
        bs.unapply_attempts += 1
        bs._attempt_failed = False
        self._move(bs, RunningUnapplyRetry(task_id, bs.task.value))  # type: ignore[union-attr]

    def mark_as_unapplied(self, name: str) -> None:
        """The unapply of `name` succeeded; its dependencies may become ready to unapply."""
        bs = self._check(name, "mark_as_unapplied")
        if bs._attempt_failed:
            self._refuse(bs, "mark_as_unapplied", "its current attempt failed")
        if bs._lingering and type(bs.task) is UnapplyFailed:
            self._refuse(bs, "mark_as_unapplied", "its timed-out attempt has not returned")
        self._move(bs, _DONE_UNAPPLIED)

    def mark_as_unapply_failed(self, name: str) -> None:
        """Give up on `name`'s unapply: it stays applied, and so do its dependencies."""
        bs = self._check(name, "mark_as_unapply_failed")
        if not bs._attempt_failed:
            self._refuse(bs, "mark_as_unapply_failed", "record its failure first")
        bs._attempt_failed = False
        self._move(bs, UnapplyFailed(bs.task.value))  # type: ignore[union-attr]

    # -- lingering attempts (a thread that timed out cannot be stopped) ---------------

    def mark_as_lingering(self, name: str) -> None:
        """The running attempt of `name` timed out but its thread goes on.

        Call it with the attempt's failure recorded. Until `mark_lingering_finished`,
        `name` keeps holding its dependencies (whatever its task state becomes), and
        the rollback is not done.
        """
        bs = self._check(name, "mark_as_lingering")
        if not bs._attempt_failed:
            self._refuse(bs, "mark_as_lingering", "record the timeout as its failure first")
        # each attempt has its own task value: it identifies the attempt
        if bs._lingered is bs.task:
            self._refuse(bs, "mark_as_lingering", "this attempt is already lingering")
        bs._lingered = bs.task
        bs._lingering += 1
        self._lingering_total += 1
        # its task state holds already, so no neighbour changes

    def mark_lingering_finished(
        self, name: str, *, abandoned: bool = False, error: BaseException | None = None
    ) -> None:
        """A lingering attempt of `name` returned (and, if it returned a value, that
        value was unapplied) — or, with `abandoned=True`, will not be waited for.

        An abandoned attempt keeps holding the dependencies (its effects are unknown,
        so they must stay applied) but no longer keeps the rollback from ending.
        `error`, if given, is recorded as an "unapply" failure of `name`: undoing the
        late value failed (pass `abandoned=True` with it: the value stays applied).
        """
        bs = self._get(name, "mark_lingering_finished")
        if not bs._lingering:
            self._refuse(bs, "mark_lingering_finished", "it has no lingering attempt")
        if error is not None:
            record = BranchError(name, "unapply", error, bs.unapply_attempts + 1, self._clock())
            bs.errors = (*bs.errors, record)
            self._errors.append(record)
        self._lingering_total -= 1
        bs._lingering -= 1
        if abandoned:
            bs._abandoned += 1
        elif not _holds(bs, bs.task):
            self._release_dependencies(bs)

    # -- low level --------------------------------------------------------------------

    def set_branch_task(self, name: str, task: TaskState) -> None:
        """Low level: put `name` in task state `task`, keeping the bookkeeping.

        The running map, progress and readiness follow, but no rule is checked
        beyond task-id uniqueness: the caller keeps the run consistent (for example
        when restoring a recorded run). Prefer the `mark_as_*` methods.
        """
        bs = self._get(name, "set_branch_task")
        if not isinstance(task, TASK_STATES):
            raise TypeError(f"set_branch_task needs a task state value, not {task!r}")
        if type(task) in _RUNNING:
            self._check_task_id(bs, "set_branch_task", task.task_id)  # type: ignore[union-attr]
        bs._attempt_failed = False
        if type(task) in _APPLYING and not bs.apply_attempts:
            bs.apply_attempts = 1
        if type(task) in _UNAPPLYING and not bs.unapply_attempts:
            bs.unapply_attempts = 1
        self._move(bs, task)

    # -- internals --------------------------------------------------------------------

    def _get(self, name: str, action: str) -> BranchState:
        try:
            return self.branch_states[name]
        except (KeyError, TypeError):
            label = name if isinstance(name, str) else repr(name)
            raise RuntimeStateError(label, action, "unknown", "no branch has this name") from None

    def _check(self, name: str, action: str) -> BranchState:
        bs = self._get(name, action)
        if type(bs.task) not in _ALLOWED[action]:
            allowed = ", ".join(sorted(t.__name__ for t in _ALLOWED[action]))
            self._refuse(bs, action, f"only allowed from {allowed}")
        return bs

    def _check_task_id(self, bs: BranchState, action: str, task_id: Hashable) -> None:
        try:
            owner = self.running.get(task_id)
        except TypeError:
            raise RuntimeStateError(
                bs.branch.name, action, _describe(bs.task), f"task id {task_id!r} is not hashable"
            ) from None
        if owner is not None and owner != bs.branch.name:
            self._refuse(bs, action, f"task id {task_id!r} is already running branch {owner!r}")

    @staticmethod
    def _refuse(bs: BranchState, action: str, reason: str) -> Any:
        raise RuntimeStateError(bs.branch.name, action, _describe(bs.task), reason)

    def _move(self, bs: BranchState, new: TaskState) -> None:
        """Put `bs` in task state `new`: the one place bookkeeping follows a change.

        What changes is looked up once per (old, new) pair in `_EFFECTS`.
        """
        old = bs.task
        ot = type(old)
        nt = type(new)
        running, applied, holds, done_applied, unapplied = _EFFECTS[ot, nt]
        name = bs.branch.name
        if running:
            if ot in _RUNNING:
                del self.running[old.task_id]  # type: ignore[union-attr]
                self._progress_sets[ot].discard(name)
            if nt in _RUNNING:
                self.running[new.task_id] = name  # type: ignore[union-attr]
                self._progress_sets[nt].add(name)
        bs.task = new
        if done_applied:
            self._n_done_applied += done_applied
        if unapplied:
            self.progress.unapplied += unapplied
        if applied > 0:
            self.progress.applied += 1
            ready = self._apply_ready
            for d in bs._dependents:
                d._waiting -= 1
                if not d._waiting and type(d.task) is NotStarted:
                    ready.add(d._index)
        elif applied < 0:
            self.progress.applied -= 1
            for d in bs._dependents:
                d._waiting += 1
                self._apply_ready.discard(d._index)
        # lingering attempts hold whatever the task state, so then nothing changes
        if holds and not (bs._lingering or bs._abandoned):
            if holds > 0:
                unready = self._unapply_ready
                for d in bs._deps:
                    if not d._holders:
                        unready.discard(d._index)
                    d._holders += 1
            else:
                self._release_dependencies(bs)

        # this branch's own readiness
        if nt is NotStarted:
            if not bs._waiting:
                self._apply_ready.add(bs._index)
        elif ot is NotStarted:
            self._apply_ready.discard(bs._index)
        if nt is DoneApplied:
            if not bs._holders:
                self._unapply_ready.add(bs._index)
        elif ot is DoneApplied:
            self._unapply_ready.discard(bs._index)

    def _release_dependencies(self, bs: BranchState) -> None:
        for d in bs._deps:
            d._holders -= 1
            if not d._holders and type(d.task) is DoneApplied:
                self._unapply_ready.add(d._index)

    def __repr__(self) -> str:
        p = self.progress
        phase = "rolling back" if self._rolling_back else "applying"
        return (
            f"<RuntimeState {phase}: {p.applied}/{p.total} applied, {p.unapplied} unapplied, "
            f"{len(self.running)} running>"
        )
