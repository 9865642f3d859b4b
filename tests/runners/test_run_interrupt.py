"""Interruption: Ctrl-C (a real SIGINT to a real process) and asyncio cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _runners_support import WAIT, Log, await_event, call_in_thread, flavoured, wait

import kira

SRC = str(Path(__file__).resolve().parents[2] / "src")

FLOW = """
import asyncio, os, sys, time
import kira

RUNNER, RECORDS, READY, ROLLBACK, STOP = sys.argv[1:6]


def record(line):
    with open(RECORDS, "a", encoding="utf-8") as f:
        f.write(line + "\\n")


def recorded(name):
    def apply(config, deps):
        record("apply " + name)
        return name

    def unapply(config, deps, value):
        record("unapply " + name)

    return {"apply": apply, "unapply": unapply}


def blocker(config, deps):
    open(READY, "w").close()  # every other branch has applied
    deadline = time.monotonic() + 10
    while not os.path.exists(STOP) and time.monotonic() < deadline:
        time.sleep(0.01)
    record("apply z")
    return "z"


def unapply_z(config, deps, value):
    record("unapply z")


def on_event(event):
    if event.kind == "rollback_started":
        open(ROLLBACK, "w").close()


branches = [
    kira.Branch("a", **recorded("a")),
    kira.Branch("b", dependencies=("a",), **recorded("b")),
    kira.Branch("c", dependencies=("a",), **recorded("c")),
    kira.Branch("z", blocker, ("b", "c"), unapply=unapply_z),
    kira.Branch("after", dependencies=("z",), **recorded("after")),
]
if RUNNER == "threads":
    kira.run_tasks(None, branches, on_event=on_event)
else:
    asyncio.run(kira.run_tasks_async(None, branches, on_event=on_event))
record("finished normally")
"""

DEPENDENCIES = {"a": (), "b": ("a",), "c": ("a",), "z": ("b", "c"), "after": ("z",)}


def wait_for_file(path, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the flow exited early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.01)


def test_ctrl_c_rolls_back_then_exits_interrupted(run, tmp_path):
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW, encoding="utf-8")
    records, ready, rollback, stop = (
        tmp_path / name for name in ("records.txt", "ready", "rollback", "stop")
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, str(flow), run.kind, str(records), str(ready), str(rollback), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_file(ready, proc)
        proc.send_signal(signal.SIGINT)
        wait_for_file(rollback, proc)
        stop.touch()  # only now may the running branch return
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    interrupted = proc.returncode in (-signal.SIGINT, 130) or "KeyboardInterrupt" in stderr
    assert interrupted, (proc.returncode, stderr)
    lines = records.read_text(encoding="utf-8").splitlines()
    assert "finished normally" not in lines
    applied = [line.split()[1] for line in lines if line.startswith("apply ")]
    undone = [line.split()[1] for line in lines if line.startswith("unapply ")]
    # z was running (a thread): it was let finish, and its value unapplied too
    assert sorted(applied) == ["a", "b", "c", "z"], lines
    assert sorted(undone) == sorted(applied), lines
    for name, deps in DEPENDENCIES.items():
        for dep in deps:
            if name in undone:
                assert undone.index(name) < undone.index(dep), lines


@pytest.mark.parametrize("blocked", ["sync", "async"])
def test_cancelling_run_tasks_async_rolls_back_then_cancels(blocked):
    log = Log()
    ready = threading.Event()
    release = threading.Event()
    cancelled = threading.Event()

    def recorded(name):
        def apply(config, deps):
            log.add(("apply", name))
            return name.upper()

        def unapply(config, deps, value):
            log.add(("unapply", value))

        return {"apply": flavoured(blocked, apply), "unapply": flavoured(blocked, unapply)}

    def z_sync(config, deps):
        ready.set()
        wait(release)  # a thread: it cannot be cancelled, so it is waited for
        log.add(("apply", "z"))
        return "Z"

    async def z_async(config, deps):
        ready.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "Z"

    def on_event(event):
        if event.kind == "rollback_started":
            release.set()

    branches = [
        kira.Branch("a", **recorded("a")),
        kira.Branch("b", dependencies=("a",), **recorded("b")),
        kira.Branch(
            "z",
            z_sync if blocked == "sync" else z_async,
            ("b",),
            unapply=recorded("z")["unapply"],
        ),
        kira.Branch("after", dependencies=("z",), **recorded("after")),
    ]

    async def main():
        task = asyncio.create_task(kira.run_tasks_async(None, branches, on_event=on_event))
        await await_event(ready)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError as exc:
            return task.cancelled(), exc
        raise AssertionError("the task was not cancelled")

    was_cancelled, exc = call_in_thread(lambda: asyncio.run(main()))
    assert was_cancelled
    outcome = exc.__cause__
    assert isinstance(outcome, kira.RolledBack)
    assert outcome.culprit is None  # nothing failed: the run was stopped
    if blocked == "sync":
        assert log.items == [
            ("apply", "a"),
            ("apply", "b"),
            ("apply", "z"),
            ("unapply", "Z"),
            ("unapply", "B"),
            ("unapply", "A"),
        ]
        assert outcome.unapplied == ("z", "b", "a")
    else:
        assert cancelled.is_set()
        assert log.items == [("apply", "a"), ("apply", "b"), ("unapply", "B"), ("unapply", "A")]
        assert outcome.unapplied == ("b", "a")
