"""The journal: a run's transitions, recorded durably in SQLite, and replayed.

Every event a run emits is recorded; results are stored with a codec (JSON by
default, never pickle). The runner commits the events before it acts on them
(before calling a callback, before starting a dependent), one transaction for
everything recorded since the last one (group commit), written by a thread of its
own. A group is one row of `event_groups`, its events one JSON array: a row per
event cost SQLite, and the GIL while its columns were bound, several times more.
Intent records, committed ahead of time, let a branch start without a commit of
its own (`record_intents`). `resume` replays the events through the state
machine's own transitions, so a restored state obeys every rule a live one does.

All sqlite3 errors are translated here, at the boundary, into `JournalError`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, final

from ._branch import Branch
from ._errors import KiraError
from ._events import EVENT_KINDS, Event

SCHEMA_VERSION = 2
LEASE_SECONDS = 30.0


class JournalError(KiraError):
    """The journal cannot be used: damaged, locked, from a newer kira, or it does not
    hold what was asked. Raised by `run_tasks(journal=...)`, `resume` and the
    journal's methods; the message says what to do."""


@final
class RunLocked(JournalError):
    """Run `.run_id` is owned by another live process (`.owner`) until its lease ends.

    Wait for that process, or stop it: a dead owner's lease is taken over.
    """

    def __init__(self, run_id: str, owner: str, until: float) -> None:
        left = max(0.0, until - time.time())
        host, _, rest = owner.partition(":")
        this = host == socket.gethostname() and rest.partition(":")[0] == str(os.getpid())
        who = "another kira.Journal of this process" if this else "another process"
        super().__init__(
            f"run {run_id!r} is being run by {who} ({owner}); "
            f"its lease ends in {left:.0f} s unless renewed"
        )
        self.run_id = run_id
        self.owner = owner


@final
class CodecError(JournalError, TypeError):
    """A branch's result cannot be encoded by the journal's codec.

    The run treats it as a failure of that branch: the value is kept in memory and
    unapplied during the rollback. Return encodable values, or give the `Journal` a
    codec that handles them.
    """

    def __init__(self, branch: str, value: Any, cause: BaseException) -> None:
        super().__init__(
            f"the result of branch {branch!r} (a {type(value).__name__}) cannot be "
            f"recorded in the journal: {_message(cause)}"
        )
        self.branch = branch
        self.type = type(value)


@final
class RestoredError(Exception):
    """An error read back from the journal: the original's type name, message and
    traceback text (exceptions are not pickled)."""

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback_text


class Codec(Protocol):
    """Encodes results for the journal: `dumps(value) -> str | bytes`, `loads(data)`."""

    def dumps(self, value: Any) -> str | bytes:
        """Encode `value`; raise (any exception) if it cannot be recorded faithfully."""
        ...

    def loads(self, data: str | bytes) -> Any:
        """Decode what `dumps` returned."""
        ...


_EXACT = frozenset({str, int, float, bool, type(None)})  # JSON gives these back as they were


@final
class JSONCodec:
    """The default codec: JSON.

    It refuses (raises) what JSON would not give back equal, rather than change a
    result behind the caller's back: a tuple (it would come back a list), a dict
    with keys that are not strings, NaN, sets, objects. Return JSON-shaped values,
    or give the `Journal` a codec of your own.
    """

    def __init__(self) -> None:
        self._encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode

    def dumps(self, value: Any) -> str:
        """JSON text for `value`; ValueError/TypeError if JSON cannot keep it equal."""
        if type(value) is int:  # the commonest result, and JSON's text is its repr
            return int.__repr__(value)
        text = self._encode(value)
        if type(value) not in _EXACT and json.loads(text) != value:
            raise ValueError(
                f"a {type(value).__name__} would not come back equal from JSON "
                "(tuples become lists, keys become strings)"
            )
        return text

    def loads(self, data: str | bytes) -> Any:
        """The value back from JSON text (str or UTF-8 bytes)."""
        return json.loads(data)


