"""Helpers for the command-line tests: run `python -m kira` in a subprocess, with
time limits, and read what it wrote."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

TIMEOUT = 60.0
"""Seconds any one `kira` process may take before the test fails instead of hanging."""


def kira_env(**extra: str) -> dict[str, str]:
    """The environment for a `kira` subprocess: no colour tricks, no terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def kira(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m kira ARGS` to completion; stdout and stderr are captured."""
    return subprocess.run(
        [sys.executable, "-m", "kira", *map(str, args)],
        cwd=cwd,
        env=env if env is not None else kira_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def write_flow(folder: Path, source: str, name: str = "flow.py") -> Path:
    """Write a flow module (dedented) into `folder`; return its path."""
    path = folder / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of an --events file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_in_pty(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = TIMEOUT
) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdin/stdout/stderr (as in a terminal);
    return its exit status and everything it wrote."""
    import pty  # noqa: PLC0415 (POSIX only: the callers skip elsewhere)

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{argv} did not finish within {timeout} s")
        status = proc.wait(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return status, b"".join(chunks).decode("utf-8", "replace")


def interrupt_when(
    proc: subprocess.Popen[str], marker: str, timeout: float = TIMEOUT
) -> tuple[str, str]:
    """Read `proc`'s stdout until a line contains `marker`, send it SIGINT, and return
    (stdout, stderr) once it exits."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while marker not in seen:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"never saw {marker!r}; output so far:\n{seen}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            seen += os.read(fd, 65536).decode()
    proc.send_signal(signal.SIGINT)
    os.set_blocking(fd, True)
    out, err = proc.communicate(timeout=timeout)
    return seen + out, err
