"""The ladder's decisions, apart from Hydra: which option of an axis to keep, and why not the others.

A step compares every option of one axis, each on top of the recipe kept so far (the
incumbent). An option is kept when it ran (`ok`), its image is within the fidelity bound against
the baseline's, its peak memory is within the budget, and it is faster than the incumbent by
more than the noise (see `NoiseRule`); among several such options the lowest median wins (under
the paired rule, the largest paired speed-up). Otherwise the incumbent stays: on a tie within
noise the current, simpler recipe is kept.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sdbuild.fidelity import FIDELITY_BOUND_DB
from sdbuild.results import is_busy_row
from sdbuild.stats import Interval, describe, distinguishable, interval_from_dict

# The walk order when `order` is not given: precision first (it decides every later kernel's
# dtype), then the eager levers, then compilation last (it compiles whatever the earlier steps
# built, and it is the dearest to measure). Swept keys not named here follow in command-line order.
# run.threads (a CPU lever) goes first: the thread count changes every later step's timings. parallel follows
# precision: the biggest lever where there are several GPUs, and the later levers are then tried on its ranks
# (the ones it cannot combine with, e.g. quantization or step caches, are refused with their reason).
DEFAULT_ORDER = ("run.threads", "precision", "parallel", "quant", "memory_format", "attention", "memory", "vae",
                 "scheduler", "cache", "compile")


class NoiseRule(enum.Enum):
    """When is a candidate faster than the current recipe "by more than the noise"?"""

    # Its slowest timed run is faster than the current recipe's fastest timed run: the two
    # latency ranges (min..max over run.repeats calls) do not overlap. More repeats, sharper calls.
    spread = "spread"
    # Its median is lower (for quiet machines, or when every row is a single run).
    median = "median"
    # Measured interleaved with the current recipe (hydra.sweeper.interleave=true): the 95 %
    # interval of its paired speed-up (sdbuild.stats) lies above 1 + min_gain. The default there.
    paired = "paired"


class Verdict(enum.Enum):
    baseline = "baseline"  # the start recipe (the fidelity and speed-up reference)
    current = "current"  # the incumbent itself, re-listed in its step
    kept = "kept"
    outpaced = "outpaced"  # faster beyond noise, but another option of the step was faster still
    within_noise = "within noise"
    slower = "slower"
    fidelity = "fidelity"  # image too far from the baseline's
    memory = "memory"  # above the memory budget
    unsupported = "unsupported"
    failed = "failed"
    broken = "broken"
    no_result = "no result"  # the job left no readable row


@dataclass(frozen=True)
class Bounds:
    psnr_db: Optional[float] = FIDELITY_BOUND_DB
    ssim: Optional[float] = None
    # Drawn models only: the most a lever may lower the row's prompt adherence below the baseline's.
    adherence_drop: Optional[float] = None
    memory_mb: Optional[float] = None
    noise: NoiseRule = NoiseRule.spread
    min_gain: float = 0.0


@dataclass
class Measured:
    """One recipe of the ladder (its full axis assignment) and the row that measured it."""

    choices: Dict[str, str]
    overrides: List[str]
    spec_key: str
    row: Optional[Dict[str, Any]] = None
    folder: Optional[Path] = None
    reused: bool = False  # the row came from an earlier step or an earlier (interrupted) run
    psnr_db: Optional[float] = None
    ssim: Optional[float] = None
    max_abs_diff: Optional[float] = None
    fidelity_error: Optional[str] = None
    adherence_drop: Optional[float] = None  # the baseline's adherence score minus this row's
    world_size: int = 1  # how many ranks the recipe runs as (parallel.world_size of its composed spec)

    @property
    def adherence(self) -> Optional[float]:
        """The row's prompt-adherence score (drawn models only; sdbuild.drawn), or None."""
        score = ((self.row or {}).get("adherence") or {}).get("score")
        return float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None

    @property
    def status(self) -> str:
        return self.row.get("status", "failed") if self.row else "no result"

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median is not None

    def latency(self, stat: str) -> Optional[float]:
        lat = (self.row or {}).get("latency_s") or {}
        value = lat.get(stat)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def median(self) -> Optional[float]:
        return self.latency("median")

    def paired_on(self, incumbent: "Measured") -> Optional[Interval]:
        """The speed-up on `incumbent` from calls alternated with it in one group, or None."""
        paired = (self.row or {}).get("paired") or {}
        mine, theirs = ((x.row or {}).get("measurement") or {} for x in (self, incumbent))
        if paired.get("reference") != incumbent.spec_key or mine.get("group") is None \
                or mine.get("group") != theirs.get("group"):
            return None
        return interval_from_dict(paired)

    @property
    def busy(self) -> bool:
        return bool(self.row) and is_busy_row(self.row)

    @property
    def peak_memory_mb(self) -> Optional[float]:
        value = (self.row or {}).get("peak_memory_mb")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def image(self) -> Optional[Path]:
        name = (self.row or {}).get("image")
        return self.folder / name if name and self.folder else None

    @property
    def job(self) -> Optional[int]:
        return ((self.row or {}).get("job") or {}).get("num")

    def label(self, axes: Sequence[str]) -> str:
        return " ".join(f"{k}={self.choices[k]}" for k in axes)


