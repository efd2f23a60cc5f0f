"""The report's parallel figures: a parallel row's speed-up and efficiency on the same spec at degree 1
(sdbuild/report/parallel.py), its fidelity to degree 1 from the row, and what the page says without a
degree-1 row. Rows are made as a job makes them (sdbuild.job.base_row, then the measured fields through
sdbuild.results) and read back by the report; no torch."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbuild import report, results
from sdbuild.config import compose
from sdbuild.job import base_row
from sdbuild.stats import ratio_of_medians

COMMON = ["model=tiny_flux", "run.steps=2", "run.repeats=7"]
# Seven timed calls each (the fewest with a 95% interval on a ratio of two unpaired medians).
ONE = [2.10, 2.00, 1.95, 2.05, 2.20, 1.98, 2.02]  # median 2.02
TWO = [1.30, 1.25, 1.20, 1.28, 1.22, 1.26, 1.24]  # median 1.25


def write(sweep: Path, job: int, overrides: list[str], runs: list[float], **fields) -> dict:
    """One job's folder as a sweep leaves it: result.json through sdbuild.results, and its image."""
    spec = compose(COMMON + overrides)
    choices = {"model": "tiny_flux", "parallel": spec.parallel.name}
    row = base_row(spec, choices, overrides, {"num": job})
    folder = sweep / str(job)
    folder.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(job).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "image.png")
    row.update(status="ok", error=None, latency_s=results.latency_stats(runs), image="image.png",
               env={"device_name": "cpu", "device": "cpu"}, **fields)
    results.write_row(folder, row)
    return row


def parallel_field(fidelity: dict | None = None) -> dict:
    ranks = [{"rank": r, "pid": 100 + r, "threads": {"torch_threads": 1}, "peak_memory_mb": 500.0} for r in (0, 1)]
    record = {"world_size": 2, "method": "ulysses", "backend": "gloo", "mesh": {"dims": {"ring": 1, "ulysses": 2}},
              "ranks": ranks, "peak_memory_mb_per_rank": [500.0, 500.0]}
    if fidelity is not None:
        record["fidelity"] = fidelity
    return record


FIDELITY = {"reference": "degree 1", "psnr_db": 118.3, "ssim": 1.0, "max_abs_diff": 1.49e-6, "tolerance": 1e-4,
            "within_tolerance": True, "dtype": "fp32"}


def csv_rows(sweep: Path) -> dict[str, dict]:
    with open(sweep / "results.csv", newline="") as f:
        return {r["job"]: r for r in csv.DictReader(f)}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """parallel=none,ulysses (2 ranks) of the same spec, plus a degree-1 row of another spec (steps=3)."""
    write(tmp_path, 0, ["parallel=none"], ONE)
    write(tmp_path, 1, ["parallel=ulysses", "parallel.ulysses_degree=2"], TWO, parallel=parallel_field(FIDELITY))
    write(tmp_path, 2, ["parallel=none", "run.steps=3"], [v * 1.5 for v in ONE])
    return tmp_path


def test_a_parallel_row_gets_its_speedup_and_efficiency_on_the_same_spec_at_degree_one(sweep: Path):
    swept = report.analyse(sweep)
    row = next(r for r in swept.rows if r["job"] == "1")
    v = row["parallel_vs_one"]
    expected = ratio_of_medians(ONE, TWO)
    assert v["reference_job"] == "0" and v["world_size"] == 2  # job 2 is another spec (3 steps): never the partner
    assert v["speedup"] == pytest.approx(2.02 / 1.25) and v["efficiency"] == pytest.approx(2.02 / 1.25 / 2)
    assert (v["low"], v["high"]) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert v["low"] < v["speedup"] < v["high"]
    assert all(r["parallel_vs_one"] is None for r in swept.rows if r["job"] != "1")  # degree-1 rows have none

    report.aggregate(sweep)
    md, page = (sweep / "report.md").read_text(), (sweep / "index.html").read_text()
    for text in (md, page):
        assert f"x{2.02 / 1.25:.2f} ({expected.low:.2f}–{expected.high:.2f}, 95%) on job 0" in text
        assert f"{2.02 / 1.25 / 2:.2f} of 2 ranks ({expected.low / 2:.2f}–{expected.high / 2:.2f})" in text
        assert "max abs diff 1.5e-06, SSIM 1.0000 (tolerance 0.0001: within)" in text
        assert "parallel efficiency" in text and "efficiency = speed-up / world size" in text
    line = csv_rows(sweep)["1"]
    assert float(line["parallel_speedup"]) == pytest.approx(2.02 / 1.25) and line["parallel_reference_job"] == "0"
    assert float(line["parallel_efficiency"]) == pytest.approx(2.02 / 1.25 / 2)
    assert float(line["parallel_max_abs_diff"]) == pytest.approx(1.49e-6) and line["parallel_world_size"] == "2"


