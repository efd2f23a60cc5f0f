"""Glue between Hydra and a job: read the composed config and Hydra's runtime, run, summarize."""

from __future__ import annotations

import json
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


def run_in_fresh_process(overrides: list[str], out_dir: Path, choices: Dict[str, str], job: Dict[str, Any]) -> Dict[str, Any]:
    """`isolate=true`: run this sweep job as a single run in a new Python process, into the same
    folder, and read back its row. A process that dies without writing one (a segfault, the OOM
    killer) still leaves a `failed` row saying how it ended."""
    import subprocess

    from .job import RESULT, environment, write_json_atomic

    command = [sys.executable, "-m", "sdbuild", *overrides, "isolate=false", f"hydra.run.dir={out_dir}"]
    done = subprocess.run(command, capture_output=True, text=True)
    (out_dir / "process.log").write_text(done.stdout + done.stderr)
    result = out_dir / RESULT
    if result.exists():
        row = json.loads(result.read_text())
        row["job"] = {**row.get("job", {}), **job, "isolated": True}
    else:
        row = dict(status="failed", error=f"the job's process exited with code {done.returncode} before writing "
                   f"a result (last output: {(done.stderr or done.stdout).strip()[-300:]!r}); see process.log",
                   choices=choices, overrides=overrides, latency_s=None, env=environment(None),
                   job={**job, "isolated": True})
    write_json_atomic(result, row)
    return row


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
    spec = to_spec(cfg)
    if multirun and spec.isolate:
        row = run_in_fresh_process(list(hc.overrides.task), out_dir, choices, job)
    else:
        row = run_job(spec, out_dir, choices, list(hc.overrides.task), job=job, show_progress=sys.stderr.isatty(),
                      reuse_weights=multirun)
    if multirun or row["status"] == "ok":  # a single run's refusal is said once, on stderr, below
        print(summary_line(row), flush=True)
    if not multirun:
        print(f"result: {out_dir / 'result.json'}", flush=True)
    if multirun or row["status"] == "ok":
        return 0
    print(f"sdbuild: {row['status']}:\n{row['error']}", file=sys.stderr)
    return 2 if row["status"] == "unsupported" else 1
