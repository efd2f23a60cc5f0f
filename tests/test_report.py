"""Tests for sdbuild.report on synthetic sweep folders (real PNGs, rows written through sdbuild.results; no torch)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import needs_packages

from sdbuild import report, results
from sdbuild.fidelity import compare
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
    """Three timed runs whose median is `median` and whose mean is not, and not in proportion to it
    (a speed-up from means differs from one from medians); cv below the noise threshold from 0.5 s."""
    return [median * 1.06 + 0.02, median, median * 0.99]


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
        spec_key=hex_key(f"key-{job}"), spec=spec or make_spec(precision, attention), latency_s=latency,
        warmup_s=0.5 if latency else None, build_s=0.1, load_s=0.2,
        peak_memory_mb=peak_memory_mb if latency else None, image=image,
        env={"device_name": "Test GPU 9000", "torch": "2.9.0", "diffusers": "0.99.0", "python": "3.11.7",
             "cuda": None},
        job={"num": int(job) if job.isdigit() else None},
    )
    row.update(extra)
    if isinstance(extra.get("spec_key"), str):  # a label in the test, hex in the row (as spec_key writes)
        row["spec_key"] = hex_key(extra["spec_key"])
    results.write_row(folder, row)
    return folder


def hex_key(label: str) -> str:
    import hashlib

    return hashlib.sha256(label.encode()).hexdigest()[:16]


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
    """The report's fidelity figures come from sdbuild.fidelity (the one place they are computed)."""
    a = noise_image(3)
    same = compare(a, a)
    assert (same.psnr_db, same.max_abs_diff, same.ssim) == (math.inf, 0, 1.0)
    b = a.astype(np.int16)
    b[..., 0] = np.clip(b[..., 0] + 1, 0, 255)
    moved = compare(b.astype(np.uint8), a)
    assert moved.max_abs_diff == 1 and 50 < moved.psnr_db < 60 and moved.ssim < 1.0


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


def test_lora_swaps_are_in_the_report_pages(grid: Path):
    """A lora=hotswap row's swaps (each swap's time, the next call's, Dynamo's new graphs) are a column of
    report.md and index.html (escaped like every cell) and a JSON cell of results.csv; rows without swaps
    show a dash, and a sweep without hotswap rows has no such column."""
    report.aggregate(grid)
    assert "LoRA swaps" not in (grid / "report.md").read_text()
    swaps = [{"adapter": 1, "path": "/a/b.safetensors", "swap_s": 0.0123, "call_s": 0.8, "recompiles": 0},
             {"adapter": 2, "path": "/a/c.safetensors", "swap_s": 0.02, "call_s": 95.5, "recompiles": 1}]
    lora = {"mode": "hotswap", "adapters": [], "target_rank": 8, "swaps": swaps}
    write_job(grid, "4", precision="bf16", median=0.9, overrides=["precision=bf16", "lora=hotswap"], lora=lora)
    write_job(grid, "5", precision="fp8", median=0.9, overrides=["precision=fp8", "lora=hotswap"],
              lora={**lora, "swaps": [{**swaps[0], "recompiles": None}]})
    report.aggregate(grid)
    cell = ("adapter 1: swap 0.0123 s, next call 0.8000 s, 0 new graphs; "
            "adapter 2: swap 0.0200 s, next call 95.50 s, 1 new graph")
    md, page = (grid / "report.md").read_text(), (grid / "index.html").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert "LoRA swaps" in header and f"| {cell} |" in md and "not compiled" in md
    assert f'<td class="num">{cell}</td>' in page and "<th>LoRA swaps</th>" in page
    (line4,) = [line for line in md.splitlines() if line.startswith("| 4 ")]
    (line0,) = [line for line in md.splitlines() if line.startswith("| 0 ")]
    assert cell in line4 and "adapter 1" not in line0
    assert json.loads(read_csv(grid)["4"]["lora_swaps"]) == swaps and read_csv(grid)["0"]["lora_swaps"] == ""


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


# --- the row (sdbuild.results) ------------------------------------------------------------------


