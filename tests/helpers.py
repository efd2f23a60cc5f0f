"""Helpers shared by the test files (no test file imports another): build a pipeline from
overrides, run it, and read back what the built objects hold."""

from __future__ import annotations

import sdbuild
from sdbuild.validate import Machine

from conftest import FAST

# Machines for validation tests: what `Machine.probe()` would say on a CPU box with every optional
# package, and on a pre-Ampere GPU.
ALL_PACKAGES = frozenset({"xformers", "accelerate", "torchao"})
CPU = Machine(cuda=False, device_name="cpu", capability=None, packages=ALL_PACKAGES,
              diffusers_version="0.42.1", c_compiler=True)
OLD_GPU = Machine(cuda=True, device_name="Tesla T4", capability=(7, 5), packages=ALL_PACKAGES,
                  diffusers_version="0.42.1", c_compiler=True)


_COMPOSED = {}


def composed(*overrides):
    """`sdbuild.compose(overrides)`, composed once per process (Hydra takes ~0.2 s a call, seconds
    on a loaded machine) and handed out as a copy. For tests of what comes after composition
    (validation); tests of composition itself call `sdbuild.compose`."""
    import copy

    if overrides not in _COMPOSED:
        _COMPOSED[overrides] = sdbuild.compose(list(overrides))
    return copy.deepcopy(_COMPOSED[overrides])


def built(*overrides):
    """(spec, pipe, info) for the tiny model with the fast run settings and `overrides`."""
    from sdbuild.builder import build_pipeline

    spec = sdbuild.compose([*FAST, *overrides])
    pipe, info = build_pipeline(spec)
    return spec, pipe, info


def run(spec, pipe, device="cpu"):
    """The images of one pipeline call, exactly as sdbuild calls it (float numpy in [0, 1])."""
    from sdbuild.run_inputs import call_kwargs

    return pipe(**call_kwargs(spec, pipe, device)).images


def unet_processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


def first_attention(pipe):
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1


def compiled_with(module) -> dict:
    """What `torch.compile` was given for `module` (after `module.compile(...)`), read back from the
    compiled call without compiling anything: {"fullgraph", "dynamic", "mode_config"} where
    mode_config is the Inductor config the mode selected (`{}` for mode=default).

    `nn.Module.compile` stores `torch.compile(self._call_impl, ...)`, a function whose closure holds
    dynamo's OptimizeContext (fullgraph, dynamic) and its frame callback, which wraps the backend
    (`torch._TorchCompileInductorWrapper`, holding the mode's config)."""
    fn = module._compiled_call_impl
    assert fn is not None, f"{type(module).__name__} was not compiled"
    cells = {type(c.cell_contents).__name__: c.cell_contents for c in fn.__closure__ or ()}
    context = cells["OptimizeContext"]
    backend = context.callback
    while hasattr(backend, "_torchdynamo_orig_backend"):
        backend = backend._torchdynamo_orig_backend
    return {"fullgraph": context.fullgraph, "dynamic": context._dynamic, "mode_config": dict(backend.config),
            "backend": backend.compiler_name}


def mode_config(mode: str) -> dict:
    """The Inductor config torch.compile derives from `mode` (what `compiled_with` should find)."""
    import torch

    return torch._inductor.list_mode_options(mode) if mode != "default" else {}
