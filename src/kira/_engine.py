"""What both runners share: carrying out the driver's commands.

The engine keeps the attempts in flight, their per-branch deadlines, the grace
period of timed-out attempts and the run's inactivity timer, and turns
completions into driver reports. A runner subclass supplies only how to launch a
callback (`_launch`), how to try to cancel one (`_cancel`), a timer
(`_call_later`) and a monotonic clock. Every decision stays in the driver.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor
from contextvars import ContextVar
from typing import Any, NamedTuple, Protocol

from ._driver import (
    Command,
    Compensate,
    Consult,
    Driver,
    Finish,
    Outcome,
    ScheduleRetry,
    StartApply,
    StartUnapply,
)
from ._errors import BranchTimeout, Phase
from ._journal import LEASE_SECONDS, Journal
from ._state import HOLDING

log = logging.getLogger("kira")

APPLY, UNAPPLY, CONSULT, COMPENSATE = "apply", "unapply", "consult", "compensate"

DEFAULT_GRACE_PERIOD = 10.0
"""Seconds a run waits for a timed-out attempt that cannot be cancelled."""


class AttemptInfo(NamedTuple):
    """The attempt a callback is running for (see `current_attempt`)."""

    run_id: str
    branch: str
    phase: Phase
    attempt: int

    @property
    def key(self) -> str:
        """A stable key for this attempt: the same when a resumed run makes an
        interrupted attempt again, different for a retry. Use it to make effects
        idempotent (an upsert keyed by it, a request id)."""
        return f"{self.run_id}/{self.branch}/{self.phase}/{self.attempt}"


_current: ContextVar[AttemptInfo | None] = ContextVar("kira_current_attempt", default=None)


def current_attempt() -> AttemptInfo | None:
    """The attempt the calling callback runs for, or None outside a callback.

    Works in threads, in `async def` callbacks and in processes of a process pool.
    In an error handler, it is the attempt that failed.
    """
    return _current.get()


def call_with_attempt(info: AttemptInfo | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn(*args)` with `current_attempt()` set (module level: it pickles)."""
    token = _current.set(info)
    try:
        result = fn(*args)
        if hasattr(type(result), "__await__"):
            # a plain function that returned an awaitable: await it here
            return asyncio.run(_await(result))
        return result
    finally:
        _current.reset(token)


async def _await(awaitable: Any) -> Any:
    return await awaitable


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Attempt:
    """One callback in flight: an apply, an unapply, a handler call, a compensation."""

    __slots__ = (
        "cancel_requested",
        "done",
        "handle",
        "info",
        "kind",
        "lingering",
        "name",
        "phase",
        "task_id",
        "timer",
    )

    def __init__(self, kind: str, task_id: int, name: str, phase: Phase) -> None:
        self.kind = kind
        self.task_id = task_id
        self.name = name
        self.phase = phase
        self.done = False
        self.lingering = False
        self.cancel_requested = False
        self.info: AttemptInfo | None = None
        self.handle: Any = None
        self.timer: TimerHandle | None = None


