"""Check a spec against the machine before any weights load.

Every problem is collected (not just the first) and raised as one `SpecError`, each line naming
the option, what is wrong and what to use instead. Machine-dependent rules come from
`capabilities.py`; the checks on values (sizes, counts, paths) live here.

Nothing here imports torch or diffusers unless a GPU may be there (`Machine.probe`, `no_cuda`): a
refusal is answered before the heavy imports, in about a second. Keep new checks that way.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import FrozenSet, Mapping, Optional, Sequence, Tuple

from .capabilities import EXCLUSIONS, REQUIREMENTS, Requirement, requirement_needs
from .errors import SpecError, problem
from .footprint import machine_memory_bytes, memory_problem
from .models import model_problems
from .spec import Device, Spec, value_problems

OPTIONAL_PACKAGES = ("xformers", "accelerate", "torchao", "peft", "flash_attn", "flash_attn_interface", "sageattention",
                     "DeepCache", "tomesd")


@dataclass(frozen=True)
class Machine:
    """What this process can run on, probed once per validation."""

    cuda: bool
    device_name: str
    capability: Optional[Tuple[int, int]]
    packages: FrozenSet[str]
    diffusers_version: str
    c_compiler: bool  # a C++ compiler (Inductor's CPU kernels)
    # The CUDA compile toolchain (defaults: present, so a Machine built by hand for a CPU rule
    # need not spell them out).
    cc: bool = True  # a C compiler: Triton builds its kernel launcher with it
    python_headers: bool = True  # Python.h: the same launcher includes it
    cuda_toolkit: bool = True  # CUDA_HOME / nvcc: AOTInductor compiles its CUDA wrapper with it
    host_memory: Optional[int] = None  # bytes of physical memory (None: unknown, not checked)
    gpu_memory: Optional[int] = None  # bytes on GPU 0

    @classmethod
    def probe(cls) -> "Machine":
        """This machine's facts. torch is imported only where a GPU may be there (see `no_cuda`):
        on a machine without one, every rule is checked in the time of a few file lookups."""
        cuda, device_name, capability = False, "cpu", None
        if no_cuda() is None:
            import torch

            cuda = torch.cuda.is_available()
            if cuda:
                device_name, capability = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        return cls(
            cuda=cuda,
            device_name=device_name,
            capability=capability,
            packages=frozenset(p for p in OPTIONAL_PACKAGES if importlib.util.find_spec(p) is not None),
            diffusers_version=metadata.version("diffusers"),
            c_compiler=any(shutil.which(c) for c in ("g++", "c++", "clang++")),
            cc=bool(os.environ.get("CC") and shutil.which(os.environ["CC"])) or any(shutil.which(c) for c in ("cc", "gcc", "clang")),
            python_headers=Path(sysconfig.get_paths()["include"], "Python.h").exists(),
            cuda_toolkit=cuda and _cuda_home() is not None,
            host_memory=machine_memory_bytes("cpu"),
            gpu_memory=machine_memory_bytes("cuda") if cuda else None,
        )


# Device files of a GPU torch.cuda could use: NVIDIA's driver (also inside a container), WSL2's
# GPU bridge, AMD's ROCm (a ROCm torch answers through torch.cuda too).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")


def no_cuda(torch_version: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
            device_files: Sequence[str] = GPU_DEVICE_FILES) -> Optional[str]:
    """Why `torch.cuda.is_available()` is certainly False here, found without importing torch
    (which takes seconds): a CPU-only torch build, no visible device, no GPU driver. None where
    a GPU may be there: then only torch can say. (Arguments: this machine's facts by default.)"""
    if torch_version is None:
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = ""
    environ = os.environ if environ is None else environ
    if torch_version.endswith("+cpu"):
        return f"torch {torch_version} is a CPU-only build"
    if environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if not any(os.path.exists(path) for path in device_files):
        return "no GPU driver is loaded (no " + ", ".join(device_files) + ")"
    return None


def _cuda_home() -> Optional[str]:
    """Where the CUDA toolkit is, as PyTorch's extension builder finds it (CUDA_HOME, nvcc on PATH)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def resolve_device(spec: Spec, machine: Machine) -> str:
    """`run.device=auto` means CUDA when present, else CPU."""
    if spec.run.device is Device.auto:
        return "cuda" if machine.cuda else "cpu"
    return spec.run.device.value


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _unmet(req: Requirement, device: str, machine: Machine) -> Optional[str]:
    """What this machine lacks for `req` (said as "but ..."), or None if all is there."""
    if req.cuda and device != "cuda":
        return "this machine has no CUDA GPU" if not machine.cuda else "the run is on the CPU (run.device=cpu)"
    if req.min_capability and device == "cuda" and machine.capability is not None and machine.capability < req.min_capability:
        return "%s is %d.%d" % ((machine.device_name,) + machine.capability)
    if req.package and req.package not in machine.packages:
        return f"`{req.package}` is not installed"
    if req.diffusers and _version_tuple(machine.diffusers_version) < _version_tuple(req.diffusers):
        return f"diffusers {machine.diffusers_version} is installed"
    if req.c_compiler_on_cpu and device == "cpu" and not machine.c_compiler:
        return "no C++ compiler was found (TorchInductor builds C++ kernels on CPU)"
    if req.triton_on_cuda and device == "cuda":
        missing = [what for present, what in ((machine.cc, "no C compiler (cc, gcc, clang) was found"),
                                              (machine.python_headers, "the Python headers (Python.h) are missing"))
                   if not present]
        if missing:
            return " and ".join(missing) + " (Triton builds its kernel launcher with them)"
    if req.cuda_toolkit_on_cuda and device == "cuda" and not machine.cuda_toolkit:
        return "no CUDA toolkit was found (CUDA_HOME unset, no nvcc on PATH; AOTInductor compiles with it)"
    return None


def _wrong_family(req: Requirement, spec: Spec) -> Optional[str]:
    """Why the spec's model family does not meet `req` (said as "but ..."), or None."""
    if req.families and spec.model.family not in req.families:
        return f"model={spec.model.name} is family {spec.model.family.name}"
    return None


def _check_values(spec: Spec) -> list[str]:
    problems = value_problems(spec)  # sizes and paths: spec-level rules (spec.py)
    # every numeric field's range, attention.slice_size: spec.range_problems, inside value_problems
    problems += model_problems(spec)  # weight folders, per component (models.py)
    return problems


def validate(spec: Spec, machine: Optional[Machine] = None) -> str:
    """Raise `SpecError` listing every problem with `spec` on this machine; return the device."""
    problems = _check_values(spec)
    applicable = [req for req in REQUIREMENTS if req.applies(spec)]
    device = "unknown"
    # A spec already refused, with no rule that asks the machine (a model-family rule asks only the
    # spec), is refused without probing it: on a machine with a GPU the probe imports torch, seconds.
    if not problems or any(req.asks_machine for req in applicable) or spec.run.device is Device.cuda:
        machine = machine or Machine.probe()
        if spec.run.device is Device.cuda and not machine.cuda:
            problems.append(problem("run.device=cuda", "this machine has no CUDA GPU (torch.cuda.is_available() is False)", "Use run.device=auto or cpu"))
        device = resolve_device(spec, machine)
    for req in applicable:
        if missing := (req.asks_machine and _unmet(req, device, machine)) or _wrong_family(req, spec):
            chosen = f"{req.group}={getattr(spec, req.group).name}"
            option = req.option if req.option.startswith(chosen) else f"{chosen} ({req.option})"
            problems.append(problem(option, f"needs {requirement_needs(req)}, but {missing}", req.instead))
    if device != "unknown" and (too_big := memory_problem(spec, device, machine.gpu_memory if device == "cuda"
                                                          else machine.host_memory)):
        problems.append(too_big)
    for excl in EXCLUSIONS:
        if excl.applies(spec):
            problems.append(problem(excl.options, f"cannot be combined: {excl.why}", excl.instead))
    if problems:
        raise SpecError(problems)
    return device
