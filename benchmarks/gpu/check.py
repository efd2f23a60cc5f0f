"""The GPU proof's own checks (run by run.sh): what the sweeps alone would not show, and a
plain-text summary of the rows.

    python benchmarks/gpu/check.py preflight [--cpu]  # ~20-30 s on an H100: versions, toolchain (as
                                           # validation sees it), TF32 flags, event timing, peak
                                           # memory, SDPA kernels per head dim and dtype, xformers,
                                           # jit.trace, torchao
    python benchmarks/gpu/check.py model OVERRIDES... # build + save the random-weight model once
    python benchmarks/gpu/check.py collect WORK OUT [STEP]  # rows.jsonl, summary.txt, errors.txt into
                                           # OUT; STEP's rows printed one compact line each
    python benchmarks/gpu/check.py limits OUT  # OUT within what the device tool returns (8 flat files)

Every probe is guarded: a failure prints FAIL with its reason and the next probe runs. With
--cpu (no GPU) only the machine-independent probes run, and the exit status is 0.
Set PREFLIGHT_COMPILE=1 to also torch.compile a tiny net in default and reduce-overhead modes (two cold
Triton compiles, ~30-60 s: off by default, as the proof's compile step compiles the UNet anyway), and
GPU_CHECK_AOTI=1 to also AOT-compile a tiny module (needs a CUDA toolkit; ~1 min).
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


@probe("TF32 flags (sdbuild.levers.precision.set_global_switches) vs the torch>=2.9 fp32_precision API")
def tf32_flags():
    import torch

    import sdbuild
    from sdbuild.levers.precision import global_switches, set_global_switches

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

    from sdbuild.levers.attention import xformers_kernels

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
    if os.environ.get("PREFLIGHT_COMPILE"):
        compile_check()
    if os.environ.get("GPU_CHECK_AOTI"):
        aoti_check()
    return 0


# --- what comes back from the GPU machine ---------------------------------------------------------
# The device tool returns at most 8 files of at most 16 MiB, no more than 2 folders below $OUT. The
# run keeps its working folder outside $OUT and copies exactly these files into $OUT after each step.
OUT_FILES = ("summary.txt", "rows.jsonl", "errors.txt", "preflight.log", "steps.txt", "logs.tar.gz")
OUT_MAX_FILES, OUT_MAX_BYTES, OUT_MAX_DEPTH = 8, 16 * 2**20, 2


def out_problems(out: Path) -> list:
    """Every way `out` breaks the limits of what the device tool returns (empty: it all comes back)."""
    problems, files = [], []
    for path in sorted(Path(out).rglob("*")):
        rel = path.relative_to(out)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file or folder")
        elif path.is_file():
            files.append(rel)
            if len(rel.parts) - 1 > OUT_MAX_DEPTH:
                problems.append(f"{rel}: more than {OUT_MAX_DEPTH} folders below $OUT")
            if path.stat().st_size > OUT_MAX_BYTES:
                problems.append(f"{rel}: {path.stat().st_size} bytes, over {OUT_MAX_BYTES}")
            if str(rel) not in OUT_FILES:
                problems.append(f"{rel}: not one of {', '.join(OUT_FILES)}")
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files, over {OUT_MAX_FILES}")
    return problems


def limits(out: str) -> int:
    problems = out_problems(Path(out))
    for problem in problems:
        print(f"[FAIL] $OUT limits: {problem}")
    if not problems:
        names = sorted(p.name for p in Path(out).iterdir())
        print(f"[ok] $OUT limits: {len(names)} files, flat, each under 16 MiB: {', '.join(names)}")
    return 1 if problems else 0


# --- the rows: collected after each step -----------------------------------------------------------
def _spec(row: dict) -> dict:
    return row.get("spec") or {}


def _plain(spec: dict) -> bool:
    """No lever beyond precision and attention: contiguous, eager, no quantization or offload."""
    return (spec.get("memory_format", {}).get("format") == "contiguous"
            and spec.get("compile", {}).get("method") == "none"
            and spec.get("quant", {}).get("method") == "none"
            and spec.get("memory", {}).get("offload") == "none")


def is_fp32_baseline(row: dict) -> bool:
    """diffusers' guide's first row: an ok row of the unoptimised pipeline, by the report's own rule
    (typed spec values: fp32 without TF32, classic attention, nothing else)."""
    from sdbuild.report.analyse import is_reference

    return row.get("status") == "ok" and is_reference(row)


def is_half_sdpa(row: dict) -> bool:
    """The target's second reference: half-precision weights (fp16 on a GPU; bf16 stands in on CPU) and
    PyTorch SDPA left to pick its kernel, nothing else."""
    spec = _spec(row)
    attention = spec.get("attention", {})
    return (row.get("status") == "ok" and _plain(spec) and spec.get("precision", {}).get("dtype") in ("fp16", "bf16")
            and attention.get("processor") == "sdpa" and attention.get("sdpa_backend") == "auto"
            and not attention.get("fuse_qkv") and not attention.get("slice_size"))


# run.sh's measured steps, in the order it runs them
STEP_ORDER = ("seed", "compile", "best", "sdpa", "parallel", "compile2")
# The parallel step measures its own model (tiny Flux: the one with a context-parallel plan), not the other steps':
# its rows are left out of the fp32 reference and the targets, and get their own summary line.
PARALLEL_STEP = "parallel"


def read_rows(work: Path) -> list:
    """(step, job folder, row) for every result.json under WORK/sweeps/STEP/, in run order."""
    def order(path: Path):
        step = path.parts[-3]
        return (STEP_ORDER.index(step) if step in STEP_ORDER else len(STEP_ORDER), step, _num(path.parts[-2]))

    out = []
    for path in sorted((work / "sweeps").glob("*/*/result.json"), key=order):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            row = {"status": "unreadable", "error": f"{path}: {exc}"}
        out.append((path.parts[-3], path.parent, row))
    return out


def _num(text: str):
    return (0, int(text)) if text.isdigit() else (1, text)


def describe(row: dict) -> str:
    """The row's levers in a few words, from the typed spec (the preset's name where it has one)."""
    spec = _spec(row)
    if not spec:
        return "?"
    p, m, a, c = (spec.get(k, {}) for k in ("precision", "memory_format", "attention", "compile"))
    parts = [p.get("dtype", "?") + ("+tf32" if p.get("tf32") else "")]
    if m.get("format") == "channels_last":
        parts.append("channels-last")
    att = a.get("processor", "?") + (f":{a['sdpa_backend']}" if a.get("sdpa_backend") not in (None, "auto") else "")
    parts.append(att + ("+fused-qkv" if a.get("fuse_qkv") else ""))
    if c.get("method") not in (None, "none"):
        parts.append(c["method"] + (f":{c['mode']}" if c.get("mode") not in (None, "default") else "")
                     + ("-regional" if c.get("regional") else ""))
    par = spec.get("parallel") or {}
    if par.get("method") not in (None, "none"):
        ranks = par.get("ulysses_degree", 1) * par.get("ring_degree", 1) * par.get("tp_degree", 1)
        parts.append(f"{par['method']} x{ranks} ranks")
    label = " ".join(parts)
    return f"{row['preset']} ({label})" if row.get("preset") else label


def _attention_ran(row: dict) -> str:
    kernel = row.get("attention_kernel") or {}
    if not kernel:
        return "-"
    text = kernel.get("processor", "?")
    if kernel.get("pinned_modules"):
        text += f" pinned {kernel.get('requested')} on {'+'.join(kernel['pinned_modules'])}"
    if kernel.get("unpinned"):
        text += f", free on {'+'.join(kernel['unpinned'])}"
    if "xformers_op" in kernel:
        text += f", xformers kernels {'loaded' if kernel.get('xformers_kernels_loaded') else 'NOT loaded'}" \
                f" op {kernel.get('xformers_op')}"
    return text


def _speedup(base, median) -> str:
    return f"x{base / median:.2f}" if base and median else "-"


def compact(step: str, row: dict, base) -> str:
    """One short line: what, median, steps/s, speed-up over fp32, peak memory, attention that ran."""
    what = describe(row)
    if row.get("status") != "ok":
        error = " ".join(str(row.get("error") or "").split())[:160]
        return f"{step:8} {what} | {str(row.get('status')).upper()} | {error}"
    med = (row.get("latency_s") or {}).get("median")
    sps = row.get("steps_per_s")
    return (f"{step:8} {what} | {med:.3f} s | {f'{sps:.1f} steps/s' if sps else '- steps/s'} | "
            f"{_speedup(base, med)} vs fp32 | peak {row.get('peak_memory_mb', 0):.0f} MB | {_attention_ran(row)}")


def full_line(step: str, folder: Path, row: dict, base) -> str:
    """The summary's line: the compact one plus spread, warmup, load/build times and notes."""
    text = compact(step, row, base)
    lat = row.get("latency_s") or {}
    if lat:
        steady = "steady" if row.get("steady") else f"NOT steady: {row.get('unsteady_reason')}"
        text += (f" | min {lat['min']:.3f} max {lat['max']:.3f} n {len(lat.get('runs', []))}"
                 f" | warmup {row.get('warmup_s', 0):.1f} s in {row.get('warmup_calls')} calls ({steady})"
                 f" | load {row.get('load_s', 0):.1f} s build {row.get('build_s', 0):.1f} s")
        if row.get("peak_memory_reserved_mb"):
            text += f" | reserved {row['peak_memory_reserved_mb']:.0f} MB"
    notes = "; ".join(row.get("build_notes") or [])
    fatal = " [fatal CUDA error]" if row.get("fatal_cuda_error") else ""
    return f"{folder.parent.name}/{folder.name} | {text}{fatal}" + (f" | notes: {notes}" if notes else "")