@final
@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run in a journal (see `Journal.runs`)."""

    run_id: str
    flow: str | None
    started: datetime
    state: str
    applied: int
    total: int


@dataclass(slots=True)
class _RunRecord:
    run_id: str
    flow: str | None
    graph: list[tuple[str, tuple[str, ...]]]
    state: str
    events: list[Event]


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    # kira writes every time with its offset; one without is taken as UTC, never
    # as the reader's local time
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _is_zombie(pid: int) -> bool:
    """Whether `pid` has died but not been reaped by its parent (Linux's /proc; a
    killed child whose parent never waits for it still answers signal 0)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state follows the command name, which is in parentheses and may hold any
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def _error_record(error: BaseException) -> dict[str, str]:
    """What the journal keeps of an exception: type, message, traceback text."""
    if isinstance(error, RestoredError):
        return {"type": error.type_name, "message": error.message, "traceback": error.traceback}
    kind = type(error)
    try:
        text = "".join(traceback.format_exception(error))[-8000:]
    except Exception:
        text = ""
    return {
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "message": _message(error),
        "traceback": text,
    }


def _message(error: BaseException) -> str:
    """`str(error)`, or what stands for it when its `__str__` raises."""
    try:
        return str(error)
    except Exception as exc:
        return f"<the message of this {type(error).__name__} cannot be shown: {exc!r}>"


def _restore_error(record: dict[str, str] | None) -> BaseException | None:
    if record is None:
        return None
    return RestoredError(record["type"], record["message"], record.get("traceback", ""))


_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS kira_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    flow TEXT,
    graph TEXT NOT NULL,
    total INTEGER NOT NULL,
    state TEXT NOT NULL,
    applied INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    owner TEXT,
    lease_until REAL
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    branch TEXT,
    at TEXT NOT NULL,
    attempt INTEGER,
    error TEXT,
    value,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
"""

# Schema 2: a group commit is one row, its events a JSON array of
# [seq, kind, branch, at (POSIX seconds), attempt, error, value], where error is
# {"type", "message", "traceback"} or null, and value is, for `applied`, the
# codec's text (or {"base64": ...} for its bytes), for the kinds below a plain
# JSON value, else null. `applied` counts the group's `applied` events.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS event_groups (
    run_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    events TEXT NOT NULL,
    PRIMARY KEY (run_id, first_seq)
) WITHOUT ROWID;
"""

# events whose `value` is a small plain value worth keeping (a delay, a phase, a reason)
_META_VALUED = frozenset(
    {
        "apply_failed",
        "unapply_failed",
        "retry_scheduled",
        "failed",
        "rollback_started",
        "run_finished",
    }
)

# Journal-only records, not events: "branch may start next" (written ahead, so that
# a start needs no commit of its own) and "it will not, after all" (at a rollback).
INTENT, WITHDRAWN = "apply_intent", "apply_withdrawn"
_INTERNAL = frozenset({INTENT, WITHDRAWN})
_KINDS = frozenset(EVENT_KINDS) | _INTERNAL
# decisions a resume must not make otherwise: committed even when no command waits
_URGENT = frozenset({"failed", "rollback_started"})
_GROUP_LIMIT = 1000  # events per group row when migrating (reads stay incremental)

_kind_of = itemgetter(1)
# our own plain values only: no NaN, no cycles to look for
_compact_json = json.JSONEncoder(
    allow_nan=False, check_circular=False, separators=(",", ":")
).encode


def _insert_group(db: sqlite3.Connection, run_id: str, events: Sequence[Sequence[Any]]) -> None:
    """One statement: the events (in their stored form, in order) as one group."""
    db.execute(
        "INSERT INTO event_groups VALUES (?, ?, ?, ?, ?)",
        (
            run_id,
            events[0][0],
            events[-1][0],
            list(map(_kind_of, events)).count("applied"),
            _compact_json(events),
        ),
    )