def test_without_its_degree_one_row_the_page_says_so_and_shows_no_figure(sweep: Path):
    import shutil

    shutil.rmtree(sweep / "0")  # the partner row goes
    report.aggregate(sweep)
    row = next(r for r in report.analyse(sweep).rows if r["job"] == "1")
    assert row["parallel_vs_one"] is None and "no degree-1 row of this spec" in row["parallel_note"]
    for text in ((sweep / "report.md").read_text(), (sweep / "index.html").read_text()):
        assert "none: no degree-1 row of this spec in the sweep" in text
        assert "of 2 ranks" not in text
    assert csv_rows(sweep)["1"]["parallel_speedup"] == ""


def test_a_failed_degree_one_row_gives_no_speedup_and_says_why(tmp_path: Path):
    write(tmp_path, 0, ["parallel=none"], ONE)
    write(tmp_path, 1, ["parallel=ulysses", "parallel.ulysses_degree=2"], TWO, parallel=parallel_field())
    row0 = results.read_row(tmp_path / "0" / "result.json")
    row0.update(status="failed", error="boom", latency_s=None)
    results.write_row(tmp_path / "0", row0)
    row = next(r for r in report.analyse(tmp_path).rows if r["job"] == "1")
    assert row["parallel_vs_one"] is None and row["parallel_note"] == "its degree-1 row (job 0) is failed: no speed-up"


def test_too_few_calls_give_the_ratio_without_an_interval(tmp_path: Path):
    write(tmp_path, 0, ["parallel=none"], ONE[:3])
    write(tmp_path, 1, ["parallel=ulysses", "parallel.ulysses_degree=2"], TWO[:3], parallel=parallel_field())
    report.aggregate(tmp_path)
    row = next(r for r in report.analyse(tmp_path).rows if r["job"] == "1")
    assert row["parallel_vs_one"]["low"] is None
    assert "no 95% interval at 3 calls; needs 7 in each row" in (tmp_path / "report.md").read_text()


def test_a_sweep_without_parallel_rows_has_no_parallel_columns(tmp_path: Path):
    write(tmp_path, 0, ["parallel=none"], ONE)
    write(tmp_path, 1, ["parallel=none", "run.steps=3"], ONE)
    report.aggregate(tmp_path)
    assert "parallel" not in (tmp_path / "report.md").read_text().split("| job")[1].split("\n")[0]
    assert "parallel_speedup" not in (tmp_path / "results.csv").read_text()


def test_ratio_of_medians_covers_at_the_stated_level():
    """The unpaired interval covers the true ratio at least 95% of the time (two independent samples)."""
    import random

    rng = random.Random(0)
    trials, covered = 400, 0
    for _ in range(trials):
        ref = [rng.lognormvariate(0.7, 0.2) for _ in range(9)]  # true median e^0.7
        cand = [rng.lognormvariate(0.2, 0.3) for _ in range(9)]  # true median e^0.2
        s = ratio_of_medians(ref, cand)
        covered += s.low <= np.exp(0.5) <= s.high
    assert covered / trials >= 0.95
