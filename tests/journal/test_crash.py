"""A crash test that really crashes.

A subprocess runs the diamond-with-tail flow of `_journal_support` with a journal
and is killed with SIGKILL by the journal's test hook (`KIRA_TEST_CRASH_AT=n`:
right after committing the n-th event of the process). For every n up to the
number of events of an uninterrupted run, in the success flow and in the flow
whose last branch fails (so the later n kill the process during the rollback),
this test process then calls `kira.resume` and checks the ledger the branches
wrote their effects to:

- success: each branch's effect is there exactly once (re-attempts reuse
  `current_attempt().key`), and the results equal an uninterrupted run's;
- failure: `RolledBack` is raised and no apply effect remains (each applied
  branch's undo is recorded exactly once).

A second resume of the finished run gives the same outcome and runs nothing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _journal_support import (
    KILLED,
    RUN_ID,
    import_flow,
    ledger_rows,
    read_lines,
    run_flow,
    write_flow,
)

import kira

NAMES = ["a", "b", "c", "d", "e", "f"]
APPLIED_IN_FAILURE_FLOW = ["a", "b", "c", "d", "e"]  # f fails, so it never applies
PARALLEL = max(2, min(6, (os.cpu_count() or 2) * 2))


# (runner, max_workers): with one worker, b and c cannot run at once, so the journal
# records an intent for c ahead of its start, and c starts on that intent alone
SETUPS = [("threads", None), ("threads", 1), ("asyncio", None), ("asyncio", 1)]
SETUP_IDS = [f"{runner}-workers-{workers or 'default'}" for runner, workers in SETUPS]


def _uninterrupted(
    flow: Path, folder: Path, mode: str, setup: tuple[str, int | None]
) -> tuple[dict[str, Any], list[kira.Event]]:
    folder.mkdir()
    journal, ledger = folder / "journal.db", folder / "ledger.db"
    runner, workers = setup
    proc = run_flow(flow, journal, ledger, mode, folder / "calls", runner=runner, workers=workers)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    with kira.Journal(journal) as j:
        events = j.events(RUN_ID)
    return printed, events


def _open_intents(recorded: list[kira.Event]) -> set[str]:
    """Branches the journal says may have started (an intent: `Journal.load` shows
    them, `Journal.events` does not) and no `apply_started` or withdrawal followed."""
    intended: set[str] = set()
    for event in recorded:
        if event.kind == "apply_intent":
            intended |= set(event.value)
        elif event.kind == "apply_withdrawn":
            intended -= set(event.value)
        elif event.kind == "apply_started":
            intended.discard(event.branch)
    return intended


def _key(name: str, phase: str, attempt: int = 1) -> str:
    return f"{RUN_ID}/{name}/{phase}/{attempt}"


def _check_unapply_order(unapplied: tuple[str, ...]) -> list[str]:
    """Each branch unapplied only after every branch depending on it."""
    problems = []
    if sorted(unapplied) != APPLIED_IN_FAILURE_FLOW:
        problems.append(f"unapplied {unapplied}, expected each of {APPLIED_IN_FAILURE_FLOW} once")
        return problems
    at = {name: i for i, name in enumerate(unapplied)}
    for later, earlier in [("d", "e"), ("b", "d"), ("c", "d"), ("a", "b"), ("a", "c")]:
        if at[later] < at[earlier]:
            problems.append(f"{later} unapplied before its dependent {earlier}: {unapplied}")
    return problems


def _calls_problems(calls: list[str]) -> list[str]:
    """No branch of this flow has an error handler: none may ever be retried."""
    return [
        f"a retry although no on_*_error exists: {line!r}"
        for line in calls
        if not line.endswith("/1")
    ]


def _crash_then_resume(
    flow: Path, module: Any, folder: Path, mode: str, n: int, setup: tuple[str, int | None]
) -> dict[str, Any]:
    """Crash the flow at event n, resume it here, resume again; report what was seen."""
    folder.mkdir()
    journal, ledger, calls = folder / "journal.db", folder / "ledger.db", folder / "calls"
    runner, workers = setup
    proc = run_flow(flow, journal, ledger, mode, calls, crash_at=n, runner=runner, workers=workers)
    report: dict[str, Any] = {"n": n, "problems": []}
    problems: list[str] = report["problems"]
    if proc.returncode != KILLED:
        problems.append(f"returncode {proc.returncode}, expected SIGKILL; stderr: {proc.stderr}")
        return report
    with kira.Journal(journal) as j:
        before = j.events(RUN_ID)
        report["open_intents"] = _open_intents(j.load(RUN_ID).events)
    report["before"] = [e.kind for e in before]
    if len(before) != n:
        problems.append(f"the crash hook committed {len(before)} events, expected {n}")
    config = module.make_config(ledger, mode, str(calls))

    def outcome() -> tuple[str, Any]:
        try:
            return "applied", kira.resume(
                RUN_ID, config, module.branches(), journal=journal, max_workers=workers
            )
        except kira.RolledBack as exc:
            return "rolled_back", exc
        except Exception as exc:
            return "error", exc

    report["first"] = outcome()
    report["ledger"] = ledger_rows(ledger)
    report["calls"] = read_lines(calls)
    with kira.Journal(journal) as j:
        report["after"] = j.events(RUN_ID)
        report["runs"] = j.runs()
    report["second"] = outcome()
    report["ledger_again"] = ledger_rows(ledger)
    report["calls_again"] = read_lines(calls)
    return report


def _crash_everywhere(
    tmp_path: Path, mode: str, setup: tuple[str, int | None]
) -> tuple[Any, list[kira.Event], list[dict]]:
    flow = write_flow(tmp_path)
    module = import_flow(flow)
    printed, events = _uninterrupted(flow, tmp_path / "uninterrupted", mode, setup)
    total = len(events)
    with ThreadPoolExecutor(PARALLEL) as pool:
        reports = list(
            pool.map(
                lambda n: _crash_then_resume(flow, module, tmp_path / f"crash{n}", mode, n, setup),
                range(1, total + 1),
            )
        )
    return printed, events, reports


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_crash_at_every_event_of_a_successful_run_then_resume(
    tmp_path: Path, setup: tuple[str, int | None]
) -> None:
    printed, events, reports = _crash_everywhere(tmp_path, "success", setup)
    expected = printed["results"]
    assert expected == {"a": 1, "b": 21, "c": 301, "d": 4322, "e": 54322, "f": 654322}
    kinds = Counter(e.kind for e in events)
    assert kinds == {"apply_started": 6, "applied": 6, "run_finished": 1}
    assert len(reports) == 13
    expected_ledger = [(_key(name, "apply"), name, "apply", expected[name]) for name in NAMES]

    failures = []
    for report in reports:
        n, problems = report["n"], report["problems"]
        if "first" not in report:
            failures.append((n, problems))
            continue
        kind, value = report["first"]
        if kind != "applied":
            problems.append(f"resume ended {kind}: {value!r}")
        elif value != expected:
            problems.append(f"resume returned {value}, expected {expected}")
        if report["ledger"] != expected_ledger:
            problems.append(f"ledger {report['ledger']}")
        problems += _calls_problems(report["calls"])
        after = report["after"]
        if after[-1].kind != "run_finished" or after[-1].value != "applied":
            problems.append(f"the journal does not end with run_finished: {after[-1]}")
        if [e.kind for e in after[:n]] != report["before"]:
            problems.append("the resume changed the events recorded before the crash")
        summaries = [(r.run_id, r.state, r.applied, r.total) for r in report["runs"]]
        if summaries != [(RUN_ID, "applied", 6, 6)]:
            problems.append(f"Journal.runs() gives {summaries}")
        # resuming the finished run: the same results, nothing run again
        if report["second"] != ("applied", expected):
            problems.append(f"a second resume gave {report['second']}")
        if report["ledger_again"] != report["ledger"] or report["calls_again"] != report["calls"]:
            problems.append("a second resume of the finished run ran callbacks")
        if problems:
            failures.append((n, problems))
    assert not failures, "\n".join(f"crash at event {n}: {p}" for n, p in failures)
    # With one worker, c is started on its intent alone, and some crashes come while
    # that intent is open (c may or may not have begun): each resumed correctly above.
    open_at = {r["n"]: r["open_intents"] for r in reports if r.get("open_intents")}
    if setup[1] == 1:
        assert open_at and all(names == {"c"} for names in open_at.values()), open_at
    else:
        assert open_at == {}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_crash_at_every_event_of_a_failing_run_then_resume(
    tmp_path: Path, setup: tuple[str, int | None]
) -> None:
    printed, events, reports = _crash_everywhere(tmp_path, "fail", setup)
    assert _check_unapply_order(tuple(printed["rolled_back"])) == []
    kinds = [e.kind for e in events]
    assert Counter(kinds) == {
        "apply_started": 6,
        "applied": 5,
        "apply_failed": 1,
        "failed": 1,
        "rollback_started": 1,
        "unapply_started": 5,
        "unapplied": 5,
        "run_finished": 1,
    }
    assert len(reports) == len(events) == 25
    # the n at which the process dies with the rollback under way
    during_rollback = [
        n for n in range(1, len(events) + 1) if "rollback_started" in kinds[:n] and n < len(events)
    ]
    assert len(during_rollback) == 11
    expected_ledger = [
        (_key(name, "unapply"), name, "undo", value)
        for name, value in [("a", 1), ("b", 21), ("c", 301), ("d", 4322), ("e", 54322)]
    ]

    failures = []
    killed_mid_rollback = []
    for report in reports:
        n, problems = report["n"], report["problems"]
        if "first" not in report:
            failures.append((n, problems))
            continue
        before = report["before"]
        if "rollback_started" in before and "run_finished" not in before:
            killed_mid_rollback.append(n)
        kind, value = report["first"]
        if kind != "rolled_back":
            problems.append(f"resume ended {kind}: {value!r}")
        else:
            problems += _check_unapply_order(value.unapplied)
            culprit = value.culprit
            if (culprit.branch, culprit.phase) != ("f", "apply"):
                problems.append(f"culprit {culprit}")
            if "f fails on purpose" not in str(culprit.error):
                problems.append(f"culprit error {culprit.error!r}")
            if culprit.attempt != 1:
                problems.append(f"f has no on_apply_error, yet failed on attempt {culprit.attempt}")
        if report["ledger"] != expected_ledger:
            problems.append(f"ledger {report['ledger']}")
        problems += _calls_problems(report["calls"])
        after = report["after"]
        if after[-1].kind != "run_finished" or after[-1].value != "rolled_back":
            problems.append(f"the journal does not end with run_finished: {after[-1]}")
        summaries = [(r.run_id, r.state, r.total) for r in report["runs"]]
        if summaries != [(RUN_ID, "rolled_back", 6)]:
            problems.append(f"Journal.runs() gives {summaries}")
        if [e.kind for e in after[:n]] != before:
            problems.append("the resume changed the events recorded before the crash")
        # resuming the finished run: the same outcome, nothing run again
        second_kind, second = report["second"]
        if second_kind != "rolled_back" or (
            second.unapplied != value.unapplied or second.culprit.branch != "f"
        ):
            problems.append(f"a second resume gave {report['second']}")
        elif not isinstance(second.culprit.error, kira.RestoredError):
            problems.append(f"a second resume's culprit is {second.culprit.error!r}")
        if report["ledger_again"] != report["ledger"] or report["calls_again"] != report["calls"]:
            problems.append("a second resume of the finished run ran callbacks")
        if problems:
            failures.append((n, problems))
    # the kills during the rollback really happened
    assert killed_mid_rollback == during_rollback
    assert not failures, "\n".join(f"crash at event {n}: {p}" for n, p in failures)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("runner", ["threads", "asyncio"])
def test_crash_at_every_event_of_a_run_whose_rollback_withdraws_an_intent(
    tmp_path: Path, runner: str
) -> None:
    # One worker: after a, b runs and c waits with an intent recorded. b fails, so
    # the intent is withdrawn (before rollback_started) and c never runs.
    printed, events, reports = _crash_everywhere(tmp_path, "fail_b", (runner, 1))
    assert printed == {"rolled_back": ["a"]}
    assert [(e.kind, e.branch) for e in events] == [
        ("apply_started", "a"),
        ("applied", "a"),
        ("apply_started", "b"),
        ("apply_failed", "b"),
        ("failed", "b"),
        ("rollback_started", "b"),
        ("unapply_started", "a"),
        ("unapplied", "a"),
        ("run_finished", None),
    ]
    with kira.Journal(tmp_path / "uninterrupted" / "journal.db") as j:
        recorded = [(e.kind, e.branch, e.value) for e in j.load(RUN_ID).events]
    assert ("apply_intent", None, ["c"]) in recorded
    withdrawn = recorded.index(("apply_withdrawn", None, ["c"]))
    # withdrawn before the events that start the rollback
    assert [r[:2] for r in recorded[withdrawn + 1 : withdrawn + 3]] == [
        ("failed", "b"),
        ("rollback_started", "b"),
    ]

    failures = []
    for report in reports:
        n, problems = report["n"], report["problems"]
        if "first" not in report:
            failures.append((n, problems))
            continue
        kind, value = report["first"]
        if kind != "rolled_back":
            problems.append(f"resume ended {kind}: {value!r}")
        elif (value.culprit.branch, value.culprit.phase) != ("b", "apply"):
            problems.append(f"culprit {value.culprit}")
        ledger = report["ledger"]
        if any(row[2] == "apply" for row in ledger):
            problems.append(f"an apply effect remains: {ledger}")
        # c may have begun while its intent was open: then the resumed rollback
        # applies it again (same key) and unapplies it; otherwise c never runs
        c_ran = "c" in report["open_intents"]
        expected = [(_key("a", "unapply"), "a", "undo", 1)]
        if c_ran:
            expected.append((_key("c", "unapply"), "c", "undo", 301))
        if ledger != expected:
            problems.append(f"ledger {ledger}, expected {expected}")
        c_calls = [line for line in report["calls"] if line.startswith("apply c")]
        if c_calls != ([f"apply c {_key('c', 'apply')}"] if c_ran else []):
            problems.append(f"calls of c's apply: {c_calls}")
        problems += _calls_problems(report["calls"])
        if problems:
            failures.append((n, problems))
    assert not failures, "\n".join(f"crash at event {n}: {p}" for n, p in failures)
    # c's intent is committed with b's start (after event 3) and withdrawn before
    # "failed": the crash after b's failed attempt comes with it open
    assert {r["n"] for r in reports if r["open_intents"]} == {4}