def _migrate_to_v2(db: sqlite3.Connection) -> None:
    """Schema 1 kept a row per event (`events`): regroup them, then drop it."""
    db.execute(_SCHEMA_V2)
    runs = [r[0] for r in db.execute("SELECT DISTINCT run_id FROM events ORDER BY run_id")]
    for run_id in runs:
        events = []
        for seq, kind, branch, at, attempt, error, value in db.execute(
            "SELECT seq, kind, branch, at, attempt, error, value FROM events "
            "WHERE run_id=? ORDER BY seq",
            (run_id,),
        ):
            if kind == "applied":
                stored = _stored_result(value)
            elif value is not None and (kind in _META_VALUED or kind in _INTERNAL):
                stored = json.loads(value)
            else:
                stored = None
            record = json.loads(error) if error is not None else None
            events.append((seq, kind, branch, _utc(at).timestamp(), attempt, record, stored))
        for start in range(0, len(events), _GROUP_LIMIT):
            _insert_group(db, run_id, events[start : start + _GROUP_LIMIT])
    db.execute("DROP TABLE events")


def _stored_result(encoded: str | bytes | None) -> Any:
    """A codec's output as it goes into a group's JSON."""
    if isinstance(encoded, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(encoded).decode("ascii")}
    return encoded


# version -> what migrates from the version before it: SQL, or a function of the
# connection (within the migration's transaction)
_MIGRATIONS: dict[int, str | Callable[[sqlite3.Connection], None]] = {
    1: _SCHEMA_V1,
    2: _migrate_to_v2,
}


