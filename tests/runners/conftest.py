"""The runner tests: every behavioural test runs on every runner through `run`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

import kira

# Worker processes (process pools, Dask) import the callbacks of
# `_proc_callbacks` by name: keep this directory importable whatever the
# pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _runners_support import RUN_TIMEOUT, call_in_thread  # noqa: E402

RUNNERS = ["threads", "asyncio"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "run_timeout(seconds): fail a run of the `run` fixture after this long "
        f"(default {RUN_TIMEOUT:g} s)",
    )


class Runner:
    """Calls like `kira.run_tasks`, on one runner, on a helper thread with a timeout."""

    def __init__(self, kind: str, timeout: float = RUN_TIMEOUT) -> None:
        self.kind = kind
        self.timeout = timeout

    def __call__(
        self, config: Any, branches: Any, timeout: float | None = None, **options: Any
    ) -> dict[str, Any]:
        if self.kind == "threads":

            def go() -> dict[str, Any]:
                return kira.run_tasks(config, branches, timeout, **options)

        else:

            def go() -> dict[str, Any]:
                return asyncio.run(kira.run_tasks_async(config, branches, timeout, **options))

        return call_in_thread(go, self.timeout)

    def __repr__(self) -> str:
        return f"Runner({self.kind!r})"


@pytest.fixture(params=RUNNERS)
def run(request: pytest.FixtureRequest) -> Runner:
    """`run(config, branches, timeout=None, **options)` on each runner in turn.

    A run that does not finish within RUN_TIMEOUT seconds (or the test's
    `run_timeout` mark) fails the test instead of hanging it.
    """
    marker = request.node.get_closest_marker("run_timeout")
    return Runner(request.param, marker.args[0] if marker else RUN_TIMEOUT)


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Whether the test's callbacks are plain functions or `async def`."""
    return request.param
