"""Helpers shared by the runner tests (imported by name: tests/runners is on sys.path)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

RUN_TIMEOUT = 30.0
"""Seconds a run may take before the test fails instead of hanging."""

WAIT = 5.0
"""Seconds a callback waits for an event the test arranged before giving up."""


def call_in_thread(fn: Callable[[], Any], timeout: float = RUN_TIMEOUT) -> Any:
    """Call `fn()` on a helper thread; return its result or raise its exception.

    Fails the test (instead of hanging) when `fn` has not returned after `timeout`.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="kira-run-under-test", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the run did not finish within {timeout} s (hung?)")
    if "error" in box:
        raise box["error"]
    return box["result"]


class Log:
    """A thread-safe, append-only list of records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Any] = []

    def add(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)

    @property
    def items(self) -> list[Any]:
        with self._lock:
            return list(self._items)

    def of(self, kind: str) -> list[Any]:
        """The second element of every `(kind, x)` record, in order."""
        return [item[1] for item in self.items if item[0] == kind]


def wait(event: threading.Event, timeout: float = WAIT) -> None:
    """Block until `event` is set (raise AssertionError after `timeout`)."""
    if not event.wait(timeout):
        raise AssertionError(f"event not set within {timeout} s")


async def await_event(event: threading.Event, timeout: float = WAIT) -> None:
    """Like `wait`, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not event.is_set():
        if time.monotonic() > deadline:
            raise AssertionError(f"event not set within {timeout} s")
        await asyncio.sleep(0.002)


def flavoured(flavour: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` itself ("sync"), or an `async def` calling it ("async").

    `fn` must not block: an async callback runs on an event loop.
    """
    if flavour == "sync":
        return fn

    async def async_fn(*args: Any) -> Any:
        await asyncio.sleep(0)
        return fn(*args)

    return async_fn


def blocking(flavour: str, event: threading.Event, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A callback that waits for `event` (without blocking a loop), then calls `fn`."""
    if flavour == "sync":

        def sync_fn(*args: Any) -> Any:
            wait(event)
            return fn(*args)

        return sync_fn

    async def async_fn(*args: Any) -> Any:
        await await_event(event)
        return fn(*args)

    return async_fn


class PollBarrier:
    """A cyclic barrier that can be waited on from threads and from coroutines.

    threading.Barrier would block an event loop; this one polls.
    """

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self._lock = threading.Lock()
        self._arrived = 0

    def _arrive(self) -> int:
        with self._lock:
            generation = self._arrived // self.parties
            self._arrived += 1
            return generation

    def _passed(self, generation: int) -> bool:
        with self._lock:
            return self._arrived >= (generation + 1) * self.parties

    def wait(self, timeout: float = WAIT) -> None:
        generation = self._arrive()
        deadline = time.monotonic() + timeout
        while not self._passed(generation):
            if time.monotonic() > deadline:
                raise AssertionError("barrier not passed in time")
            time.sleep(0.001)

    async def await_(self, timeout: float = WAIT) -> None:
        generation = self._arrive()
        deadline = time.monotonic() + timeout
        while not self._passed(generation):
            if time.monotonic() > deadline:
                raise AssertionError("barrier not passed in time")
            await asyncio.sleep(0.001)


class Fail(Exception):
    """The failure the tests' callbacks raise."""
