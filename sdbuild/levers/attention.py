"""Attention of the transformer families: diffusers' own processors, and for those that call
diffusers' attention dispatcher (Flux), the dispatcher's backend (`attention.backend`). The UNet
families' processors, slicing and SDPA kernel pins stay in sdbuild/builder.py."""

from __future__ import annotations

from typing import Any, Dict

from ..families import family_of
from ..spec import AttentionBackend, Spec


def dispatcher_backends(model) -> list[str]:
    """The backend each attention module hands the dispatcher (its processor's `_attention_backend`;
    None: the dispatcher's active backend), resolved to the name the dispatcher will run."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    return sorted({AttentionBackendName(getattr(m.processor, "_attention_backend", None) or active).value
                   for m in model.modules() if getattr(m, "processor", None) is not None})


def transformer_attention(pipe, spec: Spec) -> Dict[str, Any]:
    """Set the dispatcher backend (if chosen) and record what the transformer's attention runs."""
    model = pipe.transformer
    if spec.attention.backend is not AttentionBackend.default:
        model.set_attention_backend(spec.attention.backend.value)
    processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
    record: Dict[str, Any] = {"processor": ", ".join(processors), "requested_backend": spec.attention.backend.value,
                              "pinned_modules": [], "unpinned": {}}
    if family_of(spec).dispatcher:
        record["backend"] = ", ".join(dispatcher_backends(model))
    return record
