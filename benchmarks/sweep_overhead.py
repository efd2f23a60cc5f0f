"""Sweep overhead: what an N-job sweep costs beyond its jobs' warmup and timed calls, per job,
with each job in a fresh process (`isolate=true`, what every default sweep job paid before the
long-lived worker) against the default (one worker per sweep, `sdbuild.worker`), interleaved.

The rest of a sweep is its wall time minus every job's warmup and timed calls: Python's, Hydra's and
torch's start-up, composing, loading weights and building, writing rows, the report. The two modes
run alternately (before, after, after, before, ...: the order flips every round, so a load that
drifts hits both alike), `--rounds` times each, with the in-process sweep (`run.timeout_s=0`: no
time limit, no isolation) as a third, the floor the worker is compared with; it prints each sweep,
the per-job rest's median per mode, the median of the paired ratios (before / after, round by round)
and the worker's rest above the floor, with `uptime` before and after each sweep.

    python benchmarks/sweep_overhead.py                 # the issue's 8 jobs on the tiny model, 3 rounds
    python benchmarks/sweep_overhead.py --rounds 5 precision=fp32,bf16 attention=classic,sdpa

Goal: the worker's rest at most ~1.5 s per job for the default sweep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

DEFAULT = ["attention=classic,sdpa", "memory_format=contiguous,channels_last", "run.seed=0,1", "run.steps=10"]
MODES = {"before (isolate=true: a fresh process per job)": ["isolate=true"], "after (one worker per sweep)": []}
REFERENCE = {"in-process (run.timeout_s=0: no limit, no isolation)": ["run.timeout_s=0"]}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def one_sweep(overrides: List[str], extra: List[str]) -> Dict[str, Any]:
    """Run one sweep; its wall time, the jobs' warmup + timed calls, the rest per job, and the load."""
    with tempfile.TemporaryDirectory() as tmp:
        load_before = uptime()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={tmp}", *overrides, *extra],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rows = [json.loads(p.read_text()) for p in Path(tmp).glob("*/result.json")]
    ok = [r for r in rows if r["status"] == "ok"]
    calls = sum((r["warmup_s"] or 0) + sum(r["latency_s"]["runs"]) for r in ok)
    workers = {(r["job"].get("worker") or {}).get("pid") for r in rows}
    return {"jobs": len(rows), "ok": len(ok), "wall": wall, "calls": calls, "rest_per_job": (wall - calls) / max(len(rows), 1),
            "load_s": sum(r["load_s"] or 0 for r in ok), "workers": len(workers),
            "load": f"{load_before} -> {uptime()}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="sweeps per mode, alternated")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the in-process sweep (run.timeout_s=0), the floor the worker is compared with")
    parser.add_argument("overrides", nargs="*", help=f"the sweep (default: {' '.join(DEFAULT)})")
    args = parser.parse_args()
    overrides = args.overrides or DEFAULT
    modes = {**MODES, **({} if args.no_reference else REFERENCE)}
    names = list(modes)
    seen: Dict[str, List[float]] = {name: [] for name in names}
    print(f"sweep: {' '.join(overrides)}; {args.rounds} rounds, modes alternated", flush=True)
    for round_ in range(args.rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):  # the order flips every round
            got = one_sweep(overrides, modes[name])
            seen[name].append(got["rest_per_job"])
            print(f"round {round_ + 1} {name}: {got['jobs']} jobs ({got['ok']} ok, {got['workers']} process(es)), "
                  f"wall {got['wall']:.1f} s, warmup + timed calls {got['calls']:.1f} s, rest {got['rest_per_job']:.2f} s "
                  f"per job (weights loading {got['load_s']:.2f} s in all); load {got['load']}", flush=True)
    before, after = seen[names[0]], seen[names[1]]
    ratios = [b / a for b, a in zip(before, after) if a > 0]
    print(f"rest per job, median: before {statistics.median(before):.2f} s, after {statistics.median(after):.2f} s; "
          f"paired ratio before/after: median x{statistics.median(ratios):.1f} "
          f"(rounds: {', '.join(f'x{r:.1f}' for r in ratios)})")
    if len(names) > 2:
        floor = seen[names[2]]
        above = [a - f for a, f in zip(after, floor)]
        print(f"in-process reference: rest {statistics.median(floor):.2f} s per job (median); the worker's rest above it, "
              f"paired: median {statistics.median(above):+.2f} s per job (rounds: {', '.join(f'{x:+.2f}' for x in above)})")


if __name__ == "__main__":
    main()
