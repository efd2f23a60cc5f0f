"""Turn a sweep folder into results.csv, report.md, latency.png and index.html.

Every job of a Hydra sweep leaves ``<job>/result.json`` (the row, owned by :mod:`sdbuild.results`)
plus, usually, the image it made. The report is four steps, one module each:

- :mod:`.load`: read every row through sdbuild.results (a row that fails validation is
  ``unreadable``), and list the planned jobs (``plan.json``) that left no row as ``missing``;
- :mod:`.analyse`: group rows of the same model and workload, find each group's baseline from the
  typed spec, compute speed-ups (medians) and image fidelity, flag broken and noisy rows;
- :mod:`.render`: results.csv, report.md and index.html;
- :mod:`.plot`: latency.png;
- :mod:`.compare`: several sweeps side by side (``python -m sdbuild.report A B ...``).

It imports neither torch, diffusers nor hydra (matplotlib only when plotting), so a sweep can be
reported anywhere, e.g. on a laptop after copying the folder back::

    python -m sdbuild.report outputs/multirun/2025-01-01_12-00-00
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import results
from .analyse import Group, Sweep, analyse, is_reference, pareto_frontier
from .load import find_result_files, load, load_rows
from .plot import render_plot
from .render import (CSV_FILE, HTML_FILE, PLOT_FILE, REPORT_FILE, build_table, render_html, render_markdown,
                     summary_line, write_csv)

__all__ = ["CSV_FILE", "HTML_FILE", "PLOT_FILE", "REPORT_FILE", "Group", "Sweep", "aggregate", "aggregate_sweep", "analyse", "find_result_files",
           "is_reference", "load", "load_rows", "main", "pareto_frontier", "summary_line", "write_outputs"]


def write_outputs(sweep: Sweep) -> dict[str, Path]:
    """Write the four report files atomically; returns them by name."""
    table = build_table(sweep)
    paths = {"csv": write_csv(sweep)}
    for name, filename, data in (
        ("plot", PLOT_FILE, render_plot(sweep)),
        ("report", REPORT_FILE, render_markdown(sweep, table)),
        ("html", HTML_FILE, render_html(sweep, table)),
    ):
        paths[name] = sweep.path / filename
        results.write_atomic(paths[name], data)
    return paths


def aggregate_sweep(sweep_dir: str | Path, unwritten: Optional[dict[int, dict]] = None) -> tuple[Sweep, dict[str, Path]]:
    """Analyse a sweep folder and write its report; the analysed sweep and the files written.
    `unwritten`: rows, by job number, that their folders could not take (held in memory)."""
    sweep = analyse(sweep_dir, unwritten=unwritten)
    return sweep, write_outputs(sweep)


def aggregate(sweep_dir: str | Path) -> Path:
    """Read a sweep folder and write results.csv, report.md, latency.png and index.html into it.

    Never raises because of a bad row (those are reported); raises FileNotFoundError when the
    folder does not exist. Returns the path of report.md.
    """
    return aggregate_sweep(sweep_dir)[1]["report"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sdbuild.report SWEEP_DIR``: write the report, print a summary; 2 when there is nothing to report."""
    parser = argparse.ArgumentParser(prog="python -m sdbuild.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="+", help="folder holding <job>/result.json files; several: compare them "
                        "side by side (matched by resolved spec)")
    parser.add_argument("--out", help="with several sweeps: also write the comparison as CSV to this file")
    args = parser.parse_args(argv)
    for folder in args.sweep_dir:
        if not Path(folder).is_dir():
            print(f"sdbuild.report: no such folder: {folder}", file=sys.stderr)
            return 2
    if len(args.sweep_dir) > 1:
        from .compare import compare, render, write_csv as write_comparison

        sweeps, lines = compare(args.sweep_dir)
        print(render(sweeps, lines), end="")
        if args.out:
            print(f"csv: {write_comparison(sweeps, lines, Path(args.out))}")
        return 0
    root = Path(args.sweep_dir[0])
    if not root.is_dir():
        print(f"sdbuild.report: no such folder: {root}", file=sys.stderr)
        return 2
    if not find_result_files(root) and not (root / results.PLAN_FILE).exists():
        print(f"sdbuild.report: no {results.RESULT_FILE} found under {root}", file=sys.stderr)
        return 2
    sweep, paths = aggregate_sweep(root)
    print(summary_line(sweep))
    print(f"report: {paths['report']}")
    print(f"html:   {paths['html']}")
    return 0
