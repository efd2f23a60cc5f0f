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
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

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

    @property
    def warmup_calls(self) -> int:
        return len(self.warmup_s)

    def steps_per_s(self) -> Optional[float]:
        """Median denoising steps per second over the timed runs (None: fewer than 2 steps)."""
        return statistics.median(self.run_steps_per_s) if self.run_steps_per_s else None

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


def measure(pipe, make_kwargs: Callable[[], dict], device: str, warmup: int, repeats: int,
            label: str = "", show_progress: bool = True, max_warmup: Optional[int] = None,
            result: Optional[Measurement] = None) -> Measurement:
    """Warm up until steady (at least `warmup` calls, at most `max_warmup`), then time `repeats`
    full pipeline calls. `result`: the Measurement to fill as calls finish (an interrupted caller
    keeps the timed runs done so far)."""
    result = Measurement() if result is None else result
    cap = max(warmup, DEFAULT_MAX_WARMUP if max_warmup is None else max_warmup)
    bar = tqdm(total=warmup + repeats, desc=label or "measure", unit="call", disable=not show_progress, leave=False)

    def call(kind: str, index: int, count: int):
        kwargs = make_kwargs()
        clock = kwargs["callback_on_step_end"] = StepClock(device)
        before = compile_work()
        seconds, out = timed_call(lambda: pipe(**kwargs), device)
        work = work_done(before, compile_work())
        bar.update(1)
        bar.set_postfix_str(f"{kind} {seconds:.3f}s" + (f" ({work})" if work else ""))
        if not show_progress:  # no bar (a log file, a sweep in the background): one line per call
            log.info("%s %d/%d: %.3f s%s", kind, index + 1, count, seconds, f" ({work})" if work else "")
        return seconds, out, clock.steps_per_s(), work

    with _Peak(device) as warm_peak:
        work = None
        while len(result.warmup_s) < warmup or (work and len(result.warmup_s) < cap):
            if len(result.warmup_s) >= warmup:  # one more, beyond what was asked
                bar.total += 1
                bar.refresh()
            seconds, _, _, work = call("warmup", len(result.warmup_s), max(warmup, len(result.warmup_s) + 1))
            result.warmup_s.append(seconds)
    result.warmup_peak_memory_mb = warm_peak.peak_mb if result.warmup_s else None
    if work:
        result.steady, result.unsteady_reason = False, f"warmup call {len(result.warmup_s)} (the last, cap {cap}) still did compile work: {work}"
    with _Peak(device) as run_peak:
        for index in range(repeats):
            seconds, out, steps_per_s, work = call("run", index, repeats)
            result.runs_s.append(seconds)
            if steps_per_s is not None:
                result.run_steps_per_s.append(steps_per_s)
            if work and result.steady:
                result.steady, result.unsteady_reason = False, f"timed run {index + 1} did compile work: {work}"
            result.images = out.images
    bar.close()
    result.peak_memory_mb, result.peak_memory_reserved_mb = run_peak.peak_mb, run_peak.reserved_mb
    return result


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
