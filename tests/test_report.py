"""Tests for sdbuild.report on synthetic sweep folders (real PNGs, rows written through sdbuild.results; no torch)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbuild import report, results
from sdbuild.report.analyse import BASELINE_NAME
from sdbuild.spec import (AttentionProcessor, AttentionSpec, Dtype, ModelSpec, PrecisionSpec, RunSpec, Spec,
                          spec_to_dict)

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("results.csv", "report.md", "latency.png", "index.html")


def noise_image(seed: int = 0, size: int = 16) -> np.ndarray:
    """A deterministic, non-constant uint8 RGB image."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


PRECISION = {"fp32": Dtype.fp32, "bf16": Dtype.bf16}  # anything else: fp16
PROCESSOR = {"classic": AttentionProcessor.classic, "sdpa": AttentionProcessor.sdpa,
             "xformers": AttentionProcessor.xformers}


def make_spec(precision: str = "fp32", attention: str = "classic", **run) -> dict:
    """The resolved spec a job records, built from the typed dataclasses (as sdbuild.job does)."""
    spec = Spec(precision=PrecisionSpec(name=precision, dtype=PRECISION.get(precision, Dtype.fp16)),
                attention=AttentionSpec(name=attention, processor=PROCESSOR[attention]),
                model=ModelSpec(resolution=16),
                run=RunSpec(**{"prompt": "a cat", "steps": 2, "height": 16, "width": 16, "batch_size": 1,
                               "seed": 0, "guidance_scale": 7.5, **run}))
    return spec_to_dict(spec)


def timed_runs(median: float) -> list[float]:
    """Three timed runs whose median is `median` and whose mean is not (cv about 4 %)."""
    return [median * 1.07, median, median * 0.98]


def write_job(
    sweep: Path,
    job: str,
    *,
    precision: str = "fp32",
    attention: str = "classic",
    median: float | None = 1.0,
    pixels: np.ndarray | None = None,
    status: str = "ok",
    error: str | None = None,
    preset: str | None = None,
    preset_order: int | None = None,
    peak_memory_mb: float | None = 100.0,
    runs: list[float] | None = None,
    spec: dict | None = None,
    overrides: list[str] | None = None,
    **extra,
) -> Path:
    """One job folder: result.json written through sdbuild.results, plus image.png (when ``pixels``
    is given or the row is ok)."""
    folder = sweep / job
    folder.mkdir(parents=True)
    if pixels is None and status == "ok":
        pixels = noise_image()
    image = None
    if pixels is not None:
        Image.fromarray(pixels).save(folder / "image.png")
        image = "image.png"
    choices = {"precision": precision, "memory_format": "contiguous", "attention": attention, "compile": "none",
               "memory": "none", "quant": "none", "model": "tiny", "scheduler": "ddim"}
    latency = None
    if median is not None and status in ("ok", "broken"):
        latency = results.latency_stats(runs or timed_runs(median))
    row = results.new_row(
        status=status, error=error, choices=choices, preset=preset, preset_order=preset_order,
        overrides=overrides if overrides is not None else [f"precision={precision}", f"attention={attention}"],
        spec_key=f"key-{job}", spec=spec or make_spec(precision, attention), latency_s=latency,
        warmup_s=0.5 if latency else None, build_s=0.1, load_s=0.2,
        peak_memory_mb=peak_memory_mb if latency else None, image=image,
        env={"device_name": "Test GPU 9000", "torch": "2.9.0", "diffusers": "0.99.0", "python": "3.11.7",
             "cuda": None},
        job={"num": int(job) if job.isdigit() else None},
    )
    row.update(extra)
    results.write_row(folder, row)
    return folder


