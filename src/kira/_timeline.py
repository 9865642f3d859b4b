"""The `--timeline` page: a self-contained HTML Gantt chart of one run.

Inline SVG and CSS only: no script, no font, no stylesheet, no URL of any kind,
so the page opens offline and can be attached to a ticket as one file. Drawn
from a `RunLog`, that is from the run's events alone.
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime, timedelta
from html import escape

from ._runlog import AttemptLog, BranchLog, RunLog

LABEL_W = 250  # the branch-name column
CHART_X0 = LABEL_W + 16  # where time 0 is drawn: clear of the labels
CHART_W = 960
RIGHT_PAD = 40
ROW_H = 34
BAR_H = 18
AXIS_H = 46

APPLY = "#3b6fd8"
UNAPPLY = "#9b4fc9"
FAILED = "#d62828"
CRITICAL = "#f2a900"
ROLLBACK = "#d62828"

STATUS_COLOURS = {
    "applied": "#1f7a3a",
    "unapplied": "#6b3fa0",
    "failed": FAILED,
    "still applied": FAILED,
    "still applied (unapply failed)": FAILED,
    "not started": "#777",
}

OUTCOMES = {
    "applied": ("applied", "#1f7a3a"),
    "rolled_back": ("rolled back", "#b35c00"),
    "rollback_incomplete": ("rollback incomplete", FAILED),
    None: ("did not finish", "#555"),
}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 24px 32px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 6px; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff;
         font-weight: 600; font-size: 14px; vertical-align: 3px; margin-left: 8px; }
.facts { color: #555; margin: 0 0 10px; }
.why { border-left: 5px solid #d62828; background: #fdf0f0; padding: 8px 12px; margin: 10px 0;
       max-width: 1200px; }
.why.ok { border-color: #1f7a3a; background: #eef8f0; }
.legend { display: flex; flex-wrap: wrap; gap: 18px; margin: 12px 0 6px; color: #333; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.legend svg { vertical-align: middle; }
.chart { overflow-x: auto; }
.chart svg { max-width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }
.critical { margin: 8px 0 16px; }
.critical b { background: #fff3cc; padding: 1px 5px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { text-align: left; padding: 4px 12px 4px 0; border-bottom: 1px solid #e4e4e4;
         vertical-align: top; }
th { color: #555; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 13px; }
h2 { font-size: 16px; margin: 22px 0 4px; }
"""


def render_timeline(log: RunLog, title: str) -> str:
    """The whole HTML page for the run in `log`, titled after the flow `title`."""
    with log.lock:
        return _Page(log, title).html()


