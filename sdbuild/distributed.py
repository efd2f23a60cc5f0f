"""A job whose `parallel.world_size` is N > 1 runs as N ranks, started by torch's elastic launcher.

    job process (run_job)  --Popen, own session-->  launcher process (`python -m sdbuild.distributed`)
                                                      elastic_launch(LaunchConfig(nproc_per_node=N))
                                                        rank 0 .. N-1: `rank_main`

- The launcher is `torch.distributed.launcher.api.elastic_launch`, what `torchrun --standalone` runs:
  a c10d rendezvous on localhost, no restarts (a failed rank fails the job). Process group: nccl on
  CUDA (rank i on GPU i), gloo on CPU (each rank `run.threads` torch threads, by default this
  machine's cores divided by N: what each rank got is in the row).
- Every rank builds the same pipeline (sdbuild/levers/parallel.py applies diffusers' parallelism on
  it) and makes the same calls: warmup and timed calls alike begin with a barrier, and the timed
  call ends with the device synchronized (sdbuild.measure.timed_call), so call i of every rank is
  the same collective call. Each rank reports its own peak memory and latencies.
- Only the job process writes the row, from rank 0's measurement (its image, its latencies) and
  every rank's facts (`parallel` in the row). A rank that fails ends the job: the launcher stops
  the others, and the row is `failed` with every rank's error. A rank that hangs: each collective
  times out after the job's limit (init_process_group's timeout), and the job process ends the whole
  launcher session (SIGTERM, then SIGKILL) when `run.timeout_s` (default PARALLEL_TIMEOUT_S) passes,
  so no process is left behind.
- Fidelity to degree 1 (`parallel.fidelity` in the row): after the timed calls and a last barrier the
  other ranks are done; rank 0 releases its parallel pipeline, builds the same spec at parallel=none
  and calls it once, and compares the two float images (sdbuild.fidelity). It costs one more build and
  call in rank 0, outside the timed calls (in the job's wall time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger("sdbuild")

RANKS_DIR = "ranks"  # inside the job folder: the request, each rank's log, the launcher's answer
LOGS_GLOB = "logs/*/attempt_0/*"  # inside ranks/: torch elastic's folder per rank (stdout/stderr.log, error.json)
PARALLEL_TIMEOUT_S = 3600.0  # a parallel single run without run.timeout_s: how long before a hang is ended
END_GRACE_S = 10.0  # SIGTERM to SIGKILL, for the launcher's session


class RankFailure(RuntimeError):
    """One or more ranks failed (or the launch timed out): `ranks` holds each rank's error."""

    def __init__(self, message: str, ranks: Dict[str, Any]):
        super().__init__(message)
        self.ranks = ranks


def comm_backend(spec, device: str) -> str:
    from .spec import CommBackend

    if spec.parallel.backend is not CommBackend.auto:
        return spec.parallel.backend.value
    return "nccl" if device == "cuda" else "gloo"


