"""`kira run`: exit statuses, summary, --events, --timeline, --set, FLOW forms, errors."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from _cli_support import (
    EXAMPLES,
    ROOT,
    TIMEOUT,
    interrupt_when,
    kira,
    kira_env,
    read_events,
    write_flow,
)

FAILING = """
    import kira

    def ok(config, deps):
        return "A"

    def boom(config, deps):
        raise RuntimeError("b broke")

    def undo(config, deps, value):
        pass

    branches = [
        kira.Branch("a", ok, unapply=undo),
        kira.Branch("b", boom, ["a"]),
        kira.Branch("c", ok, ["b"]),
    ]
"""

UNAPPLY_FAILS = """
    import kira

    def ok(config, deps):
        return "A"

    def boom(config, deps):
        raise RuntimeError("b broke")

    def stuck(config, deps, value):
        raise OSError("cannot undo a")

    branches = [kira.Branch("a", ok, unapply=stuck), kira.Branch("b", boom, ["a"])]
"""

RETRIED = """
    import kira

    calls = []

    class Token:
        def __repr__(self):
            return "Token(7)"

    def a(config, deps):
        return {"n": 1}

    def b(config, deps):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first try")
        return deps["a"]["n"] + 1

    def c(config, deps):
        return Token()

    def retry(config, deps, error, attempt):
        return True

    branches = [
        kira.Branch("a", a),
        kira.Branch("b", b, ["a"], on_apply_error=retry),
        kira.Branch("c", c, ["b"]),
    ]
"""


def summary_rows(stdout: str) -> dict[str, str]:
    """The plain summary table: branch name -> its whole row."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("branch  "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith(("applied:", "rolled back", "ROLLBACK", "inter")):
            break
        rows[line.split()[0]] = line
    return rows


# -- exit statuses ------------------------------------------------------------------------


