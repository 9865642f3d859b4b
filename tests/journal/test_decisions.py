"""Decisions are durable before the attempts still running end: a rollback begun
(by Ctrl-C, by a give-up, by cancelling twice) is in the journal at once, so a
process that dies then is resumed into that rollback, not into a new try."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from _journal_support import NOTE_SOURCE, SUBPROCESS_TIMEOUT, child_env, import_flow, read_lines

import kira

WAIT = 30.0

# b (or c) blocks until the gate file exists: the run has something still running
# when the rollback begins. Modes: "interrupt" (the test sends SIGINT), "give_up"
# (c fails for good at once, with nothing to unapply).
FLOW = (
    """
import os
import sys
import time

import kira

RUN_ID = "decided"
"""
    + NOTE_SOURCE
    + """


def blocked(config, deps):
    note(config, "apply b " + kira.current_attempt().key)
    open(config["started"], "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(config["gate"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return "b"


def refuses(config, deps):
    note(config, "apply c " + kira.current_attempt().key)
    raise RuntimeError("c refuses")


def branches(mode):
    a = kira.Branch(
        "a",
        lambda config, deps: note(config, "apply a") or "a",
        unapply=lambda config, deps, value: note(config, "unapply a"),
    )
    b = kira.Branch(
        "b", blocked, ["a"], unapply=lambda config, deps, value: note(config, "unapply b")
    )
    if mode == "give_up":
        return [a, b, kira.Branch("c", refuses, ["a"])]
    return [a, b]


def config(folder):
    return {name: os.path.join(folder, name) for name in ("calls", "started", "gate")}


if __name__ == "__main__":
    journal, folder, mode = sys.argv[1:4]
    kira.run_tasks(config(folder), branches(mode), journal=journal, run_id=RUN_ID)
"""
)


def _recorded_kinds(journal: Path) -> list[str]:
    with closing(sqlite3.connect(journal, timeout=10)) as db:
        rows = db.execute("SELECT events FROM event_groups ORDER BY first_seq").fetchall()
    return [event[1] for (text,) in rows for event in json.loads(text)]


def _kill_once_recorded(tmp_path: Path, mode: str, kind: str, interrupt: bool) -> None:
    """Run FLOW in a subprocess; once b runs (SIGINT it then, if `interrupt`), wait
    for `kind` to be committed while b still blocks, and SIGKILL the process."""
    flow = tmp_path / "flow.py"
    flow.write_text(textwrap.dedent(FLOW), encoding="utf-8")
    journal = tmp_path / "journal.db"
    proc = subprocess.Popen(
        [sys.executable, str(flow), str(journal), str(tmp_path), mode],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not (tmp_path / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "b never started"
            time.sleep(0.005)
        if interrupt:
            proc.send_signal(signal.SIGINT)
        while kind not in _recorded_kinds(journal):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, (
                f"{kind} was not committed while b ran: {_recorded_kinds(journal)}"
            )
            time.sleep(0.005)
        assert not (tmp_path / "gate").exists()  # b is still blocked
    finally:
        proc.kill()
        proc.communicate(timeout=SUBPROCESS_TIMEOUT)


def _resume(tmp_path: Path, mode: str) -> Any:
    module = import_flow(tmp_path / "flow.py")
    journal = tmp_path / "journal.db"
    return kira.resume(
        "decided", module.config(str(tmp_path)), module.branches(mode), journal=journal
    )


def test_a_rollback_begun_by_ctrl_c_is_resumed_as_a_rollback(tmp_path: Path) -> None:
    _kill_once_recorded(tmp_path, "interrupt", "rollback_started", interrupt=True)
    (tmp_path / "gate").touch()  # b's attempt, made again, now returns
    with pytest.raises(kira.RolledBack) as caught:
        _resume(tmp_path, "interrupt")
    assert caught.value.unapplied == ("b", "a")
    calls = read_lines(tmp_path / "calls")
    assert calls == [
        "apply a",
        "apply b decided/b/apply/1",
        "apply b decided/b/apply/1",  # the interrupted attempt, made again
        "unapply b",
        "unapply a",
    ]


def test_a_give_up_is_resumed_as_a_rollback_without_trying_again(tmp_path: Path) -> None:
    _kill_once_recorded(tmp_path, "give_up", "failed", interrupt=False)
    (tmp_path / "gate").touch()
    with pytest.raises(kira.RolledBack) as caught:
        _resume(tmp_path, "give_up")
    assert caught.value.culprit is not None and caught.value.culprit.branch == "c"
    calls = read_lines(tmp_path / "calls")
    assert calls.count("apply c decided/c/apply/1") == 1  # given up on: not tried again
    assert not any(line.startswith("apply c decided/c/apply/2") for line in calls)
    assert calls[-2:] == ["unapply b", "unapply a"]


def test_cancelling_twice_leaves_the_rollback_in_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    calls: list[str] = []

    async def forever(config: Any, deps: Any) -> str:
        calls.append("apply b")
        await asyncio.Event().wait()
        return "b"

    def branches(b_apply: Any) -> list[kira.Branch]:
        return [
            kira.Branch("a", lambda c, d: "a", unapply=lambda c, d, v: calls.append("unapply a")),
            kira.Branch("b", b_apply, ["a"], unapply=lambda c, d, v: calls.append("unapply b")),
        ]

    async def main() -> None:
        task = asyncio.ensure_future(
            kira.run_tasks_async(None, branches(forever), journal=journal, run_id="twice")
        )
        while "apply b" not in calls:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0)  # the first cancellation begins the rollback
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), WAIT))
    assert "rollback_started" in _recorded_kinds(journal)
    calls.clear()
    with pytest.raises(kira.RolledBack) as caught:
        kira.resume("twice", None, branches(lambda c, d: "b"), journal=journal)
    assert "a" in caught.value.unapplied
    assert calls[-1] == "unapply a"
