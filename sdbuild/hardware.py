"""What hardware a job had, recorded in its row (`job.hardware`), and one GPU per job on a shared node.

A latency is only meaningful next to what the job measured it on: which GPU it saw, which CPUs it
was allowed to run on, and whether anything else could run beside it. Launchers decide that
(SLURM through its allocation, submitit's local executor through CUDA_VISIBLE_DEVICES); this module
only reads what they decided, except in one case: submitit's local executor shows every job the
same GPUs, so on a multi-GPU node each sdbuild job takes one GPU for itself (`claim_gpu`).
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# Held open for the life of the process: the flock on a GPU's lock file is this job's claim on it.
_claimed: List[Any] = []


def launcher() -> str:
    """Which launcher started this process: `submitit_slurm`, `submitit_local` or `basic` (in-process)."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    return f"submitit_{executor}" if executor else "basic"


def _visible_gpus() -> List[str]:
    """The GPU ids this process may use, in CUDA_VISIBLE_DEVICES' terms, without initializing CUDA."""
    try:
        import torch

        count = torch.cuda.device_count()  # NVML-based: leaves CUDA uninitialized, honours CUDA_VISIBLE_DEVICES
    except Exception:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in listed.split(",") if x.strip()] if listed is not None else [str(i) for i in range(count)]
    return ids[:count]  # submitit may list more ids than the node has; CUDA ignores the rest


def claim_gpu(lock_dir: Optional[Path] = None, poll_s: float = 2.0) -> Optional[str]:
    """Under submitit's local executor on a node with several GPUs, take one GPU for this job alone:
    an exclusive lock per GPU (shared by every sweep on the node), waited for while all are taken,
    then CUDA_VISIBLE_DEVICES narrowed to it. Must run before CUDA initializes. Returns the GPU id,
    or None where there is nothing to choose (SLURM already gave the job its own GPUs)."""
    if launcher() != "submitit_local" or _claimed:
        return None
    ids = _visible_gpus()
    if len(ids) < 2:
        return None
    lock_dir = Path(lock_dir or os.environ.get("SDBUILD_GPU_LOCKS") or Path(tempfile.gettempdir()) / "sdbuild-gpu-locks")
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for gpu in ids:
            handle = open(lock_dir / f"gpu{gpu}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _claimed.append(handle)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            return gpu
        time.sleep(poll_s)


def _slurm_exclusive(job_id: str) -> Optional[bool]:
    """Whether SLURM gave the job its node exclusively (`OverSubscribe=NO`); None if it cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bOverSubscribe=(\S+)", out)
    return None if match is None else match.group(1) == "NO"


def job_facts() -> Dict[str, Any]:
    """This process and the hardware it may use, for the row's `job` dict. Claims a GPU first where
    the launcher left several to share (see `claim_gpu`), so call it before anything touches CUDA."""
    claimed = claim_gpu()
    slurm_job = os.environ.get("SLURM_JOB_ID")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    hardware = {
        "node": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_claimed": claimed,
        "cpus_allowed": cpus,
        "cpu_count": os.cpu_count(),
        "slurm_job_id": slurm_job,
        "slurm_cpus": int(os.environ["SLURM_CPUS_ON_NODE"]) if "SLURM_CPUS_ON_NODE" in os.environ else None,
        "slurm_gpus": os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS"),
        # True: nothing else was scheduled beside this job (SLURM --exclusive). None: nobody can say
        # (a local run: other programs on the machine are outside any launcher's control).
        "exclusive": _slurm_exclusive(slurm_job) if slurm_job else None,
    }
    return {"pid": os.getpid(), "launcher": launcher(), "hardware": hardware}


def die_with_parent() -> None:
    """In a job's child process, before it starts sdbuild: ask Linux for a SIGTERM when the sweep's
    process dies, also by SIGKILL, so that no orphaned job runs on beside the next sweep."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the child outlives a killed parent, as before
        pass
