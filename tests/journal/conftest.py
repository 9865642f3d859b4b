"""The journal tests: durable runs, crash recovery and `kira.resume`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Worker processes (process pools) import `_journal_callbacks` by name, and the
# tests import `_journal_support`: keep this directory importable whatever the
# pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _no_crash_hook_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash hook must only ever kill the subprocesses made to crash, never
    the test process (a Journal reads KIRA_TEST_CRASH_AT when it is created)."""
    monkeypatch.delenv("KIRA_TEST_CRASH_AT", raising=False)
