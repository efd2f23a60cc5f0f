"""`dry_run=true`: validate a spec and say what would be built, loading no weights.

The plan is the builder's own list of steps (sdbuild/builder.py `STEPS`), each described by its
lever from the spec's typed fields; nothing is loaded, built or compiled, so a dry run takes the
time of validation.
"""

from __future__ import annotations

from .spec import Spec, spec_to_dict


def plan(spec: Spec, device: str) -> list[str]:
    """What `build_pipeline` would do for `spec` on `device`: one numbered line per builder step,
    from the builder's own `STEPS` (each lever describes itself), between the device and the run."""
    from .builder import plan_steps

    run = spec.run
    h, w = run.height or spec.model.resolution, run.width or spec.model.resolution
    return ([f"device: {device} (run.device={run.device.name})"]
            + [f"{i}. {name}: {what}" for i, (name, what) in enumerate(plan_steps(spec, device), start=1)]
            + [f"run: {run.steps} steps at {h}x{w}, batch {run.batch_size}, guidance {run.guidance_scale}, seed {run.seed}; "
               f"warmup {run.warmup}, timed runs {run.repeats}"])


def show(spec: Spec) -> str:
    """The build plan, what was asked for, then the resolved spec (YAML) it was read from. Raises
    `SpecError` where validation refuses it."""
    from omegaconf import OmegaConf

    from .validate import target_machine, validate

    machine = target_machine(spec)
    device = validate(spec, machine)
    resolved = OmegaConf.to_yaml(OmegaConf.create(spec_to_dict(spec)))
    planned_for = (f"machine={spec.machine.name}: {machine.said()} (a profile: planned for it, nothing measured)"
                   if machine.profile else f"machine=local: this machine, {machine.said()}")
    return (f"would build (dry run: no weights loaded) on {planned_for}:\n"
            + "\n".join("  " + line for line in plan(spec, device))
            + "\n\nresolved spec (Hydra's `--cfg job` prints the composed config alone):\n" + resolved.rstrip("\n"))


def say(cfg) -> bool:
    """Print the plan of the composed config `cfg` on stdout, or its refusal on stderr; whether it
    was accepted. The one dry run of a job, whatever launched it (a run, a sweep, the ladder)."""
    import sys

    from .errors import SpecError
    from .spec import to_spec

    try:
        print(show(to_spec(cfg)), flush=True)
    except SpecError as exc:
        print(f"sdbuild: refused (dry run):\n{exc}", file=sys.stderr, flush=True)
        return False
    return True
