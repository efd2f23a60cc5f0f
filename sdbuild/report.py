"""Turn a sweep folder into results.csv, report.md, latency.png and index.html.

Every job of a Hydra sweep leaves ``<job>/result.json`` (plus, usually, the image it made).
This module reads them all, picks one baseline per group of comparable rows, computes the
speed-up and the image fidelity (PSNR, max pixel difference) of every row against it, flags
rows whose image is broken so a fast-but-wrong row is never shown as a speed-up, and writes
the four report files into the sweep folder.

It imports neither torch, diffusers nor hydra (matplotlib only when plotting), so a sweep can
be reported anywhere, e.g. on a laptop after copying the folder back::

    python -m sdbuild.report outputs/multirun/2025-01-01_12-00-00

Public API: :func:`aggregate` (write everything), :func:`load_rows` (read and order the
rows), :func:`analyse` (baseline, speed-up, fidelity, broken flags), :func:`fidelity` and
:func:`pareto_frontier`.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import sys
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence
from urllib.parse import quote

import numpy as np

RESULT_FILE = "result.json"
CSV_FILE = "results.csv"
REPORT_FILE = "report.md"
PLOT_FILE = "latency.png"
HTML_FILE = "index.html"

# "broken": measured, but the runner found the image unusable (sdbuild.job.broken_image).
STATUSES = ("ok", "broken", "failed", "unsupported")
COMPLETED = ("ok", "broken")  # rows that were measured and have a latency
UNREADABLE = "unreadable"

# The unoptimised reference configuration: the first row of the seed table.
BASELINE_CHOICES = {"precision": "fp32", "memory_format": "contiguous", "attention": "classic", "compile": "none"}
# Groups that must be "none" (or absent) in the baseline as well.
NEUTRAL_CHOICES = ("memory", "quant")
BASELINE_NAME = "fp32/contiguous/classic/none"

# What must be equal for two rows to be compared: same model, scheduler and workload.
GROUP_CHOICES = ("model", "scheduler")
GROUP_RUN_KEYS = ("prompt", "seed", "steps", "height", "width", "batch_size", "guidance_scale")

LATENCY_STATS = ("median", "mean", "min", "max", "p90")
DASH = "—"


# ---------------------------------------------------------------------------------------------
# Reading


def find_result_files(sweep_dir: Path) -> list[Path]:
    """``result.json`` files one or two folders below the sweep folder (unordered), ``.hydra`` skipped."""
    found = set(sweep_dir.glob(f"*/{RESULT_FILE}")) | set(sweep_dir.glob(f"*/*/{RESULT_FILE}"))
    return [p for p in found if ".hydra" not in p.relative_to(sweep_dir).parts]


def load_rows(sweep_dir: str | Path) -> list[dict]:
    """Read every job's result.json into a normalised row dict, in report order.

    A file that cannot be parsed or misses required keys becomes a row with status
    ``"unreadable"``, its ``error`` saying why and ``path`` saying where; it never raises for a
    bad row. Rows are ordered by ``preset_order`` when set, then by job number.

    Each row has the result.json keys used here (``status``, ``error``, ``choices``, ``preset``,
    ``preset_order``, ``overrides``, ``spec_key``, ``spec``, ``latency_s``, ``warmup_s``,
    ``build_s``, ``load_s``, ``peak_memory_mb``, ``image``, ``image_stats``, ``env``,
    ``reused_from``; absent ones None or empty) plus ``job`` (subfolder) and ``path``.
    """
    root = _existing_dir(sweep_dir)
    rows = [_read_row(root, path) for path in find_result_files(root)]
    return sorted(rows, key=_row_order)


def _existing_dir(sweep_dir: str | Path) -> Path:
    """The sweep folder as a Path; a clear FileNotFoundError when it is not a folder."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    return root


