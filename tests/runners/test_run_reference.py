"""The runners agree with kira.testing.run_reference on scripted outcomes.

With max_workers=1 a run is sequential, except for one thing: an error handler
runs alongside the next attempt, so a real runner could learn of the attempt's
end before the decision, while the reference always decides first. A gate makes
every apply and unapply wait until no decision is pending (tracked from the
events), so the real runners see what happened in the reference's order.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

import kira
from kira.testing import run_reference

SEEDS = range(9)


class Scripted(Exception):
    """A scripted failure: which branch, phase and attempt."""


@dataclass
class Plan:
    names: list[str]
    dependencies: dict[str, tuple[str, ...]]
    # how many first attempts fail, per (name, phase); how many retries a handler grants
    fails: dict[tuple[str, str], int] = field(default_factory=dict)
    retries: dict[tuple[str, str], int] = field(default_factory=dict)


def make_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(rng.randint(5, 9))]
    dependencies = {
        name: tuple(rng.sample(names[:i], k=min(i, rng.randint(0, 2))))
        for i, name in enumerate(names)
    }
    rng.shuffle(names)  # definition order is not topological order
    plan = Plan(names, dependencies)
    for name in names:
        recovering = rng.choice([0, 0, 0, 1, 2])
        plan.fails[name, "apply"] = recovering
        plan.retries[name, "apply"] = recovering
        undo_recovering = rng.choice([0, 0, 0, 1])
        plan.fails[name, "unapply"] = undo_recovering
        plan.retries[name, "unapply"] = undo_recovering
    scenario = seed % 3
    if scenario >= 1:  # one apply fails for good
        culprit = rng.choice(names)
        plan.fails[culprit, "apply"] = 99
        plan.retries[culprit, "apply"] = rng.randint(0, 2)
    if scenario == 2:  # and some unapplies too
        for name in rng.sample(names, k=2):
            plan.fails[name, "unapply"] = 99
            plan.retries[name, "unapply"] = rng.randint(0, 1)
    return plan


class Gate:
    """Counts decisions pending (an attempt failed, no retry/give-up event yet)."""

    def __init__(self, wait: bool) -> None:
        self._lock = threading.Lock()
        self.pending = 0
        self.waits = wait
        self.violated = False

    def on_event(self, event: kira.Event) -> None:
        with self._lock:
            if event.kind in ("apply_failed", "unapply_failed"):
                self.pending += 1
            elif event.kind in ("retry_scheduled", "failed"):
                self.pending -= 1

    def _clear(self) -> bool:
        with self._lock:
            return self.pending == 0

    def wait(self) -> None:
        deadline = time.monotonic() + (5 if self.waits else 0)
        while not self._clear():
            if time.monotonic() >= deadline:
                self.violated = True
                return
            time.sleep(0.001)

    async def await_(self) -> None:
        deadline = time.monotonic() + (5 if self.waits else 0)
        while not self._clear():
            if time.monotonic() >= deadline:
                self.violated = True
                return
            await asyncio.sleep(0.001)


def build(plan: Plan, gate: Gate, flavour: str) -> list[kira.Branch]:
    lock = threading.Lock()
    counts: dict[tuple[str, str], int] = {}

    def attempt(name: str, phase: str) -> int:
        with lock:
            n = counts[name, phase] = counts.get((name, phase), 0) + 1
        if n <= plan.fails[name, phase]:
            raise Scripted(f"{phase} of {name}, attempt {n}")
        return n

    def callbacks(name: str):
        def apply(config, deps):
            n = attempt(name, "apply")
            return (name, n, tuple(deps.items()))

        def unapply(config, deps, value):
            assert value[0] == name
            attempt(name, "unapply")

        if flavour == "sync":

            def sync_apply(config, deps):
                gate.wait()
                return apply(config, deps)

            def sync_unapply(config, deps, value):
                gate.wait()
                return unapply(config, deps, value)

            return sync_apply, sync_unapply

        async def async_apply(config, deps):
            await gate.await_()
            return apply(config, deps)

        async def async_unapply(config, deps, value):
            await gate.await_()
            return unapply(config, deps, value)

        return async_apply, async_unapply

    def handler(name: str, phase: str):
        def decide(config, deps, error, n):
            assert isinstance(error, Scripted)
            return n <= plan.retries[name, phase]

        if flavour == "sync":
            return decide

        async def async_decide(config, deps, error, n):
            return decide(config, deps, error, n)

        return async_decide

    branches = []
    for name in plan.names:
        apply, unapply = callbacks(name)
        branches.append(
            kira.Branch(
                name,
                apply,
                plan.dependencies[name],
                unapply=unapply,
                on_apply_error=handler(name, "apply"),
                on_unapply_error=handler(name, "unapply"),
            )
        )
    return branches


def summary(outcome: object, events: list[kira.Event]) -> dict[str, object]:
    """What must agree: the outcome and the timeline (without times)."""
    timeline = [
        (e.kind, e.branch, e.attempt, e.value, None if e.error is None else str(e.error))
        for e in events
    ]
    if isinstance(outcome, dict):
        return {"kind": "applied", "results": list(outcome.items()), "events": timeline}
    assert isinstance(outcome, kira.RunFailed), outcome
    culprit = outcome.culprit
    return {
        "kind": type(outcome).__name__,
        "results": outcome.results,
        "errors": [(e.branch, e.phase, e.attempt, str(e.error)) for e in outcome.errors],
        "culprit": None if culprit is None else (culprit.branch, culprit.phase, culprit.attempt),
        "unapplied": outcome.unapplied,
        "still_applied": getattr(outcome, "still_applied", ()),
        "abandoned": getattr(outcome, "abandoned", ()),
        "events": timeline,
    }


def outcome_of(call):
    try:
        return call()
    except kira.RunFailed as err:
        return err


def reference_summary(plan: Plan, flavour: str) -> dict[str, object]:
    gate = Gate(wait=False)
    events: list[kira.Event] = []

    def on_event(event):
        gate.on_event(event)
        events.append(event)

    branches = build(plan, gate, flavour)
    outcome = outcome_of(
        lambda: run_reference(None, branches, max_workers=1, on_event=on_event, run_id="agree")
    )
    assert not gate.violated, "the reference ran an attempt with a decision pending"
    return summary(outcome, events)


def test_the_seeds_cover_every_kind_of_outcome():
    kinds = {reference_summary(make_plan(seed), "sync")["kind"] for seed in SEEDS}
    assert kinds == {"applied", "RolledBack", "RollbackIncomplete"}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_runner_with_one_worker_agrees_with_the_reference(run, flavour, seed):
    plan = make_plan(seed)
    expected = reference_summary(plan, flavour)

    gate = Gate(wait=True)
    events: list[kira.Event] = []

    def on_event(event):
        gate.on_event(event)
        events.append(event)

    branches = build(plan, gate, flavour)
    outcome = outcome_of(
        lambda: run(None, branches, max_workers=1, on_event=on_event, run_id="agree")
    )
    assert not gate.violated
    assert summary(outcome, events) == expected
