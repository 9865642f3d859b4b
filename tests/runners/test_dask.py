"""executor=: a Dask distributed client's executor (the kira[dask] extra)."""

from __future__ import annotations

import os
from functools import partial

import _proc_callbacks as cb
import distributed
import pytest

import kira


@pytest.fixture(scope="module")
def dask_executor():
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client.get_executor()


def test_a_dask_executor_gives_the_right_results(run, dask_executor):
    branches = [
        kira.Branch("get_a", partial(cb.constant, "get_a", 2)),
        kira.Branch("get_b", partial(cb.constant, "get_b", 3)),
        kira.Branch("get_c", partial(cb.total, "get_c"), ("get_a", "get_b")),
        kira.Branch("pid", cb.pid),
    ]
    results = run(None, branches, executor=dask_executor)
    assert results.pop("pid") != os.getpid()  # it ran on a Dask worker
    assert results == {"get_a": 2, "get_b": 3, "get_c": 5}


def test_a_dask_run_rolls_back_on_failure(run, dask_executor, tmp_path):
    path = tmp_path / "records.txt"
    branches = [
        kira.Branch("a", partial(cb.constant, "a", 1), unapply=partial(cb.unapply, "a")),
        kira.Branch("b", partial(cb.constant, "b", 2), ("a",), unapply=partial(cb.unapply, "b")),
        kira.Branch("c", partial(cb.fail, "c"), ("b",)),
    ]
    with pytest.raises(kira.RolledBack) as info:
        run(str(path), branches, executor=dask_executor)
    assert info.value.unapplied == ("b", "a")
    assert isinstance(info.value.culprit.error, LookupError)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ["apply a", "apply b", "apply c", "unapply b 2", "unapply a 1"]
