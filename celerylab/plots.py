"""Pictures of what was measured: tables, per-process timelines, latency distributions."""

from __future__ import annotations

import html
import warnings
from collections.abc import Iterable

import matplotlib.pyplot as plt

from celerylab.recording import Attempt, percentile

STATE_COLORS = {"SUCCESS": "tab:green", "FAILURE": "tab:red", "RETRY": "tab:orange", None: "tab:gray"}


def table(rows: Iterable, columns: list[str] | None = None):
    """An HTML table of dicts (or Attempts) for the notebook; plain text elsewhere.

    For attempts, the "+s" columns are seconds after the task's first publish (the first `sent`
    recorded for that task id in the table)."""
    rows = list(rows)
    # times of the attempts of one task are counted from that task's first publish (or, with no
    # publish recorded, its first receipt), so a redelivery shows when it came
    firsts: dict[str, float] = {}
    for r in rows:
        if isinstance(r, Attempt) and (r.sent or r.received):
            t = r.sent or r.received
            firsts[r.id] = min(firsts.get(r.id, t), t)
    caption = ("+s: seconds after the task was first sent" if any(isinstance(r, Attempt)
                                                                    for r in rows) else "")
    rows = [r if isinstance(r, dict) else _attempt_row(r, firsts.get(r.id)) for r in rows]
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    class _Table:
        def _repr_html_(self) -> str:
            sample = {c: next((r.get(c) for r in rows if r.get(c) is not None), None)
                      for c in columns}
            head = "".join(_cell("th", sample[c], c) for c in columns)
            body = "".join("<tr>" + "".join(_cell("td", r.get(c), _fmt(r.get(c)))
                                            for c in columns) + "</tr>" for r in rows)
            cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
            return f"<table>{cap}<tr>{head}</tr>{body}</table>"

        def __repr__(self) -> str:
            lines = ([caption] if caption else []) + ["  ".join(columns)]
            lines += ["  ".join(_fmt(r.get(c)) for c in columns) for r in rows]
            return "\n".join(lines)

    return _Table()


def _cell(tag: str, v, text: str) -> str:
    """Numbers right-aligned, words left-aligned (JupyterLab right-aligns every cell)."""
    side = "right" if isinstance(v, int | float) and not isinstance(v, bool) else "left"
    return f'<{tag} style="text-align:{side}">{html.escape(text)}</{tag}>'


def tidy(fig) -> None:
    """``tight_layout`` without its UserWarning (a pink box in the notebook) when a figure cannot
    be made fully tight; a suptitle keeps its own band above the panels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout(rect=(0, 0, 1, 0.96) if fig._suptitle is not None else None)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def _attempt_row(a: Attempt, t0: float | None = None) -> dict:
    """One attempt; its times in seconds after ``t0``, the task's first publish."""
    t0 = t0 or a.sent or a.received or 0
    rel = lambda t: None if t is None else t - t0  # noqa: E731
    state = ("LOST (its process was killed)" if a.state == "LOST" else a.state) or \
        ("no end recorded (its process died?)" if a.started else "not started")
    return {"task": a.name.rsplit(".", 1)[-1], "id": a.id[:8], "queue": a.queue,
            "sent +s": rel(a.sent), "received +s": rel(a.received), "started +s": rel(a.started),
            "finished +s": rel(a.finished), "worker": a.host, "pid": a.pid, "state": state,
            "retries": a.retries, "redelivered": a.redelivered}


def timeline(attempts: list[Attempt], title: str = "Who ran what, when", ax=None):
    """One row per process (worker/pid): a thin line while a task waits, a bar while it runs."""
    runs = [a for a in attempts if a.started is not None]
    if not runs:
        raise ValueError("no started task in these records")
    t0 = min(a.sent or a.started for a in runs)
    lanes = sorted({(a.host, a.pid) for a in runs}, key=lambda k: (k[0] or "", k[1] or 0))
    ax = ax or plt.subplots(figsize=(9, 0.55 * len(lanes) + 1.4))[1]
    for a in runs:
        y = lanes.index((a.host, a.pid))
        end = a.finished if a.finished is not None else a.started
        ax.barh(y, max(end - a.started, 0.002), left=a.started - t0, height=0.6,
                color=STATE_COLORS.get(a.state, "tab:blue"), edgecolor="white")
        if a.sent is not None:
            ax.plot([a.sent - t0, a.started - t0], [y + 0.38, y + 0.38], color="0.6", lw=0.8)
    ax.set_yticks(range(len(lanes)), [f"{h} pid {p}" for h, p in lanes])
    ax.set_xlabel("seconds since the first message was sent")
    ax.set_title(title + "  (bar: running, grey line: waiting since sent; green ok, red failed)")
    tidy(ax.figure)
    return ax


