"""The cache group on the tiny Flux: each option does less work over a 20-step call, exactly as it
promises, and its image moves from the no-cache image by no more than the stated PSNR."""

import numpy as np
import pytest

import sdbuild
from sdbuild.builder import build_pipeline
from sdbuild.errors import SpecError
from sdbuild.fidelity import compare
from sdbuild.validate import validate

from helpers import CPU, composed, run

STEPS = 20
# Measured on the tiny Flux (random weights, 20 steps, seed 0): first_block at threshold 0.5 ~52 dB,
# taylorseer (interval 5, 3 warmup steps, order 1) ~61 dB. The bounds leave room for other
# platforms' float rounding, not for a lever that breaks the image.
MIN_PSNR_DB = {"first_block": 35.0, "taylorseer": 40.0}
# The tiny model's random weights move the first block's residual by more than diffusers' default
# threshold (0.05) at every step, so nothing would be skipped; 0.5 lets it skip (see docs/models-and-caching.md).
TINY_THRESHOLD = "cache.threshold=0.5"


def attention_calls(pipe) -> dict:
    """A counter of attention computations in the transformer's blocks (the to_q projection of each
    block's attention runs once per computed block; a cached or predicted block skips it)."""
    count = {"calls": 0}
    for blocks in (pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks):
        for block in blocks:
            block.attn.to_q.register_forward_hook(lambda *_: count.__setitem__("calls", count["calls"] + 1))
    return count


def counted_run(*overrides, twice=False):
    spec = sdbuild.compose(["model=tiny_flux", f"run.steps={STEPS}", "run.warmup=0", "run.repeats=1", *overrides])
    pipe, _ = build_pipeline(spec)
    count = attention_calls(pipe)
    images = run(spec, pipe)
    first = count["calls"]
    if twice:  # the hooks' state is reset after every call (warmup, then timed calls): same work, same image
        again = run(spec, pipe)
        assert count["calls"] == 2 * first
        np.testing.assert_array_equal(images, again)
    return first, images, pipe


@pytest.fixture(scope="module")
def no_cache():
    calls, images, pipe = counted_run()
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert calls == STEPS * blocks  # every block, every step
    return calls, images, blocks


def psnr(images, reference) -> float:
    u8 = lambda x: (x[0] * 255).round()
    return compare(u8(images), u8(reference)).psnr_db


def test_first_block_cache_skips_all_but_the_first_block_on_cached_steps(no_cache):
    base_calls, base_images, blocks = no_cache
    calls, images, _ = counted_run("cache=first_block", TINY_THRESHOLD, twice=True)
    # The first block runs at every step; the others only on the steps that are computed in full.
    full_steps, rest = divmod(calls - STEPS, blocks - 1)
    assert rest == 0 and 1 <= full_steps < STEPS, (calls, base_calls)
    assert calls < base_calls
    assert np.abs(images - base_images).max() > 0  # lossy: not the no-cache image ...
    assert psnr(images, base_images) >= MIN_PSNR_DB["first_block"]  # ... but close to it


def test_first_block_cache_threshold_is_the_knob(no_cache):
    base_calls, _, _ = no_cache
    loose, _, _ = counted_run("cache=first_block", "cache.threshold=2.0")
    default, _, _ = counted_run("cache=first_block")  # diffusers' 0.05: the tiny model's residual moves more
    assert loose < default <= base_calls  # a looser threshold skips more


def taylorseer_computed_steps(steps: int, interval: int, warmup: int) -> int:
    """Steps TaylorSeer computes in full: the warmup ones, then one every `interval` (arXiv:2503.06923;
    diffusers' schedule: step s is computed when s < warmup or (s - warmup - 1) % interval == 0)."""
    return sum(1 for s in range(steps) if s < warmup or (s - warmup - 1) % interval == 0)


@pytest.mark.parametrize("interval,warmup", [(5, 3), (3, 2)])
def test_taylorseer_computes_attention_only_on_its_full_steps(no_cache, interval, warmup):
    base_calls, base_images, blocks = no_cache
    calls, images, _ = counted_run("cache=taylorseer", f"cache.interval={interval}", f"cache.warmup_steps={warmup}",
                                   twice=interval == 5)
    assert calls == blocks * taylorseer_computed_steps(STEPS, interval, warmup) < base_calls
    assert np.abs(images - base_images).max() > 0
    assert psnr(images, base_images) >= MIN_PSNR_DB["taylorseer"]


@pytest.mark.parametrize("option", ["first_block", "taylorseer"])
@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_a_transformer_cache_on_a_unet_is_refused_with_what_to_use(option, model):
    with pytest.raises(SpecError) as err:
        validate(composed(f"model={model}", f"cache={option}"), CPU)
    text = str(err.value)
    assert f"cache={option}" in text and "model family flux" in text and "model=tiny_flux" in text


def test_a_cache_on_a_unet_is_refused_before_any_weights_load(tmp_path):
    spec = sdbuild.compose(["model=tiny", "cache=first_block", f"cache_dir={tmp_path / 'models'}", "run.steps=2"])
    row = sdbuild.run(spec, tmp_path / "run")
    assert row["status"] == "unsupported" and "cache=first_block" in row["error"]
    assert not (tmp_path / "models").exists()


def test_the_report_compares_a_cache_row_with_the_no_cache_baseline():
    """The no-cache row is the reference; a cache row is not (it is a lever, compared against it)."""
    from sdbuild.report.analyse import is_reference
    from sdbuild.spec import spec_to_dict

    plain = {"spec": spec_to_dict(sdbuild.compose(["model=tiny_flux"]))}
    cached = {"spec": spec_to_dict(sdbuild.compose(["model=tiny_flux", "cache=taylorseer"]))}
    older = {"spec": {k: v for k, v in plain["spec"].items() if k != "cache"}}  # a row from before the group
    assert is_reference(plain) and not is_reference(cached) and is_reference(older)
