"""`python -m sdbuild.worker JOB_DIR --rows-fd N`: run the jobs a sweep's process hands over, one after
another, exactly as it composed them.

A sweep job with a time limit (the default) runs in a worker process apart from the sweep's own (see
`sdbuild.job.run_in_worker`): one worker per sweep process, fed one job at a time, so Python's and
torch's imports are paid once per worker and a model's weights are read once per worker (the
in-process sweep's `reuse_weights`: later jobs get a deep copy of the loaded pipeline). With
`isolate=true` every job gets a worker of its own that runs that one job (its stdin is closed after it).

A worker composes nothing: it gets the parent's typed spec as plain data (`spec_to_dict`, read back
literally by `to_spec`), with the row's labels (choices, overrides, job), its folder and its log, as one
JSON line on stdin. So whatever composed the job in the parent (`hydra.searchpath`, `--config-dir`, a
sweep folder with a comma, a preset from a package, `hydra.job.env_set`, whose variables the worker
inherits) has already done its work, and the worker runs the very spec its parent recorded. Each job's
answer goes back as one JSON line on the file descriptor `--rows-fd`: {"row": the row, "retire": why
this worker must not run another job, or null}. The row travels also when `result.json` could not be
written (a full disk): the parent keeps the measurement either way.

When a worker retires itself (`retire_reason`): after a job that did not finish (`failed`: an error
mid-build or mid-call can leave a half-patched module, a poisoned CUDA context, a fragmented
allocator), after a job that compiled with Inductor or AOTInductor (`compile=inductor`, `export`:
Dynamo's and Inductor's in-memory caches, loaded kernel libraries and compile worker pools are
process-wide, so a later job would find its graphs compiled and its warmup and `compile_cache` counts
would not be its own), and after a job that changed process-wide state that no build sets again
(`process_state`: environment variables, torch's default dtype, grad mode, deterministic algorithms,
the SDPA kernel switches, a function of `torch.nn.functional` replaced, diffusers' active attention
backend, Inductor settings a library turned on). What every build sets explicitly (TF32/cuDNN flags,
torch's intra-op threads, a fresh pipeline: no attention processor or hook survives) is reset as in
the in-process sweep and does not retire a worker. The parent replaces a worker on its side too: after
a timeout, a crash or an interrupt, and when the next job asks for another `run.threads` (torch's
inter-op thread count can be set only once per process).

JOB_DIR is the first job's folder, only so that the process can be told apart (`ps`, tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

# retire_reason's verdicts are sentences a row carries (job.worker.replaced_after)
FAILED = "the job failed: what an error leaves half done is not inherited by the next job"
COMPILED = ("compile={method}: Dynamo's and Inductor's in-memory caches and loaded kernels are process-wide "
            "(a later job would find its graphs compiled)")
CHANGED = "the job changed process-wide state that no build sets again: {keys}"


def _send(fd: int, answer: Dict[str, Any]) -> None:
    """The answer back to the parent, as one line; a parent that has gone away is not an error here."""
    from .results import _strict_json

    data = (json.dumps(_strict_json(answer), default=str) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def process_state() -> Dict[str, Any]:
    """The process-wide state a job could leave behind that no build sets again (see the module's
    docstring), as comparable plain values. {} before torch is imported (nothing ran yet)."""
    if "torch" not in sys.modules:
        return {}
    import torch
    import torch.nn.functional as F

    from .levers.precision import inductor_changes

    environment = dict(os.environ)
    if "TORCHINDUCTOR_CACHE_DIR" not in environment:  # unset means Inductor's default, which it writes there on use
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        environment["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(default_cache_dir())
    state: Dict[str, Any] = {
        "environment": environment,
        "default dtype": str(torch.get_default_dtype()),
        "grad mode": torch.is_grad_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "SDPA kernel switches": [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()],
        "torch.nn.functional": {name: id(value) for name, value in vars(F).items() if callable(value)},
        "Inductor settings": inductor_changes(),
    }
    if "diffusers.models.attention_dispatch" in sys.modules:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        state["diffusers attention backend"] = str(_AttentionBackendRegistry.get_active_backend()[0])
    return state


def changed_state(before: Dict[str, Any], after: Dict[str, Any]) -> list[str]:
    """What differs between two `process_state`s, named (an environment variable by its name). A key
    that appeared only because the job imported its module (torch, diffusers) is no change."""
    changed = []
    for key, value in after.items():
        if key not in before:
            continue
        if key == "environment":
            changed += [f"environment variable {name}" for name in sorted(set(value) | set(before[key]))
                        if value.get(name) != before[key].get(name)]
        elif key == "torch.nn.functional":
            changed += [f"torch.nn.functional.{name} replaced" for name in sorted(value)
                        if name in before[key] and value[name] != before[key][name]]
        elif value != before[key]:
            changed.append(key)
    return changed


def retire_reason(spec: Any, row: Dict[str, Any], before: Dict[str, Any], after: Dict[str, Any]) -> Optional[str]:
    """Why this worker must not run another job after `row` (None: it may). See the module's docstring."""
    from .results import Status
    from .spec import CompileMethod

    if row.get("status") == Status.failed.value or row.get("fatal_cuda_error"):
        return FAILED
    if spec is not None and spec.compile.method in (CompileMethod.inductor, CompileMethod.export):
        return COMPILED.format(method=spec.compile.method.value)
    if (changed := changed_state(before, after)):
        return CHANGED.format(keys=", ".join(changed))
    return None


