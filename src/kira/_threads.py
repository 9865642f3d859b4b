"""`run_tasks`: the runner on threads (or any concurrent.futures executor).

The calling thread owns the driver. Callbacks run on an executor (a thread pool
of our own by default); `async def` callbacks run on an event loop in a thread of
the runner's own. Completions arrive on a queue; timers are a heap the calling
thread serves while it waits, so a retry waiting for its delay blocks nobody.

Ctrl-C: while a run is in the main thread, SIGINT is caught by a handler that
only asks the loop to roll back at its next step, so the state is never left
half-changed. A second Ctrl-C stops waiting and raises at once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from functools import partial
from types import FrameType
from typing import Any, NamedTuple

from ._branch import Branch
from ._driver import Driver, Outcome
from ._engine import (
    DEFAULT_GRACE_PERIOD,
    Attempt,
    Engine,
    _current,
    call_with_attempt,
    finite_or_none,
    run_id_or_new,
)
from ._events import EventHandler
from ._journal import Journal, open_journal
from ._state import RuntimeState

log = logging.getLogger("kira")

_INTERRUPT = object()  # queue message: SIGINT arrived
_WAKE = object()  # queue message: look at the timers and the outcome again


class _Call(NamedTuple):
    """Queue message: call `fn(*args)` in the scheduling thread."""

    fn: Callable[..., None]
    args: tuple[Any, ...]


class _Timer:
    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _LoopThread:
    """An event loop in a daemon thread, for `async def` callbacks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kira-loop", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class _Workers:
    """kira's own thread pool: one job queue, daemon threads, no futures.

    Cheaper per job than `ThreadPoolExecutor` (no Future, no condition variable
    per job), which matters when branches are short. Threads are added whenever
    more jobs are outstanding than threads exist, so a timed-out attempt that
    never returns costs one thread, never the run's progress. Daemon threads: an
    abandoned attempt cannot keep the interpreter from exiting.
    """

    def __init__(self, post: Callable[[Any], None]) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._post = post
        self._threads: list[threading.Thread] = []
        self.outstanding = 0  # jobs submitted and not yet reported; calling thread only

    def submit(self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.outstanding += 1
        if self.outstanding > len(self._threads):
            thread = threading.Thread(
                target=_work,
                args=(self._jobs, self._post),
                name=f"kira-{len(self._threads)}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        self._jobs.put((attempt, fn, args))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def _work(jobs: queue.SimpleQueue[Any], post: Callable[[Any], None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        attempt, fn, args = job
        if attempt.cancel_requested:
            post((attempt, False, asyncio.CancelledError()))
            continue
        try:
            result = call_with_attempt(attempt.info, fn, *args)
        except BaseException as exc:  # SystemExit too: it fails the attempt, not the pool
            post((attempt, False, exc))
        else:
            post((attempt, True, result))
        del job, attempt, fn, args


class ThreadEngine(Engine):
    """The engine of `run_tasks`."""

    def __init__(
        self,
        driver: Driver,
        *,
        executor: Executor | None,
        timeout: float | None,
        grace_period: float,
        journal: Journal | None = None,
    ) -> None:
        foreign = executor is not None and not isinstance(executor, ThreadPoolExecutor)
        super().__init__(
            driver,
            timeout=timeout,
            grace_period=grace_period,
            portable_deps=foreign,
            journal=journal,
        )
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        # Whoever holds the lock schedules: the thread running the run, or a worker
        # reporting its own attempt (see `_report`). Everything else reaches the
        # scheduling through the queue.
        self.lock = self._lock = threading.RLock()
        self._ident: int | None = None  # the thread running the run
        self._workers = _Workers(self._report)
        self._executor = executor
        self._loop_thread: _LoopThread | None = None
        self._to_loop: deque[tuple[Attempt, Any]] = deque()
        self._loop_wake_pending = False
        self.interrupts = 0

    # -- Engine hooks -----------------------------------------------------------------

    def _launch(self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._is_async(fn):
            self._launch_coroutine(attempt, fn, args)
        elif self._executor is None or self.run_here(attempt):
            attempt.handle = self._workers
            self._workers.submit(attempt, fn, args)
        else:
            try:
                future = self._executor.submit(call_with_attempt, attempt.info, fn, *args)
            except (BrokenExecutor, RuntimeError) as exc:  # broken, or shut down
                self.executor_failed(exc)
                if self.run_here(attempt):
                    attempt.handle = self._workers
                    self._workers.submit(attempt, fn, args)
                else:
                    self._queue.put((attempt, False, exc))
                return
            except BaseException as exc:  # cannot be sent (pickling): a failed attempt
                self._queue.put((attempt, False, exc))
                return
            attempt.handle = future
            future.add_done_callback(partial(self._post_future, attempt))

    def _launch_local(
        self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        if self._is_async(fn):
            self._launch_coroutine(attempt, fn, args)
        else:
            attempt.handle = self._workers
            self._workers.submit(attempt, fn, args)

    def _launch_coroutine(
        self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        if self._loop_thread is None:
            self._loop_thread = _LoopThread()
        try:
            coroutine = fn(*args)
        except BaseException as exc:
            self._queue.put((attempt, False, exc))
            return
        # Hand coroutines to the loop in batches: one wake-up of the loop thread for
        # everything launched together, not one per attempt.
        self._to_loop.append((attempt, coroutine))
        if not self._loop_wake_pending:
            self._loop_wake_pending = True
            self._loop_thread.loop.call_soon_threadsafe(self._start_coroutines)

    def _start_coroutines(self) -> None:
        # in the loop thread; clear the flag first, so a coroutine queued while we
        # drain schedules another drain rather than waiting for nobody
        self._loop_wake_pending = False
        loop = asyncio.get_running_loop()
        pending = self._to_loop
        while pending:
            attempt, coroutine = pending.popleft()
            attempt.handle = loop.create_task(self._drive(attempt, coroutine))

    async def _drive(self, attempt: Attempt, coroutine: Any) -> None:
        """Run one coroutine attempt in the loop thread and report its end itself,
        once it has really ended (a cancelled coroutine may still clean up)."""
        _current.set(attempt.info)
        try:
            if attempt.cancel_requested:
                coroutine.close()
                raise asyncio.CancelledError
            value = await coroutine
        except BaseException as exc:  # SystemExit too: it must not stop the loop thread
            self._queue.put((attempt, False, exc))
        else:
            self._queue.put((attempt, True, value))

    def _post_future(self, attempt: Attempt, future: Future[Any]) -> None:
        if future.cancelled():
            self._queue.put((attempt, False, asyncio.CancelledError()))
            return
        exc = future.exception()
        if exc is None:
            self._queue.put((attempt, True, future.result()))
        else:
            self._queue.put((attempt, False, exc))

    def _cancel(self, attempt: Attempt) -> None:
        attempt.cancel_requested = True  # a job not yet started is skipped
        handle = attempt.handle
        if isinstance(handle, asyncio.Task) and self._loop_thread is not None:
            self._loop_thread.loop.call_soon_threadsafe(handle.cancel)
        elif isinstance(handle, Future):
            handle.cancel()  # only if not started; a cancelled future still reports

    def _call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> _Timer:
        timer = _Timer(fn, args)
        heapq.heappush(self._timers, (self._now() + delay, next(self._seq), timer))
        if threading.get_ident() != self._ident:
            self._queue.put(_WAKE)  # the run's thread may wait past this timer
        return timer

    def _finished(self, outcome: Outcome) -> None:
        super()._finished(outcome)
        if threading.get_ident() != self._ident:
            self._queue.put(_WAKE)

    def _report(self, message: tuple[Attempt, bool, Any]) -> None:
        """A worker's attempt ended (in that worker's thread)."""
        self._deliver(self._reported, message)

    def _reported(self, message: tuple[Attempt, bool, Any]) -> None:
        self._handle(message)
        self.pump()

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        """From any thread: call `fn(*args)` to schedule, here and now if nobody
        is scheduling and nothing waits in the queue, else in the run's thread.

        So a worker that finishes an attempt reports it and starts what may
        start, and the job it submits is usually the next one it takes, with no
        thread woken on the way; the journal's writer likewise releases what
        waited for its commit and starts the next one.
        """
        # (not past messages still queued: they are handled first, in order)
        if (
            self.outcome is None
            and not self.stopped
            and self._queue.empty()
            and self._lock.acquire(blocking=False)
        ):
            try:
                if self.outcome is None and not self.stopped:
                    fn(*args)
                    return
            except BaseException as exc:  # an error of the run: raised in its thread
                self.stop()
                self._queue.put(_Call(_reraise, (exc,)))
                return
            finally:
                self._lock.release()
        self._queue.put(_Call(fn, args))

    # -- the loop ---------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> Outcome:
        self._ident = threading.get_ident()
        lock = self._lock
        if not self._started:
            self._started = True
            with lock:
                self.begin(resume=resume)
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        timers = self._timers
        while self.outcome is None:
            timeout = None
            if timers:
                # capped: a wait past threading.TIMEOUT_MAX raises OverflowError; a
                # timer that far away is simply looked at again
                timeout = min(max(0.0, timers[0][0] - self._now()), 3600.0)
            try:
                message = get(timeout=timeout)
            except queue.Empty:
                message = None
            with lock:
                while message is not None:
                    self._handle(message)
                    try:
                        message = get_nowait()
                    except queue.Empty:
                        message = None
                if timers:
                    self._fire_due_timers()
                if self.outcome is None:
                    self.pump()
        return self.outcome

    _started = False

    def _handle(self, message: Any) -> None:
        if type(message) is _Call:
            message.fn(*message.args)
            return
        if message is _WAKE:
            return
        if message is _INTERRUPT:
            self.interrupts += 1
            if self.interrupts == 1:
                self.interrupt()
                return
            self.stop()
            raise KeyboardInterrupt(
                "interrupted again during the rollback; left applied: "
                + (", ".join(self.left_applied()) or "nothing")
            )
        attempt, ok, payload = message
        if attempt.handle is self._workers:
            self._workers.outstanding -= 1
        self.completed(attempt, ok, payload)

    def _fire_due_timers(self) -> None:
        timers = self._timers
        now = self._now()
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.fn(*timer.args)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put(_Call(fn, args))

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._queue.put(_INTERRUPT)

    def close(self) -> None:
        with self._lock:  # no worker is scheduling as it stops
            self.stop()
        self.close_writer()
        self._workers.close()
        if self._loop_thread is not None:
            self._loop_thread.close()


def _reraise(error: BaseException) -> None:
    raise error


def default_workers() -> int:
    """ThreadPoolExecutor's own default: enough for I/O-bound callbacks."""
    return min(32, (os.cpu_count() or 1) + 4)


def run_tasks(
    config: Any,
    branches: Iterable[Branch],
    timeout: float | None = None,
    *,
    max_workers: int | None = None,
    executor: Executor | None = None,
    journal: Journal | str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    on_event: EventHandler | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
) -> dict[str, Any]:
    """Run `branches` on threads; return every branch's result, or roll back.

    Args:
        config: passed to every callback.
        branches: the branch definitions (validated first: `GraphError`).
        timeout: the run's inactivity limit in seconds: when no attempt starts or
            finishes for that long, the attempts running fail with `BranchTimeout`
            and the run rolls back.
        max_workers: the most attempts running at once (default: like
            `ThreadPoolExecutor`, min(32, CPUs + 4)).
        executor: run apply/unapply on this `concurrent.futures.Executor` (a process
            pool, a Dask client's executor) instead of threads of kira's own.
            Error handlers still run in this process. With a non-thread executor,
            callbacks, config, deps and values must pickle.
        journal: a `kira.Journal` or the path of its SQLite file: every transition
            is recorded there before it is acted on, so `kira.resume` can carry the
            run on if this process dies.
        run_id: the run's id, carried by events, errors and the journal (default:
            random hex).
        on_event: called with every `Event` in transition order, one call at a
            time, from the thread that schedules at that moment: this one, or a
            worker of kira's that has just finished an attempt.
        grace_period: how long to wait for a timed-out attempt that cannot be
            stopped (a thread) before naming it in `RollbackIncomplete.abandoned`.
            Until then it keeps its place among the `max_workers`: with
            `max_workers=1`, a stuck attempt holds up the run for that long.

    Returns:
        A dict of every branch's result, in definition order.

    Raises:
        GraphError: the branches do not form a valid graph; nothing ran.
        RolledBack: a branch failed for good; every applied branch was unapplied.
        RollbackIncomplete: the same, but some effects remain (`.still_applied`).
        JournalError: the journal cannot be used (nothing ran), or failed mid-run
            (the run stops where the journal stopped; resume it later).
        KeyboardInterrupt: Ctrl-C; raised after the rollback (its `__cause__` is
            the rollback's outcome), or at once on a second Ctrl-C.
    """
    run_id = run_id_or_new(run_id)
    timeout = finite_or_none(timeout, "timeout")
    state = RuntimeState.create(config, branches, timeout)
    workers = max_workers if max_workers is not None else default_workers()
    if journal is None:
        driver = Driver(state, run_id=run_id, limit=workers, on_event=on_event)
        return drive_threads(driver, executor, timeout, grace_period, None).result()
    recorder, owned = open_journal(journal)
    try:
        recorder.begin_run(run_id, [bs.branch for bs in state.branch_states.values()])
        try:
            driver = Driver(
                state, run_id=run_id, limit=workers, on_event=on_event, journal=recorder
            )
            return drive_threads(driver, executor, timeout, grace_period, recorder).result()
        finally:
            recorder.release(run_id)
    finally:
        if owned:
            recorder.close()


def drive_threads(
    driver: Driver,
    executor: Executor | None,
    timeout: float | None,
    grace_period: float,
    journal: Journal | None,
    *,
    resume: bool = False,
) -> Outcome:
    """Run `driver` to its outcome on threads (Ctrl-C rolls back, then re-raises)."""
    engine = ThreadEngine(
        driver, executor=executor, timeout=timeout, grace_period=grace_period, journal=journal
    )
    previous = _install_sigint(engine)
    try:
        try:
            outcome = engine.run(resume=resume)
        except KeyboardInterrupt:
            # Raised outside our handler (the run is not in the main thread, or
            # the handler was replaced): roll back all the same, once.
            if engine.interrupts or engine.driver.interrupted:
                raise
            engine.interrupts += 1
            with engine.lock:
                engine.interrupt()
            outcome = engine.run()
            raise KeyboardInterrupt("interrupted; rolled back") from outcome.error()
        if engine.interrupts:
            raise KeyboardInterrupt("interrupted; rolled back") from outcome.error()
        return outcome
    finally:
        _restore_sigint(previous)
        engine.close()


def _install_sigint(engine: ThreadEngine) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGINT, engine.on_sigint)
    except ValueError:  # not the main interpreter
        return None


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
