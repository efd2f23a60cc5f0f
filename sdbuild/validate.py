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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import FrozenSet, Mapping, Optional, Sequence, Tuple

from .capabilities import EXCLUSIONS, REQUIREMENTS, Requirement, requirement_needs
from .errors import SpecError, problem
from .footprint import machine_memory_bytes, memory_problem
from .models import model_problems
from .spec import Device, MachineSpec, Spec, value_problems

# The optional packages rules ask for, by import name, probed as diffusers probes them
# (`diffusers.utils.import_utils._is_package_available`): the module is found and a distribution of
# that name is installed. FlashAttention-3 is the distribution `flash_attn_3` (its module
# `flash_attn_interface` alone does not make diffusers' `_flash_3` backend usable).
OPTIONAL_PACKAGES = ("xformers", "accelerate", "torchao", "peft", "flash_attn", "flash_attn_3", "sageattention",
                     "DeepCache", "tomesd")

GIB = 1024 ** 3


@dataclass(frozen=True)
class Machine:
    """What a spec is validated against: this process's machine (`probe`) or a profile's
    description of another one (`from_profile`, conf/machine/)."""

    cuda: bool
    device_name: str
    capability: Optional[Tuple[int, int]]
    packages: FrozenSet[str]
    diffusers_version: str
    c_compiler: bool  # a C++ compiler (Inductor's CPU kernels, AOTInductor's wrapper)
    # The CUDA compile toolchain (defaults: present, so a Machine built by hand for a CPU rule
    # need not spell them out).
    cc: bool = True  # a C compiler: Triton builds its kernel launcher with it
    python_headers: bool = True  # Python.h: the same launcher includes it
    cuda_toolkit: bool = True  # CUDA_HOME / nvcc: AOTInductor compiles its CUDA wrapper with it
    host_memory: Optional[int] = None  # bytes of physical memory (None: unknown, not checked)
    gpu_memory: Optional[int] = None  # bytes on GPU 0
    gpu_count: int = 0  # GPUs torch sees (one per rank of a parallel job)
    cpu_count: int = os.cpu_count() or 1  # cores (one per rank of a parallel job on CPU)
    cudnn_version: Optional[Tuple[int, ...]] = None  # (9, 10, 2); None: unknown (rules assume the oldest limits)
    # Versions of `packages` (import name -> version) where known; a package without one is not
    # version-checked.
    package_versions: Mapping[str, str] = field(default_factory=dict)
    probed: bool = False  # this process's machine: torch can be asked (its SDPA predicates), not only the facts
    profile: Optional[str] = None  # the conf/machine profile it was described by (None: probed or built by hand)

    @classmethod
    def probe(cls) -> "Machine":
        """This machine's facts. torch is imported only where a GPU may be there (see `no_cuda`):
        on a machine without one, every rule is checked in the time of a few file lookups."""
        cuda, device_name, capability, gpu_count, cudnn = False, "cpu", None, 0, None
        if no_cuda() is None:
            import torch

            cuda = torch.cuda.is_available()
            if cuda:
                device_name, capability = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
                gpu_count = torch.cuda.device_count()
                cudnn = cudnn_version_tuple(torch.backends.cudnn.version())
        versions = {p: v for p in OPTIONAL_PACKAGES if (v := package_version(p)) is not None}
        return cls(
            cuda=cuda,
            device_name=device_name,
            capability=capability,
            packages=frozenset(versions),
            diffusers_version=metadata.version("diffusers"),
            c_compiler=cxx_compiler_found(),
            cc=c_compiler_found(),
            python_headers=Path(python_include_dir(), "Python.h").exists(),
            cuda_toolkit=cuda and _cuda_home() is not None,
            host_memory=machine_memory_bytes("cpu"),
            gpu_memory=machine_memory_bytes("cuda") if cuda else None,
            gpu_count=gpu_count,
            cpu_count=os.cpu_count() or 1,
            cudnn_version=cudnn,
            package_versions=versions,
            probed=True,
        )

    @classmethod
    def from_profile(cls, profile: MachineSpec) -> "Machine":
        """The machine a profile (conf/machine/<name>.yaml) describes. Its diffusers is the one
        installed here unless the profile names another."""
        return cls(
            cuda=profile.cuda,
            device_name=profile.device_name,
            capability=tuple(profile.capability) if profile.capability else None,
            packages=frozenset(profile.packages),
            diffusers_version=profile.diffusers_version or metadata.version("diffusers"),
            c_compiler=profile.cxx,
            cc=profile.cc,
            python_headers=profile.python_headers,
            cuda_toolkit=profile.cuda and profile.cuda_toolkit,
            host_memory=None if profile.host_memory_gb is None else int(profile.host_memory_gb * GIB),
            gpu_memory=None if profile.gpu_memory_gb is None else int(profile.gpu_memory_gb * GIB),
            cudnn_version=_version_tuple(profile.cudnn_version) if profile.cudnn_version else None,
            package_versions={name: str(v) for name, v in profile.packages.items() if v},
            gpu_count=profile.gpu_count if profile.gpu_count is not None else int(profile.cuda),
            cpu_count=profile.cpu_count or os.cpu_count() or 1,
            profile=profile.name,
        )

    def said(self) -> str:
        """The machine in a few words, for messages."""
        if not self.cuda:
            return f"{self.device_name} (no CUDA GPU)"
        facts = ["compute capability %d.%d" % self.capability] if self.capability else []
        if self.gpu_memory:
            facts.append(f"{self.gpu_memory / GIB:.1f} GiB")
        if self.cudnn_version:
            facts.append("cuDNN " + ".".join(map(str, self.cudnn_version)))
        return f"{self.device_name} ({', '.join(facts)})" if facts else self.device_name


