"""Hydra callback for sweeps: job k of N with time left, and the report after the last job.

Hydra's basic launcher runs jobs one after another in this process; the callback sees each
start and end. With other launchers (submitit) jobs run elsewhere and only the report step
runs here; `python -m sdbuild.report SWEEP_DIR` builds the report at any time.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("sdbuild")


def count_jobs(config: DictConfig) -> Optional[int]:
    """How many jobs the basic sweeper makes: the cartesian product of the sweeper's
    `params` (from an experiment config) and the command-line overrides."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = config.hydra.sweeper.get("params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # progress is a courtesy; never fail a sweep over it
        return None


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.total: Optional[int] = None
        self.started = 0.0
        self.done = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = count_jobs(config)
        self.started, self.done = time.perf_counter(), 0

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.started:  # a single run
            return
        k = self.done + 1
        total = f"/{self.total}" if self.total else ""
        eta = ""
        if self.done and self.total:
            per_job = (time.perf_counter() - self.started) / self.done
            eta = f", about {per_job * (self.total - self.done):.0f} s left"
        print(f"[sdbuild] job {k}{total}{eta}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self.done += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .report import aggregate

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = aggregate(sweep_dir)
        except Exception as exc:  # the rows are on disk; the report can be rebuilt later
            print(f"[sdbuild] could not write the report ({exc}); rows are in {sweep_dir}. "
                  f"Retry: python -m sdbuild.report {sweep_dir}", flush=True)
            return
        print(f"[sdbuild] {self.done} jobs in {time.perf_counter() - self.started:.1f} s; "
              f"report: {report} (and {report.with_name('index.html')})", flush=True)
