"""Graph validation, as `RuntimeState.create` (and so every runner) performs it."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import textwrap

import pytest

import kira
from kira.testing import run_reference


def cheap(config, deps):
    return None


def graph(*specs):
    """Branches from `"name"` or `("name", "dep", ...)` specs, in this order."""
    out = []
    for spec in specs:
        name, *deps = (spec,) if isinstance(spec, str) else spec
        out.append(kira.Branch(name, cheap, tuple(deps)))
    return out


def create(branches):
    return kira.RuntimeState.create(None, branches)


def assert_is_a_cycle(cycle, branches):
    """`cycle` lists names in order, first repeated last, each depending on the next."""
    by_name = {b.name: b for b in branches}
    assert isinstance(cycle, tuple)
    assert len(cycle) >= 2
    assert cycle[0] == cycle[-1]
    assert len(set(cycle[:-1])) == len(cycle) - 1, "only the first name repeats"
    for here, there in itertools.pairwise(cycle):
        assert there in by_name[here].dependencies, f"{here} does not depend on {there}"


# ---------------------------------------------------------------------------------
# valid graphs


def test_valid_graph_in_any_definition_order():
    # a dependency may be defined after its dependent
    state = create(graph(("c", "a", "b"), ("b", "a"), "a"))
    assert list(state.branch_states) == ["c", "b", "a"]
    assert state.find_apply_ready() == {"a"}


def test_empty_graph_is_valid():
    state = create([])
    assert state.branch_states == {}
    assert state.progress.total == 0


def test_branches_may_be_any_iterable():
    state = create(b for b in graph("a", ("b", "a")))
    assert list(state.branch_states) == ["a", "b"]
    state = create(tuple(graph("a")))
    assert list(state.branch_states) == ["a"]


# ---------------------------------------------------------------------------------
# duplicates


def test_duplicate_name():
    with pytest.raises(kira.DuplicateBranchError) as info:
        create(graph("a", "b", ("a", "b")))
    assert info.value.name == "a"
    assert "'a'" in str(info.value)


def test_duplicate_reports_the_first_repeat_in_definition_order():
    with pytest.raises(kira.DuplicateBranchError) as info:
        create(graph("a", "b", "c", "b", "a", "c"))
    assert info.value.name == "b"


def test_duplicate_even_with_identical_definitions():
    b = kira.Branch("same", cheap)
    with pytest.raises(kira.DuplicateBranchError) as info:
        create([b, b])
    assert info.value.name == "same"


# ---------------------------------------------------------------------------------
# missing dependencies


def test_missing_dependency():
    with pytest.raises(kira.MissingDependencyError) as info:
        create(graph("a", ("b", "a", "nope")))
    assert info.value.branch == "b"
    assert info.value.dependency == "nope"
    assert "'b'" in str(info.value)
    assert "'nope'" in str(info.value)


def test_missing_dependency_reports_the_first_in_definition_order():
    branches = graph("a", ("b", "a", "m1", "m2"), ("c", "m0"))
    with pytest.raises(kira.MissingDependencyError) as info:
        create(branches)
    assert (info.value.branch, info.value.dependency) == ("b", "m1")

    with pytest.raises(kira.MissingDependencyError) as info:
        create([branches[2], branches[0], branches[1]])
    assert (info.value.branch, info.value.dependency) == ("c", "m0")


def test_missing_dependency_takes_precedence_over_a_cycle():
    # cycles are looked for only in a graph whose every edge resolves
    with pytest.raises(kira.MissingDependencyError) as info:
        create(graph(("a", "b"), ("b", "a"), ("c", "gone")))
    assert (info.value.branch, info.value.dependency) == ("c", "gone")


# ---------------------------------------------------------------------------------
# cycles


def test_self_loop_is_a_cycle_of_one():
    branches = graph("a", ("x", "a", "x"))
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    assert info.value.cycle == ("x", "x")
    assert "x -> x" in str(info.value)


def test_two_cycle():
    branches = graph(("a", "b"), ("b", "a"))
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    assert info.value.cycle == ("a", "b", "a")
    assert_is_a_cycle(info.value.cycle, branches)


def test_cycle_lists_names_each_depending_on_the_next():
    # a -> c -> b -> a  ("a depends on c", ...)
    branches = graph(("a", "c"), ("b", "a"), ("c", "b"))
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    assert info.value.cycle == ("a", "c", "b", "a")
    assert_is_a_cycle(info.value.cycle, branches)
    assert "a -> c -> b -> a" in str(info.value)


def test_three_cycle_inside_a_larger_graph_with_startable_branches():
    branches = graph(
        "root",
        ("left", "root"),
        ("right", "root"),
        ("p", "left", "r"),
        ("q", "p"),
        ("r", "q"),
        ("leaf", "left", "right"),
        ("after", "q"),
    )
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    cycle = info.value.cycle
    assert_is_a_cycle(cycle, branches)
    assert set(cycle) == {"p", "q", "r"}
    assert len(cycle) == 4


def test_cycle_reached_through_a_branch_downstream_of_it():
    # "d" is defined first and is not on the cycle; it only depends on it
    branches = graph(("d", "ok", "c"), "ok", ("a", "b"), ("b", "c"), ("c", "a"))
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    assert_is_a_cycle(info.value.cycle, branches)
    assert set(info.value.cycle) == {"a", "b", "c"}
    assert "d" not in info.value.cycle


def test_cycle_among_many_dependencies():
    branches = graph("a", "b", "c", ("x", "a", "b", "y", "c"), ("y", "c", "z"), ("z", "a", "x"))
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    assert_is_a_cycle(info.value.cycle, branches)
    assert set(info.value.cycle) == {"x", "y", "z"}


def test_cycle_reports_the_first_in_definition_order():
    first = graph(("x", "y"), ("y", "x"))
    second = graph(("p", "q"), ("q", "p"))
    with pytest.raises(kira.CycleError) as info:
        create(first + second)
    assert info.value.cycle == ("x", "y", "x")
    with pytest.raises(kira.CycleError) as info:
        create(second + first)
    assert info.value.cycle == ("p", "q", "p")


def test_long_cycle_is_found_without_recursion():
    n = 50_000
    branches = [kira.Branch(f"b{i}", cheap, (f"b{(i + 1) % n}",)) for i in range(n)]
    with pytest.raises(kira.CycleError) as info:
        create(branches)
    cycle = info.value.cycle
    assert len(cycle) == n + 1
    assert cycle[:3] == ("b0", "b1", "b2")
    assert cycle[-2:] == (f"b{n - 1}", "b0")


# ---------------------------------------------------------------------------------
# the error hierarchy


@pytest.mark.parametrize(
    ("branches", "kind"),
    [
        (graph("a", "a"), kira.DuplicateBranchError),
        (graph(("a", "b")), kira.MissingDependencyError),
        (graph(("a", "a")), kira.CycleError),
        (graph(("a", "b"), ("b", "a")), kira.CycleError),
    ],
)
def test_graph_errors_are_value_errors_and_kira_errors(branches, kind):
    with pytest.raises(kind) as info:
        create(branches)
    assert isinstance(info.value, kira.GraphError)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, kira.KiraError)
    assert not isinstance(info.value, kira.RuntimeStateError)


def test_graph_error_is_raised_before_anything_runs():
    calls = []

    def apply(config, deps):
        calls.append("ran")

    branches = [kira.Branch("ok", apply), kira.Branch("bad", apply, ("bad",))]
    with pytest.raises(kira.CycleError):
        run_reference(None, branches)
    assert calls == []


# ---------------------------------------------------------------------------------
# wrong types


@pytest.mark.parametrize("item", [None, "a", ("a", cheap), {"name": "a"}, 1])
def test_non_branch_items_are_a_type_error(item):
    with pytest.raises(TypeError, match=r"branches\[1\] is not a kira\.Branch"):
        create([kira.Branch("ok", cheap), item])


@pytest.mark.parametrize("branches", [None, 1, 2.5, object(), "ab", b"ab"])
def test_non_iterable_branches_are_a_type_error(branches):
    with pytest.raises(TypeError, match=r"branches must be an iterable of kira\.Branch"):
        create(branches)


def test_type_errors_are_not_graph_errors():
    with pytest.raises(TypeError) as info:
        create([object()])
    assert not isinstance(info.value, kira.GraphError)


@pytest.mark.parametrize("timeout", [0, -1, True, "5", float("nan")])
def test_create_rejects_a_bad_run_timeout(timeout):
    with pytest.raises(ValueError, match="timeout"):
        kira.RuntimeState.create(None, graph("a"), timeout)


def test_create_keeps_config_and_timeout():
    config = object()
    state = kira.RuntimeState.create(config, graph("a"), 2.5)
    assert state.config is config
    assert state.timeout == 2.5


# ---------------------------------------------------------------------------------
# scale and determinism


@pytest.mark.timeout(60)
def test_chain_of_a_million_branches_validates():
    n = 1_000_000
    # The cyclic collector would rescan millions of live objects again and again
    # while they are built; it has nothing to do with what is tested here.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        branches = [kira.Branch("b0", cheap)]
        branches.extend(kira.Branch(f"b{i}", cheap, (f"b{i - 1}",)) for i in range(1, n))
        state = kira.RuntimeState.create(None, branches)
    finally:
        if was_enabled:
            gc.enable()
    assert state.progress.total == n
    assert state.find_apply_ready() == {"b0"}
    last = state.get_branch(f"b{n - 1}")
    assert last.awaiting == {f"b{n - 2}"}
    assert last.blocking == ()
    assert state.get_branch("b0").blocking == ("b1",)
    # branch states link to each other both ways: free the cycles here, not in
    # whichever test happens to trigger the next full collection
    del state, last, branches
    gc.collect()


_DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import kira

    def f(config, deps):
        return None

    def describe(specs):
        branches = [kira.Branch(name, f, tuple(deps)) for name, *deps in specs]
        try:
            kira.RuntimeState.create(None, branches)
        except kira.GraphError as exc:
            return type(exc).__name__ + ": " + str(exc)
        return "ok"

    cases = [
        [("a", "b", "c"), ("b", "c"), ("c", "a"), ("d", "e"), ("e", "d")],
        [("q",), ("x", "q", "y", "z"), ("y", "x"), ("z", "y")],
        [("m", "n1", "n2"), ("k", "n3")],
        [("p",), ("p",), ("r",), ("r",)],
    ]
    for case in cases:
        print(describe(case))
    """
)


def test_error_reporting_does_not_depend_on_hash_seed():
    outputs = set()
    for seed in ("0", "1", "12345"):
        result = subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1
    lines = outputs.pop().splitlines()
    assert lines[0].startswith("CycleError: ") and "a -> b -> c -> a" in lines[0]
    assert lines[1].startswith("CycleError: ") and "x -> y -> x" in lines[1]
    assert lines[2].startswith("MissingDependencyError: ") and "'n1'" in lines[2]
    assert lines[3].startswith("DuplicateBranchError: ") and "'p'" in lines[3]
