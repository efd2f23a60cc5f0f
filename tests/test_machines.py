"""Target machines (conf/machine/): validate a spec against a machine this process is not on.

A profile is a plain description (CUDA, capability, memory, cuDNN, packages, toolchain). A dry run
plans against it; a real run with it is refused unless this machine is the one it describes. The
CUDA rules of capabilities.py and the attention lever are checked here through the profiles, on CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sdbuild
from sdbuild import validate as validate_mod
from sdbuild.errors import SpecError
from sdbuild.spec import MachineSpec, spec_key, spec_to_dict
from sdbuild.validate import Machine, validate

from conftest import ROOT

CONF = ROOT / "conf"
PROFILES = sorted(p.stem for p in (CONF / "machine").glob("*.yaml"))
TEAM_CONF = ROOT / "tests" / "data" / "team_conf"


def planned(*overrides):
    """The spec of a dry run with these overrides."""
    return sdbuild.compose(["dry_run=true", *overrides])


def machine_of(name, *overrides):
    return Machine.from_profile(planned(f"machine={name}", *overrides).machine)


def refusal(*overrides, machine=None):
    with pytest.raises(SpecError) as err:
        validate(planned(*overrides), machine)
    return str(err.value)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sdbuild", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


# The group and its files --------------------------------------------------------------------------


def test_the_machine_group_has_local_by_default_and_the_named_profiles():
    assert {"local", "h100", "h200", "a100", "l40s", "rtx4090", "cpu"} <= set(PROFILES)
    spec = sdbuild.compose([])
    assert spec.machine.name == "local" and spec.machine.probe


@pytest.mark.parametrize("name", PROFILES)
def test_every_machine_profile_composes_into_a_machine(name):
    spec = planned(f"machine={name}")
    assert spec.machine.name == name
    if name == "local":
        assert spec.machine.probe
        return
    machine = Machine.from_profile(spec.machine)
    assert not spec.machine.probe and machine.profile == name
    assert machine.host_memory and machine.host_memory > 8 * 1024 ** 3
    if machine.cuda:  # a GPU profile states what the CUDA rules ask
        assert machine.capability and len(machine.capability) == 2 and machine.gpu_memory > 8 * 1024 ** 3
        assert machine.cudnn_version and machine.cudnn_version >= (8, 9)
        assert {"accelerate", "torchao", "xformers"} <= machine.packages
        assert all(machine.package_versions.get(p) for p in machine.packages)  # versions stated
    validate(spec)  # the default spec plans on every machine


def test_profile_facts_reach_the_machine():
    h200 = machine_of("h200")
    assert (h200.cuda, h200.capability, h200.cudnn_version) == (True, (9, 0), (9, 10, 2))
    assert round(h200.gpu_memory / 1024 ** 3) == 140 and "flash_attn_3" in h200.packages
    assert h200.package_versions["flash_attn"] == "2.8.3" and not h200.probed
    cpu = machine_of("cpu")
    assert not cpu.cuda and cpu.capability is None and "xformers" not in cpu.packages


def test_a_team_adds_its_own_machine_on_the_search_path():
    spec = sdbuild.compose([f"hydra.searchpath=[file://{TEAM_CONF}]", "machine=team_gpu", "dry_run=true"])
    machine = Machine.from_profile(spec.machine)
    assert machine.device_name.startswith("Tesla V100") and machine.capability == (7, 0)
    with pytest.raises(SpecError, match=r"compute capability >= 8\.0, but Tesla V100-SXM2-16GB is 7\.0"):
        validate(sdbuild.compose([f"hydra.searchpath=[file://{TEAM_CONF}]", "machine=team_gpu", "dry_run=true",
                                  "precision=bf16"]))
    with pytest.raises(Exception, match="team_gpu"):
        sdbuild.compose(["machine=team_gpu"])  # only through the search path


def test_the_machine_is_not_part_of_a_rows_identity():
    keys = {spec_key(spec_to_dict(sdbuild.compose([f"machine={name}"]))) for name in PROFILES}
    assert len(keys) == 1
    assert spec_to_dict(sdbuild.compose(["machine=h100"]))["machine"]["name"] == "h100"  # but recorded


# Dry runs plan against the profile; real runs refuse it ---------------------------------------------


def test_a_dry_run_validates_against_the_profile_not_this_machine():
    h100 = ["machine=h100", "precision=bf16", "attention=sdpa_flash", "compile=inductor"]
    assert validate(planned(*h100)) == "cuda"  # this process has no GPU
    assert "this machine has no CUDA GPU" in refusal("machine=cpu", "precision=fp16")
    assert "compute capability >= 8.9, but NVIDIA A100-SXM4-80GB is 8.0" in refusal("machine=a100", "quant=fp8dq",
                                                                                   "precision=bf16")
    validate(planned("machine=l40s", "quant=fp8dq", "precision=bf16"))
    fa3 = ["model=tiny_flux", "precision=bf16", "attention=dispatch_flash_attn3"]
    assert "but NVIDIA A100-SXM4-80GB is 8.0" in refusal("machine=a100", *fa3)
    validate(planned("machine=h100", *fa3))


def test_the_profiles_memory_is_checked():
    big = ["model=sd15_arch", "precision=bf16", "run.batch_size=32", "run.height=2048", "run.width=2048"]  # a 69 GB decode
    assert "more than the 25 GB of GPU memory" in refusal("machine=rtx4090", *big)
    validate(planned("machine=h200", *big))


def test_a_real_run_with_a_profile_is_refused_on_another_machine():
    spec = sdbuild.compose(["machine=h200"])
    with pytest.raises(SpecError) as err:
        validate(spec)
    text = str(err.value)
    assert "machine=h200" in text and "this process runs on cpu (no CUDA GPU)" in text
    assert "dry_run=true machine=h200" in text


def test_a_real_run_with_a_profile_that_matches_this_machine_runs():
    h200 = machine_of("h200")
    here = Machine(**{**h200.__dict__, "device_name": "NVIDIA H200", "probed": True, "profile": None})
    assert validate(sdbuild.compose(["machine=h200", "precision=bf16"]), here) == "cuda"
    h100 = Machine(**{**here.__dict__, "gpu_memory": int(79.2 * 1024 ** 3)})  # another Hopper card
    with pytest.raises(SpecError, match="but this process runs on NVIDIA H200 .*79.2 GiB"):
        validate(sdbuild.compose(["machine=h200", "precision=bf16"]), h100)
    assert validate(sdbuild.compose(["machine=cpu"]), Machine.probe()) == "cpu"  # this CPU box is a CPU machine


def test_cli_plans_for_an_h200_and_refuses_to_measure_as_one(tmp_path):
    out = run_cli("dry_run=true", "machine=h200", "+preset=cuda_best", f"hydra.run.dir={tmp_path}/plan")
    assert out.returncode == 0, out.stderr
    assert "machine=h200: NVIDIA H200 (compute capability 9.0" in out.stdout and "device: cuda" in out.stdout
    out = run_cli("machine=h200", "run.steps=1", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert "machine=h200" in out.stderr and "this process runs on cpu" in out.stderr and "Traceback" not in out.stderr
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert row["status"] == "unsupported" and row["latency_s"] is None


def test_a_sweep_over_machines_refuses_the_profiles_as_rows(tmp_path):
    out = run_cli("--multirun", "machine=h100,a100", "run.steps=1", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    rows = {json.loads(p.read_text())["spec"]["machine"]["name"]: json.loads(p.read_text())
            for p in tmp_path.glob("*/result.json")}
    assert sorted(rows) == ["a100", "h100"]  # the first refusal did not end the sweep
    for name, row in rows.items():
        assert row["status"] == "unsupported" and f"machine={name}" in row["error"]
        assert "this process runs on cpu" in row["error"]