def targets(rows: list) -> list:
    """The proof's verdict against the issue's targets: the fastest ok row, its speed-up over fp32
    and over half precision + SDPA, and its denoising steps/s."""
    ok = [row for step, _, row in rows if row.get("status") == "ok" and row.get("latency_s")
          and step != PARALLEL_STEP]
    if not ok:
        return ["targets: no ok row"]
    base = next((r["latency_s"]["median"] for r in ok if is_fp32_baseline(r)), None)
    half = next((r["latency_s"]["median"] for r in ok if is_half_sdpa(r)), None)
    best = min(ok, key=lambda r: r["latency_s"]["median"])
    med, sps = best["latency_s"]["median"], best.get("steps_per_s")
    fastest = f"fastest: {describe(best)}: {med:.3f} s, {f'{sps:.1f}' if sps else '-'} steps/s"
    device = (best.get("env") or {}).get("device")
    if device != "cuda":  # CPU stand-ins prove the script, never the GPU goals
        return [fastest, f"targets: not judged: these rows ran on {device} (stand-ins); the goals (x6 over fp32, "
                         "x1.5 over half+SDPA, 125 steps/s) are for an H100/H200 at 512x512"]
    return [fastest, f"targets: {_speedup(base, med)} over fp32 (goal x6), {_speedup(half, med)} over half+SDPA "
                     f"(goal x1.5), {f'{sps:.1f}' if sps else '-'} steps/s (goal 125 on an H100/H200 at 512x512)"]


