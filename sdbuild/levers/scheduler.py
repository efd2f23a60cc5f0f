"""The `scheduler` group: a scheduler class built from the model's own scheduler config, so the
model's training schedule (betas, shift, prediction type) is kept and only the sampler changes."""

from __future__ import annotations

from typing import Any

from ..spec import SchedulerKind, Spec


def scheduler_from(spec: Spec, config: Any):
    import diffusers

    cls = getattr(diffusers, spec.scheduler.kind.value)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if spec.scheduler.kind is SchedulerKind.dpmpp_2m else {}
    return cls.from_config(config, **extra)


def apply(pipe, spec: Spec) -> None:
    pipe.scheduler = scheduler_from(spec, pipe.scheduler.config)


def describe(spec: Spec) -> str:
    return f"scheduler {spec.scheduler.kind.value}"
