"""The cache group on the tiny Flux (and, for DeepCache and ToMe, the tiny SD 1.x): each option does less work over a 20-step call, exactly as it
promises, and its image moves from the no-cache image by no more than the stated PSNR."""

import numpy as np
import pytest

import sdbuild
from sdbuild.builder import build_pipeline
from sdbuild.errors import SpecError
from sdbuild.fidelity import compare
from sdbuild.validate import validate

from conftest import needs_packages
from helpers import CPU, composed, run

STEPS = 20
# Measured (random weights, 20 steps, seed 0): on the tiny Flux first_block at threshold 0.5 ~52 dB,
# taylorseer (interval 5, 3 warmup steps, order 1) ~61 dB, pab ~66 dB, faster_cache ~67 dB, mag_cache ~55 dB; on the tiny SD 1.x deepcache (interval 3,
# branch 0) ~36 dB, tome (ratio 0.5) ~41 dB. The bounds leave room for other
# platforms' float rounding, not for a lever that breaks the image.
MIN_PSNR_DB = {"first_block": 35.0, "taylorseer": 40.0, "pab": 45.0, "faster_cache": 45.0, "mag_cache": 45.0, "deepcache": 28.0, "tome": 33.0}
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


# UNet caches (the unetcache extra): DeepCache and ToMe through their packages, on the tiny SD 1.x model.

def unet_counts(pipe) -> dict:
    """Forward calls of the UNet's down-block resnets and of its mid block's first resnet, and the token counts
    self-attention sees in the first down block."""
    count = {"down": 0, "mid": 0, "tokens": []}
    for block in pipe.unet.down_blocks:
        for resnet in block.resnets:
            resnet.register_forward_hook(lambda *_: count.__setitem__("down", count["down"] + 1))
    # inside the mid block: DeepCache wraps the block's own forward, so a hook on the block would see
    # calls answered from its cache too
    pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: count.__setitem__("mid", count["mid"] + 1))
    attn1 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn1.register_forward_pre_hook(lambda module, args: count["tokens"].append(args[0].shape[1]))
    return count


def unet_run(*overrides, twice=False):
    spec = sdbuild.compose(["model=tiny", f"run.steps={STEPS}", "run.warmup=0", "run.repeats=1", *overrides])
    pipe, _ = build_pipeline(spec)
    count = unet_counts(pipe)
    images = run(spec, pipe)
    if twice:
        first = dict(count, tokens=list(count["tokens"]))
        np.testing.assert_array_equal(images, run(spec, pipe))  # every call starts afresh
        assert count["down"] == 2 * first["down"] and count["mid"] == 2 * first["mid"]
        count = first
    return count, images, pipe


@pytest.fixture(scope="module")
def unet_no_cache():
    count, images, pipe = unet_run()
    resnets = sum(len(b.resnets) for b in pipe.unet.down_blocks)
    assert count["down"] == STEPS * resnets and count["mid"] == STEPS
    return count, images, resnets


@needs_packages("DeepCache", install='pip install -e ".[unetcache]"')
@pytest.mark.parametrize("interval", [3, 5])
def test_deepcache_runs_the_deep_unet_only_every_interval_steps(unet_no_cache, interval):
    base, base_images, resnets = unet_no_cache
    count, images, _ = unet_run("cache=deepcache", f"cache.interval={interval}", twice=interval == 3)
    full_steps = len(range(0, STEPS, interval))  # steps 0, interval, 2 * interval, ...
    # branch 0: on cached steps no down-block resnet and no mid block runs
    assert count["mid"] == full_steps and count["down"] == full_steps * resnets < base["down"]
    assert np.abs(images - base_images).max() > 0
    assert psnr(images, base_images) >= MIN_PSNR_DB["deepcache"]


@needs_packages("tomesd", install='pip install -e ".[unetcache]"')
def test_tome_merges_the_tokens_self_attention_sees(unet_no_cache):
    base, base_images, _ = unet_no_cache
    count, images, _ = unet_run("cache=tome", "cache.ratio=0.5", twice=True)
    assert set(base["tokens"]) == {64}  # 64x64 image: 8x8 latent tokens
    assert set(count["tokens"]) == {32} and len(count["tokens"]) == STEPS  # half merged away (CFG: one batch)
    assert count["down"] == base["down"]  # ToMe does not skip blocks
    assert np.abs(images - base_images).max() > 0
    assert psnr(images, base_images) >= MIN_PSNR_DB["tome"]