def _log_to(path: Optional[str]) -> None:
    """This job's output (stdout, stderr, logging) into its own folder's process.log."""
    if not path:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # a folder that cannot take it: the output stays where it was
        return
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_one(line: str, rows_fd: int) -> tuple[Optional[str], Optional[str]]:
    """Run the job of one request line and send its answer. Returns (the name of the signal that
    interrupted it, why this worker retires): either ends the worker."""
    from .app import interrupts_as_exceptions
    from .errors import SpecError
    from .job import Interrupted, environment, run_job
    from .results import Status, new_row
    from .spec import to_spec

    job = json.loads(line)
    _log_to(job.get("log"))
    out_dir = Path(job["out_dir"])
    try:
        spec = to_spec(job["spec"])  # plain data: nothing in it is evaluated
    except SpecError as exc:  # the parent's own spec: only a schema that changed under it
        row = new_row(status=Status.unsupported.value, error=str(exc), choices=job["choices"],
                      overrides=job["overrides"], job=job["job"], env=environment(None))
        _send(rows_fd, {"row": row, "retire": None})
        return None, None
    before = process_state()
    with interrupts_as_exceptions():
        try:
            row = run_job(spec, out_dir, job["choices"], job["overrides"], job=job["job"], show_progress=False,
                          reuse_weights=bool(job.get("reuse_weights")), shared_process=bool(job.get("shared_process")))
        except KeyboardInterrupt as exc:  # the row is written; send it and stop
            if isinstance(getattr(exc, "row", None), dict):
                _send(rows_fd, {"row": exc.row, "retire": "interrupted"})
            return (exc.signame if isinstance(exc, Interrupted) else "SIGINT"), "interrupted"
    retire = retire_reason(spec, row, before, process_state())
    _send(rows_fd, {"row": row, "retire": retire})
    return None, retire


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdbuild.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("job_dir", help="the (first) job's folder: names this process, nothing is read from it")
    parser.add_argument("--rows-fd", type=int, required=True, help="file descriptor the answers are written to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from . import builder, job, measure  # noqa: F401  torch and diffusers: the first job's state is compared too

    for line in sys.stdin:
        if not line.strip():
            continue
        signame, retire = run_one(line, args.rows_fd)
        if signame:
            return 130
        if retire:  # the parent starts a fresh worker for the next job
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