class _Page:
    def __init__(self, log: RunLog, title: str) -> None:
        self.log = log
        self.title = title
        self.rows = list(log.branches.values())
        ends = [a.end for b in self.rows for a in b.attempts if a.end is not None]
        ends += [w.end for b in self.rows for w in b.waits if w.end is not None]
        self.t0: datetime | None = log.started
        t1 = log.ended or (max(ends) if ends else log.started)
        self.t1: datetime | None = t1
        self.span = max((t1 - self.t0).total_seconds(), 1e-3) if t1 and self.t0 else 1e-3
        # the window of the chart being drawn (see `_charts`)
        self.w0 = self.w1 = t1 or datetime.now()
        self.wspan = self.span
        path, self.path_seconds = log.critical_path(now=t1)
        self.path = path
        self.on_path = set(path)

    # -- geometry: each chart shows the window [w0, w1] of the run -----------------------

    def x(self, t: datetime) -> float:
        """The x of time `t` in the current chart, clamped to its edges."""
        fraction = (t - self.w0).total_seconds() / self.wspan
        return CHART_X0 + min(max(fraction, 0.0), 1.0) * CHART_W

    def visible(self, start: datetime, end: datetime) -> bool:
        """Whether [start, end] meets the current chart's window."""
        return end >= self.w0 and start <= self.w1

    def offset(self, t: datetime) -> float:
        assert self.t0 is not None
        return (t - self.t0).total_seconds()

    # -- the page --------------------------------------------------------------------

    def html(self) -> str:
        log = self.log
        label, colour = OUTCOMES.get(log.finished, OUTCOMES[None])
        if log.rollback is not None and log.rollback.reason == "interrupted":
            label += " (interrupted)"
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>kira timeline: {escape(self.title)}</title>",
            f"<style>{CSS}</style></head><body>",
            f'<h1>{escape(self.title)}<span class="badge" style="background:{colour}">'
            f"{escape(label)}</span></h1>",
            f'<p class="facts">{self._facts()}</p>',
            self._why(),
            self._legend(),
            self._charts(),
            self._critical_text(),
            self._table(),
            self._errors(),
            "</body></html>",
        ]
        return "\n".join(p for p in parts if p)

    def _facts(self) -> str:
        log = self.log
        attempts = sum(len(b.attempts) for b in self.rows)
        failures = sum(1 for b in self.rows for a in b.attempts if a.outcome == "failed")
        facts = [f"run <code>{escape(log.run_id or '?')}</code>"]
        if self.t0 is not None:
            facts.append("started " + escape(self.t0.strftime("%Y-%m-%d %H:%M:%S UTC")))
        facts += [
            f"took {_seconds(self.span)}",
            f"{log.total} branches",
            f"{attempts} attempts",
            f"{failures} failed",
        ]
        return " · ".join(facts)

    def _why(self) -> str:
        log = self.log
        rb = log.rollback
        if rb is None:
            if log.finished == "applied":
                return f'<p class="why ok">Every branch applied ({log.applied} of {log.total}).</p>'
            return ""
        when = f"at +{_seconds(self.offset(rb.at))}"
        if rb.reason == "failure" and rb.branch is not None:
            tries = f"{rb.attempts} attempt" + ("s" if rb.attempts != 1 else "")
            text = (
                f"<b>Rollback started {when}</b> because <b>{escape(rb.branch)}</b> failed "
                f"for good after {tries}: <code>{escape(_error(rb.error))}</code>"
            )
        elif rb.reason == "interrupted":
            text = f"<b>Rollback started {when}</b> because the run was interrupted (Ctrl-C)."
        elif rb.reason == "inactivity":
            text = (
                f"<b>Rollback started {when}</b> because no branch made progress within "
                "the run's timeout."
            )
        else:
            text = f"<b>Rollback started {when}</b> ({escape(rb.reason)})."
        still = [b.name for b in self.rows if log.final_status(b.name).startswith("still")]
        text += f" Unapplied {log.unapplied} of {log.applied} applied branches."
        if still:
            text += " <b>Still applied:</b> " + escape(", ".join(still)) + "."
        return f'<p class="why">{text}</p>'

    def _legend(self) -> str:
        """Only what the chart shows: an applied run has no unapply to explain."""

        def swatch(body: str) -> str:
            return f'<svg width="34" height="16" viewBox="0 0 34 16">{body}</svg>'

        attempts = [a for b in self.rows for a in b.attempts]
        shown = {
            "unapply": any(a.phase == "unapply" for a in attempts),
            "failed": any(a.outcome == "failed" for a in attempts),
            "open": any(a.outcome == "running" for a in attempts),
            "wait": any(b.waits for b in self.rows),
            "critical": bool(self.path),
            "rollback": self.log.rollback is not None,
        }
        bar = '<rect x="1" y="2" width="32" height="12" rx="2" '
        candidates = [
            ("apply", swatch(f'{bar}fill="{APPLY}"/>'), "apply"),
            ("unapply", swatch(f'{bar}fill="{UNAPPLY}"/>'), "unapply (rollback)"),
            (
                "failed",
                swatch(
                    f'{_pattern_defs("lg")}{bar}fill="url(#lg-fail-apply)" '
                    f'stroke="{FAILED}" stroke-width="2"/>'
                ),
                "failed attempt (✕)",
            ),
            (
                "open",
                swatch(f'{_pattern_defs("lo")}{bar}fill="url(#lo-open)" stroke="#555"/>'),
                "never returned",
            ),
            (
                "wait",
                swatch(
                    '<line x1="1" y1="8" x2="33" y2="8" stroke="#666" stroke-width="2" '
                    'stroke-dasharray="4 3"/>'
                ),
                "waiting to retry",
            ),
            (
                "critical",
                swatch(f'<rect x="1" y="5" width="32" height="6" rx="2" fill="{CRITICAL}"/>'),
                "critical path (its rows tinted)",
            ),
            (
                "rollback",
                swatch(
                    f'<line x1="17" y1="0" x2="17" y2="16" stroke="{ROLLBACK}" '
                    'stroke-width="2" stroke-dasharray="4 2"/>'
                ),
                "rollback started",
            ),
        ]
        items = [(s, t) for key, s, t in candidates if key == "apply" or shown[key]]
        body = "".join(f"<span>{s}{escape(t)}</span>" for s, t in items)
        return f'<div class="legend">{body}</div>'

    def _charts(self) -> str:
        """The whole run; and when the rollback is brief next to it, the rollback again,
        zoomed, since its unapplies would otherwise be slivers at the right edge."""
        if self.t0 is None or self.t1 is None:
            return ""
        out = [f'<div class="chart">{self._svg(self.t0, self.t1, "the whole run")}</div>']
        rb = self.log.rollback
        if rb is not None:
            rollback_seconds = (self.t1 - rb.at).total_seconds()
            if 0 < rollback_seconds < 0.3 * self.span:
                # start a little before the rollback, so its cause is in view
                start = max(self.t0, rb.at - timedelta(seconds=rollback_seconds * 0.15))
                caption = (
                    f"the rollback, zoomed: +{_seconds(self.offset(start))} to "
                    f"+{_seconds(self.span)}"
                )
                out.append(
                    f"<h2>Rollback in detail ({_seconds(rollback_seconds)})</h2>"
                    '<p class="facts">Each applied branch is unapplied only once every branch '
                    "that depends on it has been; independent ones at the same time.</p>"
                )
                out.append(f'<div class="chart">{self._svg(start, self.t1, caption)}</div>')
        return "\n".join(out)

    def _svg(self, w0: datetime, w1: datetime, caption: str) -> str:
        self.w0, self.w1 = w0, w1
        self.wspan = max((w1 - w0).total_seconds(), 1e-3)
        rows = self.rows
        bottom = AXIS_H + max(1, len(rows)) * ROW_H
        height = bottom + 12
        width = CHART_X0 + CHART_W + RIGHT_PAD
        out = [
            f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'role="img" aria-label="Gantt chart: {escape(caption)}">',
            "<defs>" + _pattern_defs("p") + "</defs>",
        ]
        # row backgrounds: critical rows tinted, the others striped
        for i, b in enumerate(rows):
            y = AXIS_H + i * ROW_H
            fill = "#fff6d9" if b.name in self.on_path else ("#f6f7f9" if i % 2 else "#fff")
            out.append(f'<rect x="0" y="{y}" width="{width}" height="{ROW_H}" fill="{fill}"/>')
        rb = self.log.rollback
        if rb is not None:
            x = self.x(rb.at)
            out.append(
                f'<rect x="{x:.1f}" y="{AXIS_H}" width="{CHART_X0 + CHART_W - x:.1f}" '
                f'height="{bottom - AXIS_H}" fill="{ROLLBACK}" fill-opacity="0.06"/>'
            )
        out.extend(self._axis(bottom))
        for i, b in enumerate(rows):
            out.extend(self._row(i, b))
        out.extend(self._path_links())
        if rb is not None and self.visible(rb.at, rb.at):
            x = self.x(rb.at)
            anchor = "end" if x > CHART_X0 + CHART_W * 0.8 else "start"
            dx = -5 if anchor == "end" else 5
            out.append(
                f'<line x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{bottom}" '
                f'stroke="{ROLLBACK}" stroke-width="2" stroke-dasharray="6 3"/>'
                f'<text x="{x + dx:.1f}" y="14" text-anchor="{anchor}" '
                f'fill="{ROLLBACK}" font-size="13" font-weight="600">rollback started</text>'
            )
        out.append("</svg>")
        return "".join(out)

    def _axis(self, bottom: int) -> list[str]:
        out = [
            f'<line x1="{CHART_X0}" y1="{AXIS_H}" x2="{CHART_X0 + CHART_W}" y2="{AXIS_H}" '
            'stroke="#999"/>',
            f'<text x="12" y="{AXIS_H - 8}" font-size="12" fill="#555">branch</text>',
            f'<text x="{LABEL_W - 10}" y="{AXIS_H - 8}" font-size="12" fill="#555" '
            'text-anchor="end">final state</text>',
        ]
        step = _nice_step(self.wspan / 8)
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        first = self.offset(self.w0)
        n = math.ceil(first / step - 1e-9)
        while n * step <= first + self.wspan * 1.0001:
            t = n * step
            x = CHART_X0 + (t - first) / self.wspan * CHART_W
            out.append(
                f'<line x1="{x:.1f}" y1="{AXIS_H - 4}" x2="{x:.1f}" y2="{bottom}" '
                'stroke="#ddd" stroke-width="1"/>'
                f'<text x="{x:.1f}" y="{AXIS_H - 8}" '
                f'font-size="12" fill="#555" text-anchor="middle">{t:.{decimals}f} s</text>'
            )
            n += 1
        return out

    def _row(self, i: int, b: BranchLog) -> list[str]:
        y = AXIS_H + i * ROW_H
        mid = y + ROW_H / 2
        status = self.log.final_status(b.name)
        colour = STATUS_COLOURS.get(status, "#555")
        name = b.name if len(b.name) <= 22 else b.name[:21] + "…"
        weight = "700" if b.name in self.on_path else "600"
        out = [
            f'<text x="12" y="{mid + 4:.1f}" font-size="13" font-weight="{weight}">'
            f"<title>{escape(b.name)}</title>{escape(name)}</text>",
            f'<text x="{LABEL_W - 10}" y="{mid + 4:.1f}" font-size="12" fill="{colour}" '
            f'text-anchor="end">{escape(status)}</text>',
        ]
        top = mid - BAR_H / 2
        if b.name in self.on_path:
            span = b.span("apply", now=self.t1)
            if span is not None and self.visible(*span):
                x0, x1 = self.x(span[0]), self.x(span[1])
                out.append(
                    f'<rect x="{x0:.1f}" y="{top + BAR_H + 1:.1f}" width="{max(x1 - x0, 3):.1f}" '
                    f'height="4" rx="2" fill="{CRITICAL}"><title>{escape(b.name)} is on the '
                    "critical path</title></rect>"
                )
        for wait in b.waits:
            end = wait.end or self.t1
            if end is None or not self.visible(wait.start, end):
                continue
            x0, x1 = self.x(wait.start), self.x(end)
            what = f"retry {wait.next_attempt}" if wait.next_attempt else "retry"
            tip = f"{b.name}: {what} of {wait.phase} scheduled after {_seconds(wait.delay)}"
            out.append(
                f'<line x1="{x0:.1f}" y1="{mid:.1f}" x2="{max(x1, x0 + 2):.1f}" y2="{mid:.1f}" '
                'stroke="#666" stroke-width="2" stroke-dasharray="4 3">'
                f"<title>{escape(tip)}</title></line>"
            )
        for attempt in b.attempts:
            out.extend(self._bar(b, attempt, top))
        return out

    def _bar(self, b: BranchLog, a: AttemptLog, top: float) -> list[str]:
        end = a.end or self.t1 or a.start
        if not self.visible(a.start, end):
            return []
        x0 = self.x(a.start)
        width = max(self.x(end) - x0, 3.0)
        base = APPLY if a.phase == "apply" else UNAPPLY
        which = f"attempt {a.number}" if a.number is not None else "late value"
        seconds = (end - a.start).total_seconds()
        if a.outcome == "ok":
            fill, stroke = base, "none"
            tip = f"{b.name}: {a.phase} {which} succeeded in {_seconds(seconds)}"
        elif a.outcome == "failed":
            fill, stroke = f"url(#p-fail-{a.phase})", FAILED
            tip = f"{b.name}: {a.phase} {which} failed after {_seconds(seconds)}: {_error(a.error)}"
        else:
            fill, stroke = "url(#p-open)", "#555"
            tip = f"{b.name}: {a.phase} {which} had not returned when the run ended"
        tip += f" (started at +{_seconds(self.offset(a.start))})"
        out = [
            f'<g><title>{escape(tip)}</title><rect x="{x0:.1f}" y="{top:.1f}" '
            f'width="{width:.1f}" height="{BAR_H}" rx="3" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="2"/>'
        ]
        label = ""
        if a.number is not None:
            word = "apply" if a.phase == "apply" else "undo"
            if width >= 70:
                label = f"{word} #{a.number}"
            elif width >= 22:
                label = f"#{a.number}"
        if label:
            colour = "#fff" if a.outcome == "ok" else "#222"
            out.append(
                f'<text x="{x0 + 5:.1f}" y="{top + BAR_H - 5:.1f}" font-size="11" '
                f'fill="{colour}" font-weight="600">{escape(label)}</text>'
            )
        if a.outcome == "failed":
            out.append(
                f'<text x="{x0 + width + 3:.1f}" y="{top + BAR_H - 3:.1f}" font-size="15" '
                f'font-weight="700" fill="{FAILED}">✕</text>'
            )
        out.append("</g>")
        return out

    def _path_links(self) -> list[str]:
        """Thin links from each critical branch's end to the next one's start."""
        out = []
        index = {b.name: i for i, b in enumerate(self.rows)}
        for a, b in itertools.pairwise(self.path):
            sa = self.log.branches[a].span("apply", now=self.t1)
            sb = self.log.branches[b].span("apply", now=self.t1)
            if sa is None or sb is None or not self.visible(sa[1], sb[0]):
                continue
            ya = AXIS_H + index[a] * ROW_H + ROW_H / 2 + BAR_H / 2 + 3
            yb = AXIS_H + index[b] * ROW_H + ROW_H / 2 + BAR_H / 2 + 3
            out.append(
                f'<line x1="{self.x(sa[1]):.1f}" y1="{ya:.1f}" x2="{self.x(sb[0]):.1f}" '
                f'y2="{yb:.1f}" stroke="{CRITICAL}" stroke-width="2"/>'
            )
        return out

    def _critical_text(self) -> str:
        if not self.path:
            return ""
        chain = " → ".join(f"<b>{escape(n)}</b>" for n in self.path)
        return (
            f'<p class="critical">Critical path ({_seconds(self.path_seconds)} of apply time, '
            f"the longest chain of dependencies; shorten these to speed the run up): {chain}</p>"
        )

    def _table(self) -> str:
        head = (
            "<tr><th>branch</th><th>depends on</th><th>final state</th><th>apply attempts</th>"
            "<th>apply time</th><th>unapply attempts</th><th>unapply time</th>"
            "<th>last error</th></tr>"
        )
        rows = []
        for b in self.rows:
            applied = b.seconds("apply", now=self.t1)
            unapplied = b.seconds("unapply", now=self.t1)
            rows.append(
                "<tr>"
                f"<td><b>{escape(b.name)}</b></td>"
                f"<td>{escape(', '.join(b.dependencies)) or '—'}</td>"
                f"<td>{escape(self.log.final_status(b.name))}</td>"
                f'<td class="num">{b.count("apply")}</td>'
                f'<td class="num">{_seconds(applied) if applied is not None else "—"}</td>'
                f'<td class="num">{b.count("unapply")}</td>'
                f'<td class="num">{_seconds(unapplied) if unapplied is not None else "—"}</td>'
                f"<td>{escape(_error(b.last_error)) if b.last_error else ''}</td>"
                "</tr>"
            )
        return f"<h2>Branches</h2><table>{head}{''.join(rows)}</table>"

    def _errors(self) -> str:
        items = []
        for b in self.rows:
            for a in b.attempts:
                if a.outcome == "failed":
                    items.append((a.end or a.start, b.name, a))
        if not items:
            return ""
        items.sort(key=lambda item: item[0])
        lines = "".join(
            f"<tr><td class='num'>+{_seconds(self.offset(at))}</td><td>{escape(name)}</td>"
            f"<td>{a.phase} attempt {a.number if a.number is not None else '(late)'}</td>"
            f"<td><code>{escape(_error(a.error))}</code></td></tr>"
            for at, name, a in items
        )
        return (
            "<h2>Failed attempts</h2><table><tr><th>at</th><th>branch</th><th>attempt</th>"
            f"<th>error</th></tr>{lines}</table>"
        )


def _pattern_defs(prefix: str) -> str:
    """Hatched fills: failed attempts (in their phase's colour) and attempts that never
    returned."""
    out = []
    for phase, colour in (("apply", APPLY), ("unapply", UNAPPLY)):
        out.append(
            f'<pattern id="{prefix}-fail-{phase}" width="6" height="6" '
            'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            f'<rect width="6" height="6" fill="{colour}" fill-opacity="0.28"/>'
            f'<rect width="2.5" height="6" fill="{colour}" fill-opacity="0.8"/></pattern>'
        )
    out.append(
        f'<pattern id="{prefix}-open" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#ccc"/>'
        '<rect width="2" height="6" fill="#888"/></pattern>'
    )
    return "".join(out)


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 times 10**k that is at least `raw`."""
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * power >= raw * 0.999:
            return m * power
    return 10 * power


def _seconds(s: float) -> str:
    if s < 0.001:
        return "0 ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"


def _error(error: BaseException | None) -> str:
    if error is None:
        return ""
    message = str(error)
    name = type(error).__name__
    return f"{name}: {message}" if message else name
