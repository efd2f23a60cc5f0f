"""Cold vs warm start of a compiled spec: the same run twice, each in a fresh process, sharing
one persistent compile cache folder (`compile.cache_dir`). Prints both warmup times side by side.

    python benchmarks/compile_cache.py                                  # compile=inductor_cached, tiny model
    python benchmarks/compile_cache.py compile=regional model=sd15_arch  # any compiled spec, on a GPU

The first process compiles and writes the cache; the second finds its graphs there (the row's
`compile_cache` shows Inductor's FX-graph cache hits and misses).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    overrides = sys.argv[1:] or ["compile=inductor_cached"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in ("cold", "warm"):
            out = Path(tmp) / name
            subprocess.run([sys.executable, "-m", "sdbuild", *overrides, f"compile.cache_dir={tmp}/cache",
                            "run.warmup=1", "run.repeats=3", f"hydra.run.dir={out}"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append(json.loads((out / "result.json").read_text()))
    cold, warm = rows
    print(f"machine: {cold['env']['device_name']}; spec: {' '.join(overrides)}")
    print(f"{'':6} {'warmup (s)':>11} {'median (s)':>11}  cache hits/misses")
    for name, row in (("cold", cold), ("warm", warm)):
        cache = row["compile_cache"] or {}
        print(f"{name:6} {row['warmup_s']:11.2f} {row['latency_s']['median']:11.4f}  "
              f"{cache.get('fxgraph_cache_hit')}/{cache.get('fxgraph_cache_miss')}")
    print(f"warm start: warmup x{cold['warmup_s'] / warm['warmup_s']:.1f} shorter")


if __name__ == "__main__":
    main()