def package_version(name: str) -> Optional[str]:
    """The installed version of the optional package `name`, found as diffusers finds it
    (`_is_package_available`): its module is importable and a distribution of that name is
    installed; None otherwise."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cudnn_version_tuple(version: Optional[int]) -> Optional[Tuple[int, int, int]]:
    """torch.backends.cudnn.version()'s integer as (major, minor, patch): 91002 -> (9, 10, 2) (cuDNN 9
    counts major*10000), 8906 -> (8, 9, 6) (cuDNN 8: major*1000)."""
    if not version:
        return None
    if version >= 10000:
        return version // 10000, version % 10000 // 100, version % 100
    return version // 1000, version % 1000 // 100, version % 100


def python_include_dir() -> str:
    """Where Triton looks for Python.h (triton/runtime/build.py): the default install scheme's
    include folder, Debian's `posix_local` read as `posix_prefix` (a system Python with python3-dev
    has its headers under /usr/include, not /usr/local/include)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def c_compiler_found(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether Triton finds a C compiler for its launcher as triton/runtime/build.py does: `$CC`
    when set (used as given, no fallback), else gcc, else clang."""
    environ = os.environ if environ is None else environ
    if environ.get("CC"):
        return shutil.which(environ["CC"]) is not None
    return any(shutil.which(c) for c in ("gcc", "clang"))


def cxx_compiler_found(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether Inductor finds its C++ compiler (torch._inductor.config.cpp.cxx): `$CXX` when set,
    else g++ (clang++ on macOS). Inductor's CPU kernels and AOTInductor's wrapper build with it."""
    import sys

    environ = os.environ if environ is None else environ
    if environ.get("CXX"):
        return shutil.which(environ["CXX"]) is not None
    return shutil.which("clang++" if sys.platform == "darwin" else "g++") is not None


def profile_mismatch(profile: MachineSpec, here: Machine) -> Optional[str]:
    """Why the machine `here` is not the one `profile` describes (CUDA or not, compute capability,
    GPU memory within 10 %), or None where it is."""
    caps = tuple(profile.capability) if profile.capability else None
    if profile.cuda != here.cuda:
        differs = True
    elif not profile.cuda:
        differs = False
    else:
        mem = profile.gpu_memory_gb and here.gpu_memory
        differs = (caps != here.capability) or bool(mem and abs(here.gpu_memory / GIB - profile.gpu_memory_gb)
                                                    > 0.1 * profile.gpu_memory_gb)
    if not differs:
        return None
    return (f"describes {Machine.from_profile(profile).said()}, but this process runs on {here.said()}: "
            "a profile plans a run (dry_run=true), it never stands in for a measurement")


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


def _unmet(req: Requirement, device: str, machine: Machine, spec: Optional[Spec] = None) -> Optional[str]:
    """What this machine lacks for `req` (said as "but ..."), or None if all is there."""
    if req.ranks_fit and spec is not None and device in ("cuda", "cpu"):
        ranks, have, what = spec.parallel.world_size, *((machine.gpu_count, "GPUs are visible") if device == "cuda"
                                                        else (machine.cpu_count, "CPU cores"))
        if ranks > have:
            return f"parallel asks for {ranks} ranks and {have} {what}"
    if req.cuda and device != "cuda":
        return "this machine has no CUDA GPU" if not machine.cuda else "the run is on the CPU (run.device=cpu)"
    if req.min_capability and device == "cuda" and machine.capability is not None and machine.capability < req.min_capability:
        return "%s is %d.%d" % ((machine.device_name,) + machine.capability)
    if req.package and req.package not in machine.packages:
        return f"`{req.package}` is not installed"
    if (req.package_version and (have := machine.package_versions.get(req.package))
            and _version_tuple(have) < _version_tuple(req.package_version)):
        return f"`{req.package}` {have} is installed"
    if req.diffusers and _version_tuple(machine.diffusers_version) < _version_tuple(req.diffusers):
        return f"diffusers {machine.diffusers_version} is installed"
    if req.c_compiler_on_cpu and device == "cpu" and not machine.c_compiler:
        return "no C++ compiler was found (TorchInductor builds C++ kernels on CPU)"
    if req.triton_on_cuda and device == "cuda":
        missing = [what for present, what in ((machine.cc, "no C compiler ($CC, gcc, clang) was found"),
                                              (machine.python_headers, "the Python headers (Python.h) are missing"))
                   if not present]
        if missing:
            return " and ".join(missing) + " (Triton builds its kernel launcher with them)"
    if req.cxx_on_cuda and device == "cuda" and not machine.c_compiler:
        return "no C++ compiler ($CXX, g++) was found (AOTInductor builds its CUDA wrapper with it)"
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


def target_machine(spec: Spec) -> Machine:
    """The machine `spec` is checked against: the profile it names in a dry run (it plans for that
    machine), else this process's machine, probed (a real run measures here, whatever it names)."""
    if not spec.machine.probe and spec.dry_run:
        return Machine.from_profile(spec.machine)
    return Machine.probe()


def validate(spec: Spec, machine: Optional[Machine] = None) -> str:
    """Raise `SpecError` listing every problem with `spec` on its machine; return the device.

    The machine is `target_machine(spec)` unless given: this one, or in a dry run the profile
    `machine=<name>` describes. A real run with a profile is refused where this machine is not
    the one it describes."""
    problems = _check_values(spec)
    applicable = [req for req in REQUIREMENTS if req.applies(spec)]
    device = "unknown"
    profile = not spec.machine.probe
    # A spec already refused, with no rule that asks the machine (a model-family rule asks only the
    # spec), is refused without probing it: on a machine with a GPU the probe imports torch, seconds.
    if not problems or any(req.asks_machine for req in applicable) or spec.run.device is Device.cuda or profile:
        machine = machine or target_machine(spec)
        if profile and not spec.dry_run and (why := profile_mismatch(spec.machine, machine)):
            problems.append(problem(f"machine={spec.machine.name}", why,
                                    f"Plan for it with dry_run=true machine={spec.machine.name}; measure on this "
                                    "machine with machine=local (the default)"))
        if spec.run.device is Device.cuda and not machine.cuda:
            problems.append(problem("run.device=cuda", "this machine has no CUDA GPU (torch.cuda.is_available() is False)"
                                    if machine.probed or machine.profile is None else
                                    f"machine={machine.profile} has no CUDA GPU", "Use run.device=auto or cpu"))
        device = resolve_device(spec, machine)
    for req in applicable:
        if missing := (req.asks_machine and _unmet(req, device, machine, spec)) or _wrong_family(req, spec):
            chosen = f"{req.group}={getattr(spec, req.group).name}"
            option = req.option if req.option.startswith(chosen) else f"{chosen} ({req.option})"
            problems.append(problem(option, f"needs {requirement_needs(req)}, but {missing}", req.instead))
    if device != "unknown" and (too_big := memory_problem(
            spec, device, machine.gpu_memory if device == "cuda" else machine.host_memory,
            f"on machine={machine.profile}" if machine.profile and not machine.probed else "here")):
        problems.append(too_big)
    for excl in EXCLUSIONS:
        if excl.applies(spec) and (device == "cuda" or not excl.cuda_only):
            said = f" ({excl.explain(spec)})" if excl.explain else ""
            problems.append(problem(excl.combination, f"cannot be combined: {excl.why}{said}", excl.instead))
    if problems:
        raise SpecError(problems)
    return device
