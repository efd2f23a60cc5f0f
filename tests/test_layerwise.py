"""memory=layerwise_fp8: the denoiser's weights are stored in float8 and computed in the precision's
dtype; the image stays close to the full-weight one."""

import numpy as np
import pytest
import torch

from sdbuild.errors import SpecError
from sdbuild.families import denoiser
from sdbuild.fidelity import compare
from sdbuild.validate import validate

from helpers import CPU, composed, run

MIN_PSNR_DB = 30.0  # measured (8 steps): tiny SD 1.x ~39 dB, tiny Flux ~49 dB


@pytest.mark.parametrize("model", ["tiny", "tiny_flux"])
def test_weights_stored_in_fp8_computed_in_fp32(model, shared_pipeline):
    spec, pipe, _ = shared_pipeline(f"model={model}")
    full = run(spec, pipe)
    spec, pipe, _ = shared_pipeline(f"model={model}", "memory=layerwise_fp8")
    linears = [m for m in denoiser(pipe).modules() if isinstance(m, torch.nn.Linear)]
    stored = {m.weight.dtype for m in linears}
    assert torch.float8_e4m3fn in stored
    seen = []
    handle = linears[-1].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        images = run(spec, pipe)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.float32}  # computed in the precision's dtype
    assert {m.weight.dtype for m in linears} == stored  # and stored in fp8 again after the call
    assert np.isfinite(images).all() and np.abs(images - full).max() > 0
    assert compare((images[0] * 255).round(), (full[0] * 255).round()).psnr_db >= MIN_PSNR_DB


@pytest.mark.parametrize("other", ["compile=trace", "quant=int8wo"])
def test_layerwise_fp8_with_quant_or_a_fixed_graph_is_refused(other):
    with pytest.raises(SpecError) as err:
        validate(composed("memory=layerwise_fp8", other), CPU)
    assert "Use memory=layerwise_fp8 with quant=none and compile=none or inductor" in str(err.value)
