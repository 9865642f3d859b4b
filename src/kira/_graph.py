"""Graph validation: unique names, known dependencies, no cycles.

Iterative throughout (no recursion, so a chain of a million branches is fine) and
O(N + E). Errors are reported deterministically: the first problem in definition
order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ._branch import Branch
from ._errors import CycleError, DuplicateBranchError, MissingDependencyError


class Graph(NamedTuple):
    """A validated graph, by position in definition order."""

    branches: list[Branch]
    positions: dict[str, int]
    dependencies: list[list[int]]
    dependents: list[list[int]]


def validate(branches: Iterable[Branch]) -> Graph:
    """Check `branches` form a DAG; return it indexed.

    Raises:
        TypeError: `branches` is not an iterable of `Branch`.
        DuplicateBranchError, MissingDependencyError, CycleError.
    """
    if isinstance(branches, str | bytes) or not isinstance(branches, Iterable):
        raise TypeError(
            f"branches must be an iterable of kira.Branch, not {type(branches).__name__}"
        )
    items = list(branches)
    # The common case (a valid graph) in bulk; the first problem, in definition
    # order, is looked for only when there is one.
    if not all(type(b) is Branch for b in items):
        i, b = next((i, b) for i, b in enumerate(items) if not isinstance(b, Branch))
        raise TypeError(f"branches[{i}] is not a kira.Branch but {type(b).__name__}: {b!r}")
    positions = {b.name: i for i, b in enumerate(items)}
    if len(positions) != len(items):
        seen_names: set[str] = set()
        for b in items:
            if b.name in seen_names:
                raise DuplicateBranchError(b.name)
            seen_names.add(b.name)
    try:
        dependencies = [[positions[dep] for dep in b.dependencies] for b in items]
    except KeyError:
        b, dep = next((b, d) for b in items for d in b.dependencies if d not in positions)
        raise MissingDependencyError(b.name, dep) from None
    dependents: list[list[int]] = [[] for _ in items]
    for i, mine in enumerate(dependencies):
        for j in mine:
            dependents[j].append(i)

    # Kahn's algorithm: whatever never reaches zero pending dependencies is on, or
    # downstream of, a cycle.
    pending = [len(d) for d in dependencies]
    stack = [i for i, n in enumerate(pending) if n == 0]
    seen = 0
    while stack:
        i = stack.pop()
        seen += 1
        for j in dependents[i]:
            pending[j] -= 1
            if pending[j] == 0:
                stack.append(j)
    if seen != len(items):
        raise CycleError(_find_cycle(items, dependencies, pending))
    return Graph(items, positions, dependencies, dependents)


def _find_cycle(
    items: list[Branch], dependencies: list[list[int]], pending: list[int]
) -> list[str]:
    # Every branch left pending has a pending dependency, so walking "first pending
    # dependency" from the first pending branch must revisit a branch: that is a cycle.
    node = next(i for i, n in enumerate(pending) if n)
    position: dict[int, int] = {}
    path: list[int] = []
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = next(j for j in dependencies[node] if pending[j])
    cycle = path[position[node] :]
    return [items[i].name for i in cycle] + [items[node].name]
