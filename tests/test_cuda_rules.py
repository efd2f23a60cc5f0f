"""The CUDA paths' rules, checked on CPU: which SDPA kernel really runs (observed with the
profiler), where a pin cannot hold, build order, what validation refuses on a CUDA machine,
warmup until steady, peak memory after warmup, steps per second, SDXL's fp16 VAE."""

import copy
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from torch.profiler import ProfilerActivity, profile

import sdbuild
from sdbuild import builder
from sdbuild.builder import BuildInfo, build_pipeline
from sdbuild.levers import compile as compile_lever
from sdbuild.levers import memory, precision, vae
from sdbuild.levers.attention import apply_attention, attention_modules, head_dim
from sdbuild.levers.graphs import GraphUNet
from sdbuild.levers.model import load
from sdbuild.errors import SpecError
from sdbuild.measure import StepClock, fatal_cuda_error, measure
from sdbuild.run_inputs import call_kwargs
from sdbuild.spec import SdpaBackend
from sdbuild.validate import Machine, validate

from conftest import ROOT

MATH, CPU_FLASH = "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu"
SDPA = "aten::scaled_dot_product_attention"
H100 = Machine(cuda=True, device_name="NVIDIA H100", capability=(9, 0), packages=frozenset({"xformers", "accelerate", "torchao"}),
               diffusers_version="0.42.1", c_compiler=True)


def spec_of(*overrides):
    return sdbuild.compose(["run.steps=2", "run.warmup=0", "run.repeats=1", *overrides])


@pytest.fixture(scope="module")
def tiny_fp32():
    """The tiny SD 1.5 pipeline in fp32, loaded once; tests change deep copies of it."""
    return load(spec_of())


