"""One job: validate -> build -> measure -> record. Whatever happens, a `result.json` row is written.

A user mistake or a combination this machine cannot run is an `unsupported` row; an error while
building or running (out of memory, a compile failure, ...) is a `failed` row with its reason
and the traceback in `error.log`; a finished run is `ok`. The row itself (fields, statuses, the
atomic write, the broken-image rule) is owned by `sdbuild.results`; this module only fills it in.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from . import results
from .errors import SpecError, problem
from .hardware import die_with_parent as _die_with_parent
from .hardware import job_facts
from .results import ERROR_LOG, IMAGE_FILE, RESULT_FILE, Status
from .spec import CompileMethod, ModelSource, Spec, spec_key, spec_to_dict

log = logging.getLogger("sdbuild")
CHILD_GRACE_S = 30  # how long an interrupted isolate=true child gets to write its own row
# run.timeout_s's default for a sweep job under the basic launcher: generous (an SDXL-sized job on a
# CPU takes most of an hour), only there to end a job that hangs instead of stalling the sweep.
SWEEP_TIMEOUT_S = 4 * 3600.0


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) while a job runs: the job ends with a `failed` row saying so."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


@functools.lru_cache(maxsize=None)  # fixed for the life of the process: read once, not once per sweep job
def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def environment(device: Optional[str]) -> Dict[str, Any]:
    """Versions, device and the global flags in force, recorded with every row."""
    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **{name: _version(name) for name in ("torch", "diffusers", "transformers", "xformers", "torchao", "hydra-core")},
        "device": device,
        "cpu": cpu_name(),
        "pid": os.getpid(),
    }
    if "torch" not in sys.modules:  # refused before anything loaded: torch was never needed, nor imported
        return env
    try:
        import torch

        from .levers.precision import global_switches

        cuda = device == "cuda"
        env.update(
            device_name=torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_name()}",
            cuda=torch.version.cuda,
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
            torch_threads=torch.get_num_threads(),
            torch_interop_threads=torch.get_num_interop_threads(),
            flags=global_switches(),
        )
    except Exception as exc:  # the row must still be written
        env["env_error"] = repr(exc)
    return env


def image_stats(images) -> Dict[str, Any]:
    """Stats of the batch that reveal a broken image (NaN, one flat colour)."""
    import numpy as np

    return {"nan": bool(np.isnan(images).any()), "min": float(np.nanmin(images)), "max": float(np.nanmax(images)),
            "mean": float(np.nanmean(images)), "std": float(np.nanstd(images))}


def save_image(images, path: Path) -> Dict[str, Any]:
    """Save the batch side by side as one PNG; return `image_stats`."""
    import numpy as np
    from PIL import Image

    stats = image_stats(images)
    pixels = (np.nan_to_num(images, nan=0.0).clip(0, 1) * 255).round().astype("uint8")
    Image.fromarray(np.concatenate(list(pixels), axis=1)).save(path)
    return stats


class ImageNotSaved(OSError):
    """The job was measured but its image could not be written (a full disk): `fields` holds the
    measurement, so the `failed` row keeps its timings."""

    def __init__(self, path: Path, exc: BaseException, fields: Dict[str, Any]) -> None:
        super().__init__(f"{path.name} could not be written ({type(exc).__name__}: {exc}): the job was measured, "
                         f"its timings are in this row")
        self.fields = fields


def release_memory() -> None:
    """Drop what a finished job left behind, so the next job in this process starts clean."""
    gc.collect()
    if "torch" not in sys.modules:  # nothing was built
        return
    try:
        import torch

        torch.compiler.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        pass


def check_resume(resume: Optional[str]) -> Optional[Path]:
    """The `resume=` folder; a SpecError naming the option when it does not exist (a typo must not
    silently re-measure everything)."""
    if not resume:
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise SpecError([problem(f"resume={resume}", "no such folder",
                                 "Give the folder of an earlier sweep (outputs/multirun/<time>), or leave resume "
                                 "unset to measure everything")])
    return path


def find_reusable(resume: Path, key: str) -> Optional[tuple[Path, Dict[str, Any]]]:
    """A validated `ok` row for the same resolved spec in an earlier sweep folder, with a sound image.
    Failed, unsupported, broken and unreadable rows are never reused: they are measured again."""
    for path in sorted(resume.glob(f"**/{RESULT_FILE}")):
        try:
            old = results.read_row(path)
        except (OSError, results.RowError):
            continue
        if old["spec_key"] == key and results.reusable(old) and not results.image_problem(old, path.parent):
            return path, old
    return None


def _reuse(found: Path, old: Dict[str, Any], out_dir: Path, row: Dict[str, Any]) -> Dict[str, Any]:
    """The earlier measurement as this job's row (its own env and timings untouched)."""
    in_place = found.parent.resolve() == out_dir.resolve()  # resume= the sweep folder itself
    if not in_place:
        make_room(out_dir, row["spec_key"])
        if old["image"]:
            shutil.copy2(found.parent / old["image"], out_dir / IMAGE_FILE)
            old["image"] = IMAGE_FILE
    old.update(choices=row["choices"], overrides=row["overrides"], job={**(old.get("job") or {}), **row["job"]},
               reused_from=old.get("reused_from") or str(found))
    return old


