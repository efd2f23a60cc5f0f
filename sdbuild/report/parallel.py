"""Parallel rows (parallel.world_size > 1) against the same spec at degree 1: speed-up and efficiency.

A parallel row's degree-1 partner is the row of the sweep whose resolved spec is the parallel row's with
the `parallel` group at none (everything else equal: model, run, every lever). Matched on the typed spec
(`spec_key` of the spec without its parallel group, which is how a `parallel=none` spec is keyed), never
on option names. Where the sweep has one:

    speed-up   = partner median / parallel median (above 1: the ranks were faster than one process)
    efficiency = speed-up / world size (1.0: every rank's share fully bought; 0.5: half)

with an interval from both rows' timed calls (`sdbuild.stats.ratio_of_medians`: the two jobs ran one after
the other, so their calls are not paired). Where it has none, the row says so. The row's own
`parallel.fidelity` (its image against the degree-1 image, rendered by the job itself: see
sdbuild/distributed.py) is shown beside it.

Adds to every row: ``parallel_vs_one`` (dict or None) and ``parallel_note`` (why there is none, or None).
"""

from __future__ import annotations

from typing import Any, Optional

from ..spec import ParallelMethod, spec_key
from ..stats import UNPAIRED_METHOD, min_samples, ratio_of_medians

DASH = "—"
NO_PARTNER = "no degree-1 row of this spec in the sweep (add parallel=none to the sweep for its speed-up)"


def method(row: dict) -> Optional[ParallelMethod]:
    """The row's typed parallel method (None: a row from before the group, or an unknown name)."""
    try:
        return ParallelMethod[((row.get("spec") or {}).get("parallel") or {}).get("method")]
    except (KeyError, TypeError):
        return None


def world_size(row: dict) -> int:
    """How many ranks the row's spec runs as (1 for parallel=none and rows from before the group)."""
    p = (row.get("spec") or {}).get("parallel") or {}
    if method(row) in (None, ParallelMethod.none):
        return 1
    size = 1
    for degree in ("ulysses_degree", "ring_degree", "tp_degree"):
        value = p.get(degree)
        size *= value if isinstance(value, int) and value > 0 else 1
    return size


def degree_one_key(row: dict) -> Optional[str]:
    """The spec key of the row's spec at parallel=none: what its degree-1 partner is keyed as."""
    spec = row.get("spec")
    if not spec:
        return None
    return spec_key({k: v for k, v in spec.items() if k != "parallel"})


def annotate(rows: list[dict], usable) -> None:
    """Set ``parallel_vs_one`` and ``parallel_note`` on every row (in place); `usable(row)`: an ok row
    with a trustworthy image (the report's rule for a speed-up)."""
    by_key: dict[str, dict] = {}
    for row in rows:
        row.update(parallel_vs_one=None, parallel_note=None)
        if row.get("spec") and world_size(row) == 1:
            by_key.setdefault(spec_key(row["spec"]), row)  # the first row of a spec, as the report lists them
    for row in rows:
        size = world_size(row)
        if size == 1 or not row.get("latency_s"):
            continue
        partner = by_key.get(degree_one_key(row))
        if partner is None:
            row["parallel_note"] = NO_PARTNER
        elif not usable(partner):
            row["parallel_note"] = (f"its degree-1 row (job {partner['job']}) is {partner['status']}"
                                    f"{' (broken image)' if partner.get('broken') else ''}: no speed-up")
        elif not usable(row):
            row["parallel_note"] = f"this row is {row['status']}: no speed-up on its degree-1 row (job {partner['job']})"
        else:
            row["parallel_vs_one"] = compare(row, partner, size)


