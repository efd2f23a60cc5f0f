"""Writers: results.csv, report.md and index.html from an analysed sweep (the plot is in plot.py)."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from .. import results
from ..results import LATENCY_STATS, MEMORY_SCOPES, MemoryScope, MIN_RUNS, NOISY_CV, Status
from ..fidelity import FIDELITY_BOUND_DB
from ..stats import describe, interval_from_dict
from . import parallel
from .analyse import COMPLETED_VALUES, Sweep, fastest, random_weights, usable

CSV_FILE = "results.csv"
REPORT_FILE = "report.md"
PLOT_FILE = "latency.png"
HTML_FILE = "index.html"
DASH = "—"
# Written by the ladder tuner (hydra/sweeper=ladder) beside the rows; the report links them.
LADDER_FILE, LADDER_HTML = "ladder.md", "ladder.html"
NOISY_MARK = " (noisy)"
SHARED_MEMORY_MARK = " (in-process)"


# ---------------------------------------------------------------------------------------------
# Formatting shared by the writers


def fmt_seconds(v: Optional[float]) -> str:
    return DASH if v is None else (f"{v:.2f}" if v >= 10 else f"{v:.4f}")


def fmt_speedup(row: dict) -> str:
    """`x2.00`, marked `(noisy)` when the row's or its baseline's timings are unreliable."""
    v = row["speedup"]
    return DASH if v is None else f"x{v:.2f}" + (NOISY_MARK if row["speedup_noisy"] else "")


def fmt_paired(row: dict) -> str:
    """`x1.23 (1.18–1.29, 12 pairs) on job 0`: the row's paired speed-up on its group's reference."""
    speedup = interval_from_dict(row.get("paired"))
    if speedup is None:
        return DASH
    return f"{describe(speedup)} on job {row['paired'].get('reference_job')}"


def _energy(row: dict) -> Optional[float]:
    return (row.get("energy") or {}).get("joules_per_image")


def _fmt_energy(row: dict) -> str:
    v = _energy(row)
    return DASH if v is None else f"{v:.3g}"


def _fmt_memory(row: dict) -> str:
    v = row["peak_memory_mb"]
    if v is None:
        return DASH
    return f"{v:.0f}" + (SHARED_MEMORY_MARK if results.shared_memory(row) else "")


def _fmt_spread(row: dict) -> str:
    lat = row["latency_s"]
    if not lat:
        return DASH
    cv = "cv ?" if lat.get("cv") is None else f"cv {lat['cv']:.1%}"
    return f"{cv}, {fmt_seconds(lat['min'])}-{fmt_seconds(lat['max'])} over {len(lat['runs'])}"


def _fmt_rate(v: Optional[float]) -> str:
    return DASH if v is None else f"{v:.1f}"


def _fmt_ssim(v: Optional[float]) -> str:
    return DASH if v is None else f"{v:.4f}"


def _fmt_psnr(v: Optional[float]) -> str:
    return DASH if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")


def _fmt_adherence(row: dict) -> str:
    score = (row.get("adherence") or {}).get("score")
    return DASH if score is None else f"{score:.3f} ({row['adherence'].get('images')})"


def adherence_line(sweep: Sweep) -> Optional[str]:
    """What the adherence column means, and why rows without it have none; None when no row has one."""
    scored = [r for r in sweep.readable if (r.get("adherence") or {}).get("score") is not None]
    if not scored:
        return None
    text = ("the share of images the drawn reader (sdbuild/drawn.py) reads as their prompt says (digit, digit colour "
            "and background), over fidelity.prompts x fidelity.seeds; a regression signal for lossy levers on the "
            "drawn models, not a measure of a real model's quality")
    others = sorted({((r["spec"] or {}).get("model") or {}).get("name") or "?" for r in sweep.readable
                     if r["status"] in COMPLETED_VALUES and r not in scored})
    if others:
        text += (f"; {', '.join('model=' + m for m in others)} {'has' if len(others) == 1 else 'have'} none: the "
                 "reader knows only the drawn set's images")
    return text + "."


def lora_swaps(row: dict) -> list:
    """A lora=hotswap row's measured swaps (sdbuild/levers/lora.py: measure_swaps); [] for other rows."""
    lora = row.get("lora")
    swaps = lora.get("swaps") if isinstance(lora, dict) else None
    return [s for s in swaps if isinstance(s, dict)] if isinstance(swaps, list) else []


