"""Callbacks for process pools and Dask workers: module-level, so they pickle.

Worker processes import this module by name (tests/runners is on their sys.path).
`config` is a path to a records file (or None): one line per call, appended.
"""

from __future__ import annotations

import os
from typing import Any


def _record(path: Any, line: str) -> None:
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def constant(name: str, value: Any, config: Any, deps: Any) -> Any:
    _record(config, f"apply {name}")
    return value


def total(name: str, config: Any, deps: Any) -> Any:
    _record(config, f"apply {name}")
    return sum(deps.values())


def pid(config: Any, deps: Any) -> int:
    return os.getpid()


def fail(name: str, config: Any, deps: Any) -> Any:
    _record(config, f"apply {name}")
    raise LookupError(f"{name} failed in process {os.getpid()}")


def unapply(name: str, config: Any, deps: Any, value: Any) -> None:
    _record(config, f"unapply {name} {value}")


def die(config: Any, deps: Any) -> Any:
    os._exit(17)  # the worker process dies mid-apply


def try_to_mutate(config: Any, deps: Any) -> str:
    try:
        deps["x"] = 1
    except TypeError:
        return "refused"
    return "mutated"
