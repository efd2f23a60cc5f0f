"""Glue between Hydra and a job: read the composed config and Hydra's runtime, run, summarize.

The Hydra task function returns the row, so Hydra's callbacks and launchers see it in
`JobReturn.return_value`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator

from omegaconf import DictConfig

from . import results
from .errors import SpecError, problem
from .results import Status
from .spec import GROUPS, to_spec
from .sweep import as_typed

log = logging.getLogger("sdbuild")


def summary_line(row: Dict[str, Any]) -> str:
    """One human line per finished job."""
    label = " ".join(f"{k}={v}" for k, v in results.parse_overrides(row["overrides"]).items()) or "defaults"
    if row.get("preset"):
        label = f"preset={row['preset']} ({label})"
    if row["status"] != Status.ok.value:
        return f"{label}: {row['status'].upper()}: {row['error']}"
    lat = row["latency_s"]
    reused = " (reused)" if row.get("reused_from") else ""
    noisy = results.noise_reasons(row)
    noise = f" [noisy: {'; '.join(noisy)}]" if noisy else ""
    peak = f"{row['peak_memory_mb']:.0f} MB" if row.get("peak_memory_mb") is not None else "?"
    return (f"{label}: median {lat['median']:.3f} s over {len(lat['runs'])} runs "
            f"(min {lat['min']:.3f}, max {lat['max']:.3f}), warmup {row['warmup_s'] or 0:.2f} s, "
            f"peak {peak}{reused}{noise}")


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """While a job runs, SIGTERM (a scheduler, `kill`) raises `Interrupted` like Ctrl-C raises
    KeyboardInterrupt, so the job still writes its `failed` row and stops its child process."""
    from .job import Interrupted

    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_code(row: Dict[str, Any], multirun: bool) -> int:
    """A single run's exit status: 0 ok, 2 unsupported (a user mistake), 1 otherwise. A sweep job's
    outcome is in its row, never in the sweep's exit status."""
    if multirun or row["status"] == Status.ok.value:
        return 0
    return 2 if row["status"] == Status.unsupported.value else 1