def _fmt_swaps(row: dict) -> str:
    """`adapter 1: swap 0.0123 s, next call 0.8000 s, 0 new graphs; adapter 2: ...` (`not compiled` where
    nothing was: the row's compile is none)."""
    def one(s: dict) -> str:
        graphs = s.get("recompiles")
        graphs = "not compiled" if graphs is None else f"{graphs} new graph{'' if graphs == 1 else 's'}"
        return (f"adapter {s.get('adapter')}: swap {fmt_seconds(s.get('swap_s'))} s, next call "
                f"{fmt_seconds(s.get('call_s'))} s, {graphs}")

    return "; ".join(one(s) for s in lora_swaps(row)) or DASH


def _lora_mode(row: dict) -> str:
    lora = row.get("lora")
    return str(lora.get("mode")) if isinstance(lora, dict) and lora.get("mode") else "none"


def lora_line(sweep: Sweep) -> Optional[str]:
    """Per-call cost by LoRA mode, and the swap time: one entry per measured row (its median call, and its
    paired speed-up where it was measured interleaved), then each hotswap row's swaps. Shown where the rows
    differ in lora.mode or a row swapped; None otherwise (the table alone says it)."""
    rows = [r for r in sweep.readable if r["status"] in COMPLETED_VALUES and median(r) is not None]
    if len({_lora_mode(r) for r in rows}) < 2 and not any(lora_swaps(r) for r in rows):
        return None

    def cost(r: dict) -> str:
        paired = f", {fmt_paired(r)}" if r.get("paired") else ""
        adapters = (r.get("lora") or {}).get("adapters") if isinstance(r.get("lora"), dict) else None
        live = "" if not isinstance(adapters, list) else (
            f", adapter 0 of {len(adapters)}" if _lora_mode(r) == "hotswap" else f", {len(adapters)} adapter(s)")
        return f"lora={_lora_mode(r)} (job {r['job']}{live}) {fmt_seconds(median(r))} s{paired}"

    text = "per-call cost by mode (median timed call): " + "; ".join(cost(r) for r in rows)
    swapped = [f"job {r['job']}: {_fmt_swaps(r)}" for r in rows if lora_swaps(r)]
    if swapped:
        text += (". Hotswap, after the timed calls (swap = load_lora_weights(hotswap=True), new graphs = "
                 "Dynamo's recompilations): " + "; ".join(swapped))
    if any(_lora_mode(r) == "hotswap" for r in rows) and any(_lora_mode(r) in ("fused", "unfused") for r in rows):
        text += (". fused and unfused run all their adapters at once; hotswap's timed calls run its first adapter "
                 "alone, padded to the largest rank (the others are what it swaps in)")
    return text + "."


def _fmt_int(v: Optional[int]) -> str:
    return DASH if v is None else str(v)


def median(row: dict) -> Optional[float]:
    """Median latency in seconds, None for rows that did not complete."""
    return row["latency_s"]["median"] if row["latency_s"] else None


def _flag(row: dict) -> str:
    """Short status words for the table; the reasons are in the problems and notes sections."""
    words = []
    if row["is_baseline"]:
        words.append("baseline")
    if row["status"] not in COMPLETED_VALUES:
        words.append(row["status"])
    if row["broken"]:
        words.append("BROKEN image")
    if row["noisy"]:
        words.append("noisy")
    if row["note"] and not row["broken"]:
        words.append("no fidelity")
    if row["reused_from"]:
        words.append("reused")
    return ", ".join(words)


@dataclass
class Table:
    """The report table, as plain text cells, rendered by both the Markdown and the HTML writer."""

    headers: list[str]
    numeric: list[bool]  # right-align these columns
    rows: list[tuple[dict, list[str]]]  # (row, cells)