def test_latency_stats_median_is_the_median_not_the_mean():
    lat = results.latency_stats([3.0, 1.0, 1.1])
    assert lat["median"] == 1.1 and lat["mean"] == pytest.approx(5.1 / 3) and lat["runs"] == [3.0, 1.0, 1.1]
    assert lat["min"] == 1.0 and lat["max"] == 3.0 and lat["cv"] == pytest.approx(np.std([3, 1, 1.1], ddof=1) / (5.1 / 3))


def _raw_row(tmp_path: Path, **fields) -> Path:
    folder = write_job(tmp_path, "0")
    data = json.loads((folder / "result.json").read_text())
    data.update(fields)
    (folder / "result.json").write_text(json.dumps(data))
    return folder / "result.json"


@pytest.mark.parametrize("fields, why", [
    ({"latency_s": None}, "missing keys: latency_s"),  # an ok row without its timings
    ({"latency_s": {"median": 1.0, "mean": 1.0, "runs": [1.0, 1.0, 4.0]}}, "mean 1.0 is not the mean"),
    ({"latency_s": {"median": 2.0, "mean": 2.0, "runs": [1.0, 1.0, 4.0]}}, "median 2.0 is not the median"),
    ({"status": "missing"}, "never written by a job"),
    ({"status": "great"}, "unknown status"),
    ({"steady": "yes"}, "steady should be bool"),
])
def test_rows_that_cannot_be_trusted_are_unreadable(tmp_path: Path, fields: dict, why: str):
    path = _raw_row(tmp_path, **fields)
    with pytest.raises(results.RowError, match=why):
        results.read_row(path)
    row = results.load_row(path)
    assert row["status"] == "unreadable" and why.split()[0] in row["error"]


def test_ok_row_without_latency_does_not_break_the_report(grid: Path):
    folder = write_job(grid, "4", precision="bf16")
    data = json.loads((folder / "result.json").read_text())
    data["latency_s"] = None
    (folder / "result.json").write_text(json.dumps(data))
    md = report.aggregate(grid).read_text()
    assert read_csv(grid)["4"]["status"] == "unreadable" and "missing keys: latency_s" in md


def test_contract_fields_are_accepted(tmp_path: Path):
    write_job(tmp_path, "0", warmup_calls=3, steady=True, unsteady_reason=None, warmup_peak_memory_mb=1.5,
              peak_memory_reserved_mb=2.0, steps_per_s=10.0, attention_kernel={"requested": "flash"},
              build_notes=["VAE kept in float32"], fatal_cuda_error=False)
    assert results.read_row(tmp_path / "0" / "result.json")["steps_per_s"] == 10.0


def test_only_ok_rows_are_reusable(tmp_path: Path):
    write_job(tmp_path, "0")
    write_job(tmp_path, "1", status="failed", error="boom")
    write_job(tmp_path, "2", status="unsupported", error="no CUDA")
    write_job(tmp_path, "3", status="broken", error="NaN")
    reusable = [results.reusable(results.read_row(tmp_path / j / "result.json")) for j in "0123"]
    assert reusable == [True, False, False, False]


def test_broken_image_rule():
    assert results.broken_image({"nan": True, "min": 0.0, "max": 1.0, "mean": 0.5}) == "broken image: the output holds NaN"
    assert "constant" in results.broken_image({"nan": False, "min": 0.2, "max": 0.2, "mean": 0.2})
    assert results.broken_image({"nan": False, "min": 0.0, "max": 1.0, "mean": 0.5}) is None


# --- every planned job accounted for ---------------------------------------------------------------


def write_plan(sweep: Path, overrides: list[list[str]]) -> None:
    (sweep / "plan.json").write_text(json.dumps({"jobs": [{"num": k, "overrides": o} for k, o in enumerate(overrides)]}))


def test_planned_jobs_without_a_row_are_missing(tmp_path: Path):
    plan = [[f"precision={p}", f"attention={a}"] for p in ("fp32", "bf16", "fp16") for a in ("classic", "sdpa")]
    write_plan(tmp_path, plan)
    write_job(tmp_path, "0", precision="fp32", attention="classic", median=2.0)
    write_job(tmp_path, "1", precision="fp32", attention="sdpa", median=1.0)
    md = report.aggregate(tmp_path).read_text()
    rows = read_csv(tmp_path)
    assert [rows[j]["status"] for j in "012345"] == ["ok", "ok"] + ["missing"] * 4
    assert "6 rows: 2 ok, 0 failed/unsupported, 0 unreadable, 4 missing of 6 planned" in md
    problems = md.split("broken rows")[1]
    assert "None." not in problems
    assert "missing: job 5 (precision=fp16 attention=sdpa)" in problems
    assert rows["5"]["precision"] == "" and "precision=fp16" in rows["5"]["overrides"]
    assert "precision=fp16" in (tmp_path / "index.html").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| job"))
    assert "memory_format" not in header and "precision" in header  # unknown choices do not vary