def latency_distributions(series: dict[str, list[float]], title: str, unit: str = "s",
                          log: bool = False, ax=None):
    """Dots for every measurement, per series, with p50 and p95 marked."""
    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    for i, values in enumerate(series.values()):
        xs = [i + 0.12 * ((k % 7) - 3) / 3 for k in range(len(values))]
        ax.scatter(xs, values, s=14, alpha=0.6)
        # p50 written below its line and p95 above its own: readable even when the two are equal
        for q, style, dy, va in ((50, "-", -3, "top"), (95, "--", 3, "bottom")):
            v = percentile(values, q)
            ax.plot([i - 0.3, i + 0.3], [v, v], style, color="black", lw=1)
            ax.annotate(f"p{q} {v:.3g} {unit}", (i + 0.32, v), xytext=(0, dy),
                        textcoords="offset points", fontsize=8, va=va)
    ax.set_xticks(range(len(series)), list(series))
    ax.set_xlim(-0.6, len(series) - 0.1)
    ax.margins(y=0.25)  # room for the labels above the top line and below the bottom one
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(unit)
    ax.set_title(title)
    tidy(ax.figure)
    return ax


def bars(values: dict[str, float], title: str, ylabel: str, ax=None):
    """One bar per entry, its value written on it (horizontal when the labels are long)."""
    wide = max(len(k) for k in values) > 14
    ax = ax or plt.subplots(figsize=(6, 0.5 * len(values) + 1.2 if wide else 3))[1]
    if wide:
        ax.barh(list(values), list(values.values()), color="tab:blue")
        ax.invert_yaxis()  # first entry on top, as written
        for i, v in enumerate(values.values()):
            ax.annotate(f" {v:,.0f}" if v >= 100 else f" {v:.3g}", (v, i), ha="left",
                        va="center", fontsize=9)
        ax.set_xlabel(ylabel)
    else:
        ax.bar(list(values), list(values.values()), color="tab:blue")
        for i, v in enumerate(values.values()):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (i, v), ha="center",
                        va="bottom", fontsize=9)
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    tidy(ax.figure)
    return ax


def plain_numbers(axis) -> None:
    """Tick labels as plain numbers (16,600, not 1.66e+04), also on a log scale."""
    from matplotlib.ticker import FuncFormatter
    fmt = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def log_bars(values: dict[str, float], title: str, xlabel: str):
    """``bars`` on a log scale, each bar labelled with its plain value."""
    ax = bars(values, title, xlabel)
    ax.set_xscale("log")
    plain_numbers(ax.xaxis)
    return ax


def timelines(series: dict[str, list[Attempt]], title: str = "", highlight=None):
    """``timeline`` for several runs, one panel each, on a shared time axis (each run's time 0 is
    its own first publish). ``highlight``: ids drawn in orange (e.g. the short tasks)."""
    lanes = [len({(a.host, a.pid) for a in runs if a.started}) for runs in series.values()]
    fig, axes = plt.subplots(len(series), 1, sharex=True,
                             figsize=(9, 0.45 * sum(lanes) + 1.1 * len(series) + 0.6),
                             gridspec_kw={"height_ratios": lanes})
    axes = [axes] if len(series) == 1 else list(axes)
    marked = set(highlight or ())
    for ax, (label, runs) in zip(axes, series.items(), strict=True):
        timeline(runs, title=label, ax=ax)
        ax.set_title("")  # the centred title timeline() wrote; the run's label goes on the left
        ax.set_title(label, fontsize=9, loc="left")
        for patch, a in zip(ax.patches, [a for a in runs if a.started is not None], strict=True):
            if a.id in marked:
                patch.set_color("tab:orange")
        ax.set_xlabel("")
    axes[-1].set_xlabel("seconds since the run's first message was sent")
    fig.suptitle(title + ("  (orange: short tasks, green: long; grey line: waiting)"
                          if marked else ""), fontsize=10)
    tidy(fig)
    return fig


def steps(samples: list[tuple[float, float]], title: str, ylabel: str, ax=None):
    """A step plot of (t, value) samples, e.g. a pool's size over time."""
    ax = ax or plt.subplots(figsize=(8, 2.6))[1]
    ax.step([t for t, _ in samples], [v for _, v in samples], where="post")
    ax.set_xlabel("seconds")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    tidy(ax.figure)
    return ax
