"""Hydra callback for sweeps: the plan, a lock on the sweep folder, job k of N, and the report.

At the start of a multirun it records the plan (`plan.json`: every job and its overrides, so the
report can list jobs that never wrote a row as `missing`) and takes the sweep folder's lock (a
second live sweep into the same folder is refused: their rows would overwrite each other). Hydra's
basic launcher runs jobs one after another in this process and the callback sees each start; with
other launchers (submitit) jobs run elsewhere and only the start and the report step run here.
`python -m sdbuild.report SWEEP_DIR` builds the report at any time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import results

log = logging.getLogger("sdbuild")


class SweepError(SystemExit):
    """A sweep that must not start: the message is printed, the exit status is 2, no traceback."""

    def __init__(self, message: str) -> None:
        print(f"sdbuild: {message}", file=__import__("sys").stderr, flush=True)
        super().__init__(2)


def planned_jobs(config: DictConfig) -> Optional[List[List[str]]]:
    """Each job's overrides, in job-number order, as Hydra's basic sweeper will make them: the
    cartesian product of the sweeper's `params` (from an experiment config) and the command line.
    None for other sweepers (their jobs are not known in advance)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return None
        params = config.hydra.sweeper.get("params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # the plan is a courtesy to the report; never fail a sweep over it
        return None


def count_jobs(config: DictConfig) -> Optional[int]:
    """How many jobs the basic sweeper makes (None when unknown)."""
    jobs = planned_jobs(config)
    return None if jobs is None else len(jobs)


def write_plan(sweep_dir: Path, jobs: List[List[str]]) -> None:
    """plan.json: {"jobs": [{"num": k, "overrides": [...]}, ...]} (job k's folder is `k`)."""
    results.write_json(sweep_dir / results.PLAN_FILE,
                       {"jobs": [{"num": k, "overrides": overrides} for k, overrides in enumerate(jobs)]})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(sweep_dir: Path) -> Path:
    """Take the sweep folder's lock, or refuse (SweepError) while another live sweep holds it. A lock
    left by a sweep that died (its pid no longer runs on this host) is taken over."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / results.LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner: Dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if pid == os.getpid() and host == mine["host"]:
                return path
            if isinstance(pid, int) and (host != mine["host"] or _alive(pid)):
                where = f"process {pid}" + (f" on {host}" if host != mine["host"] else "")
                raise SweepError(
                    f"hydra.sweep.dir={sweep_dir} is being written by another sweep ({where}); two sweeps in one "
                    f"folder overwrite each other's rows. Use another hydra.sweep.dir, wait for that sweep, or "
                    f"delete {path} if that sweep is dead.")
            path.unlink(missing_ok=True)  # its owner is gone: a stale lock
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return path
    raise SweepError(f"could not take the lock {path}: another sweep is starting in {sweep_dir}")


def release_lock(sweep_dir: Path) -> None:
    path = sweep_dir / results.LOCK_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.total: Optional[int] = None
        self.started = 0.0
        self.done = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .errors import SpecError
        from .job import check_resume

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            check_resume(config.get("resume"))  # before any job runs: a typo would re-measure everything
        except SpecError as exc:
            raise SweepError(str(exc)) from None
        acquire_lock(sweep_dir)
        jobs = planned_jobs(config)
        self.total = None if jobs is None else len(jobs)
        if jobs is not None:
            write_plan(sweep_dir, jobs)
        else:
            (sweep_dir / results.PLAN_FILE).unlink(missing_ok=True)  # an earlier sweep's plan is not ours
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
        from .report import aggregate_sweep, summary_line

        sweep_dir = Path(config.hydra.sweep.dir)
        release_lock(sweep_dir)
        try:
            sweep, paths = aggregate_sweep(sweep_dir)
        except Exception as exc:  # the rows are on disk; the report can be rebuilt later
            print(f"[sdbuild] could not write the report ({exc}); rows are in {sweep_dir}. "
                  f"Retry: python -m sdbuild.report {sweep_dir}", flush=True)
            return
        # Counted from the rows on disk, not from callback events (other launchers run jobs elsewhere).
        print(f"[sdbuild] {summary_line(sweep)}; {time.perf_counter() - self.started:.1f} s; "
              f"report: {paths['report']} (and {paths['html']})", flush=True)
