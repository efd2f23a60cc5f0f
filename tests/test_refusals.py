"""A newcomer's mistakes are refused in about a second: every check that needs neither torch nor
diffusers (values, unknown keys, folders, what the machine has) runs before they are imported, a
plain typo gets sdbuild's message with the nearest key, and a refusal never reads like success."""

import json
import os
import subprocess
import sys

import pytest

from sdbuild.validate import Machine, no_cuda

from conftest import ROOT

# Runs `python -m sdbuild ARGS` in this process's interpreter and reports, after it exits, which
# heavy modules it had imported.
PROBE = """
import runpy, sys
sys.argv = ["sdbuild", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("sdbuild", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(f"\\nPROBE code={code} heavy={','.join(heavy)}", file=sys.stderr)
"""


def refuse(tmp_path, *args, env=None):
    """(exit code, heavy modules imported, stdout, stderr) of a CLI run expected to be refused."""
    # On a machine with a GPU, torch is imported to ask it (the rules that read the GPU need it): hide
    # the GPU there, so what is tested is the order of the checks, as on a machine without one.
    hide = {} if no_cuda() else {"CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", PROBE, *args, f"hydra.run.dir={tmp_path / 'run'}",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **hide, **(env or {})})
    stderr, probe = out.stderr.rsplit("\nPROBE ", 1)
    code, heavy = (part.split("=", 1)[1] for part in probe.split())
    return int(code), [m for m in heavy.split(",") if m], out.stdout, stderr


# (arguments, what the message must say, whether a row is recorded)
REFUSALS = [
    (["run.height=4100"], "run.height=4100: must be a positive multiple of 8", True),
    (["run.steps=0"], "run.steps=0: must be >= 1", True),
    (["model=sd15"], "is a hub id that is not in the local Hugging Face cache", True),
    (["precision=fp16", "attention=xformers"], "attention=xformers: needs CUDA", True),
    (["compile=inductor_reduce_overhead"], "needs CUDA", True),
    (["resume=/nonexistent/sweep"], "resume=/nonexistent/sweep: no such folder", True),
    (["precison=fp16"], "precison: is not a spec field", False),
    (["+precison=fp16"], "precison: is not a spec field", False),
    (["--multirun", "run.stepz=3,4"], "run.stepz: is not a spec field", False),
    (["dry_run=true", "precision=fp16"], "needs CUDA", False),
    # ranges (issue 27, defect 8): refused before loading, not a ZeroDivisionError / OverflowError after
    (["model.resolution=63"], "model.resolution=63: must be a multiple of 8", True),
    (["cache=deepcache", "cache.interval=0"], "cache.interval=0: must be >= 1", True),
    # a path hub ids cannot have (defect 9): the folder message, not huggingface_hub's traceback
    (["dry_run=true", "model=sd15", "model.path=../nope"], "model.path=../nope: does not exist and is not a hub id",
     False),
    (["run.seed=99999999999999999999999"], "run.seed=99999999999999999999999: must be <= 18446744073709551615", True),
    # an option a group does not have (issue 27's weak messages): exit 2 naming the group's options, not
    # Hydra's "Could not find" with exit 1; in a sweep too, before any job runs
    (["precision=fp17"], "precision=fp17: is not an option of the precision group. Use one of: bf16,", False),
    (["--multirun", "precision=fp32,fp17"], "precision=fp17: is not an option of the precision group", False),
    (["+preset=nosuch"], "preset=nosuch: is not an option of the preset group", False),
    # a value the typed field cannot hold, an override Hydra cannot read: exit 2 naming it (was exit 1 with
    # Hydra's "Error merging override" / "no viable alternative"); in a sweep before any job runs
    (["run.steps=abc"], "run.steps=abc: is not a value this field can hold", False),
    (["run.steps="], "run.steps=: is not a value this field can hold", False),
    (["precision.tf32=maybe"], "precision.tf32=maybe: is not a value this field can hold", False),
    (["--multirun", "run.steps=2,abc"], "run.steps=abc: is not a value this field can hold", False),
    (["precision=[a"], "precision=[a: is not an override Hydra can read", False),
    # a preset from a search path with a key the typed spec lacks (a `_target_`): Hydra cannot compose it;
    # a single run is refused with exit 2 (was Hydra's exit 1)
    ([f"hydra.searchpath=[file://{ROOT}/tests/data/stray_conf]", "+preset=stray_key"],
     "sdbuild: refused: Hydra could not compose this configuration", False),
]


