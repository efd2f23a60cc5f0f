"""Time a built pipeline honestly: warmup apart, device synchronized, statistics over N runs.

- Warmup calls are timed on their own (they include lazy torch.compile work).
- Each timed call is the full pipeline call (text encoding, all denoising steps, VAE decode),
  bracketed by CUDA events on GPU and `time.perf_counter` on CPU, after a synchronize.
- Peak memory: CUDA peak allocated on GPU; on CPU the peak resident set size of this process,
  sampled during the calls (the OS's lifetime maximum would carry over between sweep jobs).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm


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


class _CpuPeakRss:
    """Samples this process's RSS in a thread; `peak_mb` is the highest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval_s
        self._peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self._peak / 2**20


def _timed_call(call: Callable[[], object], device: str):
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
    cpu_peak = _CpuPeakRss() if device != "cuda" else None
    steps = [("warmup", i) for i in range(warmup)] + [("run", i) for i in range(repeats)]
    bar = tqdm(steps, desc=label or "measure", unit="call", disable=not show_progress, leave=False)
    with cpu_peak or contextlib.nullcontext():
        for kind, _ in bar:
            kwargs = make_kwargs()
            seconds, out = _timed_call(lambda: pipe(**kwargs), device)
            (result.warmup_s if kind == "warmup" else result.runs_s).append(seconds)
            bar.set_postfix_str(f"{kind} {seconds:.3f}s")
            if kind == "run":
                result.images = out.images
    result.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else cpu_peak.peak_mb
    return result

