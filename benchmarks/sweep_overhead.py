"""Sweep overhead: wall time of an N-job sweep against the sum of its jobs' own measured time.

A job's own time is what it measures: load + build + warmup + timed runs. Everything else
(Python and Hydra start-up, imports, composing, writing rows, the report) is overhead.

    python benchmarks/sweep_overhead.py            # 8 jobs on the tiny model (2 x 2 x 2)
    python benchmarks/sweep_overhead.py run.steps=20 precision=fp32,bf16 attention=classic,sdpa

Goal: ratio wall / jobs' own time < 1.3 for N = 8.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ["precision=fp32,bf16", "attention=classic,sdpa", "memory_format=contiguous,channels_last"]


def main() -> None:
    overrides = sys.argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={tmp}", *overrides],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rows = [json.loads(p.read_text()) for p in Path(tmp).glob("*/result.json")]
    own = sum((r["load_s"] or 0) + (r["build_s"] or 0) + (r["warmup_s"] or 0) + sum(r["latency_s"]["runs"])
              for r in rows if r["status"] == "ok")
    print(f"{len(rows)} jobs ({sum(r['status'] == 'ok' for r in rows)} ok): sweep wall {wall:.1f} s, "
          f"jobs' own time {own:.1f} s, ratio {wall / own:.2f} (overhead {wall - own:.1f} s)")
    loads = [r["load_s"] for r in rows if r["load_s"]]
    print(f"weights loaded {len(loads)} times, {sum(loads):.2f} s in all")


if __name__ == "__main__":
    main()