@pytest.mark.parametrize("args,message,row", REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_a_refusal_comes_before_torch_is_imported(tmp_path, args, message, row):
    # an empty Hugging Face cache: `model=sd15` names a hub id that is not there
    code, heavy, stdout, stderr = refuse(tmp_path, *args, env={"HF_HOME": str(tmp_path / "hf")})
    assert code == 2, stdout + stderr
    assert message in stderr and "Traceback" not in stdout + stderr
    assert heavy == [], f"imported {heavy} before refusing: {stderr[-500:]}"
    assert "result:" not in stdout  # nothing that reads like success
    result = tmp_path / "run" / "result.json"
    assert result.exists() == row
    if row:  # the row is still written, and its path is given after the message
        assert json.loads(result.read_text())["status"] == "unsupported"
        assert stderr.index(message) < stderr.index(f"row is recorded in {result}")


@pytest.mark.parametrize("args,nearest", [
    ("precison=fp16", "Did you mean precision?"),
    ("run.stepz=3", "Did you mean run.steps?"),
    ("attention.fuse_qvk=true", "Did you mean attention.fuse_qkv?"),
    ("model=sd15 model.pth=/x", "Did you mean model.path?"),  # a field under the group just chosen
])
def test_a_plain_typo_gets_the_nearest_key_and_exit_2(tmp_path, args, nearest):
    code, _, stdout, stderr = refuse(tmp_path, *args.split())
    assert code == 2 and nearest in stderr and "use +" not in stderr, stderr  # not Hydra's "use +key=value"
    assert "is not a value this field can hold" not in stderr, stderr  # one message per mistake: the typo's


def test_plain_overrides_that_hydra_knows_are_left_to_hydra(tmp_path):
    """Groups, fields, Hydra's own keys and `+group=` pass the typo check (a dry run composes them)."""
    code, heavy, stdout, stderr = refuse(tmp_path, "dry_run=true", "model=tiny", "precision.tf32=true",
                                         "run.steps=3", "hydra.job.chdir=false", "+preset=cpu_fp32")
    assert code == 0 and "would build" in stdout, stderr
    assert heavy == []


def test_a_spec_refused_on_its_values_does_not_probe_the_machine(monkeypatch):
    """Where no rule asks the machine, a refusal on values needs no probe (which imports torch where a GPU
    may be); where one does, the machine is probed and its problems are listed too."""
    from sdbuild.errors import SpecError
    from sdbuild.validate import validate

    from helpers import composed

    def probe():
        raise AssertionError("probed")

    monkeypatch.setattr(Machine, "probe", staticmethod(probe))
    with pytest.raises(SpecError, match="run.height=4100"):
        validate(composed("run.height=4100"))
    with pytest.raises(AssertionError, match="probed"):
        validate(composed("run.height=4100", "precision=fp16"))  # fp16 needs CUDA: ask the machine
    with pytest.raises(AssertionError, match="probed"):
        validate(composed())  # nothing wrong: the device is needed


def test_no_cuda_says_why_without_torch():
    assert "CPU-only build" in no_cuda("2.13.0+cpu", {}, ())
    assert "CUDA_VISIBLE_DEVICES" in no_cuda("2.13.0", {"CUDA_VISIBLE_DEVICES": ""}, ("/",))
    assert "CUDA_VISIBLE_DEVICES" in no_cuda("2.13.0", {"CUDA_VISIBLE_DEVICES": "-1"}, ("/",))
    assert "no GPU driver" in no_cuda("2.13.0", {}, ("/nonexistent/nvidiactl",))
    # a CUDA build, a device file, GPUs visible: only torch can say
    assert no_cuda("2.13.0", {"CUDA_VISIBLE_DEVICES": "0"}, ("/",)) is None
    assert no_cuda("2.13.0+cu128", {}, ("/",)) is None


def test_where_no_cuda_says_so_torch_agrees():
    import torch

    if no_cuda() is not None:
        assert not torch.cuda.is_available()
    assert Machine.probe().cuda == torch.cuda.is_available()


def test_a_sweep_with_a_job_hydra_cannot_compose_is_refused_with_its_lock_released(tmp_path):
    """Hydra's basic sweeper composes every job before the first runs, so a job whose preset carries a
    key the spec lacks ends the sweep there: no job ran. Refused with exit 2 (was exit 1), the lock
    released and the report written (every planned job missing), so the folder can be swept again."""
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    done = run_cli("--multirun", f"hydra.searchpath=[file://{ROOT}/tests/data/stray_conf]",
                   "+preset=two_steps,stray_key", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no job ran, the sweep's lock is released" in done.stderr
    assert not list(sweep.glob(".sdbuild-sweep.lock")) and (sweep / "report.md").is_file()
    assert not [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]  # nothing measured
