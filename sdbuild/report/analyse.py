"""Analysis: comparison groups (same model and workload), one baseline each (found from typed spec
values), speed-ups from medians, image fidelity, broken and noisy flags, labels."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import results
from ..fidelity import FIDELITY_BOUND_DB, compare
from ..results import COMPLETED, Status
from ..spec import (AttentionProcessor, CacheMethod, CompileMethod, Dtype, MemoryFormat, ModelSource, Offload, Quant,
                    VaeKind)
from . import parallel
from .load import existing_dir, load

BASELINE_NAME = "fp32/contiguous/classic attention/no compile/no offload/no quant/full VAE/no cache"
# spec.run fields that define the workload: rows are only compared when these are equal.
WORKLOAD_RUN_KEYS = ("prompt", "negative_prompt", "seed", "steps", "height", "width", "batch_size",
                     "guidance_scale", "device")
COMPLETED_VALUES = tuple(s.value for s in COMPLETED)


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
    varying: list[str] = field(default_factory=list)  # overrides / choices whose value differs between rows
    choice_columns: list[str] = field(default_factory=list)  # every config group seen
    planned: Optional[int] = None
    ignored: list[str] = field(default_factory=list)
    plan_error: Optional[str] = None

    @property
    def readable(self) -> list[dict]:
        """Rows a job wrote and that validated (not unreadable, not missing)."""
        return [r for r in self.rows if r["status"] in (s.value for s in results.WRITTEN)]

    @property
    def has_preset(self) -> bool:
        return any(r["preset"] for r in self.readable)

    def count(self, *statuses: str) -> int:
        return sum(r["status"] in statuses for r in self.rows)

    @property
    def broken_count(self) -> int:
        return sum(bool(r["broken"]) for r in self.rows)

    @property
    def noisy_count(self) -> int:
        return sum(bool(r["noisy"]) for r in self.rows)


def analyse(sweep_dir: str | Path, rows: Optional[list[dict]] = None, unwritten: Optional[dict[int, dict]] = None) -> Sweep:
    """Load (unless `rows` are given), group, pick baselines and annotate every row in place.

    Adds to each row: ``label``, ``is_baseline``, ``baseline_job``, ``speedup``, ``speedup_noisy``,
    ``psnr_db``, ``ssim``, ``max_abs_diff``, ``broken`` (reason or None), ``noisy`` (reasons) and ``note``.
    """
    root = existing_dir(sweep_dir)
    if rows is None:
        loaded = load(root, unwritten)
        sweep = Sweep(root, loaded.rows, planned=loaded.planned, ignored=loaded.ignored, plan_error=loaded.plan_error)
    else:
        sweep = Sweep(root, rows)
    rows = sweep.rows
    for row in rows:
        row.update(is_baseline=False, baseline_job=None, speedup=None, speedup_noisy=False, psnr_db=None,
                   ssim=None, max_abs_diff=None, note=None)
        row["broken"] = results.image_problem(row, root / row["job"]) if row["status"] in COMPLETED_VALUES else None
        row["noisy"] = results.noise_reasons(row)
    labelled = [r for r in rows if r["status"] != Status.unreadable.value]
    sweep.varying = results.varying_keys(labelled)
    for row, label in zip(labelled, results.labels(labelled)):
        row["label"] = label
    for row in rows:
        if row["status"] == Status.unreadable.value:
            row["label"] = f"job {row['job']}"
    sweep.choice_columns = _union_in_order(r["choices"] for r in sweep.readable)
    sweep.groups = _group(sweep.readable)
    for group in sweep.groups:
        _choose_baseline(group)
        _compare(group, root)
    parallel.annotate(sweep.readable, usable)  # parallel rows: speed-up and efficiency on their degree-1 row
    return sweep


def _union_in_order(dicts) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    return list(keys)


def _workload(row: dict) -> dict:
    """What must be equal for two rows to be compared: the model (everything but its option name),
    the scheduler and the run's workload, with the image size resolved from the model."""
    spec = row["spec"] or {}
    model = {k: v for k, v in (spec.get("model") or {}).items() if k != "name"}
    run = spec.get("run") or {}
    settings = {"model": model, "scheduler": (spec.get("scheduler") or {}).get("kind"),
                "vae_path": (spec.get("vae") or {}).get("path")}
    settings.update({k: run.get(k) for k in WORKLOAD_RUN_KEYS})
    settings["height"] = settings["height"] or model.get("resolution")
    settings["width"] = settings["width"] or model.get("resolution")
    return settings


def _describe(row: dict, settings: dict) -> str:
    """A one-line human description of a workload."""
    model = settings["model"] or {}
    name = (row["spec"].get("model") or {}).get("name") or row["choices"].get("model") or "?"
    path = f" ({model['path']})" if model.get("path") else ""
    parts = [
        f"model {name}{path}",
        f"scheduler {settings['scheduler'] or '?'}",
        f"{settings['steps'] or '?'} steps",
        f"{settings['height'] or '?'}x{settings['width'] or '?'}",
        f"batch {settings['batch_size'] or '?'}",
        f"guidance {settings['guidance_scale']}",
        f"seed {settings['seed']}",
        f"prompt {json.dumps(settings['prompt'], ensure_ascii=False)}",
    ]
    return ", ".join(parts)


def _group(rows: list[dict]) -> list[Group]:
    """Split rows into groups of equal workload, keeping report order."""
    groups: dict[str, Group] = {}
    for row in rows:
        settings = _workload(row)
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, Group(_describe(row, settings), []))
        groups[key].rows.append(row)
    return list(groups.values())