def read_csv(sweep: Path) -> dict[str, dict]:
    """results.csv rows keyed by job."""
    with open(sweep / "results.csv", newline="") as f:
        return {row["job"]: row for row in csv.DictReader(f)}


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """A 2x2 sweep: precision fp32/fp16 x attention classic/sdpa; job 0 is the fp32/classic baseline."""
    base = noise_image(1)
    perturbed = base.copy()
    perturbed[0, 0, 0] ^= 0x10  # one channel of one pixel off by 16
    write_job(tmp_path, "0", precision="fp32", attention="classic", median=2.0, pixels=base, peak_memory_mb=400)
    write_job(tmp_path, "1", precision="fp32", attention="sdpa", median=1.6, pixels=base, peak_memory_mb=300)
    write_job(tmp_path, "2", precision="fp16", attention="classic", median=1.0, pixels=perturbed, peak_memory_mb=200)
    write_job(tmp_path, "3", precision="fp16", attention="sdpa", median=0.5, pixels=noise_image(7), peak_memory_mb=250)
    return tmp_path


def test_grid_writes_four_files_with_four_rows(grid: Path):
    path = report.aggregate(grid)
    assert path == grid / "report.md"
    for name in OUTPUTS:
        assert (grid / name).is_file() and (grid / name).stat().st_size > 0
    assert not list(grid.glob(".*.tmp")), "temp files of the atomic writes must be gone"
    assert (grid / "report.md").stat().st_mode & 0o044, "reports must be readable like any other file"
    assert set(read_csv(grid)) == {"0", "1", "2", "3"}
    assert Image.open(grid / "latency.png").format == "PNG"
    md = path.read_text()
    assert "Test GPU 9000" in md and "torch 2.9.0" in md and "diffusers 0.99.0" in md and "CUDA none" in md
    assert "model tiny" in md and "2 steps" in md and "16x16" in md and "batch 1" in md
    table_lines = [l for l in md.splitlines() if l.startswith("| ") and "latency" not in l]
    assert len(table_lines) == 4
    header = next(l for l in md.splitlines() if l.startswith("| job"))
    assert "precision" in header and "attention" in header and "memory_format" not in header  # only varying


def test_speedup_and_fidelity_against_fp32_classic(grid: Path):
    report.aggregate(grid)
    rows = read_csv(grid)
    assert rows["0"]["baseline"] == "yes"
    assert float(rows["0"]["speedup"]) == pytest.approx(1.0)
    assert float(rows["2"]["speedup"]) == pytest.approx(2.0)
    assert float(rows["3"]["speedup"]) == pytest.approx(4.0)
    # identical image
    assert rows["1"]["psnr_db"] == "inf" and rows["1"]["max_abs_diff"] == "0"
    # one value off by 16 in 16*16*3 values: mse = 256 / 768
    expected = 10 * math.log10(255**2 / (16**2 / (16 * 16 * 3)))
    assert float(rows["2"]["psnr_db"]) == pytest.approx(expected)
    assert rows["2"]["max_abs_diff"] == "16"
    md = (grid / "report.md").read_text()
    assert "x2.00" in md and "x4.00" in md
    assert "**Baseline:** precision=fp32, attention=classic (job 0)" in md
    html = (grid / "index.html").read_text()
    assert 'src="2/image.png"' in html and "x2.00" in html


def test_fidelity_function():
    a = noise_image(3)
    assert report.fidelity(a, a) == (math.inf, 0)
    b = a.astype(np.int16)
    b[..., 0] = np.clip(b[..., 0] + 1, 0, 255)
    psnr, diff = report.fidelity(b.astype(np.uint8), a)
    assert diff == 1 and 50 < psnr < 60


def test_slowest_row_is_baseline_without_reference(tmp_path: Path):
    write_job(tmp_path, "0", precision="fp16", attention="classic", median=1.0)
    write_job(tmp_path, "1", precision="fp16", attention="sdpa", median=3.0)
    write_job(tmp_path, "2", precision="bf16", attention="sdpa", median=1.5)
    md = report.aggregate(tmp_path).read_text()
    assert (
        f"no {BASELINE_NAME} row in this group: baseline is the slowest completed row "
        "(precision=fp16, attention=sdpa)" in md
    )
    rows = read_csv(tmp_path)
    assert rows["1"]["baseline"] == "yes"
    assert float(rows["0"]["speedup"]) == pytest.approx(3.0)


