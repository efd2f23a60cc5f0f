"""Each cache option against no cache on one model, interleaved in one process: speed-up (paired),
fidelity (PSNR, SSIM against the no-cache image, same noise) and the work done (a transformer's
attention computations, a UNet's down-block resnet calls).

    python benchmarks/cache_levers.py                          # tiny_flux, 50 steps, 7 rounds
    python benchmarks/cache_levers.py model=tiny               # deepcache, tome (the unetcache extra)
    python benchmarks/cache_levers.py model=flux_arch precision=bf16 run.steps=28 run.height=1024 run.width=1024 -- 3

Every candidate is built once; then each round calls every candidate once, in a rotated order
(A B C, B C A, ...), so slow phases of a shared machine fall on all of them alike. The speed-up is
the median over rounds of (no-cache time / option time) within the round. The machine's load
average is printed before and after.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

TRANSFORMER_CANDIDATES = {
    "none": ["cache=none"],
    "first_block (threshold 0.5)": ["cache=first_block", "cache.threshold=0.5"],
    "first_block (threshold 0.05, default)": ["cache=first_block"],
    "taylorseer (interval 5, warmup 3)": ["cache=taylorseer"],
    "pab (interval 2, timesteps 100-800)": ["cache=pab"],
    "mag_cache (threshold 0.06, FLUX.1-dev ratios)": ["cache=mag_cache"],
    "faster_cache (interval 2, timesteps 100-800, weight 0.5)": ["cache=faster_cache"],
}
UNET_CANDIDATES = {  # needs the unetcache extra
    "none": ["cache=none"],
    "deepcache (interval 3, branch 0)": ["cache=deepcache"],
    "tome (ratio 0.5)": ["cache=tome"],
}


def work_counter(pipe) -> dict:
    """Attention computations in a transformer's blocks, or the UNet's down-block resnet calls."""
    count = {"calls": 0}
    bump = lambda *_: count.__setitem__("calls", count["calls"] + 1)
    if getattr(pipe, "transformer", None) is not None:
        t = pipe.transformer
        for block in [*t.transformer_blocks, *getattr(t, "single_transformer_blocks", [])]:
            block.attn.to_q.register_forward_hook(bump)
    else:
        for block in pipe.unet.down_blocks:
            for resnet in block.resnets:
                resnet.register_forward_hook(bump)
    return count


def main() -> None:
    args = sys.argv[1:]
    rounds = int(args[args.index("--") + 1]) if "--" in args else 7
    overrides = args[:args.index("--")] if "--" in args else args
    overrides = overrides or ["model=tiny_flux"]
    import sdbuild
    from sdbuild.builder import build_pipeline
    from sdbuild.fidelity import compare
    from sdbuild.run_inputs import call_kwargs

    from sdbuild.families import family_of

    base = ["run.steps=50", *overrides]
    candidates = TRANSFORMER_CANDIDATES if family_of(sdbuild.compose(base)).transformer else UNET_CANDIDATES
    built = {}
    for name, extra in candidates.items():
        spec = sdbuild.compose([*base, *extra])
        pipe, info = build_pipeline(spec)
        count = work_counter(pipe)
        pipe(**call_kwargs(spec, pipe, info.device))  # warmup
        built[name] = (spec, pipe, info.device, count)
    times = {name: [] for name in built}
    images, calls = {}, {}
    load_before = os.getloadavg()
    names = list(built)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            spec, pipe, device, count = built[name]
            count["calls"] = 0
            kwargs = call_kwargs(spec, pipe, device)
            start = time.perf_counter()
            images[name] = pipe(**kwargs).images
            times[name].append(time.perf_counter() - start)
            calls[name] = count["calls"]
    load_after = os.getloadavg()
    u8 = lambda x: (x[0] * 255).round()
    print(f"spec: {' '.join(base)}; {rounds} interleaved rounds; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    print("| cache | block calls | median s | speed-up (paired median, range) | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|")
    for name in names:
        ratios = [a / b for a, b in zip(times["none"], times[name])]
        f = compare(u8(images[name]), u8(images["none"]))
        print(f"| {name} | {calls[name]} | {statistics.median(times[name]):.3f} | x{statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {f.psnr_db:.1f} | {f.ssim:.4f} |")


if __name__ == "__main__":
    main()