def compare(row: dict, partner: dict, size: int) -> dict[str, Any]:
    """Speed-up and efficiency of `row` (world size `size`) on its degree-1 `partner`, with intervals."""
    runs, partner_runs = row["latency_s"].get("runs") or [], partner["latency_s"].get("runs") or []
    if runs and partner_runs:
        s = ratio_of_medians(partner_runs, runs)
        median, low, high, n, confidence = s.median, s.low, s.high, s.n, s.confidence
    else:  # rows without their calls (never written by a job today): the medians alone
        median, low, high, n, confidence = partner["latency_s"]["median"] / row["latency_s"]["median"], None, None, 0, 0.0
    return {"reference_job": partner["job"], "world_size": size, "speedup": median, "low": low, "high": high,
            "n": n, "confidence": confidence, "efficiency": median / size,
            "efficiency_low": None if low is None else low / size,
            "efficiency_high": None if high is None else high / size,
            "noisy": bool(row.get("noisy") or partner.get("noisy")), "method": UNPAIRED_METHOD}


def fmt_speedup(row: dict) -> str:
    """`x1.23 (1.05–1.40, 95%) on job 0`, or why there is none (blank for degree-1 rows)."""
    v = row.get("parallel_vs_one")
    if v is None:
        return "none: " + row["parallel_note"] if row.get("parallel_note") else DASH
    if v["low"] is None:
        interval = f"no 95% interval at {v['n']} calls; needs {min_samples(0.975)} in each row"
    else:
        interval = f"{v['low']:.2f}–{v['high']:.2f}, 95%"
    return f"x{v['speedup']:.2f} ({interval}) on job {v['reference_job']}" + (" (noisy)" if v["noisy"] else "")


def fmt_efficiency(row: dict) -> str:
    """`0.62 of 2 ranks (0.52–0.70)`."""
    v = row.get("parallel_vs_one")
    if v is None:
        return DASH
    interval = "" if v["efficiency_low"] is None else f" ({v['efficiency_low']:.2f}–{v['efficiency_high']:.2f})"
    return f"{v['efficiency']:.2f} of {v['world_size']} ranks{interval}"


def fmt_fidelity(row: dict) -> str:
    """The row's own comparison with the degree-1 image: `max abs diff 1.5e-06 (tolerance 1e-04: within)`."""
    f = (row.get("parallel") or {}).get("fidelity")
    if not f:
        return DASH
    if f.get("error"):
        return "not measured: " + str(f["error"])
    said = f"max abs diff {f['max_abs_diff']:.2g}, SSIM {f['ssim']:.4f}"
    if f.get("tolerance") is None:
        return said + f" (no measured tolerance for {f.get('dtype') or 'this precision'})"
    return said + f" (tolerance {f['tolerance']:g}: {'within' if f['within_tolerance'] else 'OUTSIDE'})"


def has_parallel(rows: list[dict]) -> bool:
    return any(world_size(r) > 1 for r in rows)


METHOD = ("Parallel rows (parallel.world_size > 1): speed-up = median of the same spec at degree 1 (parallel=none, "
          "everything else equal) / the row's median, efficiency = speed-up / world size; the 95% interval divides "
          "each median's own interval (the two jobs ran one after the other, so their calls are not paired, and "
          "the interval holds only as far as the machine stayed the same). Fidelity to degree 1: the job renders "
          "the degree-1 image itself, after its timed calls, and compares the two float images (pixels in [0, 1], "
          "before the PNG).")


def csv_record(row: dict) -> dict[str, Any]:
    """The parallel columns of results.csv."""
    v, f = row.get("parallel_vs_one") or {}, (row.get("parallel") or {}).get("fidelity") or {}
    return {"parallel_world_size": world_size(row) if row.get("spec") else None,
            "parallel_speedup": v.get("speedup"), "parallel_speedup_low": v.get("low"),
            "parallel_speedup_high": v.get("high"), "parallel_efficiency": v.get("efficiency"),
            "parallel_reference_job": v.get("reference_job"), "parallel_note": row.get("parallel_note"),
            "parallel_max_abs_diff": f.get("max_abs_diff"), "parallel_ssim": f.get("ssim")}


CSV_COLUMNS = tuple(csv_record({}).keys())
