"""Issue 23's CUDA findings, checked on CPU against a described CUDA machine (an H200 built by hand,
as tests/test_cuda_rules.py builds its H100): what validation refuses there and why, and that the
same spec is not refused on a CPU (where the conflict does not exist)."""

import pytest

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.spec import CompileMode
from sdbuild.validate import Machine, validate

from conftest import needs_packages

H200 = Machine(cuda=True, device_name="NVIDIA H200", capability=(9, 0),
               packages=frozenset({"xformers", "accelerate", "torchao", "flash_attn", "flash_attn_interface",
                                   "flash_attn_3", "sageattention", "DeepCache", "tomesd"}),
               diffusers_version="0.42.1", c_compiler=True)
CPU = Machine(**{**H200.__dict__, "cuda": False, "device_name": "cpu", "capability": None})


def spec_of(*overrides):
    return sdbuild.compose(["run.steps=2", "run.warmup=0", "run.repeats=1", *overrides])


def refusal(machine, *overrides):
    with pytest.raises(SpecError) as err:
        validate(spec_of(*overrides), machine)
    return str(err.value)


# Finding 1: diffusers' step caches with a CUDA-graph compile mode -----------------------------------


def test_compile_modes_with_cuda_graphs_are_those_inductor_says():
    from torch._inductor import list_mode_options

    for mode in CompileMode:
        assert mode.cuda_graphs == bool(list_mode_options(mode.value).get("triton.cudagraphs")), mode


@pytest.mark.parametrize("cache", ["first_block", "taylorseer", "pab", "faster_cache", "mag_cache"])
@pytest.mark.parametrize("compile", ["inductor_reduce_overhead", "inductor_max_autotune"])
def test_step_caches_are_refused_with_cuda_graphs_on_cuda(cache, compile):
    overrides = ["model=tiny_flux", "precision=bf16", f"cache={cache}", f"compile={compile}"]
    text = refusal(H200, *overrides)
    assert "on CUDA: cannot be combined" in text and "cudagraph-trees generation" in text
    assert "compile=inductor_max_autotune_no_cudagraphs" in text


@pytest.mark.parametrize("cache", ["first_block", "taylorseer"])
def test_step_caches_run_with_the_alternative_named_and_on_cpu(cache):
    assert validate(spec_of("model=tiny_flux", "precision=bf16", f"cache={cache}",
                            "compile=inductor_max_autotune_no_cudagraphs"), H200) == "cuda"
    # no CUDA graphs on CPU: max-autotune there is Inductor's kernel search alone
    assert validate(spec_of("model=tiny_flux", "precision=bf16", f"cache={cache}", "compile=inductor_max_autotune"),
                    CPU) == "cpu"


def test_the_no_cudagraphs_option_composes_to_its_mode():
    spec = sdbuild.compose(["compile=inductor_max_autotune_no_cudagraphs"])
    assert spec.compile.mode is CompileMode.max_autotune_no_cudagraphs and not spec.compile.mode.cuda_graphs


# Finding 2: regional compile with a CUDA-graph mode --------------------------------------------------


@pytest.mark.parametrize("mode", ["reduce_overhead", "max_autotune"])
@pytest.mark.parametrize("model", ["tiny", "tiny_flux"])
def test_regional_compile_is_refused_with_cuda_graphs_on_cuda(mode, model):
    overrides = [f"model={model}", "precision=bf16", "compile=regional", f"compile.mode={mode}"]
    text = refusal(H200, *overrides)
    assert "compile=regional with compile.mode=reduce_overhead or max_autotune (CUDA graphs) on CUDA" in text
    assert "160281" in text and "compile.mode=default or max_autotune_no_cudagraphs" in text
    assert validate(spec_of(*overrides[:-1], "compile.mode=max_autotune_no_cudagraphs"), H200) == "cuda"
    assert validate(spec_of(*overrides[:-1], "compile.mode=max_autotune"), CPU) == "cpu"


def test_whole_model_cuda_graphs_stay_allowed():
    assert validate(spec_of("precision=fp16", "compile=inductor_reduce_overhead"), H200) == "cuda"


# Finding 3: half-only dispatcher backends in fp32 ----------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("attention", ["dispatch_flash", "dispatch_cudnn", "dispatch_flash_attn", "dispatch_flash_attn3",
                                       "dispatch_sage"])
def test_half_only_dispatcher_backends_are_refused_in_fp32_on_cuda(attention, precision):
    text = refusal(H200, "model=tiny_flux", f"attention={attention}", f"precision={precision}")
    assert "with precision.dtype=fp32 (fp32, tf32) on CUDA: cannot be combined" in text
    assert "DIFFUSERS_ATTN_CHECKS" in text and "attention=dispatch_efficient or dispatch_native" in text
    assert validate(spec_of("model=tiny_flux", f"attention={attention}", "precision=bf16"), H200) == "cuda"