@final
class Journal:
    """A SQLite journal of runs, for `run_tasks(journal=...)` and `resume`.

    Args:
        path: the database file (created, with its folder, if missing).
        codec: encodes results (default `JSONCodec`; see `Codec`).
        durable: True (default) fsyncs each group commit (survives power loss);
            False keeps WAL's NORMAL sync (survives a crash of the process, not of
            the machine), for about a hundred times cheaper commits.
        flow: a label stored with the runs started through this object (the CLI
            stores the flow's path).
        busy_timeout: seconds to wait for a lock held by another process.
        readonly: only read (`runs`, `events`, `graph`); works on a file this
            process may not write.

    Raises:
        JournalError: the file is not a kira journal, is damaged or locked, or was
            written by a newer kira.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: Codec | None = None,
        durable: bool = True,
        flow: str | None = None,
        busy_timeout: float = 5.0,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.codec: Codec = codec if codec is not None else JSONCodec()
        self.durable = durable
        self.flow = flow
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # run id -> its events since the last `take`, as they go into a group
        self._pending: dict[str, list[list[Any]]] = {}
        self.urgent = False  # whether a pending event should be committed at once
        self._seq: dict[str, int] = {}
        self._run_id: str | None = None  # the run this object leads now (its lease)
        crash = os.environ.get("KIRA_TEST_CRASH_AT")
        self._crash_at = int(crash) if crash else 0  # test hook: SIGKILL after event n
        self._recorded = 0
        # one transaction at a time: runners commit from a writer thread
        self._lock = threading.RLock()
        with self._errors("open"):
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            if readonly:
                self._db = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                self._check_version()
                return
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._wal(busy_timeout)
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._migrate()

    # -- plumbing ----------------------------------------------------------------------

    def _wal(self, busy_timeout: float) -> None:
        """Switch to WAL. Switching needs the file to itself, and SQLite answers
        "locked" at once, without its busy handler, to a process that asks while
        another is switching too: so ask again, for up to `busy_timeout`."""
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise JournalError(
                    f"journal {self.path} is locked by another process ({doing}): {text}; "
                    "try again when it is done"
                ) from exc
            raise JournalError(f"journal {self.path}: cannot {doing}: {text}") from exc
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"journal {self.path} is not a kira journal or is damaged ({doing}): {exc}"
            ) from exc

    def _check_version(self) -> None:
        """For a read-only journal: refuse what is not a journal, or one of another
        schema version (an older one is migrated by opening it writable)."""
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='kira_meta'"
        ).fetchone()
        if row is None:
            raise JournalError(f"{self.path} is not a kira journal")
        version = self._stored_version()
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, newer than this kira "
                f"supports ({SCHEMA_VERSION}): upgrade kira to read it"
            )
        if version < SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, from an older kira: "
                "open it once without readonly=True (any kira command that writes it "
                "does) to migrate it, then read it"
            )

    def _stored_version(self) -> int:
        """The schema version kira_meta records (0 before the first migration)."""
        db = self._db
        if not db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='kira_meta'"
        ).fetchone():
            return 0
        row = db.execute("SELECT value FROM kira_meta WHERE key='schema_version'").fetchone()
        if row is None:
            return 0
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise JournalError(
                f"journal {self.path} is damaged: its schema version is {row[0]!r}, not a number"
            ) from None

    def _version_to_migrate(self) -> int:
        """The schema version of this journal (0: a new file), or JournalError when it
        is another application's database or from a newer kira."""
        db = self._db
        has_meta = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='kira_meta'"
        ).fetchone()
        if not has_meta:
            others = db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
            if others:
                raise JournalError(
                    f"{self.path} is an SQLite database but not a kira journal "
                    f"(it has tables {', '.join(r[0] for r in others)})"
                )
            return 0
        version = self._stored_version()
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, newer than this kira "
                f"supports ({SCHEMA_VERSION}): upgrade kira to read it"
            )
        return version

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN")  # one snapshot for the look: the tables, then the version
        try:
            current = self._version_to_migrate() == SCHEMA_VERSION
        finally:
            db.execute("ROLLBACK")
        if current:
            return  # the common case, without taking the write lock
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Looked at again under the write lock, in one transaction: another
                # process may have created or migrated the journal meanwhile.
                version = self._version_to_migrate()
                if version == SCHEMA_VERSION:
                    db.execute("COMMIT")
                    return
                version += 1
                migration = _MIGRATIONS[version]
                if callable(migration):
                    migration(db)
                else:
                    # statement by statement: executescript would commit what is pending
                    for statement in migration.split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute(
                    "INSERT OR REPLACE INTO kira_meta(key, value) VALUES ('schema_version', ?)",
                    (str(version),),
                )
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, ValueError | TypeError | KeyError | IndexError):
                    # a damaged record in the old schema: nothing was changed
                    raise JournalError(
                        f"journal {self.path} cannot be migrated to schema version "
                        f"{version}: a record in it is damaged ({exc}); it was left as it was"
                    ) from exc
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(doing):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- runs --------------------------------------------------------------------------

    def begin_run(self, run_id: str, branches: Sequence[Branch]) -> None:
        """Record a new run and take ownership of it."""
        self._check_free(run_id)
        graph = _compact_json([(b.name, b.dependencies) for b in branches])
        now = datetime.now(UTC).isoformat()
        with self._transaction("start a run") as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise JournalError(
                    f"run {run_id!r} is already in journal {self.path}: use kira.resume "
                    "to carry it on, or choose another run_id"
                )
            db.execute(
                "INSERT INTO runs(run_id, flow, graph, total, state, applied, created_at, "
                "updated_at, owner, lease_until) VALUES (?, ?, ?, ?, 'running', 0, ?, ?, ?, ?)",
                (
                    run_id,
                    self.flow,
                    graph,
                    len(branches),
                    now,
                    now,
                    self.owner,
                    time.time() + LEASE_SECONDS,
                ),
            )
        self._run_id = run_id
        self._seq[run_id] = 0

    def acquire(self, run_id: str) -> _RunRecord:
        """Take ownership of an unfinished run (for `resume`) and load it.

        Raises:
            RunLocked: another live process owns it.
            JournalError: no such run, or this object leads another run now.
        """
        self._check_free(run_id)
        with self._transaction("take over a run") as db:
            row = db.execute(
                "SELECT owner, lease_until, state FROM runs WHERE run_id=?", (run_id,)
            ).fetchone()
            if row is None:
                raise JournalError(f"journal {self.path} holds no run {run_id!r}")
            owner, until, state = row
            # (this very object's own lease: left by a run of it that could not
            # release it, and free, since this object leads no run now)
            mine = owner == self.owner
            if state == "running" and owner and not mine and not self._owner_is_gone(owner, until):
                raise RunLocked(run_id, owner, until or 0.0)
            if state == "running":
                db.execute(
                    "UPDATE runs SET owner=?, lease_until=? WHERE run_id=?",
                    (self.owner, time.time() + LEASE_SECONDS, run_id),
                )
        record = self.load(run_id)
        if record.state == "running":
            self._run_id = run_id
            self._seq[run_id] = max((e_seq for e_seq in self._event_seqs(run_id)), default=0)
        return record

    def _check_free(self, run_id: str) -> None:
        # One run at a time: its buffered events, its commits and its lease are the
        # object's; two runs interleaving them could commit one's events in the
        # other's group, out of step with what each waits for.
        if self._run_id is not None:
            raise JournalError(
                f"this kira.Journal of {self.path} is in use by run {self._run_id!r}, which "
                f"has not finished: to run {run_id!r} at the same time, give it a Journal of "
                "its own (kira.Journal(path) again, or journal=path)"
            )

    @staticmethod
    def _owner_is_gone(owner: str, until: float | None) -> bool:
        if until is None or until < time.time():
            return True
        host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        if host == socket.gethostname() and pid_text.isdigit():
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return _is_zombie(int(pid_text))
        return False

    def _event_seqs(self, run_id: str) -> Iterable[int]:
        row = self._db.execute(
            "SELECT MAX(last_seq) FROM event_groups WHERE run_id=?", (run_id,)
        ).fetchone()
        return [row[0]] if row and row[0] is not None else []

    def renew(self, run_id: str) -> None:
        """Extend this process's lease on `run_id` (the run it leads)."""
        if run_id != self._run_id:
            return
        with self._transaction("renew the run's lease") as db:
            db.execute(
                "UPDATE runs SET lease_until=?, updated_at=? WHERE run_id=? AND owner=?",
                (time.time() + LEASE_SECONDS, datetime.now(UTC).isoformat(), run_id, self.owner),
            )

    def release(self, run_id: str) -> None:
        """Give up ownership of `run_id` (it finished, or the process stops)."""
        if run_id != self._run_id:
            return
        self._run_id = None
        # what a run that stopped could not commit goes with it: never into the
        # next run's groups (nor a resume's, whose numbers start from the journal)
        self._pending.pop(run_id, None)
        self.urgent = False
        with contextlib.suppress(JournalError), self._transaction("release the run") as db:
            db.execute(
                "UPDATE runs SET owner=NULL, lease_until=NULL WHERE run_id=? AND owner=?",
                (run_id, self.owner),
            )

    # -- events ------------------------------------------------------------------------

    def encode(self, branch: str, value: Any) -> str | bytes:
        """Encode a result with the codec, or raise `CodecError` naming the branch."""
        try:
            encoded = self.codec.dumps(value)
        except Exception as exc:
            raise CodecError(branch, value, exc) from exc
        if not isinstance(encoded, str | bytes):
            raise CodecError(
                branch,
                value,
                TypeError(
                    f"{type(self.codec).__name__}.dumps returned a {type(encoded).__name__}, "
                    "not str or bytes"
                ),
            )
        return encoded

    def record_fields(
        self,
        run_id: str,
        kind: str,
        branch: str | None,
        at: datetime,
        attempt: int | None,
        error: BaseException | None,
        value: Any,
        encoded: str | bytes | None = None,
    ) -> None:
        """Buffer an event, given by its fields (with the encoded result, for
        `applied`); a group commit (`take`, then `commit`) writes it."""
        if kind in _URGENT:
            self.urgent = True
        if kind in _META_VALUED:
            stored = value  # a delay, a phase, a reason: plain JSON
        elif type(encoded) is str or encoded is None:
            stored = encoded
        else:
            stored = _stored_result(encoded)
        rows = self._pending.get(run_id)
        if rows is None:
            rows = self._pending[run_id] = []
        # numbered when committed (`commit`): so nothing that stops a run between
        # here and there can leave a gap in the numbers
        rows.append(
            [
                0,
                kind,
                branch,
                at.timestamp(),
                attempt,
                None if error is None else _error_record(error),
                stored,
            ]
        )

    def record_intents(self, run_id: str, names: Sequence[str], kind: str = INTENT) -> None:
        """Buffer one record saying that each of `names` may start its first apply
        (`INTENT`), or will not (`WITHDRAWN`).

        An intent, once committed, lets the branch start without a commit of its
        own: its `apply_started` is committed with a later group. A resume treats
        an intent neither followed by `apply_started` nor withdrawn as a start, so
        the branch is attempted again (with the same attempt key) whether or not
        it had begun. Withdrawals are written before `rollback_started`.
        """
        if not names:
            return
        self._pending.setdefault(run_id, []).append(
            [0, kind, None, time.time(), 1, None, list(names)]
        )

    @property
    def dirty(self) -> bool:
        """Whether events wait to be committed."""
        return bool(self._pending)

    def take(self) -> dict[str, list[list[Any]]]:
        """The buffered events by run, for `commit` (which may run in another thread)."""
        groups, self._pending = self._pending, {}
        self.urgent = False
        return groups

    def commit(self, groups: dict[str, list[list[Any]]]) -> None:
        """Commit `groups` (from `take`) in one transaction (a group commit)."""
        crash_now = False
        if self._crash_at:
            groups, crash_now = self._events_before_crash(groups)
        groups = {run_id: events for run_id, events in groups.items() if events}
        if not groups:
            return
        numbered = {}
        for run_id, events in groups.items():
            seq = self._seq.get(run_id, 0)
            for event in events:
                seq += 1
                event[0] = seq
            numbered[run_id] = seq
        # Only the events (the lease is renewed by a timer, the applied count kept
        # in the groups), and in as few statements as possible: sqlite3 lets go of
        # the GIL around each one, and taking it back behind a busy scheduling
        # thread can cost a switch interval (5 ms) each time. A single statement
        # is its own transaction.
        finished = {
            run_id: events[-1][6] or "finished"
            for run_id, events in groups.items()
            if events[-1][1] == "run_finished"
        }
        if len(groups) == 1 and not finished:
            ((run_id, events),) = groups.items()
            with self._lock, self._errors("record events"):
                _insert_group(self._db, run_id, events)
        else:
            with self._transaction("record events") as db:
                for run_id, events in groups.items():
                    _insert_group(db, run_id, events)
                for run_id, state in finished.items():
                    db.execute(
                        "UPDATE runs SET state=?, updated_at=?, owner=NULL, lease_until=NULL "
                        "WHERE run_id=?",
                        (state, datetime.now(UTC).isoformat(), run_id),
                    )
        self._seq.update(numbered)  # committed: the next group goes on from here
        if crash_now:
            os.kill(os.getpid(), signal.SIGKILL)

    def _events_before_crash(
        self, groups: dict[str, list[list[Any]]]
    ) -> tuple[dict[str, list[list[Any]]], bool]:
        """The test hook: keep the events up to the `_crash_at`-th (intents and
        withdrawals are not counted), and say whether to die after committing them."""
        kept: dict[str, list[list[Any]]] = {}
        for run_id, events in groups.items():
            for index, event in enumerate(events):
                if event[1] in _INTERNAL:
                    continue
                self._recorded += 1
                if self._recorded == self._crash_at:
                    kept[run_id] = events[: index + 1]
                    return kept, True
            kept[run_id] = events
        return kept, False

    # -- reading -------------------------------------------------------------------------

    def load(self, run_id: str) -> _RunRecord:
        """Read a run's graph and events back."""
        with self._lock, self._errors("read a run"):
            row = self._db.execute(
                "SELECT flow, graph, state FROM runs WHERE run_id=?", (run_id,)
            ).fetchone()
            if row is None:
                raise JournalError(f"journal {self.path} holds no run {run_id!r}")
            flow, graph_text, state = row
            groups = self._db.execute(
                "SELECT first_seq, last_seq, events FROM event_groups WHERE run_id=? "
                "ORDER BY first_seq",
                (run_id,),
            ).fetchall()
        try:
            events = self._events(run_id, groups)
            graph = [(name, tuple(deps)) for name, deps in json.loads(graph_text)]
            if not all(
                type(name) is str and all(type(d) is str for d in deps) for name, deps in graph
            ):
                raise ValueError("a branch name that is not text")
            _check_names(events, {name for name, _ in graph})
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise JournalError(
                f"journal {self.path}: the record of run {run_id!r} is damaged ({exc}); "
                "it cannot be shown or resumed"
            ) from exc
        return _RunRecord(run_id, flow, graph, state, events)

    def _events(self, run_id: str, groups: list[tuple[int, int, str]]) -> list[Event]:
        """The events of `groups` (rows of event_groups, in order), decoded; a gap or
        a malformed event raises (ValueError and the like: see `load`)."""
        events = []
        loads, codec = json.loads, self.codec
        expected = 1
        for first, last, text in groups:
            if first != expected:
                raise ValueError(f"events {expected} to {first - 1} are missing")
            group = loads(text)
            if type(group) is not list or len(group) != last - first + 1:
                raise ValueError(f"the group of events {first} to {last} is malformed")
            for seq, kind, branch, at, attempt, error, stored in group:
                if seq != expected or kind not in _KINDS:
                    raise ValueError(f"event {expected} is malformed")
                expected += 1
                value = stored
                if kind == "applied" and stored is not None:
                    try:
                        data = (
                            base64.b64decode(stored["base64"]) if type(stored) is dict else stored
                        )
                        value = codec.loads(data)
                    except Exception as exc:
                        raise JournalError(
                            f"journal {self.path}: the result of branch {branch!r} in run "
                            f"{run_id!r} cannot be decoded by {type(codec).__name__}: {exc}"
                        ) from exc
                events.append(
                    Event(
                        run_id,
                        kind,
                        branch,
                        datetime.fromtimestamp(at, UTC),
                        attempt,
                        _restore_error(error),
                        value,
                    )
                )
        return events

    def runs(self) -> list[RunSummary]:
        """Every run in the journal, oldest first."""
        with self._lock, self._errors("list runs"):
            rows = self._db.execute(
                "SELECT r.run_id, r.flow, r.created_at, r.state, "
                "(SELECT COALESCE(SUM(g.applied), 0) FROM event_groups g "
                "WHERE g.run_id = r.run_id), "
                "r.total FROM runs r ORDER BY r.created_at, r.run_id"
            ).fetchall()
        try:
            return [
                RunSummary(run_id, flow, _utc(created), state, applied, total)
                for run_id, flow, created, state, applied, total in rows
            ]
        except (TypeError, ValueError) as exc:
            raise JournalError(
                f"journal {self.path} is damaged: a run's start time is not a time ({exc})"
            ) from exc

    def graph(self, run_id: str) -> list[tuple[str, tuple[str, ...]]]:
        """A run's recorded branches: (name, dependencies), in definition order."""
        return self.load(run_id).graph

    def events(self, run_id: str) -> list[Event]:
        """A run's recorded events, in order (results decoded).

        Only `Event` kinds: the journal's own intent records (see `record_intents`)
        are left out.
        """
        return [e for e in self.load(run_id).events if e.kind not in _INTERNAL]


def _check_names(events: list[Event], names: set[str]) -> None:
    """Every branch the events name is one of the run's (ValueError if not)."""
    for event in events:
        named = event.value if event.kind in _INTERNAL else [event.branch]
        if type(named) is not list:
            raise ValueError(f"an {event.kind} record without its list of branches")
        for name in named:
            if name is not None and name not in names:
                raise ValueError(f"an event of branch {name!r}, which the run does not have")


def open_journal(
    journal: Journal | str | os.PathLike[str], *, existing: bool = False
) -> tuple[Journal, bool]:
    """The `Journal` for a `journal=` argument, and whether we opened it (and close it).

    With `existing`, a path where no file is raises `JournalError` rather than
    create an empty journal (there is nothing to resume in it).
    """
    if isinstance(journal, Journal):
        return journal, False
    if isinstance(journal, str | os.PathLike):
        if existing and not Path(journal).exists():
            raise JournalError(f"no journal at {journal}: nothing to resume there")
        return Journal(journal), True
    raise TypeError(f"journal must be a path or a kira.Journal, not {type(journal).__name__}")
