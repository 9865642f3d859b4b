"""`kira.resume`: matching the recorded branches, finished runs, leases and
concurrent resumes, appending to the journal, finishing a rollback, and what a
crash between an attempt's failure and its decision must not change."""

from __future__ import annotations

import json
import os
import queue
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from _journal_support import (
    KILLED,
    NOTE_SOURCE,
    RUN_ID,
    SUBPROCESS_TIMEOUT,
    call_in_thread,
    child_env,
    import_flow,
    ledger_rows,
    read_lines,
    run_flow,
    write_flow,
)

import kira

WAIT = 10.0
"""Seconds a test waits for something it arranged before failing (never reached
when all is well)."""

EXPECTED = {"a": 1, "b": 21, "c": 301, "d": 4322, "e": 54322, "f": 654322}


class Counter:
    """Counts callback calls (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            self.calls.append(line)


def _diamond(counter: Counter, fail: str | None = None) -> list[kira.Branch]:
    """a; b, c after a; d after b and c: in-process callbacks that count their calls."""

    def apply(name: str, value: int) -> Any:
        def run(config: Any, deps: Any) -> int:
            counter.add(f"apply {name}")
            if name == fail:
                raise LookupError(f"{name} fails on purpose")
            return sum(deps.values()) + value

        return run

    def unapply(name: str) -> Any:
        return lambda config, deps, value: counter.add(f"unapply {name} {value}")

    return [
        kira.Branch(name, apply(name, value), deps, unapply=unapply(name))
        for name, value, deps in [
            ("a", 1, ()),
            ("b", 10, ("a",)),
            ("c", 100, ("a",)),
            ("d", 1000, ("b", "c")),
        ]
    ]


def _raw_events(path: Path, run_id: str = RUN_ID) -> list[tuple[Any, ...]]:
    """(seq, kind, branch, attempt, at, error, value) of every stored event, read
    from the file itself (intents included)."""
    with closing(sqlite3.connect(path)) as db:
        groups = db.execute(
            "SELECT events FROM event_groups WHERE run_id=? ORDER BY first_seq", (run_id,)
        ).fetchall()
    return [
        (seq, kind, branch, attempt, at, json.dumps(error), json.dumps(value))
        for (text,) in groups
        for seq, kind, branch, at, attempt, error, value in json.loads(text)
    ]


def _run_row(path: Path, run_id: str = RUN_ID) -> tuple[Any, ...]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT state, owner, lease_until FROM runs WHERE run_id=?", (run_id,)
        ).fetchone()


class Crashed:
    """A run of the crash flow whose process was SIGKILLed after event `n`."""

    def __init__(self, folder: Path, mode: str, n: int) -> None:
        folder.mkdir(exist_ok=True)
        self.folder = folder
        self.mode = mode
        self.flow = write_flow(folder)
        self.module = import_flow(self.flow)
        self.journal = folder / "journal.db"
        self.ledger = folder / "ledger.db"
        self.crash_calls = folder / "crash-calls"
        self.calls = folder / "resume-calls"  # calls made by the resumes only
        proc = run_flow(self.flow, self.journal, self.ledger, mode, self.crash_calls, crash_at=n)
        assert proc.returncode == KILLED, proc.stderr
        with kira.Journal(self.journal) as journal:
            self.events = journal.events(RUN_ID)
        assert len(self.events) == n

    def config(self, hook: Any = None) -> Any:
        return self.module.make_config(self.ledger, self.mode, str(self.calls), hook)

    def resume(self, hook: Any = None, **options: Any) -> dict[str, Any]:
        return kira.resume(
            RUN_ID, self.config(hook), self.module.branches(), journal=self.journal, **options
        )


def _event_index(events: list[kira.Event], kind: str, branch: str | None) -> int:
    """The 1-based position of the first such event (the n to crash right after it)."""
    for i, event in enumerate(events, 1):
        if (event.kind, event.branch) == (kind, branch):
            return i
    raise AssertionError(f"no {kind} {branch} event")


def _uninterrupted_events(folder: Path, mode: str) -> list[kira.Event]:
    folder.mkdir()
    flow = write_flow(folder)
    proc = run_flow(flow, folder / "journal.db", folder / "ledger.db", mode)
    assert proc.returncode == 0, proc.stderr
    with kira.Journal(folder / "journal.db") as journal:
        return journal.events(RUN_ID)


# -- what resume checks ------------------------------------------------------------------


def test_resume_with_different_branches_lists_the_differences(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    counter = Counter()
    kira.run_tasks(None, _diamond(counter), journal=path, run_id="shape")
    counter.calls.clear()
    recorded = _diamond(counter)
    a, b, c, _ = recorded
    changed = [
        a,
        kira.Branch("b", b.apply, ("a", "c")),  # changed dependencies
        c,  # d is missing
        kira.Branch("e", b.apply, ("a",)),  # extra
    ]
    with pytest.raises(kira.ResumeMismatchError) as caught:
        kira.resume("shape", None, changed, journal=path)
    error = caught.value
    assert isinstance(error, kira.JournalError)
    assert error.run_id == "shape"
    assert len(error.differences) == 3
    text = " | ".join(error.differences)
    assert "'d' was recorded but is not given" in text
    assert "'e' is given but was not recorded" in text
    assert "'b' depends on ['a', 'c'], recorded ['a']" in text
    for difference in error.differences:
        assert difference in str(error)
    assert "'shape'" in str(error)
    assert counter.calls == []  # nothing ran
    # the same flow resumes fine
    assert kira.resume("shape", None, recorded, journal=path) == {
        "a": 1,
        "b": 11,
        "c": 101,
        "d": 1112,
    }


@pytest.mark.parametrize("change", ["missing", "extra", "dependencies"])
def test_each_kind_of_difference_alone_is_refused(tmp_path: Path, change: str) -> None:
    path = tmp_path / "journal.db"
    counter = Counter()
    branches = _diamond(counter)
    kira.run_tasks(None, branches, journal=path, run_id="shape")
    a, b, c, d = branches
    given = {
        "missing": [a, b, c],
        "extra": [*branches, kira.Branch("z", a.apply, ("d",))],
        "dependencies": [a, b, c, kira.Branch("d", d.apply, ("b",))],
    }[change]
    with pytest.raises(kira.ResumeMismatchError) as caught:
        kira.resume("shape", None, given, journal=path)
    assert len(caught.value.differences) == 1


def test_resume_of_an_unknown_run_id(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    counter = Counter()
    kira.run_tasks(None, _diamond(counter), journal=path, run_id="known")
    with pytest.raises(kira.JournalError) as caught:
        kira.resume("unknown", None, _diamond(counter), journal=path)
    assert not isinstance(caught.value, kira.ResumeMismatchError)
    assert "'unknown'" in str(caught.value)
    assert str(path) in str(caught.value)
    assert counter.calls == ["apply a", "apply b", "apply c", "apply d"]


def test_resume_of_an_applied_run_returns_its_results_and_calls_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    counter = Counter()
    live = kira.run_tasks(None, _diamond(counter), journal=path, run_id="done")
    before = _raw_events(path, "done")
    counter.calls.clear()
    events = []
    for journal in (path, kira.Journal(path)):
        restored = kira.resume(
            "done", None, _diamond(counter), journal=journal, on_event=events.append
        )
        assert restored == live == {"a": 1, "b": 11, "c": 101, "d": 1112}
        assert list(restored) == ["a", "b", "c", "d"]
    assert counter.calls == []
    assert events == []  # nothing happened
    assert _raw_events(path, "done") == before  # nothing recorded


def test_resume_of_a_rolled_back_run_raises_the_recorded_outcome(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    counter = Counter()
    with pytest.raises(kira.RolledBack) as live:
        kira.run_tasks(None, _diamond(counter, fail="d"), journal=path, run_id="rb")
    assert sorted(live.value.unapplied) == ["a", "b", "c"]
    counter.calls.clear()
    with pytest.raises(kira.RolledBack) as caught:
        kira.resume("rb", None, _diamond(counter, fail="d"), journal=path)
    restored = caught.value
    assert restored.run_id == "rb"
    assert restored.unapplied == live.value.unapplied  # the recorded order
    culprit = restored.culprit
    assert culprit is not None
    assert (culprit.branch, culprit.phase, culprit.attempt) == ("d", "apply", 1)
    # stamped with the recorded failure's time (within the same instant)
    assert abs((culprit.at - live.value.culprit.at).total_seconds()) < 1
    assert isinstance(culprit.error, kira.RestoredError)
    assert culprit.error.type_name == "builtins.LookupError"
    assert culprit.error.message == "d fails on purpose"
    assert [(e.branch, e.phase) for e in restored.errors] == [("d", "apply")]
    assert counter.calls == []


# -- leases and concurrent resumes ---------------------------------------------------------


def test_two_concurrent_resumes_exactly_one_proceeds(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, "success", n=3)  # b was mid-apply
    entered, release = threading.Event(), threading.Event()

    def hook(name: str, phase: str, info: Any) -> None:
        if (name, phase) == ("b", "apply"):  # the first re-attempted apply
            entered.set()
            if not release.wait(WAIT):
                raise TimeoutError("the test never released b")

    barrier = threading.Barrier(2)
    outcomes: dict[str, tuple[str, Any]] = {}
    finished: queue.Queue[str] = queue.Queue()

    def go(who: str) -> None:
        try:
            barrier.wait(WAIT)
            outcomes[who] = ("returned", crashed.resume(hook))
        except BaseException as exc:
            outcomes[who] = ("raised", exc)
        finally:
            finished.put(who)

    threads = [threading.Thread(target=go, args=(who,), daemon=True) for who in ("1st", "2nd")]
    for thread in threads:
        thread.start()
    try:
        assert entered.wait(WAIT), "no resume re-attempted b"
        # one resume holds the run, blocked in b: the other fails at once
        loser = finished.get(timeout=WAIT)
        kind, error = outcomes[loser]
        assert kind == "raised" and isinstance(error, kira.RunLocked), outcomes[loser]
    finally:
        release.set()
        winner = finished.get(timeout=WAIT)
        for thread in threads:
            thread.join(WAIT)
    assert isinstance(error, kira.JournalError)
    assert error.run_id == RUN_ID
    assert f":{os.getpid()}:" in error.owner
    assert "another kira.Journal of this process" in str(error)  # threads: one process
    assert outcomes[winner] == ("returned", EXPECTED)
    calls = read_lines(crashed.calls)
    applies = sorted(line.split()[1] for line in calls if line.startswith("apply"))
    assert applies == ["b", "c", "d", "e", "f"]  # each at most once across both resumes
    assert [(r[1], r[2]) for r in ledger_rows(crashed.ledger)] == [
        (name, "apply") for name in "abcdef"
    ]
    # a resume arriving after the run finished returns its outcome, runs nothing
    assert crashed.resume(hook) == EXPECTED
    assert read_lines(crashed.calls) == calls


_RESUMER = """
import json, pathlib, sys, time
import importlib.util
import kira