def parallel_lines(work: Path, rows: list) -> list:
    """The parallel step's verdict: each parallel row's speed-up on the same spec at degree 1 (the step's
    parallel=none row), the efficiency (speed-up / ranks) and its fidelity to the degree-1 image; or why
    the step has none ("skipped: 1 GPU", from run.sh)."""
    skipped = work / "parallel.skip"
    if skipped.is_file():
        return [f"parallel: {skipped.read_text().strip()}"]
    mine = [row for step, _, row in rows if step == PARALLEL_STEP]
    if not mine:
        return []
    one = next((r for r in mine if not r.get("parallel") and r.get("status") == "ok"), None)
    out = []
    for row in (r for r in mine if (_spec(r).get("parallel") or {}).get("method") not in (None, "none")):
        if row.get("status") != "ok":
            out.append(f"parallel: {describe(row)}: {str(row.get('status')).upper()}: "
                       f"{' '.join(str(row.get('error') or '').split())[:200]}")
            continue
        par, med = row.get("parallel") or {}, row["latency_s"]["median"]
        fid = par.get("fidelity") or {}
        fidelity = (f"max abs diff {fid['max_abs_diff']:.1e} to degree 1 (tolerance {fid.get('tolerance')}, "
                    f"within: {fid.get('within_tolerance')})" if fid.get("max_abs_diff") is not None
                    else f"fidelity: {fid.get('error', 'none')}")
        ranks = par.get("world_size", 0)
        if one is not None and ranks:
            speedup = one["latency_s"]["median"] / med
            gain = (f"{med:.4f} s vs {one['latency_s']['median']:.4f} s at degree 1: x{speedup:.2f}, "
                    f"efficiency {speedup / ranks:.2f}")
        else:
            gain = f"{med:.4f} s (no degree-1 row to compare)"
        out.append(f"parallel: {describe(row)} over {par.get('backend')}, {ranks} ranks: {gain}; {fidelity}; "
                   f"peak MB per rank {[round(m) for m in par.get('peak_memory_mb_per_rank') or []]}"
                   + (f"; {_threads_and_load(one, row)}" if one is not None and (row.get("env") or {}).get("device")
                      == "cpu" else ""))
    return out