def _read_row(root: Path, path: Path) -> dict:
    """One row from one result.json; an ``unreadable`` row when parsing or validation fails."""
    try:
        row = _normalise(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        row = _normalise({"status": "failed", "choices": {}})  # every field at its empty value
        row.update(status=UNREADABLE, error=f"{type(exc).__name__}: {exc}")
    row.update(job=path.parent.relative_to(root).as_posix(), path=str(path))
    return row


def _normalise(data: Any) -> dict:
    """Validate a parsed result.json and return the row fields this module uses.

    Required: ``status`` (one of STATUSES), ``choices`` (an object) and, for a completed
    row, ``latency_s.median``. Other keys may be missing (None), but a key that is present must
    have the right type: a half-written file should be reported, not half-believed.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    missing = [key for key in ("status", "choices") if key not in data]
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)}")
    status = data["status"]
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    choices = _typed(data, "choices", dict) or {}
    spec = _typed(data, "spec", dict) or {}
    for section in ("run", "model"):
        _typed(spec, section, dict)
    return {
        "status": status,
        "error": _typed(data, "error", str),
        "choices": {str(k): (None if v is None else str(v)) for k, v in choices.items()},
        "preset": _typed(data, "preset", str),
        "preset_order": _typed(data, "preset_order", int),
        "overrides": _typed(data, "overrides", list) or [],
        "spec_key": _typed(data, "spec_key", str),
        "spec": spec,
        "latency_s": _latency(data.get("latency_s"), required=status in COMPLETED),
        "warmup_s": _number(data, "warmup_s"),
        "build_s": _number(data, "build_s"),
        "load_s": _number(data, "load_s"),
        "peak_memory_mb": _number(data, "peak_memory_mb"),
        "image": _typed(data, "image", str),
        "image_stats": _typed(data, "image_stats", dict) or {},
        "env": _typed(data, "env", dict) or {},
        "reused_from": _typed(data, "reused_from", str),
    }


def _typed(data: dict, key: str, kind: type) -> Any:
    """``data[key]`` when absent/None or of type ``kind``; ValueError otherwise."""
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise ValueError(f"{key} should be {kind.__name__}, got {type(value).__name__}")
    return value


def _number(data: dict, key: str) -> Optional[float]:
    """``data[key]`` as a finite float (None when absent); ValueError for anything else."""
    return _finite(data.get(key), key)


def _finite(value: Any, key: str) -> Optional[float]:
    """``value`` as a finite float (None stays None); ValueError naming ``key`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} should be a finite number, got {value!r}")
    return float(value)


def _latency(value: Any, required: bool) -> Optional[dict]:
    """The ``latency_s`` object with float stats and a float ``runs`` list; median required for completed rows."""
    if value is None:
        if required:
            raise ValueError("missing keys: latency_s")
        return None
    if not isinstance(value, dict):
        raise ValueError(f"latency_s should be dict, got {type(value).__name__}")
    stats = {name: _number(value, name) for name in LATENCY_STATS}
    if required and stats["median"] is None:
        raise ValueError("missing keys: latency_s.median")
    runs = value.get("runs") or []
    if not isinstance(runs, list):
        raise ValueError("latency_s.runs should be a list")
    stats["runs"] = [_finite(r, "latency_s.runs[]") for r in runs]
    return stats


def _job_key(job: str) -> tuple:
    """Sort key for a job folder: numeric parts by number ("2" before "10"), then by name."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in job.split("/"))


def _row_order(row: dict) -> tuple:
    """Rows with a ``preset_order`` first, by it; then everything by job number."""
    order = row.get("preset_order")
    return (order is None, order or 0, _job_key(row["job"]))


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclass
class Group:
    """Rows that can be compared with each other, and the baseline they are compared against."""

    description: str
    rows: list[dict]
    baseline: Optional[dict] = None
    reason: str = ""  # why this row is the baseline (or why there is none)


@dataclass
class Sweep:
    """Everything the writers need: rows in report order plus what was derived from them."""

    path: Path
    rows: list[dict]
    groups: list[Group] = field(default_factory=list)
    choice_columns: list[str] = field(default_factory=list)  # every choice group seen
    varying: list[str] = field(default_factory=list)  # choice groups whose value differs

    @property
    def readable(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != UNREADABLE]

    @property
    def has_preset(self) -> bool:
        return any(r["preset"] for r in self.readable)

    def count(self, *statuses: str) -> int:
        return sum(r["status"] in statuses for r in self.rows)

    @property
    def broken_count(self) -> int:
        return sum(bool(r["broken"]) for r in self.rows)


def analyse(sweep_dir: str | Path, rows: Optional[list[dict]] = None) -> Sweep:
    """Pick baselines and annotate every row in place.

    Adds to each row: ``label``, ``is_baseline``, ``baseline_job``, ``speedup``, ``psnr_db``,
    ``max_abs_diff``, ``broken`` (reason or None) and ``note`` (e.g. why there is no fidelity).
    """
    root = _existing_dir(sweep_dir)
    rows = load_rows(root) if rows is None else rows
    sweep = Sweep(root, rows)
    sweep.choice_columns = _union_in_order(r["choices"] for r in sweep.readable)
    sweep.varying = [g for g in sweep.choice_columns if len({r["choices"].get(g) for r in sweep.readable}) > 1]
    for row in rows:
        row.update(is_baseline=False, baseline_job=None, speedup=None, psnr_db=None, max_abs_diff=None, note=None)
        row["broken"] = _broken_reason(row, root)
    _set_labels(rows, sweep.varying)
    sweep.groups = _group(sweep.readable)
    for group in sweep.groups:
        _choose_baseline(group)
        _compare(group, root)
    return sweep


def _union_in_order(dicts: Iterable[dict]) -> list[str]:
    """Keys of all dicts, in the order they are first seen (result.json keeps the builder's order)."""
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    return list(keys)


def _set_labels(rows: list[dict], varying: Sequence[str]) -> None:
    """A short name per row: its preset, else its varying choices, else its job."""
    for row in rows:
        parts = [f"{g}={row['choices'].get(g, DASH)}" for g in varying] if row["status"] != UNREADABLE else []
        row["label"] = row["preset"] or ", ".join(parts) or f"job {row['job']}"


def _run_settings(row: dict) -> dict:
    """The workload of a row: model, scheduler and spec.run fields, with the image size resolved."""
    run = row["spec"].get("run") or {}
    settings = {g: row["choices"].get(g) for g in GROUP_CHOICES}
    settings.update({k: run.get(k) for k in GROUP_RUN_KEYS})
    resolution = (row["spec"].get("model") or {}).get("resolution")
    settings["height"] = settings["height"] or resolution
    settings["width"] = settings["width"] or resolution
    return settings


def _describe(settings: dict) -> str:
    """A one-line human description of a workload."""
    size = f"{settings['height'] or '?'}x{settings['width'] or '?'}"
    parts = [
        f"model {settings['model'] or '?'}",
        f"scheduler {settings['scheduler'] or '?'}",
        f"{settings['steps'] or '?'} steps",
        size,
        f"batch {settings['batch_size'] or '?'}",
        f"guidance {settings['guidance_scale']}",
        f"seed {settings['seed']}",
        f"prompt {json.dumps(settings['prompt'], ensure_ascii=False)}",
    ]
    return ", ".join(parts)


def _group(rows: list[dict]) -> list[Group]:
    """Split readable rows into groups of equal workload, keeping report order."""
    groups: dict[str, Group] = {}
    for row in rows:
        settings = _run_settings(row)
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, Group(_describe(settings), []))
        groups[key].rows.append(row)
    return list(groups.values())


def _usable(row: dict) -> bool:
    """An ok row with a trustworthy image: may be a baseline and gets a speed-up."""
    return row["status"] == "ok" and not row["broken"]


def _is_reference(row: dict) -> bool:
    """Whether a row is the unoptimised fp32/contiguous/classic/none configuration."""
    choices = row["choices"]
    return all(choices.get(g) == v for g, v in BASELINE_CHOICES.items()) and all(
        choices.get(g) in (None, "none") for g in NEUTRAL_CHOICES
    )


def _choose_baseline(group: Group) -> None:
    """The reference row (plain runs before preset runs), else the slowest completed row."""
    usable = [r for r in group.rows if _usable(r)]
    reference = [r for r in usable if _is_reference(r)]
    if reference:
        group.baseline = min(reference, key=lambda r: r["preset"] is not None)  # min keeps order on ties
        group.reason = (
            f"{group.baseline['label']} (job {group.baseline['job']}), the {BASELINE_NAME} "
            "configuration, i.e. the pipeline with no optimisation applied"
        )
    elif usable:
        group.baseline = max(usable, key=lambda r: r["latency_s"]["median"])
        group.reason = (
            f"no {BASELINE_NAME} row in this sweep: baseline is the slowest completed row "
            f"({group.baseline['label']})"
        )
    else:
        group.reason = "no completed row with a valid image: no baseline, no speed-ups"
    if group.baseline is not None:
        group.baseline["is_baseline"] = True


def _compare(group: Group, root: Path) -> None:
    """Speed-up (usable rows only) and fidelity (every completed row) against the group's baseline."""
    base = group.baseline
    if base is None:
        return
    base_pixels = _try_load(base, root)
    for row in group.rows:
        if row["status"] not in COMPLETED:
            continue
        row["baseline_job"] = base["job"]
        if _usable(row) and row["latency_s"]["median"] > 0:
            row["speedup"] = base["latency_s"]["median"] / row["latency_s"]["median"]
        pixels = _try_load(row, root)
        if base_pixels is None or pixels is None:
            row["note"] = row["note"] or ("no image to compare" if pixels is None else "baseline has no image")
        elif pixels.shape != base_pixels.shape:
            row["note"] = f"image shape {pixels.shape} differs from baseline {base_pixels.shape}: no fidelity"
        else:
            row["psnr_db"], row["max_abs_diff"] = fidelity(pixels, base_pixels)


# ---------------------------------------------------------------------------------------------
# Images


def load_image(path: Path) -> np.ndarray:
    """An image file as a uint8 H x W x 3 array (RGB; other modes converted)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _image_path(row: dict, root: Path) -> Optional[Path]:
    """Where a row's image lives (relative to its result.json folder), or None."""
    return root / row["job"] / row["image"] if row["image"] else None


def _read_pixels(row: dict, root: Path) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels, None), or (None, why) when the row has no readable image."""
    path = _image_path(row, root)
    if path is None:
        return None, "no image recorded"
    try:
        return load_image(path), None
    except Exception as exc:  # any decoder failure is an unreadable image, never a crashed report
        return None, f"image unreadable: {type(exc).__name__}: {exc}"


def _try_load(row: dict, root: Path) -> Optional[np.ndarray]:
    """A row's pixels, or None when it has no readable image."""
    return _read_pixels(row, root)[0]


def _saves_image(row: dict) -> bool:
    """Whether the run was asked to save an image (``run.save_image``, default true)."""
    return (row["spec"].get("run") or {}).get("save_image", True) is not False


def _broken_reason(row: dict, root: Path) -> Optional[str]:
    """Why a completed row's result cannot be trusted: the runner's verdict, or our own image check."""
    if row["status"] == "broken":
        return row["error"] or "broken image (status broken)"
    return _image_problem(row, root) if row["status"] == "ok" else None


def _image_problem(row: dict, root: Path) -> Optional[str]:
    """Why an ok row's image cannot be trusted (NaN, missing, unreadable, one flat colour), or None."""
    if row["image_stats"].get("nan"):
        return "image has NaN values (image_stats.nan)"
    if not row["image"] and not _saves_image(row):
        return None
    pixels, problem = _read_pixels(row, root)
    if pixels is None:
        return problem
    flat = pixels.reshape(-1, pixels.shape[-1])
    if flat.size == 0:
        return "image is empty"
    if (flat == flat[0]).all():
        colour = "all black" if not flat[0].any() else f"every pixel = {tuple(int(c) for c in flat[0])}"
        return f"image is one flat colour ({colour})"
    return None


def fidelity(image: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """PSNR in dB (255 peak, ``inf`` when identical) and max absolute difference, on uint8 pixels."""
    diff = np.abs(image.astype(np.int16) - reference.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return psnr, int(diff.max())


# ---------------------------------------------------------------------------------------------
# Formatting shared by the writers


def _fmt_seconds(v: Optional[float]) -> str:
    return DASH if v is None else (f"{v:.2f}" if v >= 10 else f"{v:.4f}")


def _fmt_speedup(v: Optional[float]) -> str:
    return DASH if v is None else f"x{v:.2f}"


def _fmt_mb(v: Optional[float]) -> str:
    return DASH if v is None else f"{v:.0f}"


def _fmt_psnr(v: Optional[float]) -> str:
    return DASH if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")


def _fmt_int(v: Optional[int]) -> str:
    return DASH if v is None else str(v)


def _median(row: dict) -> Optional[float]:
    """Median latency in seconds, None for rows that did not complete."""
    return row["latency_s"]["median"] if row["latency_s"] else None


def _flag(row: dict) -> str:
    """Short status words for the table; the reasons are in the problems section."""
    words = []
    if row["is_baseline"]:
        words.append("baseline")
    if row["status"] not in COMPLETED:
        words.append(row["status"])
    if row["broken"]:
        words.append("BROKEN image")
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


def build_table(sweep: Sweep) -> Table:
    """One line per readable row: job, varying choices (and preset), measurements and flag."""
    keys = ["job", *sweep.varying] + (["preset"] if sweep.has_preset else [])
    measures = [
        ("latency median (s)", lambda r: _fmt_seconds(_median(r))),
        ("speed-up", lambda r: _fmt_speedup(r["speedup"])),
        ("peak memory (MB)", lambda r: _fmt_mb(r["peak_memory_mb"])),
        ("warmup (s)", lambda r: _fmt_seconds(r["warmup_s"])),
        ("PSNR vs baseline (dB)", lambda r: _fmt_psnr(r["psnr_db"])),
        ("max abs diff (0-255)", lambda r: _fmt_int(r["max_abs_diff"])),
    ]

    def text(row: dict, key: str) -> str:
        value = row["job"] if key == "job" else row["preset"] if key == "preset" else row["choices"].get(key)
        return DASH if value is None else str(value)

    lines = [(r, [text(r, k) for k in keys] + [fmt(r) for _, fmt in measures] + [_flag(r)]) for r in sweep.readable]
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
    return lines


def summary_line(sweep: Sweep) -> str:
    """``N rows: k ok, m failed/unsupported, u unreadable``; k counts every measured row, broken ones noted."""
    broken = f" ({sweep.broken_count} broken)" if sweep.broken_count else ""
    return (
        f"{len(sweep.rows)} rows: {sweep.count(*COMPLETED)} ok{broken}, "
        f"{sweep.count('failed', 'unsupported')} failed/unsupported, {sweep.count(UNREADABLE)} unreadable"
    )


def problem_lines(sweep: Sweep) -> list[str]:
    """One line per failed / unsupported / unreadable / broken row, with its reason."""
    lines = []
    for row in sweep.rows:
        if row["status"] == UNREADABLE:
            lines.append(f"unreadable: {row['path']}: {row['error']}")
        elif row["status"] not in COMPLETED:
            lines.append(f"{row['status']}: {row['label']} (job {row['job']}): {row['error'] or 'no reason given'}")
        elif row["broken"]:
            lines.append(f"broken: {row['label']} (job {row['job']}): {row['broken']}; no speed-up reported")
    return lines


def note_lines(sweep: Sweep) -> list[str]:
    """Rows that completed but could not be compared with their baseline's image."""
    return [f"{r['label']} (job {r['job']}): {r['note']}" for r in sweep.rows if r["note"] and not r["broken"]]


METHOD = (
    "Speed-up = baseline median latency / row median latency (ok rows with a valid image only). "
    "PSNR and max abs diff compare each row's image with the baseline's (uint8 pixels, 255 peak; "
    "inf = identical)."
)


# ---------------------------------------------------------------------------------------------
# Writers


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, then rename over ``path``: readers never see half a file."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open: the usual umask-based permissions, unlike mkstemp's 0600
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _csv_value(value: Any) -> str:
    """CSV cell: empty for None, ``inf`` for infinity, JSON for lists, repr-precision floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def csv_columns(sweep: Sweep) -> list[str]:
    """Choice groups, preset, then the fixed measurement columns."""
    return [
        *sweep.choice_columns,
        "preset",
        "status",
        "error",
        *(f"latency_{s}_s" for s in LATENCY_STATS),
        "runs",
        "warmup_s",
        "build_s",
        "load_s",
        "peak_memory_mb",
        "speedup",
        "psnr_db",
        "max_abs_diff",
        "broken",
        "image",
        "job",
        "spec_key",
        "baseline",
        "note",
        "reused_from",
    ]


def _csv_record(row: dict, sweep: Sweep) -> dict:
    """One CSV line as a column -> cell dict."""
    latency = row["latency_s"] or {}
    record: dict[str, Any] = {g: row["choices"].get(g) for g in sweep.choice_columns}
    record.update({f"latency_{s}_s": latency.get(s) for s in LATENCY_STATS})
    record.update({k: row[k] for k in ("preset", "status", "error", "warmup_s", "build_s", "load_s")})
    record.update({k: row[k] for k in ("peak_memory_mb", "speedup", "psnr_db", "max_abs_diff", "broken")})
    record.update({k: row[k] for k in ("image", "job", "spec_key", "note", "reused_from")})
    record["runs"] = latency.get("runs")
    record["baseline"] = "yes" if row["is_baseline"] else None
    return {k: _csv_value(v) for k, v in record.items()}


def write_csv(sweep: Sweep) -> Path:
    """results.csv: one line per job, every row including unreadable ones."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_columns(sweep), lineterminator="\n")
    writer.writeheader()
    writer.writerows(_csv_record(row, sweep) for row in sweep.rows)
    path = sweep.path / CSV_FILE
    write_atomic(path, out.getvalue())
    return path


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or list item: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


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
    lines = [f"# Sweep report: {_md(sweep.path.name)}", ""]
    lines += [f"**{_md(title)}:** {_md(text)}  " for title, text in machine_lines(sweep)]
    lines += ["", f"**Rows:** {summary_line(sweep)}", ""]
    lines += _settings_lines(sweep) if sweep.groups else ["No completed or failed rows to compare."]
    lines += ["", METHOD, ""]
    if table.rows:
        lines.append("| " + " | ".join(_md(h) for h in table.headers) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in table.numeric) + "|")
        lines += ["| " + " | ".join(_md(c) for c in cells) + " |" for _, cells in table.rows]
        lines.append("")
    lines += [f"![latency]({PLOT_FILE})", "", "## Failed, unsupported, unreadable and broken rows", ""]
    lines += [f"- {_md(line)}" for line in problem_lines(sweep)] or ["None."]
    notes = note_lines(sweep)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {_md(line)}" for line in notes]
    return "\n".join(lines) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline { background: #eaf3ff; }
tr.problem { background: #fff0f0; }
td.image img { max-width: 256px; min-width: 96px; image-rendering: pixelated; display: block; }
img.plot { max-width: 100%; }
"""


NUM_TD = '<td class="num">'


def _image_cell(row: dict) -> str:
    """An <img> linking ``<job>/<image>`` relatively, or a dash."""
    if not row["image"]:
        return DASH
    src = html.escape(quote(f"{row['job']}/{row['image']}"), quote=True)
    return f'<a href="{src}"><img src="{src}" alt="{html.escape(row["label"], quote=True)}" loading="lazy"></a>'


def render_html(sweep: Sweep, table: Table) -> str:
    """The whole index.html text: header lines, the table with images, problems and notes."""
    esc = html.escape
    title = f"Sweep report: {sweep.path.name}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{HTML_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f"<p><strong>{esc(title)}:</strong> {esc(text)}</p>" for title, text in machine_lines(sweep)]
    parts.append(f"<p>Rows: {esc(summary_line(sweep))}</p>")
    parts += [f"<p>Run: {esc(g.description)}<br><strong>Baseline:</strong> {esc(g.reason)}</p>" for g in sweep.groups]
    parts.append(f"<p>{esc(METHOD)}</p>")
    if table.rows:
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "<th>image</th></tr>")
        for row, cells in table.rows:
            css = "baseline" if row["is_baseline"] else "problem" if not _usable(row) else ""
            tds = "".join((NUM_TD if n else "<td>") + f"{esc(c)}</td>" for c, n in zip(cells, table.numeric))
            tr = f'<tr class="{css}">' if css else "<tr>"
            parts.append(f'{tr}{tds}<td class="image">{_image_cell(row)}</td></tr>')
        parts.append("</table>")
    parts.append(f'<p><img class="plot" src="{PLOT_FILE}" alt="latency plot"></p>')
    parts.append("<h2>Failed, unsupported, unreadable and broken rows</h2>")
    problems = problem_lines(sweep)
    parts.append("<ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul>" if problems else "<p>None.</p>")
    notes = note_lines(sweep)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of (latency, memory) points no other point beats on both, sorted by memory.

    A point is dominated when another has lower-or-equal latency and lower-or-equal memory
    and is strictly better on one of them: the frontier is "the fastest within each memory budget".
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    frontier, best_latency = [], math.inf
    for i in order:
        if points[i][0] < best_latency:
            frontier.append(i)
            best_latency = points[i][0]
    return frontier


def render_plot(sweep: Sweep) -> bytes:
    """latency.png bytes: median latency bars (left) and latency vs peak memory with its Pareto frontier (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in sweep.rows if _usable(r)]
    fig = Figure(figsize=(13, max(3.5, 0.4 * len(rows) + 1.5)), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _plot_bars(left, rows, omitted=sweep.broken_count)
    _plot_pareto(right, [r for r in rows if r["peak_memory_mb"] is not None])
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


def _plot_bars(ax: Any, rows: list[dict], omitted: int) -> None:
    """Horizontal bars of median latency, first row on top, the baseline highlighted."""
    title = "Median latency" + (f" (broken rows omitted: {omitted})" if omitted else "")
    ax.set_title(title)
    if not rows:
        ax.text(0.5, 0.5, "no completed rows", ha="center", va="center", transform=ax.transAxes)
        return
    medians = [_median(r) for r in rows]
    colours = ["tab:orange" if r["is_baseline"] else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), medians, color=colours)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (orange: baseline)")
    ax.margins(x=0.25)  # room for the value labels
    for y, (row, median) in enumerate(zip(rows, medians)):
        ax.text(median, y, f" {_fmt_seconds(median)} {_fmt_speedup(row['speedup'])}", va="center", fontsize=7)


def _plot_pareto(ax: Any, rows: list[dict]) -> None:
    """Latency vs peak memory scatter with the Pareto frontier as a labelled step line."""
    ax.set_title("Latency vs peak memory")
    if not rows:
        ax.text(0.5, 0.5, "no peak memory recorded", ha="center", va="center", transform=ax.transAxes)
        return
    points = [(_median(r), r["peak_memory_mb"]) for r in rows]
    ax.scatter([m for _, m in points], [lat for lat, _ in points], color="tab:blue", zorder=2)
    front = pareto_frontier(points)
    xs, ys = [points[i][1] for i in front], [points[i][0] for i in front]
    ax.step(xs, ys, where="post", color="tab:red", label="Pareto frontier (fastest within memory)", zorder=1)
    for i in front:
        ax.annotate(rows[i]["label"], (points[i][1], points[i][0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.2, y=0.1)  # room for the point labels
    ax.set_xlabel("peak memory (MB)")
    ax.set_ylabel("median latency (s)")
    ax.legend(fontsize=8)


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
        write_atomic(paths[name], data)
    return paths


def aggregate(sweep_dir: str | Path) -> Path:
    """Read a sweep folder and write results.csv, report.md, latency.png and index.html into it.

    Never raises because of a bad row (those are reported); raises FileNotFoundError when the
    folder does not exist. Returns the path of report.md.
    """
    return write_outputs(analyse(sweep_dir))["report"]


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sdbuild.report SWEEP_DIR``: write the report, print a summary; 2 when there is nothing to report."""
    parser = argparse.ArgumentParser(prog="python -m sdbuild.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="folder holding <job>/result.json files")
    args = parser.parse_args(argv)
    root = Path(args.sweep_dir)
    if not root.is_dir():
        print(f"sdbuild.report: no such folder: {root}", file=sys.stderr)
        return 2
    if not find_result_files(root):
        print(f"sdbuild.report: no {RESULT_FILE} found under {root}", file=sys.stderr)
        return 2
    sweep = analyse(root)
    paths = write_outputs(sweep)
    print(summary_line(sweep))
    print(f"report: {paths['report']}")
    print(f"html:   {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
