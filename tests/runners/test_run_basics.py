"""Results, deps, crashes, errors, and what a run refuses before it starts."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from _runners_support import Fail, Log, await_event, flavoured, wait

import kira


def test_kiras_own_example(run, flavour):
    branches = [
        kira.Branch("get_a", flavoured(flavour, lambda config, deps: 2)),
        kira.Branch("get_b", flavoured(flavour, lambda config, deps: 3)),
        kira.Branch(
            "get_c",
            flavoured(flavour, lambda config, deps: deps["get_a"] + deps["get_b"]),
            dependencies=("get_a", "get_b"),
        ),
    ]
    assert run(None, branches) == {"get_a": 2, "get_b": 3, "get_c": 5}


def test_diamond(run, flavour):
    seen = Log()

    def d(config, deps):
        seen.add(("d", dict(deps)))
        return deps["b"] + deps["c"]

    branches = [
        kira.Branch("d", flavoured(flavour, d), dependencies=("b", "c")),
        kira.Branch("b", flavoured(flavour, lambda config, deps: deps["a"] + 10), ("a",)),
        kira.Branch("c", flavoured(flavour, lambda config, deps: deps["a"] + 100), ("a",)),
        kira.Branch("a", flavoured(flavour, lambda config, deps: config)),
    ]
    assert run(1, branches) == {"a": 1, "b": 11, "c": 101, "d": 112}
    assert seen.of("d") == [{"b": 11, "c": 101}]


def test_results_are_in_definition_order(run, flavour):
    # STYLE.md point 6: wherever order reaches output it is definition order.
    # "first" finishes last, on purpose.
    second_done = threading.Event()

    def first_sync(config, deps):
        wait(second_done)
        return 1

    async def first_async(config, deps):
        await await_event(second_done)
        return 1

    def second(config, deps):
        second_done.set()
        return 2

    branches = [
        kira.Branch("first", first_sync if flavour == "sync" else first_async),
        kira.Branch("second", flavoured(flavour, second)),
        kira.Branch("third", flavoured(flavour, lambda config, deps: 3), ("first",)),
    ]
    results = run(None, branches)
    assert results == {"first": 1, "second": 2, "third": 3}
    assert list(results) == ["first", "second", "third"]


def test_config_is_shared_by_every_callback(run, flavour):
    config = object()
    seen = Log()

    def apply(config, deps):
        seen.add(("apply", config))
        return 1

    def fail(config, deps):
        seen.add(("apply", config))
        raise Fail("x")

    def unapply(config, deps, value):
        seen.add(("unapply", config))

    def on_error(config, deps, error, attempt):
        seen.add(("on_apply_error", config))
        return False

    branches = [
        kira.Branch("a", flavoured(flavour, apply), unapply=flavoured(flavour, unapply)),
        kira.Branch(
            "b", flavoured(flavour, fail), ("a",), on_apply_error=flavoured(flavour, on_error)
        ),
    ]
    with pytest.raises(kira.RolledBack):
        run(config, branches)
    assert len(seen.items) == 4
    assert all(item[1] is config for item in seen.items)


def test_deps_are_the_direct_dependencies_only_in_dependency_order(run, flavour):
    seen = Log()

    def recorder(name, value):
        def apply(config, deps):
            seen.add((name, list(deps.items())))
            return value

        return flavoured(flavour, apply)

    branches = [
        kira.Branch("x", recorder("x", "X")),
        kira.Branch("y", recorder("y", "Y"), ("x",)),
        kira.Branch("z", recorder("z", "Z"), ("y",)),
        kira.Branch("w", recorder("w", "W"), ("z", "x")),
    ]
    run(None, branches)
    assert seen.of("x") == [[]]
    assert seen.of("y") == [[("x", "X")]]
    assert seen.of("z") == [[("y", "Y")]]  # not x: deps are not transitive
    assert seen.of("w") == [[("z", "Z"), ("x", "X")]]


def test_deps_are_read_only(run, flavour):
    seen = Log()

    def b(config, deps):
        def assign():
            deps["a"] = 99

        def add():
            deps["new"] = 1

        def delete():
            del deps["a"]

        for mutate in (assign, add, delete):
            try:
                mutate()
            except TypeError:
                seen.add(("refused", True))
            else:
                seen.add(("refused", False))
        return deps["a"]

    branches = [
        kira.Branch("a", flavoured(flavour, lambda config, deps: 1)),
        kira.Branch("b", flavoured(flavour, b), ("a",)),
    ]
    assert run(None, branches) == {"a": 1, "b": 1}
    assert seen.of("refused") == [True, True, True]


def test_a_crashing_apply_is_a_failed_attempt(run, flavour):
    calls = Log()

    def crashy(config, deps):
        calls.add(("apply", len(calls.items)))
        if len(calls.items) == 1:
            raise ZeroDivisionError("boom")
        return "fine"

    def on_error(config, deps, error, attempt):
        calls.add(("decide", (type(error), attempt)))
        return True

    branches = [
        kira.Branch(
            "crashy", flavoured(flavour, crashy), on_apply_error=flavoured(flavour, on_error)
        )
    ]
    assert run(None, branches) == {"crashy": "fine"}
    assert calls.of("decide") == [(ZeroDivisionError, 1)]


@pytest.mark.run_timeout(5)
def test_a_callback_raising_system_exit_is_a_failed_attempt_not_a_hang(run, flavour):
    log = Log()
    exit_exception = SystemExit(3)

    def exits(config, deps):
        raise exit_exception

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, lambda config, deps: "A"),
            unapply=flavoured(flavour, lambda config, deps, value: log.add(("unapply", value))),
        ),
        kira.Branch("b", flavoured(flavour, exits), ("a",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    assert info.value.culprit.error is exit_exception
    assert log.items == [("unapply", "A")]


def test_invalid_options_raise_before_anything_runs(run):
    called = Log()
    branches = [kira.Branch("a", lambda config, deps: called.add(("apply", "a")))]
    for options in (
        {"max_workers": 0},
        {"max_workers": -1},
        {"max_workers": 1.5},
        {"grace_period": -1},
    ):
        with pytest.raises(ValueError):
            run(None, branches, **options)
    for timeout in (0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            run(None, branches, timeout)
    assert called.items == []


def test_a_crash_without_handler_rolls_back_with_the_crash_as_culprit(run, flavour):
    unapplied = Log()

    def crash(config, deps):
        raise KeyError("gone")

    branches = [
        kira.Branch(
            "a",
            flavoured(flavour, lambda config, deps: "A"),
            unapply=flavoured(flavour, lambda config, deps, value: unapplied.add(("a", value))),
        ),
        kira.Branch("b", flavoured(flavour, crash), ("a",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches, run_id="crash-run")
    err = info.value
    assert unapplied.items == [("a", "A")]
    assert err.unapplied == ("a",)
    assert err.culprit is not None
    assert (err.culprit.branch, err.culprit.phase, err.culprit.attempt) == ("b", "apply", 1)
    assert isinstance(err.culprit.error, KeyError)
    assert err.results == {"a": "A"}  # every value an apply returned, unapplied or not
    assert err.run_id == "crash-run"


def test_errors_are_listed_oldest_first_with_aware_utc_times(run, flavour):
    attempts: dict[str, int] = {}

    def failing(name, fail_times):
        def apply(config, deps):
            attempts[name] = attempts.get(name, 0) + 1
            if attempts[name] <= fail_times:
                raise Fail(f"{name} #{attempts[name]}")
            return name

        return flavoured(flavour, apply)

    def retry_twice(config, deps, error, attempt):
        return attempt < 3

    def undo_fails(config, deps, value):
        raise Fail("cannot undo b")

    branches = [
        kira.Branch("a", failing("a", 2), on_apply_error=flavoured(flavour, retry_twice)),
        kira.Branch("b", failing("b", 0), ("a",), unapply=flavoured(flavour, undo_fails)),
        kira.Branch("c", failing("c", 99), ("b",), on_apply_error=flavoured(flavour, retry_twice)),
    ]
    with pytest.raises(kira.RollbackIncomplete) as info:
        run(None, branches)
    errors = info.value.errors
    assert [(e.branch, e.phase, e.attempt) for e in errors] == [
        ("a", "apply", 1),
        ("a", "apply", 2),
        ("c", "apply", 1),
        ("c", "apply", 2),
        ("c", "apply", 3),
        ("b", "unapply", 1),
    ]
    assert [str(e.error) for e in errors[:5]] == ["a #1", "a #2", "c #1", "c #2", "c #3"]
    for e in errors:
        assert e.at.tzinfo is not None
        assert e.at.utcoffset() == timedelta(0)
    assert [e.at for e in errors] == sorted(e.at for e in errors)
    assert info.value.culprit is errors[4]
    assert set(info.value.still_applied) == {"a", "b"}


def test_an_empty_list_of_branches_returns_an_empty_dict(run):
    assert run(None, []) == {}


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda ok: [ok("a"), ok("a")], kira.DuplicateBranchError),
        (lambda ok: [ok("a"), ok("b", ("nowhere",))], kira.MissingDependencyError),
        (lambda ok: [ok("a"), ok("b", ("c",)), ok("c", ("b",))], kira.CycleError),
        (lambda ok: [ok("a"), ok("b", ("b",))], kira.CycleError),
    ],
    ids=["duplicate", "missing", "cycle", "self-cycle"],
)
def test_an_invalid_graph_raises_before_anything_runs(run, make, error):
    called = Log()

    def ok(name, deps=()):
        return kira.Branch(
            name,
            lambda config, d: called.add(("apply", name)),
            deps,
            unapply=lambda config, d, v: called.add(("unapply", name)),
        )

    events = Log()
    with pytest.raises(error) as info:
        run(None, make(ok), on_event=events.add)
    assert isinstance(info.value, kira.GraphError)
    assert isinstance(info.value, ValueError)
    assert called.items == []
    assert events.items == []


def test_both_runners_record_a_run_in_a_journal(run, tmp_path):
    # (the journal itself is tested in tests/journal)
    called = Log()
    branches = [
        kira.Branch("a", lambda config, deps: called.add(("apply", "a")) or 1),
        kira.Branch("b", lambda config, deps: deps["a"] + 1, dependencies=("a",)),
    ]
    path = tmp_path / "journal.sqlite"
    assert run(None, branches, journal=path, run_id="r1") == {"a": 1, "b": 2}
    assert called.items == [("apply", "a")]
    with kira.Journal(path) as journal:
        assert [(r.run_id, r.state, r.applied, r.total) for r in journal.runs()] == [
            ("r1", "applied", 2, 2)
        ]
        kinds = [(e.kind, e.branch) for e in journal.events("r1")]
    assert kinds == [
        ("apply_started", "a"),
        ("applied", "a"),
        ("apply_started", "b"),
        ("applied", "b"),
        ("run_finished", None),
    ]
