"""The result row: the one owner of what a job records and how it is read back.

A job writes one row, `<job folder>/result.json`. This module owns everything about it:
its fields and their types (:data:`FIELDS`), the status values (:class:`Status`), the file
names, the atomic write (:func:`write_row`), reading and validating (:func:`read_row`, which turns
anything it cannot trust into an ``unreadable`` row), the spread of the timed runs and the noise
flags (:func:`latency_stats`, :func:`noise_reasons`), the machine load around a job
(:func:`machine_load`), the broken-image rule (:func:`broken_image`, :func:`image_problem`) and
the label of a row within its sweep (:func:`labels`).

It imports neither torch, diffusers nor hydra: rows can be read anywhere.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import secrets
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

RESULT_FILE = "result.json"
IMAGE_FILE = "image.png"
ERROR_LOG = "error.log"
PROCESS_LOG = "process.log"  # isolate=true: the child process's output
PLAN_FILE = "plan.json"  # in the sweep folder: every job the sweep was asked to run
LOCK_FILE = ".sdbuild-sweep.lock"  # in the sweep folder while a sweep writes into it


class Status(str, enum.Enum):
    """What became of a job. The first four are written by jobs; the last two only by readers."""

    ok = "ok"  # measured, image fine
    broken = "broken"  # measured, but the image is NaN or one flat colour: never a speed-up
    failed = "failed"  # an error while building or running (traceback in error.log), or interrupted
    unsupported = "unsupported"  # a user mistake or a combination this machine cannot run
    unreadable = "unreadable"  # a result.json that does not parse or fails validation: never trusted
    missing = "missing"  # a planned job with no row (the sweep was killed, or is still running)


WRITTEN = (Status.ok, Status.broken, Status.failed, Status.unsupported)
COMPLETED = (Status.ok, Status.broken)  # measured: have a latency

# Honest numbers: below MIN_RUNS timed runs a spread means little; above NOISY_CV (coefficient
# of variation = stdev / mean of the timed runs) the median moves by more than most optimisations
# a sweep compares (10 %). Both make a row `noisy`; its speed-up is marked, not hidden.
MIN_RUNS = 3
NOISY_CV = 0.10
# A machine is `busy` when, before or after the job, another process was running (state R in
# /proc) or the 1-minute load average exceeded the CPU count: CPU timings (compiled code most)
# are then not those of a quiet machine.
BUSY_LOAD_PER_CPU = 1.0

LATENCY_STATS = ("median", "mean", "min", "max", "p90", "cv")

# Every field a row may hold, with its JSON type(s). Missing fields read as None; a field that is
# present with another type makes the row unreadable (a half-written or foreign file is reported,
# never half-believed). `status` and `choices` are required; completed rows need latency_s.median.
NUMBER = (int, float)
FIELDS: Dict[str, tuple] = {
    "status": (str,),
    "error": (str,),
    "choices": (dict,),  # config group -> option name, from Hydra
    "overrides": (list,),  # the job's command-line overrides ("precision=bf16", "model.path=...")
    "preset": (str,),
    "preset_order": (int,),
    "spec_key": (str,),  # identity of the resolved spec (sdbuild.spec.spec_key): what resume matches
    "spec": (dict,),  # the resolved spec, enums by name
    "latency_s": (dict,),  # {median, mean, min, max, p90, cv, runs}: seconds per full pipeline call
    "warmup_s": NUMBER,
    "warmup_runs_s": (list,),
    "load_s": NUMBER,
    "build_s": NUMBER,
    "peak_memory_mb": NUMBER,
    "peak_memory_scope": (str,),  # see MEMORY_SCOPES
    "image": (str,),
    "image_stats": (dict,),
    "compile_cache": (dict,),
    "env": (dict,),
    "job": (dict,),  # num, output_dir, wall_s, isolated, interrupted, ... (launchers add their facts)
    "machine_load": (dict,),  # {"before": {...}, "after": {...}, "busy": bool}, see machine_load()
    "reused_from": (str,),
    # Agreed with other branches (notes/ROW_CONTRACT.md), optional:
    "warmup_calls": (int,),
    "steady": (bool,),
    "unsteady_reason": (str,),
    "warmup_peak_memory_mb": NUMBER,
    "peak_memory_reserved_mb": NUMBER,
    "steps_per_s": NUMBER,
    "attention_kernel": (dict,),
    "build_notes": (list,),
    "fatal_cuda_error": (bool,),
    # How the timed calls were taken (measurement_record): mode (MeasureMode), run.repeats asked,
    # calls made and why they stopped, threads; for an interleaved group its id, members, position
    # and the reference's spec_key, and the fallback taken when memory could not hold the group.
    "measurement": (dict,),
    # The speed-up on the group's reference from paired calls (sdbuild.stats): {median, low, high,
    # n, confidence, method, reference, reference_job}; only rows measured interleaved have one.
    "paired": (dict,),
    # {joules_per_image, source, reason}: energy over the timed calls, or null with the reason.
    "energy": (dict,),
    # A job run as several ranks (parallel.world_size > 1): {world_size, backend, method, mesh, launcher,
    # ranks: [{rank, pid, threads, peak_memory_mb, latency_median_s}]}; its failure: every rank's error.
    "parallel": (dict,),
    # lora != none: {mode, adapters: [{path, sha256, scale, rank; a hub id's also hub_id, weight_name,
    # revision}], target_rank, swaps: [{adapter, path, swap_s, call_s, recompiles}]} (sdbuild/levers/lora.py)
    "lora": (dict,),
    # Drawn models only (model.source=drawn): {score, digit, colour, background, images, seconds}, the
    # share of fidelity.prompts x fidelity.seeds images the drawn reader reads as their prompt says
    # (sdbuild/drawn.py); null on every other model (no reader for them).
    "adherence": (dict,),
}
NUMERIC_FIELDS = ("warmup_s", "load_s", "build_s", "peak_memory_mb", "warmup_peak_memory_mb",
                  "peak_memory_reserved_mb", "steps_per_s")

class MeasureMode(str, enum.Enum):
    """measurement.mode: how a row's timed calls were taken, and so what it may be compared with."""

    single = "single"  # one pipeline in its job: comparable with other rows only as far as the load held still
    interleaved = "interleaved"  # round-robin with the other members of its group, in one process: paired
    pairs = "pairs"  # memory could not hold the whole group: alternated with the reference alone, in its own batch


