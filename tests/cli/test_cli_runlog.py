"""The model the CLI draws from: events -> attempts, progress, critical path, page."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import kira
from kira._runlog import RunLog, event_json
from kira._timeline import render_timeline

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def noop(config, deps):
    return None


def graph() -> list[kira.Branch]:
    """a -> c, b -> c, c -> d: the chain through b is the long one."""
    return [
        kira.Branch("a", noop),
        kira.Branch("b", noop),
        kira.Branch("c", noop, ["a", "b"]),
        kira.Branch("d", noop, ["c"]),
    ]


def ev(kind, branch, t, attempt=None, error=None, value=None) -> kira.Event:
    return kira.Event("run1", kind, branch, at(t), attempt, error, value)


def applied_run() -> list[kira.Event]:
    return [
        ev("apply_started", "a", 0, 1),
        ev("apply_started", "b", 0, 1),
        ev("applied", "a", 1, 1, value="A"),
        ev("apply_failed", "b", 1, 1, error=ValueError("once")),
        ev("retry_scheduled", "b", 1, 2, value=0.5),
        ev("apply_started", "b", 1.5, 2),
        ev("applied", "b", 3, 2, value="B"),
        ev("apply_started", "c", 3, 1),
        ev("applied", "c", 4, 1, value="C"),
        ev("apply_started", "d", 4, 1),
        ev("applied", "d", 4.5, 1, value="D"),
        ev("run_finished", None, 4.5, value="applied"),
    ]


def record(events: list[kira.Event]) -> RunLog:
    log = RunLog(graph())
    for e in events:
        log.record(e)
    return log


def test_attempts_waits_and_progress_follow_the_events() -> None:
    log = record(applied_run())
    b = log.branches["b"]
    assert [(a.phase, a.number, a.outcome) for a in b.attempts] == [
        ("apply", 1, "failed"),
        ("apply", 2, "ok"),
    ]
    assert str(b.attempts[0].error) == "once"
    assert len(b.waits) == 1 and b.waits[0].delay == 0.5 and b.waits[0].end == at(1.5)
    assert b.seconds("apply") == 3.0  # first start to last end, the retry included
    assert (log.applied, log.total, log.finished) == (4, 4, "applied")
    assert [log.final_status(n) for n in "abcd"] == ["applied"] * 4


def test_an_attempt_made_again_by_a_resume_counts_once_from_its_new_start() -> None:
    # the process died during a's first attempt; the resume made attempt 1 again
    log = record(
        [
            ev("apply_started", "a", 0, 1),
            ev("apply_started", "a", 60, 1),
            ev("applied", "a", 61, 1, value="A"),
        ]
    )
    a = log.branches["a"]
    assert [(x.number, x.start, x.outcome) for x in a.attempts] == [(1, at(60), "ok")]
    assert a.count("apply") == 1 and a.seconds("apply") == 1.0


def test_the_critical_path_is_the_longest_chain_of_apply_time() -> None:
    path, seconds = record(applied_run()).critical_path()
    assert path == ["b", "c", "d"]
    assert seconds == 3.0 + 1.0 + 0.5


def test_the_critical_path_breaks_ties_by_definition_order() -> None:
    events = [
        ev("apply_started", "a", 0, 1),
        ev("apply_started", "b", 0, 1),
        ev("applied", "a", 1, 1),
        ev("applied", "b", 1, 1),
        ev("apply_started", "c", 1, 1),
        ev("applied", "c", 2, 1),
    ]
    assert record(events).critical_path() == (["a", "c"], 2.0)


def rolled_back_run() -> list[kira.Event]:
    boom = RuntimeError("c broke")
    return [
        ev("apply_started", "a", 0, 1),
        ev("apply_started", "b", 0, 1),
        ev("applied", "a", 1, 1, value="A"),
        ev("applied", "b", 1, 1, value="B"),
        ev("apply_started", "c", 1, 1),
        ev("apply_failed", "c", 2, 1, error=boom),
        ev("failed", "c", 2, 1, value="apply"),
        ev("rollback_started", "c", 2, error=boom, value="failure"),
        ev("unapply_started", "a", 2, 1),
        ev("unapply_started", "b", 2, 1),
        ev("unapplied", "a", 2.1, 1, value="A"),
        ev("unapply_failed", "b", 2.2, 1, error=OSError("stuck")),
        ev("failed", "b", 2.2, 1, value="unapply"),
        ev("run_finished", None, 2.2, value="rollback_incomplete"),
    ]


def test_a_rollback_is_recorded_with_its_culprit_and_what_is_left() -> None:
    log = record(rolled_back_run())
    assert log.rollback is not None
    assert (log.rollback.branch, log.rollback.reason, log.rollback.attempts) == (
        "c",
        "failure",
        1,
    )
    assert (log.applied, log.unapplied) == (2, 1)
    assert log.final_status("a") == "unapplied"
    assert log.final_status("b") == "still applied (unapply failed)"
    assert log.final_status("c") == "failed"
    assert log.final_status("d") == "not started"


def test_running_and_waiting_attempts_are_reported_while_the_run_goes() -> None:
    log = record(applied_run()[:5])  # b failed once and waits for its retry
    assert [(b.name, a.number) for b, a in log.running()] == []
    assert [(b.name, w.next_attempt) for b, w in log.waiting()] == [("b", 2)]
    log.record(applied_run()[5])
    assert [(b.name, a.number) for b, a in log.running()] == [("b", 2)]
    assert log.waiting() == []


def test_event_json_serialises_values_or_falls_back_to_repr() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "Odd()"

    line = json.loads(event_json(ev("applied", "a", 1, 1, value={"x": [1, 2]})))
    assert line == {
        "run_id": "run1",
        "kind": "applied",
        "branch": "a",
        "at": "2024-05-01T12:00:01+00:00",
        "attempt": 1,
        "error": None,
        "value": {"x": [1, 2]},
    }
    assert json.loads(event_json(ev("applied", "a", 1, 1, value=Odd())))["value"] == "Odd()"
    assert json.loads(event_json(ev("applied", "a", 1, 1, value=float("nan"))))["value"] == "nan"
    failed = json.loads(event_json(ev("apply_failed", "a", 1, 1, error=KeyError("k"))))
    assert failed["error"] == {"type": "KeyError", "message": "'k'"}


def test_the_page_draws_every_attempt_and_marks_failures() -> None:
    html = render_timeline(record(rolled_back_run()), "demo flow")
    assert "http" not in html and "<script" not in html
    assert "rollback incomplete" in html
    assert "Still applied:</b> b" in html
    # c's apply and b's unapply, in the whole run's chart and in the zoomed rollback
    # (0.2 s of a 2.2 s run: too short to read at the whole run's scale)
    assert "Rollback in detail" in html
    assert html.count("failed after") == 4
    assert "url(#p-fail-apply)" in html and "url(#p-fail-unapply)" in html
    assert "rollback started" in html
    assert "Critical path" in html


def test_the_page_of_an_applied_run_has_no_rollback() -> None:
    html = render_timeline(record(applied_run()), "demo")
    assert "Every branch applied (4 of 4)" in html
    # neither drawn nor explained in the legend: the legend lists only what is drawn
    assert "rollback started" not in html and "unapply (rollback)" not in html
    assert "waiting to retry" in html and "failed attempt" in html
    assert "<b>b</b> → <b>c</b> → <b>d</b>" in html
    assert "retry 2 of apply scheduled after 500 ms" in html


def test_the_page_survives_a_run_without_events_and_an_unfinished_one() -> None:
    assert "did not finish" in render_timeline(RunLog(graph()), "empty")
    html = render_timeline(record(applied_run()[:6]), "cut short")
    assert "had not returned when the run ended" in html


def test_the_page_escapes_names_and_messages() -> None:
    log = RunLog([kira.Branch('<i>"x"&', noop)])
    log.record(kira.Event("r", "apply_started", '<i>"x"&', at(0), 1))
    log.record(kira.Event("r", "apply_failed", '<i>"x"&', at(1), 1, ValueError("<script>")))
    html = render_timeline(log, "<title>")
    assert "<i>" not in html and "<script>" not in html
    assert "&lt;i&gt;&quot;x&quot;&amp;" in html and "&lt;script&gt;" in html