flow_path, journal, ledger, calls, entered, gate = sys.argv[1:7]
spec = importlib.util.spec_from_file_location("flow", flow_path)
flow = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flow)

def hook(name, phase, info):
    if (name, phase) == ("b", "apply"):
        pathlib.Path(entered).touch()
        deadline = time.monotonic() + 30
        while not pathlib.Path(gate).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the gate never opened")
            time.sleep(0.01)

config = flow.make_config(ledger, "success", calls, hook)
print(json.dumps(kira.resume(flow.RUN_ID, config, flow.branches(), journal=journal)))
"""


def test_a_run_being_resumed_by_another_live_process_is_locked(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, "success", n=3)
    script = tmp_path / "resumer.py"
    script.write_text(textwrap.dedent(_RESUMER), encoding="utf-8")
    entered, gate = tmp_path / "entered", tmp_path / "gate"
    args = [crashed.flow, crashed.journal, crashed.ledger, crashed.calls, entered, gate]
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not entered.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the other process never re-attempted b"
            time.sleep(0.01)
        with pytest.raises(kira.RunLocked) as caught:
            crashed.resume()
        assert f":{proc.pid}:" in caught.value.owner
        # only the other process ran callbacks: b (blocked) and c, not d (it waits for b)
        assert set(read_lines(crashed.calls)) <= {
            "apply b crash-run/b/apply/1",
            "apply c crash-run/c/apply/1",
        }
        gate.touch()
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0, err
    assert json.loads(out) == EXPECTED
    calls = read_lines(crashed.calls)
    # now finished: returned as recorded, nothing run
    assert crashed.resume() == EXPECTED
    assert read_lines(crashed.calls) == calls


def test_a_dead_owners_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, "success", n=5)
    state, owner, until = _run_row(crashed.journal)
    assert state == "running"
    pid = int(owner.split(":")[1])
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the owner is dead ...
    assert until > time.time() + 10  # ... though its lease has not ended
    started = time.monotonic()
    assert call_in_thread(crashed.resume, WAIT) == EXPECTED
    assert time.monotonic() - started < WAIT
    assert _run_row(crashed.journal) == ("applied", None, None)  # released


def test_an_owner_killed_but_not_yet_reaped_counts_as_dead(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, "success", n=5)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"{socket.gethostname()}:{child.pid}:abcdef01"
        with closing(sqlite3.connect(crashed.journal)) as db, db:
            db.execute("UPDATE runs SET owner=?, lease_until=?", (owner, time.time() + 60))
        with pytest.raises(kira.RunLocked):  # alive: its lease holds
            crashed.resume()
        child.kill()
        deadline = time.monotonic() + WAIT
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never died"
            time.sleep(0.01)
        # a zombie still answers signal 0, but it runs nothing any more
        assert crashed.resume() == EXPECTED
    finally:
        child.kill()
        child.wait(WAIT)


def test_a_lease_held_on_another_host_is_respected_until_it_ends(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, "success", n=5)
    with closing(sqlite3.connect(crashed.journal)) as db, db:
        db.execute(
            "UPDATE runs SET owner='elsewhere.invalid:4242:abcdef01', lease_until=?",
            (time.time() + 60,),
        )
    with pytest.raises(kira.RunLocked) as caught:
        crashed.resume()
    assert caught.value.owner == "elsewhere.invalid:4242:abcdef01"
    assert "elsewhere.invalid" in str(caught.value)
    assert read_lines(crashed.calls) == []
    # once its lease has ended, the run is taken over
    with closing(sqlite3.connect(crashed.journal)) as db, db:
        db.execute("UPDATE runs SET lease_until=?", (time.time() - 1,))
    assert crashed.resume() == EXPECTED


# -- appending to the journal ----------------------------------------------------------------


def test_a_resumed_run_appends_to_the_same_journal(tmp_path: Path) -> None:
    crashed = Crashed(tmp_path, "success", n=4)  # b and c were mid-apply
    before = _raw_events(crashed.journal)
    assert [(r[1], r[2]) for r in before][-2:] == [("apply_started", "b"), ("apply_started", "c")]
    assert crashed.resume() == EXPECTED
    after = _raw_events(crashed.journal)
    assert after[: len(before)] == before  # kept as they were
    assert [r[0] for r in after] == list(range(1, len(after) + 1))  # seq continues
    appended = [(r[1], r[2], r[3]) for r in after[len(before) :]]
    # b and c are attempted again with the same attempt number
    assert appended[:2] == [("apply_started", "b", 1), ("apply_started", "c", 1)]
    assert appended[-1] == ("run_finished", None, None)
    assert json.loads(after[-1][6]) == "applied"
    assert sorted(b for k, b, _ in appended if k == "applied") == ["b", "c", "d", "e", "f"]
    assert _run_row(crashed.journal) == ("applied", None, None)
    with kira.Journal(crashed.journal) as journal:
        [summary] = journal.runs()
    assert (summary.state, summary.applied, summary.total) == ("applied", 6, 6)
    # the keys repeated: one effect per branch
    assert [r[0] for r in ledger_rows(crashed.ledger)] == [
        f"{RUN_ID}/{name}/apply/1" for name in "abcdef"
    ]


# -- finishing a rollback ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "redone"),
    [
        (("rollback_started", "f"), None),
        (("unapplied", "e"), None),
        (("unapply_started", "d"), "d"),
    ],
    ids=["after-rollback-started", "after-e-unapplied", "during-d-unapply"],
)
def test_resume_of_a_run_that_was_rolling_back_finishes_the_rollback(
    tmp_path: Path, last: tuple[str, str], redone: str | None
) -> None:
    n = _event_index(_uninterrupted_events(tmp_path / "uninterrupted", "fail"), *last)
    crashed = Crashed(tmp_path / "crashed", "fail", n)
    recorded_unapplied = [e.branch for e in crashed.events if e.kind == "unapplied"]
    with pytest.raises(kira.RolledBack) as caught:
        crashed.resume()
    unapplied = caught.value.unapplied
    assert list(unapplied[: len(recorded_unapplied)]) == recorded_unapplied
    assert unapplied[:2] == ("e", "d") and unapplied[-1] == "a"
    assert sorted(unapplied[2:4]) == ["b", "c"]
    culprit = caught.value.culprit
    assert culprit is not None and (culprit.branch, culprit.phase) == ("f", "apply")
    assert isinstance(culprit.error, kira.RestoredError)
    assert culprit.error.type_name == "builtins.RuntimeError"
    # the resume only unapplied what was left: no apply, nothing undone twice
    calls = read_lines(crashed.calls)
    assert not [line for line in calls if line.startswith("apply")]
    left = [name for name in "edbca" if name not in recorded_unapplied]
    assert sorted(line.split()[1] for line in calls) == sorted(left)
    if redone is not None:  # the interrupted unapply was made again, with its key
        assert f"unapply {redone} {RUN_ID}/{redone}/unapply/1" in calls
    # no effect remains; each undo recorded once
    assert [(r[1], r[2]) for r in ledger_rows(crashed.ledger)] == [
        (name, "undo") for name in "abcde"
    ]
    with kira.Journal(crashed.journal) as journal:
        events = journal.events(RUN_ID)
    assert (events[-1].kind, events[-1].value) == ("run_finished", "rolled_back")
    assert not [e for e in events[n:] if e.kind.startswith("apply")]


# -- a crash between an attempt's failure and the decision about it ---------------------------

_HANDLER_FLOW = (
    """
