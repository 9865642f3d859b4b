"""The journal itself: damaged, foreign, newer and locked files; codecs; never
unpickling; run ids; `Journal.runs` / `Journal.events`; `current_attempt`."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import multiprocessing
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import _journal_callbacks as cb
import pytest
from _journal_support import KILLED, RUN_ID, run_flow, write_flow

import kira


def _const(value: Any) -> Any:
    return lambda config, deps: value


def _small_journal(path: Path, run_id: str = "r1", count: int = 40) -> None:
    """A journal with one finished run of `count` branches, checkpointed and closed."""
    branches = [kira.Branch(f"b{i}", _const("x" * 300)) for i in range(count)]
    kira.run_tasks(None, branches, journal=path, run_id=run_id)
    assert not Path(f"{path}-wal").exists()  # the last close checkpointed the WAL


def _open_and_read(path: Path) -> None:
    """Open the journal and read everything in it."""
    with kira.Journal(path) as journal:
        for summary in journal.runs():
            journal.events(summary.run_id)


# -- damaged, foreign, newer and locked files ------------------------------------------


def test_a_garbage_file_is_refused_with_a_journal_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(3000))
    with pytest.raises(kira.JournalError) as caught:
        _open_and_read(path)
    assert str(path) in str(caught.value)
    assert "not a kira journal or is damaged" in str(caught.value)
    # translated at the boundary: not an sqlite3 error itself
    assert not isinstance(caught.value, sqlite3.Error)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


def test_a_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("shopping list: eggs, milk\n" * 50, encoding="utf-8")
    with pytest.raises(kira.JournalError, match=r"notes\.db"):
        _open_and_read(path)


@pytest.mark.parametrize("keep", [100, 4096 + 100, 0.5, 0.9], ids=lambda k: f"keep-{k}")
def test_a_torn_journal_is_refused_with_a_journal_error_naming_it(
    tmp_path: Path, keep: float
) -> None:
    whole = tmp_path / "whole.db"
    _small_journal(whole)
    data = whole.read_bytes()
    assert len(data) > 5 * 4096
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    torn = tmp_path / "torn.db"
    torn.write_bytes(data[:cut])
    with pytest.raises(kira.JournalError) as caught:
        _open_and_read(torn)
    assert str(torn) in str(caught.value)
    assert not isinstance(caught.value, sqlite3.Error)
    # resume says the same, and runs nothing
    with pytest.raises(kira.JournalError, match=r"torn\.db"):
        kira.resume("r1", None, [kira.Branch("b0", _const(1))], journal=torn)


def test_an_sqlite_database_of_another_application_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers(name) VALUES ('Ada')")
    with pytest.raises(kira.JournalError) as caught:
        kira.Journal(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not a kira journal" in message
    assert "customers" in message
    # and it was left alone
    with closing(sqlite3.connect(path)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert tables == ["customers"]
        assert db.execute("SELECT name FROM customers").fetchall() == [("Ada",)]


def test_a_journal_from_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _small_journal(path, count=2)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE kira_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(kira.JournalError) as caught:
        kira.Journal(path)
    message = str(caught.value)
    assert str(path) in message
    assert "99" in message
    assert "upgrade kira" in message
    with pytest.raises(kira.JournalError, match="upgrade"):
        kira.resume("r1", None, [kira.Branch("b0", _const(1))], journal=path)
    # refused, not "migrated" down
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM kira_meta").fetchall() == [("99",)]


def test_a_schema_version_that_is_not_a_number_is_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _small_journal(path, count=2)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE kira_meta SET value='two' WHERE key='schema_version'")
    for readonly in (False, True):
        with pytest.raises(kira.JournalError, match="schema version is 'two', not a number"):
            kira.Journal(path, readonly=readonly)


def test_a_start_time_that_is_not_a_time_is_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _small_journal(path, count=2)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE runs SET created_at='teatime'")
    with kira.Journal(path) as journal, pytest.raises(kira.JournalError, match="damaged"):
        journal.runs()


def test_a_time_recorded_without_an_offset_is_utc_not_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.db"
    _small_journal(path, count=2)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE runs SET created_at='2026-01-02T10:00:00'")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        with kira.Journal(path) as journal:
            assert journal.runs()[0].started == datetime(2026, 1, 2, 10, tzinfo=UTC)
    finally:
        monkeypatch.undo()
        time.tzset()


# What kira wrote with schema 1 (a row per event), verbatim.
_SCHEMA_1 = """
CREATE TABLE kira_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, flow TEXT, graph TEXT NOT NULL, total INTEGER NOT NULL,
    state TEXT NOT NULL, applied INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, owner TEXT, lease_until REAL
);
CREATE TABLE events (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, branch TEXT,
    at TEXT NOT NULL, attempt INTEGER, error TEXT, value, PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
INSERT INTO kira_meta VALUES ('schema_version', '1');
"""


def _schema_1_journal(path: Path) -> None:
    """A schema-1 journal: "done", finished after a retry, and "cut", whose process
    died with a applied and b not started."""
    error = json.dumps({"type": "builtins.OSError", "message": "flaky", "traceback": "tb"})
    t = "2026-11-30T10:00:00.{:06d}+00:00".format
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(_SCHEMA_1)
        db.executemany(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            [
                ("done", "f.py", '[["x", []]]', 1, "applied", t(1), t(9), None, None),
                (
                    "cut",
                    None,
                    '[["a", []], ["b", ["a"]]]',
                    2,
                    "running",
                    t(2),
                    t(2),
                    "gone.invalid:1:dead",
                    1.0,
                ),
            ],
        )
        db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("done", 1, "apply_started", "x", t(10), 1, None, None),
                ("done", 2, "apply_failed", "x", t(11), 1, error, None),
                ("done", 3, "retry_scheduled", "x", t(12), 2, None, "0.5"),
                ("done", 4, "apply_started", "x", t(13), 2, None, None),
                ("done", 5, "applied", "x", t(14), 2, None, '{"k": [5]}'),
                ("done", 6, "run_finished", None, t(15), None, None, '"applied"'),
                ("cut", 1, "apply_intent", None, t(20), 1, None, '["a"]'),
                ("cut", 2, "apply_started", "a", t(21), 1, None, None),
                ("cut", 3, "applied", "a", t(22), 1, None, "1"),
            ],
        )


def test_a_schema_1_journal_is_migrated_and_its_runs_carry_on(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _schema_1_journal(path)
    calls: list[str] = []

    def call(name: str, value: Any) -> Any:
        return lambda config, deps: calls.append(name) or value + sum(deps.values())

    with kira.Journal(path) as journal:
        events = journal.events("done")
        summaries = [(r.run_id, r.state, r.applied, r.total) for r in journal.runs()]
    assert [(e.kind, e.branch, e.attempt, e.value) for e in events] == [
        ("apply_started", "x", 1, None),
        ("apply_failed", "x", 1, None),
        ("retry_scheduled", "x", 2, 0.5),
        ("apply_started", "x", 2, None),
        ("applied", "x", 2, {"k": [5]}),
        ("run_finished", None, None, "applied"),
    ]
    assert [e.at for e in events] == [
        datetime(2026, 11, 30, 10, 0, 0, us, tzinfo=UTC) for us in range(10, 16)
    ]
    failure = events[1].error
    assert isinstance(failure, kira.RestoredError)
    assert (failure.type_name, failure.message, failure.traceback) == (
        "builtins.OSError",
        "flaky",
        "tb",
    )
    assert summaries == [("done", "applied", 1, 1), ("cut", "running", 1, 2)]
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM kira_meta").fetchall() == [("2",)]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"kira_meta", "runs", "event_groups"}

    # a finished run keeps its outcome; the cut one carries on from where it was
    assert kira.resume("done", None, [kira.Branch("x", call("x", 0))], journal=path) == {
        "x": {"k": [5]}
    }
    branches = [kira.Branch("a", call("a", 1)), kira.Branch("b", call("b", 1), ["a"])]
    assert kira.resume("cut", None, branches, journal=path) == {"a": 1, "b": 2}
    assert calls == ["b"]  # a's recorded result stood; x was not run again
    with kira.Journal(path) as journal:
        kinds = [(e.kind, e.branch) for e in journal.events("cut")]
    assert kinds == [
        ("apply_started", "a"),
        ("applied", "a"),
        ("apply_started", "b"),
        ("applied", "b"),
        ("run_finished", None),
    ]


def test_a_damaged_schema_1_journal_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _schema_1_journal(path)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE events SET error='{\"type\": ' WHERE kind='apply_failed'")
    dump = "SELECT * FROM events ORDER BY run_id, seq"
    with closing(sqlite3.connect(path)) as db:
        before = db.execute(dump).fetchall()
    with pytest.raises(kira.JournalError) as caught:
        kira.Journal(path)
    message = str(caught.value)
    assert str(path) in message and "cannot be migrated to schema version 2" in message
    assert "left as it was" in message
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM kira_meta").fetchall() == [("1",)]
        assert db.execute(dump).fetchall() == before
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "event_groups" not in tables


def test_a_schema_1_journal_opened_read_only_says_how_to_migrate_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _schema_1_journal(path)
    with pytest.raises(kira.JournalError) as caught:
        kira.Journal(path, readonly=True)
    message = str(caught.value)
    assert str(path) in message
    assert "schema version 1" in message
    assert "readonly=True" in message
    with closing(sqlite3.connect(path)) as db:  # untouched
        assert db.execute("SELECT value FROM kira_meta").fetchall() == [("1",)]


def test_kira_runs_and_show_migrate_a_schema_1_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _schema_1_journal(path)
    command = [sys.executable, "-m", "kira"]
    runs = subprocess.run(
        [*command, "runs", "--journal", str(path)], capture_output=True, text=True, timeout=60
    )
    assert runs.returncode == 0, runs.stderr
    assert "done" in runs.stdout and "cut" in runs.stdout
    show = subprocess.run(
        [*command, "show", "done", "--journal", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    assert "flaky" in show.stdout  # the recorded error
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM kira_meta").fetchall() == [("2",)]


def test_event_times_come_back_from_the_journal_exactly(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    live: list[kira.Event] = []
    branches = [kira.Branch(f"b{i}", _const(i), [f"b{i - 1}"] if i else []) for i in range(50)]
    kira.run_tasks(None, branches, journal=path, run_id="t", on_event=live.append)
    with kira.Journal(path) as journal:
        stored = journal.events("t")
    assert [(e.kind, e.branch, e.at) for e in stored] == [(e.kind, e.branch, e.at) for e in live]


def test_a_new_journal_records_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "journal.db"  # the folder is created
    kira.Journal(path).close()
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT key, value FROM kira_meta").fetchall()
        assert rows == [("schema_version", "2")]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"kira_meta", "runs", "event_groups"}  # schema 1's `events` is gone


def test_a_locked_journal_gives_a_journal_error_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    kira.Journal(path).close()
    calls = []
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(kira.JournalError) as caught:
            kira.run_tasks(
                None,
                [kira.Branch("a", lambda c, d: calls.append("a"))],
                journal=kira.Journal(path, busy_timeout=0.1),
                run_id="locked",
            )
        assert time.monotonic() - started < 5  # the short busy_timeout was honoured
    finally:
        other.execute("ROLLBACK")
        other.close()
    message = str(caught.value)
    assert "locked" in message
    assert str(path) in message
    assert not isinstance(caught.value, sqlite3.Error)
    assert calls == []  # nothing ran
    # once the lock is gone, the run id is free: nothing was recorded
    assert kira.run_tasks(None, [kira.Branch("a", _const(1))], journal=path, run_id="locked") == {
        "a": 1
    }


def test_a_journal_locked_before_kira_opens_it_gives_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    other = sqlite3.connect(path, isolation_level=None)  # not yet in WAL mode
    try:
        other.execute("BEGIN EXCLUSIVE")
        other.execute("CREATE TABLE kira_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        with pytest.raises(kira.JournalError) as caught:
            kira.Journal(path, busy_timeout=0.1)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "locked" in str(caught.value)
    assert str(path) in str(caught.value)


# -- codecs ------------------------------------------------------------------------------


def test_json_codec_round_trip_of_results(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    values = {
        "int": 42,
        "float": 2.5,
        "str": "héllo ✓",
        "none": None,
        "bool": True,
        "list": [1, [2, "three"]],
        "dict": {"k": {"nested": [1.5, None]}},
    }
    branches = [kira.Branch(name, _const(value)) for name, value in values.items()]
    live = kira.run_tasks(None, branches, journal=path, run_id="json")
    assert live == values  # the live run returns the values themselves

    with kira.Journal(path) as journal:
        recorded = {e.branch: e.value for e in journal.events("json") if e.kind == "applied"}
    restored = kira.resume("json", None, branches, journal=path)
    for got in (recorded, restored):
        assert list(got) == list(values)  # definition order
        for name, value in values.items():
            assert got[name] == value
            assert type(got[name]) is type(value)


@pytest.mark.parametrize(
    "value, kind",
    [((1, "x", (2, 3)), "tuple"), ({1: "one"}, "dict"), ([(1, 2)], "list")],
)
def test_json_refuses_results_it_would_not_give_back_equal(tmp_path: Path, value, kind) -> None:
    # JSON has no tuples (they would come back as lists) and only string keys: a
    # resumed run would then see another value than the one apply returned
    undone: list[Any] = []
    branches = [kira.Branch("v", _const(value), unapply=lambda c, d, v: undone.append(v))]
    with pytest.raises(kira.RolledBack) as caught:
        kira.run_tasks(None, branches, journal=tmp_path / "j.db", run_id="strict")
    error = caught.value.culprit.error
    assert isinstance(error, kira.CodecError)
    assert f"a {kind} would not come back equal" in str(error)
    assert undone == [value]  # applied all the same: unapplied from memory


def test_json_codec_itself() -> None:
    codec = kira.JSONCodec()
    assert codec.loads(codec.dumps({"a": [1, 2]})) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="would not come back equal"):
        codec.dumps({"a": (1, 2)})  # it would come back with a list
    assert codec.loads(codec.dumps("x").encode()) == "x"  # bytes are read too
    with pytest.raises(ValueError):
        codec.dumps(math.nan)  # refused: not JSON
    with pytest.raises(TypeError):
        codec.dumps({1, 2})


@dataclass(frozen=True)
class Point:
    x: int
    y: int


class PointCodec:
    """JSON that also carries `Point`s, stored as bytes."""

    def __init__(self) -> None:
        self.loaded = 0

    @staticmethod
    def _default(value: Any) -> Any:
        if isinstance(value, Point):
            return {"__point__": [value.x, value.y]}
        raise TypeError(f"cannot encode {type(value).__name__}")

    @staticmethod
    def _hook(data: dict[str, Any]) -> Any:
        if set(data) == {"__point__"}:
            return Point(*data["__point__"])
        return data

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, default=self._default).encode()

    def loads(self, data: str | bytes) -> Any:
        self.loaded += 1
        return json.loads(data, object_hook=self._hook)


def test_a_custom_codec(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    branches = [
        kira.Branch("a", _const(Point(1, 2))),
        kira.Branch("b", lambda c, deps: Point(deps["a"].x + 10, deps["a"].y + 20), ["a"]),
        kira.Branch("c", lambda c, deps: {"points": [deps["a"], deps["b"]]}, ["a", "b"]),
    ]
    expected = {"a": Point(1, 2), "b": Point(11, 22), "c": {"points": [Point(1, 2), Point(11, 22)]}}
    journal = kira.Journal(path, codec=PointCodec())
    assert kira.run_tasks(None, branches, journal=journal, run_id="points") == expected
    journal.close()

    codec = PointCodec()
    with kira.Journal(path, codec=codec) as reader:
        applied = {e.branch: e.value for e in reader.events("points") if e.kind == "applied"}
    assert applied == expected
    assert codec.loaded == 3
    with kira.Journal(path, codec=PointCodec()) as again:
        assert kira.resume("points", None, branches, journal=again) == expected
    # the codec decides the stored form: read with the default codec, the raw JSON
    with kira.Journal(path) as plain:
        raw = {e.branch: e.value for e in plain.events("points") if e.kind == "applied"}
    assert raw["a"] == {"__point__": [1, 2]}
    # without the codec, a Point cannot be recorded (see the next test)
    with pytest.raises(kira.RolledBack) as caught:
        kira.run_tasks(None, branches, journal=path, run_id="points-json")
    assert isinstance(caught.value.culprit.error, kira.CodecError)


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(Opaque(), "Opaque"), ({1, 2}, "set"), (math.nan, "float")],
    ids=["object", "set", "nan"],
)
def test_a_result_the_codec_cannot_encode_rolls_back_and_is_unapplied(
    tmp_path: Path, value: Any, type_name: str
) -> None:
    path = tmp_path / "journal.db"
    unapplies: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def unapply(name: str) -> Any:
        def undo(config: Any, deps: Any, got: Any) -> None:
            with lock:
                unapplies.append((name, got))

        return undo

    branches = [
        kira.Branch("a", _const(1), unapply=unapply("a")),
        kira.Branch("b", _const(value), ["a"], unapply=unapply("b")),
        kira.Branch("c", _const(3), ["b"], unapply=unapply("c")),
    ]
    with pytest.raises(kira.RolledBack) as caught:
        kira.run_tasks(None, branches, journal=path, run_id="codec")
    culprit = caught.value.culprit
    assert culprit is not None
    assert (culprit.branch, culprit.phase, culprit.attempt) == ("b", "apply", 1)
    error = culprit.error
    assert isinstance(error, kira.CodecError)
    assert isinstance(error, TypeError)  # what a user would catch for it
    assert isinstance(error, kira.JournalError)
    assert error.branch == "b"
    assert error.type is type(value)
    assert "'b'" in str(error)
    assert type_name in str(error)
    # the apply happened: its real in-memory value was unapplied, before a's unapply
    assert [name for name, _ in unapplies] == ["b", "a"]
    assert unapplies[0][1] is value
    assert unapplies[1][1] == 1
    # the journal knows how the run ended; resuming it returns that outcome
    with pytest.raises(kira.RolledBack) as again:
        kira.resume("codec", None, branches, journal=path)
    restored = again.value.culprit
    assert restored is not None and restored.branch == "b"
    assert isinstance(restored.error, kira.RestoredError)
    assert restored.error.type_name.endswith("CodecError")
    assert type_name in restored.error.message
    assert len(unapplies) == 2  # nothing ran again


class _ComplexCodec:
    """A codec whose `dumps` breaks the protocol: it returns neither str nor bytes."""

    def dumps(self, value: Any) -> Any:
        return complex(value)

    def loads(self, data: Any) -> Any:
        return data


def test_a_codec_that_returns_neither_text_nor_bytes_fails_the_branch(tmp_path: Path) -> None:
    unapplied: list[Any] = []
    branches = [kira.Branch("a", _const(2), unapply=lambda c, d, v: unapplied.append(v))]
    journal = kira.Journal(tmp_path / "journal.db", codec=_ComplexCodec())
    with journal, pytest.raises(kira.RolledBack) as caught:
        kira.run_tasks(None, branches, journal=journal, run_id="odd")
    culprit = caught.value.culprit
    assert culprit is not None and culprit.branch == "a"
    assert isinstance(culprit.error, kira.CodecError)
    assert "_ComplexCodec.dumps returned a complex, not str or bytes" in str(culprit.error)
    assert unapplied == [2]  # kept in memory, unapplied
    with kira.Journal(tmp_path / "journal.db") as journal:
        assert journal.runs()[0].state == "rolled_back"


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words for it")


@pytest.mark.parametrize("runner", ["threads", "asyncio"])
def test_an_error_that_cannot_be_printed_is_recorded_and_rolled_back(
    tmp_path: Path, runner: str
) -> None:
    path = tmp_path / "journal.db"
    unapplied: list[str] = []

    def fails(config: Any, deps: Any) -> None:
        raise _Unprintable()

    branches = [
        kira.Branch("a", _const(1), unapply=lambda c, d, v: unapplied.append("a")),
        kira.Branch("b", fails, ["a"]),
    ]
    with pytest.raises(kira.RolledBack) as caught:
        if runner == "threads":
            kira.run_tasks(None, branches, journal=path, run_id="u")
        else:
            asyncio.run(kira.run_tasks_async(None, branches, journal=path, run_id="u"))
    assert isinstance(caught.value.culprit.error, _Unprintable)  # type: ignore[union-attr]
    assert unapplied == ["a"]
    with kira.Journal(path) as journal:
        failed = [e for e in journal.events("u") if e.kind == "apply_failed"]
        assert journal.runs()[0].state == "rolled_back"
    assert isinstance(failed[0].error, kira.RestoredError)
    assert failed[0].error.type_name.endswith("_Unprintable")
    assert "cannot be shown" in failed[0].error.message and "no words for it" in (
        failed[0].error.message
    )


def test_one_journal_object_leads_one_run_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    inside, gate = threading.Event(), threading.Event()

    def held(config: Any, deps: Any) -> str:
        inside.set()
        assert gate.wait(30)
        return "held"

    with kira.Journal(path) as journal:
        first = threading.Thread(
            target=kira.run_tasks,
            args=(None, [kira.Branch("x", held)]),
            kwargs={"journal": journal, "run_id": "first"},
        )
        first.start()
        try:
            assert inside.wait(30)
            ran: list[str] = []
            other = [kira.Branch("y", lambda c, d: ran.append("y"))]
            with pytest.raises(kira.JournalError) as caught:
                kira.run_tasks(None, other, journal=journal, run_id="second")
            message = str(caught.value)
            assert "in use by run 'first'" in message and "'second'" in message
            assert ran == []
            with pytest.raises(kira.JournalError, match="in use by run 'first'"):
                kira.resume("first", None, [kira.Branch("x", held)], journal=journal)
            # the first run's lease is untouched: still its own
            with closing(sqlite3.connect(path)) as db:
                rows = db.execute("SELECT run_id, owner FROM runs").fetchall()
            assert rows == [("first", journal.owner)]
        finally:
            gate.set()
            first.join(30)
        assert not first.is_alive()
        # once it is done, the same object takes the next run
        assert kira.run_tasks(None, other, journal=journal, run_id="second") == {"y": None}
        assert ran == ["y"]


@pytest.mark.parametrize(
    ("run_id", "error"),
    [("", TypeError), (7, TypeError), (b"r", TypeError), ("\ud800", ValueError)],
    ids=["empty", "int", "bytes", "surrogate"],
)
def test_a_run_id_that_is_not_text_is_refused_before_anything_runs(
    tmp_path: Path, run_id: Any, error: type[Exception]
) -> None:
    ran: list[str] = []
    branches = [kira.Branch("a", lambda c, d: ran.append("a"))]
    with pytest.raises(error, match="run_id"):
        kira.run_tasks(None, branches, journal=tmp_path / "j.db", run_id=run_id)
    with pytest.raises(error, match="run_id"):
        asyncio.run(kira.run_tasks_async(None, branches, run_id=run_id))
    with pytest.raises(error, match="run_id"):
        kira.resume(run_id, None, branches, journal=tmp_path / "j.db")
    assert ran == []


_OPENER = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
import kira
go, path, _, name = sys.argv[1:5]
open(go + "." + name, "w").close()  # at the start line
while not os.path.exists(go):
    time.sleep(0.001)
print(kira.run_tasks(None, [kira.Branch("a", lambda c, d: name)], journal=path, run_id=name))
"""


@pytest.mark.parametrize("start", ["new", "schema-1"])
def test_processes_opening_one_journal_at_once_all_succeed(tmp_path: Path, start: str) -> None:
    """The first to open a journal migrates it, the others find it migrated: each
    process looks at the version again once it holds the write lock."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    script = tmp_path / "opener.py"
    script.write_text(_OPENER, encoding="utf-8")
    for round_ in range(5):
        path, go = tmp_path / f"j{round_}.db", tmp_path / f"go{round_}"
        if start == "schema-1":
            _schema_1_journal(path)
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(go), str(path), src, f"r{i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(5)
        ]
        deadline = time.monotonic() + 60
        while not all(Path(f"{go}.r{i}").exists() for i in range(5)):
            assert time.monotonic() < deadline, "the processes never reached the start line"
            time.sleep(0.005)
        go.touch()  # all at once
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.strip() == repr({"a": f"r{i}"})
        with kira.Journal(path) as journal:
            ids = {r.run_id for r in journal.runs()}
        assert {f"r{i}" for i in range(5)} <= ids


# -- never unpickle ----------------------------------------------------------------------


class _Booby:
    """Unpickling this creates the file `path`: proof that pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _journal_with_pickled_value(tmp_path: Path) -> tuple[Path, Path, list[kira.Branch]]:
    path = tmp_path / "journal.db"
    marker = tmp_path / "pickle-was-loaded"
    branches = [kira.Branch("a", _const(1)), kira.Branch("b", _const(2), ["a"])]
    kira.run_tasks(None, branches, journal=path, run_id="p")
    # a's result replaced by pickled bytes, stored as a bytes-producing codec would
    pickled = {"base64": base64.b64encode(pickle.dumps(_Booby(marker))).decode()}
    with closing(sqlite3.connect(path)) as db, db:
        groups = db.execute("SELECT first_seq, events FROM event_groups WHERE run_id='p'")
        for first_seq, text in groups.fetchall():
            events = json.loads(text)
            for event in events:
                if event[1] == "applied" and event[2] == "a":
                    event[6] = pickled
            db.execute(
                "UPDATE event_groups SET events=? WHERE run_id='p' AND first_seq=?",
                (json.dumps(events), first_seq),
            )
    with kira.Journal(path, codec=BytesCodec()) as journal:  # the bytes really are there
        applied = [e.value for e in journal.events("p") if e.kind == "applied"]
    assert applied[0] == pickle.dumps(_Booby(marker))
    assert not marker.exists()
    return path, marker, branches


class BytesCodec:
    """Gives the stored bytes back as they are."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: str | bytes) -> Any:
        return data


def test_a_pickled_value_is_never_unpickled(tmp_path: Path) -> None:
    path, marker, branches = _journal_with_pickled_value(tmp_path)
    with kira.Journal(path) as journal, pytest.raises(kira.JournalError):
        journal.events("p")  # the JSON codec refuses the bytes; nothing is unpickled
    with pytest.raises(kira.JournalError):
        kira.resume("p", None, branches, journal=path)
    assert not marker.exists()
    with pytest.raises(ValueError):
        kira.JSONCodec().loads(pickle.dumps(_Booby(marker)))
    assert not marker.exists()


def test_a_value_the_codec_cannot_decode_gives_a_clear_journal_error(tmp_path: Path) -> None:
    path, marker, branches = _journal_with_pickled_value(tmp_path)
    with kira.Journal(path) as journal, pytest.raises(kira.JournalError) as caught:
        journal.events("p")
    assert str(path) in str(caught.value)
    assert "'a'" in str(caught.value)  # names the branch whose value is unreadable
    with pytest.raises(kira.JournalError):
        kira.resume("p", None, branches, journal=path)
    assert not marker.exists()


def _rewrite_event(db: sqlite3.Connection, position: int, change: Any) -> None:
    """Replace the `position`-th event of run "d" with `change(event)`."""
    rows = db.execute("SELECT first_seq, events FROM event_groups ORDER BY first_seq").fetchall()
    seen = 0
    for first, text in rows:
        events = json.loads(text)
        if seen + len(events) > position:
            events[position - seen] = change(events[position - seen])
            db.execute(
                "UPDATE event_groups SET events=? WHERE first_seq=?", (json.dumps(events), first)
            )
            return
        seen += len(events)
    raise AssertionError(f"no event {position}")


def _first_group(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT MIN(first_seq) FROM event_groups").fetchone()[0])


_DAMAGES: dict[str, Any] = {
    "events-not-json": lambda db: db.execute(
        "UPDATE event_groups SET events='[[1, \"apply_sta' WHERE first_seq=?", (_first_group(db),)
    ),
    "events-not-a-list": lambda db: db.execute(
        "UPDATE event_groups SET events='{}' WHERE first_seq=?", (_first_group(db),)
    ),
    "group-too-short": lambda db: db.execute(
        "UPDATE event_groups SET events='[]' WHERE first_seq=?", (_first_group(db),)
    ),
    "a-group-deleted": lambda db: db.execute(
        "DELETE FROM event_groups WHERE first_seq=(SELECT MIN(first_seq) FROM event_groups "
        "WHERE first_seq > 1)"
    ),
    "event-too-short": lambda db: _rewrite_event(db, 1, lambda e: e[:3]),
    "unknown-kind": lambda db: _rewrite_event(db, 1, lambda e: [e[0], "exploded", *e[2:]]),
    "time-not-a-number": lambda db: _rewrite_event(db, 1, lambda e: [*e[:3], "noon", *e[4:]]),
    "error-not-a-record": lambda db: _rewrite_event(db, 1, lambda e: [*e[:5], [1, 2], e[6]]),
    "unknown-branch": lambda db: _rewrite_event(db, 0, lambda e: [*e[:2], "zzz", *e[3:]]),
    "intent-without-names": lambda db: db.execute(
        "UPDATE event_groups SET events=json_set(events, '$[0][1]', 'apply_intent', "
        "'$[0][6]', 5) WHERE first_seq=1"
    ),
    "graph-not-json": lambda db: db.execute("UPDATE runs SET graph='[[\"a\", '"),
    "graph-of-numbers": lambda db: db.execute("UPDATE runs SET graph='[[1, []]]'"),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGES))
def test_a_damaged_record_of_a_run_gives_a_journal_error_and_runs_nothing(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "journal.db"
    calls: list[str] = []

    def step(name: str) -> kira.Branch:
        deps = [chr(ord(name) - 1)] if name != "a" else []
        return kira.Branch(name, lambda c, d: calls.append(name) or name, deps)

    branches = [step(name) for name in "abc"]
    kira.run_tasks(None, branches, journal=path, run_id="d")
    calls.clear()
    with closing(sqlite3.connect(path)) as db, db:
        assert db.execute("SELECT COUNT(*) FROM event_groups").fetchone()[0] >= 3
        _DAMAGES[damage](db)
    with kira.Journal(path) as journal, pytest.raises(kira.JournalError) as caught:
        journal.events("d")
    assert str(path) in str(caught.value) and "'d' is damaged" in str(caught.value)
    assert not isinstance(caught.value, ValueError | TypeError)
    with pytest.raises(kira.JournalError, match="damaged"):
        kira.resume("d", None, branches, journal=path)
    assert calls == []


def test_events_that_do_not_replay_give_a_journal_error_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    calls: list[str] = []
    branches = [kira.Branch("a", lambda c, d: calls.append("a") or 1)]
    kira.run_tasks(None, branches, journal=path, run_id="d")
    calls.clear()
    with closing(sqlite3.connect(path)) as db, db:
        kinds = [
            e[1]
            for e in json.loads(
                db.execute("SELECT events FROM event_groups ORDER BY first_seq").fetchone()[0]
            )
        ]
        # an unapply finished where the apply started: a transition the rules forbid
        _rewrite_event(db, kinds.index("apply_started"), lambda e: [e[0], "unapplied", *e[2:]])
    with pytest.raises(kira.JournalError, match="do not replay") as caught:
        kira.resume("d", None, branches, journal=path)
    assert str(path) in str(caught.value)
    assert calls == []


# -- runs -----------------------------------------------------------------------------------


def test_a_run_id_cannot_be_reused_in_the_same_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    calls = []
    branches = [kira.Branch("a", lambda c, d: calls.append("a") or 1)]
    assert kira.run_tasks(None, branches, journal=path, run_id="once") == {"a": 1}
    with kira.Journal(path) as journal:
        before = journal.events("once")
    with pytest.raises(kira.JournalError) as caught:
        kira.run_tasks(None, branches, journal=path, run_id="once")
    assert "'once'" in str(caught.value)
    assert "kira.resume" in str(caught.value)
    assert calls == ["a"]  # the second run did not run anything
    with kira.Journal(path) as journal:
        assert journal.events("once") == before
        assert [r.run_id for r in journal.runs()] == ["once"]
    # another journal object on the same file refuses it too
    with pytest.raises(kira.JournalError, match=r"kira\.resume"):
        kira.run_tasks(None, branches, journal=kira.Journal(path), run_id="once")


def test_a_run_without_run_id_gets_a_fresh_one(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    seen = []
    branches = [kira.Branch("a", lambda c, d: seen.append(kira.current_attempt().run_id))]
    kira.run_tasks(None, branches, journal=path)
    kira.run_tasks(None, branches, journal=path)
    with kira.Journal(path) as journal:
        ids = [r.run_id for r in journal.runs()]
    assert sorted(ids) == sorted(seen)
    assert len(set(ids)) == 2


def test_journal_runs_lists_runs_with_state_applied_and_total(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    ok = [kira.Branch("a", _const(1)), kira.Branch("b", _const(2), ["a"])]
    kira.run_tasks(None, ok, journal=kira.Journal(path, flow="flows/ok.py"), run_id="ok")
    failing = [
        kira.Branch("a", _const(1), unapply=lambda c, d, v: None),
        kira.Branch("b", _const(2), unapply=lambda c, d, v: None),
        kira.Branch("z", cb.fail, ["a", "b"]),
    ]
    with pytest.raises(kira.RolledBack):
        kira.run_tasks(None, failing, journal=path, run_id="rb")
    # a run whose process died after committing its 4th event: a applied, b and c started
    flow = write_flow(tmp_path)
    proc = run_flow(flow, path, tmp_path / "ledger.db", "success", crash_at=4)
    assert proc.returncode == KILLED, proc.stderr

    with kira.Journal(path) as journal:
        runs = journal.runs()
    assert [(r.run_id, r.flow, r.state, r.applied, r.total) for r in runs] == [
        ("ok", "flows/ok.py", "applied", 2, 2),
        ("rb", None, "rolled_back", 2, 3),  # applied: how many applied during the run
        (RUN_ID, None, "running", 1, 6),
    ]
    assert all(isinstance(r, kira.RunSummary) for r in runs)
    assert all(isinstance(r.started, datetime) and r.started.tzinfo for r in runs)
    assert runs[0].started <= runs[1].started <= runs[2].started  # oldest first


def test_journal_events_returns_the_events_in_order_with_decoded_results(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"

    def flaky(config: Any, deps: Any) -> Any:
        if kira.current_attempt().attempt == 1:
            raise ValueError("first try")
        return {"k": [1, 2], "t": [3, 4]}

    def broken(config: Any, deps: Any) -> Any:
        raise KeyError("no such key")

    branches = [
        kira.Branch("a", flaky, unapply=lambda c, d, v: None, on_apply_error=lambda *a: True),
        kira.Branch("b", broken, ["a"]),
    ]
    with pytest.raises(kira.RolledBack):
        kira.run_tasks(None, branches, journal=path, run_id="ev")
    with kira.Journal(path) as journal:
        events = journal.events("ev")
    assert [(e.kind, e.branch, e.attempt) for e in events] == [
        ("apply_started", "a", 1),
        ("apply_failed", "a", 1),
        ("retry_scheduled", "a", 2),
        ("apply_started", "a", 2),
        ("applied", "a", 2),
        ("apply_started", "b", 1),
        ("apply_failed", "b", 1),
        ("failed", "b", 1),
        ("rollback_started", "b", None),
        ("unapply_started", "a", 1),
        ("unapplied", "a", 1),
        ("run_finished", None, None),
    ]
    assert all(isinstance(e, kira.Event) and e.run_id == "ev" for e in events)
    times = [e.at for e in events]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    by_kind = {(e.kind, e.branch): e for e in events}
    assert by_kind["applied", "a"].value == {"k": [1, 2], "t": [3, 4]}  # decoded
    assert by_kind["retry_scheduled", "a"].value == 0
    assert by_kind["failed", "b"].value == "apply"
    assert by_kind["rollback_started", "b"].value == "failure"
    assert by_kind["run_finished", None].value == "rolled_back"
    # errors come back as RestoredError: the type's name, the message, the traceback
    first = by_kind["apply_failed", "a"].error
    assert isinstance(first, kira.RestoredError)
    assert first.type_name == "builtins.ValueError"
    assert first.message == "first try"
    assert str(first) == "builtins.ValueError: first try"
    assert "flaky" in first.traceback and "ValueError" in first.traceback
    second = by_kind["apply_failed", "b"].error
    assert isinstance(second, kira.RestoredError)
    assert second.type_name == "builtins.KeyError"
    assert "no such key" in second.message
    culprit = by_kind["rollback_started", "b"].error
    assert isinstance(culprit, kira.RestoredError)
    assert culprit.type_name == "builtins.KeyError"
    assert by_kind["applied", "a"].error is None


def test_journal_events_of_an_unknown_run(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with kira.Journal(path) as journal, pytest.raises(kira.JournalError, match="'nope'"):
        journal.events("nope")


# -- current_attempt ---------------------------------------------------------------------


def test_current_attempt_in_apply_unapply_and_error_handlers(tmp_path: Path) -> None:
    seen: list[tuple[str, Any]] = []

    def note(where: str) -> None:
        seen.append((where, kira.current_attempt()))

    def apply(config: Any, deps: Any) -> int:
        note("apply")
        if kira.current_attempt().attempt == 1:
            raise ValueError("apply once")
        return 1

    def unapply(config: Any, deps: Any, value: Any) -> None:
        note("unapply")
        if kira.current_attempt().attempt == 1:
            raise ValueError("unapply once")

    def on_apply_error(config: Any, deps: Any, error: Any, attempt: int) -> bool:
        note("on_apply_error")
        return True

    def on_unapply_error(config: Any, deps: Any, error: Any, attempt: int) -> bool:
        note("on_unapply_error")
        return True

    def fail(config: Any, deps: Any) -> None:
        note("fail")
        raise LookupError("fails")

    events_seen = []
    branches = [
        kira.Branch(
            "a",
            apply,
            unapply=unapply,
            on_apply_error=on_apply_error,
            on_unapply_error=on_unapply_error,
        ),
        kira.Branch("z", fail, ["a"]),
    ]
    assert kira.current_attempt() is None
    with pytest.raises(kira.RolledBack):
        kira.run_tasks(
            None,
            branches,
            journal=tmp_path / "journal.db",
            run_id="R",
            on_event=lambda e: events_seen.append(kira.current_attempt()),
        )
    assert kira.current_attempt() is None
    assert [(where, tuple(info)) for where, info in seen] == [
        ("apply", ("R", "a", "apply", 1)),
        ("on_apply_error", ("R", "a", "apply", 1)),  # the attempt that failed
        ("apply", ("R", "a", "apply", 2)),
        ("fail", ("R", "z", "apply", 1)),
        ("unapply", ("R", "a", "unapply", 1)),
        ("on_unapply_error", ("R", "a", "unapply", 1)),
        ("unapply", ("R", "a", "unapply", 2)),
    ]
    info = seen[0][1]
    assert isinstance(info, kira.AttemptInfo)
    assert (info.run_id, info.branch, info.phase, info.attempt) == ("R", "a", "apply", 1)
    assert info.key == "R/a/apply/1"
    assert len({i.key for w, i in seen if w in ("apply", "unapply", "fail")}) == 5
    assert events_seen and set(events_seen) == {None}  # on_event is not a callback attempt


def _async_branches(seen: list[tuple[str, Any]]) -> list[kira.Branch]:
    async def apply(config: Any, deps: Any) -> int:
        await asyncio.sleep(0)
        seen.append(("apply", kira.current_attempt()))
        if kira.current_attempt().attempt == 1:
            raise ValueError("apply once")
        return 1

    async def on_apply_error(config: Any, deps: Any, error: Any, attempt: int) -> bool:
        await asyncio.sleep(0)
        seen.append(("on_apply_error", kira.current_attempt()))
        return True

    async def unapply(config: Any, deps: Any, value: Any) -> None:
        await asyncio.sleep(0)
        seen.append(("unapply", kira.current_attempt()))

    async def fail(config: Any, deps: Any) -> None:
        await asyncio.sleep(0)
        raise LookupError("fails")

    return [
        kira.Branch("a", apply, unapply=unapply, on_apply_error=on_apply_error),
        kira.Branch("z", fail, ["a"]),
    ]


@pytest.mark.parametrize("runner", ["run_tasks+journal", "run_tasks_async"])
def test_current_attempt_in_async_callbacks(tmp_path: Path, runner: str) -> None:
    seen: list[tuple[str, Any]] = []
    branches = _async_branches(seen)
    with pytest.raises(kira.RolledBack):
        if runner == "run_tasks_async":
            asyncio.run(kira.run_tasks_async(None, branches, run_id="A"))
        else:
            kira.run_tasks(None, branches, journal=tmp_path / "journal.db", run_id="A")
    assert [(where, tuple(info)) for where, info in seen] == [
        ("apply", ("A", "a", "apply", 1)),
        ("on_apply_error", ("A", "a", "apply", 1)),
        ("apply", ("A", "a", "apply", 2)),
        ("unapply", ("A", "a", "unapply", 1)),
    ]
    assert kira.current_attempt() is None


@pytest.mark.timeout(120)
def test_current_attempt_on_a_process_pool(tmp_path: Path) -> None:
    unapplies = tmp_path / "unapplies.jsonl"
    handler_saw = []

    def retry(config: Any, deps: Any, error: Any, attempt: int) -> bool:
        handler_saw.append(kira.current_attempt())  # handlers run in this process
        return True

    branches = [
        kira.Branch("x", cb.attempt_info, unapply=cb.record_unapply),
        kira.Branch("y", cb.fail_first_attempt, unapply=cb.record_unapply, on_apply_error=retry),
        kira.Branch("z", cb.fail, ["x", "y"]),
    ]
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(2, mp_context=context) as pool,
        pytest.raises(kira.RolledBack) as caught,
    ):
        kira.run_tasks(
            str(unapplies), branches, executor=pool, journal=tmp_path / "j.db", run_id="P"
        )
    me = os.getpid()
    results = caught.value.results
    assert results["x"][:5] == ["P", "x", "apply", 1, "P/x/apply/1"]
    assert results["y"][:5] == ["P", "y", "apply", 2, "P/y/apply/2"]
    assert results["x"][5] != me and results["y"][5] != me  # ran in a worker
    assert [tuple(info) for info in handler_saw] == [("P", "y", "apply", 1)]
    lines = sorted(json.loads(line) for line in unapplies.read_text().splitlines())
    assert [line[:5] for line in lines] == [
        ["P", "x", "unapply", 1, "P/x/unapply/1"],
        ["P", "y", "unapply", 1, "P/y/unapply/1"],
    ]
    assert all(line[5] != me for line in lines)
    # the results were recorded as the codec gave them back
    with kira.Journal(tmp_path / "j.db") as journal:
        applied = {e.branch: e.value for e in journal.events("P") if e.kind == "applied"}
    assert applied == {"x": results["x"], "y": results["y"]}
