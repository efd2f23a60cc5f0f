"""Speed-ups you can bet on: paired ratios and a distribution-free interval for their median.

Two recipes measured in alternation (A B A B ..., see `sdbuild.measure.measure_group`) give pairs
of calls that saw the same machine: call i of the reference and call i of the candidate. The
speed-up is the median of the paired ratios `reference_i / candidate_i` (above 1: the candidate
is faster), and its 95 % interval is the exact order-statistic (sign-test) interval of a median:
with the n ratios sorted, [r_(k), r_(n+1-k)] covers the true median with probability
1 - 2 P(Binomial(n, 1/2) <= k - 1), whatever the distribution of the noise. It needs no random
numbers (the same calls always give the same interval) and at least 6 pairs: below that, even
[min, max] covers less than 95 %, so no 95 % interval exists and nothing can be called faster.

This module imports neither torch nor numpy: rows can be judged anywhere.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

CONFIDENCE = 0.95
METHOD = "exact order-statistic interval of the median (sign test)"


def _coverage(n: int, k: int) -> float:
    """Probability that [x_(k), x_(n+1-k)] of n samples covers their distribution's median."""
    tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return 1.0 - 2.0 * tail


def min_samples(confidence: float = CONFIDENCE) -> int:
    """The fewest samples for which [min, max] already covers the median with `confidence`."""
    n = 1
    while _coverage(n, 1) < confidence:
        n += 1
    return n


@dataclass(frozen=True)
class Interval:
    """The median of n values and its interval at `confidence` (low/high None: too few values)."""

    median: float
    low: Optional[float]
    high: Optional[float]
    n: int
    confidence: float  # the interval's exact coverage (>= the confidence asked for)

    @property
    def bounded(self) -> bool:
        return self.low is not None and self.high is not None

    def relative_half_width(self) -> float:
        """The larger distance from the median to a bound, relative to the median (inf: unbounded)."""
        if not self.bounded or self.median == 0:
            return math.inf
        return max(self.median - self.low, self.high - self.median) / abs(self.median)

    def to_dict(self) -> Dict[str, Any]:
        return {"median": self.median, "low": self.low, "high": self.high, "n": self.n,
                "confidence": self.confidence, "method": METHOD}


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median of `values` and its exact order-statistic interval (see the module's text)."""
    if not values:
        raise ValueError("median_interval needs at least one value")
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    k = 0
    while k + 1 <= (n + 1) // 2 and _coverage(n, k + 1) >= confidence:
        k += 1
    if k == 0:  # even [min, max] covers less than asked: no interval at this confidence
        return Interval(statistics.median(ordered), None, None, n, _coverage(n, 1) if n else 0.0)
    return Interval(statistics.median(ordered), ordered[k - 1], ordered[n - k], n, _coverage(n, k))


def paired_ratios(reference: Sequence[float], candidate: Sequence[float]) -> list[float]:
    """`reference_i / candidate_i` for each pair of calls (above 1: the candidate was faster)."""
    if len(reference) != len(candidate):
        raise ValueError(f"paired calls need as many calls of each: {len(reference)} and {len(candidate)}")
    if any(c <= 0 for c in candidate):
        raise ValueError("a call time must be positive")
    return [r / c for r, c in zip(reference, candidate)]


def paired_speedup(reference: Sequence[float], candidate: Sequence[float],
                   confidence: float = CONFIDENCE) -> Interval:
    """The candidate's speed-up on the reference: median of the paired ratios, with its interval."""
    return median_interval(paired_ratios(reference, candidate), confidence)


def distinguishable(speedup: Optional[Interval], min_gain: float = 0.0) -> bool:
    """Whether the speed-up is real: its interval's lower bound beats 1 + min_gain."""
    return speedup is not None and speedup.low is not None and speedup.low > 1.0 + min_gain


def interval_from_dict(data: Optional[Dict[str, Any]]) -> Optional[Interval]:
    """The Interval recorded in a row (its `paired` field), or None."""
    if not data or data.get("median") is None or data.get("n") is None:
        return None
    return Interval(float(data["median"]), data.get("low"), data.get("high"), int(data["n"]),
                    float(data.get("confidence") or 0.0))


def describe(speedup: Optional[Interval]) -> str:
    """`x1.23 (1.18–1.29, 95 %, 12 pairs)`, or why there is no interval."""
    if speedup is None:
        return "—"
    if not speedup.bounded:
        return f"x{speedup.median:.2f} (no 95% interval at {speedup.n} calls; needs {min_samples()})"
    return f"x{speedup.median:.2f} ({speedup.low:.2f}–{speedup.high:.2f}, {speedup.n} pairs)"


UNPAIRED_METHOD = ("ratio of two medians measured apart; interval from each median's exact order-statistic "
                   "interval at 1 - (1 - confidence) / 2 (Bonferroni: both hold together with >= confidence)")


def ratio_of_medians(reference: Sequence[float], candidate: Sequence[float],
                     confidence: float = CONFIDENCE) -> Interval:
    """median(reference) / median(candidate) for calls that were NOT paired (two jobs measured one after the
    other, e.g. a parallel job and its degree-1 partner): no call of one saw the same machine as a call of
    the other, so there are no paired ratios. The interval divides the bounds of each median's own
    interval, each taken at 1 - (1 - confidence) / 2, so that both cover their medians at once with at least
    `confidence` (whatever the two distributions): [ref.low / cand.high, ref.high / cand.low]. It holds only
    as far as the machine stayed the same between the two jobs. n is the smaller sample; without enough
    calls in either (min_samples at the stricter level: 7) low and high are None."""
    if any(c <= 0 for c in candidate):
        raise ValueError("a call time must be positive")
    each = 1.0 - (1.0 - confidence) / 2
    ref, cand = median_interval(reference, each), median_interval(candidate, each)
    ratio = ref.median / cand.median
    n = min(ref.n, cand.n)
    if not (ref.bounded and cand.bounded):
        return Interval(ratio, None, None, n, 0.0)
    return Interval(ratio, ref.low / cand.high, ref.high / cand.low, n, 1.0 - (1.0 - ref.confidence) - (1.0 - cand.confidence))
