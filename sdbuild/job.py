"""One job: validate -> build -> measure -> record. Whatever happens, a `result.json` row is written.

A user mistake or a combination this machine cannot run is an `unsupported` row; an error while
building or running (out of memory, a compile failure, ...) is a `failed` row with its reason
and the traceback in `error.log`; a finished run is `ok`. Rows are written atomically, so an
interrupted sweep never leaves a half-written row behind.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shutil
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import SpecError
from .hardware import job_facts
from .report import write_atomic
from .spec import GROUPS, Spec, spec_key, spec_to_dict

log = logging.getLogger("sdbuild")
RESULT = "result.json"
IMAGE = "image.png"


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def environment(device: Optional[str]) -> Dict[str, Any]:
    """Versions, device and the global flags in force, recorded with every row."""
    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **{name: _version(name) for name in ("torch", "diffusers", "transformers", "xformers", "torchao", "hydra-core")},
        "device": device,
        "cpu": cpu_name(),
        "pid": os.getpid(),
    }
    try:
        import torch

        from .builder import global_switches

        cuda = device == "cuda"
        env.update(
            device_name=torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_name()}",
            cuda=torch.version.cuda,
            compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
            torch_threads=torch.get_num_threads(),
            flags=global_switches(),
        )
    except Exception as exc:  # the row must still be written
        env["env_error"] = repr(exc)
    return env


def save_image(images, path: Path) -> Dict[str, Any]:
    """Save the batch side by side as one PNG; return stats that reveal a broken image."""
    import numpy as np
    from PIL import Image

    nan = bool(np.isnan(images).any())
    stats = {"nan": nan, "min": float(np.nanmin(images)), "max": float(np.nanmax(images)),
             "mean": float(np.nanmean(images)), "std": float(np.nanstd(images))}
    pixels = (np.nan_to_num(images, nan=0.0).clip(0, 1) * 255).round().astype("uint8")
    Image.fromarray(np.concatenate(list(pixels), axis=1)).save(path)
    return stats


def broken_image(stats: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why an image is not a real result (NaN, or one flat colour such as fp16 VAE black), else None."""
    if stats is None:
        return None
    if stats["nan"]:
        return "broken image: the output holds NaN"
    if stats["max"] - stats["min"] < 1 / 255:
        return f"broken image: every pixel is {stats['mean']:.3f} (constant)"
    return None


def _find_completed(resume: str, key: str) -> Optional[Path]:
    """A finished row for the same resolved spec in an earlier sweep folder."""
    for path in sorted(Path(resume).expanduser().glob(f"**/{RESULT}")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if row.get("spec_key") == key and row.get("status") == "ok":
            return path
    return None


def _reuse(found: Path, out_dir: Path, row: Dict[str, Any]) -> Dict[str, Any]:
    old = json.loads(found.read_text())
    if old.get("image") and (found.parent / old["image"]).exists():
        shutil.copy2(found.parent / old["image"], out_dir / IMAGE)
        old["image"] = IMAGE
    old.update(choices=row["choices"], overrides=row["overrides"], job=row["job"],
               reused_from=old.get("reused_from") or str(found))
    return old


def release_memory() -> None:
    """Drop what a finished job left behind, so the next job in this process starts clean."""
    gc.collect()
    try:
        import torch

        torch.compiler.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    except Exception:
        pass


def run_job(spec: Spec, out_dir: Path, choices: Dict[str, str], overrides: list[str],
            job: Dict[str, Any] | None = None, show_progress: bool = True, reuse_weights: bool = False) -> Dict[str, Any]:
    """Build, run and measure `spec`; write `out_dir/result.json` and return the row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_dict = spec_to_dict(spec)
    row: Dict[str, Any] = dict(
        status="failed", error=None, choices=choices, preset=spec.preset, preset_order=spec.preset_order,
        overrides=overrides, spec_key=spec_key(spec_dict), spec=spec_dict, latency_s=None, warmup_s=None,
        warmup_runs_s=None, load_s=None, build_s=None, peak_memory_mb=None, image=None, image_stats=None,
        compile_cache=None, env=None, job={**(job or {}), **job_facts()}, reused_from=None,
    )
    label = " ".join(f"{g}={choices[g]}" for g in GROUPS if g in choices)
    if spec.resume and (found := _find_completed(spec.resume, row["spec_key"])):
        log.info("reusing %s (already measured in %s)", label, found.parent)
        row = _reuse(found, out_dir, row)  # keeps the measurement's own env
        write_json_atomic(out_dir / RESULT, row)
        return row
    started = time.perf_counter()
    device = None
    try:
        from .validate import validate

        device = validate(spec)
        row.update(_build_and_measure(spec, device, out_dir, label, show_progress, reuse_weights))
        row.update(status="ok", error=None)
        if (broken := broken_image(row["image_stats"])):
            row.update(status="broken", error=broken)
    except SpecError as exc:
        row.update(status="unsupported", error=str(exc))
    except KeyboardInterrupt:
        row.update(status="failed", error="interrupted (Ctrl-C) before the measurement finished")
        raise
    except Exception as exc:
        row.update(status="failed", error=_failure_reason(exc))
        (out_dir / "error.log").write_text(traceback.format_exc())
    finally:
        row["env"] = environment(device)
        row["job"]["wall_s"] = time.perf_counter() - started
        write_json_atomic(out_dir / RESULT, row)
        release_memory()
    return row


def _failure_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if "out of memory" in text.lower():
        return "out of memory: " + text.splitlines()[0]
    return text.splitlines()[0][:500] + " (traceback in error.log)"


CACHE_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss")


def inductor_counters() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: counters["inductor"][name] for name in CACHE_COUNTERS}


def compile_cache_stats(spec: Spec, before: Dict[str, int]) -> Optional[Dict[str, Any]]:
    """Inductor's FX-graph cache hits and misses during this job: did a warm start reuse kernels?
    (The counters are process-wide, so the job's share is the difference.)"""
    if spec.compile.method.value != "inductor":
        return None
    after = inductor_counters()
    return {"dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), **{k: after[k] - before[k] for k in CACHE_COUNTERS}}


def _build_and_measure(spec: Spec, device: str, out_dir: Path, label: str, show_progress: bool,
                       reuse_weights: bool) -> Dict[str, Any]:
    from .builder import build_pipeline
    from .measure import measure
    from .run_inputs import call_kwargs

    log.info("loading and building %s on %s", label or "pipeline", device)
    if spec.compile.method.value == "inductor" and spec.run.warmup == 0:
        log.warning("compile=%s with run.warmup=0: torch.compile compiles on the first call, so the timed "
                    "runs include compile time. Use run.warmup=1 or more for steady-state latency.", spec.compile.name)
    counters_before = inductor_counters()
    pipe, info = build_pipeline(spec, device, reuse_weights=reuse_weights)
    m = measure(pipe, lambda: call_kwargs(spec, pipe, device), device, spec.run.warmup, spec.run.repeats,
                label=label, show_progress=show_progress)
    fields: Dict[str, Any] = dict(
        latency_s=m.latency(), warmup_s=sum(m.warmup_s), warmup_runs_s=m.warmup_s,
        load_s=info.load_s, build_s=info.build_s, peak_memory_mb=m.peak_memory_mb,
        compile_cache=compile_cache_stats(spec, counters_before),
    )
    if spec.run.save_image and m.images is not None:
        fields["image_stats"] = save_image(m.images, out_dir / IMAGE)
        fields["image"] = IMAGE
    return fields
