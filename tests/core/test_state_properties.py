"""Property tests of the runtime state (Hypothesis stateful) and of the reference
driver over random graphs and scripted outcomes."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import kira
from kira import (
    DoneApplied,
    DoneUnapplied,
    Failed,
    NotStarted,
    RunningApply,
    RunningApplyRetry,
    RunningUnapply,
    RunningUnapplyRetry,
    RuntimeStateError,
    UnapplyFailed,
)
from kira._state import ACTIONS
from kira.testing import FakeClock, Returns, run_reference

APPLYING = frozenset({RunningApply, RunningApplyRetry})
UNAPPLYING = frozenset({RunningUnapply, RunningUnapplyRetry})
RUNNING = APPLYING | UNAPPLYING
# the apply succeeded at some point
SUCCEEDED = frozenset(
    {DoneApplied, RunningUnapply, RunningUnapplyRetry, DoneUnapplied, UnapplyFailed}
)
# holds its dependencies: they may not start unapplying
HOLDING = APPLYING | UNAPPLYING | {DoneApplied, UnapplyFailed}

ALLOWED = {
    "mark_as_applying": {NotStarted},
    "record_failure": RUNNING,
    "record_apply_retry": APPLYING,
    "mark_as_applied": APPLYING,
    "mark_as_failed": APPLYING,
    "unblock_dependent_unapplies": {NotStarted, Failed, DoneUnapplied},
    "mark_as_unapplying": {DoneApplied},
    "record_unapply_retry": UNAPPLYING,
    # from UnapplyFailed: a timed-out unapply given up on returned after all
    "mark_as_unapplied": UNAPPLYING | {UnapplyFailed},
    "mark_as_unapply_failed": UNAPPLYING,
    "mark_as_lingering": RUNNING,
    "mark_lingering_finished": None,  # any task state
}
TAKES_TASK_ID = {
    "mark_as_applying",
    "record_apply_retry",
    "mark_as_unapplying",
    "record_unapply_retry",
}


def noop(config, deps):
    return None


def snapshot(state):
    """Everything observable about `state` through its public interface."""
    p = state.progress
    return (
        list(state.branch_states),
        {
            name: (
                bs.task,
                bs.errors,
                bs.apply_attempts,
                bs.unapply_attempts,
                bs.lingering,
                bs.awaiting,
                bs.awaiting_unapply,
            )
            for name, bs in state.branch_states.items()
        },
        dict(state.running),
        (
            p.total,
            p.applied,
            p.unapplied,
            frozenset(p.applies_running),
            frozenset(p.applies_retrying),
            frozenset(p.unapplies_running),
            frozenset(p.unapplies_retrying),
        ),
        state.find_apply_ready(),
        state.find_unapply_ready(),
        state.next_apply_ready(),
        state.next_unapply_ready(),
        state.apply_done(),
        state.unapply_done(),
        state.rolling_back,
        state.get_errors(),
        state.get_done(),
    )


class RuntimeStateMachine(RuleBasedStateMachine):
    """Drives a RuntimeState with legal transitions and random (often illegal) ones,
    keeping a small model of what the public interface cannot show (which attempt
    failed, lingering and abandoned attempts), and checks every rule after each step."""

    @initialize(data=st.data())
    def build(self, data):
        n = data.draw(st.integers(1, 30), label="branches")
        deps = []
        for i in range(n):
            if i == 0:
                deps.append([])
            else:
                deps.append(
                    data.draw(
                        st.lists(st.integers(0, i - 1), unique=True, max_size=min(i, 6)),
                        label=f"deps of b{i}",
                    )
                )
        order = data.draw(st.permutations(range(n)), label="definition order")
        self.names = [f"b{i}" for i in range(n)]
        self.deps = {f"b{i}": tuple(f"b{j}" for j in deps[i]) for i in range(n)}
        self.dependents = {name: [] for name in self.names}
        for name, mine in self.deps.items():
            for d in mine:
                self.dependents[d].append(name)
        branches = [kira.Branch(f"b{i}", noop, self.deps[f"b{i}"]) for i in order]
        self.definition_order = [b.name for b in branches]
        self.clock = FakeClock()
        self.state = kira.RuntimeState.create("config", branches, clock=self.clock)
        self.next_id = 0
        self.rolling_back = False
        self.failed = set()  # current attempt failed, awaiting a retry or a give-up
        self.lingering = dict.fromkeys(self.names, 0)
        self.lingering_attempt = set()  # the current attempt was marked lingering
        self.abandoned = dict.fromkeys(self.names, 0)
        self.apply_attempts = dict.fromkeys(self.names, 0)
        self.unapply_attempts = dict.fromkeys(self.names, 0)
        self.errors = []
        self.ever_applied = set()

    # -- helpers --------------------------------------------------------------------

    def task(self, name):
        return type(self.state.branch_states[name].task)

    def in_states(self, states):
        return sorted(n for n in self.names if self.task(n) in states)

    def holds(self, name):
        return self.task(name) in HOLDING or self.lingering[name] or self.abandoned[name]

    def fresh_id(self):
        self.next_id += 1
        return self.next_id

    def expected_ok(self, name, action, task_id):
        """Whether `action` on `name` must be accepted (None: either is fine)."""
        if name not in self.deps:
            return False
        t = self.task(name)
        allowed = ALLOWED[action]
        if allowed is not None and t not in allowed:
            return False
        owner = self.state.running.get(task_id) if action in TAKES_TASK_ID else None
        id_ok = owner is None or owner == name
        failed = name in self.failed
        match action:
            case "mark_as_applying":
                deps_ok = all(self.task(d) in SUCCEEDED for d in self.deps[name])
                return deps_ok and not self.rolling_back and id_ok
            case "record_failure" | "mark_as_applied":
                return not failed
            case "mark_as_unapplied":
                return not failed and not (t is UnapplyFailed and self.lingering[name])
            case "record_apply_retry":
                return failed and not self.rolling_back and id_ok
            case "mark_as_failed" | "mark_as_unapply_failed":
                return failed
            case "record_unapply_retry":
                return failed and id_ok
            case "unblock_dependent_unapplies":
                return not (self.lingering[name] or self.abandoned[name])
            case "mark_as_unapplying":
                held = any(self.holds(d) for d in self.dependents[name])
                return self.rolling_back and not held and id_ok
            case "mark_as_lingering":
                if name in self.lingering_attempt:
                    return None  # the same attempt twice: see test_state.py
                return failed
            case "mark_lingering_finished":
                return self.lingering[name] > 0
        raise AssertionError(action)

    def call(self, name, action, task_id=None, abandoned=False):
        """Carry out `action` and update the model; return what it returned."""
        s = self.state
        if action == "record_failure":
            self.clock.advance(1)
            error = RuntimeError(f"{name} failed")
            record = s.record_failure(name, error)
            phase = "apply" if self.task(name) in APPLYING else "unapply"
            attempts = self.apply_attempts if phase == "apply" else self.unapply_attempts
            assert record.branch == name
            assert record.phase == phase
            assert record.error is error
            assert record.attempt == attempts[name]
            assert record.at == self.clock()
            self.failed.add(name)
            self.errors.append(record)
            return record
        if action == "mark_lingering_finished":
            s.mark_lingering_finished(name, abandoned=abandoned)
            self.lingering[name] -= 1
            self.abandoned[name] += abandoned
            return None
        if action in TAKES_TASK_ID:
            getattr(s, action)(name, task_id)
        elif action == "mark_as_applied":
            getattr(s, action)(name, ("value", name))
        else:
            getattr(s, action)(name)
        event(f"did {action}")
        match action:
            case "mark_as_applying":
                self.apply_attempts[name] = 1
                self.lingering_attempt.discard(name)
            case "record_apply_retry":
                self.apply_attempts[name] += 1
                self.failed.discard(name)
                self.lingering_attempt.discard(name)
            case "mark_as_applied":
                self.ever_applied.add(name)
            case "mark_as_failed":
                self.failed.discard(name)
                self.rolling_back = True
            case "mark_as_unapplying":
                self.unapply_attempts[name] = 1
                self.lingering_attempt.discard(name)
            case "record_unapply_retry":
                self.unapply_attempts[name] += 1
                self.failed.discard(name)
                self.lingering_attempt.discard(name)
            case "mark_as_unapply_failed":
                self.failed.discard(name)
            case "mark_as_lingering":
                self.lingering[name] += 1
                self.lingering_attempt.add(name)
        return None

    # -- legal moves ------------------------------------------------------------------

    @precondition(lambda self: self.state.find_apply_ready())
    @rule(data=st.data())
    def start_apply(self, data):
        name = data.draw(st.sampled_from(sorted(self.state.find_apply_ready())))
        self.call(name, "mark_as_applying", self.fresh_id())

    @precondition(lambda self: any(n not in self.failed for n in self.in_states(APPLYING)))
    @rule(data=st.data())
    def succeed_apply(self, data):
        candidates = [n for n in self.in_states(APPLYING) if n not in self.failed]
        self.call(data.draw(st.sampled_from(candidates)), "mark_as_applied")

    @precondition(lambda self: any(n not in self.failed for n in self.in_states(RUNNING)))
    @rule(data=st.data())
    def fail_attempt(self, data):
        candidates = [n for n in self.in_states(RUNNING) if n not in self.failed]
        self.call(data.draw(st.sampled_from(candidates)), "record_failure")

    def retryable(self):
        return [
            n for n in sorted(self.failed) if self.task(n) in UNAPPLYING or not self.rolling_back
        ]

    @precondition(lambda self: self.retryable())
    @rule(data=st.data())
    def retry(self, data):
        name = data.draw(st.sampled_from(self.retryable()))
        action = "record_apply_retry" if self.task(name) in APPLYING else "record_unapply_retry"
        self.call(name, action, self.fresh_id())

    @precondition(lambda self: self.failed)
    @rule(data=st.data())
    def give_up(self, data):
        name = data.draw(st.sampled_from(sorted(self.failed)))
        action = "mark_as_failed" if self.task(name) in APPLYING else "mark_as_unapply_failed"
        self.call(name, action)

    @precondition(lambda self: set(self.failed) - self.lingering_attempt)
    @rule(data=st.data())
    def time_out_and_linger(self, data):
        name = data.draw(st.sampled_from(sorted(set(self.failed) - self.lingering_attempt)))
        self.call(name, "mark_as_lingering")

    @precondition(lambda self: any(self.lingering.values()))
    @rule(data=st.data(), abandoned=st.booleans())
    def lingering_attempt_finished(self, data, abandoned):
        name = data.draw(st.sampled_from(sorted(n for n, k in self.lingering.items() if k)))
        self.call(name, "mark_lingering_finished", abandoned=abandoned)

    @precondition(lambda self: self.state.find_apply_ready())
    @rule()
    def apply_every_ready_branch(self):
        # a macro step, so that runs get deep within the step budget
        for name in sorted(self.state.find_apply_ready()):
            self.call(name, "mark_as_applying", self.fresh_id())
            self.call(name, "mark_as_applied")

    @precondition(lambda self: self.state.find_unapply_ready())
    @rule()
    def unapply_every_ready_branch(self):
        for name in sorted(self.state.find_unapply_ready()):
            self.call(name, "mark_as_unapplying", self.fresh_id())
            self.call(name, "mark_as_unapplied")

    @rule(go=st.integers(0, 5))
    def start_rollback(self, go):
        if go == 0:  # now and then, so that applying gets explored too
            self.state.start_rollback()
            self.rolling_back = True

    @precondition(lambda self: self.state.find_unapply_ready())
    @rule(data=st.data())
    def start_unapply(self, data):
        name = data.draw(st.sampled_from(sorted(self.state.find_unapply_ready())))
        self.call(name, "mark_as_unapplying", self.fresh_id())

    @precondition(lambda self: any(n not in self.failed for n in self.in_states(UNAPPLYING)))
    @rule(data=st.data())
    def succeed_unapply(self, data):
        candidates = [n for n in self.in_states(UNAPPLYING) if n not in self.failed]
        self.call(data.draw(st.sampled_from(candidates)), "mark_as_unapplied")

    # -- anything at all --------------------------------------------------------------

    @rule(data=st.data())
    def random_action(self, data):
        name = data.draw(st.sampled_from([*self.names, "unknown"]), label="branch")
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        task_id = None
        if action in TAKES_TASK_ID:
            running = sorted(self.state.running)
            if running and data.draw(st.booleans(), label="reuse a running task id"):
                task_id = data.draw(st.sampled_from(running))
            else:
                task_id = self.fresh_id()
        abandoned = data.draw(st.booleans(), label="abandoned")
        expected = self.expected_ok(name, action, task_id)
        before = snapshot(self.state)
        try:
            self.call(name, action, task_id, abandoned)
        except RuntimeStateError as exc:
            event(f"refused {action}")
            assert expected is not True, f"{action}({name!r}) refused: {exc}"
            assert snapshot(self.state) == before, f"refused {action}({name!r}) changed the state"
            if name != "unknown":
                assert exc.action == action
                assert repr(name) in str(exc)
        else:
            event(f"random {action} accepted")
            assert expected is not False, f"{action}({name!r}) accepted"

    # -- invariants -------------------------------------------------------------------
    #
    # One invariant that takes a census of the task states once per step, then checks
    # each rule against it (separate @invariant methods would redo the census each).

    @invariant()
    def everything_agrees_with_a_recount(self):
        types = {name: type(bs.task) for name, bs in self.state.branch_states.items()}
        self.types = types
        self.check_applies_follow_their_dependencies(types)
        self.check_unapplies_follow_their_dependents(types)
        self.check_progress(types)
        self.check_running(types)
        self.check_ready_sets(types)
        self.check_branch_fields(types)
        self.check_results_and_errors(types)
        self.check_unapply_done(types)

    def holding(self, types, name):
        return types[name] in HOLDING or self.lingering[name] or self.abandoned[name]

    def check_applies_follow_their_dependencies(self, types):
        for name in self.names:
            if types[name] is not NotStarted:
                for d in self.deps[name]:
                    assert types[d] in SUCCEEDED, f"{name} started before {d} applied"

    def check_unapplies_follow_their_dependents(self, types):
        for name in self.names:
            if types[name] in UNAPPLYING or types[name] is DoneUnapplied:
                for d in self.dependents[name]:
                    assert not self.holding(types, d), f"{name} unapplies while {d} holds it"

    def check_progress(self, types):
        def named(*states):
            return {n for n, t in types.items() if t in states}

        p = self.state.progress
        assert p.total == len(self.names)
        assert p.applied == len(named(*SUCCEEDED))
        assert p.unapplied == len(named(DoneUnapplied))
        assert p.applies_running == named(RunningApply)
        assert p.applies_retrying == named(RunningApplyRetry)
        assert p.unapplies_running == named(RunningUnapply)
        assert p.unapplies_retrying == named(RunningUnapplyRetry)

    def check_running(self, types):
        s = self.state
        expected = {s.branch_states[n].task.task_id: n for n, t in types.items() if t in RUNNING}
        assert s.running == expected
        for task_id, name in expected.items():
            assert s.get_branch_task_id(name) == task_id
            assert s.get_branch_from_task_id(task_id).name == name

    def check_ready_sets(self, types):
        s = self.state
        apply_ready = set()
        unapply_ready = set()
        if not self.rolling_back:
            apply_ready = {
                n
                for n in self.names
                if types[n] is NotStarted and all(types[d] in SUCCEEDED for d in self.deps[n])
            }
        else:
            unapply_ready = {
                n
                for n in self.names
                if types[n] is DoneApplied
                and not any(self.holding(types, d) for d in self.dependents[n])
            }
        assert s.rolling_back == self.rolling_back
        assert s.find_apply_ready() == apply_ready
        assert s.find_unapply_ready() == unapply_ready
        first = s.next_apply_ready()
        assert (first is None) == (not apply_ready)
        assert first is None or first in apply_ready
        first = s.next_unapply_ready()
        assert (first is None) == (not unapply_ready)
        assert first is None or first in unapply_ready

    def check_branch_fields(self, types):
        for name in self.names:
            bs = self.state.branch_states[name]
            assert bs.awaiting == {d for d in self.deps[name] if types[d] not in SUCCEEDED}
            assert bs.awaiting_unapply == {
                d for d in self.dependents[name] if self.holding(types, d)
            }
            assert set(bs.blocking) == set(self.dependents[name])
            assert bs.blocking_unapply == self.deps[name]
            assert bs.lingering == self.lingering[name]
            assert bs.apply_attempts == self.apply_attempts[name]
            assert bs.unapply_attempts == self.unapply_attempts[name]
            assert bs.errors == tuple(e for e in self.errors if e.branch == name)

    def check_results_and_errors(self, types):
        s = self.state
        done = s.get_done()
        assert list(done) == [n for n in self.definition_order if types[n] is DoneApplied]
        assert all(v == ("value", n) for n, v in done.items())
        assert s.apply_done() == all(t is DoneApplied for t in types.values())
        assert s.get_errors() == self.errors
        assert self.ever_applied == {n for n, t in types.items() if t in SUCCEEDED}

    def stranded(self, types, name):
        """`name` must stay applied: a dependent that holds it can never let go."""
        for d in self.dependents[name]:
            if types[d] is UnapplyFailed or self.abandoned[d]:
                return True
            if types[d] is DoneApplied and self.stranded(types, d):
                return True
        return False

    def check_unapply_done(self, types):
        s = self.state
        quiet = not s.running and not any(self.lingering.values())
        applied = [n for n, t in types.items() if t is DoneApplied]
        expected = quiet and (
            not applied or (self.rolling_back and all(self.stranded(types, n) for n in applied))
        )
        assert s.unapply_done() == expected
        if self.rolling_back and s.unapply_done():
            event("rollback finished")
            for name in self.ever_applied:
                t = types[name]
                assert t in {DoneUnapplied, UnapplyFailed} or (
                    t is DoneApplied and self.stranded(types, name)
                ), f"{name} left {t.__name__}"
                if t is DoneApplied:
                    event("rollback finished with a stranded branch")


RuntimeStateMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    # the explain phase traces every line (Python < 3.12): far too slow here
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_runtime_state_machine = RuntimeStateMachine.TestCase


# ---------------------------------------------------------------------------------
# the reference driver over random graphs and scripts


@st.composite
def scripted_runs(draw):
    n = draw(st.integers(1, 10), label="branches")
    deps = [[]]
    for i in range(1, n):
        deps.append(draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)))
    outcome = st.one_of(
        st.sampled_from(["ok", "fail"]),
        st.builds(Returns, st.integers(0, 99)),
    )
    specs = []
    for i in range(n):
        specs.append(
            {
                "name": f"b{i}",
                "deps": tuple(f"b{j}" for j in deps[i]),
                "apply_script": draw(st.lists(outcome, max_size=3)),
                "unapply_script": draw(st.lists(st.sampled_from(["ok", "fail"]), max_size=2)),
                "apply_retries": draw(st.sampled_from([None, 1, 2, 3])),
                "retry_delay": draw(st.sampled_from([0, 0.5])),
                "unapply": draw(st.sampled_from(["function", "none"])),
                "unapply_retries": draw(st.sampled_from([None, 2])),
            }
        )
    max_workers = draw(st.sampled_from([None, 1, 2, 3]))
    return specs, max_workers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripted_runs())
def test_reference_runs_keep_dependency_order(run):
    specs, max_workers = run
    calls = []  # (kind, name, deps, value)

    def make_apply(name):
        def apply(config, deps):
            calls.append(("apply", name, dict(deps), None))
            return f"{name}-result"

        return apply

    def make_unapply(name):
        def unapply(config, deps, value):
            calls.append(("unapply", name, dict(deps), value))

        return unapply

    branches = []
    script = {}
    for spec in specs:
        name = spec["name"]
        on_apply = on_unapply = None
        if spec["apply_retries"]:
            on_apply = kira.retry_policy(
                attempts=spec["apply_retries"], backoff=spec["retry_delay"], jitter=False
            )
        if spec["unapply_retries"]:
            on_unapply = kira.retry_policy(attempts=spec["unapply_retries"], backoff=0)
        branches.append(
            kira.Branch(
                name,
                make_apply(name),
                spec["deps"],
                unapply=make_unapply(name) if spec["unapply"] == "function" else None,
                on_apply_error=on_apply,
                on_unapply_error=on_unapply,
            )
        )
        if spec["apply_script"]:
            script[name] = spec["apply_script"]
        if spec["unapply_script"]:
            script[(name, "unapply")] = spec["unapply_script"]
    deps_of = {spec["name"]: spec["deps"] for spec in specs}

    events = []
    clock = FakeClock()
    try:
        results = run_reference(
            "cfg",
            branches,
            script=script,
            max_workers=max_workers,
            clock=clock,
            on_event=events.append,
        )
        outcome = None
    except kira.RunFailed as exc:
        results = None
        outcome = exc

    kinds = [(e.kind, e.branch) for e in events]
    assert events[-1].kind == "run_finished"
    assert all(e.run_id == "reference" for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)
    position = {}  # first index of (kind, branch)
    for i, key in enumerate(kinds):
        position.setdefault(key, i)
    applied = {e.branch: e.value for e in events if e.kind == "applied"}
    unapplied = [e.branch for e in events if e.kind == "unapplied"]
    assert len(set(unapplied)) == len(unapplied)
    assert set(unapplied) <= set(applied)
    rollback = min(
        (i for i, (k, _) in enumerate(kinds) if k == "rollback_started"), default=len(kinds)
    )

    # every apply attempt starts after all its dependencies applied, and none after
    # the rollback started
    for i, (kind, name) in enumerate(kinds):
        if kind == "apply_started":
            assert i < rollback
            for d in deps_of[name]:
                assert position.get(("applied", d), len(kinds)) < i, (name, d)
    # every unapply finishes after those of its applied dependents
    for i, (kind, name) in enumerate(kinds):
        if kind == "unapplied":
            for other, mine in deps_of.items():
                if name in mine and other in applied:
                    assert position.get(("unapplied", other), len(kinds)) < i, (name, other)
    # callbacks got their dependencies' results, and unapply the applied value
    for kind, name, deps, value in calls:
        assert deps == {d: applied[d] for d in deps_of[name]}
        if kind == "unapply":
            assert value == applied[name]

    if outcome is None:
        assert results == applied
        assert set(results) == set(deps_of)
        assert unapplied == []
        assert rollback == len(kinds)
        assert events[-1].value == "applied"
    else:
        assert outcome.results == applied
        assert rollback < len(kinds)
        assert list(outcome.unapplied) == unapplied
        culprits = [e for e in events if e.kind == "failed" and e.value == "apply"]
        assert outcome.culprit is not None
        assert culprits and outcome.culprit.branch == culprits[0].branch
        if isinstance(outcome, kira.RolledBack):
            assert set(outcome.unapplied) == set(applied)
            assert events[-1].value == "rolled_back"
        else:
            assert isinstance(outcome, kira.RollbackIncomplete)
            assert events[-1].value == "rollback_incomplete"
            assert set(outcome.still_applied) == set(applied) - set(unapplied)
            assert outcome.still_applied
            gave_up = {e.branch for e in events if e.kind == "failed" and e.value == "unapply"}
            assert gave_up <= set(outcome.still_applied)
            assert gave_up
