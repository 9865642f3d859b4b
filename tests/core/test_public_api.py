"""The public API: every name SPEC.md gives exists, is documented and typed, and
`import kira` needs nothing but the standard library."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import pytest

import kira
import kira.testing

SPEC_NAMES = [
    "Branch", "RetryAfter", "retry_policy", "run_tasks", "run_tasks_async", "resume",
    "KiraError", "GraphError", "DuplicateBranchError", "MissingDependencyError",
    "CycleError", "RuntimeStateError", "RunFailed", "RolledBack", "RollbackIncomplete",
    "BranchError", "BranchTimeout", "RuntimeState", "BranchState", "Progress", "Event",
    "NotStarted", "RunningApply", "RunningApplyRetry", "RunningUnapply",
    "RunningUnapplyRetry", "Failed", "DoneApplied", "DoneUnapplied", "UnapplyFailed",
    "current_attempt",
]  # fmt: skip

SPEC_STATE_METHODS = [
    "create", "apply_done", "unapply_done", "find_apply_ready", "find_unapply_ready",
    "get_branch", "get_branch_from_task_id", "get_branch_task_id",
    "resolve_dependencies_of", "mark_as_applying", "mark_as_applied", "record_failure",
    "record_apply_retry", "record_unapply_retry", "mark_as_failed",
    "unblock_dependent_unapplies", "mark_as_unapplying", "mark_as_unapplied",
    "mark_as_unapply_failed", "set_branch_task", "get_done", "get_errors",
]  # fmt: skip

ALIASES = {"Decision", "TaskState", "__version__"}  # type aliases and data: no docstring


def test_every_name_of_the_spec_is_public() -> None:
    for name in SPEC_NAMES:
        assert name in kira.__all__, name
        assert hasattr(kira, name), name
    for method in SPEC_STATE_METHODS:
        assert callable(getattr(kira.RuntimeState, method)), method
    for field in ("config", "timeout", "branch_states", "running", "progress"):
        assert field in kira.RuntimeState.__slots__, field


def test_all_lists_only_what_exists_sorted() -> None:
    assert sorted(kira.__all__) == list(kira.__all__)
    for name in kira.__all__:
        assert hasattr(kira, name), name


@pytest.mark.parametrize("name", sorted(set(kira.__all__) - ALIASES))
def test_every_public_name_is_documented_and_typed(name: str) -> None:
    obj = getattr(kira, name)
    assert inspect.getdoc(obj), f"kira.{name} has no docstring"
    functions = []
    if inspect.isfunction(obj):
        functions.append(obj)
    elif inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if inspect.isfunction(member) and not attr.startswith("_"):
                functions.append(member)
                assert inspect.getdoc(member), f"kira.{name}.{attr} has no docstring"
    for fn in functions:
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
        for param in signature.parameters.values():
            if param.name in ("self", "cls"):
                continue
            assert param.name in hints, f"{fn.__qualname__}: {param.name} has no type"
        assert "return" in hints, f"{fn.__qualname__} has no return type"


def test_the_testing_module_is_documented() -> None:
    for name in set(kira.testing.__all__) - {"Outcome"}:  # Outcome: a type alias
        assert inspect.getdoc(getattr(kira.testing, name)), name


def test_the_core_imports_only_the_standard_library() -> None:
    code = (
        "import sys, kira; "
        "third = sorted(m for m in ('rich', 'distributed', 'dask', 'hypothesis') "
        "if m in sys.modules); print(third)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