def test_rows_outside_the_plan_or_of_another_sweep_are_not_mixed_in(tmp_path: Path):
    write_plan(tmp_path, [["precision=fp32"], ["precision=bf16"]])
    write_job(tmp_path, "0", precision="fp32", median=2.0, overrides=["precision=fp32"])
    write_job(tmp_path, "1", precision="fp32", median=1.0, overrides=["precision=fp32"])  # not job 1's overrides
    write_job(tmp_path, "2", precision="bf16", median=0.5, overrides=["precision=bf16"])  # an earlier, bigger sweep
    md = report.aggregate(tmp_path).read_text()
    rows = read_csv(tmp_path)
    assert set(rows) == {"0", "1"} and rows["1"]["status"] == "unreadable"
    assert "written by another sweep" in rows["1"]["error"]
    assert "ignored: rows in job folder(s) 2 are not part of this sweep's plan" in md


# --- labels, comparison groups, baseline from the typed spec -------------------------------------


def test_swept_plain_fields_label_rows_and_separate_models(tmp_path: Path):
    for job, path, median in (("0", "/m/a", 2.0), ("1", "/m/b", 4.0), ("2", "/m/a", 1.0), ("3", "/m/b", 1.0)):
        precision = "fp32" if job in "01" else "bf16"
        spec = make_spec(precision)
        spec["model"]["path"] = path
        write_job(tmp_path, job, precision=precision, median=median, spec=spec,
                  overrides=[f"precision={precision}", f"model.path={path}"])
    md = report.aggregate(tmp_path).read_text()
    rows = read_csv(tmp_path)
    assert "2 comparison groups" in md and "(/m/a)" in md and "(/m/b)" in md
    assert rows["0"]["baseline"] == "yes" and rows["1"]["baseline"] == "yes"  # one baseline per model
    assert float(rows["2"]["speedup"]) == pytest.approx(2.0) and float(rows["3"]["speedup"]) == pytest.approx(4.0)
    assert rows["3"]["model.path"] == "/m/b"
    sweep = report.analyse(tmp_path)
    assert [r["label"] for r in sweep.rows] == [
        "precision=fp32, model.path=/m/a", "precision=fp32, model.path=/m/b",
        "precision=bf16, model.path=/m/a", "precision=bf16, model.path=/m/b"]
    header = next(l for l in md.splitlines() if l.startswith("| job"))
    assert "model.path" in header


def test_baseline_is_found_from_the_spec_not_from_option_names(tmp_path: Path):
    lying = make_spec("fp32")
    lying["precision"]["dtype"] = "fp16"  # an option named fp32 that runs fp16 is not the reference
    write_job(tmp_path, "0", precision="fp32", median=1.0, spec=lying)
    renamed = make_spec("fp32")
    renamed["precision"]["name"] = "plain"  # a renamed option with the reference's values is
    write_job(tmp_path, "1", precision="plain", median=0.5, spec=renamed)
    write_job(tmp_path, "2", precision="bf16", median=0.25)
    report.aggregate(tmp_path)
    rows = read_csv(tmp_path)
    assert rows["1"]["baseline"] == "yes" and rows["0"]["baseline"] == ""
    assert float(rows["2"]["speedup"]) == pytest.approx(2.0)


def test_is_reference_looks_at_every_optimisation():
    assert report.is_reference({"spec": make_spec("fp32")})
    for section, key, value in (("compile", "method", "inductor"), ("memory", "offload", "model"),
                                ("quant", "method", "int8wo"), ("vae", "kind", "tiny"),
                                ("memory_format", "format", "channels_last"), ("attention", "processor", "sdpa"),
                                ("precision", "tf32", True), ("attention", "fuse_qkv", True)):
        spec = make_spec("fp32")
        spec[section][key] = value
        assert not report.is_reference({"spec": spec}), (section, key)


