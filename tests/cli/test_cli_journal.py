"""`kira run --journal`, `kira runs`, `kira show` and `kira resume`, in subprocesses."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

from _cli_support import kira, kira_env, write_flow

FLOW = """
    import os
    import sqlite3

    import kira


    def _ledger(config):
        db = sqlite3.connect(config["ledger"], timeout=10)
        db.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, branch TEXT)")
        return db


    def step(name, value):
        def apply(config, deps):
            with _ledger(config) as db:
                db.execute(
                    "INSERT OR IGNORE INTO effects VALUES (?, ?)",
                    (kira.current_attempt().key, name),
                )
            if name == config.get("fail"):
                raise RuntimeError(name + " refused")
            return value + sum(deps.values())

        def unapply(config, deps, result):
            with _ledger(config) as db:
                db.execute("DELETE FROM effects WHERE branch = ?", (name,))

        return apply, unapply


    def make_config():
        return {"ledger": os.environ["LEDGER"]}


    def branches():
        a, ua = step("a", 1)
        b, ub = step("b", 10)
        c, uc = step("c", 100)
        return [
            kira.Branch("a", a, unapply=ua),
            kira.Branch("b", b, ["a"], unapply=ub),
            kira.Branch("c", c, ["b"], unapply=uc),
        ]
"""


def _ledger(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("SELECT branch FROM effects"))


def test_run_with_the_default_journal_then_runs_and_show(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FLOW)
    env = kira_env(LEDGER=str(tmp_path / "ledger.db"))
    done = kira("run", flow, "--journal", "-q", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / ".kira" / "journal.db").exists()  # --journal without a value
    run_id = done.stderr.split("kira: run ", 1)[1].split(",", 1)[0]
    assert f"kira resume {run_id}" in done.stderr  # how to carry it on, said up front

    failed = kira("run", flow, "--journal", "-q", "--set", "fail=c", cwd=tmp_path, env=env)
    assert failed.returncode == 1, failed.stderr
    failed_id = failed.stderr.split("kira: run ", 1)[1].split(",", 1)[0]
    # the command to carry it on keeps the config it was run with
    assert f"kira resume {failed_id} {flow} --journal .kira/journal.db --set fail=c" in (
        failed.stderr
    )
    assert "rolled back in" in failed.stdout and f"(run {failed_id})" in failed.stdout

    listing = kira("runs", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "flow"]
    assert run_id in lines[1] and "applied" in lines[1] and "3 / 3" in lines[1]
    assert "rolled_back" in lines[2] and "2 / 3" in lines[2]

    shown = kira("show", run_id, "--timeline", tmp_path / "t.html", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"run {run_id}" in shown.stdout and ": applied" in shown.stdout
    assert f"wrote {tmp_path / 't.html'}" in shown.stdout
    rows = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines()[2:5]}
    assert rows == {"a": "applied", "b": "applied", "c": "applied"}
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    assert all(f">{name}<" in page for name in "abc")

    assert lines[2].split()[0] == failed_id
    shown = kira("show", failed_id, cwd=tmp_path, env=env)
    assert shown.returncode == 1  # the run's own exit status: rolled back
    assert "failed attempts" in shown.stdout
    # the error as the live run showed it, not as the journal's stand-in for it
    assert "RuntimeError: c refused" in shown.stdout and "RestoredError" not in shown.stdout


def test_a_killed_run_is_carried_on_by_kira_resume(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FLOW)
    ledger = tmp_path / "ledger.db"
    journal = tmp_path / "j.db"
    # SIGKILL right after the 4th event is committed: a applied, b started
    env = kira_env(LEDGER=str(ledger), KIRA_TEST_CRASH_AT="4")
    crashed = kira("run", flow, "--journal", journal, "-q", cwd=tmp_path, env=env)
    assert crashed.returncode == -signal.SIGKILL
    run_id = crashed.stderr.split("kira: run ", 1)[1].split(",", 1)[0]

    env = kira_env(LEDGER=str(ledger))
    listing = kira("runs", "--journal", journal, cwd=tmp_path, env=env)
    assert "running" in listing.stdout
    shown = kira("show", run_id, "--journal", journal, cwd=tmp_path, env=env)
    assert shown.returncode == 4, shown.stderr  # not finished
    assert "not finished" in shown.stdout and f"kira resume {run_id}" in shown.stdout

    events = tmp_path / "events.jsonl"
    resumed = kira(
        "resume", run_id, flow, "--journal", journal, "--events", events, cwd=tmp_path, env=env
    )
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"kira: resuming run {run_id} of {flow} (3 branches)" in resumed.stdout
    assert "applied: all 3 branches" in resumed.stdout
    # the result of c is 111 whoever applied what: a=1, b=10+1, c=100+11
    assert "111" in resumed.stdout
    assert _ledger(ledger) == ["a", "b", "c"]  # each effect once, b's not doubled
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert kinds[-1] == "run_finished" and "applied" in kinds

    again = kira("resume", run_id, flow, "--journal", journal, cwd=tmp_path, env=env)
    assert again.returncode == 0  # finished: its outcome, nothing run again
    assert _ledger(ledger) == ["a", "b", "c"]


def test_journal_commands_give_clear_errors(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FLOW)
    env = kira_env(LEDGER=str(tmp_path / "ledger.db"))
    missing = kira("runs", "--journal", tmp_path / "nothere.db", cwd=tmp_path, env=env)
    assert missing.returncode == 3
    assert "no journal at" in missing.stderr and "Traceback" not in missing.stderr

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    torn = kira("runs", "--journal", garbage, cwd=tmp_path, env=env)
    assert torn.returncode == 3
    assert "not a kira journal or is damaged" in torn.stderr and "Traceback" not in torn.stderr

    kira("run", flow, "--journal", tmp_path / "j.db", "-q", cwd=tmp_path, env=env)
    unknown = kira("resume", "nope", flow, "--journal", tmp_path / "j.db", cwd=tmp_path, env=env)
    assert unknown.returncode == 3
    assert "holds no run 'nope'" in unknown.stderr
    shown = kira("show", "nope", "--journal", tmp_path / "j.db", cwd=tmp_path, env=env)
    assert shown.returncode == 3 and "holds no run 'nope'" in shown.stderr