def measurement_record(mode: MeasureMode, repeats: Any, calls: int, stop: str, threads: Optional[Dict[str, Any]] = None,
                       **group: Any) -> Dict[str, Any]:
    """The row's `measurement` field (group: group id, members, position, reference, fallback)."""
    return {"mode": mode.value, "repeats": repeats, "calls": calls, "stop": stop, "threads": threads, **group}


class MemoryScope(str, enum.Enum):
    """peak_memory_scope: what peak_memory_mb measured."""

    cuda = "cuda"  # CUDA peak allocated during the timed runs
    process = "process"  # CPU peak resident set of a process that ran only this job
    shared_process = "shared_process"  # CPU peak resident set of a sweep process that ran earlier jobs too


MEMORY_SCOPES = {
    MemoryScope.cuda: "CUDA peak allocated during the timed runs",
    MemoryScope.process: "CPU peak resident set of a process that ran only this job",
    MemoryScope.shared_process: "CPU peak resident set of a sweep process that ran earlier jobs too (includes "
                                "what they left behind; use isolate=true for sound CPU memory figures)",
}


def shared_memory(row: Dict[str, Any]) -> bool:
    """Whether the row's peak memory was measured in a process shared with earlier jobs."""
    return row.get("peak_memory_scope") == MemoryScope.shared_process.value


class RowError(ValueError):
    """A result.json that cannot be trusted; the message says why."""