def table_rows(sweep: Sweep) -> list[dict]:
    """Rows shown in the table: every row a job wrote, and every planned job without one."""
    return [r for r in sweep.rows if r["status"] != Status.unreadable.value]


def build_table(sweep: Sweep) -> Table:
    """One line per row: job, varying overrides/choices (and preset), measurements and flag."""
    keys = ["job", *sweep.varying] + (["preset"] if sweep.has_preset else [])
    measures = [
        ("latency median (s)", lambda r: fmt_seconds(median(r))),
        ("spread", _fmt_spread),
        ("steps/s", lambda r: _fmt_rate(r["steps_per_s"])),
        ("speed-up", fmt_speedup),
        ("peak memory (MB)", _fmt_memory),
        ("warmup (s)", lambda r: fmt_seconds(r["warmup_s"])),
        ("PSNR vs baseline (dB)", lambda r: _fmt_psnr(r["psnr_db"])),
        ("SSIM", lambda r: _fmt_ssim(r["ssim"])),
        ("max abs diff (0-255)", lambda r: _fmt_int(r["max_abs_diff"])),
    ]
    if any(r.get("paired") for r in sweep.readable):  # rows measured interleaved: their paired speed-ups
        measures.insert(4, ("paired speed-up (95% interval)", fmt_paired))
    if any(_energy(r) is not None for r in sweep.readable):
        measures.append(("energy (J/image)", _fmt_energy))
    if adherence_line(sweep):  # drawn models: the reader's score (images scored)
        measures.append(("adherence (images)", _fmt_adherence))
    if parallel.has_parallel(sweep.readable):  # rows run as several ranks: against the same spec at degree 1
        measures += [("parallel speed-up vs degree 1", parallel.fmt_speedup),
                     ("parallel efficiency", parallel.fmt_efficiency),
                     ("fidelity to degree 1", parallel.fmt_fidelity)]
    if any(lora_swaps(r) for r in sweep.readable):  # lora=hotswap: each swap, the call after it, new graphs
        measures.append(("LoRA swaps", _fmt_swaps))

    def text(row: dict, key: str) -> str:
        value = row["job"] if key == "job" else row["preset"] if key == "preset" else results.label_values(row).get(key)
        return DASH if value is None else str(value)

    lines = [(r, [text(r, k) for k in keys] + [fmt(r) for _, fmt in measures] + [_flag(r)]) for r in table_rows(sweep)]
    headers = keys + [name for name, _ in measures] + ["flag"]
    numeric = [False] * len(keys) + [True] * len(measures) + [False]
    return Table(headers, numeric, lines)


def machine_lines(sweep: Sweep) -> list[tuple[str, str]]:
    """(title, text) pairs: machine and versions from the first readable row, a warning if rows ran elsewhere."""
    envs = [r["env"] for r in sweep.readable if r["env"]]
    if not envs:
        return [("Machine", "unknown (no env recorded)")]
    env = envs[0]
    versions = ", ".join(
        f"{name} {env.get(key) if env.get(key) is not None else 'none'}"
        for name, key in (("torch", "torch"), ("diffusers", "diffusers"), ("Python", "python"), ("CUDA", "cuda"))
    )
    lines = [("Machine", env.get("device_name") or "unknown"), ("Versions", versions)]
    machines = {(e.get("device_name"), e.get("torch"), e.get("diffusers")) for e in envs}
    if len(machines) > 1:
        lines.append(("Warning", f"rows ran on {len(machines)} different machine/version combinations"))
    reasons = {(r.get("energy") or {}).get("reason") for r in sweep.readable if r.get("energy")}
    if reasons and not any(_energy(r) is not None for r in sweep.readable):
        lines.append(("Energy", "not measured: " + "; ".join(sorted(x for x in reasons if x))))
    busy = sum(results.is_busy_row(r) for r in sweep.readable)
    if busy:
        lines.append(("Warning", f"{busy} row(s) measured on a busy machine (other processes running): "
                                 "their timings are not those of a quiet machine"))
    if (advice := results.threads_advice(sweep.readable)):
        lines.append(("Threads", advice))
    return lines