# --- honest numbers --------------------------------------------------------------------------------


def test_noisy_rows_are_flagged_and_their_speedups_marked(grid: Path):
    write_job(grid, "4", precision="bf16", median=1.0, runs=[1.0])  # one timed run
    write_job(grid, "5", precision="bf16", attention="sdpa", median=1.0, runs=[0.6, 1.0, 1.5])  # cv 44 %
    write_job(grid, "6", precision="fp16", attention="sdpa", median=0.8,
              machine_load={"before": {"loadavg_1m": 9.0, "cpu_count": 2, "busy_processes": 3}, "after": {},
                            "busy": True})
    md = report.aggregate(grid).read_text()
    rows = read_csv(grid)
    assert rows["4"]["noisy"] == "1 timed run (< 3)" and rows["4"]["speedup_noisy"] == "yes"
    assert "spread cv 44% > 10%" in rows["5"]["noisy"]
    assert "machine busy" in rows["6"]["noisy"] and rows["6"]["machine_busy"] == "True"
    assert rows["0"]["noisy"] == "" and rows["2"]["speedup_noisy"] == ""  # quiet rows stay unmarked
    assert float(rows["5"]["latency_cv"]) == pytest.approx(np.std([0.6, 1, 1.5], ddof=1) / np.mean([0.6, 1, 1.5]))
    assert "x2.00 (noisy)" in md and "x2.50 (noisy)" in md and "| x2.00 (noisy) |" in md
    assert "3 noisy" in md and "measured on a busy machine" in md
    html = (grid / "index.html").read_text()
    assert "x2.00 (noisy)" in html and 'class="noisy"' in html


def test_shared_process_cpu_memory_is_marked(grid: Path):
    write_job(grid, "4", precision="bf16", median=1.0, peak_memory_scope="shared_process")
    write_job(grid, "5", precision="bf16", attention="sdpa", median=1.0, peak_memory_scope="process")
    md = report.aggregate(grid).read_text()
    assert "100 (in-process)" in md and "includes what they left behind" in md
    line5 = next(l for l in md.splitlines() if l.startswith("| 5 "))
    assert "(in-process)" not in line5


def test_sweep_closing_line_counts_rows_not_callback_events(grid: Path, capsys):
    from omegaconf import OmegaConf

    from sdbuild.sweep import SweepCallback

    callback = SweepCallback()  # as with submitit: no job ran in this process, no on_job_end seen
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(grid)}}}))
    line = capsys.readouterr().out
    assert "4 rows: 4 ok" in line and "0 jobs" not in line and "report:" in line


