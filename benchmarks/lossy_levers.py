"""Every lossy lever that runs on the drawn SD model, at two or three settings, against its baseline,
interleaved in one process: paired speed-up with its 95 % interval, PSNR and SSIM of the run's image
against the baseline's (same prompt, same noise), and prompt adherence (the drawn reader's score over
`fidelity.prompts` x `fidelity.seeds`, images the timing calls never drew).

    python benchmarks/lossy_levers.py                       # model=tiny_drawn, 50 DDIM steps, fp32
    python benchmarks/lossy_levers.py --flux                # model=tiny_flux_drawn, 50 flow-Euler steps:
                                                            # the transformer step caches
    python benchmarks/lossy_levers.py run.repeats=9 -- out  # more timed calls; rows under ./out

It measures through the product's own path: each candidate is a composed spec, the group is
`sdbuild.interleave.run_group` (every member built once, timed calls alternated A B C, B C A, ...,
so slow phases of a shared machine fall on all alike), each member's row written as a job writes it
(with its `adherence`, taken after its timed calls under its own settings). The table is printed in
Markdown with the machine's load average before and after; the rows stay in the output folder.

What the figures are: a regression signal for levers on a 3.6 MB model trained on 64x64 digits, not a
measure of any real model's quality. What a cache costs here is what it costs a small network on a
smooth trajectory; a real model's features may move differently.

`deepcache interval=50` is the deliberately broken lever: after the first step it reuses the deep
features every step, so adherence must fall (tests/test_drawn_model.py holds that it does). On Flux
the broken one is `first_block` with a threshold no step's change reaches: after the first step every
step reuses the cached residual of the blocks after the first.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

BASE = ["model=tiny_drawn", "run.steps=50", "run.warmup=1", "run.repeats=5"]
CANDIDATES = {  # label -> overrides on BASE; the first is the baseline (the reference of every pair)
    "baseline (fp32, 50 DDIM steps)": [],
    "deepcache interval 2": ["cache=deepcache", "cache.interval=2"],
    "deepcache interval 3 (default)": ["cache=deepcache"],
    "deepcache interval 5": ["cache=deepcache", "cache.interval=5"],
    "tome ratio 0.3": ["cache=tome", "cache.ratio=0.3"],
    "tome ratio 0.5 (default)": ["cache=tome"],
    "bf16": ["precision=bf16"],
    "int8 weight-only (torchao)": ["quant=int8wo"],
    "25 DDIM steps": ["run.steps=25"],
    "10 DDIM steps": ["run.steps=10"],
    "DPM++ 2M, 20 steps": ["scheduler=dpmpp_2m", "run.steps=20"],
    "broken: deepcache interval 50": ["cache=deepcache", "cache.interval=50"],
}
# The drawn Flux (model=tiny_flux_drawn): diffusers' transformer step caches (cache hooks) at two settings each.
FLUX_BASE = ["model=tiny_flux_drawn", "run.steps=50", "run.warmup=1", "run.repeats=5"]
FLUX_CANDIDATES = {
    "baseline (fp32, 50 flow-Euler steps)": [],
    "first_block threshold 0.05 (default)": ["cache=first_block"],
    "first_block threshold 0.2": ["cache=first_block", "cache.threshold=0.2"],
    "taylorseer interval 5 (default)": ["cache=taylorseer"],
    "taylorseer interval 10": ["cache=taylorseer", "cache.interval=10"],
    "pab interval 2 (default)": ["cache=pab"],
    "pab interval 4": ["cache=pab", "cache.interval=4"],
    "faster_cache interval 2 (default)": ["cache=faster_cache"],
    "mag_cache threshold 0.06 (default)": ["cache=mag_cache"],
    "mag_cache threshold 0.24": ["cache=mag_cache", "cache.threshold=0.24"],
    "25 steps": ["run.steps=25"],
    "10 steps": ["run.steps=10"],
    "broken: first_block threshold 100": ["cache=first_block", "cache.threshold=100"],
}


def main(argv: list[str]) -> int:
    flux = "--flux" in argv
    argv = [a for a in argv if a != "--flux"]
    out = Path(argv[argv.index("--") + 1]) if "--" in argv else Path(tempfile.mkdtemp(prefix="lossy_levers_"))
    extra = argv[:argv.index("--")] if "--" in argv else argv
    base, candidates = (FLUX_BASE, FLUX_CANDIDATES) if flux else (BASE, CANDIDATES)

    import sdbuild
    from sdbuild.errors import SpecError
    from sdbuild.fidelity import compare_files
    from sdbuild.interleave import Member, run_group
    from sdbuild.stats import describe, interval_from_dict

    members, labels = [], []
    for n, (label, overrides) in enumerate(candidates.items()):
        spec_overrides = [*base, *overrides, *extra]
        try:
            spec = sdbuild.compose(spec_overrides)
        except SpecError as exc:
            print(f"skipped {label}: {exc}", file=sys.stderr)
            continue
        members.append(Member(spec, out / str(n), {}, spec_overrides, {"num": n, "output_dir": str(out / str(n))}))
        labels.append(label)
    load_before = os.getloadavg()
    rows = run_group(members, reference=0)
    load_after = os.getloadavg()

    base_image = out / "0" / rows[0]["image"] if rows[0].get("image") else None
    print(f"spec: {' '.join(base + extra)}; interleaved, {len(members)} members; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs); rows in {out}")
    print("| lever | status | median s | speed-up (paired, 95 %) | PSNR dB | SSIM | adherence (images) |")
    print("|---|---|---|---|---|---|---|")
    for label, member, row in zip(labels, members, rows):
        status = row.get("status")
        if status != "ok":
            print(f"| {label} | {status}: {(row.get('error') or '').splitlines()[0][:80]} | | | | | |")
            continue
        median = (row.get("latency_s") or {}).get("median")
        speed = describe(interval_from_dict(row.get("paired"))) if row.get("paired") else "reference"
        psnr = ssim = "-"
        if base_image and row.get("image"):
            f = compare_files(member.out_dir / row["image"], base_image)
            psnr, ssim = ("identical" if f.psnr_db == float("inf") else f"{f.psnr_db:.1f}"), f"{f.ssim:.4f}"
        adh = row.get("adherence") or {}
        score = f"{adh['score']:.3f} ({adh.get('images')})" if adh.get("score") is not None else "-"
        print(f"| {label} | ok | {median:.3f} | {speed} | {psnr} | {ssim} | {score} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