import sys
import kira

RUN_ID = "handler-run"
"""
    + NOTE_SOURCE
    + """


def apply_a(config, deps):
    note(config, "apply a " + kira.current_attempt().key)
    return 1


def unapply_a(config, deps, value):
    note(config, "unapply a " + kira.current_attempt().key)


def apply_b(config, deps):
    info = kira.current_attempt()
    note(config, "apply b " + info.key)
    if info.attempt == 1:
        raise ValueError("b fails its first attempt")
    return deps["a"] + 1


def decide_b(config, deps, error, attempt):
    note(config, f"decide b {kira.current_attempt().key} {type(error).__name__} {attempt}")
    if config["decision"] == "give_up":
        return False
    return kira.RetryAfter(0.05)


def branches():
    return [
        kira.Branch("a", apply_a, unapply=unapply_a),
        kira.Branch("b", apply_b, ["a"], on_apply_error=decide_b),
    ]


if __name__ == "__main__":
    journal, calls, decision = sys.argv[1:4]
    config = {"calls": calls, "decision": decision}
    try:
        print(kira.run_tasks(config, branches(), journal=journal, run_id=RUN_ID))
    except kira.RolledBack as exc:
        print(exc)
"""
)


def _run_handler_flow(
    folder: Path, decision: str, crash_at: int | None = None
) -> tuple[Path, Any, subprocess.CompletedProcess[str]]:
    folder.mkdir()
    flow = folder / "handler_flow.py"
    flow.write_text(_HANDLER_FLOW, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(flow), str(folder / "journal.db"), str(folder / "calls"), decision],
        env=child_env(crash_at),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    return flow, import_flow(flow), proc


def test_a_crash_before_the_error_handler_decided_consults_it_on_resume(tmp_path: Path) -> None:
    """b's first attempt fails and its handler says give up. The process dies once the
    failure is committed, before the handler's decision: resume must ask the handler
    (or, without one, give up), not retry b behind its back."""
    _, _, proc = _run_handler_flow(tmp_path / "uninterrupted", "give_up")
    assert proc.returncode == 0, proc.stderr
    with kira.Journal(tmp_path / "uninterrupted" / "journal.db") as journal:
        n = _event_index(journal.events("handler-run"), "apply_failed", "b")
    folder = tmp_path / "crashed"
    _, module, proc = _run_handler_flow(folder, "give_up", crash_at=n)
    assert proc.returncode == KILLED, proc.stderr
    assert read_lines(folder / "calls")[:2] == [
        "apply a handler-run/a/apply/1",
        "apply b handler-run/b/apply/1",
    ]
    resume_calls = folder / "resume-calls"
    config = {"calls": str(resume_calls), "decision": "give_up"}
    outcome: Any
    try:
        outcome = kira.resume(
            "handler-run", config, module.branches(), journal=folder / "journal.db"
        )
    except kira.RolledBack as exc:
        outcome = exc
    calls = read_lines(resume_calls)
    assert "apply b handler-run/b/apply/2" not in calls, (
        f"b was retried without its handler's decision: calls {calls}, outcome {outcome!r}"
    )
    assert calls == [
        "decide b handler-run/b/apply/1 RestoredError 1",
        "unapply a handler-run/a/unapply/1",
    ]
    assert isinstance(outcome, kira.RolledBack)
    culprit = outcome.culprit
    assert culprit is not None and (culprit.branch, culprit.attempt) == ("b", 1)


def test_a_crash_after_a_retry_was_scheduled_retries_on_resume(tmp_path: Path) -> None:
    _, _, proc = _run_handler_flow(tmp_path / "uninterrupted", "retry")
    assert proc.returncode == 0, proc.stderr
    with kira.Journal(tmp_path / "uninterrupted" / "journal.db") as journal:
        events = journal.events("handler-run")
    n = _event_index(events, "retry_scheduled", "b")
    assert events[n - 1].attempt == 2
    folder = tmp_path / "crashed"
    _, module, proc = _run_handler_flow(folder, "retry", crash_at=n)
    assert proc.returncode == KILLED, proc.stderr
    resume_calls = folder / "resume-calls"
    config = {"calls": str(resume_calls), "decision": "retry"}
    results = kira.resume("handler-run", config, module.branches(), journal=folder / "journal.db")
    assert results == {"a": 1, "b": 2}
    # the decision was recorded: b is retried (attempt 2) without asking again
    assert read_lines(resume_calls) == ["apply b handler-run/b/apply/2"]


# -- a crash while a value the journal could not record was being unapplied -----------------

_CODEC_FLOW = """
import sys
import kira