def usable(row: dict) -> bool:
    """An ok row with a trustworthy image: may be a baseline and gets a speed-up."""
    return row["status"] == Status.ok.value and not row["broken"]


def _enum(enum_cls, value: Any):
    """A spec value (recorded by enum name) as its enum member, None when absent or unknown."""
    try:
        return enum_cls[value]
    except (KeyError, TypeError):
        return None


def is_reference(row: dict) -> bool:
    """Whether a row's spec is the unoptimised pipeline: fp32 (VAE too, no TF32), contiguous, classic
    attention (unfused, unsliced), no compile, no offload or VAE slicing/tiling, no quant, full VAE,
    no step cache (rows from before the cache group have none).
    Decided on the typed spec values, never on option names."""
    s = row["spec"] or {}
    p, mf, a = s.get("precision") or {}, s.get("memory_format") or {}, s.get("attention") or {}
    c, m, q, v = s.get("compile") or {}, s.get("memory") or {}, s.get("quant") or {}, s.get("vae") or {}
    return (
        _enum(Dtype, p.get("dtype")) is Dtype.fp32
        and _enum(Dtype, p.get("vae_dtype")) in (None, Dtype.fp32) and not p.get("tf32")
        and _enum(MemoryFormat, mf.get("format")) is MemoryFormat.contiguous
        and _enum(AttentionProcessor, a.get("processor")) is AttentionProcessor.classic
        and not a.get("fuse_qkv") and a.get("slice_size") is None
        and _enum(CompileMethod, c.get("method")) is CompileMethod.none
        and _enum(Offload, m.get("offload")) is Offload.none and not m.get("vae_slicing") and not m.get("vae_tiling")
        and _enum(Quant, q.get("method")) is Quant.none
        and _enum(VaeKind, v.get("kind")) is VaeKind.full
        and _enum(CacheMethod, (s.get("cache") or {}).get("method")) in (None, CacheMethod.none)
    )


def random_weights(row: dict) -> bool:
    """Whether a row's model has random weights (`model.source` tiny or arch): its images are noise
    by design, to be compared pixel to pixel with the baseline's, not judged by eye."""
    source = ((row["spec"] or {}).get("model") or {}).get("source")
    return _enum(ModelSource, source) in (ModelSource.tiny, ModelSource.arch)


def fastest(group: Group, bound_db: float = FIDELITY_BOUND_DB) -> tuple[Optional[dict], Optional[dict]]:
    """The fastest usable row of a group (lowest median), and the fastest whose image is within the
    fidelity bound of the baseline's (PSNR >= `bound_db`; the baseline itself is); None where there is none."""
    ok = [r for r in group.rows if usable(r)]
    faithful = [r for r in ok if r["psnr_db"] is not None and r["psnr_db"] >= bound_db]
    by_median = lambda r: r["latency_s"]["median"]  # noqa: E731
    return (min(ok, key=by_median) if ok else None), (min(faithful, key=by_median) if faithful else None)


def _choose_baseline(group: Group) -> None:
    """The reference row (plain runs before preset runs), else the slowest completed row."""
    ok = [r for r in group.rows if usable(r)]
    reference = [r for r in ok if is_reference(r)]
    if reference:
        group.baseline = min(reference, key=lambda r: r["preset"] is not None)  # min keeps order on ties
        group.reason = (f"{group.baseline['label']} (job {group.baseline['job']}), the {BASELINE_NAME} "
                        "configuration, i.e. the pipeline with no optimisation applied")
    elif ok:
        group.baseline = max(ok, key=lambda r: r["latency_s"]["median"])
        group.reason = (f"no {BASELINE_NAME} row in this group: baseline is the slowest completed row "
                        f"({group.baseline['label']})")
    else:
        group.reason = "no completed row with a valid image: no baseline, no speed-ups"
    if group.baseline is not None:
        group.baseline["is_baseline"] = True


def _compare(group: Group, root: Path) -> None:
    """Speed-up (usable rows only, from medians) and fidelity (every completed row) against the baseline."""
    base = group.baseline
    if base is None:
        return
    base_pixels = try_load(base, root)
    for row in group.rows:
        if row["status"] not in COMPLETED_VALUES:
            continue
        row["baseline_job"] = base["job"]
        if usable(row) and row["latency_s"]["median"] > 0:
            row["speedup"] = base["latency_s"]["median"] / row["latency_s"]["median"]
            row["speedup_noisy"] = bool(row["noisy"] or base["noisy"])
        pixels = try_load(row, root)
        if base_pixels is None or pixels is None:
            row["note"] = row["note"] or ("no image to compare" if pixels is None else "baseline has no image")
        elif pixels.shape != base_pixels.shape:
            row["note"] = f"image shape {pixels.shape} differs from baseline {base_pixels.shape}: no fidelity"
        else:
            measured = compare(pixels, base_pixels)  # sdbuild.fidelity: the one place fidelity is computed
            row.update(psnr_db=measured.psnr_db, ssim=measured.ssim, max_abs_diff=int(measured.max_abs_diff))


def try_load(row: dict, root: Path) -> Optional[np.ndarray]:
    """A row's pixels, or None when it has no readable image."""
    if not row["image"]:
        return None
    try:
        return results.load_pixels(root / row["job"] / row["image"])
    except Exception:
        return None


def pareto_frontier(points) -> list[int]:
    """Indices of (latency, memory) points no other point beats on both, sorted by memory."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    frontier, best_latency = [], math.inf
    for i in order:
        if points[i][0] < best_latency:
            frontier.append(i)
            best_latency = points[i][0]
    return frontier
