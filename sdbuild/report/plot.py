"""latency.png: median latency bars and latency vs peak memory with its Pareto frontier."""

from __future__ import annotations

import io
import textwrap
from typing import Any

from .. import results
from .analyse import Sweep, pareto_frontier, usable
from .render import fmt_speedup, fmt_seconds, median


def render_plot(sweep: Sweep) -> bytes:
    """latency.png bytes: median latency bars (left) and latency vs peak memory with its Pareto frontier (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in sweep.rows if usable(r)]
    shown = _fastest(rows)
    fig = Figure(figsize=(13, max(3.5, 0.4 * len(shown) + 1.5)), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _plot_bars(left, shown, omitted=sweep.broken_count, total=len(rows))
    _plot_pareto(right, [r for r in rows if r["peak_memory_mb"] is not None])
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


MAX_BARS = 40  # beyond this many rows the bars show the fastest and some baselines: readable, quick to draw


def _fastest(rows: list[dict]) -> list[dict]:
    """The rows the bar chart shows, in report order: all of them, or MAX_BARS of them: baselines
    (a quarter at most) and the fastest of the rest."""
    if len(rows) <= MAX_BARS:
        return rows
    baselines = [r for r in rows if r["is_baseline"]][:MAX_BARS // 4]
    keep = {id(r) for r in baselines}
    keep |= {id(r) for r in sorted((r for r in rows if id(r) not in keep), key=median)[:MAX_BARS - len(keep)]}
    return [r for r in rows if id(r) in keep]


def _plot_bars(ax: Any, rows: list[dict], omitted: int, total: int | None = None) -> None:
    """Horizontal bars of median latency, first row on top, the baseline highlighted."""
    title = "Median latency" + (f" (broken rows omitted: {omitted})" if omitted else "") + ("\n(noisy rows marked)" if any(r["noisy"] for r in rows) else "")
    if total is not None and total > len(rows):
        title += f"\n{len(rows)} of {total} rows: the fastest, and baselines; all in results.csv"
    ax.set_title(title)
    if not rows:
        ax.text(0.5, 0.5, "no completed rows", ha="center", va="center", transform=ax.transAxes)
        return
    medians = [median(r) for r in rows]
    colours = ["tab:orange" if r["is_baseline"] else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), medians, color=colours)
    ax.set_yticks(range(len(rows)), [_wrap(r["label"] + (" (noisy)" if r["noisy"] else "")) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (orange: baseline)")
    ax.margins(x=0.25)  # room for the value labels
    for y, (row, seconds) in enumerate(zip(rows, medians)):
        ax.text(seconds, y, f" {fmt_seconds(seconds)} {fmt_speedup(row)}", va="center", fontsize=7)


def _plot_pareto(ax: Any, rows: list[dict]) -> None:
    """Latency vs peak memory scatter with the Pareto frontier as a labelled step line."""
    shared = any(results.shared_memory(r) for r in rows)
    ax.set_title("Latency vs peak memory" + ("\n(CPU memory in-process: includes earlier jobs)" if shared else ""))
    if not rows:
        ax.text(0.5, 0.5, "no peak memory recorded", ha="center", va="center", transform=ax.transAxes)
        return
    points = [(median(r), r["peak_memory_mb"]) for r in rows]
    ax.scatter([m for _, m in points], [lat for lat, _ in points], color="tab:blue", zorder=2)
    front = pareto_frontier(points)
    xs, ys = [points[i][1] for i in front], [points[i][0] for i in front]
    ax.step(xs, ys, where="post", color="tab:red", label="Pareto frontier (fastest within memory)", zorder=1)
    for i in sorted(front, key=lambda i: points[i][0])[:MAX_BARS]:
        ax.annotate(_wrap(rows[i]["label"]), (points[i][1], points[i][0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.2, y=0.1)  # room for the point labels
    ax.set_xlabel("peak memory (MB)")
    ax.set_ylabel("median latency (s)")
    ax.legend(fontsize=8)


def _wrap(label: str, width: int = 36) -> str:
    """Long labels (many varying overrides) on several lines, so the axes keep their room."""
    return textwrap.fill(label, width, break_long_words=False, break_on_hyphens=False) or label
