"""Callbacks for process pools: module-level, so they pickle.

Worker processes import this module by name (tests/journal is on their sys.path,
see conftest.py). `config` is the path of a file each unapply appends to.
"""

from __future__ import annotations

import json
import os
from typing import Any

import kira


def _info() -> list[Any]:
    info = kira.current_attempt()
    assert info is not None
    return [info.run_id, info.branch, info.phase, info.attempt, info.key, os.getpid()]


def attempt_info(config: Any, deps: Any) -> list[Any]:
    """Return what `current_attempt()` says in the worker (and the worker's pid)."""
    return _info()


def fail_first_attempt(config: Any, deps: Any) -> list[Any]:
    """Fail attempt 1; return `current_attempt()` (and the pid) from attempt 2 on."""
    info = _info()
    if info[3] == 1:
        raise ValueError(f"attempt 1 fails in process {os.getpid()}")
    return info


def record_unapply(config: Any, deps: Any, value: Any) -> None:
    """Append `current_attempt()` (and the pid) of this unapply to the file `config`."""
    with open(config, "a", encoding="utf-8") as f:
        f.write(json.dumps(_info()) + "\n")


def fail(config: Any, deps: Any) -> None:
    raise LookupError("fails on purpose")
