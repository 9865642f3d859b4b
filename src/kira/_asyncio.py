"""`run_tasks_async`: the runner on asyncio.

Runs in the caller's event loop. `async def` callbacks run as tasks; plain
callbacks run in threads (an executor). Completions are reported from done
callbacks, in the loop's thread, so the driver is only ever touched by the loop.
Cancelling the run rolls back first (async attempts are cancelled, thread attempts
waited for), then re-raises `CancelledError`; a second cancellation during the
rollback stops waiting at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, Executor, Future, ThreadPoolExecutor
from functools import partial
from typing import Any

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
from ._threads import _Workers


class AsyncEngine(Engine):
    """The engine of `run_tasks_async`."""

    def __init__(
        self,
        driver: Driver,
        *,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        timeout: float | None,
        grace_period: float,
        journal: Journal | None = None,
    ) -> None:
        foreign = executor is not None and not isinstance(executor, ThreadPoolExecutor)
        self._loop = loop  # before the base class reads the clock
        super().__init__(
            driver,
            timeout=timeout,
            grace_period=grace_period,
            portable_deps=foreign,
            journal=journal,
        )
        # kira's own daemon threads: an abandoned attempt cannot hold up the exit
        self._workers = _Workers(self._post_from_worker)
        self._executor = executor
        self._foreign = foreign
        self._done: asyncio.Future[Outcome] = loop.create_future()
        self._pump_scheduled = False

    def _launch(self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._start_in(attempt, fn, args, local=False)

    def _launch_local(
        self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self._start_in(attempt, fn, args, local=True)

    def _start_in(
        self, attempt: Attempt, fn: Callable[..., Any], args: tuple[Any, ...], *, local: bool
    ) -> None:
        loop = self._loop
        executor = self._executor
        try:
            if self._is_async(fn):
                attempt.handle = loop.create_task(self._run_coroutine(attempt, fn(*args)))
                return
            if executor is None or (local and self._foreign) or self.run_here(attempt):
                attempt.handle = self._workers
                self._workers.submit(attempt, fn, args)
                return
            try:
                future = executor.submit(call_with_attempt, attempt.info, fn, *args)
            except (BrokenExecutor, RuntimeError) as exc:  # broken, or shut down
                self.executor_failed(exc)
                if not self.run_here(attempt):
                    raise
                attempt.handle = self._workers
                self._workers.submit(attempt, fn, args)
                return
        except (KeyboardInterrupt, SystemExit):
            # a signal that landed in kira's own code (asyncio.run raises Ctrl-C
            # wherever the loop is): not the callback's failure
            raise
        except BaseException as exc:  # a broken executor, a callback that cannot start
            loop.call_soon(self._complete, attempt, False, exc)
            return
        # A thread cannot be cancelled once it runs: keep the concurrent future, so
        # that its result, however late, is reported (and compensated if need be).
        attempt.handle = future
        future.add_done_callback(partial(self._thread_done, attempt))

    def _from_worker(self, message: tuple[Attempt, bool, Any]) -> None:
        # in the loop thread, for a job of kira's own workers
        attempt, ok, payload = message
        self._workers.outstanding -= 1
        self._complete(attempt, ok, payload)

    def _post_from_worker(self, message: tuple[Attempt, bool, Any]) -> None:
        # in a worker thread
        with contextlib.suppress(RuntimeError):  # a closed loop: the run is long over
            self._loop.call_soon_threadsafe(self._from_worker, message)

    async def _run_coroutine(self, attempt: Attempt, coroutine: Any) -> None:
        _current.set(attempt.info)  # this task's own context
        try:
            value = await coroutine
        except BaseException as exc:  # a cancelled attempt fails like any other
            self._complete(attempt, False, exc)
        else:
            self._complete(attempt, True, value)

    def _thread_done(self, attempt: Attempt, future: Future[Any]) -> None:
        # in the worker thread: hand the outcome to the loop
        if future.cancelled():
            outcome: tuple[bool, Any] = (False, asyncio.CancelledError())
        elif (exc := future.exception()) is not None:
            outcome = (False, exc)
        else:
            outcome = (True, future.result())
        with contextlib.suppress(RuntimeError):  # a closed loop: the run is long over
            self._loop.call_soon_threadsafe(self._complete, attempt, *outcome)

    def _complete(self, attempt: Attempt, ok: bool, payload: Any) -> None:
        try:
            self.completed(attempt, ok, payload)
        except BaseException as exc:  # a bug: fail the run loudly rather than hang
            self._fail(exc)
            return
        if not self._pump_scheduled:
            # everything that completes in this turn of the loop is pumped (and
            # journaled) together
            self._pump_scheduled = True
            self._loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        try:
            self.pump()
        except BaseException as exc:
            self._fail(exc)

    def _cancel(self, attempt: Attempt) -> None:
        attempt.cancel_requested = True  # a job of our own workers not yet started is skipped
        handle = attempt.handle
        if isinstance(handle, asyncio.Task | Future):
            handle.cancel()  # a task stops; a thread job is dropped only if not started

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the run is long over
            self._loop.call_soon_threadsafe(self._call_safely, fn, args)

    def _call_safely(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # a journal that failed: the run stops there
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """End the run with `exc`, raised by its awaiting task."""
        self.stop()
        if not self._done.done():
            self._done.set_exception(exc)

    def _call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, fn, *args)

    def _now(self) -> float:
        return self._loop.time()

    def _finished(self, outcome: Outcome) -> None:
        super()._finished(outcome)
        if not self._done.done():
            self._done.set_result(outcome)

    async def run(self) -> Outcome:
        self.begin()
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.interrupt()
            try:
                outcome = await asyncio.shield(self._done)
            except asyncio.CancelledError as again:
                self.stop()
                again.add_note(
                    "cancelled again during the rollback; left applied: "
                    + (", ".join(self.left_applied()) or "nothing")
                )
                raise
            error = outcome.error()
            cancelled = asyncio.CancelledError("cancelled; rolled back")
            raise cancelled from error

    def close(self) -> None:
        self.stop()
        self.close_writer()
        self._workers.close()


async def run_tasks_async(
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
    """Run `branches` on the running event loop; return every result, or roll back.

    Arguments, results and errors are those of `kira.run_tasks`, except that
    `max_workers` defaults to no limit (each plain callback running takes a thread
    of kira's pool, which grows to as many as run at once: give `max_workers` to
    bound them), and that cancelling
    the awaiting task rolls back, then raises `asyncio.CancelledError` (whose
    `__cause__` is the rollback's outcome). A timed-out `async def` attempt is
    cancelled.

    With a `journal`, the run is recorded as by `run_tasks`: the group commits
    run in a thread of their own, never blocking the loop for a disk flush. A run
    recorded here is carried on by `kira.resume` like any other.
    """
    run_id = run_id_or_new(run_id)
    timeout = finite_or_none(timeout, "timeout")
    state = RuntimeState.create(config, branches, timeout)
    if journal is None:
        return await _drive(
            state, run_id, None, max_workers, executor, timeout, on_event, grace_period
        )
    recorder, owned = open_journal(journal)
    try:
        recorder.begin_run(run_id, [bs.branch for bs in state.branch_states.values()])
        try:
            return await _drive(
                state, run_id, recorder, max_workers, executor, timeout, on_event, grace_period
            )
        finally:
            recorder.release(run_id)
    finally:
        if owned:
            recorder.close()


async def _drive(
    state: RuntimeState,
    run_id: str,
    journal: Journal | None,
    max_workers: int | None,
    executor: Executor | None,
    timeout: float | None,
    on_event: EventHandler | None,
    grace_period: float,
) -> dict[str, Any]:
    driver = Driver(state, run_id=run_id, limit=max_workers, on_event=on_event, journal=journal)
    engine = AsyncEngine(
        driver,
        loop=asyncio.get_running_loop(),
        executor=executor,
        timeout=timeout,
        grace_period=grace_period,
        journal=journal,
    )
    try:
        outcome = await engine.run()
        return outcome.result()
    finally:
        engine.close()