def summary_line(sweep: Sweep) -> str:
    """``N rows: k ok (b broken), f failed/unsupported, u unreadable, m missing; n noisy``."""
    broken = f" ({sweep.broken_count} broken)" if sweep.broken_count else ""
    planned = f" of {sweep.planned} planned" if sweep.planned is not None else ""
    noisy = f"; {sweep.noisy_count} noisy" if sweep.noisy_count else ""
    if sweep.plan_error:
        planned = f" (unplanned: {results.PLAN_FILE} is unreadable)"
    return (
        f"{len(sweep.rows)} rows: {sweep.count(*COMPLETED_VALUES)} ok{broken}, "
        f"{sweep.count(Status.failed.value, Status.unsupported.value)} failed/unsupported, "
        f"{sweep.count(Status.unreadable.value)} unreadable, {sweep.count(Status.missing.value)} missing{planned}{noisy}"
    )


def _row_said(row: dict) -> str:
    speedup = f", {fmt_speedup(row)} over the baseline" if row["speedup"] is not None else ""
    return f"{row['label']} (job {row['job']}), median {fmt_seconds(median(row))} s{speedup}"


def fastest_line(sweep: Sweep) -> str:
    """The report's first line: the fastest `ok` row, and the fastest within the fidelity bound, per
    comparison group (rows of different workloads are never compared)."""
    bound = f"within the fidelity bound (PSNR >= {FIDELITY_BOUND_DB:g} dB against the baseline's image)"
    parts = []
    for group in sweep.groups:
        top, faithful = fastest(group)
        where = f"{group.description}: " if len(sweep.groups) > 1 else ""
        if top is None:
            parts.append(f"{where}no ok row with a valid image")
        elif faithful is top:
            parts.append(f"{where}{_row_said(top)}, also the fastest {bound}")
        elif faithful is None:
            parts.append(f"{where}{_row_said(top)}; no row is {bound}")
        else:
            parts.append(f"{where}{_row_said(top)}; fastest {bound}: {_row_said(faithful)}")
    return ". ".join(parts) + "." if parts else "no rows to compare."


RANDOM_WEIGHTS = ("so images are noise by design: compare them pixel to pixel, not by eye (the PSNR, SSIM "
                  "and max abs diff columns compare each image with the baseline's)")


def random_weights_banner(sweep: Sweep) -> Optional[str]:
    """A warning when rows ran a model with random weights (tiny, *_arch), else None."""
    models = sorted({((r["spec"] or {}).get("model") or {}).get("name") or r["choices"].get("model") or "?"
                     for r in sweep.readable if random_weights(r)})
    if not models:
        return None
    names = ", ".join(f"model={m}" for m in models)
    return f"{names} {'has' if len(models) == 1 else 'have'} random weights, {RANDOM_WEIGHTS}."


def problem_lines(sweep: Sweep) -> list[str]:
    """One line per failed / unsupported / unreadable / missing / broken row, with its reason."""
    lines = []
    for row in sweep.rows:
        if row["status"] == Status.unreadable.value:
            lines.append(f"unreadable: {row['path']}: {row['error']}")
        elif row["status"] == Status.missing.value:
            lines.append(f"missing: job {row['job']} ({' '.join(row['overrides']) or 'no overrides'}): {row['error']}")
        elif row["status"] not in COMPLETED_VALUES:
            lines.append(f"{row['status']}: {row['label']} (job {row['job']}): {row['error'] or 'no reason given'}")
        elif row["broken"]:
            lines.append(f"broken: {row['label']} (job {row['job']}): {row['broken']}; no speed-up reported")
    if sweep.plan_error:
        lines.append(f"unplanned: {results.PLAN_FILE} cannot be read ({sweep.plan_error}), so every row in the folder is "
                     "listed, whichever sweep wrote it, and jobs that left no row cannot be named")
    if sweep.ignored:
        lines.append(f"ignored: rows in job folder(s) {', '.join(sorted(sweep.ignored, key=int))} are not part of "
                     "this sweep's plan (left by an earlier sweep in this folder)")
    return lines


