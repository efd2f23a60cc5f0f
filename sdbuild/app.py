"""Glue between Hydra and a job: read the composed config and Hydra's runtime, run, summarize.

The Hydra task function returns the row, so Hydra's callbacks and launchers see it in
`JobReturn.return_value`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from omegaconf import DictConfig

from . import results
from .results import Status
from .spec import GROUPS, Spec, to_spec

log = logging.getLogger("sdbuild")
CHILD_GRACE_S = 30  # how long an interrupted isolate=true child gets to write its own row
# run.timeout_s's default for a sweep job under the basic launcher: generous (an SDXL-sized job on a
# CPU takes most of an hour), only there to end a job that hangs instead of stalling the sweep.
SWEEP_TIMEOUT_S = 4 * 3600.0


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


def run_in_fresh_process(spec: Spec, overrides: list[str], out_dir: Path, choices: Dict[str, str],
                         job: Dict[str, Any], timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """`isolate=true` (and every sweep job with a time limit): run this sweep job as a single run in
    a new Python process, into the same folder, and read back its row. The row is composed here
    first, so a process that dies without writing one (a segfault, the OOM killer) still leaves a
    `failed` row with its spec. The child is ended (SIGTERM, then SIGKILL after CHILD_GRACE_S, at
    once on a second signal) when this process is interrupted, or when it runs past `timeout_s`:
    then the row is `failed`, "timed out after N s", with what the child had measured."""
    from .job import Interrupted, base_row, environment, make_room, settle_from_resume, write_row

    out_dir.mkdir(parents=True, exist_ok=True)
    job = {**job, "isolated": True, **({"timeout_s": timeout_s} if timeout_s else {})}
    row = base_row(spec, choices, overrides, job)
    if (settled := settle_from_resume(spec, out_dir, row)) is not None:
        return settled  # nothing to measure: no process to start
    make_room(out_dir, row["spec_key"])  # the child's row, or none: never an earlier sweep's
    command = [sys.executable, "-m", "sdbuild", *overrides, "isolate=false", f"hydra.run.dir={out_dir}"]
    log_path = out_dir / results.PROCESS_LOG
    interrupted = timed_out = None
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            returncode = child.wait(timeout_s or None)
        except subprocess.TimeoutExpired:
            timed_out = timeout_s
            log.warning("job %s ran past run.timeout_s=%g s: ending its process %d", job.get("num"), timeout_s, child.pid)
            returncode, interrupted = end_child(child)
        except KeyboardInterrupt as exc:
            interrupted = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
            returncode, _ = end_child(child)  # the child writes its own interrupted row
    result = out_dir / results.RESULT_FILE
    written = results.load_row(result) if result.is_file() else None
    if written is not None and written["status"] != Status.unreadable.value:
        row = written
        row["job"] = {**(row.get("job") or {}), **job}
    else:
        tail = log_path.read_text(errors="replace").strip()[-300:]
        why = ("was interrupted" if interrupted else f"ran past run.timeout_s={timed_out:g} s" if timed_out
               else f"exited with code {returncode}")
        row.update(status=Status.failed.value,
                   error=f"the job's process {why} before writing a result (last output: {tail!r}); see "
                         f"{results.PROCESS_LOG}" + (f"; its row was unreadable: {written['error']}" if written else ""),
                   env=environment(None), job=job)
    if timed_out:
        row["job"].pop("interrupted", None)  # the child's word for the SIGTERM that ended it
        row.update(status=Status.failed.value,
                   error=f"timed out after {timed_out:g} s (run.timeout_s): the job's process was ended"
                         + (f"; its own account: {row['error']}" if row.get("error") and written else ""))
        row["job"]["timed_out"] = True
    if interrupted:
        row["job"]["interrupted"] = interrupted
    write_row(out_dir, row)
    if interrupted:
        raise Interrupted(interrupted)
    return row


def _die_with_parent() -> None:
    """In a job's child process, before it starts sdbuild: ask Linux for a SIGTERM when the sweep's
    process dies, also by SIGKILL, so that no orphaned job runs on beside the next sweep."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the child outlives a killed parent, as before
        pass