class FrozenDeps(dict[str, Any]):
    """A read-only dict of dependency results that pickles (for process pools)."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("deps is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDeps, (dict(self),))


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling `fn` gives a coroutine to await (async def, or a callable
    object whose __call__ is async def)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


class Engine:
    """Base of both runners; see the module docstring."""

    def __init__(
        self,
        driver: Driver,
        *,
        timeout: float | None,
        grace_period: float,
        portable_deps: bool = False,
        journal: Journal | None = None,
    ) -> None:
        if not (isinstance(grace_period, int | float) and grace_period >= 0):
            raise ValueError(f"grace_period must be a number of seconds >= 0, not {grace_period!r}")
        self.driver = driver
        self.state = driver.state
        self.config = driver.state.config
        self.attempts: dict[int, Attempt] = {}  # applies and unapplies in flight
        self.timeout = timeout
        self.grace_period = grace_period
        self.portable_deps = portable_deps
        self.outcome: Outcome | None = None
        self.last_activity = self._now()
        self._inactivity_timer: TimerHandle | None = None
        self.journal = journal
        self.run_id = driver.run_id
        self._async_cache: dict[Any, bool] = {}
        self.consults: dict[int, Attempt] = {}  # error handlers deciding
        # The caller's executor broke (a dead worker process): unapplies then run
        # in this process, because a rollback must not depend on a broken pool.
        self.executor_broken = False
        # Group commits run in a writer thread while the run goes on; commands
        # whose events are in the commit in flight wait for it (`_after_commit`),
        # those whose events are still buffered wait for the next one.
        self._writer: _Writer | None = None
        self._commit_busy = False
        # a commit failed: not even what is left is committed as the run closes,
        # so the journal never has a gap
        self._journal_broken = False
        # The run ended abruptly (a second interrupt, an error): its runner has
        # raised, so nothing more is scheduled or committed, whatever still arrives.
        self.stopped = False
        self._after_commit: list[Command] = []
        self._next_commit: list[Command] = []

    # -- supplied by the runner ---------------------------------------------------

    def _launch(self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Start `fn(*args)`; on completion call `self.completed(attempt, ok, payload)`
        in the scheduling thread."""
        raise NotImplementedError

    def _launch_local(
        self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        """Like `_launch`, but in this process (error handlers decide scheduling)."""
        self._launch(attempt, fn, args)

    def _cancel(self, attempt: Attempt) -> None:
        """Try to stop the attempt; it still reports its completion."""

    def _call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> TimerHandle:
        raise NotImplementedError

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """From any thread: call `fn(*args)` in the scheduling thread."""
        raise NotImplementedError

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        """From any thread: call `fn(*args)` where scheduling may happen (by
        default, `_post`: in the scheduling thread)."""
        self._post(fn, *args)

    def _is_async(self, fn: Callable[..., Any]) -> bool:
        """`is_async(fn)`, remembered per callback (it is asked once per attempt)."""
        try:
            return self._async_cache[fn]
        except KeyError:
            result = self._async_cache[fn] = is_async(fn)
            return result
        except TypeError:  # an unhashable callable
            return is_async(fn)

    def _finished(self, outcome: Outcome) -> None:
        """The run is over (called once, after the last command)."""
        self.outcome = outcome

    def _now(self) -> float:
        return time.monotonic()

    # -- carrying out commands ---------------------------------------------------------

    def begin(self, *, resume: bool = False) -> None:
        if resume:
            self.driver.resume()
        else:
            self.driver.start()
        if self.timeout is not None:
            self._inactivity_timer = self._call_later(self.timeout, self._check_inactivity)
        if self.journal is not None:
            self._call_later(LEASE_SECONDS / 3, self._renew_lease)
        self.pump()

    def _renew_lease(self) -> None:
        if self.journal is not None and not self.driver.finished:
            self.journal.renew(self.run_id)
            self._call_later(LEASE_SECONDS / 3, self._renew_lease)

    def pump(self) -> None:
        """Carry out every command in the driver's outbox.

        With a journal, a command is carried out only once the events behind it
        are committed: group commits, in a writer thread, of everything recorded
        meanwhile. A start whose intent the journal already holds
        (`StartApply.covered`) waits for nothing: it is launched at once, and its
        own records go with a later commit.
        """
        if self.stopped:
            return
        if self.driver.outbox:
            self._carry_out_all(self.driver.outbox)
        if self.journal is not None and not self._commit_busy:
            self._commit()

    def _commit(self) -> None:
        """Start a group commit if a command waits for one, or if the intents run
        low and enough new ones are worth a commit (so that the starts do not catch
        up with them)."""
        journal, driver = self.journal, self.driver
        assert journal is not None
        if self.stopped:
            return
        # a failure, a rollback: worth committing at once, though nothing waits for
        # it yet, so that a process dying now does not take the decision with it
        if (
            not self._next_commit
            and not journal.urgent
            and not (
                journal.dirty
                and driver.intents_low()
                and driver.reserve(enough := driver.lookahead // 8) >= enough
            )
        ):
            return
        # intents ride along, if enough are fresh to be worth looking them up
        driver.reserve(max(1, driver.lookahead // 16))
        groups = journal.take()
        names = driver.take_reserved()
        self._after_commit, self._next_commit = self._next_commit, []
        self._commit_busy = True
        if self._writer is None:
            self._writer = _Writer(journal, self._deliver)
        self._writer.submit(groups, self._committed, names)

    def _committed(self, names: list[str], error: BaseException | None) -> None:
        """The writer thread's commit ended: carry out what waited for it."""
        self._commit_busy = False
        if error is not None:
            # the run stops where the journal stopped (resume it once it works)
            self._journal_broken = self.stopped = True
            raise error
        if self.stopped:
            return
        self.driver.committed(names)
        released, self._after_commit = self._after_commit, []
        carry_out = self._carry_out
        for command in released:
            carry_out(command)
        self._commit()

    def close_writer(self) -> None:
        """Wait for the commit in flight, then stop the writer thread; commit what
        is left (a run stopped abruptly: what it had decided stays known)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        journal = self.journal
        if journal is not None and journal.dirty and not self._journal_broken:
            try:
                journal.commit(journal.take())
            except Exception as exc:  # the run is ending with its own error already
                log.warning("kira: could not commit the run's last events: %s", exc)

    def _carry_out_all(self, commands: deque[Command]) -> None:
        """`_carry_out` each of `commands` whose events are committed, or hold them
        back until they are (see `pump`); the commonest command, a start that
        waits for nothing, inline: the hot path of every run."""
        branches = self.state.branch_states
        config = self.config
        run_id = self.run_id
        attempts = self.attempts
        journal = self.journal
        start = self._start
        deps_for = self._deps
        while commands:
            command = commands.popleft()
            if type(command) is StartApply and (journal is None or command.covered):
                name = command.name
                branch = branches[name].branch
                attempt = Attempt(APPLY, command.task_id, name, "apply")
                attempt.info = AttemptInfo(run_id, name, "apply", command.attempt)
                attempts[command.task_id] = attempt
                start(attempt, branch.apply, (config, deps_for(command.deps)), branch.timeout)
            elif journal is None:
                self._carry_out(command)
            elif journal.dirty:
                self._next_commit.append(command)
            elif self._commit_busy:
                self._after_commit.append(command)
            else:
                self._carry_out(command)  # its events are committed already

    def _carry_out(self, command: Command) -> None:
        branches = self.state.branch_states
        config = self.config
        run_id = self.run_id
        if type(command) is StartApply:
            branch = branches[command.name].branch
            attempt = Attempt(APPLY, command.task_id, command.name, "apply")
            attempt.info = AttemptInfo(run_id, command.name, "apply", command.attempt)
            self.attempts[command.task_id] = attempt
            self._start(attempt, branch.apply, (config, self._deps(command.deps)), branch.timeout)
        elif type(command) is StartUnapply:
            branch = branches[command.name].branch
            attempt = Attempt(UNAPPLY, command.task_id, command.name, "unapply")
            attempt.info = AttemptInfo(run_id, command.name, "unapply", command.attempt)
            self.attempts[command.task_id] = attempt
            args = (config, self._deps(command.deps), command.value)
            self._start(attempt, branch.unapply, args, branch.timeout)  # type: ignore[arg-type]
        elif type(command) is Consult:
            handler = branches[command.name].branch.error_handler(command.phase)
            attempt = Attempt(CONSULT, command.task_id, command.name, command.phase)
            attempt.info = AttemptInfo(run_id, command.name, command.phase, command.attempt)
            self.consults[command.task_id] = attempt
            self._launch_local(
                attempt,
                handler,  # type: ignore[arg-type]
                (config, command.deps, command.error, command.attempt),
            )
        elif type(command) is ScheduleRetry:
            self._call_later(command.delay, self._retry_due, command.task_id)
        elif type(command) is Compensate:
            branch = branches[command.name].branch
            attempt = Attempt(COMPENSATE, command.task_id, command.name, "unapply")
            attempt.info = AttemptInfo(run_id, command.name, "unapply", 0)
            args = (config, self._deps(command.deps), command.value)
            self._start(attempt, branch.unapply, args, branch.timeout)  # type: ignore[arg-type]
        elif type(command) is Finish:
            if self._inactivity_timer is not None:
                self._inactivity_timer.cancel()
            self._finished(command.outcome)

    def _deps(self, deps: Mapping[str, Any]) -> Mapping[str, Any]:
        return FrozenDeps(deps) if self.portable_deps else deps

    def _start(
        self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...], limit: float | None
    ) -> None:
        if self.timeout is not None:
            self.last_activity = self._now()
        if limit is not None:
            attempt.timer = self._call_later(limit, self._deadline, attempt, limit)
        self._launch(attempt, fn, args)

    # -- reports from the runner -----------------------------------------------------

    def completed(self, attempt: Attempt, ok: bool, payload: Any) -> None:
        """`attempt` returned `payload` (ok) or raised it.

        Reports to the driver only: the runner calls `pump` once it has reported
        everything that arrived together, so the journal commits them as one.
        """
        if attempt.done or self.stopped:
            return
        attempt.done = True
        if attempt.timer is not None:
            attempt.timer.cancel()
        driver = self.driver
        kind = attempt.kind
        if not ok and isinstance(payload, BrokenExecutor):
            self.executor_failed(payload)
        if kind is CONSULT:
            del self.consults[attempt.task_id]
            if ok:
                driver.decided(attempt.task_id, payload)
            else:
                driver.decided(attempt.task_id, None, payload)
        else:
            if self.timeout is not None:
                self.last_activity = self._now()
            if kind is COMPENSATE:
                driver.compensated(attempt.task_id, None if ok else payload)
            else:
                del self.attempts[attempt.task_id]
                if attempt.lingering:
                    driver.late_result(attempt.task_id, ok, payload)
                elif kind is APPLY:
                    if ok:
                        driver.applied(attempt.task_id, payload)
                    else:
                        driver.failed(attempt.task_id, payload)
                elif ok:
                    driver.unapplied(attempt.task_id)
                else:
                    driver.failed(attempt.task_id, payload)

    def executor_failed(self, error: BaseException) -> None:
        """The caller's executor is broken: from now on unapplies run here."""
        if not self.executor_broken:
            self.executor_broken = True
            log.warning(
                "kira: the executor is broken (%r); unapplies will run in this process", error
            )

    def run_here(self, attempt: Attempt) -> bool:
        """Whether `attempt` must run in this process instead of the caller's executor."""
        return self.executor_broken and attempt.phase == "unapply"

    def _retry_due(self, task_id: int) -> None:
        self.driver.retry_due(task_id)
        self.pump()

    def _deadline(self, attempt: Attempt, seconds: float) -> None:
        """A branch's own timeout expired for `attempt`."""
        if attempt.done or attempt.lingering:
            return
        attempt.lingering = True
        error = BranchTimeout(attempt.name, attempt.phase, seconds)
        if attempt.kind is COMPENSATE:
            # a compensation that hangs: its value stays applied
            attempt.done = True
            self._cancel(attempt)
            self.driver.compensated(attempt.task_id, error)
        else:
            self._cancel(attempt)
            self.driver.failed(attempt.task_id, error, lingering=True)
            self._call_later(self.grace_period, self._grace_over, attempt)
        self.pump()

    def stop(self) -> None:
        """The runner raises: from now on nothing is scheduled nor committed."""
        self.stopped = True

    def _grace_over(self, attempt: Attempt) -> None:
        if attempt.done:
            return
        attempt.done = True  # a result arriving later is ignored
        self.attempts.pop(attempt.task_id, None)
        self.driver.abandon(attempt.task_id)
        self.pump()

    def _check_inactivity(self) -> None:
        assert self.timeout is not None
        if self.driver.finished:
            return
        idle = self._now() - self.last_activity
        live = [a for a in self.attempts.values() if not a.lingering and not a.done]
        deciding = [a for a in self.consults.values() if not a.done]
        if not (live or deciding) or idle < self.timeout:
            wait = self.timeout - idle if (live or deciding) else self.timeout
            self._inactivity_timer = self._call_later(max(wait, 0.001), self._check_inactivity)
            return
        errors: list[BaseException] = []
        for attempt in live:
            attempt.lingering = True
            if attempt.timer is not None:
                attempt.timer.cancel()
            errors.append(BranchTimeout(attempt.name, attempt.phase, self.timeout, inactivity=True))
            self._cancel(attempt)
            self._call_later(self.grace_period, self._grace_over, attempt)
        if live:
            self.driver.inactivity([a.task_id for a in live], errors, lingering=True)
        for attempt in deciding:
            # an error handler that does not return: give up on its branch (its
            # thread goes on, its decision will be ignored)
            attempt.done = True
            del self.consults[attempt.task_id]
            self._cancel(attempt)
            timeout = BranchTimeout(attempt.name, attempt.phase, self.timeout, inactivity=True)
            self.driver.decided(attempt.task_id, None, timeout)
        self._inactivity_timer = self._call_later(self.timeout, self._check_inactivity)
        self.pump()

    def interrupt(self) -> None:
        """Roll back now; try to cancel what runs (async attempts stop, threads not)."""
        self.driver.interrupt()
        for attempt in list(self.attempts.values()):
            if not attempt.done and not attempt.lingering:
                self._cancel(attempt)
        self.pump()

    def left_applied(self) -> list[str]:
        """Branches whose effects stand right now (for an abrupt stop)."""
        return [
            name
            for name, bs in self.state.branch_states.items()
            if type(bs.task) in HOLDING or bs.lingering
        ]


class _Writer:
    """A thread that commits the journal's event groups, one commit at a time, and posts
    `done(names, error)` back to the scheduling thread."""

    def __init__(self, journal: Journal, post: Callable[..., None]) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._work, args=(journal, post), name="kira-journal", daemon=True
        )
        self._thread.start()

    def submit(self, groups: Any, done: Callable[..., None], names: list[str]) -> None:
        self._jobs.put((groups, done, names))

    def _work(self, journal: Journal, post: Callable[..., None]) -> None:
        get = self._jobs.get
        while (job := get()) is not None:
            groups, done, names = job
            error: BaseException | None = None
            try:
                journal.commit(groups)
            except BaseException as exc:  # reported to the run, which stops
                error = exc
            post(done, names, error)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def run_id_or_new(run_id: str | None) -> str:
    """The caller's `run_id=`, checked, or a fresh one."""
    if run_id is None:
        return uuid.uuid4().hex
    if not isinstance(run_id, str) or not run_id:
        raise TypeError(f"run_id must be a non-empty str or None, not {run_id!r}")
    try:
        run_id.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"run_id must be valid text (no lone surrogates), not {run_id!r}"
        ) from None
    return run_id


def finite_or_none(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, not {value!r}")
    if math.isinf(value):
        return None
    return float(value)