def sdpa_kernels(pipe):
    """Run the UNet and the VAE decoder once under the profiler; count SDPA calls and the kernels
    they ran (on CPU, PyTorch's own choice is its flash kernel for CPU; the math kernel is the
    reference implementation)."""
    sample = torch.randn(2, 4, 8, 8)
    hidden = torch.randn(2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe.unet(sample, torch.tensor(999), hidden)
        pipe.vae.decode(torch.randn(1, 4, 8, 8))
    names = [e.name for e in prof.events()]
    return {"sdpa": names.count(SDPA), "math": names.count(MATH), "cpu_flash": names.count(CPU_FLASH)}


# 1-2. The SDPA pin holds where it is claimed ------------------------------------------------------


@pytest.mark.parametrize("overrides", [["attention=sdpa_math"], ["attention=sdpa_fused", "attention.sdpa_backend=math"]])
def test_pinned_math_kernel_runs_every_unet_and_vae_attention(tiny_fp32, overrides):
    pipe = copy.deepcopy(tiny_fp32)
    record = apply_attention(pipe, spec_of(*overrides))
    seen = sdpa_kernels(pipe)
    assert seen["sdpa"] > 0 and seen["math"] == seen["sdpa"], seen
    assert record["pinned_modules"] == ["unet", "vae"] and record["unpinned"] == {}


def test_unpinned_sdpa_runs_pytorchs_own_choice(tiny_fp32):
    """The control: without a pin no call runs the math kernel, so the test above can tell them apart."""
    pipe = copy.deepcopy(tiny_fp32)
    record = apply_attention(pipe, spec_of("attention=sdpa_fused"))
    seen = sdpa_kernels(pipe)
    assert seen["sdpa"] > 0 and seen["math"] == 0 and seen["cpu_flash"] == seen["sdpa"], seen
    assert record["pinned_modules"] == [] and record["fused_modules"] == ["unet", "vae"]
    assert all(isinstance(a.processor, FusedAttnProcessor2_0) for _, a in attention_modules(pipe.unet))


def test_traced_unet_replays_under_the_pin(tiny_fp32):
    spec = spec_of("attention=sdpa_math", "compile=trace")
    pipe = copy.deepcopy(tiny_fp32)
    info = BuildInfo(device="cpu")
    info.attention_kernel = apply_attention(pipe, spec)
    notes = compile_lever.apply_compile(pipe, spec, "cpu", info.attention_kernel)
    assert isinstance(pipe.unet, GraphUNet) and pipe.unet.sdpa_backend is SdpaBackend.math
    assert any("replays under sdpa_kernel(math)" in n for n in notes)
    seen = sdpa_kernels(pipe)  # the GraphUNet, called as the pipeline calls it
    assert seen["sdpa"] > 0 and seen["math"] == seen["sdpa"], seen


def _fp16_pipe_with_sd15_vae_attention(tiny_fp32, vae_dtype=torch.float16):
    """The tiny UNet in fp16 beside a VAE whose mid-block attention has SD 1.5's single 512-wide head
    (nothing runs: this checks where the pin is installed)."""
    pipe = copy.deepcopy(tiny_fp32)
    pipe.unet.to(torch.float16)
    pipe.vae = AutoencoderKL(block_out_channels=(512,), layers_per_block=1, norm_num_groups=32).to(vae_dtype)
    return pipe


@pytest.mark.parametrize("kernel", ["sdpa_flash", "sdpa_cudnn"])
def test_flash_and_cudnn_are_pinned_on_the_unet_only_not_the_512_wide_vae_head(tiny_fp32, kernel):
    pipe = _fp16_pipe_with_sd15_vae_attention(tiny_fp32)
    record = apply_attention(pipe, spec_of(f"attention={kernel}", "precision=fp16"))
    backend = SdpaBackend.flash if kernel == "sdpa_flash" else SdpaBackend.cudnn
    assert "head dim 512" in record["unpinned"]["vae"]
    pinned = {head_dim(a) for _, a in attention_modules(pipe.unet) if getattr(a.processor, "sdpa_backend", None) is backend}
    if backend is SdpaBackend.flash:
        assert record["pinned_modules"] == ["unet"] and pinned == {4, 8}  # the tiny UNet's head dims
    else:  # cuDNN takes head dims in multiples of 8 only (torch's check_cudnn_tensor_shapes)
        assert pinned == {8} and "head dim 4 is not a multiple of 8" in record["unpinned"]["unet"]
    assert {type(a.processor) for _, a in attention_modules(pipe.vae)} == {AttnProcessor2_0}  # encoder + decoder


def test_fp32_vae_is_not_pinned_to_flash(tiny_fp32):
    """precision=fp16_vae32: the UNet is pinned, the fp32 VAE (which flash cannot run) is not."""
    pipe = copy.deepcopy(tiny_fp32)
    pipe.unet.to(torch.float16)
    record = apply_attention(pipe, spec_of("attention=sdpa_flash", "precision=fp16_vae32"))
    assert record["pinned_modules"] == ["unet"] and "float32" in record["unpinned"]["vae"]


def test_trace_refuses_a_unet_only_partly_pinned(tiny_fp32):
    pipe = copy.deepcopy(tiny_fp32)
    spec = spec_of("attention=sdpa_flash", "compile=trace")  # fp32 UNet: flash cannot run any of it
    record = apply_attention(pipe, spec)
    with pytest.raises(SpecError, match="compile=trace with attention.sdpa_backend=flash"):
        compile_lever.apply_compile(pipe, spec, "cpu", record)


def test_sdpa_fused_with_the_tiny_vae_fuses_the_unet_only(tiny_fp32):
    pipe = copy.deepcopy(tiny_fp32)
    pipe.vae = vae.tiny_autoencoder(spec_of("vae=tiny"), torch.float32)
    record = apply_attention(pipe, spec_of("attention=sdpa_fused", "vae=tiny"))
    assert record["fused_modules"] == ["unet"]


# 3. Offload is installed after every change to the modules ------------------------------------------


def test_offload_is_installed_after_attention_fusion_and_channels_last(monkeypatch):
    """`place` (where offload hooks go) runs once, and sees the modules already final."""
    seen = []
    real_place = memory.place

    def watching_place(pipe, spec, device, info):
        seen.append({"processors": {type(a.processor) for _, a in attention_modules(pipe.unet)},
                     "channels_last": pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
                     "slicing": pipe.vae.use_slicing})
        real_place(pipe, spec, device)

    monkeypatch.setattr(builder, "STEPS", tuple(dataclasses.replace(step, apply=watching_place)
                                                if step.apply is memory.apply_place else step for step in builder.STEPS))
    build_pipeline(spec_of("attention=sdpa_fused", "memory_format=channels_last", "memory=vae_slicing"), "cpu")
    assert seen == [{"processors": {FusedAttnProcessor2_0}, "channels_last": True, "slicing": True}]


# Validation on a CUDA machine (before weights load) ------------------------------------------------


def refusal(machine, *overrides):
    with pytest.raises(SpecError) as err:
        validate(spec_of(*overrides), machine)
    return str(err.value)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("kernel", ["sdpa_flash", "sdpa_cudnn"])
def test_flash_and_cudnn_refuse_an_fp32_unet(kernel, precision):
    assert "fp16/bf16 only" in refusal(H100, f"attention={kernel}", f"precision={precision}")
    validate(spec_of(f"attention={kernel}", "precision=fp16"), H100)
    validate(spec_of(f"attention={kernel}", "precision=fp16_vae32"), H100)  # the VAE is left unpinned


def test_refused_combinations_on_cuda():
    assert "AOTInductor picks the attention kernel" in refusal(H100, "compile=export", "attention=sdpa_math")
    assert "drops their channels-last layout" in refusal(H100, "memory=group_offload", "memory_format=channels_last")


def test_quant_needs_accelerate_and_diffusers_034():
    no_accelerate = Machine(**{**H100.__dict__, "packages": frozenset({"torchao"})})
    assert "`accelerate` is not installed" in refusal(no_accelerate, "quant=int8wo", "precision=bf16")
    old = Machine(**{**H100.__dict__, "diffusers_version": "0.33.1"})
    assert "diffusers >= 0.34" in refusal(old, "quant=int8wo", "precision=bf16")


@pytest.mark.parametrize("missing, needle", [
    ({"cc": False}, "no C compiler"),
    ({"python_headers": False}, "Python headers (Python.h)"),
])
def test_triton_toolchain_on_cuda(missing, needle):
    machine = Machine(**{**H100.__dict__, **missing})
    text = refusal(machine, "compile=inductor", "precision=fp16")
    assert needle in text and "compile=" in text
    validate(spec_of("compile=inductor", "run.device=cpu"), machine)  # the CPU needs C++ only


def test_aot_inductor_on_cuda_needs_a_cuda_toolkit():
    machine = Machine(**{**H100.__dict__, "cuda_toolkit": False})
    assert "no CUDA toolkit" in refusal(machine, "compile=export", "precision=fp16")
    validate(spec_of("compile=inductor", "precision=fp16"), machine)  # Triton alone needs no nvcc


def test_machine_probe_sees_this_machines_toolchain():
    machine = Machine.probe()
    assert machine.python_headers and machine.cc  # CI and this image have gcc and python3-dev
    assert machine.cuda_toolkit is False or machine.cuda  # only probed where there is CUDA


# 4, 6. Measurement -----------------------------------------------------------------------------


def test_step_clock_stamps_every_denoising_step(tiny_fp32):
    spec = spec_of("run.steps=3")
    pipe = copy.deepcopy(tiny_fp32)
    clock = StepClock("cpu")
    pipe(**call_kwargs(spec, pipe, "cpu"), callback_on_step_end=clock)
    assert len(clock.marks) == 3 and clock.steps_per_s() > 0


def test_warmup_runs_until_steady_and_peak_memory_excludes_it(tiny_fp32):
    """A UNet compiled by TorchDynamo (eager backend: no C++ build) compiles in the first warmup
    call, so one more warmup call runs; a 300 MB allocation made in the first warmup call only
    shows in the warmup peak, not in the timed runs' peak."""
    spec = spec_of("run.steps=2")
    pipe = copy.deepcopy(tiny_fp32)
    pipe.unet.compile(backend="eager")
    calls = []

    def make_kwargs():
        calls.append(1)
        if len(calls) == 1:
            block = np.ones(300 * 2**20 // 8)  # touched, so resident
            block.sum()
            del block
        return call_kwargs(spec, pipe, "cpu")

    torch.compiler.reset()
    m = measure(pipe, make_kwargs, "cpu", warmup=1, repeats=1, show_progress=False)
    assert m.warmup_calls == 2 and m.steady and m.unsteady_reason is None
    assert m.warmup_peak_memory_mb - m.peak_memory_mb > 200
    assert m.steps_per_s() is not None and m.peak_memory_reserved_mb is None

    torch.compiler.reset()  # compiles again: now in the timed run, as no warmup was asked for
    m = measure(pipe, lambda: call_kwargs(spec, pipe, "cpu"), "cpu", warmup=0, repeats=1, show_progress=False)
    assert m.warmup_calls == 0 and not m.steady and "graphs compiled" in m.unsteady_reason
    assert m.warmup_peak_memory_mb is None

    torch.compiler.reset()  # a cap of 1: the only warmup call compiles, so the row is not steady
    m = measure(pipe, lambda: call_kwargs(spec, pipe, "cpu"), "cpu", warmup=1, repeats=1, show_progress=False,
                max_warmup=1)
    assert m.warmup_calls == 1 and not m.steady and "cap 1" in m.unsteady_reason


@pytest.mark.slow
def test_compile_inductor_is_steady_after_warmup():
    """compile=inductor on the tiny model, end to end: the first warmup call compiles, warmup goes on
    until a call compiles nothing, and the timed run is steady."""
    spec = spec_of("compile=inductor", "run.warmup=1")
    pipe, _ = build_pipeline(spec, "cpu")
    m = measure(pipe, lambda: call_kwargs(spec, pipe, "cpu"), "cpu", warmup=1, repeats=1, show_progress=False)
    assert m.warmup_calls >= 2 and m.steady, (m.warmup_calls, m.unsteady_reason)


def test_fatal_cuda_errors_are_told_from_out_of_memory():
    assert fatal_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert fatal_cuda_error(RuntimeError("CUDA error: operation failed due to a previous error during capture"))
    assert not fatal_cuda_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not fatal_cuda_error(RuntimeError("CUDA error: out of memory"))
    assert not fatal_cuda_error(ValueError("compile=trace: the UNet graph takes only ..."))


# 8. SDXL in fp16: the VAE stays fp32, once, at build time ---------------------------------------


def test_sdxl_fp16_keeps_the_vae_in_fp32_and_says_so():
    spec = sdbuild.compose(["model=tiny_sdxl", "precision=fp16"])
    pipe = load(spec)
    notes = precision.upcast_sdxl_vae(pipe, spec)
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    assert notes and "VAE kept in float32" in notes[0]
    chosen = sdbuild.compose(["model=tiny_sdxl", "precision=fp16", "precision.vae_dtype=fp16"])
    pipe = load(chosen)
    assert precision.upcast_sdxl_vae(pipe, chosen) == [] and pipe.vae.dtype == torch.float16


# 10. Inductor's cache switches reach Inductor even when it is already imported -------------------


def test_cache_dir_turns_inductors_caches_on_after_import(tmp_path):
    code = (
        "import sdbuild, torch._inductor.config as ic, torch._functorch.config as fc\n"
        "from sdbuild.levers.precision import set_global_switches\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "assert not ic.fx_graph_cache\n"
        f"set_global_switches(sdbuild.compose(['compile=inductor_cached', 'compile.cache_dir={tmp_path}']))\n"
        f"assert ic.fx_graph_cache and fc.enable_autograd_cache and cache_dir() == {str(tmp_path)!r}, cache_dir()\n"
        "set_global_switches(sdbuild.compose([]))\n"
        "assert not ic.fx_graph_cache\n"
    )
    # Inductor's FX-graph cache off by default for this process (its import-time setting)
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE_DEFAULT": "0"}
    env.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_run_device_cuda_on_a_machine_without_cuda_is_refused_not_crashed():
    """The GPU proof's --cpu mode asks for the bf16 best recipe on CUDA: a clear refusal, not a TypeError
    from comparing the missing compute capability."""
    cpu_only = Machine(**{**H100.__dict__, "cuda": False, "device_name": "cpu", "capability": None})
    assert "run.device=cuda: this machine has no CUDA GPU" in refusal(cpu_only, "+preset=cuda_best", "run.device=cuda")


# 9. A CUDA error that poisons the process: the row says so, later jobs run in a fresh process -----


@pytest.mark.slow
def test_a_poisoning_cuda_error_sends_later_jobs_to_a_fresh_process(tmp_path, monkeypatch):
    from sdbuild import job

    monkeypatch.setattr(job, "_PROCESS", {"cuda_poisoned": False})
    overrides = ["run.steps=1", "run.warmup=0", "run.repeats=1", "run.save_image=false"]
    spec = spec_of(*overrides)

    def illegal_address(*args, **kwargs):  # what the first kernel after a bad launch raises on a GPU
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(builder, "build_pipeline", illegal_address)
        first = job.run_job(spec, tmp_path / "0", {}, overrides, job={"num": 0})
    assert first["status"] == "failed" and first["fatal_cuda_error"] is True
    second = job.run_job(spec, tmp_path / "1", {}, overrides, job={"num": 1})
    assert second["status"] == "ok" and second["job"]["isolated"] is True
    assert second["env"]["pid"] != os.getpid()