# ---------------------------------------------------------------------------------------------
# Building and writing


def new_row(**fields: Any) -> Dict[str, Any]:
    """A row with every field at its empty value, then `fields`; status defaults to failed
    (a job that dies half-way must not leave anything that looks measured)."""
    row: Dict[str, Any] = {name: None for name in FIELDS}
    row.update(status=Status.failed.value, choices={}, overrides=[], job={})
    row.update(fields)
    return row


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, then rename over `path`: readers never see half a file."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open: the usual umask-based permissions, unlike mkstemp's 0600
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def write_row(folder: Path, row: Dict[str, Any]) -> Path:
    """Validate `row` (a bug writing a bad row fails here, not in a report later) and write it atomically."""
    validate(row)
    path = Path(folder) / RESULT_FILE
    write_json(path, _strict_json(row))
    return path


def _strict_json(data: Any) -> Any:
    """`data` with every non-finite float (a refused spec's `nan`, `inf`) as its text: a row file is
    standard JSON, which has no NaN (readers elsewhere would choke or silently take it as a number)."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_strict_json(v) for v in data]
    return data


SET_ASIDE_DIR = "set_aside"  # in a job folder: earlier rows found there, moved (never deleted)


def make_room(folder: Path, spec_key: Optional[str]) -> Optional[Path]:
    """Ready `folder` for a new row of the spec `spec_key`, losing no measurement: a `failed` or
    `unsupported` row of this same spec (about to be measured again) is cleared; any other row
    (another spec's, a measured one, one that cannot be read) is moved with its image and error log
    into `folder/set_aside/<its spec key>[-n]/`, where `resume=` still finds it by its spec key.
    Returns where it went (None: nothing was moved)."""
    folder = Path(folder)
    present = [folder / name for name in (RESULT_FILE, IMAGE_FILE, ERROR_LOG) if (folder / name).is_file()]
    if not (folder / RESULT_FILE).is_file():  # no row (what is not a file is left alone: the write will say)
        clear_row(folder)
        return None
    old = load_row(folder / RESULT_FILE)
    if old["status"] in (Status.failed.value, Status.unsupported.value) and old["spec_key"] == spec_key:
        clear_row(folder)
        return None
    base = folder / SET_ASIDE_DIR / (old["spec_key"] or "unreadable")
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    target.mkdir(parents=True)
    for path in present:
        os.replace(path, target / path.name)
    return target


def clear_row(folder: Path) -> None:
    """Remove what an earlier job left in `folder` (row, image, error log), so a row found there
    afterwards can only be the one this job wrote."""
    for name in (RESULT_FILE, IMAGE_FILE, ERROR_LOG):
        if (Path(folder) / name).is_file():
            (Path(folder) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading and validating


def read_row(path: Path) -> Dict[str, Any]:
    """The validated row in `path`; RowError (or OSError) when it cannot be trusted."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RowError(f"{type(exc).__name__}: {exc}") from None
    return validate(data)


def load_row(path: Path) -> Dict[str, Any]:
    """`read_row`, but a row that cannot be trusted becomes an `unreadable` row saying why."""
    try:
        return read_row(path)
    except (OSError, RowError) as exc:
        error = str(exc) if isinstance(exc, RowError) else f"{type(exc).__name__}: {exc}"
        return new_row(status=Status.unreadable.value, error=error)


def validate(data: Any) -> Dict[str, Any]:
    """Check a parsed row and return it with every field present (absent ones None).

    Raises RowError when: not an object; `status` or `choices` missing; an unknown status; a
    field of the wrong type; a completed row without a latency median; a median or mean that
    is not the median / mean of the recorded runs; numbers that are not finite.
    """
    if not isinstance(data, dict):
        raise RowError(f"expected a JSON object, got {type(data).__name__}")
    missing = [key for key in ("status", "choices") if key not in data]
    if missing:
        raise RowError(f"missing keys: {', '.join(missing)}")
    for name, kinds in FIELDS.items():
        value = data.get(name)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise RowError(f"{name} should be {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    try:
        status = Status(data["status"])
    except ValueError:
        raise RowError(f"unknown status {data['status']!r}") from None
    if status not in WRITTEN:
        raise RowError(f"status {status.value!r} is never written by a job")
    for name in NUMERIC_FIELDS:
        _finite(data.get(name), name)
    if data.get("peak_memory_scope") is not None and data["peak_memory_scope"] not in {m.value for m in MemoryScope}:
        raise RowError(f"unknown peak_memory_scope {data['peak_memory_scope']!r}")
    untrusted_fields(data)
    spec = data.get("spec") or {}
    for section in ("run", "model"):
        if spec.get(section) is not None and not isinstance(spec[section], dict):
            raise RowError(f"spec.{section} should be dict, got {type(spec[section]).__name__}")
    row = new_row(**data)
    row["latency_s"] = _latency(data.get("latency_s"), required=status in COMPLETED)
    row["image_stats"] = row["image_stats"] or {}
    row["env"] = row["env"] or {}
    row["spec"] = spec
    row["choices"] = {str(k): (None if v is None else str(v)) for k, v in data["choices"].items()}
    return row


# A row read back is untrusted input (a teammate's folder, a planted file): every field that is used
# as a path or a number is checked before use. A key is the hex `spec.spec_key` writes (it names a
# set-aside folder); an image is a file name inside the job folder (it is copied by resume=); numbers
# are finite and within what a measurement can be (statistics over 1e308 overflows).
SPEC_KEY = re.compile(r"[0-9a-f]{8,64}")
MAX_SECONDS = 1e7  # about 4 months: no call, warmup, load or job takes longer
MAX_MB = 1e9  # a petabyte
NUMBER_RANGES = {"warmup_s": MAX_SECONDS, "load_s": MAX_SECONDS, "build_s": MAX_SECONDS, "peak_memory_mb": MAX_MB,
                 "warmup_peak_memory_mb": MAX_MB, "peak_memory_reserved_mb": MAX_MB, "steps_per_s": 1e9}
MAX_COUNT = 2 ** 31


def _bounded(value: Any, name: str, high: float, low: float = 0.0, whole: bool = False) -> None:
    """RowError unless `value` is None or a finite number (an int when `whole`) between low and high."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if whole else NUMBER) or not math.isfinite(value):
        raise RowError(f"{name} should be a finite {'whole ' if whole else ''}number, got {value!r}")
    if not low <= value <= high:
        raise RowError(f"{name} is {value!r}, outside {low:g}..{high:g}")


def untrusted_fields(data: Dict[str, Any]) -> None:
    """RowError naming the first field of a read-back row that is unsafe to use as a path or number."""
    key = data.get("spec_key")
    if key is not None and not SPEC_KEY.fullmatch(key):
        raise RowError(f"spec_key {key[:80]!r} is not a spec key (hex digits)")
    image = data.get("image")
    if image is not None and (image in ("", ".", "..") or Path(image).name != image or "\\" in image):
        raise RowError(f"image {image[:200]!r} is not a file name inside the job folder")
    for name, high in NUMBER_RANGES.items():
        _bounded(data.get(name), name, high)
    _bounded(data.get("preset_order"), "preset_order", MAX_COUNT, -MAX_COUNT, whole=True)
    latency = data.get("latency_s") or {}
    for name in LATENCY_STATS:
        _bounded(latency.get(name), f"latency_s.{name}", MAX_SECONDS if name != "cv" else 1e6)
    for what, runs in (("latency_s.runs", latency.get("runs")), ("warmup_runs_s", data.get("warmup_runs_s"))):
        if runs is not None and not isinstance(runs, list):
            raise RowError(f"{what} should be a list")
        if runs is not None and len(runs) > 10 ** 6:
            raise RowError(f"{what} holds {len(runs)} values")
        for value in runs or []:
            _bounded(value, f"{what}[]", MAX_SECONDS)
    job = data.get("job") or {}
    _bounded(job.get("num"), "job.num", MAX_COUNT, whole=True)
    for name in ("wall_s", "timeout_s"):
        _bounded(job.get(name), f"job.{name}", MAX_SECONDS)
    worker = job.get("worker")  # the sweep's worker that ran it (sdbuild.job): numbers a reader may show
    if worker is not None and not isinstance(worker, dict):
        raise RowError("job.worker should be a record {pid, jobs_before, replaced_after}")
    _bounded((worker or {}).get("pid"), "job.worker.pid", 2 ** 22, whole=True)  # Linux's pid_max at most
    _bounded((worker or {}).get("jobs_before"), "job.worker.jobs_before", MAX_COUNT, whole=True)
    load = data.get("machine_load")
    during = load.get("during") if isinstance(load, dict) else None
    if during is not None and not isinstance(during, dict):
        raise RowError("machine_load.during should be a record {seconds, others_cpu, busy}")
    _bounded((during or {}).get("seconds"), "machine_load.during.seconds", MAX_SECONDS)
    _bounded((during or {}).get("others_cpu"), "machine_load.during.others_cpu", 1e6)
    adherence = data.get("adherence") or {}
    for name in ("score", "digit", "colour", "background"):
        _bounded(adherence.get(name), f"adherence.{name}", 1.0)
    _bounded(adherence.get("images"), "adherence.images", MAX_COUNT, whole=True)
    _bounded(adherence.get("seconds"), "adherence.seconds", MAX_SECONDS)
    swaps = (data.get("lora") or {}).get("swaps") if isinstance(data.get("lora"), dict) else None
    if swaps is not None and not (isinstance(swaps, list) and all(isinstance(s, dict) for s in swaps)):
        raise RowError("lora.swaps should be a list of swaps")
    for swap in swaps or []:
        _bounded(swap.get("adapter"), "lora.swaps.adapter", MAX_COUNT, whole=True)
        _bounded(swap.get("recompiles"), "lora.swaps.recompiles", MAX_COUNT, whole=True)
        for name in ("swap_s", "call_s"):
            _bounded(swap.get(name), f"lora.swaps.{name}", MAX_SECONDS)
    for name, value in (data.get("paired") or {}).items():
        if name in ("median", "low", "high", "confidence"):
            _bounded(value, f"paired.{name}", 1e6)
        elif name == "n":
            _bounded(value, "paired.n", MAX_COUNT, whole=True)


def _finite(value: Any, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, NUMBER) or not math.isfinite(value):
        raise RowError(f"{name} should be a finite number, got {value!r}")
    return float(value)


def _latency(value: Any, required: bool) -> Optional[dict]:
    """latency_s with float stats; a completed row needs a median that is the median of its runs."""
    if value is None:
        if required:
            raise RowError("missing keys: latency_s (a completed row must have its timings)")
        return None
    stats = {name: _finite(value.get(name), f"latency_s.{name}") for name in LATENCY_STATS}
    runs = value.get("runs") or []
    if not isinstance(runs, list):
        raise RowError("latency_s.runs should be a list")
    stats["runs"] = [_finite(r, "latency_s.runs[]") for r in runs]
    if required and stats["median"] is None:
        raise RowError("missing keys: latency_s.median")
    if runs and stats["median"] is not None and not math.isclose(stats["median"], statistics.median(stats["runs"])):
        raise RowError(f"latency_s.median {stats['median']!r} is not the median of latency_s.runs")
    if runs and stats["mean"] is not None and not math.isclose(stats["mean"], statistics.fmean(stats["runs"])):
        raise RowError(f"latency_s.mean {stats['mean']!r} is not the mean of latency_s.runs")
    if runs and stats["cv"] is None:
        stats["cv"] = coefficient_of_variation(stats["runs"])
    return stats


def is_completed(row: Dict[str, Any]) -> bool:
    return row["status"] in (s.value for s in COMPLETED)


def reusable(row: Dict[str, Any]) -> bool:
    """Whether `resume=` may copy this row instead of measuring: only an `ok` row that validated.
    Failed, unsupported and broken rows are measured again (the cause may be fixed by now)."""
    return row["status"] == Status.ok.value and row["latency_s"] is not None


# ---------------------------------------------------------------------------------------------
# Spread, noise, machine load


def coefficient_of_variation(runs: Sequence[float]) -> Optional[float]:
    """stdev / mean of the runs (None for fewer than 2 runs or a zero mean)."""
    if len(runs) < 2 or statistics.fmean(runs) == 0:
        return None
    return statistics.stdev(runs) / statistics.fmean(runs)


def latency_stats(runs: Sequence[float]) -> Dict[str, Any]:
    """The recorded latency: median, mean, min, max, p90 (nearest-rank-free linear interpolation,
    as numpy's default) and cv over the timed runs, plus the runs themselves in call order."""
    ordered = sorted(runs)
    pos = 0.9 * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    p90 = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return {"median": statistics.median(ordered), "mean": statistics.fmean(ordered), "min": ordered[0],
            "max": ordered[-1], "p90": p90, "cv": coefficient_of_variation(ordered), "runs": list(runs)}


def _busy_processes() -> Optional[int]:
    """How many other processes are running right now (state R in /proc/<pid>/stat); None off Linux."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    own = os.getpid()
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].startswith("R"):
            count += 1
    return count


def machine_load() -> Dict[str, Any]:
    """A snapshot of how busy the machine is: 1-minute load average, CPUs, other running processes."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {"loadavg_1m": load1, "cpu_count": os.cpu_count(), "busy_processes": _busy_processes()}


def is_busy(snapshot: Optional[Dict[str, Any]]) -> bool:
    """Whether a machine_load() snapshot shows a machine that was not quiet."""
    if not snapshot:
        return False
    if snapshot.get("busy_processes"):
        return True
    load, cpus = snapshot.get("loadavg_1m"), snapshot.get("cpu_count") or 1
    return load is not None and load > BUSY_LOAD_PER_CPU * cpus


def load_record(before: Dict[str, Any], after: Dict[str, Any], during: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The row's `machine_load` field: both snapshots, what other processes used during the timed
    calls (`CpuWindow`; None where none ran), and the verdict: busy when any of the three says so."""
    return {"before": before, "after": after, "during": during,
            "busy": is_busy(before) or is_busy(after) or bool(during and during.get("busy"))}


# Busy during the timed calls: other processes used at least this much CPU on average (a quarter of
# one core), and at least BUSY_DURING_MIN_S in all (a few clock ticks: a short window's rounding).
BUSY_DURING_CPU = 0.25
BUSY_DURING_MIN_S = 0.05


def _cpu_seconds() -> Optional[tuple[float, float]]:
    """(CPU seconds every process has used since boot, this process's own), from /proc (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        own = Path("/proc/self/stat").read_text()
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system, irq softirq steal (not idle, iowait)
    utime, stime = (int(x) for x in own[own.rfind(")") + 2:].split()[11:13])
    hz = os.sysconf("SC_CLK_TCK")
    return busy / hz, (utime + stime) / hz


class CpuWindow:
    """How much CPU other processes used while a stretch of code (the timed calls) ran: the machine's
    busy CPU time minus this process's own, from the kernel's counters at the start and the end.
    A snapshot before and after a job misses a CPU hog that ran only during its calls (a job x4 slower
    with busy=false); the counters integrate the whole window, every tick of it, with no sampling
    thread in the measured process (a thread would take the GIL from the calls it watches)."""

    def __init__(self) -> None:
        self._start = _cpu_seconds()
        self._began = time.perf_counter()

    def record(self) -> Optional[Dict[str, Any]]:
        """{seconds, others_cpu (mean CPUs other processes used), busy}; None off Linux."""
        end, seconds = _cpu_seconds(), time.perf_counter() - self._began
        if self._start is None or end is None or seconds <= 0:
            return None
        others_s = max(0.0, (end[0] - self._start[0]) - (end[1] - self._start[1]))
        return {"seconds": round(seconds, 3), "others_cpu": round(others_s / seconds, 3),
                "busy": others_s >= BUSY_DURING_MIN_S and others_s / seconds >= BUSY_DURING_CPU}


def is_busy_row(row: Dict[str, Any]) -> bool:
    """Whether the machine was busy around the row's job."""
    return bool((row.get("machine_load") or {}).get("busy"))


def busy_summary(rows: Sequence[Dict[str, Any]]) -> Optional[str]:
    """`3 of 5 rows measured on a busy machine, 1 noisy (...)`, or None when every row looks sound."""
    done = [r for r in rows if r and is_completed(r)]
    busy = [r for r in done if is_busy_row(r)]
    noisy = [r for r in done if noise_reasons(r)]
    if not busy and not noisy:
        return None
    parts = []
    if busy:
        parts.append(f"{len(busy)} of {len(done)} rows measured on a busy machine (other processes running)")
    if noisy:
        reasons = [reason for r in noisy for reason in noise_reasons(r) if not reason.startswith("machine busy")]
        cvs = [r["latency_s"]["cv"] for r in noisy if (r["latency_s"] or {}).get("cv") is not None
               and r["latency_s"]["cv"] > NOISY_CV]
        why = sorted({reason for reason in reasons if not reason.startswith("spread cv")})
        if cvs:
            why.append(f"spread cv up to {max(cvs):.0%} > {NOISY_CV:.0%}")
        parts.append(f"{len(noisy)} of {len(done)} rows noisy" + (f" ({'; '.join(why)})" if why else ""))
    return ", ".join(parts)


def threads_advice(rows: Sequence[Dict[str, Any]]) -> Optional[str]:
    """What to try when CPU rows were measured busy with several torch threads each (None otherwise).

    Two processes each running one torch thread per core fight for every core: a call waits for its
    slowest thread. On a busy 2-core machine one thread was 14x faster than torch's default 2
    (BENCHMARKS.md), more than any other lever, and its calls are far steadier."""
    from .spec import Device

    cpu = [r for r in rows if r and is_completed(r) and (r.get("env") or {}).get("device") == Device.cpu.value]
    if not any(is_busy_row(r) for r in cpu):
        return None
    threads = [(r.get("env") or {}).get("torch_threads") for r in cpu]
    if any(not isinstance(n, int) or n <= 1 for n in threads):
        return None  # one thread was run (or is unknown): the sweep already looked at it
    return (f"busy CPU and every row ran {min(threads)}+ torch threads: on a shared CPU the thread count is "
            f"often the largest lever (1 thread was x14 over 2 on a busy 2-core machine) and its calls are "
            f"steadier; sweep run.threads=auto,1 (the ladder walks it first)")


def noise_reasons(row: Dict[str, Any]) -> List[str]:
    """Why a completed row's timings are unreliable (empty when they look sound)."""
    lat = row.get("latency_s")
    if not lat or not is_completed(row):
        return []
    reasons = []
    runs = lat.get("runs") or []
    if len(runs) < MIN_RUNS:
        reasons.append(f"{len(runs)} timed run{'s' if len(runs) != 1 else ''} (< {MIN_RUNS})")
    if lat.get("cv") is not None and lat["cv"] > NOISY_CV:
        reasons.append(f"spread cv {lat['cv']:.0%} > {NOISY_CV:.0%}")
    if is_busy_row(row):
        reasons.append("machine busy (other processes running)")
    return reasons


def memory_scope(device: Optional[str], isolated_process: bool) -> Optional[str]:
    """What `peak_memory_mb` means for a job on `device` (see MEMORY_SCOPES)."""
    if device is None:
        return None
    if device == "cuda":
        return MemoryScope.cuda.value
    return (MemoryScope.process if isolated_process else MemoryScope.shared_process).value


# ---------------------------------------------------------------------------------------------
# The broken-image rule


def broken_image(stats: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why image statistics show no real result (NaN, or one flat colour such as fp16 VAE black), else None.
    Applied by the job to the float output before it is saved."""
    if not stats:
        return None
    if stats.get("nan"):
        return "broken image: the output holds NaN"
    if stats.get("max") is not None and stats["max"] - stats["min"] < 1 / 255:
        return f"broken image: every pixel is {stats['mean']:.3f} (constant)"
    return None


def image_problem(row: Dict[str, Any], folder: Path) -> Optional[str]:
    """Why a completed row's result cannot be trusted when read back: the job's verdict, NaN in its
    stats, or its image file missing, unreadable, empty or one flat colour. None when it is fine."""
    if row["status"] == Status.broken.value:
        return row["error"] or "broken image (status broken)"
    if row["status"] != Status.ok.value:
        return None
    if (row.get("image_stats") or {}).get("nan"):
        return "image has NaN values (image_stats.nan)"
    saves = ((row.get("spec") or {}).get("run") or {}).get("save_image", True) is not False
    if not row.get("image"):
        return "no image recorded" if saves else None
    try:
        pixels = load_pixels(Path(folder) / row["image"])
    except Exception as exc:  # any decoder failure is an unreadable image, never a crashed reader
        return f"image unreadable: {type(exc).__name__}: {exc}"
    flat = pixels.reshape(-1, pixels.shape[-1])
    if flat.size == 0:
        return "image is empty"
    if (flat == flat[0]).all():
        colour = "all black" if not flat[0].any() else f"every pixel = {tuple(int(c) for c in flat[0])}"
        return f"image is one flat colour ({colour})"
    return None


def load_pixels(path: Path):
    """An image file as a uint8 H x W x 3 array (RGB; other modes converted)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Labels


# Overrides that say where or how a sweep is stored, not what was measured.
_NOT_LABEL = ("hydra", "resume", "isolate", "cache_dir")


def parse_overrides(overrides: Iterable[str]) -> Dict[str, str]:
    """`["precision=bf16", "+preset=x", "model.path=a"]` -> {"precision": "bf16", "preset": "x", ...}."""
    parsed: Dict[str, str] = {}
    for item in overrides or ():
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if sep and key.split(".")[0].split("/")[0] not in _NOT_LABEL:
            parsed[key] = value
    return parsed


def label_values(row: Dict[str, Any]) -> Dict[str, Optional[str]]:
    return {**(row.get("choices") or {}), **parse_overrides(row.get("overrides") or [])}


def varying_keys(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Every override or config-group choice whose value differs between `rows` (groups and plain
    fields alike, e.g. `precision` and `model.path`), in the order first seen."""
    values = [label_values(r) for r in rows]
    keys: Dict[str, None] = {}
    for v in values:
        keys.update(dict.fromkeys(v))

    def known(row: Dict[str, Any], value: Dict[str, Any], key: str) -> bool:
        # A planned job with no row has overrides but no choices: its choices are unknown, not different.
        return bool(row.get("choices")) or key in value

    return [k for k in keys if len({v.get(k) for r, v in zip(rows, values) if known(r, v, k)}) > 1]


def labels(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """A short name per row: its preset, else `key=value` for every varying key, else its job number."""
    keys = varying_keys(rows)
    out = []
    for row in rows:
        values = label_values(row)
        text = ", ".join(f"{k}={values.get(k, '—')}" for k in keys)
        num = (row.get("job") or {}).get("num") if isinstance(row.get("job"), dict) else None
        out.append(row.get("preset") or text or (f"job {num}" if num is not None else "run"))
    return out