def note_lines(sweep: Sweep) -> list[str]:
    """Noisy rows, CPU memory measured in a shared process, rows not compared with their baseline's image."""
    lines = [f"{r['label']} (job {r['job']}): noisy: {'; '.join(r['noisy'])}" for r in sweep.rows if r["noisy"]]
    if any(results.shared_memory(r) for r in sweep.readable):
        lines.append(f"peak memory marked{SHARED_MEMORY_MARK}: {MEMORY_SCOPES[MemoryScope.shared_process]}")
    lines += [f"{r['label']} (job {r['job']}): {r['note']}" for r in sweep.rows if r["note"] and not r["broken"]]
    return lines


METHOD = (
    "Speed-up = baseline median latency / row median latency (ok rows with a valid image, compared only with "
    "a baseline of the same model and run settings). Spread = coefficient of variation (stdev / mean) and "
    f"min-max of the timed runs. A row is noisy with fewer than {MIN_RUNS} timed runs, a cv above "
    f"{NOISY_CV:.0%}, or when measured on a busy machine; speed-ups involving a noisy row are marked "
    f"'{NOISY_MARK.strip()}'. PSNR and max abs diff compare each row's image with the baseline's (uint8 pixels, "
    "255 peak; inf = identical). Rows measured interleaved (hydra.sweeper.interleave=true, or the ladder's) also "
    "have a paired speed-up: the median of call-by-call ratios against their group's reference, with its exact "
    "95% interval; only that figure is comparable across a busy machine. Energy (J/image) where the machine has "
    "a counter (NVML on GPU, RAPL on CPU), over the timed calls."
)


# ---------------------------------------------------------------------------------------------
# CSV


