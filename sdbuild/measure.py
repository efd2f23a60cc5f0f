"""Time a built pipeline honestly: warmup apart, device synchronized, statistics over N runs.

- Warmup calls are timed on their own (they include lazy torch.compile work).
- Each timed call is the full pipeline call (text encoding, all denoising steps, VAE decode),
  bracketed by CUDA events on GPU and `time.perf_counter` on CPU, after a synchronize.
- Peak memory: CUDA peak allocated on GPU; on CPU the peak resident set size of this process
  during the calls (the kernel's own high-water mark, reset before the first call).
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger("sdbuild")


@dataclass
class Measurement:
    warmup_s: List[float] = field(default_factory=list)
    runs_s: List[float] = field(default_factory=list)
    peak_memory_mb: Optional[float] = None
    images: Optional[np.ndarray] = None  # float [0, 1], (batch, H, W, 3), from the last timed run

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


def measure(pipe, make_kwargs: Callable[[], dict], device: str, warmup: int, repeats: int,
            label: str = "", show_progress: bool = True) -> Measurement:
    """Warm up `warmup` times, then time `repeats` full pipeline calls."""
    result = Measurement()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu_peak = CpuPeakRss() if device != "cuda" else None
    steps = [("warmup", i) for i in range(warmup)] + [("run", i) for i in range(repeats)]
    bar = tqdm(steps, desc=label or "measure", unit="call", disable=not show_progress, leave=False)
    with cpu_peak or contextlib.nullcontext():
        for kind, index in bar:
            kwargs = make_kwargs()
            seconds, out = timed_call(lambda: pipe(**kwargs), device)
            (result.warmup_s if kind == "warmup" else result.runs_s).append(seconds)
            bar.set_postfix_str(f"{kind} {seconds:.3f}s")
            if not show_progress:  # no bar (a log file, a sweep in the background): one line per call
                count = warmup if kind == "warmup" else repeats
                log.info("%s %d/%d: %.3f s", kind, index + 1, count, seconds)
            if kind == "run":
                result.images = out.images
    result.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else cpu_peak.peak_mb
    return result

