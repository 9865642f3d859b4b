"""Group commits: many transitions per commit, intents written ahead of starts,
commits in a writer thread, on both runners."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from _journal_support import call_in_thread

import kira
from kira import _journal

RUNNERS = ["threads", "asyncio"]


def _run(runner: str, branches: list[kira.Branch], **options: Any) -> dict[str, Any]:
    if runner == "threads":
        return call_in_thread(lambda: kira.run_tasks(None, branches, **options))
    return call_in_thread(lambda: asyncio.run(kira.run_tasks_async(None, branches, **options)))


def _layers(width: int, depth: int) -> list[kira.Branch]:
    """`depth` layers of `width` no-op branches, each depending on two of the layer
    before; each returns the sum of its dependencies' results plus one."""
    branches = []
    for layer in range(depth):
        for i in range(width):
            deps = () if layer == 0 else (f"l{layer - 1}-{i}", f"l{layer - 1}-{(i + 1) % width}")
            branches.append(
                kira.Branch(
                    f"l{layer}-{i}", lambda config, deps: sum(deps.values()) + 1, dependencies=deps
                )
            )
    return branches


class _Commits:
    """Counts the journal's commits and the rows in each (in any thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        commit = _journal.Journal.commit

        def counting(journal: _journal.Journal, rows: list[Any]) -> None:
            if rows:
                self.sizes.append(len(rows))
                self.threads.add(threading.current_thread().name)
            commit(journal, rows)

        monkeypatch.setattr(_journal.Journal, "commit", counting)


@pytest.mark.parametrize("runner", RUNNERS)
def test_many_starts_share_a_commit_however_few_run_at_once(
    runner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = _Commits(monkeypatch)
    branches = _layers(width=100, depth=10)
    path = tmp_path / "journal.db"
    results = _run(runner, branches, max_workers=2, journal=path, run_id="r")
    # layer k gives 2 ** (k + 1) - 1
    assert {results[f"l{k}-{i}"] for k in (0, 9) for i in range(100)} == {1, 1023}
    # One commit per start, or per two (the workers), would be 500 to 1,000 commits:
    # intents let a start go without a commit of its own.
    assert len(commits.sizes) < 200, commits.sizes
    assert commits.threads == {"kira-journal"}  # off the scheduling thread
    with kira.Journal(path) as journal:
        events = journal.events("r")
        recorded = journal.load("r").events
    assert len(events) == 2 * 1000 + 1
    assert [e.kind for e in events].count("applied") == 1000
    assert {e.kind for e in recorded} - {e.kind for e in events} == {"apply_intent"}
    # every start was covered by an intent committed before it, or came first
    intended: set[str] = set()
    for event in recorded:
        if event.kind == "apply_intent":
            intended |= set(event.value)
    assert len(intended) > 900
    # the recorded run is whole: resuming it runs nothing and gives the results
    assert kira.resume("r", None, branches, journal=path) == results


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_start_on_an_intent_waits_for_its_dependencies_results_to_be_durable(
    runner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When a branch's callback runs, the journal on disk already holds its
    # dependencies' results and a start or intent for it.
    path = tmp_path / "journal.db"
    problems: list[str] = []

    def check(name: str, deps: tuple[str, ...]) -> Any:
        def apply(config: Any, got: Any) -> int:
            with kira.Journal(path, readonly=True) as journal:
                recorded = journal.load("r").events
            applied = {e.branch for e in recorded if e.kind == "applied"}
            started = {e.branch for e in recorded if e.kind == "apply_started"}
            for e in recorded:
                if e.kind == "apply_intent":
                    started |= set(e.value)
            if not set(deps) <= applied:
                problems.append(f"{name} runs before {set(deps) - applied} are recorded")
            if name not in started:
                problems.append(f"{name} runs before its start or intent is recorded")
            return sum(got.values()) + 1

        return apply

    graph = [(f"b{i}", (f"b{i - 3}",) if i >= 3 else ()) for i in range(30)]
    branches = [kira.Branch(n, check(n, d), dependencies=d) for n, d in graph]
    _run(runner, branches, max_workers=2, journal=path, run_id="r")
    assert problems == []


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_commit_that_fails_stops_the_run_with_the_journal_error(
    runner: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    commit = _journal.Journal.commit
    count = [0]

    def failing(journal: _journal.Journal, rows: list[Any]) -> None:
        count[0] += bool(rows)
        if count[0] == 3:
            raise kira.JournalError("disk full (on purpose)")
        commit(journal, rows)

    monkeypatch.setattr(_journal.Journal, "commit", failing)

    def apply(name: str) -> Any:
        def go(config: Any, deps: Any) -> int:
            calls.append(name)
            return 1

        return go

    branches = [
        kira.Branch(f"b{i}", apply(f"b{i}"), dependencies=(f"b{i - 1}",) if i else ())
        for i in range(10)
    ]
    with pytest.raises(kira.JournalError, match="disk full"):
        _run(runner, branches, journal=tmp_path / "journal.db", run_id="r")
    # nothing ran past what the journal holds: the third commit carried b1's result
    # and b2's start, so b2 never began
    assert calls == ["b0", "b1"]


def test_first_apply_ready_is_the_order_starts_take() -> None:
    branches = [
        kira.Branch(name, lambda config, deps: 0, dependencies=deps)
        for name, deps in [("z", ()), ("y", ()), ("x", ("z",)), ("w", ()), ("v", ())]
    ]
    state = kira.RuntimeState.create(None, branches)
    assert state.first_apply_ready(3) == ["z", "y", "w"]
    assert state.first_apply_ready(10) == ["z", "y", "w", "v"]
    assert state.first_apply_ready(0) == []
    assert state.apply_ready_count() == 4
    state.mark_as_applying("y", 1)
    state.mark_as_applying("z", 2)
    state.mark_as_applied("z", 0)
    assert state.first_apply_ready(10) == ["x", "w", "v"]
    assert state.apply_ready_count() == 3
    # it takes nothing: the starts come in that order
    order = []
    while (name := state.next_apply_ready()) is not None:
        order.append(name)
        state.mark_as_applying(name, len(order) + 2)
    assert order == ["x", "w", "v"]
    state.mark_as_applied("x", 0)
    assert state.apply_ready_count() == 0
    state.start_rollback()
    assert state.first_apply_ready(10) == []
    assert state.apply_ready_count() == 0
