"""In a terminal: the live display with rich, and the plain fallback without it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_support import EXAMPLES, TIMEOUT, kira_env, run_in_pty, write_flow

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")

FAILING = """
    import time
    import kira

    def ok(config, deps):
        time.sleep(1.0)  # long enough for the live area to redraw several times
        return "A"

    def boom(config, deps):
        raise RuntimeError("b broke")

    branches = [
        kira.Branch("alpha", ok, unapply=lambda c, d, v: None),
        kira.Branch("beta", boom, ["alpha"]),
    ]
"""


def terminal_env() -> dict[str, str]:
    return kira_env(TERM="xterm-256color", COLUMNS="120", LINES="40")


def test_rich_live_display_in_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    flow = write_flow(tmp_path, FAILING)
    status, screen = run_in_pty(
        [sys.executable, "-m", "kira", "run", str(flow)], tmp_path, terminal_env()
    )
    assert status == 1, screen
    assert "\x1b[" in screen  # rich drew with terminal codes
    assert "running now" in screen  # the live area showed alpha applying
    assert "ROLLBACK STARTED: beta failed for good after 1 attempt" in screen
    assert "summary" in screen and "alpha" in screen and "unapplied" in screen
    assert "[   0.000s]" not in screen  # not the plain log


def test_plain_lines_in_a_terminal_when_rich_is_missing(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, FAILING)
    # rich "uninstalled": a None entry in sys.modules makes every import of it fail
    code = (
        "import sys; sys.modules['rich'] = None; from kira._cli import main; "
        f"sys.exit(main(['run', {str(flow)!r}]))"
    )
    status, screen = run_in_pty([sys.executable, "-c", code], tmp_path, terminal_env())
    assert status == 1, screen
    assert "ROLLBACK STARTED: beta failed for good" in screen
    assert "alpha: unapplied" in screen
    assert "\x1b[" not in screen


def test_quiet_in_a_terminal_shows_no_live_display(tmp_path: Path) -> None:
    status, screen = run_in_pty(
        [sys.executable, "-m", "kira", "run", str(EXAMPLES / "readme_example.py"), "-q"],
        tmp_path,
        terminal_env(),
    )
    assert status == 0, screen
    assert "running now" not in screen and "apply started" not in screen
    assert "applied: all 3 branches" in screen


def test_importing_kira_does_not_import_rich() -> None:
    code = (
        "import sys, kira, kira._cli, kira.__main__; "
        "assert 'rich' not in sys.modules, 'rich was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr


def test_names_and_errors_are_shown_literally_not_as_rich_markup(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    flow = write_flow(
        tmp_path,
        """
        import kira

        def boom(config, deps):
            raise OSError("[bold]not bold[/bold]")

        branches = [
            kira.Branch("[red]odd", lambda c, d: "[dim]v", unapply=lambda c, d, v: None),
            kira.Branch("b", boom, ["[red]odd"]),
        ]
        """,
    )
    status, screen = run_in_pty(
        [sys.executable, "-m", "kira", "run", str(flow)], tmp_path, terminal_env()
    )
    assert status == 1, screen
    assert "[red]odd" in screen and "[dim]v" in screen
    assert "[bold]not bold[/bold]" in screen


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_the_summary_fits_the_terminal_and_keeps_room_for_errors(
    tmp_path: Path, columns: int
) -> None:
    pytest.importorskip("rich")
    flow = write_flow(
        tmp_path,
        """
        import kira

        def boom(config, deps):
            raise OSError("the hotel service refused the booking for tonight")

        branches = [
            kira.Branch("customer", lambda c, d: {"id": 1}, unapply=lambda c, d, v: None),
            kira.Branch("hotel", boom, ["customer"]),
        ]
        """,
    )
    env = kira_env(TERM="xterm-256color", COLUMNS=str(columns), LINES="40")
    status, screen = run_in_pty([sys.executable, "-m", "kira", "run", str(flow)], tmp_path, env)
    assert status == 1, screen
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).replace("\r", "")
    table = [line for line in text.splitlines() if line[:1] in set("┏┃┡│└")]
    header = next(line for line in table if "branch" in line)
    assert all(len(line.rstrip()) <= columns for line in table), "\n".join(table)
    # results only where there is room; the error always, whole, on few lines
    assert ("result" in header) == (columns >= 110)
    assert ("duration" in header) == (columns >= 80)
    error_lines = [line.split("│")[-2].strip() for line in table if line.startswith("│")]
    assert " ".join(filter(None, error_lines)).endswith(
        "OSError: the hotel service refused the booking for tonight"
    )