def end_child(child: subprocess.Popen, grace_s: Optional[float] = None) -> tuple[int, Optional[str]]:
    """End a job's child process: SIGTERM (it writes its own interrupted row), then SIGKILL after
    `grace_s` (default CHILD_GRACE_S) if it still runs (stuck in native code, SIGTERM blocked), or
    at once on a SIGTERM/SIGINT to this process meanwhile. Returns its exit code and the name of
    that signal (None: none came)."""
    from .job import Interrupted

    grace_s = CHILD_GRACE_S if grace_s is None else grace_s
    signame = None
    child.terminate()
    try:
        return child.wait(grace_s), None
    except subprocess.TimeoutExpired:
        log.warning("job process %d did not end within %g s of SIGTERM: killing it", child.pid, grace_s)
    except KeyboardInterrupt as exc:  # another signal: no more waiting
        signame = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
    child.kill()
    return child.wait(), signame


def sweep_timeout(spec: Spec) -> Optional[float]:
    """The time limit of a sweep job in seconds (None: none): `run.timeout_s` when set (0: none),
    else SWEEP_TIMEOUT_S where jobs run in the sweep's own process (the basic launcher); launchers
    that give each job a process and a limit of their own (submitit's timeout_min) get none."""
    import math

    from .hardware import launcher

    limit = spec.run.timeout_s
    if limit is not None:  # 0, and a value validation refuses (negative, nan: an unsupported row), run in-process
        return limit if math.isfinite(limit) and limit > 0 else None
    return SWEEP_TIMEOUT_S if launcher() == "basic" else None


def exit_code(row: Dict[str, Any], multirun: bool) -> int:
    """A single run's exit status: 0 ok, 2 unsupported (a user mistake), 1 otherwise. A sweep job's
    outcome is in its row, never in the sweep's exit status."""
    if multirun or row["status"] == Status.ok.value:
        return 0
    return 2 if row["status"] == Status.unsupported.value else 1


def run_from_hydra(cfg: DictConfig) -> Dict[str, Any]:
    """Run the job Hydra composed and return its row."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .job import run_job

    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices[g] for g in GROUPS if hc.runtime.choices.get(g)}
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = {"num": hc.job.num if multirun else None, "output_dir": str(out_dir)}
    spec = to_spec(cfg)
    overrides = list(hc.overrides.task)
    timeout_s = sweep_timeout(spec) if multirun else None
    with interrupts_as_exceptions():
        try:
            if multirun and (spec.isolate or timeout_s):
                row = run_in_fresh_process(spec, overrides, out_dir, choices, job, timeout_s=timeout_s)
            else:
                row = run_job(spec, out_dir, choices, overrides, job=job, show_progress=sys.stderr.isatty(),
                              reuse_weights=multirun, shared_process=multirun)
        except Exception as exc:  # never an exception for Hydra: it would cost the sweep its report
            from .job import base_row, environment, write_row

            log.exception("job %s ended in an error outside its own handling", job.get("num"))
            row = base_row(spec, choices, overrides, job)
            row.update(status=Status.failed.value, error=f"{type(exc).__name__}: {exc}", env=environment(None))
            write_row(out_dir, row)
    if multirun or row["status"] == Status.ok.value:  # a single run's refusal is said once, on stderr, below
        print(summary_line(row), flush=True)
    if not multirun:
        if row["status"] == Status.ok.value:
            print(f"result: {out_dir / results.RESULT_FILE}", flush=True)
        else:  # the refusal first, then where its row is: no `result:` line that reads like success
            print(f"sdbuild: {row['status']}:\n{row['error']}\n"
                  f"(its {row['status']} row is recorded in {out_dir / results.RESULT_FILE})",
                  file=sys.stderr, flush=True)
    return row