def test_sweeps_side_by_side_matched_by_spec(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_job(a, "0", precision="fp32", median=2.0, spec_key="k-fp32")
    write_job(a, "1", precision="bf16", median=1.0, spec_key="k-bf16")
    write_job(b, "0", precision="bf16", median=0.5, spec_key="k-bf16")  # other job numbers, same specs
    write_job(b, "1", precision="fp32", median=1.0, spec_key="k-fp32", runs=[1.0])
    write_job(b, "2", precision="fp16", median=0.4, spec_key="k-fp16")
    out = tmp_path / "cmp.csv"
    proc = subprocess.run([sys.executable, "-m", "sdbuild.report", str(a), str(b), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| precision")}
    assert table["precision=bf16"].endswith("| 1.0000 | 0.5000 | x2.00 |")
    assert table["precision=fp32"].endswith("| 2.0000 | 1.0000 (noisy) | x2.00 |")
    assert table["precision=fp16"].endswith("| — | 0.4000 | — |")
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == 3


# --- the first lines: the fastest rows, and a banner for random weights -----------------------------

FASTEST = "**Fastest:** precision=fp16, attention=sdpa (job 3), median 0.5000 s, x4.00 over the baseline; "
WITHIN = ("fastest within the fidelity bound (PSNR >= 50 dB against the baseline's image): "
          "precision=fp16, attention=classic (job 2), median 1.0000 s, x2.00 over the baseline.")


def test_the_report_opens_with_the_fastest_row_and_the_fastest_within_the_bound(grid: Path):
    """Job 3 is the fastest (its image is another picture); job 2 the fastest at >= 50 dB (52.9 dB)."""
    report.aggregate(grid)
    md = (grid / "report.md").read_text().splitlines()
    assert md[2] == FASTEST + WITHIN  # the first line under the title
    html = (grid / "index.html").read_text()
    assert html.index('<p id="fastest"><strong>Fastest:</strong> precision=fp16, attention=sdpa (job 3)') \
        < html.index("<table>")


def test_the_fastest_within_the_bound_can_be_the_fastest_or_none(tmp_path: Path):
    base = noise_image(1)
    write_job(tmp_path, "0", median=2.0, pixels=base)
    write_job(tmp_path, "1", attention="sdpa", median=1.0, pixels=base)  # identical image
    write_job(tmp_path, "2", precision="fp16", median=1.5, pixels=noise_image(5))
    report.aggregate(tmp_path)
    line = (tmp_path / "report.md").read_text().splitlines()[2]
    assert line.startswith("**Fastest:** precision=fp32, attention=sdpa (job 1), median 1.0000 s, x2.00")
    assert line.endswith(", also the fastest within the fidelity bound (PSNR >= 50 dB against the baseline's image).")
    other = tmp_path / "lossy"
    folder = write_job(other, "0", median=2.0)
    data = json.loads((folder / "result.json").read_text())
    data["image"], data["spec"]["run"]["save_image"] = None, False  # a baseline without an image: no fidelity
    (folder / "result.json").write_text(json.dumps(data))
    write_job(other, "1", precision="fp16", median=1.0, pixels=noise_image(5))
    report.aggregate(other)
    assert "; no row is within the fidelity bound" in (other / "report.md").read_text().splitlines()[2]


def test_a_banner_says_when_images_are_noise_by_design(grid: Path, tmp_path: Path):
    report.aggregate(grid)  # model=tiny: random weights
    banner = "model=tiny has random weights, so images are noise by design: compare them pixel to pixel, not by eye"
    assert f"> **Random weights:** {banner}" in (grid / "report.md").read_text()
    assert 'id="random-weights"' in (grid / "index.html").read_text()
    real = tmp_path / "real"
    spec = make_spec()
    spec["model"].update(name="sd15", source="pretrained", path="/models/sd15")
    write_job(real, "0", median=2.0, spec=spec)
    report.aggregate(real)
    assert "Random weights" not in (real / "report.md").read_text()
    assert 'id="random-weights"' not in (real / "index.html").read_text()


# --- the HTML page in a real browser -------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@needs_packages("playwright", install='pip install -e ".[browser]" and apt-get install chromium')
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs a Chromium browser: apt-get install chromium")
def test_index_html_in_a_real_browser(grid: Path):
    """Every row is in the table, every image and the plot load, the fastest row is the first line and the
    random-weights banner shows above the table, and the console shows no error."""
    from playwright.sync_api import sync_playwright

    write_plan(grid, [[f"precision={p}", f"attention={a}"] for p in ("fp32", "fp16") for a in ("classic", "sdpa")]
               + [["precision=bf16", "attention=classic"]])  # job 4 planned, never ran: a missing row
    report.aggregate(grid)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
            page.goto((grid / "index.html").as_uri())
            for img in page.locator("img").all():
                img.scroll_into_view_if_needed()
            page.wait_for_load_state("networkidle")
            jobs = page.eval_on_selector_all("table tr td:first-child", "cells => cells.map(c => c.textContent)")
            first = page.eval_on_selector("h1", "h => h.nextElementSibling.id")  # the line right under the title
            fastest = page.locator("#fastest").inner_text()
            banner = page.locator("#random-weights")
            table_top = page.locator("table").bounding_box()["y"]
            banner_shown = banner.is_visible() and banner.bounding_box()["y"] < table_top
            banner_text = banner.inner_text()
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        finally:
            browser.close()
    assert jobs == ["0", "1", "2", "3", "4"]
    assert first == "fastest" and fastest == (FASTEST + WITHIN).replace("**", "")
    assert banner_shown and "images are noise by design: compare them pixel to pixel, not by eye" in banner_text
    assert sorted(src for src, _ in images) == ["0/image.png", "1/image.png", "2/image.png", "3/image.png",
                                                "latency.png"]
    assert all(loaded for _, loaded in images), images
    assert errors == []


def test_report_md_shows_a_prompt_s_html_as_text(tmp_path: Path):
    prompt = "<img src=x onerror=alert(1)> & a cat"
    for job, seed in (("0", 0), ("1", 1)):
        write_job(tmp_path, job, spec=make_spec(prompt=prompt, seed=seed), overrides=[f"run.prompt={prompt}",
                  f"run.seed={seed}"])
    md = report.aggregate(tmp_path).read_text()
    assert "<img src=x" not in md and "&lt;img src=x onerror=alert(1)> &amp; a cat" in md


def test_report_md_shows_a_prompt_s_markdown_image_as_text(tmp_path: Path):
    """A prompt's `![x](http://...)` (or a link) is text in report.md, as a Markdown renderer reads it:
    no image fetched from a remote address when the report is viewed (before: rendered as an <img>)."""
    markdown_it = pytest.importorskip("markdown_it")
    prompt = "a cat ![x](http://example.invalid/t.png) [here](http://example.invalid/)"
    for job, seed in (("0", 0), ("1", 1)):
        write_job(tmp_path, job, spec=make_spec(prompt=prompt, seed=seed), overrides=[f"run.prompt={prompt}",
                  f"run.seed={seed}"])
    html_text = markdown_it.MarkdownIt("commonmark").enable("table").render(report.aggregate(tmp_path).read_text())
    assert "example.invalid" in html_text  # the prompt is shown...
    assert 'src="http' not in html_text and 'href="http' not in html_text  # ...as text: no image, no link


def test_the_plot_of_many_rows_shows_the_fastest_and_stays_readable(tmp_path: Path):
    from sdbuild.report.plot import MAX_BARS

    for i in range(120):  # one comparison group: 119 recipes against an fp32 baseline (1,000 drew 40,000 px)
        precision = f"p{i}" if i else "fp32"
        write_job(tmp_path, str(i), precision=precision, median=1.0 + i / 1000 if i else 2.0,
                  overrides=[f"precision={precision}"], pixels=noise_image(i % 7))
    report.aggregate(tmp_path)
    width, height = Image.open(tmp_path / "latency.png").size
    assert height <= 100 * (0.4 * MAX_BARS + 1.5) + 1 <= 2000  # MAX_BARS bars (a readable figure), not 120
    assert len(read_csv(tmp_path)) == 120  # every row is still in the table


def test_an_unreadable_plan_is_said_and_every_row_is_unplanned(grid: Path):
    (grid / "plan.json").write_text('{"jobs": [{"num": 0, "overr')  # truncated
    write_job(grid, "9", precision="bf16", median=0.5)  # another sweep's row, in a folder the plan would not list
    report.aggregate(grid)
    md = (grid / "report.md").read_text()
    assert "plan.json is unreadable" in md and "unplanned: plan.json cannot be read (JSONDecodeError" in md
    assert "9" in read_csv(grid)  # listed, as unplanned: nothing says which sweep it belongs to


# A row read back is untrusted input (issue 27, defect 6): one hostile value per field that is used as a
# path or a number. Each makes the row `unreadable` with the field named; nothing outside the job folder
# is touched when a rerun sets the row aside, resume= never copies from it, and the report renders.
HOSTILE = {
    "spec_key=abs": ({"spec_key": "/tmp/elsewhere"}, "spec_key"),
    "spec_key=up": ({"spec_key": "../../x"}, "spec_key"),
    "image=abs": ({"image": "/etc/passwd.png"}, "image"),
    "image=up": ({"image": "../0b/image.png"}, "image"),
    "image=dotdot": ({"image": ".."}, "image"),
    "latency.runs": ({"latency_s": {"median": 1e308, "mean": 1e308, "runs": [1e308, 1e308, 1e308]}}, "latency_s"),
    "latency.median": ({"latency_s": {"median": -1.0, "mean": -1.0, "runs": [-1.0]}}, "latency_s"),
    "warmup_s": ({"warmup_s": 1e300}, "warmup_s"),
    "peak_memory_mb": ({"peak_memory_mb": -5.0}, "peak_memory_mb"),
    "warmup_runs_s": ({"warmup_runs_s": [1e308]}, "warmup_runs_s"),
    "preset_order": ({"preset_order": 10 ** 30}, "preset_order"),
    "job.num": ({"job": {"num": -3}}, "job.num"),
    "job.wall_s": ({"job": {"num": 0, "wall_s": "soon"}}, "job.wall_s"),
    "paired.median": ({"paired": {"median": 1e300}}, "paired.median"),
    "adherence.score": ({"adherence": {"score": 1.5, "images": 60}}, "adherence.score"),
    "lora.swaps.swap_s": ({"lora": {"mode": "hotswap", "swaps": [{"adapter": 1, "swap_s": 1e300}]}}, "lora.swaps.swap_s"),
    "job.worker.pid": ({"job": {"num": 0, "worker": {"pid": -1, "jobs_before": 0}}}, "job.worker.pid"),
    "job.worker.jobs_before": ({"job": {"num": 0, "worker": {"pid": 7, "jobs_before": 1e300}}}, "job.worker.jobs_before"),
    "machine_load.during": ({"machine_load": {"during": {"seconds": float("nan"), "others_cpu": 0.0}}},
                            "machine_load.during.seconds"),
}


@pytest.fixture(params=sorted(HOSTILE), ids=sorted(HOSTILE))
def hostile_row(request, tmp_path: Path):
    fields, name = HOSTILE[request.param]
    sweep = tmp_path / "sweep"
    write_job(sweep, "0")
    (sweep / "0b").mkdir()
    Image.fromarray(noise_image()).save(sweep / "0b" / "image.png")  # a PNG the planted path points at
    path = sweep / "0" / "result.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))
    return sweep, path, name


def test_a_hostile_row_is_unreadable_and_touches_nothing_outside_its_folder(hostile_row, tmp_path: Path):
    from sdbuild.job import find_reusable

    sweep, path, name = hostile_row
    with pytest.raises(results.RowError, match=name.replace(".", r"\.")):
        results.read_row(path)
    row = results.load_row(path)
    assert row["status"] == "unreadable" and name in row["error"]
    md = report.aggregate(sweep).read_text()  # no crash, and the row listed with its reason
    assert read_csv(sweep)["0"]["status"] == "unreadable" and name in md
    key = json.loads(path.read_text()).get("spec_key")
    assert find_reusable(sweep, key) is None  # resume= reuses (and copies) nothing from it
    before = sorted(p for p in tmp_path.rglob("*") if "sweep/0/" not in str(p) + "/")
    moved = results.make_room(sweep / "0", "0123456789abcdef")  # a rerun of another spec sets it aside
    assert moved is not None and moved.resolve().is_relative_to((sweep / "0").resolve())
    after = sorted(p for p in tmp_path.rglob("*") if "sweep/0/" not in str(p) + "/")
    assert after == before


def test_results_csv_cells_never_start_a_spreadsheet_formula(tmp_path: Path):
    """A prompt (or an error) from someone else that starts with `=`, `+`, `-` or `@` is shown as text in a
    spreadsheet (the leading `'`), never run as a formula; a negative number stays a number."""
    write_job(tmp_path, "0", overrides=['run.prompt==HYPERLINK("http://evil.example","x")', "run.seed=-1"])
    write_job(tmp_path, "1", overrides=["run.prompt=+cmd|' /C calc'!A0", "run.seed=2"])
    write_job(tmp_path, "2", overrides=["run.prompt=-2+3", "run.seed=3"], status="failed", median=None,
              error="@SUM(A1) in the error")
    report.aggregate(tmp_path)
    table = read_csv(tmp_path)
    assert table["0"]["run.prompt"] == '\'=HYPERLINK("http://evil.example","x")'
    assert table["1"]["run.prompt"] == "'+cmd|' /C calc'!A0" and table["2"]["run.prompt"] == "'-2+3"
    assert table["2"]["error"] == "'@SUM(A1) in the error" and table["0"]["run.seed"] == "-1"
    for row in table.values():
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "@")) and (not cell.startswith("-") or float(cell) < 0), (column, cell)
