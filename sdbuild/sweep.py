"""Hydra callback for sweeps: the plan, a lock on the sweep folder, job k of N, and the report.

At the start of a multirun it records the plan (`plan.json`: every job and its overrides, so the
report can list jobs that never wrote a row as `missing`) and takes the sweep folder's lock (a
second live sweep into the same folder is refused: their rows would overwrite each other). Hydra's
basic launcher runs jobs one after another in this process and the callback sees each start; with
other launchers (submitit) jobs run elsewhere and only the start and the report step run here.
`python -m sdbuild.report SWEEP_DIR` builds the report at any time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

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
        params = _unresolved(config.hydra.sweeper.get("params")) or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + _unresolved(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        return [as_typed(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # the plan is a courtesy to the report; never fail a sweep over it
        return None


def _unresolved(node: Any) -> Any:
    """A config node as plain data, its `${...}` left as written (iterating a ListConfig resolves
    each item: `run.prompt=${run.seed}` would read `run.prompt=0`, `\\${` would lose its `\\`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=False) if node is not None else None


def as_typed(overrides: Any) -> List[str]:
    """A job's overrides as they are recorded (the row's `overrides`, plan.json): each one as it was
    typed, `key=value` with the value's text (`run.prompt=${run.seed}`, `run.prompt=a \\${x} b`),
    never resolved, and the same whether the job is a single run (Hydra hands over the typed text)
    or one job of a sweep (Hydra hands over its re-quoted form, `run.prompt=$\\{run.seed\\}`).
    Accepts a ListConfig (read unresolved) or a list of strings; anything Hydra cannot parse is kept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    typed = []
    for item in (_unresolved(overrides) if not isinstance(overrides, list) else overrides) or []:
        item = str(item)
        try:
            override = parser.parse_override(item)
        except Exception:
            typed.append(item)
            continue
        value = override.value()
        # Only a string's text is re-quoted by Hydra's sweeper; numbers, lists and the rest stay as given.
        typed.append(f"{override.get_key_element()}={value}" if isinstance(value, str) else item)
    return typed


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


def process_start(pid: int) -> Optional[str]:
    """When process `pid` started, as `<boot id>:<start time in clock ticks since boot>` (Linux's
    /proc), so that a pid the kernel reused for another process is told apart; None elsewhere or
    when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{stat[stat.rfind(')') + 2:].split()[19]}"  # field 22, starttime
    except (OSError, IndexError):
        return None


def owner_dead(owner: Dict[str, Any]) -> bool:
    """Whether the sweep that wrote lock record `owner` is known to be dead: it ran on this host and
    its pid no longer runs, or runs a process that started at another time (a reused pid, or a
    reboot). An owner on another host, or one with no record of who it is, is never known dead."""
    pid, host, start = owner.get("pid"), owner.get("host"), owner.get("start")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    if not _alive(pid):
        return True
    return start is not None and process_start(pid) is not None and process_start(pid) != start


@contextlib.contextmanager
def _guarded(sweep_dir: Path) -> Iterator[None]:
    """One process at a time reads, judges and replaces the sweep folder's lock: an exclusive
    flock on the folder itself, which the kernel drops when its holder dies (it never goes stale)."""
    fd = os.open(sweep_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _mine() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()), "started": time.time()}


def _is_mine(owner: Any) -> bool:
    me = _mine()
    return isinstance(owner, dict) and all(owner.get(k) == me[k] for k in ("pid", "host", "start"))


def acquire_lock(sweep_dir: Path) -> Path:
    """Take the sweep folder's lock, or refuse (SweepError) while another sweep may hold it. The
    lock file records the owner's pid, host and process start time, and is written whole (never
    seen empty); it is taken over only when its owner is known dead (`owner_dead`). Reading,
    judging and replacing it happen under `_guarded`, so two sweeps starting together get one owner."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / results.LOCK_FILE
    with _guarded(sweep_dir):
        try:
            owner: Any = json.loads(path.read_text())
        except FileNotFoundError:
            owner = None
        except (OSError, ValueError) as exc:
            raise SweepError(
                f"hydra.sweep.dir={sweep_dir} holds a lock file that cannot be read ({type(exc).__name__}: {exc}), "
                f"so whether another sweep writes there is unknown. If none does, delete {path}.") from None
        if owner is not None and not isinstance(owner, dict):  # `[1,2]`, `"x"`: no owner to name
            raise SweepError(
                f"hydra.sweep.dir={sweep_dir} holds a lock file that is not a lock record ({json.dumps(owner)[:80]}), "
                f"so whether another sweep writes there is unknown. If none does, delete {path}.")
        if owner is not None and not _is_mine(owner):
            if not owner_dead(owner):
                pid, host = (owner.get("pid"), owner.get("host")) if isinstance(owner, dict) else (None, None)
                where = f"process {pid}" + (f" on {host}" if host != socket.gethostname() else "")
                raise SweepError(
                    f"hydra.sweep.dir={sweep_dir} is being written by another sweep ({where}); two sweeps in one "
                    f"folder overwrite each other's rows. Use another hydra.sweep.dir, wait for that sweep, or "
                    f"delete {path} if that sweep is dead.")
            log.info("taking over the lock of a dead sweep (process %s): %s", owner.get("pid"), path)
        results.write_json(path, _mine())
    return path


def release_lock(sweep_dir: Path) -> None:
    path = sweep_dir / results.LOCK_FILE
    try:
        with _guarded(sweep_dir):
            if _is_mine(json.loads(path.read_text())):
                path.unlink()
    except (OSError, ValueError):
        pass


# conf/config.yaml sets `hydra.output_subdir: null`, so that Hydra writes nothing into a job's folder before
# the job runs (its own write raises out of the launcher on a full disk, and ends the sweep); the same
# three files are written here instead, where a failure is said and the job goes on to its row.
HYDRA_SUBDIR = ".hydra"


def save_hydra_files(config: DictConfig) -> Optional[str]:
    """Hydra's record of a job in `<job>/.hydra/` (config.yaml, hydra.yaml, overrides.yaml, as Hydra
    writes them); a folder that cannot take them (a full disk) is said on the log, never raised: the
    job still runs and records its row (or says why it could not). Returns the reason, if any."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if config.hydra.get("output_subdir") is not None:  # asked for by name: Hydra wrote them itself
        return None
    folder = Path(config.hydra.runtime.output_dir) / HYDRA_SUBDIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        task = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        for name, cfg in (("config.yaml", task), ("hydra.yaml", HydraConfig.instance().cfg),
                          ("overrides.yaml", config.hydra.overrides.task)):
            results.write_atomic(folder / name, OmegaConf.to_yaml(cfg))
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc}"
        log.warning("could not write Hydra's record of the job into %s (%s); the job runs on", folder, why)
        print(f"[sdbuild] could not write {folder} ({why}); the job runs on", flush=True)
        return why
    return None