def test_unreadable_rows_are_listed_and_the_rest_renders(grid: Path):
    (grid / "4").mkdir()
    (grid / "4" / "result.json").write_text("{not json")
    (grid / "5").mkdir()
    (grid / "5" / "result.json").write_text('{"status": "ok", "choices": {"precision": "fp16"}, "latency_s": {"med')
    (grid / "6").mkdir()
    (grid / "6" / "result.json").write_text('{"status": "ok"}')  # valid JSON, missing keys
    md = report.aggregate(grid).read_text()
    rows = read_csv(grid)
    assert len(rows) == 7
    for job in ("4", "5", "6"):
        assert rows[job]["status"] == "unreadable"
        assert str(grid / job / "result.json") in md
    assert "JSONDecodeError" in rows["4"]["error"]
    assert "missing keys: choices" in rows["6"]["error"]
    assert float(rows["2"]["speedup"]) == pytest.approx(2.0)
    assert "3 unreadable" in md
    assert (grid / "latency.png").is_file() and (grid / "index.html").is_file()


def test_constant_black_image_is_broken_and_gets_no_speedup(grid: Path):
    write_job(grid, "4", precision="fp16", attention="sdpa", median=0.1, pixels=np.zeros((16, 16, 3), np.uint8))
    write_job(grid, "5", precision="fp16", attention="sdpa", median=0.1, image_stats={"nan": True})
    md = report.aggregate(grid).read_text()
    rows = read_csv(grid)
    assert "flat colour" in rows["4"]["broken"] and rows["4"]["speedup"] == ""
    assert "NaN" in rows["5"]["broken"] and rows["5"]["speedup"] == ""
    assert "x20.00" not in md
    problems = md.split("## Failed, unsupported, unreadable, missing and broken rows")[1]
    assert "broken: " in problems and "job 4" in problems and "job 5" in problems


def test_broken_reference_row_is_not_baseline(tmp_path: Path):
    write_job(tmp_path, "0", median=2.0, pixels=np.zeros((16, 16, 3), np.uint8))
    write_job(tmp_path, "1", precision="fp16", median=1.0)
    write_job(tmp_path, "2", precision="bf16", median=1.5)
    md = report.aggregate(tmp_path).read_text()
    assert read_csv(tmp_path)["2"]["baseline"] == "yes"
    assert "baseline is the slowest completed row" in md


def test_missing_image_file_is_broken(grid: Path):
    (grid / "3" / "image.png").unlink()
    report.aggregate(grid)
    row = read_csv(grid)["3"]
    assert "unreadable" in row["broken"] and row["speedup"] == ""


def test_failed_and_unsupported_rows_show_their_reason(grid: Path):
    write_job(grid, "4", precision="bf16", status="failed", error="CUDA out of memory")
    write_job(grid, "5", precision="fp16", attention="xformers", status="unsupported", error="xformers not installed")
    md = report.aggregate(grid).read_text()
    assert "failed: precision=bf16, attention=classic (job 4): CUDA out of memory" in md
    assert "unsupported: precision=fp16, attention=xformers (job 5): xformers not installed" in md
    assert "2 failed/unsupported" in md
    rows = read_csv(grid)
    assert rows["4"]["error"] == "CUDA out of memory" and rows["4"]["speedup"] == ""
    assert "xformers not installed" in (grid / "index.html").read_text()


def test_preset_order_sets_row_order(tmp_path: Path):
    presets = ["fp32", "fp16", "+channels_last", "+trace", "+memory-efficient attention"]
    # job numbers deliberately out of preset order
    for job, order in zip(["10", "2", "0", "3", "1"], [0, 1, 2, 3, 4]):
        precision = "fp32" if order == 0 else "fp16"
        write_job(tmp_path, job, precision=precision, median=2.0 - 0.3 * order, preset=presets[order],
                  preset_order=order)
    md = report.aggregate(tmp_path).read_text()
    lines = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| job")]
    assert [l.split(" | ")[0].strip("| ") for l in lines] == ["10", "2", "0", "3", "1"]
    assert "preset" in next(l for l in md.splitlines() if l.startswith("| job"))
    assert "**Baseline:** fp32 (job 10)" in md
    assert [r["job"] for r in report.load_rows(tmp_path)] == ["10", "2", "0", "3", "1"]


