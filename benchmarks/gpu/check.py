"""The GPU proof's own checks (run by run.sh): what the sweeps alone would not show, and a
plain-text summary of the rows.

    python benchmarks/gpu/check.py preflight [--cpu]  # ~30-60 s on an H100: versions, toolchain (as
                                           # validation sees it), TF32 flags, event timing, peak
                                           # memory, SDPA kernels per head dim and dtype, xformers,
                                           # torch.compile (+CUDA graphs), jit.trace, torchao
    python benchmarks/gpu/check.py summary SWEEPS     # one line per result.json, with steps/s and
                                           # the speed-up over the fp32 seed row (no matplotlib)

Every probe is guarded: a failure prints FAIL with its reason and the next probe runs. With
--cpu (no GPU) only the machine-independent probes run, and the exit status is 0.
Set GPU_CHECK_AOTI=1 to also AOT-compile a tiny module (needs a CUDA toolkit; ~1 min).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path


def line(tag: str, name: str, text: str = "") -> None:
    print(f"[{tag}] {name}: {text}".rstrip(": "), flush=True)


def probe(name: str):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                text = fn(*args)
                line("ok", name, f"{text or ''} ({time.perf_counter() - start:.1f} s)")
            except Exception as exc:  # noqa: BLE001 - report and go on
                first = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
                line("FAIL", name, first)
                if os.environ.get("GPU_CHECK_TRACEBACK"):
                    traceback.print_exc()
        return run
    return wrap


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


@probe("versions")
def versions():
    import torch

    cuda = torch.cuda.is_available()
    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"cuda {torch.version.cuda}",
             f"cudnn {torch.backends.cudnn.version()}"]
    parts += [f"{p} {_version(p)}" for p in ("triton", "diffusers", "transformers", "xformers", "torchao",
                                             "accelerate", "hydra-core", "numpy", "matplotlib")]
    if cuda:
        parts.append(f"{torch.cuda.get_device_name(0)} cc {torch.cuda.get_device_capability(0)}")
    else:
        parts.append("NO CUDA DEVICE")
    return ", ".join(parts)


@probe("toolchain as validation sees it (Triton: a C compiler and Python.h; AOTInductor on CUDA: CUDA_HOME)")
def toolchain():
    from torch.utils import cpp_extension

    from sdbuild.validate import Machine

    m = Machine.probe()
    cc = [c for c in ("gcc", "cc", "clang", "g++") if shutil.which(c)]
    return (f"compilers {cc or 'NONE'} (C {m.cc}, C++ {m.c_compiler}), Python.h {m.python_headers}, "
            f"CUDA toolkit {m.cuda_toolkit} (CUDA_HOME {cpp_extension.CUDA_HOME}), packages {sorted(m.packages)}")


@probe("TF32 flags (sdbuild.builder.set_global_switches) vs the torch>=2.9 fp32_precision API")
def tf32_flags():
    import torch

    import sdbuild
    from sdbuild.builder import global_switches, set_global_switches

    out = []
    for precision in ("tf32", "fp32", "tf32"):
        set_global_switches(sdbuild.compose([f"precision={precision}"]))
        flags = global_switches()
        new = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        want = precision == "tf32"
        if flags["cuda_matmul_allow_tf32"] is not want or flags["cudnn_allow_tf32"] is not want:
            raise AssertionError(f"{precision}: {flags}")
        out.append(f"{precision}: legacy {flags['cuda_matmul_allow_tf32']}/{flags['cudnn_allow_tf32']} new {new}")
    return "; ".join(out)


@probe("timing: sdbuild.measure.timed_call (CUDA events) vs wall clock")
def timing():
    import torch

    from sdbuild.measure import timed_call

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)

    def work():
        x = a
        for _ in range(200):
            x = (x @ a).clamp_(-1, 1)
        return x

    timed_call(work, "cuda")
    ratios = []
    for _ in range(3):
        torch.cuda.synchronize()
        wall = time.perf_counter()
        seconds, _ = timed_call(work, "cuda")
        wall = time.perf_counter() - wall
        ratios.append(seconds / wall)
    if not all(0.9 < r <= 1.01 for r in ratios):
        raise AssertionError(f"event/wall ratios {ratios}")
    return f"event/wall {min(ratios):.3f}-{max(ratios):.3f} ({seconds * 1000:.0f} ms)"


@probe("peak memory: max_memory_allocated vs reserved")
def peak_memory():
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    del x
    alloc, reserved = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    if alloc < 1024:
        raise AssertionError(f"peak allocated {alloc:.0f} MB after a 1024 MB tensor")
    return f"peak allocated {alloc:.0f} MB, peak reserved {reserved:.0f} MB"


def sdpa_matrix():
    """Which pinned SDPA kernel runs the attention shapes of SD 1.5 at 512x512 (UNet head dims
    40/80/160, cross-attention to 77 tokens, VAE mid-block: one head of dim 512)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = {"unet d40 self": (2, 8, 4096, 4096, 40), "unet d40 cross": (2, 8, 4096, 77, 40),
              "unet d160 self": (2, 8, 64, 64, 160), "vae d512": (1, 1, 4096, 4096, 512)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            results = []
            for label, (b, h, lq, lk, d) in shapes.items():
                q = torch.randn(b, h, lq, d, device="cuda", dtype=dtype)
                k = torch.randn(b, h, lk, d, device="cuda", dtype=dtype)
                try:
                    with sdpa_kernel(getattr(SDPBackend, backend)):
                        F.scaled_dot_product_attention(q, k, k)
                    torch.cuda.synchronize()
                    results.append(f"{label} ok")
                except RuntimeError as exc:
                    results.append(f"{label} NO ({str(exc).splitlines()[0][:40]})")
            line("info", f"sdpa {backend} {str(dtype)[6:]}", "; ".join(results))


@probe("sdpa kernel matrix printed above")
def sdpa():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdpa_matrix()


@probe("xformers memory_efficient_attention (diffusers' fp32 probe, fp16 UNet and VAE shapes)")
def xformers_check():
    import torch
    import xformers
    import xformers.ops as xops

    from sdbuild.builder import xformers_kernels

    out = [f"sdbuild sees {xformers_kernels()}"]
    q = torch.randn((1, 2, 40), device="cuda")
    xops.memory_efficient_attention(q, q, q)  # what enable_xformers_memory_efficient_attention runs
    out.append("fp32 d40 ok")
    for label, (b, m, h, d) in {"fp16 d40": (2, 4096, 8, 40), "fp16 d160": (2, 64, 8, 160),
                                "fp16 d512 (VAE)": (1, 4096, 1, 512)}.items():
        q = torch.randn(b, m, h, d, device="cuda", dtype=torch.float16)
        try:
            xops.memory_efficient_attention(q, q, q)
            out.append(f"{label} ok")
        except Exception as exc:  # noqa: BLE001
            out.append(f"{label} NO ({str(exc).splitlines()[0][:60]})")
    return "; ".join(out)


def _tiny_net(dtype):
    import torch
    import torch.nn.functional as F

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 64, 3, padding=1)
            self.norm = torch.nn.GroupNorm(8, 64)
            self.proj = torch.nn.Linear(64, 192)

        def forward(self, x, t, ctx):
            h = F.silu(self.norm(self.conv(x))) + t.float().mean()
            b, c, hh, ww = h.shape
            seq = h.flatten(2).transpose(1, 2)
            q, k, v = self.proj(seq).chunk(3, dim=-1)
            q, k, v = (z.reshape(b, -1, 8, 8).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
            return (seq + a + ctx.mean()).transpose(1, 2).reshape(b, c, hh, ww)

    net = Net().to("cuda", dtype).eval().to(memory_format=torch.channels_last)
    args = (torch.randn(2, 4, 64, 64, device="cuda", dtype=dtype), torch.tensor(981, device="cuda"),
            torch.randn(2, 77, 64, device="cuda", dtype=dtype))
    return net, args


@probe("torch.compile default + reduce-overhead (Triton, CUDA graphs), fp16 channels-last")
def compile_check():
    import torch

    torch.compiler.reset()
    net, args = _tiny_net(torch.float16)
    with torch.no_grad():
        ref = net(*args)
        out = []
        for mode in ("default", "reduce-overhead"):
            torch.compiler.reset()
            fn = torch.compile(net, mode=mode, fullgraph=True, dynamic=False)
            for _ in range(4):
                got = fn(*args).clone()
            out.append(f"{mode} max|diff| {(got - ref).abs().max().item():.3g}")
    torch.compiler.reset()
    return "; ".join(out)


@probe("torch.jit.trace fp16 channels-last on CUDA (profiling executor, 4 calls)")
def trace_check():
    import torch

    net, args = _tiny_net(torch.float16)
    with torch.no_grad():
        ref = net(*args)
        traced = torch.jit.trace(net, args, check_trace=False)
        for _ in range(4):
            got = traced(*args)
    return f"max|diff| {(got - ref).abs().max().item():.3g}"


@probe("torchao int8wo / int8dq / fp8dq on a CUDA Linear")
def torchao_check():
    import torch
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_)

    out = []
    x = torch.randn(2 * 4096, 1280, device="cuda", dtype=torch.bfloat16)
    for name, config in (("int8wo", Int8WeightOnlyConfig), ("int8dq", Int8DynamicActivationInt8WeightConfig),
                         ("fp8dq", Float8DynamicActivationFloat8WeightConfig)):
        try:
            lin = torch.nn.Sequential(torch.nn.Linear(1280, 1280)).to("cuda", torch.bfloat16)
            ref = lin(x)
            quantize_(lin, config())
            err = ((lin(x) - ref).abs().mean() / ref.abs().mean()).item()
            out.append(f"{name} rel err {err:.3f}")
        except Exception as exc:  # noqa: BLE001
            out.append(f"{name} NO ({str(exc).splitlines()[0][:80]})")
    return "; ".join(out)


