"""Glue between Hydra and a job: read the composed config and Hydra's runtime, run, summarize."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig

from .spec import GROUPS, to_spec

log = logging.getLogger("sdbuild")


def summary_line(row: Dict[str, Any]) -> str:
    """One human line per finished job."""
    label = " ".join(f"{g}={row['choices'][g]}" for g in GROUPS if g in row["choices"])
    if row.get("preset"):
        label = f"preset={row['preset']} ({label})"
    if row["status"] != "ok":
        return f"{label}: {row['status'].upper()}: {row['error']}"
    lat = row["latency_s"]
    reused = " (reused)" if row.get("reused_from") else ""
    return (f"{label}: median {lat['median']:.3f} s over {len(lat['runs'])} runs "
            f"(min {lat['min']:.3f}, p90 {lat['p90']:.3f}), warmup {row['warmup_s']:.2f} s, "
            f"peak {row['peak_memory_mb']:.0f} MB{reused}")


def run_from_hydra(cfg: DictConfig) -> int:
    """Run the job Hydra composed; return the process exit code for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .job import run_job

    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices[g] for g in GROUPS if hc.runtime.choices.get(g)}
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = {"num": hc.job.num if multirun else None, "output_dir": str(out_dir)}
    row = run_job(to_spec(cfg), out_dir, choices, list(hc.overrides.task), job=job, show_progress=sys.stderr.isatty(),
                  reuse_weights=multirun)
    print(summary_line(row), flush=True)
    if not multirun:
        print(f"result: {out_dir / 'result.json'}", flush=True)
    if multirun or row["status"] == "ok":
        return 0
    print(f"sdbuild: {row['status']}:\n{row['error']}", file=sys.stderr)
    return 2 if row["status"] == "unsupported" else 1