@pytest.mark.parametrize("attention", ["dispatch_efficient", "dispatch_native", "dispatch_math"])
def test_fp32_dispatcher_backends_that_run_fp32_stay_allowed(attention):
    assert validate(spec_of("model=tiny_flux", f"attention={attention}", "precision=fp32"), H200) == "cuda"


def test_pytorchs_flash_runs_fp32_on_cpu():
    assert validate(spec_of("model=tiny_flux", "attention=dispatch_flash", "precision=fp32"), CPU) == "cpu"


# Finding 8: fused QKV projections with torchao's quantized weights -----------------------------------


@pytest.mark.parametrize("machine", [H200, CPU], ids=["h200", "cpu"])
@pytest.mark.parametrize("quant", ["int8wo", "int8dq", "fp8dq"])
def test_fused_qkv_is_refused_with_quant(machine, quant):
    text = refusal(machine, "attention=sdpa_fused", f"quant={quant}", "precision=bf16")
    assert "attention.fuse_qkv=true with quant: cannot be combined" in text and "aten.cat" in text
    assert "Use attention=sdpa (unfused projections) with quant" in text


def test_quant_with_unfused_sdpa_stays_allowed():
    assert validate(spec_of("attention=sdpa", "quant=int8wo", "precision=bf16"), H200) == "cuda"


@needs_packages("torchao")
def test_torchao_quantized_weights_cannot_be_fused_as_diffusers_fuses_them():
    """What the rule stands on, with torchao itself (when a torchao release lifts it, this fails: revisit the rule):
    diffusers' fuse_projections does torch.cat of the three weights, then copy_ into a plain Linear's weight."""
    import torch
    from torchao.quantization import Float8Tensor, Int8Tensor, PerRow

    weights = [torch.randn(32, 32, dtype=torch.bfloat16) for _ in range(3)]
    with pytest.raises(NotImplementedError, match="aten.cat"):
        torch.cat([Int8Tensor.from_hp(w, granularity=PerRow()) for w in weights])
    joined = torch.cat([Float8Tensor.from_hp(w) for w in weights])
    assert isinstance(joined, Float8Tensor) and joined.shape == (96, 32)
    plain = torch.nn.Linear(32, 96, dtype=torch.bfloat16)
    with pytest.raises((AttributeError, ValueError, NotImplementedError, RuntimeError)), torch.no_grad():
        plain.weight.copy_(joined)


# Finding 9: layerwise float8 storage with a CUDA-graph mode ------------------------------------------


@pytest.mark.parametrize("compile", ["inductor_reduce_overhead", "inductor_max_autotune"])
@pytest.mark.parametrize("model", ["tiny", "tiny_flux"])
def test_layerwise_fp8_is_refused_with_cuda_graphs_on_cuda(compile, model):
    overrides = [f"model={model}", "precision=bf16", "memory=layerwise_fp8"]
    text = refusal(H200, *overrides, f"compile={compile}")
    assert "memory.layerwise_fp8=true with compile.mode=reduce_overhead or max_autotune (CUDA graphs) on CUDA" in text
    assert "compile=inductor (mode=default) or inductor_max_autotune_no_cudagraphs" in text
    for allowed in ("compile=inductor", "compile=inductor_max_autotune_no_cudagraphs"):
        assert validate(spec_of(*overrides, allowed), H200) == "cuda"
    assert validate(spec_of(*overrides, "compile=inductor_max_autotune"), CPU) == "cpu"


# Finding 5: a quantized build leaves Inductor's process-wide config as it was ------------------------


@needs_packages("torchao", "accelerate")
def test_a_quantized_build_leaves_inductors_config_unchanged():
    """torchao's configs default to set_inductor_config=True, which turns on coordinate_descent_tuning,
    force_fuse_int_mm_with_mul, fx_graph_cache and unique_kernel_names for the whole process: every later
    compiled job would compile with settings its row does not record."""
    import torch._inductor.config as inductor_config

    from sdbuild.builder import build_pipeline
    from sdbuild.levers.precision import global_switches

    before = inductor_config.get_config_copy()
    pipe, _ = build_pipeline(spec_of("quant=int8wo"), "cpu")
    assert type(pipe.unet.conv_in.weight).__name__ == "Parameter"  # the build ran: its Linears are quantized
    assert any(type(m.weight).__name__ == "Int8Tensor" for m in pipe.unet.modules() if hasattr(m, "weight"))
    after = inductor_config.get_config_copy()
    assert {k: (before[k], after[k]) for k in before if before[k] != after[k]} == {}
    assert global_switches()["inductor_changed"] == {}


def test_the_row_records_inductor_settings_changed_from_inductors_defaults():
    import torch._inductor.config as inductor_config

    from sdbuild.levers.precision import global_switches

    with inductor_config.patch(coordinate_descent_tuning=True):
        assert global_switches()["inductor_changed"] == {"coordinate_descent_tuning": True}
    assert "coordinate_descent_tuning" not in global_switches()["inductor_changed"]


# Finding 6: NVML's index of the GPU a job runs on, under a narrowed CUDA_VISIBLE_DEVICES -------------