@probe("AOTInductor package of a tiny module on CUDA")
def aoti_check():
    import tempfile

    import torch
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    net, args = _tiny_net(torch.float16)
    with torch.no_grad():
        ref = net(*args)
        exported = torch.export.export(net, args)
        path = aoti_compile_and_package(exported, package_path=str(Path(tempfile.mkdtemp()) / "tiny.pt2"))
        got = aoti_load_package(path)(*args)
    return f"max|diff| {(got - ref).abs().max().item():.3g}"


def preflight(cpu: bool = False) -> int:
    versions()
    toolchain()
    import torch

    if not torch.cuda.is_available():
        if cpu:
            line("info", "cuda", "no GPU (--cpu): the device probes are skipped")
            return 0
        line("FAIL", "cuda", "torch.cuda.is_available() is False: nothing else to check")
        return 1
    tf32_flags()
    timing()
    peak_memory()
    sdpa()
    xformers_check()
    torchao_check()
    trace_check()
    compile_check()
    if os.environ.get("GPU_CHECK_AOTI"):
        aoti_check()
    return 0


def _is_seed_fp32(row: dict) -> bool:
    choices = row.get("choices") or {}
    return row.get("status") == "ok" and all(choices.get(k, v) == v for k, v in
                                             (("precision", "fp32"), ("attention", "classic"), ("compile", "none"),
                                              ("memory_format", "contiguous")))


