"""The `kira` command (SPEC §7): `kira run FLOW`, `kira graph FLOW`.

A thin layer over the public API: it loads a flow, calls `kira.run_tasks` with an
`on_event` callback, and draws everything it shows (live display, log lines,
summary, `--events`, `--timeline`) from those events. `rich` is optional (the
`cli` extra): it is imported only here, only when stdout is a terminal, and a
plain line-per-event output stands in when it is missing.

Exit status: 0 applied, 1 rolled back, 2 rollback incomplete, 3 invalid graph,
flow or command line (nothing ran), 130 interrupted (after the rollback), 70 an
unexpected error (a bug: the traceback is printed), so that no crash can pass for
one of the outcomes above. `kira show` exits with the shown run's status, 4 for a
run not finished.

To add a subcommand, write `_add_NAME(subparsers)` that registers its options and
sets `handler=` to a function `(args) -> int`, and list it in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NoReturn, TextIO

import kira

from ._runlog import BranchLog, RunLog, error_dict, event_json
from ._timeline import render_timeline

EXIT_APPLIED = 0
EXIT_ROLLED_BACK = 1
EXIT_INCOMPLETE = 2
EXIT_INVALID = 3
EXIT_NOT_FINISHED = 4  # kira show: a run recorded as still running
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_BUG = 70  # EX_SOFTWARE from sysexits.h


class FlowError(Exception):
    """The flow (or the command line) cannot be run; the message says why, in one line."""


class _UsageError(Exception):
    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 3, not 2: 2 means "rollback incomplete" here,
    and a script must never mistake a typo for a half-undone run."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.format_usage(), message)


# -- flows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flow:
    """A loaded flow: where it came from, its branches and its config."""

    label: str
    branches: list[kira.Branch]
    config: Any


def load_flow(spec: str, sets: Mapping[str, Any] | None = None) -> Flow:
    """Load FLOW: `path/to/file.py` or `package.module`, optionally `:attribute`.

    The module defines `branches` (or the attribute after `:`): a list of
    `kira.Branch`, or a callable returning one (called with the config when it
    takes an argument). It may define `config`, or a `make_config()` callable
    (which wins); without either the config is an empty dict. `sets` (from `--set`)
    are merged over a copy of a dict config.

    Raises:
        FlowError: the file or module is missing or fails to import, defines no
            branches, or the branches do not form a valid graph.
    """
    target, attr = _split_spec(spec)
    module = _import_flow(target)
    label = target if attr is None else spec
    config = _flow_config(module, target, sets or {})
    name = attr or "branches"
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise FlowError(
                f"{target} defines no `{name}`: a flow must define `branches`, a list of "
                "kira.Branch or a function returning one (or name another attribute as "
                "FLOW:ATTRIBUTE)"
            )
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, kira.Branch):
        try:
            obj = obj(config) if _takes_argument(obj) else obj()
        except Exception as exc:
            raise FlowError(f"{label}: calling `{name}` failed: {_describe(exc)}") from exc
    branches = _branch_list(obj, label, name)
    try:
        kira.RuntimeState.create(config, branches)  # validates the graph, runs nothing
    except kira.GraphError as exc:
        raise FlowError(f"{label}: invalid graph: {exc}") from exc
    return Flow(label, branches, config)


def _split_spec(spec: str) -> tuple[str, str | None]:
    target, sep, attr = spec.rpartition(":")
    # "C:\flows\x.py" is a path, not module "C" and attribute "\flows\x.py".
    if sep and target and all(p.isidentifier() for p in attr.split(".")) and len(target) > 1:
        return target, attr
    return spec, None


def _import_flow(target: str) -> ModuleType:
    if target.endswith(".py") or "/" in target or os.sep in target:
        return _import_path(Path(target))
    # Like `python -m`: modules in the working directory are importable.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise FlowError(
                f"no module named {target!r} (FLOW is a path to a .py file or an "
                "importable module name)"
            ) from exc
        raise FlowError(f"importing {target} failed: {_describe(exc)}") from exc
    except SyntaxError as exc:
        raise FlowError(_syntax_message(exc)) from exc
    except Exception as exc:
        raise FlowError(f"importing {target} failed: {_describe(exc)}") from exc


def _import_path(path: Path) -> ModuleType:
    if not path.exists():
        raise FlowError(f"flow file not found: {path}")
    if not path.is_file():
        raise FlowError(f"flow is not a file: {path}")
    stem = re.sub(r"\W", "_", path.stem)
    # The stem as module name (as `python FILE` would see it, minus __main__), unless
    # that would shadow an imported module such as `json`.
    name = stem if stem.isidentifier() and stem not in sys.modules else f"kira_flow_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FlowError(f"cannot load {path} as Python source")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # its sibling modules import, as with `python FILE`
    sys.modules[name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise FlowError(_syntax_message(exc)) from exc
    except Exception as exc:
        del sys.modules[name]
        raise FlowError(f"importing {path} failed: {_describe(exc)}") from exc
    return module


def _syntax_message(exc: SyntaxError) -> str:
    where = exc.filename or "the flow"
    line = f", line {exc.lineno}" if exc.lineno else ""
    return f"syntax error in {where}{line}: {exc.msg}"


def _flow_config(module: ModuleType, target: str, sets: Mapping[str, Any]) -> Any:
    if hasattr(module, "make_config"):
        make = module.make_config
        if not callable(make):
            raise FlowError(f"{target}: make_config must be a function returning the config")
        try:
            config = make()
        except Exception as exc:
            raise FlowError(f"{target}: make_config() failed: {_describe(exc)}") from exc
    else:
        config = getattr(module, "config", {})
    if not sets:
        return config
    if not isinstance(config, Mapping):
        raise FlowError(
            f"--set needs a dict config, but {target} defines its config as "
            f"{type(config).__name__}: drop --set or make the config a dict"
        )
    return {**config, **sets}


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in params)


def _branch_list(obj: object, label: str, name: str) -> list[kira.Branch]:
    if isinstance(obj, kira.Branch):
        raise FlowError(f"{label}: `{name}` is a single kira.Branch; make it a list of branches")
    if isinstance(obj, str | bytes | Mapping) or not isinstance(obj, Iterable):
        raise FlowError(
            f"{label}: `{name}` must be a list of kira.Branch (or a function returning "
            f"one), not {type(obj).__name__}"
        )
    branches = list(obj)
    for i, item in enumerate(branches):
        if not isinstance(item, kira.Branch):
            raise FlowError(
                f"{label}: `{name}`[{i}] is {type(item).__name__} {item!r:.60}, not a kira.Branch"
            )
    return branches


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as a dict. VALUE is read as JSON when it is valid JSON
    (`3`, `true`, `null`, `"007"`), else kept as a string.

    Raises:
        FlowError: an item has no `=` or an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FlowError(f"--set wants KEY=VALUE, not {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- output ----------------------------------------------------------------------------


def _seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"


def _short(value: object, limit: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}es" if word.endswith(("s", "ch", "sh", "x")) else f"{n} {word}s"


class _View:
    """Shows a run while it goes (base: shows nothing, for --quiet)."""

    def start(self) -> None:
        """Begin showing."""

    def event(self, event: kira.Event) -> None:
        """Show `event` (already recorded in the run log)."""

    def stop(self) -> None:
        """Stop showing (the summary follows)."""


class _PlainView(_View):
    """One line per event: for pipes, files, CI logs, and terminals without rich."""

    def __init__(self, out: TextIO, runlog: RunLog, debug: bool) -> None:
        self.out = out
        self.log = runlog
        self.debug = debug
        self.closed = False

    def event(self, event: kira.Event) -> None:
        if self.closed:
            return
        start = self.log.started or event.at
        stamp = f"[{(event.at - start).total_seconds():8.3f}s]"
        line = _describe_event(event, self.log)
        try:
            self.out.write(f"{stamp} {line}\n")
            self.out.flush()
        except BrokenPipeError:  # `kira run ... | head`: the run goes on, unseen
            self.closed = True
            _silence_stdout()
        if self.debug and event.error is not None:
            traceback.print_exception(event.error, file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing (not even the interpreter's last
    flush) fails again writing to a pipe whose reader has gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _describe_event(e: kira.Event, runlog: RunLog) -> str:
    """One event in words (the plain log line, and the rich view's scroll-back)."""
    name = e.branch or ""
    n = e.attempt
    nth = f" (attempt {n})" if n is not None and n > 1 else ""
    kind = e.kind
    if kind == "apply_started":
        return f"{name}: apply started{nth}"
    if kind == "applied":
        return (
            f"{name}: applied{nth} -> {_short(e.value)}  [{runlog.applied}/{runlog.total} applied]"
        )
    if kind == "apply_failed":
        return f"{name}: apply attempt {n} failed: {_describe_error(e.error)}"
    if kind == "retry_scheduled":
        delay = float(e.value) if isinstance(e.value, int | float) else 0.0
        when = f"in {_seconds(delay)}" if delay > 0 else "at once"
        return f"{name}: retrying {when} (attempt {n})"
    if kind == "failed":
        b = runlog.branches.get(name)
        if e.value == "unapply":
            count = b.count("unapply") if b else n or 0
            return (
                f"{name}: UNAPPLY GAVE UP after {_plural(count, 'attempt')}: "
                "its effects remain (it stays applied)"
            )
        count = b.count("apply") if b else n or 0
        return f"{name}: FAILED for good after {_plural(count, 'attempt')}"
    if kind == "rollback_started":
        return "ROLLBACK STARTED: " + _rollback_reason(e, runlog)
    if kind == "unapply_started":
        what = "unapplying a late value" if n is None else "unapply started"
        return f"{name}: {what}{nth}"
    if kind == "unapplied":
        if n is None:
            return f"{name}: late value unapplied"
        return f"{name}: unapplied{nth}  [{runlog.unapplied}/{runlog.applied} unapplied]"
    if kind == "unapply_failed":
        return f"{name}: unapply attempt {n} failed: {_describe_error(e.error)}"
    if kind == "run_finished":
        return f"run finished: {str(e.value).replace('_', ' ')}"
    return f"{name}: {kind}"


def _rollback_reason(e: kira.Event, runlog: RunLog) -> str:
    if e.value == "interrupted":
        return "the run was interrupted (Ctrl-C); undoing what was applied"
    if e.value == "inactivity":
        return "no branch made progress within the run's --timeout; undoing what was applied"
    b = runlog.branches.get(e.branch or "")
    tries = _plural(b.count("apply"), "attempt") if b else "its attempts"
    return f"{e.branch} failed for good after {tries}: {_describe_error(e.error)}"


def _describe_error(error: BaseException | None) -> str:
    d = error_dict(error)
    if d is None:
        return "no error"
    return f"{d['type']}: {d['message']}" if d["message"] else d["type"]


class _Rich:
    """rich's classes, imported on first use: rich is an optional extra (`kira[cli]`),
    and `import kira` must never import it."""

    def __init__(self) -> None:
        def load(module: str, name: str) -> Any:
            return getattr(importlib.import_module(f"rich.{module}"), name)

        self.Console = load("console", "Console")
        self.Group = load("console", "Group")
        self.Live = load("live", "Live")
        self.Panel = load("panel", "Panel")
        self.ProgressBar = load("progress_bar", "ProgressBar")
        self.Table = load("table", "Table")
        self.Text = load("text", "Text")


@functools.cache
def _rich() -> _Rich | None:
    try:
        return _Rich()
    except ImportError:
        return None


class _RichView(_View):
    """A live display: progress, what runs now, retries waiting, the rollback banner.

    Notable events (applied, failures, retries, the rollback) are also printed above
    the live area, so they stay on screen once the display goes.
    """

    def __init__(self, rich: _Rich, console: Any, runlog: RunLog, title: str, debug: bool) -> None:
        self.rich = rich
        self.console = console
        self.log = runlog
        self.title = title
        self.debug = debug
        self.live = rich.Live(
            console=console,
            get_renderable=self._render,
            refresh_per_second=10,
            transient=True,
        )

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def event(self, event: kira.Event) -> None:
        Text = self.rich.Text
        kind = event.kind
        if kind in ("apply_started", "unapply_started", "run_finished"):
            return  # the live area shows these
        if kind == "rollback_started":
            # one line in the scroll-back; the live area shows the big banner
            line = Text("ROLLBACK STARTED: " + _rollback_reason(event, self.log), style="bold red")
            self.console.print(line)
            return
        style = {
            "applied": "green",
            "unapplied": "magenta",
            "apply_failed": "red",
            "unapply_failed": "red",
            "failed": "bold red",
            "retry_scheduled": "yellow",
        }.get(kind, "")
        mark = {"applied": "✓", "unapplied": "↩", "retry_scheduled": "↻"}.get(kind, "✗")
        start = self.log.started or event.at
        stamp = f"{(event.at - start).total_seconds():7.2f}s"
        line = Text.assemble((stamp + " ", "dim"), (mark + " ", style))
        line.append(_describe_event(event, self.log), style=style)
        self.console.print(line)
        if self.debug and event.error is not None:
            self.console.print(
                "".join(traceback.format_exception(event.error)), style="dim", markup=False
            )

    def _render(self) -> Any:
        r = self.rich
        Group, Panel, ProgressBar, Table, Text = r.Group, r.Panel, r.ProgressBar, r.Table, r.Text
        now = datetime.now(UTC)
        rl = self.log
        with rl.lock:
            elapsed = (now - rl.started).total_seconds() if rl.started else 0.0
            rollback = rl.rollback
            applied, unapplied, total = rl.applied, rl.unapplied, rl.total
            running = [(b.name, a.phase, a.number, a.seconds(now)) for b, a in rl.running()]
            waiting = [
                (b.name, w.next_attempt, w.start, w.delay, b.last_error) for b, w in rl.waiting()
            ]
            reason = ""
            if rollback is not None:
                culprit = rl.branches.get(rollback.branch or "")
                if rollback.reason == "failure" and culprit is not None:
                    reason = (
                        f"{culprit.name} failed for good after "
                        f"{_plural(culprit.count('apply'), 'attempt')}: "
                        f"{_describe_error(rollback.error)}"
                    )
                elif rollback.reason == "interrupted":
                    reason = "interrupted (Ctrl-C)"
                else:
                    reason = "no progress within --timeout"
        parts: list[Any] = []
        head = Text.assemble(("kira ", "bold cyan"), (self.title, "bold"))
        head.append(f"  run {rl.run_id or '…'}  {elapsed:6.1f}s", style="dim")
        parts.append(head)
        if rollback is None:
            bar = ProgressBar(total=max(total, 1), completed=applied, width=40)
            count = Text(f"{applied}/{total} applied")
        else:
            parts.append(
                Panel(
                    Text(reason, style="bold"),
                    title="[bold]ROLLING BACK[/bold]",
                    title_align="left",
                    border_style="red",
                )
            )
            bar = ProgressBar(
                total=max(applied, 1), completed=unapplied, width=40, complete_style="magenta"
            )
            count = Text(f"{unapplied}/{applied} unapplied", style="magenta")
        grid = Table.grid(padding=(0, 2))
        grid.add_row(bar, count)
        parts.append(grid)
        if running:
            table = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold")
            table.add_column("running now")
            table.add_column("phase")
            table.add_column("attempt", justify="right")
            table.add_column("elapsed", justify="right")
            for name, phase, number, secs in running[:15]:
                table.add_row(
                    Text(name),
                    Text(phase, style="blue" if phase == "apply" else "magenta"),
                    str(number) if number is not None else "late",
                    f"{secs or 0.0:.1f}s",
                )
            if len(running) > 15:
                table.add_row(f"… and {len(running) - 15} more", "", "", "")
            parts.append(table)
        if waiting:
            table = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold yellow")
            table.add_column("retry waiting")
            table.add_column("attempt", justify="right")
            table.add_column("starts in", justify="right")
            table.add_column("after")
            for name, number, since, delay, error in waiting[:10]:
                left = max(0.0, delay - (now - since).total_seconds())
                table.add_row(
                    Text(name),
                    str(number or ""),
                    f"{left:.1f}s" if delay > 0 else "a free worker",
                    Text(_short(_describe_error(error), 50)),
                )
            parts.append(table)
        return Group(*parts)


def _rich_console(args: argparse.Namespace) -> Any:
    """A rich Console when stdout is a terminal and rich is installed, else None."""
    if args.quiet or not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
        return None
    rich = _rich()
    return None if rich is None else rich.Console()


# -- summary ----------------------------------------------------------------------------

_HEAD = ("branch", "state", "attempts", "duration", "result", "error")
_WIDE = 110  # columns a terminal needs for the summary to show results too
_NARROW = 80  # and durations


def _summary_rows(runlog: RunLog, abandoned: Iterable[str]) -> list[tuple[str, ...]]:
    gone = set(abandoned)
    rows: list[tuple[str, ...]] = []
    for b in runlog.branches.values():
        state = runlog.final_status(b.name)
        if b.name in gone:
            state = "abandoned (never returned)"
        rows.append(
            (
                b.name,
                state,
                _attempts(b),
                _durations(b, runlog.ended),
                _short(b.value, 30) if b.has_value else "",
                _short(_describe_error(b.last_error), 70) if b.last_error else "",
            )
        )
    return rows


def _attempts(b: BranchLog) -> str:
    applies, undos = b.count("apply"), b.count("unapply")
    return f"{applies}, undo {undos}" if undos else str(applies)


def _durations(b: BranchLog, end: datetime | None) -> str:
    text = _seconds(b.seconds("apply", end))
    undo = b.seconds("unapply", end)
    return f"{text}, undo {_seconds(undo)}" if undo is not None else text


def _verdict(
    runlog: RunLog, outcome: BaseException | None, status: int, interrupted: bool
) -> tuple[str, str]:
    """The last line of the summary, and its rich style."""
    took = ""
    if runlog.started and runlog.ended:
        took = f" in {_seconds((runlog.ended - runlog.started).total_seconds())}"
    why = ""
    if isinstance(outcome, kira.RunFailed) and outcome.culprit is not None:
        c = outcome.culprit
        why = (
            f": {c.branch} failed for good after {_plural(c.attempt, 'attempt')}, "
            f"{_describe_error(c.error)}"
        )
    if isinstance(outcome, kira.RollbackIncomplete):
        parts = []
        if outcome.still_applied:
            parts.append("still applied: " + ", ".join(outcome.still_applied))
        if outcome.abandoned:
            parts.append("abandoned, effects unknown: " + ", ".join(outcome.abandoned))
        first = "interrupted; the rollback is INCOMPLETE" if interrupted else "ROLLBACK INCOMPLETE"
        return (
            f"{first}{why}. {'; '.join(parts)}. These need a person's attention.",
            "bold red",
        )
    unapplied = ""
    if isinstance(outcome, kira.RolledBack):
        unapplied = f" {_plural(len(outcome.unapplied), 'branch')} unapplied."
    if interrupted:
        if isinstance(outcome, kira.RolledBack):
            return f"interrupted; rolled back{took}{why}.{unapplied}", "bold yellow"
        return f"interrupted again: stopped waiting. {outcome}", "bold red"
    if status == EXIT_APPLIED:
        return f"applied: all {runlog.total} branches{took} (run {runlog.run_id})", "bold green"
    if isinstance(outcome, kira.RolledBack):
        return f"rolled back{took}{why}.{unapplied} (run {runlog.run_id})", "bold yellow"
    return f"finished with status {status}", ""


def _plain_table(out: TextIO, head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, for output that is not a terminal."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    for row in (head, *rows):
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _print_summary(
    out: TextIO,
    console: Any,
    runlog: RunLog,
    outcome: BaseException | None,
    status: int,
    interrupted: bool,
) -> None:
    abandoned = outcome.abandoned if isinstance(outcome, kira.RollbackIncomplete) else ()
    rows = _summary_rows(runlog, abandoned)
    verdict, style = _verdict(runlog, outcome, status, interrupted)
    rich = _rich() if console is not None else None
    if rich is not None:
        Table = rich.Table
        colours = {"applied": "green", "unapplied": "magenta", "not started": "dim"}
        # results are for a glance (full ones are in --events): on a narrow terminal
        # they give their room to the errors, which say what went wrong
        # (and on a very narrow one, so do the durations: the timeline has them)
        with_results, with_durations = console.width >= _WIDE, console.width >= _NARROW
        table = Table(title="summary", title_justify="left", header_style="bold")
        table.add_column("branch", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("attempts", no_wrap=True)
        if with_durations:
            table.add_column("duration", no_wrap=True)
        if with_results:
            table.add_column("result", no_wrap=True, overflow="ellipsis", max_width=18)
        table.add_column("error", ratio=1)
        Text = rich.Text  # cells as Text: names, values and errors are not rich markup
        for name, state, attempts, duration, result, error in rows:
            cells = [Text(name), Text(state, style=colours.get(state, "red")), Text(attempts)]
            cells += [Text(duration)] if with_durations else []
            cells += [Text(result)] if with_results else []
            table.add_row(*cells, Text(error))
        console.print(table)
        console.print(verdict, style=style, markup=False, highlight=False)
        return
    out.write("\n")
    _plain_table(out, _HEAD, rows)
    out.write(verdict + "\n")
    out.flush()


# -- kira run ---------------------------------------------------------------------------


def _add_run(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a flow's branches, with a live display and a summary",
        description=(
            "Run the branches FLOW defines. Exit status: 0 applied, 1 rolled back, "
            "2 rollback incomplete, 3 invalid graph, flow, journal or command line, "
            "130 interrupted."
        ),
    )
    _add_flow_argument(p)
    _add_run_options(p)
    _add_journal_option(p, optional_value=True)
    p.set_defaults(handler=_cmd_run)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options `kira run` and `kira resume` share."""
    p.add_argument(
        "--max-workers", type=_positive_int, metavar="N", help="most attempts running at once"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="inactivity limit: roll back when no attempt starts or ends for this long",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config key (repeatable; the config must be a dict). VALUE is read as "
        "JSON when it is valid JSON (3, true, null), else as a string",
    )
    p.add_argument("--events", metavar="FILE", help="write every event as one JSON line")
    p.add_argument(
        "--timeline", metavar="FILE.html", help="write a self-contained Gantt chart of the run"
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no live display or log lines, only the summary"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    flow = load_flow(args.flow, parse_sets(args.set))
    if args.timeline:
        _check_writable(args.timeline, "--timeline")
    events_file: IO[str] | None = None
    if args.events:
        events_file = _open_output(args.events, "--events")

    journal = _open_journal(args.journal, flow.label, create=True) if args.journal else None
    run_id = uuid.uuid4().hex[:12]
    if journal is not None:
        again = shlex.join(
            ["kira", "resume", run_id, args.flow, "--journal", str(args.journal)]
            + [part for pair in args.set for part in ("--set", pair)]
        )
        print(
            f"kira: run {run_id}, recorded in {args.journal}; if this process dies: {again}",
            file=sys.stderr,
            flush=True,
        )

    def run(on_event: Callable[[kira.Event], object]) -> dict[str, Any]:
        return kira.run_tasks(
            flow.config,
            flow.branches,
            args.timeout,
            max_workers=args.max_workers,
            on_event=on_event,
            journal=journal,
            run_id=run_id,
        )

    try:
        return drive(args, flow, run, events_file)
    finally:
        if events_file is not None:
            events_file.close()
        if journal is not None:
            journal.close()


def drive(
    args: argparse.Namespace,
    flow: Flow,
    run: Callable[[Callable[[kira.Event], object]], dict[str, Any]],
    events_file: IO[str] | None = None,
    history: Iterable[kira.Event] = (),
) -> int:
    """Run `run(on_event)` with the display, the events file, the timeline and the
    summary; return the exit status. `history`: events recorded before (a resume)."""
    runlog = RunLog(flow.branches)
    for event in history:
        runlog.record(event)
    console = _rich_console(args)
    view: _View
    if args.quiet:
        view = _View()
    elif console is not None:
        rich = _rich()
        assert rich is not None  # a console is only made when rich imports
        view = _RichView(rich, console, runlog, flow.label, args.debug)
    else:
        view = _PlainView(sys.stdout, runlog, args.debug)
        doing = f"resuming run {args.run_id} of" if getattr(args, "run_id", None) else "running"
        print(f"kira: {doing} {flow.label} ({_plural(len(flow.branches), 'branch')})", flush=True)

    def on_event(event: kira.Event) -> None:
        runlog.record(event)
        if events_file is not None:
            events_file.write(event_json(event) + "\n")
            events_file.flush()  # a crash still leaves the events so far
        view.event(event)

    outcome: BaseException | None = None
    interrupted = False
    view.start()
    try:
        run(on_event)
        status = EXIT_APPLIED
    except kira.RolledBack as exc:
        status, outcome = EXIT_ROLLED_BACK, exc
    except kira.RollbackIncomplete as exc:
        status, outcome = EXIT_INCOMPLETE, exc
    except kira.GraphError as exc:
        raise FlowError(f"{flow.label}: invalid graph: {exc}") from exc
    except kira.JournalError as exc:
        raise FlowError(str(exc)) from exc
    except KeyboardInterrupt as exc:
        # kira has rolled back (first Ctrl-C) or given up waiting (second).
        status, interrupted = EXIT_INTERRUPTED, True
        outcome = exc.__cause__ if isinstance(exc.__cause__, kira.RunFailed) else exc
    finally:
        view.stop()
    wrote = ""
    if args.timeline:
        try:
            Path(args.timeline).write_text(render_timeline(runlog, flow.label), encoding="utf-8")
            wrote = f"wrote {args.timeline}"
        except OSError as exc:
            print(f"kira: could not write the timeline: {exc}", file=sys.stderr)
    try:
        _print_summary(sys.stdout, console, runlog, outcome, status, interrupted)
        if wrote:
            print(wrote, flush=True)
    except BrokenPipeError:
        _silence_stdout()
    return status


def _check_writable(path: str, option: str) -> None:
    """Refuse, before anything runs, a path the run's output could not be written to."""
    target = Path(path)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise FlowError(f"{option} {path}: the folder {folder} does not exist")
    if target.is_dir():
        raise FlowError(f"{option} {path}: is a folder, not a file")
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise FlowError(f"{option} {path}: not writable")


def _open_output(path: str, option: str) -> IO[str]:
    _check_writable(path, option)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise FlowError(f"{option} {path}: {exc.strerror or exc}") from exc


# -- kira graph -------------------------------------------------------------------------

_MERMAID_RESERVED = {"end", "graph", "subgraph", "flowchart", "style", "class", "click"}


def _add_graph(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "graph",
        help="print the dependency graph (Mermaid or Graphviz DOT)",
        description="Print FLOW's dependency graph; edges point from a branch to the "
        "branches that depend on it.",
    )
    _add_flow_argument(p)
    p.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE.svg|FILE.png",
        help="render the graph to an image with Graphviz (needs the `dot` program)",
    )
    p.set_defaults(handler=_cmd_graph)


def _cmd_graph(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".svg", ".png"):
        raise FlowError(f"--output must end in .svg or .png, not {output.name!r}")
    flow = load_flow(args.flow)
    if output is None:
        text = to_mermaid(flow.branches) if args.format == "mermaid" else to_dot(flow.branches)
        sys.stdout.write(text)
        return 0
    dot = shutil.which("dot")
    if dot is None:
        print(
            f"kira: cannot render {output}: Graphviz's `dot` program is not on PATH. "
            "Install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
            "graphviz), or print the graph with --format dot or mermaid instead.",
            file=sys.stderr,
        )
        return 1
    try:
        done = subprocess.run(
            [dot, f"-T{output.suffix.lower()[1:]}", "-o", str(output)],
            input=to_dot(flow.branches),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"kira: running {dot} failed: {exc}", file=sys.stderr)
        return 1
    if done.returncode != 0:
        print(f"kira: {dot} failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


def to_mermaid(branches: Iterable[kira.Branch]) -> str:
    """A Mermaid flowchart: one node per branch, an edge from each dependency to its
    dependent."""
    branches = list(branches)

    def plain(name: str) -> bool:
        return (
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None
            and name.lower() not in _MERMAID_RESERVED
        )

    # Names that are safe Mermaid ids stay as they are (readable); the others get
    # b<index>, made unique against the names kept.
    ids = {b.name: b.name for b in branches if plain(b.name)}
    taken = set(ids)
    for i, b in enumerate(branches):
        if b.name not in ids:
            candidate = f"b{i}"
            while candidate in taken:
                candidate += "_"
            ids[b.name] = candidate
            taken.add(candidate)
    lines = ["flowchart LR"]
    for b in branches:
        label = b.name.replace('"', "#quot;")
        lines.append(f'    {ids[b.name]}["{label}"]')
    for b in branches:
        lines.extend(f"    {ids[d]} --> {ids[b.name]}" for d in b.dependencies)
    return "\n".join(lines) + "\n"


def to_dot(branches: Iterable[kira.Branch]) -> str:
    """A Graphviz digraph: one node per branch, an edge from each dependency to its
    dependent."""
    branches = list(branches)

    def q(name: str) -> str:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "digraph kira {",
        "    rankdir=LR;",
        '    node [shape=box, style="rounded,filled", fillcolor="#eef3fc", fontname="Helvetica"];',
    ]
    lines.extend(f"    {q(b.name)};" for b in branches)
    for b in branches:
        lines.extend(f"    {q(d)} -> {q(b.name)};" for d in b.dependencies)
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- the parser and main ----------------------------------------------------------------


def _add_flow_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "flow",
        metavar="FLOW",
        help="a .py file or a module name, optionally :ATTRIBUTE naming the branches "
        "(default: `branches`)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and kira's debug log")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


# -- the journal: kira runs, kira show, kira resume ----------------------------------------

DEFAULT_JOURNAL = ".kira/journal.db"


def _add_journal_option(p: argparse.ArgumentParser, *, optional_value: bool = False) -> None:
    if optional_value:
        p.add_argument(
            "--journal",
            nargs="?",
            const=DEFAULT_JOURNAL,
            metavar="FILE",
            help=f"record the run in this SQLite journal (default {DEFAULT_JOURNAL}), "
            "so that `kira resume` can carry it on if the process dies",
        )
    else:
        p.add_argument(
            "--journal",
            default=DEFAULT_JOURNAL,
            metavar="FILE",
            help=f"the journal (default {DEFAULT_JOURNAL})",
        )


def _open_journal(path: str, flow: str | None = None, *, create: bool = False) -> kira.Journal:
    if not create and not Path(path).exists():
        raise FlowError(f"no journal at {path} (give its path with --journal FILE)")
    try:
        # read-only only where it must be: opened writable, an older journal is
        # migrated (reading alone writes nothing)
        writable = os.access(path, os.W_OK) and os.access(Path(path).parent, os.W_OK)
        readonly = not create and flow is None and not writable
        return kira.Journal(path, flow=flow, readonly=readonly)
    except kira.JournalError as exc:
        raise FlowError(str(exc)) from exc


def _add_runs(subparsers: Any) -> None:
    p = subparsers.add_parser("runs", help="list the runs recorded in a journal")
    _add_journal_option(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(handler=_cmd_runs)


def _cmd_runs(args: argparse.Namespace) -> int:
    with _open_journal(args.journal) as journal:
        try:
            runs = journal.runs()
        except kira.JournalError as exc:
            raise FlowError(str(exc)) from exc
    head = ("run", "flow", "started (UTC)", "state", "applied / total")
    rows = [
        (
            r.run_id,
            r.flow or "",
            r.started.strftime("%Y-%m-%d %H:%M:%S"),
            r.state,
            f"{r.applied} / {r.total}",
        )
        for r in runs
    ]
    if not rows:
        print(f"no runs in {args.journal}")
        return 0
    _plain_table(sys.stdout, head, rows)
    return 0


def _add_show(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "show",
        help="show a recorded run: branch states, attempts, errors",
        description=(
            "Show a recorded run. Exit status: the run's own (0 applied, 1 rolled back, "
            "2 rollback incomplete), 4 not finished (recorded as running), 3 no such run "
            "or journal."
        ),
    )
    p.add_argument("run_id", metavar="RUN_ID")
    _add_journal_option(p)
    p.add_argument(
        "--timeline", metavar="FILE.html", help="write the run's Gantt chart from its events"
    )
    p.add_argument("--events", metavar="FILE", help="write its events as JSON lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(handler=_cmd_show)


def _cmd_show(args: argparse.Namespace) -> int:
    with _open_journal(args.journal) as journal:
        try:
            summary = next((r for r in journal.runs() if r.run_id == args.run_id), None)
            if summary is None:
                raise FlowError(f"journal {args.journal} holds no run {args.run_id!r}")
            graph = journal.graph(args.run_id)
            events = journal.events(args.run_id)
        except kira.JournalError as exc:
            raise FlowError(str(exc)) from exc
    branches = [kira.Branch(name, _recorded, deps) for name, deps in graph]
    runlog = RunLog(branches)
    for event in events:
        runlog.record(event)
    label = summary.flow or args.run_id
    started = f"{summary.started:%Y-%m-%d %H:%M:%S}"
    print(f"run {args.run_id} of {label}: {summary.state}, started {started} UTC")
    if args.timeline:
        _check_writable(args.timeline, "--timeline")
        Path(args.timeline).write_text(render_timeline(runlog, label), encoding="utf-8")
    if args.events:
        _check_writable(args.events, "--events")
        with open(args.events, "w", encoding="utf-8") as fh:
            fh.writelines(event_json(e) + "\n" for e in events)
    _plain_table(sys.stdout, _HEAD, _summary_rows(runlog, ()))
    failures = [e for e in events if e.kind in ("apply_failed", "unapply_failed")]
    if failures:
        print("\nfailed attempts, oldest first:")
        for e in failures:
            print(
                f"  {e.at:%H:%M:%S.%f} {e.branch} {e.kind.split('_')[0]} #{e.attempt}: "
                f"{_describe_error(e.error)}"
            )
    if args.timeline:
        print(f"\nwrote {args.timeline}")
    if summary.state == "running":
        print(
            "\nnot finished: its process is running it still, or died "
            f"(then: kira resume {args.run_id} FLOW --journal {args.journal})"
        )
    return _SHOW_STATUS.get(summary.state, EXIT_NOT_FINISHED)


_SHOW_STATUS = {
    "applied": EXIT_APPLIED,
    "rolled_back": EXIT_ROLLED_BACK,
    "rollback_incomplete": EXIT_INCOMPLETE,
}


def _recorded(config: object, deps: object) -> None:
    """Stands for a recorded branch's apply: `kira show` never runs anything."""


def _add_resume(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "resume",
        help="carry on a recorded run after its process died",
        description=(
            "Carry on RUN_ID with the branches FLOW defines (the same flow it was started "
            "with): finished branches keep their recorded results, interrupted attempts "
            "are made again, a rollback under way is finished. Exit status as for run."
        ),
    )
    p.add_argument("run_id", metavar="RUN_ID")
    _add_flow_argument(p)
    _add_journal_option(p)
    _add_run_options(p)
    p.set_defaults(handler=_cmd_resume)


def _cmd_resume(args: argparse.Namespace) -> int:
    flow = load_flow(args.flow, parse_sets(args.set))
    journal = _open_journal(args.journal, flow.label)
    try:
        history = journal.events(args.run_id)
    except kira.JournalError as exc:
        journal.close()
        raise FlowError(str(exc)) from exc
    events_file: IO[str] | None = None
    if args.events:
        events_file = _open_output(args.events, "--events")

    def run(on_event: Callable[[kira.Event], object]) -> dict[str, Any]:
        return kira.resume(
            args.run_id,
            flow.config,
            flow.branches,
            journal=journal,
            timeout=args.timeout,
            max_workers=args.max_workers,
            on_event=on_event,
        )

    try:
        return drive(args, flow, run, events_file, history)
    finally:
        if events_file is not None:
            events_file.close()
        journal.close()


COMMANDS: list[Callable[[Any], None]] = [_add_run, _add_graph, _add_runs, _add_show, _add_resume]
"""Each registers one subcommand on the subparsers object (see the module docstring)."""


def build_parser() -> argparse.ArgumentParser:
    """The `kira` argument parser, with every command of `COMMANDS`."""
    parser = _Parser(
        prog="kira",
        description="Run a graph of interdependent tasks concurrently, with retries and rollback.",
    )
    parser.add_argument("--version", action="version", version=f"kira {kira.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `kira` command with `argv` (default: `sys.argv[1:]`); return the exit
    status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        sys.stderr.write(f"{exc.usage}kira: error: {exc}\n")
        return EXIT_INVALID
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    debug = bool(getattr(args, "debug", False))
    if debug:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
        )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except FlowError as exc:
        if debug:
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        message = " ".join(str(exc).splitlines())  # one line, whatever the cause said
        print(f"kira: error: {message}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("kira: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as if the pipe had killed us
    except Exception:
        traceback.print_exc()
        print(
            "kira: internal error: the above is a bug in kira (or in how the flow uses "
            "it); please report it with the traceback",
            file=sys.stderr,
        )
        return EXIT_BUG