RUN_ID = "codec-run"


def note(config, line):
    with open(config, "a", encoding="utf-8") as f:
        f.write(line + "\\n")


def apply_a(config, deps):
    note(config, "apply a")
    return 1


def apply_b(config, deps):
    note(config, "apply b")
    return {"a set", "is not JSON"}


def unapply(name):
    def undo(config, deps, value):
        note(config, f"unapply {name}")

    return undo


def branches():
    return [
        kira.Branch("a", apply_a, unapply=unapply("a")),
        kira.Branch("b", apply_b, ["a"], unapply=unapply("b")),
    ]


if __name__ == "__main__":
    journal, calls = sys.argv[1:3]
    try:
        kira.run_tasks(calls, branches(), journal=journal, run_id=RUN_ID)
    except kira.RolledBack as exc:
        print(exc)
"""


def test_a_crash_while_unapplying_an_unrecordable_value_is_not_reported_as_clean(
    tmp_path: Path,
) -> None:
    """b applied, but its value could not be recorded: the run unapplies the value
    it holds in memory. If the process dies during that unapply, the value is gone:
    resume cannot undo b, so b's effect may stand. It must say so (the rollback is
    incomplete), and keep a, which b depends on, applied."""

    def run(folder: Path, crash_at: int | None) -> tuple[Any, subprocess.CompletedProcess[str]]:
        folder.mkdir()
        flow = folder / "codec_flow.py"
        flow.write_text(_CODEC_FLOW, encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, str(flow), str(folder / "journal.db"), str(folder / "calls")],
            env=child_env(crash_at),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
        )
        return import_flow(flow), proc

    _, proc = run(tmp_path / "uninterrupted", None)
    assert proc.returncode == 0, proc.stderr
    assert read_lines(tmp_path / "uninterrupted" / "calls") == [
        "apply a",
        "apply b",
        "unapply b",
        "unapply a",
    ]
    with kira.Journal(tmp_path / "uninterrupted" / "journal.db") as journal:
        n = _event_index(journal.events("codec-run"), "unapply_started", "b")
    module, proc = run(tmp_path / "crashed", n)
    assert proc.returncode == KILLED, proc.stderr
    resume_calls = tmp_path / "crashed" / "resume-calls"
    with pytest.raises(kira.RunFailed) as caught:
        kira.resume(
            "codec-run",
            str(resume_calls),
            module.branches(),
            journal=tmp_path / "crashed" / "journal.db",
        )
    error = caught.value
    assert isinstance(error, kira.RollbackIncomplete), f"{type(error).__name__}: {error}"
    assert "b" in (*error.still_applied, *error.abandoned)
    assert "unapply a" not in read_lines(resume_calls)


def test_resume_from_a_journal_that_does_not_exist_says_so_and_creates_nothing(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing.db"
    branches = [kira.Branch("a", lambda config, deps: 1)]
    with pytest.raises(kira.JournalError, match=r"no journal at .*missing\.db"):
        kira.resume("r1", None, branches, journal=missing)
    assert not missing.exists()
