"""Kira's own example: a and b run at the same time, c adds their results.

    kira run examples/readme_example.py        # a -> 2, b -> 3, c -> 5

Or from Python: `kira.run_tasks(config, branches)` returns
{"a": 2, "b": 3, "c": 5}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kira

config: dict[str, Any] = {}


def get_a(config: Any, deps: Mapping[str, Any]) -> int:
    """The first operand."""
    return 2


def get_b(config: Any, deps: Mapping[str, Any]) -> int:
    """The second operand (runs at the same time as get_a: neither depends on the other)."""
    return 3


def get_c(config: Any, deps: Mapping[str, Any]) -> int:
    """Their sum: starts only once both a and b have applied."""
    return int(deps["a"]) + int(deps["b"])


branches = [
    kira.Branch("a", get_a),
    kira.Branch("b", get_b),
    kira.Branch("c", get_c, ["a", "b"]),
]

if __name__ == "__main__":
    print(kira.run_tasks(config, branches))