def measure_fidelity(m: Measured, baseline: Measured) -> None:
    """PSNR and SSIM of `m`'s image against the baseline's (sdbuild.fidelity), or why not; and for drawn
    models how far its prompt adherence fell below the baseline's."""
    from sdbuild.fidelity import compare_files

    if not m.ok:
        return
    if m.adherence is not None and baseline.adherence is not None:
        m.adherence_drop = baseline.adherence - m.adherence
    if m.image is None or baseline.image is None:
        m.fidelity_error = "no image to compare (run.save_image=false?)"
        return
    try:
        f = compare_files(m.image, baseline.image)
    except (OSError, ValueError) as exc:
        m.fidelity_error = f"cannot compare with the baseline image: {exc}"
        return
    m.psnr_db, m.ssim, m.max_abs_diff, m.fidelity_error = f.psnr_db, f.ssim, f.max_abs_diff, None


def rejection(m: Measured, bounds: Bounds) -> Optional[tuple[Verdict, str]]:
    """Why `m` can never be kept, whatever its speed (None: it may be kept)."""
    if m.row is None:
        return Verdict.no_result, "the job left no readable result.json"
    if m.status in ("unsupported", "failed", "broken"):
        return Verdict(m.status), (m.row.get("error") or m.status).splitlines()[0]
    if not m.ok:
        return Verdict.failed, f"status {m.status!r} without a latency"
    if bounds.psnr_db is not None or bounds.ssim is not None:
        if m.fidelity_error:
            return Verdict.fidelity, m.fidelity_error
        if bounds.psnr_db is not None and not m.psnr_db >= bounds.psnr_db:  # NaN fails too
            return Verdict.fidelity, f"PSNR {m.psnr_db:.1f} dB < {bounds.psnr_db:g} dB against the baseline"
        if bounds.ssim is not None and not m.ssim >= bounds.ssim:
            return Verdict.fidelity, f"SSIM {m.ssim:.4f} < {bounds.ssim:g} against the baseline"
    if bounds.adherence_drop is not None:  # what the image shows, read by the drawn reader: no pixels compared
        if m.adherence_drop is None:
            return Verdict.fidelity, ("no adherence score to bound (only drawn models have one, e.g. "
                                      "model=tiny_drawn, with fidelity.prompts on)")
        if not m.adherence_drop <= bounds.adherence_drop:
            return Verdict.fidelity, (f"adherence {m.adherence:.3f} is {m.adherence_drop:.3f} below the "
                                      f"baseline's (bound {bounds.adherence_drop:g})")
    if bounds.memory_mb is not None and (m.peak_memory_mb is None or m.peak_memory_mb > bounds.memory_mb):
        return Verdict.memory, f"peak memory {m.peak_memory_mb} MB > budget {bounds.memory_mb:g} MB"
    return None


def beats(candidate: Measured, incumbent: Measured, bounds: Bounds) -> bool:
    """Is `candidate` faster than `incumbent` by more than the noise (and by min_gain)?"""
    if bounds.noise == NoiseRule.paired:
        return distinguishable(candidate.paired_on(incumbent), bounds.min_gain)
    c, i = candidate.median, incumbent.median
    if c is None or i is None or not c < i * (1 - bounds.min_gain):
        return False
    if bounds.noise == NoiseRule.spread:
        c_max = candidate.latency("max") if candidate.latency("max") is not None else c
        i_min = incumbent.latency("min") if incumbent.latency("min") is not None else i
        return c_max < i_min
    return True


@dataclass
class Trial:
    """One option as judged in one step (a recipe tried in two steps has two trials, one row)."""

    m: Measured
    verdict: Verdict
    reason: str = ""


