"""Replay and review: a recorded run reruns exactly, into a new folder, with its labels, and says
what changed; `dry_run=true` validates and shows the plan without loading weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdbuild import replay

from conftest import FAST, run_cli

LABELLED = ["+preset=cpu_fp32", "attention=sdpa", *FAST]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """One real run made by the CLI, with a preset label and a group choice."""
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    out = run_cli(*LABELLED, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr
    return run_dir


def rerun(run_dir: Path, workdir: Path, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    code = replay.main([str(run_dir)])
    printed = capsys.readouterr().out
    new_dirs = sorted((workdir / "outputs" / "runs").iterdir())
    assert len(new_dirs) == 1, new_dirs
    return code, printed, json.loads((new_dirs[0] / "result.json").read_text())


def test_replay_reruns_the_recorded_spec_with_its_labels(recorded, tmp_path):
    """Replayed as a user would, in a new process (as the recording was): the same spec, labels and
    pixels, and the same environment (in this test process an earlier test may have fixed torch's
    inter-op threads, which a process can set only once)."""
    old = json.loads((recorded / "result.json").read_text())
    out = subprocess.run([sys.executable, "-m", "sdbuild.replay", str(recorded)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    code, printed = out.returncode, out.stdout
    assert code == 0, out.stderr[-2000:]
    new_dirs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(new_dirs) == 1, new_dirs
    new = json.loads((new_dirs[0] / "result.json").read_text())
    assert new["status"] == "ok"
    assert new["spec"] == old["spec"] and new["spec_key"] == old["spec_key"]
    assert new["choices"] == old["choices"] and new["choices"]["attention"] == "sdpa"
    assert new["preset"] == "cpu_fp32" and new["preset_order"] == old["preset_order"]
    assert new["image_stats"] == old["image_stats"]  # the same pipeline makes the same pixels
    assert new["job"]["replay_of"] == str(recorded.resolve())
    assert f"vs {old['latency_s']['median']:.3f} s recorded" in printed
    assert "environment: same versions, device and flags" in printed


def test_replay_names_every_environment_difference(recorded, tmp_path, monkeypatch, capsys):
    row = json.loads((recorded / "result.json").read_text())
    row["env"]["torch"] = "2.0.0"  # as if recorded on another machine
    row["env"]["device_name"] = "NVIDIA A100-SXM4-80GB"
    row["env"]["flags"]["cudnn_benchmark"] = True
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text(json.dumps(row))
    code, printed, new = rerun(tmp_path / "old", tmp_path, monkeypatch, capsys)
    assert code == 0
    assert f"torch: 2.0.0 -> {new['env']['torch']}" in printed
    assert "device_name: NVIDIA A100-SXM4-80GB -> CPU: " in printed
    assert "flags.cudnn_benchmark: True -> False" in printed
    assert "pid" not in printed


def test_replay_measures_again_even_when_the_run_was_resumed(recorded, tmp_path, monkeypatch, capsys):
    row = json.loads((recorded / "result.json").read_text())
    row["spec"]["resume"] = str(recorded.parent)  # the old run holds an ok row for this very spec
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text(json.dumps(row))
    code, _, new = rerun(tmp_path / "old", tmp_path, monkeypatch, capsys)
    assert code == 0 and new["reused_from"] is None and new["latency_s"]["runs"] != row["latency_s"]["runs"]


def test_replay_refuses_a_recorded_spec_with_unknown_keys(recorded, tmp_path, monkeypatch, capsys):
    row = json.loads((recorded / "result.json").read_text())
    row["spec"]["run"]["stepz"] = 3
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text(json.dumps(row))
    monkeypatch.chdir(tmp_path)
    assert replay.main([str(tmp_path / "old")]) == 2
    assert "run.stepz" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_replay_shows_progress_like_a_run(recorded, tmp_path):
    """Loading, warmup and each timed run are said as they happen (a line each when not on a terminal)."""
    out = subprocess.run([sys.executable, "-m", "sdbuild.replay", str(recorded), "--out", str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    said = [line.split(" - ", 1)[1] for line in out.stderr.splitlines() if "][sdbuild][INFO] - " in line]
    assert said and said[0].startswith("loading and building") and said[-1].startswith("run 1/1: "), said  # FAST: 1 run
    assert "median" in out.stdout and (tmp_path / "new" / "result.json").exists()


def test_replay_of_a_folder_without_a_result(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        replay.main([str(tmp_path)])


# dry_run ------------------------------------------------------------------------------------------


def test_dry_run_shows_the_plan_and_loads_nothing(tmp_path):
    cache = tmp_path / "cache"  # empty: a real run would build the tiny model here
    out = run_cli("dry_run=true", "precision=bf16", "attention=sdpa_fused", "compile=inductor", f"cache_dir={cache}",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    head, device = out.stdout.split("\n")[:2]  # the plan first, naming what it was validated against
    assert head == "would build (dry run: no weights loaded) on machine=local: this machine, cpu (no CUDA GPU):"
    assert device.startswith("  device: cpu")
    assert out.stdout.index(". compile:") < out.stdout.index("resolved spec") < out.stdout.index("name: sdpa_fused")
    assert "weights in bfloat16" in out.stdout and "AttnProcessor2_0, fused QKV" in out.stdout
    assert "torch.compile of unet" in out.stdout and "built from code with random weights on first use" in out.stdout
    assert not (tmp_path / "run" / "result.json").exists()
    assert not cache.exists() or not any(cache.iterdir())  # no model was built or loaded


def test_dry_run_refuses_like_a_run(tmp_path):
    out = run_cli("dry_run=true", "precision=fp16", "run.device=cpu", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "precision=fp16" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "result.json").exists()


def _planted(recorded: Path, folder: Path, **changes) -> Path:
    row = json.loads((recorded / "result.json").read_text())
    row.update(changes)
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps(row))
    return folder


def test_a_replayed_rows_labels_come_from_its_spec(recorded, tmp_path, monkeypatch, capsys):
    """Crafted `choices` and `overrides` that contradict the recorded spec are not copied into the new row."""
    old = json.loads((recorded / "result.json").read_text())
    planted = _planted(recorded, tmp_path / "old", choices={**old["choices"], "precision": "fp16", "attention": "xformers"},
                       overrides=[*old["overrides"], "precision=fp16", "run.steps=50"])
    code, _, new = rerun(planted, tmp_path, monkeypatch, capsys)
    assert code == 0 and new["spec"] == old["spec"]
    assert new["choices"]["precision"] == "fp32" and new["choices"]["attention"] == "sdpa"
    assert new["overrides"] == old["overrides"]  # the labels the spec bears out, and only those


def test_a_row_without_a_spec_or_with_dry_run_is_not_replayed_as_something_else(recorded, tmp_path, monkeypatch, capsys):
    no_spec = _planted(recorded, tmp_path / "nospec", spec=None)
    with pytest.raises(SystemExit, match="records no spec"):  # before: the defaults (50 steps) under the old labels
        replay.main([str(no_spec)])
    dry = json.loads((recorded / "result.json").read_text())
    dry["spec"]["dry_run"] = True
    planted = _planted(recorded, tmp_path / "dry", spec=dry["spec"])
    code, _, new = rerun(planted, tmp_path, monkeypatch, capsys)  # before: a TypeError
    assert code == 0 and new["status"] == "ok" and new["spec"]["run"]["steps"] == 4