def test_job_order_is_numeric(tmp_path: Path):
    for job in ["10", "2", "1"]:
        write_job(tmp_path, job, precision=f"p{job}")
    assert [r["job"] for r in report.load_rows(tmp_path)] == ["1", "2", "10"]


def test_nested_jobs_found_and_hydra_folders_skipped(tmp_path: Path):
    write_job(tmp_path, "a/0")
    write_job(tmp_path, "1")
    hydra = tmp_path / "1" / ".hydra"
    hydra.mkdir()
    (hydra / "result.json").write_text("{}")
    assert sorted(r["job"] for r in report.load_rows(tmp_path)) == ["1", "a/0"]


def test_shape_mismatch_gives_no_fidelity(grid: Path):
    write_job(grid, "4", precision="bf16", median=1.0, pixels=noise_image(2, size=8))
    md = report.aggregate(grid).read_text()
    row = read_csv(grid)["4"]
    assert row["psnr_db"] == "" and "differs from baseline" in row["note"]
    assert float(row["speedup"]) == pytest.approx(2.0)
    assert "differs from baseline" in md


def test_html_escapes_text(grid: Path):
    write_job(grid, "4", precision="bf16", status="failed", error="<script>alert(1)</script> & | pipes")
    report.aggregate(grid)
    html = (grid / "index.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "\\| pipes" in (grid / "report.md").read_text()


def test_pareto_frontier():
    # (latency, memory): 0 fastest but biggest, 1 smallest but slowest, 2 dominated by 3
    points = [(0.5, 400.0), (2.0, 100.0), (1.5, 300.0), (1.0, 200.0)]
    assert report.pareto_frontier(points) == [1, 3, 0]


def test_aggregate_missing_folder_raises(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="sweep folder not found"):
        report.aggregate(tmp_path / "nope")


def test_cli_summary(grid: Path):
    write_job(grid, "4", precision="bf16", status="failed", error="boom")
    proc = subprocess.run([sys.executable, "-m", "sdbuild.report", str(grid)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "5 rows: 4 ok, 1 failed/unsupported, 0 unreadable" in proc.stdout
    assert str(grid / "report.md") in proc.stdout and str(grid / "index.html") in proc.stdout


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_cli_exit_2_without_results(tmp_path: Path, make_dir: bool):
    folder = tmp_path / "sweep"
    if make_dir:
        folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "sdbuild.report", str(folder)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_without_saved_image_is_not_broken(grid: Path):
    folder = write_job(grid, "4", precision="bf16", median=1.0)
    data = json.loads((folder / "result.json").read_text())
    data["image"] = None
    data["spec"]["run"]["save_image"] = False
    (folder / "result.json").write_text(json.dumps(data))
    report.aggregate(grid)
    row = read_csv(grid)["4"]
    assert row["broken"] == "" and float(row["speedup"]) == pytest.approx(2.0)
    assert row["psnr_db"] == "" and row["note"] == "no image to compare"


def test_wrongly_typed_fields_make_a_row_unreadable(grid: Path):
    folder = write_job(grid, "4", precision="bf16", median=1.0)
    data = json.loads((folder / "result.json").read_text())
    data["spec"]["run"] = "oops"
    data["peak_memory_mb"] = "lots"
    (folder / "result.json").write_text(json.dumps(data))
    report.aggregate(grid)
    assert read_csv(grid)["4"]["status"] == "unreadable"


def test_status_broken_from_the_runner_is_flagged(grid: Path):
    write_job(grid, "4", precision="fp16", median=0.1, status="ok",
              error="broken image: the output holds NaN")
    folder = grid / "4"
    data = json.loads((folder / "result.json").read_text())
    data["status"] = "broken"  # as sdbuild.job writes it
    (folder / "result.json").write_text(json.dumps(data))
    md = report.aggregate(grid).read_text()
    row = read_csv(grid)["4"]
    assert row["status"] == "broken" and row["speedup"] == ""
    assert row["broken"] == "broken image: the output holds NaN"
    assert "broken: precision=fp16, attention=classic (job 4): broken image: the output holds NaN" in md
    assert "5 rows: 5 ok (1 broken)" in md