def choose(incumbent: Measured, options: Sequence[Measured], bounds: Bounds,
           incumbent_verdict: Verdict = Verdict.current) -> tuple[Measured, List[Trial]]:
    """Judge every option of a step against the incumbent; return the recipe to keep and the trials."""
    trials: List[Trial] = []
    winners: List[Trial] = []
    for m in options:
        if m.spec_key == incumbent.spec_key:
            trials.append(Trial(m, incumbent_verdict))
        elif (rejected := rejection(m, bounds)):
            trials.append(Trial(m, *rejected))
        elif beats(m, incumbent, bounds):
            winners.append(Trial(m, Verdict.kept))
            trials.append(winners[-1])
        elif bounds.noise == NoiseRule.paired:
            trials.append(_paired_trial(m, incumbent, bounds))
        elif m.median < incumbent.median:
            trials.append(Trial(m, Verdict.within_noise, f"median {m.median:.4f} s < {incumbent.median:.4f} s, "
                                f"but not beyond the noise ({_noise_text(m, incumbent, bounds)})"))
        else:
            trials.append(Trial(m, Verdict.slower, f"median {m.median:.4f} s >= {incumbent.median:.4f} s"))
    if not winners:
        return incumbent, trials
    if bounds.noise == NoiseRule.paired:  # the largest paired speed-up (all paired on the same incumbent)
        best = max(winners, key=lambda t: t.m.paired_on(incumbent).median)
    else:
        best = min(winners, key=lambda t: t.m.median)
    for t in winners:
        paired = t.m.paired_on(incumbent)
        if t is best:
            t.reason = (f"paired speed-up {describe(paired)} on the step's incumbent, above {1 + bounds.min_gain:g}"
                        if bounds.noise == NoiseRule.paired else f"x{incumbent.median / t.m.median:.2f} on the step's incumbent")
        elif bounds.noise == NoiseRule.paired:
            t.verdict, t.reason = Verdict.outpaced, (f"faster beyond noise ({describe(paired)}), but "
                                                     f"{describe(best.m.paired_on(incumbent))} was faster")
        else:
            t.verdict, t.reason = Verdict.outpaced, f"faster beyond noise, but {best.m.median:.4f} s was faster"
    return best.m, trials


def _paired_trial(m: Measured, incumbent: Measured, bounds: Bounds) -> Trial:
    """Why an option the paired rule did not keep stays behind: slower, or not distinguishable."""
    paired = m.paired_on(incumbent)
    if paired is None:
        return Trial(m, Verdict.within_noise, "no paired calls with the current recipe (not measured interleaved "
                     "with it): not distinguishable from noise")
    if paired.high is not None and paired.high < 1.0:
        return Trial(m, Verdict.slower, f"paired speed-up {describe(paired)}: slower beyond noise")
    bound = f"lower bound {paired.low:.3f} <= {1 + bounds.min_gain:g}" if paired.low is not None else "no interval"
    return Trial(m, Verdict.within_noise, f"paired speed-up {describe(paired)}, {bound}: not distinguishable "
                 f"from noise at {paired.n} calls")


def _noise_text(m: Measured, incumbent: Measured, bounds: Bounds) -> str:
    if bounds.noise == NoiseRule.spread:
        return f"slowest run {m.latency('max'):.4f} s >= current fastest {incumbent.latency('min'):.4f} s"
    return f"min_gain {bounds.min_gain:g}"


def parallel_gain(m: Measured, step: Sequence[Measured]) -> Optional[Dict[str, Any]]:
    """For a recipe run as N > 1 ranks: its speed-up on the step's degree-1 recipe (the same recipe but
    for the axis the step walks, so the same spec at parallel=none when the step walks `parallel`) and
    the parallel efficiency (speed-up / N). None for a one-process recipe."""
    if m.world_size <= 1:
        return None
    out: Dict[str, Any] = {"world_size": m.world_size}
    one = next((o for o in step if o.world_size == 1 and o.ok), None)
    if not m.ok or one is None:
        out["note"] = "not measured" if not m.ok else "no degree-1 recipe measured in this step"
        return out
    speedup = one.median / m.median
    return {**out, "reference_job": one.job, "speedup": speedup, "efficiency": speedup / m.world_size}


@dataclass
class Step:
    axis: str
    incumbent: Measured
    kept: Measured
    trials: List[Trial] = field(default_factory=list)
    # How the step was measured when not as the ladder's settings say (a parallel recipe in an interleaved
    # ladder: its step runs as separate jobs and is judged by the spread rule), else None.
    note: Optional[str] = None

    @property
    def changed(self) -> bool:
        return self.kept.spec_key != self.incumbent.spec_key