def settle_from_resume(spec: Spec, out_dir: Path, row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The row written without measuring, if any: the earlier measurement `resume=` points at, or an
    `unsupported` row when that folder does not exist. None: the job must run."""
    try:
        resume = check_resume(spec.resume)
    except SpecError as exc:
        make_room(out_dir, row["spec_key"])
        row.update(status=Status.unsupported.value, error=str(exc), env=environment(None))
        return write_row(out_dir, row)
    if resume and (found := find_reusable(resume, row["spec_key"])):
        log.info("reusing %s (already measured in %s)", " ".join(row["overrides"]), found[0].parent)
        return write_row(out_dir, _reuse(*found, out_dir, row))
    return None


def base_row(spec: Spec, choices: Dict[str, str], overrides: list[str], job: Dict[str, Any] | None) -> Dict[str, Any]:
    """A `failed` row that already carries the job's spec: whatever happens next, the row says what
    was asked for (composed in the parent for isolate=true, so a crashed child still has it)."""
    spec_dict = spec_to_dict(spec)
    return results.new_row(status=Status.failed.value, choices=dict(choices), preset=spec.preset,
                           preset_order=spec.preset_order, overrides=list(overrides), spec_key=spec_key(spec_dict),
                           spec=spec_dict, job={**(job or {}), **job_facts()})


def make_room(out_dir: Path, key: str) -> None:
    """`results.make_room`, saying where an earlier row was moved."""
    if (moved := results.make_room(out_dir, key)) is not None:
        log.warning("%s held the row of another spec or run: moved to %s (resume= still finds it)", out_dir, moved)


def write_row(out_dir: Path, row: Dict[str, Any]) -> Dict[str, Any]:
    """Write the row; a row that fails validation (a bug) is written as `failed`, saying why. A row
    the folder cannot take (a full disk, a folder in the way) becomes a `failed` row kept in memory
    (`job.unwritten`): the task returns it, the sweep's report lists it, and the reason is logged."""
    try:
        try:
            results.write_row(out_dir, row)
        except results.RowError as exc:
            row.update(status=Status.failed.value, latency_s=None,
                       error=f"internal error: the row failed validation ({exc})")
            results.write_row(out_dir, row)
    except OSError as exc:
        keep_unwritten(out_dir, row, exc)
    return row


def keep_unwritten(out_dir: Path, row: Dict[str, Any], exc: BaseException) -> Dict[str, Any]:
    """Mark `row` as one that could not be recorded in `out_dir`: `failed`, its measurement (if
    any) kept, the reason in `error` and `job.unwritten`, and said on the log at once."""
    why = f"{type(exc).__name__}: {exc}"
    if (row.get("job") or {}).get("unwritten"):  # said already (a job's process that could not write it)
        log.error("job %s: %s", row["job"].get("num"), row["error"])
        return row
    measured = row.get("status") in (Status.ok.value, Status.broken.value)
    kept = (bool((row.get("latency_s") or {}).get("runs")) and not measured  # a failed row's finished runs
            and "in this row" not in (row.get("error") or ""))  # unless its error says so already
    row["error"] = (f"could not record the job in {out_dir} ({why})"
                    + ("; it was measured: its timings are in this row" if measured else "")
                    + ("; the timed runs that finished are in this row" if kept else "")
                    + (f"; before that: {row['error']}" if row.get("error") and not measured else ""))
    row["status"] = Status.failed.value
    row["job"] = {**(row.get("job") or {}), "unwritten": why}
    log.error("job %s: %s", row["job"].get("num"), row["error"])
    return row


# After a CUDA error that poisons this process (sdbuild.measure.fatal_cuda_error), every later job
# runs in a fresh process, as isolate=true does.
_PROCESS = {"cuda_poisoned": False}


def run_job(spec: Spec, out_dir: Path, choices: Dict[str, str], overrides: list[str],
            job: Dict[str, Any] | None = None, show_progress: bool = True, reuse_weights: bool = False,
            shared_process: bool = False) -> Dict[str, Any]:
    """Build, run and measure `spec`; write `out_dir/result.json` and return the row.

    `shared_process`: this process ran other jobs before (an in-process sweep), so its CPU peak
    memory is marked as such. An Interrupted (SIGTERM/SIGINT) ends the job with a `failed` row
    (keeping the timed runs that finished) and is raised again. Any other error, also one while
    recording (a full disk), ends in a `failed` row, never in an exception: returned, and written
    where the folder can take it."""
    row = base_row(spec, choices, overrides, job)
    try:
        return _run_job(spec, out_dir, row, overrides, show_progress, reuse_weights, shared_process)
    except Exception as exc:  # recording failed (the job's own errors are rows already)
        return keep_unwritten(out_dir, row, exc)


def _run_job(spec: Spec, out_dir: Path, row: Dict[str, Any], overrides: list[str], show_progress: bool,
             reuse_weights: bool, shared_process: bool) -> Dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    label = " ".join(f"{k}={v}" for k, v in results.parse_overrides(overrides).items())
    if (settled := settle_from_resume(spec, out_dir, row)) is not None:
        return settled
    if _PROCESS["cuda_poisoned"]:
        log.warning("an earlier job hit a fatal CUDA error: running %s in a fresh process", label)
        return run_in_fresh_process(spec, overrides, out_dir, row["choices"], row["job"])
    make_room(out_dir, row["spec_key"])  # a row found here later can only be this job's
    load_before = results.machine_load()
    started = time.perf_counter()
    device = None
    partial = _Partial()
    try:
        from .validate import validate

        device = validate(spec)
        row.update(_build_and_measure(spec, device, out_dir, label, show_progress, reuse_weights, partial))
        row.update(status=Status.ok.value, error=None)
        if (broken := results.broken_image(row["image_stats"])):
            row.update(status=Status.broken.value, error=broken)
    except SpecError as exc:
        row.update(status=Status.unsupported.value, error=str(exc))
    except KeyboardInterrupt as exc:
        signame = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
        row.update(status=Status.failed.value, latency_s=None,
                   error=f"interrupted ({signame}) before the measurement finished" + partial.said(spec))
        row.update(partial.fields())
        row["job"]["interrupted"] = signame
        exc.row = row  # completed below (env, wall time, written): a job's process sends it back
        raise
    except ImageNotSaved as exc:
        row.update(exc.fields)
        row.update(status=Status.failed.value, error=str(exc))
    except Exception as exc:  # a failure after some timed calls keeps them, as an interrupt does
        row.update(status=Status.failed.value, latency_s=None, error=_failure_reason(exc) + partial.said(spec))
        row.update(partial.fields())
        if (rank_errors := getattr(exc, "ranks", None)) is not None:  # sdbuild.distributed.RankFailure
            row["parallel"] = {"world_size": spec.parallel.world_size, "errors": rank_errors}
        try:
            (out_dir / ERROR_LOG).write_text(traceback.format_exc())
        except OSError as log_exc:
            row["error"] += f" (the traceback could not be written: {log_exc})"
        from .measure import fatal_cuda_error

        row["fatal_cuda_error"] = fatal_cuda_error(exc)
        _PROCESS["cuda_poisoned"] |= row["fatal_cuda_error"]
    finally:
        row["env"] = environment(device)
        if ranks := (row.get("parallel") or {}).get("ranks"):  # the ranks computed, not this process
            row["env"].update(torch_threads=ranks[0]["threads"]["torch_threads"], torch_threads_of="each rank")
        row["job"]["wall_s"] = time.perf_counter() - started
        during = partial.measurement.load_during if partial.measurement is not None else None
        row["machine_load"] = results.load_record(load_before, results.machine_load(), during)
        if row["peak_memory_mb"] is not None:
            row["peak_memory_scope"] = results.memory_scope(device, isolated_process=not shared_process)
        write_row(out_dir, row)
        release_memory()
    return row


def _failure_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if "out of memory" in text.lower():
        return "out of memory: " + text.splitlines()[0]
    return text.splitlines()[0][:500] + " (traceback in error.log)"


CACHE_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss")


def inductor_counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: counters["inductor"][name] for name in CACHE_COUNTERS}


