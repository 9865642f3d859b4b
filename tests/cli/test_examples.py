"""The examples do what they say, through `kira run` as a user would run them."""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _cli_support import EXAMPLES, kira, read_events

import kira as kira_lib


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- readme_example ---------------------------------------------------------------------------


def test_readme_example_gives_2_3_5(tmp_path: Path) -> None:
    events_path = tmp_path / "e.jsonl"
    done = kira("run", EXAMPLES / "readme_example.py", "--events", events_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    values = {e["branch"]: e["value"] for e in read_events(events_path) if e["kind"] == "applied"}
    assert values == {"a": 2, "b": 3, "c": 5}
    assert "c: applied -> 5" in done.stdout


def test_readme_example_from_python() -> None:
    example = load_example("readme_example")
    assert kira_lib.run_tasks(example.config, example.branches) == {"a": 2, "b": 3, "c": 5}


# -- trip_booking ------------------------------------------------------------------------------

FORCED = ["flight", "hotel", "car", "payment", "confirmation", "customer"]


def book(db: Path, *sets: str, events: Path | None = None) -> Any:
    args: list[str | Path] = ["run", EXAMPLES / "trip_booking.py"]
    for item in (f"db={db}", "latency=0", *sets):
        args += ["--set", item]
    if events is not None:
        args += ["--events", events]
    return kira(*args, cwd=db.parent)


def snapshot(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table."""
    with sqlite3.connect(db) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}


def test_trip_booking_books_everything(tmp_path: Path) -> None:
    db = tmp_path / "trip.db"
    done = book(db)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = snapshot(db)
    assert len(rows["customers"]) == 1
    customer = rows["customers"][0][0]
    for table in ("flight_bookings", "hotel_bookings", "car_bookings", "payments", "outbox"):
        assert len(rows[table]) == 1, table
        assert rows[table][0][1] == customer, table
    # one unit of each booked item was taken from the inventory
    assert {r[0]: r[3] for r in rows["seats"]}["KI101"] == 4
    assert {r[0]: r[3] for r in rows["rooms"]}["KIRA-TOKYO"] == 3
    assert {r[0]: r[3] for r in rows["cars"]}["COMPACT"] == 2
    amount = rows["payments"][0][2]
    assert amount == 84_000 + 3 * 12_500 + 3 * 4_500
    assert "Your trip" in rows["outbox"][0][3] and "KI101" in rows["outbox"][0][4]


@pytest.mark.parametrize("step", FORCED)
def test_trip_booking_failure_leaves_every_table_as_it_was(tmp_path: Path, step: str) -> None:
    db = tmp_path / "trip.db"
    assert book(db).returncode == 0  # a first booking, so the tables are not empty
    before = snapshot(db)
    events_path = tmp_path / "e.jsonl"
    done = book(db, f"fail={step}", events=events_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert snapshot(db) == before
    events = read_events(events_path)
    rollback = next(e for e in events if e["kind"] == "rollback_started")
    assert rollback["branch"] == step
    attempts = [e for e in events if e["kind"] == "apply_started" and e["branch"] == step]
    # the flaky remote services are retried, and still fail for good
    assert len(attempts) == (3 if step in ("payment", "car") else 1)


def test_trip_booking_failure_on_a_new_database_leaves_empty_tables(tmp_path: Path) -> None:
    db = tmp_path / "trip.db"
    assert book(db, "fail=payment").returncode == 1
    rows = snapshot(db)
    for table in ("customers", "flight_bookings", "hotel_bookings", "car_bookings", "payments"):
        assert rows[table] == [], table
    assert {r[0]: r[3] for r in rows["seats"]}["KI101"] == 5  # the inventory is whole


def test_trip_booking_retries_a_flaky_payment_and_succeeds(tmp_path: Path) -> None:
    db = tmp_path / "trip.db"
    events_path = tmp_path / "e.jsonl"
    done = book(db, "flaky=payment", events=events_path)
    assert done.returncode == 0, done.stdout
    kinds = [
        (e["kind"], e["attempt"]) for e in read_events(events_path) if e["branch"] == "payment"
    ]
    assert kinds[:4] == [
        ("apply_started", 1),
        ("apply_failed", 1),
        ("retry_scheduled", 2),
        ("apply_started", 2),
    ]
    assert ("applied", 2) in kinds
    assert len(snapshot(db)["payments"]) == 1


def test_trip_booking_sold_out_rolls_back(tmp_path: Path) -> None:
    db = tmp_path / "trip.db"
    for _ in range(2):  # the VAN inventory holds 2
        assert book(db, "car=VAN").returncode == 0
    before = snapshot(db)
    done = book(db, "car=VAN")
    assert done.returncode == 1
    assert "car VAN is sold out" in done.stdout
    assert snapshot(db) == before


def test_trip_booking_rejects_an_unknown_failure_name(tmp_path: Path) -> None:
    done = book(tmp_path / "trip.db", "fail=teleport")
    assert done.returncode == 3
    assert "fail must be one of" in done.stderr
    assert not (tmp_path / "trip.db").exists()  # nothing ran


# -- release -----------------------------------------------------------------------------------


def release(tmp_path: Path, *sets: str) -> Any:
    args: list[str | Path] = ["run", EXAMPLES / "release.py"]
    for item in sets:
        args += ["--set", item]
    return kira(*args, cwd=tmp_path)


def files_under(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_release_builds_and_publishes(tmp_path: Path) -> None:
    done = release(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    published = tmp_path / "release-published" / "tinypkg" / "1.0.0"
    wheel = published / "tinypkg-1.0.0-py3-none-any.whl"
    assert files_under(published) == {wheel.name, "CHANGELOG.md", "SHA256SUMS"}
    for line in (published / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((published / name).read_bytes()).hexdigest() == digest
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"tinypkg/__init__.py", "tinypkg/greet.py"} <= names
        assert "tinypkg/__pycache__/greet.pyc" in names
        assert "tinypkg-1.0.0.dist-info/RECORD" in names
    assert "## 1.0.0" in (published / "CHANGELOG.md").read_text()
    assert (tmp_path / "release-work" / "build-1.0.0" / "dist" / wheel.name).is_file()


def test_release_smoke_failure_removes_what_was_published_and_built(tmp_path: Path) -> None:
    done = release(tmp_path, "fail=smoke")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SmokeTestFailed" in done.stdout
    assert not (tmp_path / "release-published").exists()
    assert not (tmp_path / "release-work").exists()


def test_release_failure_keeps_earlier_releases(tmp_path: Path) -> None:
    assert release(tmp_path).returncode == 0
    before_published = files_under(tmp_path / "release-published")
    before_built = files_under(tmp_path / "release-work")
    for step in ("smoke", "publish", "wheel"):
        done = release(tmp_path, "version=2.0.0", f"fail={step}")
        assert done.returncode == 1, done.stdout
        assert files_under(tmp_path / "release-published") == before_published, step
        assert files_under(tmp_path / "release-work") == before_built, step


def test_release_refuses_to_overwrite_a_version(tmp_path: Path) -> None:
    assert release(tmp_path).returncode == 0
    before = files_under(tmp_path)
    done = release(tmp_path)
    assert done.returncode == 1
    assert "already built" in done.stdout
    assert files_under(tmp_path) == before
