"""`resume`: carry on a journaled run after its process died."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any, final

from ._branch import Branch
from ._driver import Driver
from ._engine import DEFAULT_GRACE_PERIOD, finite_or_none, run_id_or_new
from ._errors import RuntimeStateError
from ._events import EventHandler
from ._journal import Journal, JournalError, _RunRecord, open_journal
from ._state import RuntimeState
from ._threads import default_workers, drive_threads


@final
class ResumeMismatchError(JournalError):
    """The branches given to `resume` are not the ones the run was recorded with.

    `.differences` lists what differs. Resume with the same flow definition (names
    and dependencies); a run cannot change shape half-way.
    """

    def __init__(self, run_id: str, differences: list[str]) -> None:
        super().__init__(
            f"the branches do not match run {run_id!r} as recorded: " + "; ".join(differences)
        )
        self.run_id = run_id
        self.differences = differences


def resume(
    run_id: str,
    config: Any,
    branches: Iterable[Branch],
    *,
    journal: Journal | str | os.PathLike[str],
    timeout: float | None = None,
    max_workers: int | None = None,
    executor: Executor | None = None,
    on_event: EventHandler | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
) -> dict[str, Any]:
    """Carry on run `run_id` from where its journal left it.

    Finished branches keep their recorded results and nothing is done twice that
    the journal shows done. A branch that was mid-attempt is attempted again with
    the same attempt number (so `current_attempt().key` repeats: make applies
    idempotent with it); one whose attempt had failed, awaiting a retry, is
    retried. A run that was rolling back finishes its rollback (a branch that was
    mid-apply is applied again, then unapplied). A run that already finished is not
    run again: its outcome is returned (or raised) as recorded.

    Args:
        run_id: the run to carry on.
        config, branches: as for `run_tasks`; the branches must be those recorded
            (same names and dependencies).
        journal: the `kira.Journal` (or its path) the run was recorded in.
        The other arguments are those of `run_tasks`.

    Returns / raises: as `run_tasks`; and
        RunLocked: another live process is running it.
        ResumeMismatchError: the branches differ from the recorded ones.
        JournalError: no such run, or the journal cannot be read.
    """
    run_id = run_id_or_new(run_id)
    timeout = finite_or_none(timeout, "timeout")
    state = RuntimeState.create(config, branches, timeout)
    recorder, owned = open_journal(journal, existing=True)
    acquired = False  # only a lease this call took is given up here
    try:
        record = recorder.load(run_id)
        _check_same_graph(record, state)
        if record.state == "running":
            record = recorder.acquire(run_id)
            acquired = True
        finished = record.state != "running"
        workers = max_workers if max_workers is not None else default_workers()
        driver = Driver(
            state,
            run_id=run_id,
            limit=workers,
            on_event=None if finished else on_event,
            journal=None if finished else recorder,
        )
        try:
            driver.restore(record.events)
        except (RuntimeStateError, KeyError, TypeError, ValueError) as exc:
            # the events name unknown branches or transitions the rules forbid
            raise JournalError(
                f"journal {recorder.path}: the events of run {run_id!r} do not replay "
                f"({type(exc).__name__}: {exc}); the record is damaged or not kira's"
            ) from exc
        if finished:
            driver.conclude()
            if driver.outcome is None:
                raise JournalError(
                    f"run {run_id!r} is recorded as {record.state} but its events do not "
                    "finish it: the journal is inconsistent"
                )
            return driver.outcome.result()
        outcome = drive_threads(driver, executor, timeout, grace_period, recorder, resume=True)
        return outcome.result()
    finally:
        if acquired:
            recorder.release(run_id)
        if owned:
            recorder.close()


def _check_same_graph(record: _RunRecord, state: RuntimeState) -> None:
    recorded = dict(record.graph)
    given = {name: bs.branch.dependencies for name, bs in state.branch_states.items()}
    differences = []
    for name in recorded:
        if name not in given:
            differences.append(f"branch {name!r} was recorded but is not given")
    for name, deps in given.items():
        if name not in recorded:
            differences.append(f"branch {name!r} is given but was not recorded")
        elif set(deps) != set(recorded[name]):
            differences.append(
                f"branch {name!r} depends on {sorted(deps)}, recorded {sorted(recorded[name])}"
            )
    if differences:
        raise ResumeMismatchError(record.run_id, differences)