def rank_threads(spec) -> int:
    """torch threads per CPU rank: run.threads, else this machine's cores shared out evenly (at least 1)."""
    from .spec import thread_count

    return thread_count(spec.run) or max(1, (os.cpu_count() or 1) // spec.parallel.world_size)


def timeout_of(spec) -> float:
    limit = spec.run.timeout_s
    return limit if limit is not None and math.isfinite(limit) and limit > 0 else PARALLEL_TIMEOUT_S


def collective_timeout_of(spec) -> float:
    """How long a rank's collective waits for the others (init_process_group's timeout):
    parallel.collective_timeout_s, else the job's limit (then the job's end of its ranks comes first)."""
    return spec.parallel.collective_timeout_s or timeout_of(spec)


# ------------------------------------------------------------------------------------------------
# In the job process


def launch(spec, device: str, out_dir: Path, label: str) -> Dict[str, Any]:
    """Run the job's N ranks and return (Measurement, BuildInfo, parallel record) of rank 0, with
    every rank's facts; raises RankFailure naming each rank's error."""
    from .models import ensure_model
    from .spec import spec_to_dict

    if (task := slurm_task()) is not None:  # one SLURM task per rank: this task is rank 0
        return run_as_task(spec, device, out_dir, label, task)
    ensure_model(spec.model, spec.cache_dir)  # once, here: else every rank would wait on the cache lock
    ranks = Path(out_dir) / RANKS_DIR
    ranks.mkdir(parents=True, exist_ok=True)
    for stale in ("answer.json", "images.npy"):
        (ranks / stale).unlink(missing_ok=True)
    for stale in (ranks / PROGRESS_DIR).glob("*"):  # an earlier run's ranks: not this run's progress
        stale.unlink(missing_ok=True)
    request = ranks / "request.json"
    limit = timeout_of(spec)
    request.write_text(json.dumps({"spec": spec_to_dict(spec), "device": device, "label": label, "timeout_s": limit,
                                   "collective_timeout_s": collective_timeout_of(spec)}))
    from .hardware import die_with_parent

    log.info("%s: %d ranks (%s) started by torch's elastic launcher", label or "parallel", spec.parallel.world_size,
             comm_backend(spec, device))
    with open(ranks / "launcher.log", "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "sdbuild.distributed", str(request)], stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        timed_out, hung = False, {}
        try:
            child.wait(limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            hung = hang_report(ranks, spec.parallel.world_size)  # while the ranks are still there to be looked at
            log.warning("parallel job ran past %g s: ending its ranks (%s)", limit,
                        "; ".join(f"rank {r}: {why}" for r, why in hung.items()))
        finally:
            end_session(child)  # also on success: whatever the launcher left in its session goes
    answer_path = ranks / "answer.json"
    answer = json.loads(answer_path.read_text()) if answer_path.is_file() else None
    if timed_out or answer is None or answer.get("failures"):
        # Whichever came first, the job's limit (the hang report) or a rank's own end (a collective that timed
        # out, an exception: torch elastic's error file, the launcher's failures), every rank's word is kept.
        ranks_said = _with_progress(_merged(hung, (answer or {}).get("failures") or {}, _error_files(ranks)), ranks)
        for rank_log in sorted((ranks / "logs").glob("**/stderr.log")) if not ranks_said else ():
            ranks_said[rank_log.parent.name] = _tail(rank_log)
        head = (f"timed out after {limit:g} s (run.timeout_s): the ranks were ended" if timed_out
                else "a rank failed" if answer else f"the launcher exited with code {child.returncode} before answering "
                f"(last output: {_tail(ranks / 'launcher.log')!r})")
        said = "; ".join(f"rank {r}: {why}" for r, why in sorted(ranks_said.items()))
        raise RankFailure(f"parallel job ({spec.parallel.world_size} ranks): {head}" + (f"; {said}" if said else ""),
                          ranks_said)
    return answer


def _merged(*sources: Dict[str, str]) -> Dict[str, str]:
    """Rank -> what each source said of it, joined (a rank's own error first, then the hang report)."""
    out: Dict[str, list] = {}
    for source in reversed(sources):
        for rank, said in source.items():
            if said and said not in out.setdefault(str(rank), []):
                out[str(rank)].append(said)
    return {rank: "; ".join(said) for rank, said in out.items()}


def _error_files(ranks_dir: Path) -> Dict[str, str]:
    """Rank -> the exception its `record` wrote to torch elastic's error file (attempt_0/<rank>/error.json):
    read when the job's limit ended the launcher before it could answer."""
    found = {}
    for path in sorted(Path(ranks_dir).glob(f"{LOGS_GLOB}/error.json")):
        try:
            message = json.loads(path.read_text()).get("message")
        except (OSError, ValueError, AttributeError):
            continue
        text = str(message.get("message") if isinstance(message, dict) else message or "").strip()
        if text:
            found[path.parent.name] = text.splitlines()[0][:500]
    return found


def _with_progress(said: Dict[str, str], ranks_dir: Path) -> Dict[str, str]:
    """Each rank's error with where its progress file last had it (when the hang report does not say already)."""
    for rank, where in rank_progress(ranks_dir).items():
        if rank in said and "no progress for" not in said[rank]:
            said[rank] += f"; it was last {where['at']}"
    return said


def end_session(child: subprocess.Popen) -> None:
    """End the launcher and every process of its session (the ranks): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, END_GRACE_S), (signal.SIGKILL, END_GRACE_S)):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _session_alive(child.pid):
            time.sleep(0.1)
            child.poll()
        if not _session_alive(child.pid):
            break
    child.wait()


def _session_alive(sid: int) -> bool:
    """Whether any process of session `sid` is still running (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            return True
    return False


def _tail(path: Path, chars: int = 400) -> str:
    try:
        return " ".join(path.read_text(errors="replace").strip()[-chars:].split())
    except OSError:
        return "(no log)"


def fields_from(answer: Dict[str, Any], out_dir: Path):
    """Rank 0's Measurement and BuildInfo, rebuilt from the launcher's answer (images from images.npy)."""
    import numpy as np

    from .builder import BuildInfo
    from .measure import Measurement

    zero = answer["ranks"]["0"]
    m = Measurement(**zero["measurement"])
    images = Path(out_dir) / RANKS_DIR / "images.npy"
    m.images = np.load(images, allow_pickle=False) if images.is_file() else None
    return m, BuildInfo(**zero["info"])


def parallel_record(spec, device: str, answer: Dict[str, Any]) -> Dict[str, Any]:
    """The row's `parallel` field: world size, backend, mesh and every rank's facts."""
    ranks = [answer["ranks"][r]["facts"] for r in sorted(answer["ranks"], key=int)]
    return {"world_size": spec.parallel.world_size, "method": spec.parallel.method.name,
            "backend": comm_backend(spec, device), "mesh": answer["ranks"]["0"]["info"].get("parallel"),
            "launcher": answer.get("launcher", "torch.distributed.launcher.api.elastic_launch"), "ranks": ranks,
            "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in ranks],
            "fidelity": answer["ranks"]["0"].get("fidelity")}


# ------------------------------------------------------------------------------------------------
# Where each rank is: what the job names when the ranks hang


PROGRESS_DIR = "progress"  # inside ranks/: one small JSON file per rank, {"at": what it is doing, "since": time, "pid"}


class Progress:
    """This rank's progress file, rewritten (atomically) at each phase and around every call's barrier,
    outside the timed section: the job process reads them when the limit passes."""

    def __init__(self, ranks_dir: Path, rank: int):
        self.path = Path(ranks_dir) / PROGRESS_DIR / str(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.calls = 0

    def say(self, what: str) -> None:
        from .results import write_json

        write_json(self.path, {"at": what, "since": time.time(), "pid": os.getpid()})

    def barrier(self) -> None:
        """The measurement's `prepare`: the barrier before every warmup and timed call."""
        import torch.distributed as dist

        self.calls += 1
        self.say(f"waiting in the barrier before pipeline call {self.calls}")
        dist.barrier()
        self.say(f"in pipeline call {self.calls} (warmup and timed calls counted together)")


PROCESS_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible wait", "T": "stopped", "t": "stopped by a tracer",
                  "Z": "exited"}


def process_state(pid: int) -> Optional[str]:
    """The state letter of process `pid` (/proc/<pid>/stat), None when there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def rank_progress(ranks_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Rank -> its progress file ({"at", "since", "pid"}), for the ranks that wrote one."""
    seen: Dict[str, Dict[str, Any]] = {}
    for path in (Path(ranks_dir) / PROGRESS_DIR).glob("*"):
        try:
            said = json.loads(path.read_text())
            seen[path.name] = {"at": str(said["at"]), "since": float(said["since"]), "pid": int(said["pid"])}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return seen


def hang_report(ranks_dir: Path, world_size: int, now: Optional[float] = None) -> Dict[str, str]:
    """Rank -> what it was doing when the job's limit passed, for how long, and its process state
    (stopped, sleeping, running...). Read before the session is ended."""
    now = time.time() if now is None else now
    seen = rank_progress(ranks_dir)
    report: Dict[str, str] = {}
    for rank in map(str, range(world_size)):
        if rank not in seen:
            report[rank] = "no progress file: not started, or still importing"
            continue
        said = seen[rank]
        state = process_state(said["pid"])
        process = f"process {said['pid']} {PROCESS_STATES.get(state, state)}" if state else "its process had exited"
        report[rank] = f"no progress for {now - said['since']:.0f} s, {said['at']} ({process})"
    return report


# ------------------------------------------------------------------------------------------------
# In each rank


def rank_main(request_path: str) -> Dict[str, Any]:
    """One rank: join the process group, build, measure with a barrier before each call, report."""
    import datetime

    import numpy as np
    import torch
    import torch.distributed as dist

    from .builder import build_pipeline
    from .measure import Candidate, apply_threads, measure_group
    from .run_inputs import call_kwargs, pipeline_call
    from .spec import repeat_count, to_spec

    request = json.loads(Path(request_path).read_text())
    spec, device = to_spec(request["spec"]), request["device"]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    threads = apply_threads((request.get("threads") or rank_threads(spec)) if device == "cpu" else None)
    progress = Progress(Path(request_path).parent, rank)
    progress.say("joining the process group")
    wait = request.get("collective_timeout_s") or request["timeout_s"]
    dist.init_process_group(comm_backend(spec, device), timeout=datetime.timedelta(seconds=wait))
    try:
        progress.say("building the pipeline")
        pipe, info = build_pipeline(spec, device)
        call = pipeline_call(spec, pipe)
        group = measure_group([Candidate(call, lambda: call_kwargs(spec, pipe, device), request["label"],
                                         prepare=progress.barrier, batch_size=spec.run.batch_size)],
                              device, spec.run.warmup, repeat_count(spec.run), show_progress=False,
                              max_warmup=spec.run.max_warmup, interval_target=spec.run.interval_target,
                              max_measure_s=spec.run.max_measure_s)
        m = group.measurements[0]
        if rank == 0 and m.images is not None:
            np.save(Path(request_path).parent / "images.npy", np.asarray(m.images), allow_pickle=False)
        measurement = {k: v for k, v in asdict(m).items() if k != "images"}
        facts = {"rank": rank, "local_rank": local_rank, "pid": os.getpid(), "device": device if device == "cpu"
                 else f"cuda:{local_rank}", "threads": threads, "peak_memory_mb": m.peak_memory_mb,
                 "latency_median_s": float(np.median(m.runs_s)) if m.runs_s else None}
        answer = {"measurement": measurement, "info": asdict(info), "facts": facts}
        progress.say("waiting in the barrier after the last call")
        dist.barrier()  # every rank's calls are done: from here rank 0 works alone
        if rank == 0 and m.images is not None:
            del group, call, pipe  # the parallel pipeline goes before the degree-1 one is built
            progress.say("rendering the degree-1 image (fidelity)")
            answer["fidelity"] = degree_one_fidelity(spec, device, np.asarray(m.images))
        progress.say("done")
        return answer
    finally:
        dist.destroy_process_group()


# Fidelity to degree 1, measured (tests/test_parallel.py): tiny Flux 64x64, fp32, 2 Ulysses ranks on gloo vs one
# process: max abs diff 1.49e-6 (pixels in [0, 1]; the attention sums in another order across ranks). The
# tolerance a parallel image is held to, per precision; none measured for half precision or TF32 (on CUDA the
# ranks' kernels and reduction orders differ more: the row gives the figures without a verdict).
FIDELITY_TOLERANCE = {"fp32": 1e-4}
FIDELITY_REFERENCE = ("the same spec at degree 1 (parallel=none), built and called once in rank 0 after the timed "
                      "calls and after the parallel pipeline was released")


def tolerance_of(spec):
    """The max abs diff a parallel image of `spec` is held to (None: no tolerance measured for its precision)."""
    p = spec.precision
    plain = p.vae_dtype in (None, p.dtype) and not p.tf32
    return FIDELITY_TOLERANCE.get(p.dtype.name) if plain else None


def degree_one_fidelity(spec, device: str, parallel_images) -> Dict[str, Any]:
    """Rank 0, after the timed calls: the same spec at degree 1 built and called once in this process,
    its image compared with the parallel one (sdbuild.fidelity, float pixels in [0, 1], peak 1). A failure
    here (e.g. a model that fits one device only when sharded) is recorded, never fails the job."""
    import dataclasses
    import gc

    import numpy as np
    import torch

    from .builder import build_pipeline
    from .fidelity import compare
    from .run_inputs import call_kwargs, pipeline_call
    from .spec import ParallelSpec

    started = time.perf_counter()
    record: Dict[str, Any] = {"reference": FIDELITY_REFERENCE, "dtype": spec.precision.dtype.name,
                              "tolerance": tolerance_of(spec)}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        single = dataclasses.replace(spec, parallel=ParallelSpec())
        pipe, _ = build_pipeline(single, device)
        images = np.asarray(pipeline_call(single, pipe)(**call_kwargs(single, pipe, device)).images)
        del pipe
        measured = [compare(a, b, peak=1.0) for a, b in zip(parallel_images.astype(np.float64), images)]
        record.update(psnr_db=min(f.psnr_db for f in measured), ssim=min(f.ssim for f in measured),
                      max_abs_diff=max(f.max_abs_diff for f in measured), images=len(measured))
        record["within_tolerance"] = None if record["tolerance"] is None else record["max_abs_diff"] <= record["tolerance"]
    except Exception as exc:  # noqa: BLE001 - recorded in the row: the parallel measurement stands
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    record["seconds"] = time.perf_counter() - started
    return record


def rank_entry(request_path: str) -> Dict[str, Any]:
    """What the launcher starts in each rank: `rank_main` under torch elastic's `record`, which writes
    the rank's exception to its error file (the launcher reads it back as that rank's error)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(rank_main)(request_path)


def main(request_path: str) -> int:
    """The launcher process: elastic_launch the ranks, write their answer (or every rank's error)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .results import write_json
    from .spec import to_spec

    ranks_dir = Path(request_path).parent
    request = json.loads(Path(request_path).read_text())
    spec = to_spec(request["spec"])
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=spec.parallel.world_size,
                          run_id=f"sdbuild-{os.getpid()}", rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          max_restarts=0, monitor_interval=0.2, start_method="spawn",
                          logs_specs=DefaultLogsSpecs(log_dir=str(ranks_dir / "logs"), redirects=Std.ALL))
    try:
        returned = elastic_launch(config, rank_entry)(request_path)
    except ChildFailedError as exc:
        failures = {str(rank): _failure_text(f) for rank, f in exc.failures.items()}
        for rank_log in sorted((ranks_dir / "logs").glob("**/attempt_0/*/stderr.log")):
            failures.setdefault(rank_log.parent.name, "stopped by the launcher after another rank failed; "
                                f"its last output: {_tail(rank_log, 200)!r}")
        write_json(ranks_dir / "answer.json", {"failures": failures})
        return 1
    write_json(ranks_dir / "answer.json", {"ranks": {str(r): v for r, v in returned.items()}})
    return 0


def _failure_text(failure) -> str:
    """A rank's error from torch elastic's ProcessFailure: the exception `record` wrote to its error
    file (its first line), else the signal that killed it or its exit code."""
    message = failure.message
    if isinstance(message, dict):  # the error file's {"message": "ZeroDivisionError: ...", "extraInfo": {...}}
        message = str(message.get("message") or json.dumps(message))
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"killed by {failure.signal_name()} (exit code {failure.exitcode})"
    if not message or message.startswith("To enable traceback"):
        return f"exited with code {failure.exitcode}"
    return message.strip().splitlines()[0][:500]


# ------------------------------------------------------------------------------------------------
# Under SLURM, one submitit task per rank (hydra/launcher=slurm_gpu_parallel: tasks_per_node=N)

TASKS_DIR = "tasks"  # inside ranks/: <SLURM job id>.<restart>/<rank>.json, each task's outcome ({"answer"}/{"error"})
TASKS_LAUNCHER = "submitit SLURM tasks (one per rank, rank environment from submitit.JobEnvironment)"
GATHER_S = 60.0  # rank 0, its own rank done: how long it waits for the other tasks' outcomes


@dataclass(frozen=True)
class TaskRank:
    """The rank a submitit SLURM task is, as submitit tells it."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    job_id: str
    attempt: str = "0"  # SLURM_RESTART_COUNT: a requeued job (same id) must not read its last attempt's outcomes


def slurm_task() -> Optional[TaskRank]:
    """This process's rank when submitit's SLURM executor started it as one of a job's N > 1 tasks
    (`hydra.launcher.tasks_per_node=N`): taken from submitit (`submitit.helpers.TorchDistributedEnvironment`
    over `JobEnvironment`: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first node of
    SLURM_JOB_NODELIST as the rendezvous host, a port drawn from the job id unless MASTER_PORT is set).
    None for a job's only task, and outside submitit's SLURM executor: there the job starts its ranks itself."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    try:
        if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            return None
    except ValueError:
        return None
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    return TaskRank(rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
                    master_addr=env.master_addr, master_port=env.master_port, job_id=submitit.JobEnvironment().job_id,
                    attempt=os.environ.get("SLURM_RESTART_COUNT") or "0")


def run_as_task(spec, device: str, out_dir: Path, label: str, task: TaskRank) -> Optional[Dict[str, Any]]:
    """One SLURM task = one rank, no elastic launcher: the rank runs in a child process of this task (its
    own session, the env:// rendezvous variables set from submitit), waited for at most the job's limit.
    Each task records its rank's outcome in ranks/tasks/<job id>/<rank>.json (the child its answer or
    exception; the task, if the child died, hung past the limit or was stopped, why). A task also ends
    its rank as soon as another rank's outcome is an error (with nccl a rank blocked in a collective
    would otherwise wait out its timeout). Rank 0 returns every rank's answer, as the launcher's answer
    (or raises RankFailure with every rank's error); the other tasks return None and write no row."""
    from .hardware import die_with_parent
    from .models import ensure_model
    from .results import write_json
    from .spec import spec_to_dict, thread_count

    ensure_model(spec.model, spec.cache_dir)  # every task: the cache's lock lets one build it, the others wait
    ranks = Path(out_dir) / RANKS_DIR
    tasks = ranks / TASKS_DIR / f"{task.job_id}.{task.attempt}"
    tasks.mkdir(parents=True, exist_ok=True)
    mine = tasks / f"{task.rank}.json"
    if task.rank == 0:
        (ranks / "images.npy").unlink(missing_ok=True)
    limit = timeout_of(spec)
    request = ranks / f"request-{task.job_id}-{task.rank}.json"
    # CPU: SLURM gave this task its own cpus_per_task cores (its affinity), not a share of the node's
    threads = thread_count(spec.run) or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    request.write_text(json.dumps({"spec": spec_to_dict(spec), "device": device, "label": label, "timeout_s": limit,
                                   "collective_timeout_s": collective_timeout_of(spec), "threads": threads}))
    env = {**os.environ, "RANK": str(task.rank), "LOCAL_RANK": str(task.local_rank),
           "WORLD_SIZE": str(task.world_size), "LOCAL_WORLD_SIZE": str(task.world_size),
           "MASTER_ADDR": task.master_addr, "MASTER_PORT": str(task.master_port)}
    log.info("%s: SLURM task %d of %d is rank %d (rendezvous %s:%d, %s)", label or "parallel", task.rank,
             task.world_size, task.rank, task.master_addr, task.master_port, comm_backend(spec, device))
    rank_log = ranks / f"task-{task.job_id}-{task.rank}.log"
    with open(rank_log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", "sdbuild.distributed", "--task", str(request), str(mine)],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                 preexec_fn=die_with_parent)
        deadline, why = time.monotonic() + limit, None
        try:
            while child.poll() is None:
                if time.monotonic() > deadline:
                    hung = hang_report(ranks, task.world_size).get(str(task.rank), "")
                    why = f"timed out after {limit:g} s (run.timeout_s): ended by its task; {hung}"
                    break
                if (failed := _failed_ranks(tasks, task.world_size, exclude=task.rank)):
                    why = f"stopped by its task after rank {failed[0]} failed"
                    break
                time.sleep(0.2)
        finally:
            end_session(child)
    outcome = _outcome(mine)
    if why or outcome is None or "answer" not in outcome:
        said = why or (outcome or {}).get("error") or (f"its process exited with code {child.returncode} before "
                                                      f"answering (last output: {_tail(rank_log, 200)!r})")
        if why or outcome is None:
            write_json(mine, {"error": said})
    if task.rank != 0:
        return None
    return _gather(tasks, ranks, task.world_size, limit)


def _outcome(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _failed_ranks(tasks: Path, world_size: int, exclude: int) -> list:
    return [r for r in range(world_size) if r != exclude and "error" in (_outcome(tasks / f"{r}.json") or {})]


def _gather(tasks: Path, ranks: Path, world_size: int, limit: float) -> Dict[str, Any]:
    """Rank 0's task: every rank's outcome, waited for at most GATHER_S; the answer, or RankFailure."""
    deadline = time.monotonic() + GATHER_S
    outcomes: Dict[str, Any] = {}
    while True:
        outcomes = {str(r): o for r in range(world_size) if (o := _outcome(tasks / f"{r}.json")) is not None}
        if len(outcomes) == world_size or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(outcomes) == world_size and all("answer" in o for o in outcomes.values()):
        return {"ranks": {r: o["answer"] for r, o in outcomes.items()}, "launcher": TASKS_LAUNCHER}
    hung = hang_report(ranks, world_size)
    errors = {r: outcomes[r].get("error", "succeeded") if r in outcomes else
              f"its task said nothing within {GATHER_S:g} s of rank 0's end; {hung[r]}"
              for r in map(str, range(world_size))}
    timed_out = any("timed out after" in e for e in errors.values())
    head = f"timed out after {limit:g} s (run.timeout_s): the ranks were ended" if timed_out else "a rank failed"
    said = "; ".join(f"rank {r}: {why}" for r, why in sorted(errors.items()))
    raise RankFailure(f"parallel job ({world_size} SLURM tasks): {head}; {said}", errors)


def task_main(request_path: str, outcome_path: str) -> int:
    """A task's rank process: `rank_main`, its answer or its exception written to `outcome_path`."""
    import traceback

    from .results import write_json

    try:
        answer = rank_main(request_path)
    except BaseException as exc:  # noqa: BLE001 - the task reads it back as this rank's error
        traceback.print_exc()
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        write_json(Path(outcome_path), {"error": text[0][:500] if text else type(exc).__name__})
        return 1
    write_json(Path(outcome_path), {"answer": answer})
    return 0


if __name__ == "__main__":
    # through the imported module, not __main__: the spawned ranks unpickle sdbuild.distributed.rank_main
    from sdbuild import distributed

    if sys.argv[1] == "--task":
        sys.exit(distributed.task_main(sys.argv[2], sys.argv[3]))
    sys.exit(distributed.main(sys.argv[1]))