def _csv_value(value: Any) -> str:
    """CSV cell: empty for None, ``inf`` for infinity, JSON for lists, repr-precision floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _extra_keys(sweep: Sweep) -> list[str]:
    """Varying overrides that are not config groups (model.path, run.steps, ...): columns of their own."""
    return [k for k in sweep.varying if k not in sweep.choice_columns and k != "preset"]


def csv_columns(sweep: Sweep) -> list[str]:
    """Choice groups, varying plain fields, preset, then the fixed measurement columns."""
    return [
        *sweep.choice_columns, *_extra_keys(sweep), "preset", "status", "error",
        *(f"latency_{s}_s" if s != "cv" else "latency_cv" for s in LATENCY_STATS),
        "runs", "noisy", "machine_busy", "warmup_s", "build_s", "load_s", "peak_memory_mb", "peak_memory_scope",
        "steps_per_s", "speedup", "speedup_noisy", "psnr_db", "ssim", "max_abs_diff", "broken", "image", "job", "spec_key", "baseline",
        "note", "reused_from", "overrides", "measure_mode", "measure_calls", "paired_speedup", "paired_low",
        "paired_high", "paired_n", "paired_reference_job", "energy_j_per_image", "energy_source", "adherence",
        "adherence_images", "lora_swaps",
    ] + (list(parallel.CSV_COLUMNS) if parallel.has_parallel(sweep.readable) else [])


def _csv_record(row: dict, sweep: Sweep) -> dict:
    """One CSV line as a column -> cell dict."""
    latency = row["latency_s"] or {}
    values = results.label_values(row)
    record: dict[str, Any] = {g: row["choices"].get(g) for g in sweep.choice_columns}
    record.update({k: values.get(k) for k in _extra_keys(sweep)})
    record.update({(f"latency_{s}_s" if s != "cv" else "latency_cv"): latency.get(s) for s in LATENCY_STATS})
    for key in ("preset", "status", "error", "warmup_s", "build_s", "load_s", "peak_memory_mb", "peak_memory_scope",
                "steps_per_s", "speedup", "psnr_db", "ssim", "max_abs_diff", "broken", "image", "job", "spec_key", "note", "reused_from",
                "overrides"):
        record[key] = row[key]
    record["runs"] = latency.get("runs")
    record["noisy"] = "; ".join(row["noisy"]) or None
    record["machine_busy"] = (row.get("machine_load") or {}).get("busy")
    record["speedup_noisy"] = "yes" if row["speedup_noisy"] else None
    record["baseline"] = "yes" if row["is_baseline"] else None
    measurement, paired, energy = row.get("measurement") or {}, row.get("paired") or {}, row.get("energy") or {}
    record.update(measure_mode=measurement.get("mode"), measure_calls=measurement.get("calls"),
                  paired_speedup=paired.get("median"), paired_low=paired.get("low"), paired_high=paired.get("high"),
                  paired_n=paired.get("n"), paired_reference_job=paired.get("reference_job"),
                  energy_j_per_image=energy.get("joules_per_image"),
                  energy_source=energy.get("source") or (f"none: {energy['reason']}" if energy.get("reason") else None),
                  adherence=(row.get("adherence") or {}).get("score"),
                  adherence_images=(row.get("adherence") or {}).get("images"),
                  lora_swaps=lora_swaps(row) or None)
    if parallel.has_parallel(sweep.readable):
        record.update(parallel.csv_record(row))
    return {k: _csv_value(v) for k, v in record.items()}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that would start a formula (`=HYPERLINK(...)`,
    `+cmd|...`, `@SUM`, a prompt from someone else) gets the usual leading `'`; numbers, and text that
    is a number (`-1`), are left as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def write_csv(sweep: Sweep) -> Path:
    """results.csv: one line per job, every row including unreadable and missing ones; every text cell
    `spreadsheet_safe`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_columns(sweep), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in _csv_record(row, sweep).items()} for row in sweep.rows)
    path = sweep.path / CSV_FILE
    results.write_atomic(path, out.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# Markdown


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or list item: one line, `&` and `<` escaped (a prompt's
    `<img onerror=...>` is shown, never rendered: no tag can open without `<`; `>=` stays readable),
    pipes and square brackets escaped (a prompt's `![x](http://...)` is shown as text: no remote image
    is fetched when the report is viewed, and no link is made)."""
    return (" ".join(str(text).split()).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")
            .replace("[", "\\[").replace("]", "\\]"))


def _settings_lines(sweep: Sweep) -> list[str]:
    """Run settings and baseline choice, one pair per comparison group."""
    if len(sweep.groups) == 1:
        group = sweep.groups[0]
        return [f"**Run:** {_md(group.description)}", "", f"**Baseline:** {_md(group.reason)}"]
    lines = [f"**{len(sweep.groups)} comparison groups** (each compared with its own baseline):", ""]
    for group in sweep.groups:
        lines.append(f"- {_md(group.description)}. **Baseline:** {_md(group.reason)}")
    return lines


def render_markdown(sweep: Sweep, table: Table) -> str:
    """The whole report.md text."""
    lines = [f"# Sweep report: {_md(sweep.path.name)}", "", f"**Fastest:** {_md(fastest_line(sweep))}", ""]
    if banner := random_weights_banner(sweep):
        lines += [f"> **Random weights:** {_md(banner)}", ""]
    if adherence := adherence_line(sweep):
        lines += [f"**Adherence:** {_md(adherence)}", ""]
    if lora := lora_line(sweep):
        lines += [f"**LoRA:** {_md(lora)}", ""]
    lines += [f"**{_md(title)}:** {_md(text)}  " for title, text in machine_lines(sweep)]
    lines += ["", f"**Rows:** {summary_line(sweep)}", ""]
    if (sweep.path / LADDER_FILE).exists():  # a hydra/sweeper=ladder run: its ladder leads the page
        lines += [f"**Ladder:** this sweep was walked by the ladder tuner: the kept steps, what each bought and "
                  f"every option tried are in [{LADDER_FILE}]({LADDER_FILE}) ([html]({LADDER_HTML})).", ""]
    lines += _settings_lines(sweep) if sweep.groups else ["No completed or failed rows to compare."]
    lines += ["", METHOD, ""] + ([parallel.METHOD, ""] if parallel.has_parallel(sweep.readable) else [])
    if table.rows:
        lines.append("| " + " | ".join(_md(h) for h in table.headers) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in table.numeric) + "|")
        lines += ["| " + " | ".join(_md(c) for c in cells) + " |" for _, cells in table.rows]
        lines.append("")
    lines += [f"![latency]({PLOT_FILE})", "", "## Failed, unsupported, unreadable, missing and broken rows", ""]
    lines += [f"- {_md(line)}" for line in problem_lines(sweep)] or ["None."]
    notes = note_lines(sweep)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {_md(line)}" for line in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline { background: #eaf3ff; }
tr.problem { background: #fff0f0; }
tr.noisy { background: #fffbe6; }
td.image img { max-width: 256px; min-width: 96px; image-rendering: pixelated; display: block; }
img.plot { max-width: 100%; }
div.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 8px 12px; margin: 1em 0; }
"""
NUM_TD = '<td class="num">'


def _image_cell(row: dict) -> str:
    """An <img> linking ``<job>/<image>`` relatively, or a dash."""
    if not row["image"]:
        return DASH
    src = html.escape(quote(f"{row['job']}/{row['image']}"), quote=True)
    return f'<a href="{src}"><img src="{src}" alt="{html.escape(row["label"], quote=True)}" loading="lazy"></a>'


def _row_class(row: dict) -> str:
    if row["is_baseline"]:
        return "baseline"
    if not usable(row):
        return "problem"
    return "noisy" if row["noisy"] else ""


def render_html(sweep: Sweep, table: Table) -> str:
    """The whole index.html text: header lines, the table with images, problems and notes."""
    esc = html.escape
    title = f"Sweep report: {sweep.path.name}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{HTML_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p id="fastest"><strong>Fastest:</strong> {esc(fastest_line(sweep))}</p>',
    ]
    if banner := random_weights_banner(sweep):
        parts.append(f'<div id="random-weights" class="banner" role="note"><strong>Random weights:</strong> '
                     f"{esc(banner)}</div>")
    if adherence := adherence_line(sweep):
        parts.append(f'<p id="adherence"><strong>Adherence:</strong> {esc(adherence)}</p>')
    if lora := lora_line(sweep):
        parts.append(f'<p id="lora"><strong>LoRA:</strong> {esc(lora)}</p>')
    parts += [f"<p><strong>{esc(name)}:</strong> {esc(text)}</p>" for name, text in machine_lines(sweep)]
    parts.append(f"<p>Rows: {esc(summary_line(sweep))}</p>")
    if (sweep.path / LADDER_FILE).exists():
        parts.append(f'<p><strong>Ladder:</strong> walked by the ladder tuner: <a href="{LADDER_HTML}">the ladder</a> '
                     f'(kept steps, what each bought, every option tried).</p>')
    parts += [f"<p>Run: {esc(g.description)}<br><strong>Baseline:</strong> {esc(g.reason)}</p>" for g in sweep.groups]
    parts.append(f"<p>{esc(METHOD)}</p>")
    if parallel.has_parallel(sweep.readable):
        parts.append(f'<p id="parallel">{esc(parallel.METHOD)}</p>')
    if table.rows:
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "<th>image</th></tr>")
        for row, cells in table.rows:
            css = _row_class(row)
            tds = "".join((NUM_TD if n else "<td>") + f"{esc(c)}</td>" for c, n in zip(cells, table.numeric))
            tr = f'<tr class="{css}">' if css else "<tr>"
            parts.append(f'{tr}{tds}<td class="image">{_image_cell(row)}</td></tr>')
        parts.append("</table>")
    parts.append(f'<p><img class="plot" src="{PLOT_FILE}" alt="latency plot"></p>')
    parts.append("<h2>Failed, unsupported, unreadable, missing and broken rows</h2>")
    problems = problem_lines(sweep)
    parts.append("<ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>" if problems else "<p>None.</p>")
    notes = note_lines(sweep)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