def test_applied_exits_0_and_summarises_every_branch(tmp_path: Path) -> None:
    done = kira("run", EXAMPLES / "readme_example.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = summary_rows(done.stdout)
    assert set(rows) == {"a", "b", "c"}
    assert all(" applied " in row for row in rows.values())
    assert done.stdout.rstrip().splitlines()[-1].startswith("applied: all 3 branches")


def test_rolled_back_exits_1_and_names_the_culprit(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FAILING)
    done = kira("run", flow, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    assert set(rows) == {"a", "b", "c"}
    assert "unapplied" in rows["a"]
    assert "failed" in rows["b"] and "RuntimeError: b broke" in rows["b"]
    assert "not started" in rows["c"]
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("rolled back") and "b failed for good" in last


def test_rollback_incomplete_exits_2_and_says_what_is_left(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, UNAPPLY_FAILS)
    done = kira("run", flow, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    assert "still applied" in rows["a"] and "OSError: cannot undo a" in rows["a"]
    assert "ROLLBACK INCOMPLETE" in done.stdout and "still applied: a" in done.stdout


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import kira\nbranches = [kira.Branch('a', print\n", "syntax error in"),
        ("import kira\nsteps = []\n", "defines no `branches`"),
        (
            "import kira\nf = lambda c, d: 1\n"
            "branches = [kira.Branch('a', f, ['b']), kira.Branch('b', f, ['a'])]\n",
            "cycle",
        ),
        ("import kira\nf = lambda c, d: 1\nbranches = [kira.Branch('a', f, ['x'])]\n", "'x'"),
        ("import no_such_module_for_kira_tests\n", "No module named"),
        ("branches = ['not a branch']\n", "not a kira.Branch"),
        ("def branches():\n    raise RuntimeError('cannot build')\n", "cannot build"),
    ],
    ids=["syntax", "no-branches", "cycle", "missing-dependency", "import", "not-branch", "raises"],
)
def test_flow_errors_exit_3_with_one_line_and_no_traceback(
    tmp_path: Path, source: str, message: str
) -> None:
    flow = tmp_path / "flow.py"
    flow.write_text(source, encoding="utf-8")
    done = kira("run", flow, cwd=tmp_path)
    assert done.returncode == 3
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kira: error:") and message in lines[0]
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback_of_a_flow_error(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, "import kira\nraise RuntimeError('boom at import')\n")
    done = kira("run", flow, "--debug", cwd=tmp_path)
    assert done.returncode == 3
    assert "Traceback" in done.stderr and "boom at import" in done.stderr


def test_a_missing_file_or_module_exits_3(tmp_path: Path) -> None:
    for flow in (str(tmp_path / "nowhere.py"), "no_such_flow_module_xyz"):
        done = kira("run", flow, cwd=tmp_path)
        assert done.returncode == 3
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "not found" in done.stderr or "no module named" in done.stderr


def test_usage_errors_exit_3_not_2(tmp_path: Path) -> None:
    # 2 means "rollback incomplete": a typo must never look like one.
    for args in (["run"], ["run", "x.py", "--max-workers", "0"], ["frobnicate"], []):
        done = kira(*args, cwd=tmp_path)
        assert done.returncode == 3, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_version_and_help_exit_0(tmp_path: Path) -> None:
    assert kira("--version", cwd=tmp_path).stdout.strip().startswith("kira ")
    helped = kira("run", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--timeline" in helped.stdout


# -- output ---------------------------------------------------------------------------------


def test_non_terminal_output_is_plain_lines(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FAILING)
    done = kira("run", flow, cwd=tmp_path)
    assert "\x1b[" not in done.stdout  # no terminal control codes in a pipe
    lines = done.stdout.splitlines()
    assert lines[0] == f"kira: running {flow} (3 branches)"
    log = [line for line in lines if line.startswith("[")]
    assert any(line.endswith("a: apply started") for line in log)
    assert any("b: apply attempt 1 failed: RuntimeError: b broke" in line for line in log)
    assert any("ROLLBACK STARTED: b failed for good" in line for line in log)
    assert any("a: unapplied" in line for line in log)
    assert log[-1].endswith("run finished: rolled back")


def test_quiet_prints_only_the_summary(tmp_path: Path) -> None:
    done = kira("run", EXAMPLES / "readme_example.py", "--quiet", cwd=tmp_path)
    assert done.returncode == 0
    assert "apply started" not in done.stdout
    assert set(summary_rows(done.stdout)) == {"a", "b", "c"}


def test_events_file_has_one_json_line_per_event_matching_the_run(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, RETRIED)
    events_path = tmp_path / "events.jsonl"
    done = kira("run", flow, "--events", events_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = read_events(events_path)
    assert [(e["kind"], e["branch"], e["attempt"]) for e in events] == [
        ("apply_started", "a", 1),
        ("applied", "a", 1),
        ("apply_started", "b", 1),
        ("apply_failed", "b", 1),
        ("retry_scheduled", "b", 2),
        ("apply_started", "b", 2),
        ("applied", "b", 2),
        ("apply_started", "c", 1),
        ("applied", "c", 1),
        ("run_finished", None, None),
    ]
    assert len({e["run_id"] for e in events}) == 1
    times = [datetime.fromisoformat(e["at"]) for e in events]
    assert all(t.utcoffset() == timedelta(0) for t in times)
    assert times == sorted(times)
    by_kind = {(e["kind"], e["branch"]): e for e in events}
    assert by_kind["apply_failed", "b"]["error"] == {"type": "ValueError", "message": "first try"}
    assert by_kind["applied", "a"]["error"] is None
    assert by_kind["applied", "a"]["value"] == {"n": 1}  # JSON when it serialises
    assert by_kind["applied", "b"]["value"] == 2
    assert by_kind["applied", "c"]["value"] == "Token(7)"  # else its repr
    assert by_kind["run_finished", None]["value"] == "applied"


def test_events_of_a_rollback_name_every_branch_in_order(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FAILING)
    events_path = tmp_path / "events.jsonl"
    kira("run", flow, "--events", events_path, cwd=tmp_path)
    events = read_events(events_path)
    kinds = [e["kind"] for e in events]
    assert kinds == [
        "apply_started",
        "applied",
        "apply_started",
        "apply_failed",
        "failed",
        "rollback_started",
        "unapply_started",
        "unapplied",
        "run_finished",
    ]
    rollback = events[kinds.index("rollback_started")]
    assert rollback["branch"] == "b" and rollback["error"]["type"] == "RuntimeError"
    assert {e["branch"] for e in events} - {None} == {"a", "b"}  # c never started


def test_timeline_page_is_self_contained_and_shows_every_branch(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FAILING)
    page = tmp_path / "timeline.html"
    done = kira("run", flow, "--timeline", page, cwd=tmp_path)
    assert done.returncode == 1
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    for name in ("a", "b", "c"):
        assert f"<b>{name}</b>" in html  # the branch table names each one
    assert "http" not in html  # no external URL of any kind
    assert "<script" not in html and "<link" not in html
    assert "rollback started" in html and "RuntimeError: b broke" in html
    assert "Critical path" in html


def test_timeline_of_a_big_example_names_every_branch(tmp_path: Path) -> None:
    page = tmp_path / "timeline.html"
    done = kira(
        "run",
        EXAMPLES / "trip_booking.py",
        "--set",
        f"db={tmp_path / 'trip.db'}",
        "--set",
        "latency=0",
        "--set",
        "fail=payment",
        "--timeline",
        page,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    html = page.read_text(encoding="utf-8")
    for name in ("customer", "flight", "hotel", "car", "payment", "confirmation"):
        assert f"<b>{name}</b>" in html
    assert "http" not in html
    assert "Rollback in detail" in html or "rollback started" in html


def test_output_to_a_missing_folder_is_refused_before_running(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FAILING)
    done = kira("run", flow, "--events", tmp_path / "no" / "e.jsonl", cwd=tmp_path)
    assert done.returncode == 3 and "does not exist" in done.stderr
    assert "apply started" not in done.stdout


# -- config and FLOW forms -----------------------------------------------------------------

ECHO_CONFIG = """
    import kira

    config = {"x": 1, "keep": "yes"}

    def echo(config, deps):
        return dict(config)

    branches = [kira.Branch("echo", echo)]
"""


def test_set_merges_json_values_into_a_copy_of_the_dict_config(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, ECHO_CONFIG)
    events_path = tmp_path / "e.jsonl"
    done = kira(
        "run",
        flow,
        "--set",
        "x=5",
        "--set",
        "name=hello",
        "--set",
        "flag=true",
        "--set",
        "eq=a=b",
        "--events",
        events_path,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    applied = next(e for e in read_events(events_path) if e["kind"] == "applied")
    assert applied["value"] == {"x": 5, "keep": "yes", "name": "hello", "flag": True, "eq": "a=b"}


def test_set_uses_make_config_and_defaults_to_an_empty_dict(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        """
        import kira

        def make_config():
            return {"made": True}

        branches = [kira.Branch("echo", lambda config, deps: dict(config))]
        """,
    )
    bare = write_flow(
        tmp_path, "import kira\nbranches = [kira.Branch('echo', lambda c, d: c)]\n", "bare.py"
    )
    for path, expected in ((flow, {"made": True, "k": 1}), (bare, {"k": 1})):
        events_path = tmp_path / "e.jsonl"
        done = kira("run", path, "--set", "k=1", "--events", events_path, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        applied = next(e for e in read_events(events_path) if e["kind"] == "applied")
        assert applied["value"] == expected


def test_set_with_a_config_that_is_not_a_dict_is_a_clear_error(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        "import kira\nconfig = 42\nbranches = [kira.Branch('a', lambda c, d: c)]\n",
    )
    done = kira("run", flow, "--set", "x=1", cwd=tmp_path)
    assert done.returncode == 3
    assert "--set needs a dict config" in done.stderr and "int" in done.stderr
    malformed = kira("run", flow, "--set", "novalue", cwd=tmp_path)
    assert malformed.returncode == 3 and "KEY=VALUE" in malformed.stderr


def test_module_name_with_attribute(tmp_path: Path) -> None:
    write_flow(
        tmp_path,
        """
        import kira

        config = {"base": 10}

        other = [kira.Branch("one", lambda config, deps: 1)]

        def build(config):
            return [kira.Branch("plus", lambda c, deps: c["base"] + 1)]
        """,
        "my_flows.py",
    )
    listed = kira("run", "my_flows:other", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert set(summary_rows(listed.stdout)) == {"one"}
    events_path = tmp_path / "e.jsonl"
    built = kira("run", "my_flows:build", "--set", "base=41", "--events", events_path, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert [e["value"] for e in read_events(events_path) if e["kind"] == "applied"] == [42]
    missing = kira("run", "my_flows:nothing_here", cwd=tmp_path)
    assert missing.returncode == 3 and "defines no `nothing_here`" in missing.stderr


def test_path_with_attribute_and_sibling_imports(tmp_path: Path) -> None:
    (tmp_path / "helpers_for_flow.py").write_text("VALUE = 'from a sibling'\n")
    flow = write_flow(
        tmp_path,
        """
        import kira
        from helpers_for_flow import VALUE

        steps = [kira.Branch("s", lambda config, deps: VALUE)]
        """,
    )
    done = kira("run", f"{flow}:steps", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "from a sibling" in summary_rows(done.stdout)["s"]


def test_max_workers_and_timeout_reach_the_run(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        """
        import threading, time
        import kira

        lock = threading.Lock()
        running = []
        peak = []

        def work(config, deps):
            with lock:
                running.append(1)
                peak.append(len(running))
            time.sleep(0.05)
            with lock:
                running.pop()
            return max(peak)

        def hang(config, deps):
            time.sleep(0.5)

        branches = [kira.Branch(f"w{i}", work) for i in range(4)]
        slow = [kira.Branch("hang", hang)]
        """,
    )
    events_path = tmp_path / "e.jsonl"
    done = kira("run", flow, "--max-workers", "1", "--events", events_path, cwd=tmp_path)
    assert done.returncode == 0
    assert max(e["value"] for e in read_events(events_path) if e["kind"] == "applied") == 1
    timed = kira("run", f"{flow}:slow", "--timeout", "0.1", cwd=tmp_path)
    assert timed.returncode == 1
    assert "BranchTimeout" in timed.stdout and "no progress for 0.1 s" in timed.stdout


# -- Ctrl-C and the installed command --------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_rolls_back_prints_the_summary_and_exits_130(tmp_path: Path) -> None:
    marker = tmp_path / "undone"
    flow = write_flow(
        tmp_path,
        f"""
        import pathlib, time
        import kira

        def quick(config, deps):
            return "A"

        def undo(config, deps, value):
            pathlib.Path({str(marker)!r}).write_text(value)

        def slow(config, deps):
            time.sleep(1.0)
            return "B"

        branches = [
            kira.Branch("a", quick, unapply=undo),
            kira.Branch("b", slow, ["a"]),
            kira.Branch("c", quick, ["b"]),
        ]
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kira", "run", str(flow)],
        cwd=tmp_path,
        env=kira_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = interrupt_when(proc, "b: apply started")
    assert proc.returncode == 130, out + err
    assert "ROLLBACK STARTED: the run was interrupted" in out
    assert "interrupted; rolled back" in out
    assert set(summary_rows(out)) == {"a", "b", "c"}
    assert marker.read_text() == "A"  # a was unapplied
    assert "Traceback" not in err


def test_the_installed_console_script_runs(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "kira"
    if not script.exists():
        pytest.skip("kira is not installed as a console script in this environment")
    done = subprocess.run(
        [str(script), "run", str(EXAMPLES / "readme_example.py"), "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "applied: all 3 branches" in done.stdout


def test_a_closed_pipe_does_not_stop_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "b-ran"
    flow = write_flow(
        tmp_path,
        f"""
        import pathlib, time
        import kira

        def a(config, deps):
            time.sleep(0.5)  # the reader has gone by the time a's events are written

        def b(config, deps):
            pathlib.Path({str(marker)!r}).write_text("yes")

        branches = [kira.Branch("a", a), kira.Branch("b", b, ["a"])]
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kira", "run", str(flow)],
        cwd=tmp_path,
        env=kira_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("kira: running")
    proc.stdout.close()  # like `kira run ... | head -1`
    err = proc.stderr.read()
    assert proc.wait(timeout=TIMEOUT) == 0
    assert marker.read_text() == "yes"
    assert err == ""


def test_an_unexpected_error_is_a_bug_report_with_status_70(tmp_path: Path) -> None:
    code = (
        "import sys, kira\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('simulated bug')\n"
        "kira.run_tasks = broken\n"
        "from kira._cli import main\n"
        f"sys.exit(main(['run', {str(EXAMPLES / 'readme_example.py')!r}, '-q']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 70  # never 1 or 2: a crash must not pass for an outcome
    assert "simulated bug" in done.stderr and "internal error" in done.stderr