_RUNNING: List[Any] = []  # (callback, config) of the sweep this process runs, between its start and its end


def finish_interrupted_sweep() -> Optional[str]:
    """After Ctrl-C or SIGTERM ended a sweep (Hydra calls no end callback then): release the lock and
    write the report of what was measured, as the sweep's end would. Returns what to say (None when
    no sweep was running)."""
    if not _RUNNING:
        return None
    callback, config = _RUNNING.pop()
    callback.on_multirun_end(config)
    return f"the sweep's report covers the jobs that ran: {Path(config.hydra.sweep.dir)}"


# Hydra's own sweeper and launcher: the sweeper composes every job before the first runs
# (BasicSweeper.validate_batch_is_legal) and the launcher runs each job in this process.
BASIC = ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
         "hydra._internal.core_plugins.basic_launcher.BasicLauncher")


def end_uncomposable_sweep() -> Optional[str]:
    """When Hydra's basic sweep ended before any job ran (it composes them all first, so a job it
    cannot compose, e.g. a preset key the spec lacks, ends it): release the lock and write the (empty)
    report, as the sweep's end would, and return what to say; None when another sweeper or launcher
    ran it (their jobs may have run elsewhere) or no sweep was running."""
    if not _RUNNING:
        return None
    _, config = _RUNNING[-1]
    if (config.hydra.sweeper.get("_target_"), config.hydra.launcher.get("_target_")) != BASIC:
        return None
    return finish_interrupted_sweep()


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.total: Optional[int] = None
        self.started = 0.0
        self.done = 0
        self.dry_run = False
        self.unwritten: Dict[int, Dict[str, Any]] = {}  # job number -> a row its folder could not take

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .errors import SpecError
        from .job import check_resume

        sweep_dir = Path(config.hydra.sweep.dir)
        # A log file that cannot be written (a full disk) must not print a traceback per log line:
        # the jobs say what they could not write on their own lines (Python's documented switch).
        logging.raiseExceptions = False
        try:
            check_resume(config.get("resume"))  # before any job runs: a typo would re-measure everything
        except SpecError as exc:
            raise SweepError(str(exc)) from None
        self.started, self.done, self.unwritten = time.perf_counter(), 0, {}
        jobs = planned_jobs(config)
        self.total = None if jobs is None else len(jobs)
        self.dry_run = bool(config.get("dry_run"))
        if self.dry_run:  # a dry run measures nothing: no lock, plan or report in the sweep folder
            return
        _RUNNING[:] = [(self, config)]
        try:
            acquire_lock(sweep_dir)
            if jobs is not None:
                write_plan(sweep_dir, jobs)
            else:
                (sweep_dir / results.PLAN_FILE).unlink(missing_ok=True)  # an earlier sweep's plan is not ours
        except OSError as exc:
            raise SweepError(f"hydra.sweep.dir={sweep_dir} cannot be written ({type(exc).__name__}: {exc}). "
                             f"Choose a folder you can write, e.g. hydra.sweep.dir=outputs/multirun/<name>") from None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        save_hydra_files(config)
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
        """Count the job; keep a row its folder could not take (the report lists it), and say why a
        job left no row at all."""
        from hydra.core.utils import JobStatus

        self.done += 1
        if job_return.status is JobStatus.FAILED:
            print(f"[sdbuild] job {self.done} ended without a row: {job_return._return_value!r}", flush=True)
            return
        row = job_return.return_value
        if isinstance(row, dict) and (row.get("job") or {}).get("unwritten"):
            self.unwritten[config.hydra.job.num] = row

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .job import close_worker
        from .report import aggregate_sweep, summary_line

        close_worker()  # idle now: its memory and CPU are not the report's
        if self.dry_run:
            return
        _RUNNING.clear()
        sweep_dir = Path(config.hydra.sweep.dir)
        release_lock(sweep_dir)
        try:
            sweep, paths = aggregate_sweep(sweep_dir, unwritten=self.unwritten)
        except Exception as exc:  # the rows are on disk; the report can be rebuilt later
            print(f"[sdbuild] could not write the report ({exc}); rows are in {sweep_dir}. "
                  f"Retry: python -m sdbuild.report {sweep_dir}", flush=True)
            return
        # Counted from the rows on disk, not from callback events (other launchers run jobs elsewhere).
        print(f"[sdbuild] {summary_line(sweep)}; {time.perf_counter() - self.started:.1f} s; "
              f"report: {paths['report']} (and {paths['html']})", flush=True)