@pytest.mark.parametrize("option", ["deepcache", "tome"])
def test_a_unet_cache_on_a_transformer_is_refused(option):
    with pytest.raises(SpecError) as err:
        validate(composed("model=tiny_flux", f"cache={option}"), CPU)
    assert "model family sd15/sdxl" in str(err.value) and "cache=first_block or taylorseer" in str(err.value)


def test_deepcache_with_a_compiled_unet_is_refused():
    with pytest.raises(SpecError) as err:
        validate(composed("cache=deepcache", "compile=trace"), CPU)
    assert "Use compile=none with cache=deepcache" in str(err.value)


def test_pab_reuses_attention_inside_its_timestep_range(no_cache):
    """Attention is computed at step 0, outside (low, high), and every `interval`-th step inside."""
    base_calls, base_images, blocks = no_cache
    calls, images, pipe = counted_run("cache=pab", "cache.interval=2", twice=True)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    computed = sum(1 for i, t in enumerate(timesteps) if i == 0 or not 100 < t < 800 or i % 2 == 0)
    assert len(timesteps) == STEPS and calls == blocks * computed < base_calls
    assert np.abs(images - base_images).max() > 0
    assert psnr(images, base_images) >= MIN_PSNR_DB["pab"]


def test_faster_cache_extrapolates_attention_inside_its_timestep_range(no_cache):
    """FasterCache's attention skip (Flux is guidance-distilled: no unconditional batch to skip): attention computed
    at step 0, outside (low, high), and every `interval`-th step inside; a skipped step's output is extrapolated
    from the last two, so at weight 0 it is PAB's plain reuse, image for image."""
    base_calls, base_images, blocks = no_cache
    calls, images, pipe = counted_run("cache=faster_cache", "cache.interval=2", twice=True)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    computed = sum(1 for i, t in enumerate(timesteps) if i == 0 or not 100 < t < 800 or i % 2 == 0)
    assert len(timesteps) == STEPS and calls == blocks * computed < base_calls  # 56 of 80
    assert np.abs(images - base_images).max() > 0
    assert psnr(images, base_images) >= MIN_PSNR_DB["faster_cache"]
    pab_calls, pab_images, _ = counted_run("cache=pab", "cache.interval=2")
    reuse_calls, reuse_images, _ = counted_run("cache=faster_cache", "cache.interval=2", "cache.weight=0")
    assert reuse_calls == pab_calls == calls
    np.testing.assert_array_equal(reuse_images, pab_images)  # weight 0: the last computed output, as PAB
    assert np.abs(images - pab_images).max() > 0  # the default weight extrapolates


def test_faster_cache_on_a_unet_or_from_step_0_is_refused_before_any_weights_load(tmp_path):
    with pytest.raises(SpecError) as err:
        validate(composed("model=tiny", "cache=faster_cache"), CPU)
    assert "cache=faster_cache" in str(err.value) and "model family flux" in str(err.value)
    with pytest.raises(SpecError) as err:  # step 0 inside the range: nothing cached yet to extrapolate from
        validate(composed("model=tiny_flux", "cache=faster_cache", "cache.timestep_high=1001"), CPU)
    assert "cache.timestep_high <= 1000" in str(err.value)
    spec = sdbuild.compose(["model=tiny", "cache=faster_cache", f"cache_dir={tmp_path / 'models'}", "run.steps=2"])
    row = sdbuild.run(spec, tmp_path / "run")
    assert row["status"] == "unsupported" and "cache=faster_cache" in row["error"]
    assert not (tmp_path / "models").exists()


def test_mag_cache_skips_whole_steps_after_its_retention_steps(no_cache):
    base_calls, base_images, blocks = no_cache
    calls, images, _ = counted_run("cache=mag_cache", twice=True)
    kept = int(0.2 * STEPS)  # retention_ratio: the first steps always run
    assert calls % blocks == 0 and kept * blocks <= calls < base_calls  # a skipped step skips every block
    assert np.abs(images - base_images).max() > 0
    assert psnr(images, base_images) >= MIN_PSNR_DB["mag_cache"]
