"""sdbuild: declarative, measured diffusion pipelines.

    spec = sdbuild.compose(["precision=bf16", "attention=sdpa"])   # YAML config groups -> typed spec
    pipe = sdbuild.build(spec)                                      # validated, optimized pipeline

Nothing heavy is imported here: torch and diffusers load on first use of `build`.
"""

from .config import compose
from .spec import Spec

__all__ = ["Spec", "build", "compose"]


def build(spec: Spec):
    """Validate `spec` against this machine and return the optimized diffusers pipeline."""
    from .builder import build as _build

    return _build(spec)
