"""What an adversarial review found, kept from coming back: extreme durations, callbacks
that never return or raise BaseException, a broken process pool, late unapplies."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import _proc_callbacks as proc
import pytest

import kira


def _recorder() -> tuple[list[str], object]:
    done: list[str] = []
    lock = threading.Lock()

    def unapply(config: object, deps: object, value: object) -> None:
        with lock:
            done.append(str(value))

    return done, unapply


def _boom(config: object, deps: object) -> None:
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize(
    "options, branch_options",
    [
        ({}, {"timeout": 1e10}),  # past threading.TIMEOUT_MAX
        ({"grace_period": 1e12}, {}),
        ({"timeout": 1e10}, {}),
    ],
)
def test_huge_durations_do_not_break_the_rollback(run, options, branch_options) -> None:
    undone, unapply = _recorder()
    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=unapply),
        kira.Branch("b", _boom, ["a"], **branch_options),
    ]
    with pytest.raises(kira.RolledBack) as caught:
        run(None, branches, **options)
    assert undone == ["a"]
    assert caught.value.culprit.branch == "b"


def test_a_retry_far_in_the_future_is_given_up_when_another_branch_fails(run) -> None:
    undone, unapply = _recorder()
    gate = threading.Event()

    def far(config: object, deps: object, error: BaseException, attempt: int) -> object:
        gate.set()  # waits' failure is recorded by now: fails fails after it
        return kira.RetryAfter(1e10)

    def later(config: object, deps: object) -> None:
        gate.wait(5)
        raise ValueError("later")

    def first(config: object, deps: object) -> None:
        raise OSError("first")

    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=unapply),
        kira.Branch("waits", first, ["a"], on_apply_error=far),
        kira.Branch("fails", later, ["a"]),
    ]
    with pytest.raises(kira.RolledBack) as caught:
        run(None, branches, max_workers=4)
    assert undone == ["a"]
    assert [e.branch for e in caught.value.errors] == ["waits", "fails"]


@pytest.mark.parametrize("exc", [SystemExit(4), KeyboardInterrupt(), GeneratorExit()])
def test_on_event_raising_a_base_exception_is_logged_and_the_run_goes_on(run, exc, caplog):
    undone, unapply = _recorder()

    def on_event(event: kira.Event) -> None:
        if event.kind == "applied" and event.branch == "a":
            raise exc

    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=unapply),
        kira.Branch("b", _boom, ["a"]),
    ]
    with pytest.raises(kira.RolledBack):
        run(None, branches, on_event=on_event)
    assert undone == ["a"]
    assert "on_event callback raised on applied" in caplog.text


def test_an_unapply_that_times_out_but_then_finishes_counts_as_unapplied(run) -> None:
    release = threading.Event()
    order: list[str] = []

    def slow_unapply(config: object, deps: object, value: object) -> None:
        release.wait(5)  # past its timeout, then done
        order.append("b undone")

    def unapply_a(config: object, deps: object, value: object) -> None:
        order.append("a undone")

    def release_soon(event: kira.Event) -> None:
        if event.kind == "unapply_failed" and event.branch == "b":
            release.set()

    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=unapply_a),
        kira.Branch("b", lambda c, d: "b", ["a"], unapply=slow_unapply, timeout=0.2),
        kira.Branch("c", _boom, ["b"]),
    ]
    with pytest.raises(kira.RolledBack) as caught:
        run(None, branches, grace_period=10, on_event=release_soon)
    assert order == ["b undone", "a undone"]  # a waited for the late unapply of b
    assert caught.value.unapplied == ("b", "a")
    assert [(e.branch, e.phase) for e in caught.value.errors] == [("c", "apply"), ("b", "unapply")]


def test_an_error_handler_that_never_returns_gives_up_at_the_inactivity_timeout(run) -> None:
    undone, unapply = _recorder()
    stuck = threading.Event()

    def never_decides(config: object, deps: object, error: BaseException, attempt: int) -> bool:
        stuck.wait(10)
        return True

    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=unapply),
        kira.Branch("b", _boom, ["a"], on_apply_error=never_decides),
    ]
    try:
        with pytest.raises(kira.RolledBack) as caught:
            run(None, branches, 0.3)
    finally:
        stuck.set()  # let the handler's thread end
    assert undone == ["a"]
    culprit = caught.value.culprit
    assert culprit.branch == "b" and isinstance(culprit.error, ZeroDivisionError)
    assert isinstance(culprit.handler_error, kira.BranchTimeout)


def test_a_broken_process_pool_still_lets_the_rollback_unapply(run, tmp_path: Path) -> None:
    records = tmp_path / "records"
    with ProcessPoolExecutor(1) as pool:
        pool.submit(proc.pid, None, None).result()  # the worker is up
        branches = [
            kira.Branch(
                "a",
                functools.partial(proc.constant, "a", 1),
                unapply=functools.partial(proc.unapply, "a"),
            ),
            kira.Branch("dies", proc.die, ["a"]),
        ]
        with pytest.raises(kira.RolledBack) as caught:
            run(str(records), branches, executor=pool)
    assert caught.value.unapplied == ("a",)
    assert records.read_text().splitlines() == ["apply a", "unapply a 1"]


def test_an_abandoned_thread_does_not_keep_an_async_program_from_exiting(tmp_path: Path):
    script = tmp_path / "abandon.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, time
            import kira

            async def main():
                branch = kira.Branch("b", lambda c, d: time.sleep(1000), timeout=0.1)
                try:
                    await kira.run_tasks_async(None, [branch], grace_period=0.2)
                except kira.RollbackIncomplete as exc:
                    print("abandoned", exc.abandoned)

            asyncio.run(main())
            """
        )
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "abandoned ('b',)" in done.stdout
    assert time.monotonic() - started < 60  # it exited: the thread did not hold it


def test_json_refuses_a_result_it_would_not_give_back_equal(tmp_path: Path) -> None:
    undone, unapply = _recorder()
    branches = [
        kira.Branch("a", lambda c, d: "a", unapply=unapply),
        kira.Branch("pair", lambda c, d: (1, 2), ["a"], unapply=unapply),
    ]
    with pytest.raises(kira.RolledBack) as caught:
        kira.run_tasks(None, branches, journal=tmp_path / "j.db")
    error = caught.value.culprit.error
    assert isinstance(error, kira.CodecError) and "tuple" in str(error)
    assert undone == ["(1, 2)", "a"]  # the in-memory value was unapplied first
    assert caught.value.results == {"a": "a", "pair": (1, 2)}