def _threads_and_load(one: dict, row: dict) -> str:
    """On a CPU the figure is about cores and threads, not parallelism: what each side had, and the load."""
    threads = lambda r: ((r.get("measurement") or {}).get("threads") or {}).get("torch_threads")  # noqa: E731
    load = max(((r.get("machine_load") or {}).get("before") or {}).get("loadavg_1m") or 0 for r in (one, row))
    cpus = ((row.get("machine_load") or {}).get("before") or {}).get("cpu_count")
    return f"degree 1 on {threads(one)} torch threads, each rank {threads(row)}; load {load:.1f} on {cpus} CPUs"


def collect(work: str, out: str, step: str = "") -> int:
    """Write OUT/rows.jsonl (every row, whole), OUT/summary.txt (a line per row, then the targets) and
    OUT/errors.txt (each non-ok row's error and its traceback's last lines); print STEP's rows compactly."""
    work_dir, out_dir = Path(work), Path(out)
    rows = read_rows(work_dir)
    base = next((r["latency_s"]["median"] for step, _, r in rows if is_fp32_baseline(r) and step != PARALLEL_STEP),
                None)
    with open(out_dir / "rows.jsonl", "w") as f:
        for name, folder, row in rows:
            f.write(json.dumps({"step": name, "job": folder.name, **row}) + "\n")
    mine = lambda name: None if name == PARALLEL_STEP else base  # noqa: E731 - another model: no "vs fp32"
    summary = [full_line(name, folder, row, mine(name)) for name, folder, row in rows] + parallel_lines(work_dir, rows)
    summary += targets(rows)
    (out_dir / "summary.txt").write_text("\n".join(summary) + "\n")
    errors = []
    for name, folder, row in rows:
        if row.get("status") != "ok":
            log = folder / "error.log"
            tail = log.read_text(errors="replace").splitlines()[-12:] if log.exists() else []
            errors.append(f"== {name}/{folder.name} {describe(row)}: {row.get('status')}\n{row.get('error')}\n"
                          + "".join(f"    {line}\n" for line in tail))
    (out_dir / "errors.txt").write_text("\n".join(errors) or "no failed or unsupported row\n")
    for name, _, row in rows:
        if name == step:
            print(compact(name, row, mine(name)), flush=True)
    if step and not any(name == step for name, _, _ in rows):
        print(f"{step:8} no row (the step wrote no result.json)", flush=True)
    return 0


def model(overrides: list) -> int:
    """Build and save the random-weight model of OVERRIDES into the model cache, once: its own step, so
    the seconds it takes (random init + safetensors save) are never charged to a timed sweep."""
    import sdbuild
    from sdbuild.models import ensure_model, model_folder

    spec = sdbuild.compose(overrides)
    start = time.perf_counter()
    cached = (Path(model_folder(spec.model, spec.cache_dir)) / "model_index.json").exists()
    folder = Path(ensure_model(spec.model, spec.cache_dir))
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2**30
    how = "already cached" if cached else "built and saved"
    print(f"[ok] model {spec.model.name}: {how} in {time.perf_counter() - start:.1f} s, {size:.2f} GiB "
          f"of safetensors in {folder}", flush=True)
    return 0


if __name__ == "__main__":
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("preflight", [])
    if command == "collect":
        sys.exit(collect(*args))
    if command == "limits":
        sys.exit(limits(args[0]))
    if command == "model":
        sys.exit(model(args))
    sys.exit(preflight(cpu="--cpu" in args))
