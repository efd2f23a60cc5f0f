"""The ladder sweeper's settings, registered as `hydra/sweeper=ladder` (Hydra imports this module
when it scans the `hydra_plugins` namespace, so the registration needs no import from the app).

    python -m sdbuild --multirun hydra/sweeper=ladder precision=fp32,bf16 attention=classic,sdpa
    ... hydra.sweeper.psnr_db=30 hydra.sweeper.order=[attention,precision] +hydra.sweeper.start.precision=bf16
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore

from sdbuild.fidelity import FIDELITY_BOUND_DB

# Not `from __future__ import annotations` here: Hydra's plugin scanner executes this module before
# it is in sys.modules, where dataclasses cannot resolve string annotations.
from ._ladder import NoiseRule


@dataclass
class LadderConf:
    _target_: str = "hydra_plugins.sdbuild_ladder.ladder_sweeper.LadderSweeper"
    # Axes from a config file, as the basic sweeper's `params` (`precision: fp32,bf16`); the
    # command line's swept overrides are axes too. The first value of each axis is its baseline.
    params: Optional[Dict[str, str]] = None
    # Axis keys in the order the ladder walks them (each must be swept); unnamed axes follow.
    # Default: _ladder.DEFAULT_ORDER (run.threads, precision, quant, memory_format, attention, memory,
    # vae, scheduler, compile), then the command line's order.
    order: Optional[List[str]] = None
    # Start option per axis (`+hydra.sweeper.start.precision=bf16`: the `+` adds a key to the
    # dict); default: the axis' first value.
    # The start recipe is the baseline: speed-ups and fidelity are measured against it.
    start: Dict[str, str] = field(default_factory=dict)
    # Fidelity bound against the baseline image: a lever is kept only if PSNR >= psnr_db. 50 dB
    # passes the lossless levers (fp32 SDPA, channels-last, tracing, export give identical or
    # near-identical pixels) and stops lossy ones (bf16: ~45 dB on the tiny model, a tiny VAE,
    # fewer steps, quantization) until the user consents with a lower figure (or null: no bound).
    psnr_db: Optional[float] = FIDELITY_BOUND_DB
    # Optional SSIM bound (0..1) beside PSNR, e.g. 0.98; null: reported, not enforced.
    ssim: Optional[float] = None
    # Drawn models (model=tiny_drawn): keep a lever only when the row's prompt adherence (sdbuild.drawn's
    # reader) is at most this far below the baseline's, e.g. 0.05; null: reported, not enforced. Set
    # psnr_db=null beside it to judge lossy levers by what the image shows rather than by its pixels.
    adherence_drop: Optional[float] = None
    # Optional peak memory budget (MB, the row's peak_memory_mb): options above it are not kept.
    memory_mb: Optional[float] = None
    # spread, median, or paired (needs interleave); null: paired with interleave=true, else spread.
    noise: Optional[NoiseRule] = None
    # Also ask for at least this relative gain in median latency (0.05: 5 % faster) to keep a lever.
    min_gain: float = 0.0
    # After the ladder, drop each kept lever once (one batch) to see what it buys in the final
    # recipe; a drop that is faster beyond the noise replaces the winner.
    second_pass: bool = True
    # Where the winner is written as a preset; null: <sweep dir>/preset/ladder.yaml, usable as
    # `hydra.searchpath=[file://<sweep dir>] +preset=ladder`. The preset's name is the file's stem.
    preset_path: Optional[str] = None
    # Measure each step's options together with the current recipe in one process, their timed
    # calls alternated (A B C, B C A, ...), and keep a lever only when the 95 % interval of its
    # paired speed-up beats 1 + min_gain (sdbuild.interleave, sdbuild.stats). Rows from other jobs
    # are not reused: each step measures the current recipe again beside its options.
    interleave: bool = False
    # Interleaved steps: hold at most this many pipelines at once (null: as many as the step has);
    # the options beyond it are alternated with the current recipe alone, one pair at a time.
    max_held: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="ladder", node=LadderConf, provider="sdbuild")


@dataclass
class InterleavedConf:
    """`hydra/sweeper=interleaved`: the basic sweeper's grid, measured as one interleaved group."""

    _target_: str = "hydra_plugins.sdbuild_ladder.interleaved_sweeper.InterleavedSweeper"
    # Axes from a config file, as the basic sweeper's `params`; the command line's swept overrides too.
    params: Optional[Dict[str, str]] = None
    # Hold at most this many pipelines at once (null: the whole grid); the rest are alternated with
    # the first combination (the reference) one pair at a time.
    max_held: Optional[int] = None


ConfigStore.instance().store(group="hydra/sweeper", name="interleaved", node=InterleavedConf, provider="sdbuild")
