"""Sweeps on the tiny model: every combination leaves a row, jobs are isolated, sweeps resume."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import FAST, ROOT, run_cli


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
    table = csv_rows(tmp_path)
    assert len(table) == 4
    base = [r for r in table if r["precision"] == "fp32" and r["attention"] == "classic"]
    assert len(base) == 1 and base[0]["baseline"] == "yes" and float(base[0]["speedup"]) == 1.0
    for r in table:  # speed-up and fidelity against that row
        assert abs(float(r["speedup"]) - float(base[0]["latency_median_s"]) / float(r["latency_median_s"])) < 1e-6
        assert float(r["psnr_db"]) > 20  # same noise, same model: close images
    assert "job 4/4" in out.stdout and "report:" in out.stdout
    assert len({r["env"]["pid"] for r in found.values()}) == 1  # one process: the weights are loaded once


def test_isolate_runs_each_job_in_a_fresh_process(tmp_path):
    out = sweep(tmp_path, "precision=fp32,bf16", "isolate=true")
    assert out.returncode == 0, out.stderr[-2000:]
    found = rows(tmp_path).values()
    assert len(found) == 2 and all(r["status"] == "ok" and r["job"]["isolated"] for r in found)
    assert len({r["env"]["pid"] for r in found}) == 2
    assert (tmp_path / "report.md").exists()


def test_xformers_on_cpu_is_an_unsupported_row_and_the_sweep_finishes(tmp_path):
    out = sweep(tmp_path, "attention=sdpa,xformers")
    assert out.returncode == 0, out.stderr[-2000:]
    by_attention = {r["choices"]["attention"]: r for r in rows(tmp_path).values()}
    assert by_attention["sdpa"]["status"] == "ok"
    assert by_attention["xformers"]["status"] == "unsupported" and "CUDA" in by_attention["xformers"]["error"]
    assert "xformers" in (tmp_path / "report.md").read_text()


def _isolation_rows(sweep_dir, order):
    out = sweep(sweep_dir, f"precision={order}")
    assert out.returncode == 0, out.stderr[-2000:]
    found = sorted(rows(sweep_dir).items(), key=lambda kv: int(kv[0]))
    return [r for _, r in found]


def test_jobs_do_not_inherit_global_flags(tmp_path):
    forward = _isolation_rows(tmp_path / "forward", "fp32,tf32,fp32")
    backward = _isolation_rows(tmp_path / "backward", "tf32,fp32,fp32")  # the same sweep, tf32 first
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
