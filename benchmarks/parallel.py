"""Degree 1 against degree N on the same spec, interleaved call by call: one image over N ranks
(parallel=ulysses by default) against one process, on tiny Flux with gloo on a CPU (nccl on GPUs).

    python benchmarks/parallel.py                         # tiny Flux, Ulysses over 2 ranks, 9 rounds
    python benchmarks/parallel.py --rounds 11 --overrides model=tiny_flux run.steps=4 run.height=128 run.width=128

How: torch's elastic launcher (what `torchrun --standalone` runs, as sdbuild.distributed does) starts N
ranks. Every rank builds the spec's pipeline with diffusers' parallelism (sdbuild's builder, the
`parallel` step); rank 0 also builds the same spec at degree 1 (parallel=none). Each round is one
parallel call (a barrier first, on every rank) and one degree-1 call on rank 0 alone, in alternating
order (P 1, 1 P, ...), while the other ranks wait in a barrier; so call i of each saw the same machine,
and the speed-up is the median of the paired ratios with its exact 95 % interval (sdbuild.stats, as
hydra/sweeper=interleaved reports). Efficiency = speed-up / N. The degree-1 call gets what a
degree-1 job gets by default (all the machine's cores as torch threads), each rank its share
(cores / N). The waiting ranks' CPU time during the degree-1 calls is printed: a waiting rank that
spins would take cores from the degree-1 call.

On a CPU the figure says little about parallelism. On 2 shared cores no speed-up is expected: the 2
ranks split the same 2 cores the degree-1 call uses alone, add an all-to-all over loopback around every
attention, and the tiny model's calls are short enough that this overhead is most of them; other
processes on the machine (see the load average printed) make it noisier still. On a GPU node, with one
GPU per rank, it is the real figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DEFAULT_OVERRIDES = ["model=tiny_flux", "run.steps=2", "parallel=ulysses", "parallel.ulysses_degree=2"]


def bench_rank(overrides: list[str], rounds: int, warmup: int) -> dict:
    """One rank: build, warm up, then `rounds` alternating parallel / degree-1 calls; rank 0's times."""
    import dataclasses
    import datetime

    import torch
    import torch.distributed as dist

    import sdbuild
    from sdbuild.builder import build_pipeline
    from sdbuild.distributed import comm_backend, rank_threads
    from sdbuild.measure import apply_threads, timed_call
    from sdbuild.run_inputs import call_kwargs, pipeline_call
    from sdbuild.spec import ParallelSpec

    spec = sdbuild.compose(overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    share = rank_threads(spec) if device == "cpu" else None
    apply_threads(share)
    dist.init_process_group(comm_backend(spec, device), timeout=datetime.timedelta(seconds=1800))
    try:
        pipe, _ = build_pipeline(spec, device)
        par = pipeline_call(spec, pipe)
        if rank == 0:
            single = dataclasses.replace(spec, parallel=ParallelSpec())
            one_pipe, _ = build_pipeline(single, device)
            one = pipeline_call(single, one_pipe)

        def parallel_call() -> float:
            dist.barrier()
            return timed_call(lambda: par(**call_kwargs(spec, pipe, device)), device)[0]

        def degree_one_call():
            """Rank 0 calls the degree-1 pipeline with every core; the others wait (their CPU time returned)."""
            dist.barrier()
            if rank != 0:
                cpu = time.process_time()
                dist.barrier()
                return time.process_time() - cpu
            if device == "cpu":
                torch.set_num_threads(os.cpu_count() or 1)
            seconds = timed_call(lambda: one(**call_kwargs(single, one_pipe, device)), device)[0]
            if device == "cpu":
                torch.set_num_threads(share)
            dist.barrier()
            return seconds

        for _ in range(warmup):
            parallel_call()
            degree_one_call()
        times = {"parallel": [], "one": [], "waiting_cpu_s": []}
        for i in range(rounds):
            for kind in (("parallel", "one") if i % 2 == 0 else ("one", "parallel")):
                seconds = parallel_call() if kind == "parallel" else degree_one_call()
                if kind == "parallel" or rank == 0:
                    times[kind].append(seconds)
                else:
                    times["waiting_cpu_s"].append(seconds)
        return {"rank": rank, "device": device, "threads": share, "world_size": dist.get_world_size(), **times}
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overrides", nargs="*", default=DEFAULT_OVERRIDES, help="the spec (with its parallel group)")
    parser.add_argument("--rounds", type=int, default=9, help="timed calls of each (6 at least for a 95%% interval)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    import torch
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import sdbuild
    from sdbuild.models import ensure_model
    from sdbuild.stats import describe, paired_speedup

    spec = sdbuild.compose(args.overrides)
    n = spec.parallel.world_size
    if n < 2:
        sys.exit(f"benchmarks/parallel.py: the spec runs as {n} rank; give a parallel group, e.g. parallel=ulysses")
    from sdbuild.validate import validate

    validate(spec)  # the same refusals as a job, before anything starts
    ensure_model(spec.model, spec.cache_dir)  # once, before the ranks
    load_before = os.getloadavg()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdbuild-parallel-bench-{os.getpid()}"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"bench-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(logs)))
    from importlib import import_module

    bench = import_module(Path(__file__).stem)  # by module name: the spawned ranks unpickle parallel.bench_rank
    started = time.perf_counter()
    out = elastic_launch(config, bench.bench_rank)(args.overrides, args.rounds, args.warmup)
    zero = out[0]
    one, par = zero["one"], zero["parallel"]
    s = paired_speedup(one, par)
    load_after = os.getloadavg()
    waiting = [c for r, v in out.items() if r != 0 for c in v["waiting_cpu_s"]]
    machine = (torch.cuda.get_device_name(0) if zero["device"] == "cuda"
               else f"CPU, {os.cpu_count()} cores: degree 1 with {os.cpu_count()} torch threads, each rank {zero['threads']}")
    print(f"machine: {machine}; torch {torch.__version__}; load average (1, 5, 15 min) before "
          f"{', '.join(f'{x:.1f}' for x in load_before)}, after {', '.join(f'{x:.1f}' for x in load_after)}")
    print(f"spec: {' '.join(args.overrides)}; {n} ranks; {args.rounds} rounds, interleaved")
    others = ", ".join(f"{statistics.median(v['parallel']):.4f}" for r, v in sorted(out.items()) if r != 0)
    print(f"degree 1: median {statistics.median(one):.4f} s; degree {n}: median {statistics.median(par):.4f} s "
          f"(rank 0; the other ranks' medians: {others} s)")
    print(f"speed-up of degree {n} over degree 1, paired: {describe(s)}")
    low = "" if s.low is None else f" ({s.low / n:.2f}-{s.high / n:.2f})"
    print(f"parallel efficiency (speed-up / {n}): {s.median / n:.2f}{low}")
    if waiting:
        print(f"waiting ranks' CPU time per degree-1 call: median {statistics.median(waiting):.4f} s "
              f"(of {statistics.median(one):.4f} s)")
    print(f"benchmark wall time {time.perf_counter() - started:.1f} s after the model cache; "
          f"times: {json.dumps({'one': one, 'parallel': par})}")


if __name__ == "__main__":
    main()
