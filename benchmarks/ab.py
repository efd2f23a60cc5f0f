"""Two sdbuild specs, A and B, built in one process and called in alternation (A B A B ...), so
drift in machine speed hits both alike; prints each side's median and B's paired speed-up on A
with its exact 95 % interval (`sdbuild.stats`, the same rule as `hydra/sweeper=interleaved`).

    python benchmarks/ab.py                                        # the README's CPU example
    python benchmarks/ab.py --a precision=fp32 --b precision=bf16 --rounds 9

Used for the README's claim that its CPU example is a win on a CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="*", default=[], help="overrides of A (default: the defaults, fp32 baseline)")
    parser.add_argument("--b", nargs="*", default=["memory_format=channels_last", "attention=sdpa", "compile=trace"],
                        help="overrides of B (default: the README's CPU example)")
    parser.add_argument("--rounds", type=int, default=11, help="alternating timed calls per side")
    args = parser.parse_args()

    import torch

    import sdbuild
    from sdbuild.builder import build_pipeline
    from sdbuild.measure import timed_call
    from sdbuild.run_inputs import call_kwargs
    from sdbuild.stats import describe, paired_ratios, paired_speedup

    sides = []
    for overrides in (args.a, args.b):
        spec = sdbuild.compose(overrides)
        pipe, info = build_pipeline(spec)
        kwargs = call_kwargs(spec, pipe, info.device)
        pipe(**kwargs)  # warmup (and a traced graph's first run)
        sides.append((pipe, kwargs, info.device, []))
    for _ in range(args.rounds):
        for pipe, kwargs, device, times in sides:
            times.append(timed_call(lambda: pipe(**kwargs), device)[0])

    (_, _, device, a), (_, _, _, b) = sides
    load = os.getloadavg()[0]
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"machine: {name}; load average {load:.1f}; torch {torch.__version__}; {args.rounds} rounds")
    print(f"A {' '.join(args.a) or '(defaults)'}: median {statistics.median(a):.4f} s")
    print(f"B {' '.join(args.b) or '(defaults)'}: median {statistics.median(b):.4f} s")
    ratios = sorted(paired_ratios(a, b))
    print(f"speed-up of B over A, paired: {describe(paired_speedup(a, b))}; "
          f"per round min x{ratios[0]:.2f}, max x{ratios[-1]:.2f}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"benchmark wall time {time.perf_counter() - start:.1f} s")