def refused_job(exc: SpecError) -> Dict[str, Any]:
    """`refused_row` for the sweep job Hydra is running now, said on its line."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices[g] for g in GROUPS if hc.runtime.choices.get(g)}
    row = refused_row(Path(hc.runtime.output_dir), choices, as_typed(hc.overrides.task),
                      {"num": hc.job.num, "output_dir": hc.runtime.output_dir}, exc)
    print(summary_line(row), flush=True)
    return row


def refused_row(out_dir: Path, choices: Dict[str, str], overrides: list[str], job: Dict[str, Any],
                exc: SpecError) -> Dict[str, Any]:
    """The `unsupported` row of a sweep job whose composed config was refused before it had a spec
    (an unknown key, a resolver, a value of the wrong type): written, so the sweep goes on and its
    report lists the job with its reason."""
    from .job import environment, make_room, write_row

    from .hardware import job_facts

    out_dir.mkdir(parents=True, exist_ok=True)
    make_room(out_dir, None)
    row = results.new_row(status=Status.unsupported.value, error=str(exc), choices=dict(choices),
                          overrides=list(overrides), job={**job, **job_facts()}, env=environment(None))
    return write_row(out_dir, row)


def serve_rank(spec, out_dir: Path, overrides: list[str], task) -> None:
    """SLURM task `task.rank` > 0 of a parallel job: run that rank (sdbuild.distributed.run_as_task) and
    return no row; rank 0's task writes the job's row with every rank's facts or errors. Never raises:
    submitit would fail the whole job (and Hydra the sweep) for one task's exception, and the rank's
    error is in its outcome file, which rank 0 reads."""
    from .distributed import run_as_task
    from .validate import validate

    label = " ".join(f"{k}={v}" for k, v in results.parse_overrides(overrides).items())
    try:
        device = validate(spec)
    except SpecError:  # rank 0 refuses the job with the same reason, in its row
        log.info("rank %d: the job is refused; rank 0's row says why", task.rank)
        return None
    with interrupts_as_exceptions():
        try:
            run_as_task(spec, device, out_dir, label, task)
        except Exception:  # the outcome file has it for rank 0, where the task could write one
            log.exception("rank %d of %d ended in an error outside its own handling", task.rank, task.world_size)
    log.info("rank %d of %d done; rank 0's task writes the row", task.rank, task.world_size)
    return None


def run_from_hydra(cfg: DictConfig) -> Dict[str, Any] | None:
    """Run the job Hydra composed and return its row (None in a SLURM task that runs a rank other than 0)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .job import run_in_fresh_process, run_in_worker, run_job, sweep_timeout

    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices[g] for g in GROUPS if hc.runtime.choices.get(g)}
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = {"num": hc.job.num if multirun else None, "output_dir": str(out_dir)}
    overrides = as_typed(hc.overrides.task)  # as typed: never resolved (plan.json records the same)
    try:
        spec = to_spec(cfg)
    except SpecError as exc:  # composed but refused: in a sweep a row, and the sweep goes on
        if not multirun:
            raise
        return refused_job(exc)
    from .distributed import slurm_task

    if (task := slurm_task()) is not None:  # one of a SLURM job's N tasks, each a rank (sdbuild.distributed)
        if task.world_size != spec.parallel.world_size:
            if task.rank:
                return None
            return said(refused_row(out_dir, choices, overrides, job, SpecError([problem(
                "hydra.launcher.tasks_per_node", f"SLURM started this job as {task.world_size} tasks, but "
                f"parallel={spec.parallel.name} runs as {spec.parallel.world_size} rank(s), and each task is one rank",
                f"Set hydra.launcher.tasks_per_node={spec.parallel.world_size} (and gpus_per_node to match), or "
                f"tasks_per_node=1 to let the job start its ranks itself")])), multirun, out_dir)
        if task.rank:
            return serve_rank(spec, out_dir, overrides, task)
    timeout_s = sweep_timeout(spec) if multirun else None
    with interrupts_as_exceptions():
        try:
            if multirun and spec.isolate:  # a process of its own for this job alone
                row = run_in_fresh_process(spec, overrides, out_dir, choices, job, timeout_s=timeout_s)
            elif multirun and timeout_s:  # the sweep's long-lived worker, replaced where it must be
                row = run_in_worker(spec, overrides, out_dir, choices, job, timeout_s=timeout_s)
            else:
                row = run_job(spec, out_dir, choices, overrides, job=job, show_progress=sys.stderr.isatty(),
                              reuse_weights=multirun, shared_process=multirun)
        except Exception as exc:  # never an exception for Hydra: it would cost the sweep its report
            from .job import base_row, environment, write_row

            log.exception("job %s ended in an error outside its own handling", job.get("num"))
            row = base_row(spec, choices, overrides, job)
            row.update(status=Status.failed.value, error=f"{type(exc).__name__}: {exc}", env=environment(None))
            write_row(out_dir, row)
    return said(row, multirun, out_dir)


def said(row: Dict[str, Any], multirun: bool, out_dir: Path) -> Dict[str, Any]:
    """Say the job's outcome (its line; for a single run where its row is, or its refusal on stderr)."""
    if multirun or row["status"] == Status.ok.value:  # a single run's refusal is said once, on stderr, below
        print(summary_line(row), flush=True)
    if not multirun:
        if row["status"] == Status.ok.value:
            print(f"result: {out_dir / results.RESULT_FILE}", flush=True)
            if (advice := results.threads_advice([row])):
                print(f"note: {advice}", flush=True)
        else:  # the refusal first, then where its row is: no `result:` line that reads like success
            print(f"sdbuild: {row['status']}:\n{row['error']}\n"
                  f"(its {row['status']} row is recorded in {out_dir / results.RESULT_FILE})",
                  file=sys.stderr, flush=True)
    return row
