"""sdbuild: declarative, measured diffusion pipelines.

    spec = sdbuild.compose(["precision=bf16", "attention=sdpa"])   # YAML config groups -> typed spec
    pipe = sdbuild.build(spec)                                      # validated, optimized pipeline
    row = sdbuild.run(spec)                                         # built, run, measured: the CLI's row

Nothing heavy is imported here: torch and diffusers load on first use of `build` or `run`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .config import compose
from .spec import GROUPS, Spec

__all__ = ["Spec", "build", "compose", "run", "show"]

RUNS_DIR = Path("outputs") / "runs"  # where the CLI's single runs land (conf/config.yaml, hydra.run.dir)


def build(spec: Spec):
    """Validate `spec` against this machine and return the optimized diffusers pipeline."""
    from .builder import build as _build

    return _build(spec)


def show(spec: Spec) -> str:
    """Validate `spec` and describe it: the resolved spec and what would be built, loading no
    weights (what `dry_run=true` prints). Raises `SpecError` where validation refuses it."""
    from .dryrun import show as _show

    return _show(spec)


def new_run_dir(root: Union[str, Path] = RUNS_DIR) -> Path:
    """A fresh `outputs/runs/<time>` folder, named as the CLI names its runs (made unique within a second)."""
    base = Path(root) / time.strftime("%Y-%m-%d_%H-%M-%S")
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")


def choices_of(spec: Spec) -> Dict[str, str]:
    """The option of each config group, as the CLI records them (each YAML file names itself)."""
    return {group: getattr(spec, group).name for group in GROUPS}


def run(spec: Spec, out_dir: Optional[Union[str, Path]] = None, *, choices: Optional[Dict[str, str]] = None,
        overrides: Optional[list] = None, job: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Build, run and measure `spec` exactly as `python -m sdbuild` does (the same `run_job`):
    write `out_dir/result.json` (default: a new `outputs/runs/<time>` folder) and return that row.

    A spec this machine cannot run returns an `unsupported` row (its `error` says why), a crash a
    `failed` one: check `row["status"] == "ok"`. `choices` default to the spec's group options.
    With `spec.dry_run` it prints `show(spec)` instead, writes nothing and returns None.
    """
    import sys

    from .job import run_job

    if spec.dry_run:
        print(show(spec))
        return None
    out_dir = Path(out_dir) if out_dir is not None else new_run_dir()
    job = {"num": None, "output_dir": str(out_dir), **(job or {})}
    return run_job(spec, out_dir, choices if choices is not None else choices_of(spec), list(overrides or []),
                   job=job, show_progress=sys.stderr.isatty())
