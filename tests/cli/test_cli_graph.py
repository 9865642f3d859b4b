"""`kira graph`: Mermaid and DOT text, and rendering through Graphviz."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _cli_support import EXAMPLES, kira, kira_env, write_flow

DIAMOND = """
    import kira

    f = lambda config, deps: 1
    branches = [
        kira.Branch("fetch", f),
        kira.Branch("left", f, ["fetch"]),
        kira.Branch("right", f, ["fetch"]),
        kira.Branch("end", f, ["left", "right"]),
        kira.Branch('odd "name"', f, ["end"]),
    ]
"""


def test_mermaid_is_the_default_and_has_every_edge(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, DIAMOND)
    done = kira("graph", flow, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert lines[0] == "flowchart LR"
    # `end` is a Mermaid keyword and `odd "name"` no identifier: both get safe ids
    assert 'b3["end"]' in lines and 'b4["odd #quot;name#quot;"]' in lines
    edges = {line.strip() for line in lines if "-->" in line}
    assert edges == {
        "fetch --> left",
        "fetch --> right",
        "left --> b3",
        "right --> b3",
        "b3 --> b4",
    }


def test_mermaid_ids_never_collide(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        """
        import kira

        f = lambda config, deps: 1
        branches = [kira.Branch("b1", f), kira.Branch("a b", f, ["b1"])]
        """,
    )
    lines = [line.strip() for line in kira("graph", flow).stdout.splitlines()]
    assert 'b1["b1"]' in lines and 'b1_["a b"]' in lines and "b1 --> b1_" in lines


def test_dot_has_every_node_and_edge(tmp_path: Path) -> None:
    flow = write_flow(tmp_path, DIAMOND)
    done = kira("graph", flow, "--format", "dot", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("digraph kira {") and text.rstrip().endswith("}")
    for edge in (
        '"fetch" -> "left";',
        '"fetch" -> "right";',
        '"left" -> "end";',
        '"right" -> "end";',
        '"end" -> "odd \\"name\\"";',
    ):
        assert edge in text


def test_graph_of_an_invalid_flow_exits_3(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        "import kira\nf = lambda c, d: 1\nbranches = [kira.Branch('a', f, ['a'])]\n",
    )
    done = kira("graph", flow, cwd=tmp_path)
    assert done.returncode == 3 and "cycle" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_output_without_graphviz_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    out = tmp_path / "graph.svg"
    done = kira(
        "graph", EXAMPLES / "trip_booking.py", "--output", out, env=kira_env(PATH=str(empty))
    )
    assert done.returncode == 1
    assert "Graphviz" in done.stderr and "`dot`" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_output_must_be_svg_or_png(tmp_path: Path) -> None:
    done = kira("graph", EXAMPLES / "trip_booking.py", "--output", tmp_path / "g.gif")
    assert done.returncode == 3 and ".svg or .png" in done.stderr


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_output_renders_with_graphviz(tmp_path: Path, suffix: str) -> None:
    # Graphviz is a test requirement (CI installs it): never skipped
    assert shutil.which("dot") is not None, "install Graphviz (its `dot` program) to test this"
    out = tmp_path / f"graph{suffix}"
    done = kira("graph", EXAMPLES / "trip_booking.py", "--output", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    if suffix == ".svg":
        assert b"<svg" in data and b"payment" in data
    else:
        assert data.startswith(b"\x89PNG")
