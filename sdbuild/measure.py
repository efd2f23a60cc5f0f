"""Time a built pipeline honestly: warmup until steady, device synchronized, statistics over N runs.

- Warmup: at least `run.warmup` calls, continued (up to a cap) while the last one still compiled
  a graph or recorded a CUDA graph (lazy torch.compile, CUDA-graph trees record on the second
  call of each module), so the timed runs measure the steady pipeline. The number of warmup calls
  and whether the timed runs were steady are recorded.
- Each timed call is the full pipeline call (text encoding, all denoising steps, VAE decode),
  bracketed by CUDA events on GPU and `time.perf_counter` on CPU, after a synchronize.
- Denoising steps per second (what diffusers' progress bar shows as it/s) from timestamps taken at
  the end of every step (`callback_on_step_end`): (steps - 1) / (last step end - first step end).
- Peak memory of the timed runs only (reset after warmup; the warmup peak, with compile work and
  autotuning, is recorded apart): CUDA peak allocated and reserved on GPU; on CPU the peak
  resident set size of this process (the kernel's own high-water mark, reset before the calls).
- Several candidates (`measure_group`): each warmed up, then their timed calls alternated
  round-robin, so call i of each saw the same load and can be paired (sdbuild.stats); one
  candidate is the same loop with no one to alternate with.
- `run.repeats=auto` (repeats=None): at least 3 timed calls, then on until the 95 % interval of
  the median (in a group: of every paired speed-up) is within +-interval_target, or max_measure_s.
- Energy per timed call where a counter is readable (`EnergyMeter`: NVML on GPU, RAPL on CPU),
  and `run.threads` (`apply_threads`).
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import results as _results
from .spec import RunSpec

log = logging.getLogger("sdbuild")

# Warmup calls at most, unless the caller says otherwise: the spec field `run.max_warmup` owns the number.
DEFAULT_MAX_WARMUP = RunSpec.max_warmup


@dataclass
class Measurement:
    warmup_s: List[float] = field(default_factory=list)
    runs_s: List[float] = field(default_factory=list)
    peak_memory_mb: Optional[float] = None  # timed runs only
    peak_memory_reserved_mb: Optional[float] = None  # CUDA caching allocator, timed runs only
    warmup_peak_memory_mb: Optional[float] = None
    run_steps_per_s: List[float] = field(default_factory=list)  # per timed run
    steady: bool = True
    unsteady_reason: Optional[str] = None
    images: Optional[np.ndarray] = None  # float [0, 1], (batch, H, W, 3), from the last timed run
    stop_reason: str = ""  # why the timed calls stopped (a fixed count, or run.repeats=auto's rule)
    energy_j: List[Optional[float]] = field(default_factory=list)  # per timed run, where measurable
    energy_source: Optional[str] = None
    energy_reason: Optional[str] = None  # why there is no energy figure
    batch_size: int = 1
    load_during: Optional[Dict[str, Any]] = None  # other processes' CPU use during the timed calls (results.CpuWindow)

    @property
    def warmup_calls(self) -> int:
        return len(self.warmup_s)

    def steps_per_s(self) -> Optional[float]:
        """Median denoising steps per second over the timed runs (None: fewer than 2 steps)."""
        return statistics.median(self.run_steps_per_s) if self.run_steps_per_s else None

    def energy(self) -> Dict[str, Any]:
        """The row's `energy` field: joules per image over the timed calls, with its source, or
        null with the reason."""
        joules = [j for j in self.energy_j if j is not None]
        if not self.energy_j or len(joules) < len(self.energy_j):
            return {"joules_per_image": None, "source": self.energy_source,
                    "reason": self.energy_reason or "the energy counter did not answer for every timed call"}
        return {"joules_per_image": sum(joules) / (len(joules) * self.batch_size), "source": self.energy_source,
                "reason": None, "calls": len(joules)}

    def latency(self) -> dict:
        runs = sorted(self.runs_s)
        return {
            "median": statistics.median(runs),
            "mean": statistics.fmean(runs),
            "min": runs[0],
            "max": runs[-1],
            "p90": float(np.percentile(runs, 90)),
            "runs": self.runs_s,
        }


def compile_work() -> Dict[str, int]:
    """Counters of the compile work done so far in this process: graphs TorchDynamo compiled,
    and CUDA graphs warmed up and recorded by Inductor's CUDA-graph trees. Two snapshots that
    differ mean the calls between them were not yet steady."""
    import sys

    from torch._dynamo.utils import counters

    work = {"graphs_compiled": int(counters["stats"]["unique_graphs"]), "cuda_graphs_recorded": 0}
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            manager = getattr(trees.get_container(index), "tree_manager", None)
            if manager is not None:
                # graph ids are handed out by an itertools.count: its repr is the next id
                recorded = int(re.search(r"\d+", repr(manager.graph_counter)).group())
                work["cuda_graphs_recorded"] += recorded + len(manager.warmed_up_functions)
    return work


def work_done(before: Dict[str, int], after: Dict[str, int]) -> Optional[str]:
    """What compile work happened between two `compile_work` snapshots, said in words (None: none)."""
    diff = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    if not diff:
        return None
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in diff.items())


class StepClock:
    """`callback_on_step_end` that timestamps the end of every denoising step (a CUDA event on GPU,
    so nothing synchronizes inside the loop; `perf_counter` on CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.marks: list = []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return callback_kwargs

    def steps_per_s(self) -> Optional[float]:
        """Steps per second between the first and the last step's end (call after a synchronize)."""
        if len(self.marks) < 2:
            return None
        first, last = self.marks[0], self.marks[-1]
        seconds = first.elapsed_time(last) / 1000.0 if self.cuda else last - first
        return (len(self.marks) - 1) / seconds if seconds > 0 else None


class CpuPeakRss:
    """Peak resident set size of this process over a `with` block, at no cost while it runs.

    Linux keeps the peak (VmHWM) itself; writing 5 to /proc/self/clear_refs resets it to the
    current size, so the peak covers only the block. (A sampling thread would compete with
    torch for 2 cores and slow the very calls it watches.) Elsewhere: the lifetime peak.
    """

    STATUS, CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.peak_mb: float = 0.0

    def _hwm_mb(self) -> float:
        match = re.search(r"VmHWM:\s+(\d+) kB", self.STATUS.read_text()) if self.STATUS.exists() else None
        if match:
            return int(match.group(1)) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    def __enter__(self):
        try:
            self.CLEAR.write_text("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = self._hwm_mb()


def timed_call(call: Callable[[], object], device: str):
    """Run `call` once and return (seconds, output), synchronized with the device."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0, out
    begin = time.perf_counter()
    out = call()
    return time.perf_counter() - begin, out


class _Peak:
    """Peak memory over a `with` block: CUDA allocated + reserved, or the CPU resident set."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.cpu = None if self.cuda else CpuPeakRss()
        self.peak_mb: Optional[float] = None
        self.reserved_mb: Optional[float] = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.cpu.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            self.reserved_mb = torch.cuda.max_memory_reserved() / 2**20
        else:
            self.cpu.__exit__(*exc)
            self.peak_mb = self.cpu.peak_mb


@dataclass
class Candidate:
    """One pipeline to time: how to call it, and what to set before each of its calls (the
    process-wide switches and thread count of its spec, when several pipelines share a process)."""

    pipe: Any
    make_kwargs: Callable[[], dict]
    label: str = ""
    prepare: Optional[Callable[[], None]] = None
    batch_size: int = 1


@dataclass
class GroupMeasurement:
    """What `measure_group` measured: one Measurement per candidate, timed calls paired by index."""

    measurements: List[Measurement]
    rounds: int
    stop_reason: str
    interleaved: bool
    # catch_errors=True: candidate index -> (the exception, its traceback) for a candidate whose call
    # raised; it left the rotation there, the others went on
    failures: Dict[int, tuple] = field(default_factory=dict)


def measure(pipe, make_kwargs: Callable[[], dict], device: str, warmup: int, repeats: Optional[int],
            label: str = "", show_progress: bool = True, max_warmup: Optional[int] = None,
            interval_target: float = RunSpec.interval_target, max_measure_s: float = RunSpec.max_measure_s,
            batch_size: int = 1, result: Optional[Measurement] = None) -> Measurement:
    """Warm up until steady (at least `warmup` calls, at most `max_warmup`), then time `repeats`
    full pipeline calls (None: `run.repeats=auto`, see `measure_group`). `result`: the Measurement
    to fill as calls finish (an interrupted caller keeps the timed runs done so far)."""
    return measure_group([Candidate(pipe, make_kwargs, label, batch_size=batch_size)], device, warmup, repeats,
                         show_progress=show_progress, max_warmup=max_warmup, interval_target=interval_target,
                         max_measure_s=max_measure_s, into=None if result is None else [result]).measurements[0]


MIN_AUTO_CALLS = 3  # run.repeats=auto never stops before this many timed calls
MAX_AUTO_CALLS = 10_000


def auto_done(measurements: Sequence[Measurement], reference: int, target: float,
              skip: frozenset | set = frozenset()) -> Optional[str]:
    """Why `run.repeats=auto` may stop now (None: not yet): every candidate's paired speed-up on the
    reference (a single pipeline, or a group whose reference failed: each median latency) has a
    95 % interval within +-target. Candidates in `skip` (failed) are left out."""
    from .stats import median_interval, paired_speedup

    runs = {i: m.runs_s for i, m in enumerate(measurements) if i not in skip}
    if not runs or min(len(r) for r in runs.values()) < MIN_AUTO_CALLS:
        return None
    if len(runs) == 1 or reference not in runs:
        widths = [median_interval(r).relative_half_width() for r in runs.values()]
        what = "the median latency's" if len(runs) == 1 else "every median latency's"
    else:
        widths = [paired_speedup(runs[reference], r).relative_half_width() for i, r in runs.items() if i != reference]
        what = "every paired speed-up's"
    worst = max(widths)
    return f"{what} 95% interval within +-{worst:.1%} (target +-{target:.0%})" if worst <= target else None


def measure_group(candidates: Sequence[Candidate], device: str, warmup: int, repeats: Optional[int],
                  show_progress: bool = True, max_warmup: Optional[int] = None, reference: int = 0,
                  interval_target: float = RunSpec.interval_target, max_measure_s: float = RunSpec.max_measure_s,
                  interleave: bool = True, catch_errors: bool = False,
                  into: Optional[Sequence[Measurement]] = None) -> GroupMeasurement:
    """Warm up each candidate until steady, then time their calls round-robin (A B C, B C A, C A B,
    ...: the order rotates so no candidate always runs first), so load that drifts during the
    measurement hits every candidate alike and call i of each can be paired.

    `repeats`: timed calls per candidate; None (`run.repeats=auto`): at least MIN_AUTO_CALLS (and, before
    the time cap may stop it, enough for a 95 % interval: stats.min_samples), then
    on until `auto_done` or until the timed calls took `max_measure_s`. `interleave=False` times
    each candidate's calls one after another instead (what separate jobs do). `catch_errors`: a
    candidate whose call raises leaves the group (see GroupMeasurement.failures); the others go on.
    `into`: one Measurement per candidate to fill as calls finish (what an interrupted caller keeps)."""
    import traceback

    results = list(into) if into is not None else [Measurement() for _ in candidates]
    failures: Dict[int, tuple] = {}
    cap = max(warmup, DEFAULT_MAX_WARMUP if max_warmup is None else max_warmup)
    total = (warmup + (repeats or MIN_AUTO_CALLS)) * len(candidates)
    desc = candidates[0].label if len(candidates) == 1 else f"{len(candidates)} candidates, interleaved"
    bar = tqdm(total=total, desc=desc or "measure", unit="call", disable=not show_progress, leave=False)
    meter = EnergyMeter(device)

    def call(c: Candidate, kind: str, index: int, count: Optional[int]):
        if c.prepare is not None:
            c.prepare()
        kwargs = c.make_kwargs()
        clock = kwargs["callback_on_step_end"] = StepClock(device)
        before = compile_work()
        joules_before = meter.read()
        seconds, out = timed_call(lambda: c.pipe(**kwargs), device)
        joules_after = meter.read()
        work = work_done(before, compile_work())
        bar.update(1)
        bar.set_postfix_str(f"{kind} {seconds:.3f}s" + (f" ({work})" if work else ""))
        if not show_progress:  # no bar (a log file, a sweep in the background): one line per call
            log.info("%s%s %d/%s: %.3f s%s", f"{c.label}: " if c.label and len(candidates) > 1 else "", kind,
                     index + 1, count or "auto", seconds, f" ({work})" if work else "")
        joules = None if joules_before is None or joules_after is None else joules_after - joules_before
        return seconds, out, clock.steps_per_s(), work, joules

    def guarded(i: int, action: Callable[[], None]) -> None:
        if i in failures:
            return
        try:
            action()
        except Exception as exc:
            if not catch_errors:
                raise
            failures[i] = (exc, traceback.format_exc())
            log.warning("%s failed and leaves the group: %s: %s", candidates[i].label or f"candidate {i}",
                        type(exc).__name__, exc)

    def warm(c: Candidate, result: Measurement) -> None:
        with _Peak(device) as warm_peak:
            work = None
            while len(result.warmup_s) < warmup or (work and len(result.warmup_s) < cap):
                if len(result.warmup_s) >= warmup:  # one more, beyond what was asked
                    bar.total += 1
                    bar.refresh()
                seconds, _, _, work, _ = call(c, "warmup", len(result.warmup_s), max(warmup, len(result.warmup_s) + 1))
                result.warmup_s.append(seconds)
        result.warmup_peak_memory_mb = warm_peak.peak_mb if result.warmup_s else None
        if work:
            result.steady, result.unsteady_reason = False, (f"warmup call {len(result.warmup_s)} (the last, cap "
                                                            f"{cap}) still did compile work: {work}")

    for i, (c, result) in enumerate(zip(candidates, results)):
        guarded(i, lambda: warm(c, result))

    def timed(i: int, index: int) -> None:
        c, result = candidates[i], results[i]
        with _Peak(device) as peak:
            seconds, out, steps_per_s, work, joules = call(c, "run", index, repeats)
        result.runs_s.append(seconds)
        result.energy_j.append(joules)
        if steps_per_s is not None:
            result.run_steps_per_s.append(steps_per_s)
        if work and result.steady:
            result.steady, result.unsteady_reason = False, f"timed run {index + 1} did compile work: {work}"
        result.images = out.images
        if peak.peak_mb is not None:  # the highest of its timed calls
            result.peak_memory_mb = max(peak.peak_mb, result.peak_memory_mb or 0.0)
        if peak.reserved_mb is not None:
            result.peak_memory_reserved_mb = max(peak.reserved_mb, result.peak_memory_reserved_mb or 0.0)

    began = time.perf_counter()
    window = _results.CpuWindow()  # what other processes used while the timed calls ran
    try:
        rounds, stop = timed_calls(candidates, results, failures, timed, guarded, repeats, interleave, reference,
                                   interval_target, max_measure_s, began, bar)
    finally:
        during = window.record()
        for result in results:
            result.load_during = during
    bar.close()
    for c, result in zip(candidates, results):
        result.stop_reason = stop
        result.energy_source, result.energy_reason = meter.source, meter.reason
        result.batch_size = c.batch_size
    return GroupMeasurement(results, rounds, stop, interleave and len(candidates) > 1, failures)


def timed_calls(candidates, results, failures, timed, guarded, repeats, interleave, reference, interval_target,
                max_measure_s, began, bar) -> tuple[int, str]:
    """measure_group's timed calls (see there): the rounds done and why they stopped."""
    from .stats import min_samples

    rounds, stop = 0, ""
    each = " each" if len(candidates) > 1 else ""
    order = list(range(len(candidates)))
    if not interleave:  # each candidate's calls in a row: the drift between them is not shared
        for i in order:
            for index in range(repeats or MIN_AUTO_CALLS):
                guarded(i, lambda: timed(i, index))
        rounds, stop = repeats or MIN_AUTO_CALLS, "sequential"
    while interleave:
        if repeats is not None and rounds >= repeats:
            stop = f"{repeats} timed calls{each} (run.repeats={repeats})"
            break
        if repeats is None:
            if (done := auto_done(results, reference, interval_target, skip=set(failures))):
                stop = f"run.repeats=auto: {done} after {rounds} calls{each}"
                break
            # the cap stops no earlier than the fewest calls that can give a 95 % interval: cut
            # sooner, the calls it took could decide nothing (a loaded machine hits it first)
            if rounds >= max(MIN_AUTO_CALLS, min_samples()) and time.perf_counter() - began >= max_measure_s:
                stop = (f"run.repeats=auto: stopped by run.max_measure_s={max_measure_s:g} after {rounds} calls"
                        f"{each}, before the interval reached +-{interval_target:.0%}")
                break
            if rounds >= MAX_AUTO_CALLS:
                stop = f"run.repeats=auto: stopped at {MAX_AUTO_CALLS} calls{each}"
                break
            if rounds >= MIN_AUTO_CALLS:
                bar.total += len(candidates)
        rotation = rounds % len(order)
        for i in order[rotation:] + order[:rotation]:
            guarded(i, lambda: timed(i, rounds))
        rounds += 1
        if len(failures) == len(candidates):
            stop = "every candidate failed"
            break
    return rounds, stop


# ---------------------------------------------------------------------------------------------
# Threads


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # what torch picked for this machine, before any job set it


def apply_threads(threads: Optional[int]) -> Dict[str, Any]:
    """`run.threads`: torch's intra-op threads for this job (None: torch's own default), and the
    inter-op threads too where torch still allows it (only before its first parallel work)."""
    torch.set_num_threads(threads or _TORCH_DEFAULT_THREADS)
    interop = None
    if threads is not None:
        try:
            torch.set_num_interop_threads(threads)
            interop = "set"
        except RuntimeError:  # "cannot set number of interop threads after parallel work has started"
            interop = "already started; left as it was"
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "interop_set": interop}


# ---------------------------------------------------------------------------------------------
# Energy


RAPL_ROOT = Path("/sys/class/powercap")


def nvml_index(cuda_index: int) -> int:
    """The NVML index (NVML numbers the machine's physical GPUs) of torch's CUDA device `cuda_index` (numbered
    among those CUDA_VISIBLE_DEVICES shows: under CUDA_VISIBLE_DEVICES=2,3 torch's device 0 is NVML's 2). torch's
    own mapping, which also reads GPU UUIDs (GPU-...) through NVML."""
    return torch.cuda._get_nvml_device_index(cuda_index)


class EnergyMeter:
    """A cumulative energy counter in joules, where the machine has one it lets us read: on GPU the
    board's counter through NVML (nvidia-ml-py), on CPU the RAPL package counters (all packages
    summed; they count the whole package, other processes included). `source` names it; when there
    is none, `read()` is None and `reason` says why."""

    def __init__(self, device: str, rapl_root: Path = RAPL_ROOT) -> None:
        self.source: Optional[str] = None
        self.reason: Optional[str] = None
        self._read: Optional[Callable[[], float]] = None
        if device == "cuda":
            self._nvml()
        else:
            self._rapl(Path(rapl_root))

    def read(self) -> Optional[float]:
        if self._read is None:
            return None
        try:
            return self._read()
        except Exception as exc:  # a counter that stops answering: no figure, and why
            self._read, self.source, self.reason = None, None, f"energy counter failed: {type(exc).__name__}: {exc}"
            return None

    def _nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = "GPU energy needs nvidia-ml-py (pip install -e \".[energy]\" or pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(torch.cuda.current_device()))
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as exc:  # NVMLError_NotSupported on boards without the counter, no driver, ...
            self.reason = f"NVML energy counter unavailable: {exc}"
            return
        self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0  # mJ
        self.source = "nvml: GPU board energy counter"

    def _rapl(self, root: Path) -> None:
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.is_dir() else []
        if not zones:
            self.reason = f"no RAPL package counters in {root} (not an x86 Linux host, or hidden in this container/VM)"
            return
        try:
            ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
            last = [int((z / "energy_uj").read_text()) for z in zones]
        except (OSError, ValueError) as exc:
            self.reason = f"RAPL counters in {root} are not readable ({exc}); reading them usually needs root"
            return
        total = [0]

        def read() -> float:  # the counters wrap at max_energy_range_uj
            for i, zone in enumerate(zones):
                now = int((zone / "energy_uj").read_text())
                total[0] += (now - last[i]) % (ranges[i] + 1)
                last[i] = now
            return total[0] / 1e6

        self._read = read
        self.source = f"rapl: CPU package energy ({len(zones)} package{'s' if len(zones) > 1 else ''}, whole package)"


def fatal_cuda_error(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA error that leaves this process's CUDA context unusable (an illegal
    address, a failed graph capture, a device-side assert): every later job in the process would
    fail or measure garbage. Out of memory is not one: the allocator recovers from it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises this for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return "out of memory" not in str(exc)
    text = str(exc)
    return isinstance(exc, RuntimeError) and "out of memory" not in text and (
        "CUDA error" in text or "CUDA graph" in text or "CUBLAS_STATUS" in text or "cuDNN error" in text)
