"""Shared helpers of the journal tests: the crash flow, subprocesses, ledgers.

`FLOW_SOURCE` is a flow module the tests write into `tmp_path` and run as a
script (`python flow.py JOURNAL LEDGER MODE [CALLS [RUNNER [WORKERS]]]`) or import. Its six branches
form a diamond with a tail::

    a -> b, c -> d -> e -> f

Every apply records its effect in a separate SQLite "ledger" database,
idempotently (`INSERT OR IGNORE` keyed by `kira.current_attempt().key`), and
returns the sum of its dependencies' results plus a constant. Every unapply
deletes its branch's apply effects and records an "undo" row keyed by its own
attempt. In mode "fail", f fails every attempt (no retry), so the run rolls back;
in mode "fail_b", b does. RUNNER is "threads" (`run_tasks`, the default) or
"asyncio" (`run_tasks_async`); WORKERS is `max_workers` (with 1, c waits while b
runs, so the journal records an intent for it ahead of its start).
Every callback appends a line to the "calls" file, when one is given.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from contextlib import closing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUN_ID = "crash-run"
SUBPROCESS_TIMEOUT = 60.0

# A flow module's `note(config, line)`: one line per callback call in config["calls"].
NOTE_SOURCE = """
def note(config, line):
    with open(config["calls"], "a", encoding="utf-8") as f:
        f.write(line + "\\n")
"""

FLOW_SOURCE = '''
"""A diamond-with-tail flow whose effects go to a SQLite ledger (see the tests)."""

import json
import sqlite3
import sys
from contextlib import closing

import kira

RUN_ID = "crash-run"
GRAPH = [
    ("a", ()),
    ("b", ("a",)),
    ("c", ("a",)),
    ("d", ("b", "c")),
    ("e", ("d",)),
    ("f", ("e",)),
]
CONSTANTS = {"a": 1, "b": 20, "c": 300, "d": 4000, "e": 50000, "f": 600000}


def connect(path):
    return closing(sqlite3.connect(path, timeout=30, isolation_level=None))


def init_ledger(path):
    with connect(path) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS effects"
            "(key TEXT PRIMARY KEY, branch TEXT, kind TEXT, value)"
        )


def note(config, line):
    """Append a line to the call counter file (one line per callback call)."""
    if config.get("calls"):
        with open(config["calls"], "a", encoding="utf-8") as f:
            f.write(line + "\\n")


def make_apply(name):
    def apply(config, deps):
        info = kira.current_attempt()
        note(config, f"apply {name} {info.key}")
        hook = config.get("hook")
        if hook is not None:
            hook(name, "apply", info)
        if config["mode"] == "fail" and name == "f":
            raise RuntimeError("f fails on purpose")
        if config["mode"] == "fail_b" and name == "b":
            raise RuntimeError("b fails on purpose")
        value = sum(deps.values()) + CONSTANTS[name]
        with connect(config["ledger"]) as db:
            db.execute(
                "INSERT OR IGNORE INTO effects VALUES (?, ?, 'apply', ?)",
                (info.key, name, value),
            )
        return value

    return apply


def make_unapply(name):
    def unapply(config, deps, value):
        info = kira.current_attempt()
        note(config, f"unapply {name} {info.key}")
        hook = config.get("hook")
        if hook is not None:
            hook(name, "unapply", info)
        with connect(config["ledger"]) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM effects WHERE branch=? AND kind='apply'", (name,))
            db.execute(
                "INSERT OR IGNORE INTO effects VALUES (?, ?, 'undo', ?)",
                (info.key, name, value),
            )
            db.execute("COMMIT")

    return unapply


def branches():
    return [
        kira.Branch(name, make_apply(name), deps, unapply=make_unapply(name))
        for name, deps in GRAPH
    ]


def make_config(ledger, mode, calls=None, hook=None):
    return {"ledger": str(ledger), "mode": mode, "calls": calls, "hook": hook}


def main(argv):
    journal, ledger, mode = argv[1:4]
    calls = argv[4] if len(argv) > 4 and argv[4] else None
    runner = argv[5] if len(argv) > 5 else "threads"
    workers = int(argv[6]) if len(argv) > 6 else None
    init_ledger(ledger)
    config = make_config(ledger, mode, calls)
    try:
        if runner == "asyncio":
            import asyncio

            results = asyncio.run(
                kira.run_tasks_async(
                    config, branches(), journal=journal, run_id=RUN_ID, max_workers=workers
                )
            )
        else:
            results = kira.run_tasks(
                config, branches(), journal=journal, run_id=RUN_ID, max_workers=workers
            )
    except kira.RolledBack as exc:
        print(json.dumps({"rolled_back": list(exc.unapplied)}))
    else:
        print(json.dumps({"results": results}))


if __name__ == "__main__":
    main(sys.argv)
'''


def write_flow(folder: Path) -> Path:
    """Write the flow module into `folder`; return its path."""
    path = folder / "flow.py"
    path.write_text(FLOW_SOURCE, encoding="utf-8")
    return path


def import_flow(path: Path) -> ModuleType:
    """Import the flow module at `path` (under a unique module name)."""
    name = f"kira_test_flow_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(crash_at: int | None = None) -> dict[str, str]:
    """The environment of a flow subprocess: kira importable, the crash hook set."""
    env = dict(os.environ)
    env.pop("KIRA_TEST_CRASH_AT", None)
    if crash_at is not None:
        env["KIRA_TEST_CRASH_AT"] = str(crash_at)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def run_flow(
    flow: Path,
    journal: Path,
    ledger: Path,
    mode: str,
    calls: Path | None = None,
    crash_at: int | None = None,
    runner: str = "threads",
    workers: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the flow script in a subprocess (killed by the crash hook if `crash_at`),
    on `runner` ("threads" or "asyncio") with `max_workers=workers`."""
    args = [sys.executable, str(flow), str(journal), str(ledger), mode]
    args += [str(calls) if calls is not None else "", runner]
    if workers is not None:
        args.append(str(workers))
    return subprocess.run(
        args,
        env=child_env(crash_at),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


KILLED = -signal.SIGKILL


def ledger_rows(ledger: Path) -> list[tuple[str, str, str, Any]]:
    """The ledger's effects, as (key, branch, kind, value), sorted by key."""
    with closing(sqlite3.connect(ledger)) as db:
        return db.execute("SELECT key, branch, kind, value FROM effects ORDER BY key").fetchall()


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def call_in_thread(fn: Any, timeout: float = 30.0) -> Any:
    """Call `fn()` on a helper thread; return its result or raise its exception.

    Fails the test (instead of hanging) when `fn` has not returned after `timeout`.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="kira-journal-test", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"did not finish within {timeout} s (hung?)")
    if "error" in box:
        raise box["error"]
    return box["result"]
