"""Big graphs: no recursion, no quadratic blow-up."""

from __future__ import annotations

import pytest
from _runners_support import Fail, Log

import kira

N = 10_000


# Plain callbacks only: this is about the scheduling's cost, and 20,000 round trips
# to the threaded runner's event loop would only make the suite slower.


def test_a_deep_chain_applies(run):
    def apply(config, deps):
        return next(iter(deps.values()), -1) + 1

    branches = [kira.Branch("s0", apply)]
    branches += [kira.Branch(f"s{i}", apply, (f"s{i - 1}",)) for i in range(1, N)]
    results = run(None, branches)
    assert len(results) == N
    assert results[f"s{N - 1}"] == N - 1


def test_a_deep_chain_whose_last_branch_fails_rolls_back_in_reverse(run):
    undone = Log()

    def unapply(config, deps, value):
        undone.add(value)

    def last(config, deps):
        raise Fail("the end")

    names = [f"s{i}" for i in range(N)]
    branches = [
        kira.Branch(
            name,
            lambda config, deps, name=name: name,
            names[i - 1 : i],
            unapply=unapply,
        )
        for i, name in enumerate(names[:-1])
    ]
    branches.append(kira.Branch(names[-1], last, (names[-2],)))
    with pytest.raises(kira.RolledBack) as info:
        run(None, branches)
    expected = names[-2::-1]
    assert list(info.value.unapplied) == expected
    assert undone.items == expected


def test_ten_thousand_independent_branches(run):
    branches = [kira.Branch(f"b{i}", lambda config, deps, i=i: i) for i in range(N)]
    results = run(None, branches)
    assert results == {f"b{i}": i for i in range(N)}
