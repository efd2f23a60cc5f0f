"""The product end to end on CPU: `python -m sdbuild` builds, runs, measures and records."""

import json
import statistics

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def test_default_run_records_an_honest_measurement(tmp_path):
    out = run_cli(f"hydra.run.dir={tmp_path}", "run.repeats=3", "run.steps=20")  # 3 runs: median != mean
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads((tmp_path / "result.json").read_text())
    assert row["status"] == "ok" and row["error"] is None
    lat = row["latency_s"]
    assert len(lat["runs"]) == 3 and all(t > 0 for t in lat["runs"])
    assert lat["min"] <= lat["median"] <= lat["max"] and lat["min"] <= lat["p90"] <= lat["max"]
    # which statistic: three real timings, whose median and mean differ
    assert lat["median"] == statistics.median(lat["runs"])
    assert lat["mean"] == pytest.approx(statistics.fmean(lat["runs"]), rel=1e-12)
    assert lat["cv"] == pytest.approx(statistics.stdev(lat["runs"]) / statistics.fmean(lat["runs"]), rel=1e-12)
    assert row["peak_memory_scope"] == "process"  # a single run: its own process
    assert row["machine_load"]["before"]["cpu_count"] and isinstance(row["machine_load"]["busy"], bool)
    assert row["warmup_s"] > 0 and row["peak_memory_mb"] > 0 and row["load_s"] > 0
    assert row["spec"]["run"]["steps"] == 20 and row["spec"]["run"]["guidance_scale"] == 7.5 and row["choices"]["precision"] == "fp32"
    env = row["env"]
    assert env["torch"] and env["diffusers"] and env["device"] == "cpu"
    assert env["flags"]["cuda_matmul_allow_tf32"] is False
    pixels = np.asarray(Image.open(tmp_path / row["image"]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 5  # a real picture, not blank
    assert "median" in out.stdout and "result:" in out.stdout
