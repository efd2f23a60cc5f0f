"""Several sweeps side by side: `python -m sdbuild.report A B ...`.

Rows are matched by their resolved spec (`spec_key`, the identity `resume=` uses), so the same
configuration measured on two machines, two versions or two days lines up on one line, whatever
its job number or label. Each sweep gets its median (noisy rows marked) and the ratio to the first.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from .. import results
from .analyse import Sweep, analyse
from .render import NOISY_MARK, fmt_seconds, machine_lines, median, spreadsheet_safe

COMPARISON_FILE = "comparison.csv"


def compare(sweep_dirs: Sequence[str | Path]) -> tuple[list[Sweep], list[dict]]:
    """Analyse each sweep; one line per spec seen in any of them: {"label", "spec_key", "cells": [row|None, ...]}."""
    sweeps = [analyse(d) for d in sweep_dirs]
    lines: dict[str, dict] = {}
    for i, sweep in enumerate(sweeps):
        for row in sweep.readable:
            if not row["spec_key"]:
                continue
            line = lines.setdefault(row["spec_key"], {"label": row["label"], "spec_key": row["spec_key"],
                                                      "cells": [None] * len(sweeps)})
            line["cells"][i] = line["cells"][i] or row  # the first row of a spec in a sweep
    return sweeps, list(lines.values())


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row["status"] != results.Status.ok.value or row["broken"]:
        return row["status"] if not row["broken"] else "broken"
    return fmt_seconds(median(row)) + (NOISY_MARK if row["noisy"] else "")


def _ratio(row: dict | None, first: dict | None) -> str:
    if not (row and first and median(row) and median(first)) or row["broken"] or first["broken"]:
        return "—"
    return f"x{median(first) / median(row):.2f}"


def render(sweeps: list[Sweep], lines: list[dict]) -> str:
    """Markdown: one line per sweep naming its machine, then the side-by-side table."""
    out = ["# Sweeps side by side", ""]
    for i, sweep in enumerate(sweeps):
        machine = dict(machine_lines(sweep)).get("Machine", "unknown")
        out.append(f"- **S{i + 1}** {sweep.path}: {machine}; {len(sweep.readable)} rows")
    headers = ["configuration"] + [f"S{i + 1} median (s)" for i in range(len(sweeps))]
    headers += [f"S1/S{i + 1}" for i in range(1, len(sweeps))]
    out += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for line in lines:
        cells = [line["label"].replace("|", "\\|")] + [_cell(c) for c in line["cells"]]
        cells += [_ratio(c, line["cells"][0]) for c in line["cells"][1:]]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Rows are matched by resolved spec (spec_key). S1/Sk > 1: faster in Sk than in S1."]
    return "\n".join(out) + "\n"


def write_csv(sweeps: list[Sweep], lines: list[dict], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["configuration", "spec_key"] + [f"{s.path}:median_s" for s in sweeps])
    for line in lines:
        writer.writerow([spreadsheet_safe(line["label"]), line["spec_key"]]
                        + [median(c) if c and not c["broken"] else "" for c in line["cells"]])
    results.write_atomic(path, buf.getvalue())
    return path