def summary(sweep_dir: str) -> int:
    """One line per row: where, what, status, median/min/max, steps/s, speed-up over the fp32
    seed row, warmup calls (steady or why not), peak memory, the attention that ran, notes, error."""
    root = Path(sweep_dir)
    paths = sorted(p for p in root.glob("**/result.json") if ".hydra" not in p.parts)
    if not paths:
        print(f"no result.json under {root}")
        return 2
    rows = [(path, json.loads(path.read_text())) for path in paths]
    base = next((row["latency_s"]["median"] for _, row in rows if _is_seed_fp32(row)), None)
    for path, row in rows:
        what = row.get("preset") or " ".join(f"{k}={v}" for k, v in (row.get("choices") or {}).items()
                                             if k in ("precision", "memory_format", "attention", "compile"))
        lat = row.get("latency_s") or {}
        text = ""
        if lat:
            sps = row.get("steps_per_s")
            text = (f"median {lat['median']:.3f} s (min {lat['min']:.3f}, max {lat['max']:.3f}, n {len(lat['runs'])}), "
                    f"{sps:.1f} steps/s, " if sps else f"median {lat['median']:.3f} s, ")
            text += f"x{base / lat['median']:.2f} vs fp32, " if base else ""
            steady = "steady" if row.get("steady") else f"NOT steady: {row.get('unsteady_reason')}"
            text += (f"warmup {row['warmup_s']:.1f} s in {row.get('warmup_calls')} calls ({steady}), "
                     f"load {row['load_s']:.1f} s, build {row['build_s']:.1f} s, peak {row['peak_memory_mb']:.0f} MB")
            if row.get("peak_memory_reserved_mb"):
                text += f" (reserved {row['peak_memory_reserved_mb']:.0f} MB)"
        kernel = row.get("attention_kernel") or {}
        if kernel.get("pinned_modules") or kernel.get("unpinned") or "xformers_op" in kernel:
            text += f", attention {json.dumps(kernel, sort_keys=True)}"
        notes = "; ".join(row.get("build_notes") or [])
        text += f", notes: {notes}" if notes else ""
        stats = row.get("image_stats") or {}
        image = f", image mean {stats.get('mean', 0):.3f} std {stats.get('std', 0):.3f}" if stats else ""
        error = " :: " + " ".join(str(row["error"]).split()) if row.get("error") else ""
        fatal = " [fatal CUDA error]" if row.get("fatal_cuda_error") else ""
        print(f"{path.parent.relative_to(root)} | {what} | {row['status']}{fatal} | {text}{image}{error}", flush=True)
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "preflight"
    if command == "summary":
        sys.exit(summary(sys.argv[2]))
    sys.exit(preflight(cpu="--cpu" in sys.argv[2:]))
