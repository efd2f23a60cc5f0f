"""sdbuild's overhead: its built pipeline and measurement against the same pipeline written by hand.

Both pipelines are loaded from the same folder in one process and called in alternation
(sdbuild, hand, sdbuild, hand, ...) so drift in machine speed hits both alike. sdbuild's side
goes through its real measurement path (`sdbuild.measure.measure`, with the CPU memory sampler
thread); the hand-written side is a bare `time.perf_counter` around `pipe(...)`.

    python benchmarks/overhead.py                       # tiny model, CPU, fp32 + classic attention
    python benchmarks/overhead.py attention=sdpa run.steps=20 --rounds 15
    python benchmarks/overhead.py model=sd15_arch precision=fp16 attention=sdpa   # on a GPU

Prints the median latency of each and the ratio sdbuild / hand (goal: <= 1.02).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def hand_written(spec, device: str):
    """What a user types from diffusers' docs for this spec (precision, scheduler, attention only)."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from sdbuild.models import ensure_model

    dtype = getattr(torch, spec.precision.dtype.value)
    pipe = StableDiffusionPipeline.from_pretrained(ensure_model(spec.model, spec.cache_dir), torch_dtype=dtype,
                                                   use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, spec.scheduler.kind.value).from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    processor = {"classic": AttnProcessor, "sdpa": AttnProcessor2_0}[spec.attention.name]
    pipe.unet.set_attn_processor(processor())
    pipe.vae.set_attn_processor(processor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="sdbuild overrides (precision, attention, scheduler, model, run.*)")
    parser.add_argument("--rounds", type=int, default=11, help="alternating timed calls per side")
    args = parser.parse_args()

    import sdbuild
    from sdbuild.builder import build_pipeline
    from sdbuild.measure import timed_call, measure
    from sdbuild.run_inputs import call_kwargs

    spec = sdbuild.compose(args.overrides)
    if spec.compile.name != "none" or spec.memory_format.name != "contiguous":
        parser.error("the hand-written side covers precision, scheduler and attention (classic/sdpa) only")
    ours, info = build_pipeline(spec)
    device = info.device
    theirs = hand_written(spec, device)

    for pipe in (ours, theirs):  # warm both up (allocator, caches)
        pipe(**call_kwargs(spec, pipe, device))

    ours_s, theirs_s = [], []
    for _ in range(args.rounds):
        m = measure(ours, lambda: call_kwargs(spec, ours, device), device, warmup=0, repeats=1, show_progress=False)
        ours_s.append(m.runs_s[0])
        kwargs = call_kwargs(spec, theirs, device)
        theirs_s.append(timed_call(lambda: theirs(**kwargs), device)[0])

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    ours_med, theirs_med = statistics.median(ours_s), statistics.median(theirs_s)
    print(f"machine: {name}; torch {torch.__version__}; spec: {' '.join(args.overrides) or '(defaults)'}; "
          f"{spec.run.steps} steps; {args.rounds} alternating rounds")
    print(f"sdbuild median {ours_med:.4f} s | hand-written median {theirs_med:.4f} s | "
          f"ratio sdbuild/hand = {ours_med / theirs_med:.4f} ({(ours_med / theirs_med - 1) * 100:+.2f}%)")
    pair_ratios = [a / b for a, b in zip(ours_s, theirs_s)]
    print(f"per-round ratios: median {statistics.median(pair_ratios):.4f}, "
          f"min {min(pair_ratios):.4f}, max {max(pair_ratios):.4f} (the spread is this machine's noise)")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"benchmark wall time {time.perf_counter() - start:.1f} s")