def compile_cache_stats(spec: Spec, before: Dict[str, int]) -> Optional[Dict[str, Any]]:
    """Inductor's FX-graph cache hits and misses during this job: did a warm start reuse kernels?
    (The counters are process-wide, so the job's share is the difference.)"""
    if spec.compile.method is not CompileMethod.inductor:
        return None
    after = inductor_counters()
    return {"dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), **{k: after[k] - before[k] for k in CACHE_COUNTERS}}


class _Partial:
    """What an interrupted job had measured: the `Measurement` that `measure` fills as it goes."""

    def __init__(self) -> None:
        self.measurement: Any = None

    def fields(self) -> Dict[str, Any]:
        """The timed runs that finished (a `failed` row keeps them: nothing measured is lost)."""
        m = self.measurement
        if m is None or not m.runs_s:
            return {}
        return dict(latency_s=results.latency_stats(m.runs_s), warmup_s=sum(m.warmup_s) if m.warmup_s else None,
                    warmup_runs_s=list(m.warmup_s), warmup_calls=m.warmup_calls)

    def said(self, spec: Spec) -> str:
        m = self.measurement
        done = len(m.runs_s) if m is not None else 0
        return f" ({done} of {spec.run.repeats} timed runs finished, kept in latency_s)" if done else ""


def pipeline_call(spec: Spec, pipe):
    """What the measurement calls (sdbuild.run_inputs.pipeline_call: under torch.inference_mode when
    run.inference_mode), here for the job's callers without importing torch with this module."""
    from .run_inputs import pipeline_call as call

    return call(spec, pipe)


def _build_and_measure(spec: Spec, device: str, out_dir: Path, label: str, show_progress: bool,
                       reuse_weights: bool, partial: Optional[_Partial] = None) -> Dict[str, Any]:
    from .builder import build_pipeline
    from .levers import lora
    from .measure import Measurement, apply_threads, measure
    from .run_inputs import call_kwargs
    from .spec import repeat_count, thread_count

    log.info("loading and building %s on %s", label or "pipeline", device)
    if spec.compile.method is CompileMethod.inductor and spec.run.warmup == 0:
        log.warning("compile=%s with run.warmup=0: torch.compile compiles on the first call, so the timed "
                    "runs include compile time. Use run.warmup=1 or more for steady-state latency.", spec.compile.name)
    if spec.parallel.world_size > 1:  # N ranks, each its own process: sdbuild.distributed
        return _launch_and_record(spec, device, out_dir, label)
    threads = apply_threads(thread_count(spec.run))  # before the build: tracing and compiling use them too
    counters_before = inductor_counters()
    pipe, info = build_pipeline(spec, device, reuse_weights=reuse_weights)
    m = Measurement()
    if partial is not None:
        partial.measurement = m
    measure(pipeline_call(spec, pipe), lambda: call_kwargs(spec, pipe, device), device, spec.run.warmup, repeat_count(spec.run),
            label=label, show_progress=show_progress, max_warmup=spec.run.max_warmup,
            interval_target=spec.run.interval_target, max_measure_s=spec.run.max_measure_s,
            batch_size=spec.run.batch_size, result=m)
    fields = measured_fields(spec, m, info, out_dir, compile_cache_stats(spec, counters_before))
    fields["adherence"] = adherence_fields(spec, pipe, device)
    if (swaps := lora.measure_swaps(pipe, spec, lambda: pipeline_call(spec, pipe)(**call_kwargs(spec, pipe, device)))):
        info.lora["swaps"] = swaps  # after the timed calls and the adherence pass: both are the first adapter's
        fields["lora"] = info.lora
    fields["measurement"] = results.measurement_record(mode=results.MeasureMode.single, repeats=spec.run.repeats,
                                                       calls=len(m.runs_s), stop=m.stop_reason, threads=threads)
    return fields


def _launch_and_record(spec: Spec, device: str, out_dir: Path, label: str) -> Dict[str, Any]:
    """A parallel job: its ranks started by torch's elastic launcher (sdbuild.distributed); the row's
    fields from rank 0's measurement and every rank's facts. A failed rank raises with each one's error."""
    from . import distributed

    answer = distributed.launch(spec, device, out_dir, label)
    m, info = distributed.fields_from(answer, out_dir)
    fields = measured_fields(spec, m, info, out_dir, None)
    fields["parallel"] = distributed.parallel_record(spec, device, answer)
    fields["measurement"] = results.measurement_record(mode=results.MeasureMode.single, repeats=spec.run.repeats,
                                                       calls=len(m.runs_s), stop=m.stop_reason,
                                                       threads=answer["ranks"]["0"]["facts"]["threads"])
    return fields


def adherence_fields(spec: Spec, pipe, device: str) -> Optional[Dict[str, Any]]:
    """The row's `adherence` (drawn models only, after the timed calls): the built pipeline draws
    fidelity.prompts x fidelity.seeds and the drawn reader (sdbuild/drawn.py) reads each image's digit
    and colours back. None for any other model (the reader knows only the drawn set) or with
    fidelity.prompts=[]."""
    import numpy as np

    from . import drawn
    from .run_inputs import adherence_calls

    if spec.model.source is not ModelSource.drawn:
        return None
    prompts = drawn.ADHERENCE_PROMPTS if spec.fidelity.prompts is None else list(spec.fidelity.prompts)
    if not prompts or not spec.fidelity.seeds:
        return None
    started = time.perf_counter()
    call, wanted, seen = pipeline_call(spec, pipe), [], []
    for chunk, kwargs in adherence_calls(spec, pipe, device, prompts, spec.fidelity.seeds):
        images = np.asarray(call(**kwargs).images)
        seen += drawn.read((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        wanted += [drawn.parse_prompt(p) for p in chunk]
    return drawn.adherence_record(wanted, seen, seconds=time.perf_counter() - started)


def measured_fields(spec: Spec, m: Any, info: Any, out_dir: Path, compile_cache: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The row's fields from a Measurement and a BuildInfo (and the image, saved into out_dir)."""
    fields: Dict[str, Any] = dict(
        latency_s=results.latency_stats(m.runs_s), warmup_s=sum(m.warmup_s), warmup_runs_s=m.warmup_s,
        load_s=info.load_s, build_s=info.build_s, peak_memory_mb=m.peak_memory_mb, compile_cache=compile_cache,
        warmup_calls=m.warmup_calls, steady=m.steady, unsteady_reason=m.unsteady_reason,
        warmup_peak_memory_mb=m.warmup_peak_memory_mb, peak_memory_reserved_mb=m.peak_memory_reserved_mb,
        steps_per_s=m.steps_per_s(), attention_kernel=info.attention_kernel, build_notes=info.notes,
        energy=m.energy(),
    )
    if info.lora is not None:
        fields["lora"] = info.lora
    if spec.run.save_image and m.images is not None:
        try:
            fields["image_stats"] = save_image(m.images, out_dir / IMAGE_FILE)
        except OSError as exc:  # nothing measured is lost: the row keeps the timings, without an image
            with contextlib.suppress(OSError):
                (out_dir / IMAGE_FILE).unlink(missing_ok=True)  # half a PNG is no image
            raise ImageNotSaved(out_dir / IMAGE_FILE, exc, {**fields, "image_stats": image_stats(m.images)}) from exc
        fields["image"] = IMAGE_FILE
    return fields


def run_in_fresh_process(spec: Spec, overrides: list[str], out_dir: Path, choices: Dict[str, str],
                         job: Dict[str, Any], timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """`isolate=true`: run this sweep job in a worker process of its own that runs only this job
    (its stdin is closed after the request; it reads no weights another job loaded, and its CPU peak
    memory is its own), and read back its row. See `run_in_worker` for the rest."""
    return _run_elsewhere(spec, overrides, out_dir, choices, job, timeout_s, fresh=True)


def run_in_worker(spec: Spec, overrides: list[str], out_dir: Path, choices: Dict[str, str],
                  job: Dict[str, Any], timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """A sweep job with a time limit (the default): run it in this process's long-lived worker
    (`sdbuild.worker`, started for the first such job), so imports and weights are paid once per
    worker, not once per job, and read back its row.

    The row is composed here first, so a worker that dies without writing one (a segfault, the OOM
    killer) still leaves a `failed` row with its spec. The worker runs in a process group of its own:
    it is ended (SIGTERM to the whole group, then SIGKILL after CHILD_GRACE_S, at once on a second
    signal) when this process is interrupted, or when the job runs past `timeout_s` (counted from the
    moment the job is handed over; a fresh worker's start-up included): then the row is `failed`,
    "timed out after N s", with what the worker had measured. A worker is replaced (the next job
    starts a fresh one) after a timeout, a crash (an exit or the end of its answers without an
    answer), an interrupt, when the next job asks for another `run.threads` (torch's inter-op
    threads can be set once per process), and when the worker retires itself after a job that left
    state a later job must not inherit (`sdbuild.worker.retire_reason`: a failed job, an Inductor or
    AOTInductor compile, changed process-wide state). Each row records `job.worker`: the worker's
    pid, `jobs_before` (how many jobs that worker ran before this one) and, where it was replaced
    after this job, `replaced_after` (why)."""
    return _run_elsewhere(spec, overrides, out_dir, choices, job, timeout_s, fresh=False)


_WORKER: Dict[str, Any] = {"current": None}  # this process's long-lived worker (a Worker), if any


class Worker:
    """One `python -m sdbuild.worker` process: its stdin takes requests, one JSON line per job; its
    answers come back one JSON line each through a pipe, read by a thread (so a long row never blocks
    the worker) into a queue; the end of the pipe (the worker gone) is queued as None."""

    def __init__(self, first_dir: Path, log_path: Path, threads: Any) -> None:
        import queue
        import threading

        self.threads = threads  # the run.threads of its first job: the only one it serves
        self.jobs = 0  # jobs handed over so far
        self.answers: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        read, write = os.pipe()
        try:
            with open(log_path, "w") as log_file:
                self.proc = subprocess.Popen(child_command(first_dir, write), stdin=subprocess.PIPE, stdout=log_file,
                                             stderr=subprocess.STDOUT, pass_fds=(write,), process_group=0,
                                             preexec_fn=_die_with_parent)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the worker holds its own copy: EOF comes when the worker's closes
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._drain, args=(read,), daemon=True)
        self._reader.start()

    def _drain(self, fd: int) -> None:
        import json

        try:
            with os.fdopen(fd, "rb") as pipe:
                for line in pipe:
                    try:
                        self.answers.put(json.loads(line))
                    except ValueError:  # half a line: a worker killed while it wrote
                        continue
        finally:
            self.answers.put(None)

    def serves(self, threads: Any) -> bool:
        """Whether this worker may run a job with `run.threads=threads` now (alive, same threads)."""
        return self.proc.poll() is None and threads == self.threads

    def hand_over(self, request: bytes, last: bool) -> None:
        """Give the worker its job (one line on its stdin); `last`: close its stdin (one job, then it
        exits). A worker that died before reading it is no error here: its end says what happened."""
        self.jobs += 1
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            if last:
                self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def answer(self, timeout_s: Optional[float]) -> Optional[Dict[str, Any]]:
        """The worker's answer to the job handed over: a dict, or None when its pipe ended without one
        (it died). TimeoutError past `timeout_s`."""
        import queue

        try:
            return self.answers.get(timeout=timeout_s or None)
        except queue.Empty:
            raise TimeoutError from None

    def leftover(self, wait_s: float = 5.0) -> Optional[Dict[str, Any]]:
        """After the worker was ended: the last answer it still sent (its interrupted row), if any."""
        self._reader.join(wait_s)  # a process it started may hold the pipe open: not forever
        last = None
        while not self.answers.empty():
            last = self.answers.get_nowait() or last
        return last

    def close(self) -> None:
        """No more jobs, and none running (it answered its last, its row is written): end it and
        whatever of its process group is left (compile workers, ranks) at once. SIGTERM: while idle it
        has no handler, so it ends without Python's slow shutdown of torch (seconds, on the path to
        the next worker or the report); SIGKILL after a few seconds for anything left."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        end_child(self.proc, grace_s=5, group=True)


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    """`sig` to the process group `child` leads (a worker's, with whatever it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def _retire_worker(worker: "Worker", background: bool = True) -> None:
    """This worker runs no more jobs: closed (in the background where nothing waits for it)."""
    if _WORKER["current"] is worker:
        _WORKER["current"] = None
    if background:
        import threading

        threading.Thread(target=worker.close, daemon=True).start()
    else:
        worker.close()


def close_worker() -> None:
    """End this process's worker, if any (the sweep ended): it finishes nothing, it was idle."""
    if (worker := _WORKER["current"]) is not None:
        _retire_worker(worker, background=False)


def _worker_for(out_dir: Path, log_path: Path, threads: Any, fresh: bool) -> tuple["Worker", Optional[str]]:
    """The worker to run the next job (a fresh one where needed), and why the previous was replaced."""
    current: Optional[Worker] = None if fresh else _WORKER["current"]
    replaced = None
    if current is not None and not current.serves(threads):
        replaced = ("the job asks for another run.threads" if current.proc.poll() is None
                    else f"the worker had exited (code {current.proc.returncode})")
        _retire_worker(current)
        current = None
    if current is None:
        current = Worker(out_dir, log_path, threads)
        if not fresh:
            _WORKER["current"] = current
            if not _WORKER.get("atexit"):  # a worker never outlives its parent (PR_SET_PDEATHSIG too)
                import atexit

                atexit.register(close_worker)
                _WORKER["atexit"] = True
    else:
        with contextlib.suppress(OSError):
            log_path.write_text("")  # the worker appends this job's output here
    return current, replaced


def _run_elsewhere(spec: Spec, overrides: list[str], out_dir: Path, choices: Dict[str, str], job: Dict[str, Any],
                   timeout_s: Optional[float], fresh: bool) -> Dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {**job, "isolated": True, **({"timeout_s": timeout_s} if timeout_s else {})}
    row = base_row(spec, choices, overrides, job)
    if (settled := settle_from_resume(spec, out_dir, row)) is not None:
        return settled  # nothing to measure: no process to start
    make_room(out_dir, row["spec_key"])  # the worker's row, or none: never an earlier sweep's
    log_path = out_dir / results.PROCESS_LOG
    worker, _ = _worker_for(out_dir, log_path, spec.run.threads, fresh)
    jobs_before = worker.jobs
    request = worker_request(row["spec"], out_dir, choices, overrides, job, log=log_path, reuse_weights=not fresh,
                             shared_process=not fresh)
    interrupted = timed_out = returncode = None
    answer: Optional[Dict[str, Any]] = None
    try:
        worker.hand_over(request, last=fresh)
        answer = worker.answer(timeout_s)
        if answer is None or fresh:  # it ended (a crash), or ends now (its one job done)
            returncode = worker.proc.wait(30)
    except TimeoutError:
        timed_out = timeout_s
        log.warning("job %s ran past run.timeout_s=%g s: ending its worker %d", job.get("num"), timeout_s, worker.pid)
        returncode, interrupted = end_child(worker.proc, group=True)
        answer = worker.leftover()
    except subprocess.TimeoutExpired:  # a worker that answered but does not exit
        returncode, _ = end_child(worker.proc, group=True)
    except KeyboardInterrupt as exc:
        interrupted = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
        returncode, _ = end_child(worker.proc, group=True)  # the worker writes its own interrupted row
        answer = answer or worker.leftover()
    retire = (answer or {}).get("retire")
    replaced_after = ("timed out" if timed_out else "interrupted" if interrupted
                      else "it exited without an answer" if answer is None and not fresh else retire)
    if fresh or replaced_after:
        _retire_worker(worker, background=not (timed_out or interrupted or answer is None))
    sent = _valid_row((answer or {}).get("row"))  # kept also when its result.json could not be written
    result = out_dir / results.RESULT_FILE
    written = sent or (results.load_row(result) if result.is_file() else None)
    if written is not None and written["status"] != Status.unreadable.value:
        row = written
        row["job"] = {**(row.get("job") or {}), **job}
    else:
        tail = log_path.read_text(errors="replace").strip()[-300:] if log_path.is_file() else ""
        why = ("was interrupted" if interrupted else f"ran past run.timeout_s={timed_out:g} s" if timed_out
               else f"exited with code {returncode}")
        row.update(status=Status.failed.value,
                   error=f"the job's process {why} before writing a result (last output: {tail!r}); see "
                         f"{results.PROCESS_LOG}" + (f"; its row was unreadable: {written['error']}" if written else ""),
                   env=environment(None), job=job)
    row["job"]["worker"] = {"pid": worker.pid, "jobs_before": jobs_before,
                            **({"replaced_after": replaced_after} if replaced_after and not fresh else {})}
    if timed_out:
        row["job"].pop("interrupted", None)  # the worker's word for the SIGTERM that ended it
        row.update(status=Status.failed.value,
                   error=f"timed out after {timed_out:g} s (run.timeout_s): the job's process was ended"
                         + (f"; its own account: {row['error']}" if row.get("error") and written else ""))
        row["job"]["timed_out"] = True
    if interrupted:
        row["job"]["interrupted"] = interrupted
        if row["status"] == Status.ok.value:  # an interrupted job's row never claims ok (its timings are kept)
            row.update(status=Status.failed.value,
                       error=f"interrupted ({interrupted}) as its process finished; its timings are in this row")
    write_row(out_dir, row)
    if interrupted:
        raise Interrupted(interrupted)
    return row


def _valid_row(row: Any) -> Optional[Dict[str, Any]]:
    """A row a worker sent, validated like any row read back (None: none, or not a valid row)."""
    if not isinstance(row, dict):
        return None
    try:
        return results.validate(row)
    except results.RowError:
        return None


def worker_request(spec_dict: Dict[str, Any], out_dir: Path, choices: Dict[str, str], overrides: list[str],
                   job: Dict[str, Any], log: Optional[Path] = None, reuse_weights: bool = False,
                   shared_process: bool = False) -> bytes:
    """One job for `sdbuild.worker`: the line this parent writes to the worker's stdin (the worker
    imports this module, so the request is made here, not there). `log`: the file the worker writes
    this job's output to; `reuse_weights`/`shared_process`: as run_job's (a long-lived worker keeps
    the loaded pipeline for the next job, and its CPU peak memory is then not this job's alone)."""
    import json

    from .results import _strict_json

    return (json.dumps(_strict_json({"spec": spec_dict, "out_dir": str(out_dir), "choices": dict(choices),
                                     "overrides": list(overrides), "job": dict(job),
                                     "log": str(log) if log else None, "reuse_weights": reuse_weights,
                                     "shared_process": shared_process})) + "\n").encode()


def child_command(out_dir: Path, rows_fd: int) -> list[str]:
    """The command of a worker: `sdbuild.worker`, which composes nothing and runs the specs it is
    handed (the first job's folder on its command line only names the process)."""
    return [sys.executable, "-m", "sdbuild.worker", str(out_dir), "--rows-fd", str(rows_fd)]


def end_child(child: subprocess.Popen, grace_s: Optional[float] = None, group: bool = False) -> tuple[int, Optional[str]]:
    """End a job's process: SIGTERM (it writes its own interrupted row), then SIGKILL after
    `grace_s` (default CHILD_GRACE_S) if it still runs (stuck in native code, SIGTERM blocked), or
    at once on a SIGTERM/SIGINT to this process meanwhile. `group`: the signals go to the process
    group `child` leads (a worker and whatever it started: compile workers, ranks), and what is left
    of the group gets SIGKILL once the child has ended. Returns its exit code and the name of that
    signal (None: none came)."""
    grace_s = CHILD_GRACE_S if grace_s is None else grace_s
    signame = None

    def send(sig: int) -> None:
        if group:
            _signal_group(child, sig)
        elif child.poll() is None:
            child.send_signal(sig)

    send(signal.SIGTERM)
    try:
        code = child.wait(grace_s)
        if group:
            send(signal.SIGKILL)
        return code, None
    except subprocess.TimeoutExpired:
        log.warning("job process %d did not end within %g s of SIGTERM: killing it", child.pid, grace_s)
    except KeyboardInterrupt as exc:  # another signal: no more waiting
        signame = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
    send(signal.SIGKILL)
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
