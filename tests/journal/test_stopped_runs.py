"""Runs that stop abruptly: a journal that failed mid-run, a second Ctrl-C, a
signal in kira's own code. Afterwards nothing more runs or is committed, the
journal reads back whole, and the Journal object serves the next run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import kira

WAIT = 30.0


def _kinds(journal: Path) -> list[str]:
    with closing(sqlite3.connect(journal, timeout=10)) as db:
        rows = db.execute("SELECT events FROM event_groups ORDER BY first_seq").fetchall()
    return [event[1] for (text,) in rows for event in json.loads(text)]


def _join_kira_threads() -> None:
    """Wait for kira's worker threads to end (a closed pool's threads end once their
    job is done and reported): whatever they would have done is done."""
    for thread in threading.enumerate():
        if thread.name.startswith("kira-") and thread.name != "kira-journal":
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} never ended"


def test_a_journal_object_serves_again_after_its_run_stopped_on_a_failed_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    inside, locked = threading.Event(), threading.Event()
    calls: list[str] = []

    def held(config: Any, deps: Any) -> str:
        calls.append("a")
        if len(calls) == 1:  # the first attempt waits while the journal gets locked
            inside.set()
            assert locked.wait(WAIT)
        return "a"

    branches = [
        kira.Branch("a", held),
        kira.Branch("b", lambda c, d: calls.append("b") or d["a"] + "b", ["a"]),
    ]
    journal = kira.Journal(path, busy_timeout=0.2)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            kira.run_tasks(None, branches, journal=journal, run_id="r1")
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=first)
    runner.start()
    assert inside.wait(WAIT)
    blocker = sqlite3.connect(path, isolation_level=None, timeout=WAIT)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # a's result cannot be committed now
        locked.set()
        runner.join(WAIT)
        assert not runner.is_alive()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert len(errors) == 1 and isinstance(errors[0], kira.JournalError), errors
    assert "locked" in str(errors[0])
    assert calls == ["a"]  # b waited for a's commit, which never came
    # the same object carries the run on: its own lease (which it could not give
    # back under the lock) is no obstacle, and nothing of the stopped run's unsaved
    # events goes into the resume's groups
    with journal:
        assert kira.resume("r1", None, branches, journal=journal) == {"a": "a", "b": "ab"}
        assert kira.run_tasks(None, branches, journal=journal, run_id="r2") == {
            "a": "a",
            "b": "ab",
        }
    with kira.Journal(path) as reader:
        assert [e.kind for e in reader.events("r1")][-1] == "run_finished"
        assert [e.kind for e in reader.events("r2")][-1] == "run_finished"
        assert {r.run_id: r.state for r in reader.runs()} == {"r1": "applied", "r2": "applied"}


def test_after_a_second_ctrl_c_nothing_more_is_scheduled_or_committed(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    started = threading.Barrier(4, timeout=WAIT)
    gate, undo_gate = threading.Event(), threading.Event()
    quick_applied, undoing = threading.Event(), threading.Event()
    unapplies: list[str] = []

    def held(config: Any, deps: Any) -> str:
        if not gate.is_set():  # (the attempts a resume makes again just return)
            started.wait()
            assert gate.wait(WAIT)
        return "x"

    def undo_quick(config: Any, deps: Any, value: Any) -> None:
        unapplies.append("quick")
        undoing.set()
        assert undo_gate.wait(WAIT)

    branches = [
        kira.Branch(f"x{i}", held, unapply=lambda c, d, v, i=i: unapplies.append(f"x{i}"))
        for i in range(3)
    ] + [kira.Branch("quick", lambda c, d: "q", unapply=undo_quick)]

    emitted: list[tuple[str, str | None]] = []

    def on_event(event: kira.Event) -> None:
        emitted.append((event.kind, event.branch))  # in whichever thread schedules
        if (event.kind, event.branch) == ("applied", "quick"):
            quick_applied.set()

    def interrupt_twice() -> None:
        started.wait()  # x0, x1, x2 run
        assert quick_applied.wait(WAIT)
        os.kill(os.getpid(), signal.SIGINT)
        # the rollback has begun, its commit is made (quick's unapply waited for
        # it), and it waits for the x attempts
        assert undoing.wait(WAIT)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt_twice)
    sender.start()
    journal = kira.Journal(path)
    with pytest.raises(KeyboardInterrupt, match="interrupted again"):
        kira.run_tasks(None, branches, journal=journal, run_id="twice", on_event=on_event)
    sender.join(WAIT)
    seen = len(emitted)
    at_raise = _kinds(path)
    assert "rollback_started" in at_raise
    gate.set()  # the attempts end now, after the run has raised
    undo_gate.set()
    _join_kira_threads()
    assert emitted[seen:] == []  # no transition behind the caller's back
    assert unapplies == ["quick"]  # nothing unapplied
    assert _kinds(path) == at_raise  # nor anything committed
    journal.close()
    # a resume finishes the rollback: quick's unapply again (the same attempt), and
    # the x branches, whose attempts it makes again, then unapplies
    with pytest.raises(kira.RolledBack) as caught:
        kira.resume("twice", None, branches, journal=path)
    assert sorted(caught.value.unapplied) == ["quick", "x0", "x1", "x2"]
    assert sorted(unapplies) == ["quick", "quick", "x0", "x1", "x2"]


class _InterruptedExecutor(Executor):
    """Ctrl-C arriving while kira hands an attempt to the executor."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        raise KeyboardInterrupt


def test_a_signal_in_kiras_own_code_is_not_blamed_on_a_callback(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    branches = [kira.Branch("a", lambda c, d: "a", unapply=lambda c, d, v: None)]
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(
            kira.run_tasks_async(
                None, branches, journal=path, run_id="sig", executor=_InterruptedExecutor()
            )
        )
    kinds = _kinds(path)
    assert "apply_failed" not in kinds and "failed" not in kinds
    assert kinds == ["apply_started"]  # the attempt may have begun: resumed as such
    assert kira.resume("sig", None, branches, journal=path) == {"a": "a"}