@pytest.mark.parametrize("visible, cuda_index, physical", [
    (None, 0, 0), (None, 1, 1), ("2,3", 0, 2), ("2,3", 1, 3), ("3", 0, 3), ("1,0", 0, 1),
])
def test_nvml_index_follows_cuda_visible_devices(monkeypatch, visible, cuda_index, physical):
    from sdbuild.measure import nvml_index

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_index(cuda_index) == physical


def test_nvml_index_maps_gpu_uuids(monkeypatch):
    """CUDA_VISIBLE_DEVICES given as UUIDs (as SLURM and some launchers do): torch asks NVML for every GPU's
    UUID; here NVML's answer (no GPU on this machine) is the list of a 4-GPU node's UUIDs."""
    import torch

    from sdbuild.measure import nvml_index

    uuids = ["GPU-aaaa0000", "GPU-bbbb1111", "GPU-cccc2222", "GPU-dddd3333"]
    monkeypatch.setattr(torch.cuda, "_raw_device_uuid_nvml", lambda: uuids)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc2222,GPU-aaaa0000")
    assert [nvml_index(0), nvml_index(1)] == [2, 0]


# Finding 7: Inductor's and Triton's cache folders, per job and per interleaved member ----------------

_CACHE_PROBE = r"""
import json, os, sys, sdbuild, sdbuild.builder
from pathlib import Path
from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
from sdbuild.interleave import Member, run_group

out, seen = Path(sys.argv[1]), []
real_build = sdbuild.builder.build_pipeline

def build_pipeline(spec, device, **kwargs):
    pipe, info = real_build(spec, device, **kwargs)
    name = spec.compile.cache_dir or "none"
    seen.append(dict(member=name, at="build", inductor=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                     triton=os.environ.get("TRITON_CACHE_DIR")))

    def call(module, args):
        # what Inductor does at its first Triton kernel launch in the process (triton_heuristics.py): set
        # TRITON_CACHE_DIR from the cache folder in force, once, if unset (no Triton on CPU to launch one)
        if os.getenv("TRITON_CACHE_DIR") is None:
            os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(0)
        seen.append(dict(member=name, at="call", inductor=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                         triton=os.environ.get("TRITON_CACHE_DIR")))

    pipe.unet.register_forward_pre_hook(call)
    return pipe, info

sdbuild.builder.build_pipeline = build_pipeline
members = []
for i, extra in enumerate(sys.argv[2:]):
    overrides = ["run.steps=1", "run.warmup=1", "run.repeats=3", "run.save_image=false", *extra.split()]
    members.append(Member(sdbuild.compose(overrides), out / str(i), {}, overrides))
rows = run_group(members)
print(json.dumps(dict(seen=seen, status=[r["status"] for r in rows])))
"""


def test_each_interleaved_member_builds_and_calls_in_its_own_cache_folders(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    a, b = tmp_path / "cache_a", tmp_path / "cache_b"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(tmp_path), f"compile.cache_dir={a}",
                           f"compile.cache_dir={b}", "run.seed=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["status"] == ["ok"] * 3
    seen = got["seen"]
    assert {s["at"] for s in seen} == {"build", "call"} and len([s for s in seen if s["at"] == "call"]) >= 12
    assert any(x["member"] != y["member"] for x, y in zip(seen, seen[1:]) if x["at"] == y["at"] == "call")
    for s in seen:
        if s["member"] == "none":  # no cache folder: as the process started (Inductor's own default folder,
            # which Inductor's cache_dir() writes into TORCHINDUCTOR_CACHE_DIR at its first use)
            for folder in (s["inductor"], s["triton"]):
                assert folder is None or not folder.startswith(str(tmp_path)), s
        else:
            assert s["inductor"] == s["member"], s
            if s["at"] == "call":
                assert s["triton"] == os.path.join(s["member"], "triton", "0"), s


# Finding 12: the fp32 baseline names its cuDNN TF32 switch -------------------------------------------


def test_the_fp32_baseline_says_cudnn_tf32_is_off_where_pytorch_leaves_it_on():
    import torch

    from sdbuild.builder import plan_steps
    from sdbuild.levers.precision import global_switches, set_global_switches

    plan = dict(plan_steps(spec_of("precision=fp32"), "cuda"))
    assert "cudnn.allow_tf32=False; PyTorch's default is True" in plan["switches"]
    assert "cuDNN convolutions" in dict(plan_steps(spec_of("precision=tf32"), "cuda"))["switches"]
    before = torch.backends.cudnn.allow_tf32
    try:
        set_global_switches(spec_of("precision=fp32"))
        flags = global_switches()
        assert flags["cudnn_allow_tf32"] is False and flags["cuda_matmul_allow_tf32"] is False
    finally:
        torch.backends.cudnn.allow_tf32 = before
    from sdbuild.config import config_dir  # the option's comment, which docs/options.md's table shows

    from pathlib import Path

    assert "(cudnn.allow_tf32=False, where PyTorch's default is True)" in (Path(config_dir()) / "precision" / "fp32.yaml").read_text()
