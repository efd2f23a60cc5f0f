"""Attention of the transformer families (Flux): diffusers' own processors, through its attention
dispatcher. The UNet families' processors, slicing and SDPA kernel pins stay in sdbuild/builder.py."""

from __future__ import annotations

from typing import Any, Dict


def transformer_attention(pipe) -> Dict[str, Any]:
    """A transformer family keeps its own attention processors (diffusers' processors for it, which
    call attention through diffusers' dispatcher); the record names them and the dispatcher's backend."""
    model = pipe.transformer
    processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
    backends = sorted({str(getattr(m.processor, "_attention_backend", None) or "default")
                       for m in model.modules() if hasattr(m, "processor")})
    return {"processor": ", ".join(processors), "backend": ", ".join(backends), "pinned_modules": [], "unpinned": {}}
