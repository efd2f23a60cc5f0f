"""Sweeps on the tiny model: every combination leaves a row, jobs are isolated, sweeps resume."""

import csv
import json
import os
import shutil
import statistics
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, ROOT, run_cli

from sdbuild import results


def sweep(sweep_dir, *args):
    out = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", *FAST, *args)
    return out


def rows(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(sweep_dir).glob("*/result.json")}


def csv_rows(sweep_dir):
    with open(Path(sweep_dir) / "results.csv") as f:
        return list(csv.DictReader(f))


def test_2x2_sweep_writes_every_row_and_the_report(tmp_path):
    out = sweep(tmp_path, "precision=fp32,bf16", "attention=classic,sdpa", "run.repeats=2")
    assert out.returncode == 0, out.stderr[-2000:]
    found = rows(tmp_path)
    assert len(found) == 4 and all(r["status"] == "ok" for r in found.values())
    assert {(r["choices"]["precision"], r["choices"]["attention"]) for r in found.values()} == {
        ("fp32", "classic"), ("fp32", "sdpa"), ("bf16", "classic"), ("bf16", "sdpa")}
    for name in ("results.csv", "report.md", "latency.png", "index.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = csv_rows(tmp_path)  # the report's own logic is tested in test_report.py on synthetic rows
    assert len(table) == 4 and sum(r["baseline"] == "yes" for r in table) == 1
    plan = json.loads((tmp_path / "plan.json").read_text())["jobs"]
    assert len(plan) == 4 and all(found[str(j["num"])]["overrides"] == j["overrides"] for j in plan)
    assert not (tmp_path / results.LOCK_FILE).exists()  # released at the end
    for r in found.values():  # in-process CPU memory is marked as such; the load around each job is recorded
        assert r["peak_memory_scope"] == "shared_process" and r["machine_load"]["before"]["cpu_count"]
        assert r["latency_s"]["median"] == statistics.median(r["latency_s"]["runs"])
    assert "job 4/4" in out.stdout and "4 rows: 4 ok" in out.stdout and "report:" in out.stdout


def test_isolate_runs_each_job_in_a_fresh_process(tmp_path):
    out = sweep(tmp_path, "precision=fp32,bf16", "isolate=true")
    assert out.returncode == 0, out.stderr[-2000:]
    found = rows(tmp_path).values()
    assert len(found) == 2 and all(r["status"] == "ok" and r["job"]["isolated"] for r in found)
    assert len({r["env"]["pid"] for r in found}) == 2
    assert (tmp_path / "report.md").exists()


def test_a_default_sweep_runs_its_jobs_in_one_worker_and_replaces_it_for_other_threads(tmp_path):
    """The default sweep (a time limit): one `sdbuild.worker` runs the jobs one after another, so the
    imports and the weights are paid once; a job asking for another run.threads gets a fresh worker
    (torch's inter-op threads are set once per process). Each row names its worker and how many jobs
    that worker ran before it."""
    out = run_cli("--multirun", f"hydra.sweep.dir={tmp_path}", "run.steps=2", "run.warmup=0", "run.repeats=1",
                  "run.threads=1,2", "run.seed=0,1,2")
    assert out.returncode == 0, out.stderr[-2000:]
    found = [r for _, r in sorted(rows(tmp_path).items(), key=lambda kv: int(kv[0]))]
    assert [r["status"] for r in found] == ["ok"] * 6, [r["error"] for r in found]
    workers = [r["job"]["worker"] for r in found]
    assert [w["jobs_before"] for w in workers] == [0, 1, 2, 0, 1, 2]
    first, second = {w["pid"] for w in workers[:3]}, {w["pid"] for w in workers[3:]}
    assert len(first) == len(second) == 1 and first != second and os.getpid() not in first | second
    assert [r["env"]["pid"] for r in found] == [w["pid"] for w in workers]  # measured in the worker named
    assert all(r["job"]["isolated"] and r["peak_memory_scope"] == "shared_process" for r in found)
    assert [r["env"]["torch_threads"] for r in found] == [1, 1, 1, 2, 2, 2]
    assert not [p for p in first | second if Path(f"/proc/{p}").exists() and
                not Path(f"/proc/{p}/stat").read_text().split(") ")[1].startswith("Z")]  # ended with the sweep


def test_xformers_on_cpu_is_an_unsupported_row_and_the_sweep_finishes(tmp_path):
    out = sweep(tmp_path, "attention=sdpa,xformers")
    assert out.returncode == 0, out.stderr[-2000:]
    by_attention = {r["choices"]["attention"]: r for r in rows(tmp_path).values()}
    assert by_attention["sdpa"]["status"] == "ok"
    assert by_attention["xformers"]["status"] == "unsupported" and "CUDA" in by_attention["xformers"]["error"]
    assert "xformers" in (tmp_path / "report.md").read_text()


def _isolation_rows(sweep_dir, order, *extra):
    out = sweep(sweep_dir, f"precision={order}", *extra)
    assert out.returncode == 0, out.stderr[-2000:]
    found = sorted(rows(sweep_dir).items(), key=lambda kv: int(kv[0]))
    return [r for _, r in found]


# In the sweep's own process (FAST: run.timeout_s=0), and in the sweep's long-lived worker (a time limit)
WORKER = ["run.timeout_s=600", "run.threads=1"]


@pytest.mark.parametrize("mode", [[], WORKER], ids=["in-process", "worker"])
def test_jobs_do_not_inherit_global_flags(tmp_path, mode):
    forward = _isolation_rows(tmp_path / "forward", "fp32,tf32,fp32", *mode)
    backward = _isolation_rows(tmp_path / "backward", "tf32,fp32,fp32", *mode)  # the same sweep, tf32 first
    if mode:  # the flags and pixels below were checked across jobs of one worker
        for run in (forward, backward):
            assert [r["job"]["worker"]["jobs_before"] for r in run] == [0, 1, 2]
            assert len({r["job"]["worker"]["pid"] for r in run} | {r["env"]["pid"] for r in run}) == 1
    for run in (forward, backward):
        for r in run:
            tf32 = r["choices"]["precision"] == "tf32"
            assert r["env"]["flags"]["cuda_matmul_allow_tf32"] is tf32
            assert r["env"]["flags"]["cudnn_allow_tf32"] is tf32
            assert r["env"]["flags"]["float32_matmul_precision"] == ("high" if tf32 else "highest")
    images = {}
    for folder, run in ((tmp_path / "forward", forward), (tmp_path / "backward", backward)):
        for i, r in enumerate(run):
            images.setdefault(r["choices"]["precision"], []).append(np.asarray(Image.open(folder / str(i) / r["image"])))
    for same in images["fp32"][1:]:  # every fp32 row gives the same picture, whatever ran before it
        np.testing.assert_array_equal(same, images["fp32"][0])


def test_interrupted_sweep_keeps_its_rows_and_resume_measures_only_the_rest(tmp_path):
    first = tmp_path / "first"
    args = [sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={first}", *FAST,
            "precision=fp32,bf16", "attention=classic,sdpa"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(first.glob("*/result.json"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # as hard as an interruption gets
    proc.wait()
    kept = rows(first)
    assert len(kept) >= 2
    assert all(r["status"] == "ok" for r in kept.values())  # every kept row is whole

    second = tmp_path / "second"
    out = sweep(second, "precision=fp32,bf16", "attention=classic,sdpa", f"resume={first}")
    assert out.returncode == 0, out.stderr[-2000:]
    final = rows(second)
    assert len(final) == 4
    reused = [r for r in final.values() if r["reused_from"]]
    assert len(reused) == len(kept)  # measured only what was missing
    assert {r["spec_key"] for r in reused} == {r["spec_key"] for r in kept.values()}
    original = {r["spec_key"]: r for r in kept.values()}
    for r in reused:  # the copied row is the original measurement, untouched
        assert r["latency_s"] == original[r["spec_key"]]["latency_s"] and r["env"] == original[r["spec_key"]]["env"]
    table = csv_rows(second)
    assert len(table) == 4 and len({r["spec_key"] for r in table}) == 4  # every row once


COUNT_LOADS = """
import runpy, sys
sys.path.insert(0, {root!r})  # this checkout's sdbuild, as `python -m sdbuild` from its root would run
import diffusers

original = diffusers.DiffusionPipeline.from_pretrained.__func__

def counted(cls, folder, *args, **kwargs):  # observe (not replace) every pipeline weight load
    with open({log!r}, "a") as f:
        f.write(str(folder) + "\\n")
    return original(cls, folder, *args, **kwargs)

diffusers.DiffusionPipeline.from_pretrained = classmethod(counted)
sys.argv = ["sdbuild", *sys.argv[1:]]
runpy.run_module("sdbuild", run_name="__main__", alter_sys=True)
"""


def test_sweep_over_plain_fields_failures_and_broken_images(tmp_path, model_cache):
    """One in-process sweep over plain fields, not groups (model.path x run.guidance_scale): a model folder
    with corrupt weights fails while loading (error.log), one whose VAE decoder holds a NaN weight loads and
    draws a NaN image (broken), guidance 1e38 is refused before anything loads (out of range: it would
    overflow to a NaN image); rows are labelled and grouped by model.path; the good weights are read from
    disk once for two jobs."""
    from safetensors.torch import load_file, save_file

    from sdbuild.models import ensure_model
    from sdbuild.spec import ModelSpec

    tiny = ensure_model(ModelSpec(), str(model_cache))
    good, bad, nan = tmp_path / "good", tmp_path / "bad", tmp_path / "nan"
    for folder in (good, bad, nan):
        shutil.copytree(tiny, folder)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights" * 100)
    vae_file = nan / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(vae_file)
    weights["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, vae_file)
    loads = tmp_path / "loads.txt"
    script = tmp_path / "count_loads.py"
    script.write_text(COUNT_LOADS.format(log=str(loads), root=str(ROOT)))
    sweep_dir = tmp_path / "sweep"
    out = subprocess.run([sys.executable, str(script), "--multirun", f"hydra.sweep.dir={sweep_dir}", *FAST,
                          "model=sd15", "run.height=64", "run.width=64", f"model.path={good},{bad},{nan}",
                          "run.guidance_scale=7.5,1e38"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    found = {(Path(r["spec"]["model"]["path"]).name, r["spec"]["run"]["guidance_scale"]): (k, r)
             for k, r in rows(sweep_dir).items()}
    assert len(found) == 6, found.keys()
    assert loads.read_text().splitlines().count(str(good)) == 1  # one job on these weights ran, one load
    job, row = found[("bad", 7.5)]
    assert row["status"] == "failed" and "error.log" in row["error"], row["error"]
    assert "Traceback" in (sweep_dir / job / "error.log").read_text()
    for name in ("good", "bad", "nan"):
        refused = found[(name, 1e38)][1]
        assert refused["status"] == "unsupported" and "run.guidance_scale=1e+38: must be <= 100" in refused["error"]
    ok_job, ok = found[("good", 7.5)]
    assert ok["status"] == "ok" and ok["peak_memory_scope"] == "shared_process", ok["error"]
    job, broken = found[("nan", 7.5)]
    assert broken["status"] == "broken" and "broken image" in broken["error"], (broken["error"], broken["image_stats"])
    table = {r["job"]: r for r in csv_rows(sweep_dir)}
    assert table[job]["speedup"] == "" and table[ok_job]["noisy"].startswith("1 timed run (< 3)")
    assert table[ok_job]["baseline"] == "yes" and table[ok_job]["model.path"] == str(good)
    md = (sweep_dir / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert "model.path" in header and "run.guidance_scale" in header
    assert f"failed: model.path={bad}, run.guidance_scale=7.5" in md
    # model and guidance are workload: each (model, guidance) pair is compared only with itself
    assert f"model sd15 ({good})" in md and f"model sd15 ({bad})" in md and f"model sd15 ({nan})" in md


def _prepared_row(folder, overrides, status, **fields):
    """A row as an earlier sweep left it, for the spec these overrides compose."""
    from sdbuild.config import compose
    from sdbuild.spec import spec_key, spec_to_dict

    spec = spec_to_dict(compose([*FAST, *overrides]))
    folder.mkdir(parents=True)
    row = results.new_row(status=status, choices={}, overrides=[*FAST, *overrides], spec=spec,
                          spec_key=spec_key(spec), job={"num": 0}, **fields)
    results.write_row(folder, row)
    return row


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_in_place_reuses_only_sound_ok_rows_and_finishes(tmp_path):
    """Resume into the sweep folder itself (once SameFileError); a failed row is measured again, an ok
    row without timings is never trusted; a lock left by a dead sweep does not block."""
    sweep_dir = tmp_path / "sweep"
    kept = _prepared_row(sweep_dir / "0", ["precision=fp32"], "ok", latency_s=results.latency_stats([0.5, 0.4, 0.45]))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        sweep_dir / "0" / "image.png")
    data = json.loads((sweep_dir / "0" / "result.json").read_text())
    data["image"] = "image.png"
    (sweep_dir / "0" / "result.json").write_text(json.dumps(data))
    _prepared_row(sweep_dir / "1", ["precision=bf16"], "failed", error="out of memory")
    untrusted = sweep_dir / "7"  # an ok bf16 row with no latency, elsewhere in the folder
    _prepared_row(untrusted, ["precision=bf16"], "unsupported")
    bad = json.loads((untrusted / "result.json").read_text())
    bad["status"] = "ok"
    (untrusted / "result.json").write_text(json.dumps(bad))
    (sweep_dir / results.LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))

    out = sweep(sweep_dir, "precision=fp32,bf16", f"resume={sweep_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    final = rows(sweep_dir)
    assert final["0"]["reused_from"] and final["0"]["latency_s"]["runs"] == kept["latency_s"]["runs"]
    assert final["1"]["status"] == "ok" and final["1"]["reused_from"] is None  # measured, not the failed row
    assert len(final["1"]["latency_s"]["runs"]) == 1
    table = {r["job"]: r for r in csv_rows(sweep_dir)}
    assert set(table) == {"0", "1"} and table["1"]["status"] == "ok"


def test_mistyped_resume_and_a_live_sweep_in_the_folder_are_refused(tmp_path):
    out = sweep(tmp_path / "a", "precision=fp32,bf16", f"resume={tmp_path / 'no-such-sweep'}")
    assert out.returncode == 2 and "resume=" in out.stderr and "no such folder" in out.stderr
    assert "Traceback" not in out.stderr and not list((tmp_path / "a").glob("*/result.json"))

    busy = tmp_path / "b"
    busy.mkdir()
    (busy / results.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    out = sweep(busy, "precision=fp32,bf16")
    assert out.returncode == 2 and f"process {os.getpid()}" in out.stderr and "another sweep" in out.stderr
    assert "Traceback" not in out.stderr and not list(busy.glob("*/result.json"))


def test_isolated_job_never_reports_a_stale_row_and_a_crashed_one_keeps_its_spec(tmp_path, monkeypatch):
    from sdbuild import job as job_module
    from sdbuild.job import run_in_fresh_process
    from sdbuild.config import compose
    from sdbuild.report import analyse

    job = tmp_path / "0"
    _prepared_row(job, ["precision=fp32"], "ok", latency_s=results.latency_stats([0.1, 0.1, 0.1]))  # an old sweep's
    spec = compose(FAST)
    # The job's process dies before writing a row (as a segfault or the OOM killer would end it).
    monkeypatch.setattr(job_module, "child_command",
                        lambda out_dir, fd: [sys.executable, "-c", "import sys; print('dying'); sys.exit(1)"])
    row = run_in_fresh_process(spec, list(FAST), job, {"precision": "fp32"}, {"num": 0})
    assert row["status"] == "failed" and "exited with code 1" in row["error"] and row["job"]["isolated"]
    on_disk = results.read_row(job / "result.json")
    assert on_disk["status"] == "failed" and on_disk["spec"]["run"]["steps"] == 4  # the spec, composed in the parent
    (group,) = analyse(tmp_path).groups
    assert "4 steps" in group.description and "?" not in group.description


@pytest.mark.parametrize("mode", [["isolate=true"], []], ids=["isolate", "worker"])
def test_sigterm_stops_an_isolated_sweep_job_and_its_child_with_a_failed_row(tmp_path, mode):
    """isolate=true (a process for the job alone) and the default sweep's long-lived worker alike."""
    args = [sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={tmp_path}", "run.steps=50",
            "run.repeats=20", "precision=fp32,bf16", *mode]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "0" / results.PROCESS_LOG
    deadline = time.time() + 400
    while time.time() < deadline and "loading and building" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    row = results.read_row(tmp_path / "0" / "result.json")
    assert row["status"] == "failed" and "interrupted (SIGTERM)" in row["error"]
    assert row["job"]["interrupted"] == "SIGTERM" and row["job"]["isolated"] and row["spec"]["run"]["steps"] == 50
    child = row["env"]["pid"]
    assert child != proc.pid and not os.path.exists(f"/proc/{child}")  # the child did not run on
    assert row["job"]["worker"]["pid"] == child and row["job"]["worker"]["jobs_before"] == 0
    assert not (tmp_path / "1").exists()  # the sweep stopped
