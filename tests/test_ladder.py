"""The tuner (`hydra/sweeper=ladder`) and sdbuild.fidelity.

Unit tests judge hand-made rows (the ladder's decisions are pure functions of rows); the
end-to-end tests run the ladder on the tiny model through Hydra and check properties that hold
however noisy the machine is: job counts, which options can never be kept, resume, the preset.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from hydra_plugins.sdbuild_ladder._ladder import (Bounds, Measured, NoiseRule, Verdict, choose, measure_fidelity,
                                             rejection)
from sdbuild.fidelity import compare, compare_files, psnr, ssim


# ---------------------------------------------------------------------------------------------
# sdbuild.fidelity


def _pair():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_and_ssim_of_identical_images():
    a, _ = _pair()
    f = compare(a, a.copy())
    assert f.psnr_db == math.inf and f.ssim == pytest.approx(1.0) and f.max_abs_diff == 0


def test_psnr_is_the_textbook_formula():
    a = np.zeros((16, 16, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 768
    assert psnr(b, a) == pytest.approx(10 * math.log10(768))


def test_ssim_matches_scikit_image():
    # Reference figures from scikit-image 0.25 structural_similarity(a, b, gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1) on the same arrays.
    a, b = _pair()
    assert ssim(a, b) == pytest.approx(0.9874838100974112, abs=1e-12)
    assert psnr(a, b) == pytest.approx(26.88807288945017, abs=1e-9)
    assert ssim(b, a) == pytest.approx(ssim(a, b))  # symmetric


def test_ssim_sees_structure_that_psnr_misses():
    """A uniform brightness shift and noise of the same MSE: SSIM ranks the shift as more similar."""
    rng = np.random.default_rng(1)
    a = np.clip(np.cumsum(rng.normal(size=(64, 64)), 0) * 8 + 128, 20, 235)
    shifted = a + 10
    noisy = a + rng.choice([-10.0, 10.0], size=a.shape)
    assert psnr(shifted, a) == pytest.approx(psnr(noisy, a))
    assert ssim(shifted, a) > ssim(noisy, a) + 0.05


def test_fidelity_refuses_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        compare(np.zeros((16, 16, 3)), np.zeros((16, 32, 3)))


# ---------------------------------------------------------------------------------------------
# The ladder's decisions on given rows


def _m(key, median=None, lo=None, hi=None, status="ok", psnr_db=math.inf, ssim_=1.0, peak=500.0, error=None):
    row = {"status": status, "error": error, "peak_memory_mb": peak,
           "latency_s": None if median is None else {"median": median, "min": lo, "max": hi}}
    return Measured(choices={"axis": key}, overrides=[f"axis={key}"], spec_key=key, row=row,
                    psnr_db=psnr_db, ssim=ssim_)


def _verdicts(trials):
    return {t.m.spec_key: t.verdict for t in trials}


def test_keeps_the_fastest_option_beyond_noise():
    inc = _m("a", 1.0, 0.95, 1.05)
    options = [inc, _m("b", 0.8, 0.78, 0.82), _m("c", 0.6, 0.55, 0.65)]
    kept, trials = choose(inc, options, Bounds())
    assert kept.spec_key == "c"
    assert _verdicts(trials) == {"a": Verdict.current, "b": Verdict.outpaced, "c": Verdict.kept}


def test_a_gain_inside_the_spread_keeps_the_current_recipe():
    inc = _m("a", 1.0, 0.90, 1.10)
    faster_but_noisy = _m("b", 0.92, 0.85, 0.95)  # lower median, but its slowest run > current fastest
    kept, trials = choose(inc, [inc, faster_but_noisy], Bounds(noise=NoiseRule.spread))
    assert kept is inc and _verdicts(trials)["b"] == Verdict.within_noise
    kept, _ = choose(inc, [inc, faster_but_noisy], Bounds(noise=NoiseRule.median))
    assert kept.spec_key == "b"
    kept, _ = choose(inc, [inc, faster_but_noisy], Bounds(noise=NoiseRule.median, min_gain=0.1))
    assert kept is inc  # 8 % < 10 %


def test_never_keeps_a_row_that_is_not_ok_or_out_of_bounds_however_fast():
    inc = _m("a", 1.0, 0.95, 1.05)
    options = [
        inc,
        _m("lossy", 0.1, 0.1, 0.1, psnr_db=30.0),
        _m("nan", 0.1, 0.1, 0.1, psnr_db=float("nan")),
        _m("blurry", 0.1, 0.1, 0.1, ssim_=0.5),
        _m("broken", 0.1, 0.1, 0.1, status="broken", error="broken image: the output holds NaN"),
        _m("unsupported", status="unsupported", error="precision=fp16 needs CUDA"),
        _m("failed", status="failed", error="out of memory"),
        _m("hungry", 0.1, 0.1, 0.1, peak=9000.0),
    ]
    kept, trials = choose(inc, options, Bounds(psnr_db=50.0, ssim=0.98, memory_mb=1000.0))
    assert kept is inc
    assert _verdicts(trials) == {
        "a": Verdict.current, "lossy": Verdict.fidelity, "nan": Verdict.fidelity, "blurry": Verdict.fidelity,
        "broken": Verdict.broken, "unsupported": Verdict.unsupported, "failed": Verdict.failed,
        "hungry": Verdict.memory}
    assert "needs CUDA" in {t.m.spec_key: t.reason for t in trials}["unsupported"]
    # consent: with the bounds lifted, the lossy option is kept
    kept, _ = choose(inc, options[:2], Bounds(psnr_db=None))
    assert kept.spec_key == "lossy"


def test_a_row_whose_image_cannot_be_compared_is_not_kept_under_a_bound():
    m = _m("b", 0.5, 0.5, 0.5, psnr_db=None, ssim_=None)
    m.fidelity_error = "no image to compare (run.save_image=false?)"
    assert rejection(m, Bounds(psnr_db=50.0))[0] == Verdict.fidelity
    assert rejection(m, Bounds(psnr_db=None)) is None


def test_walk_order_and_start_from_the_settings():
    from hydra_plugins.sdbuild_ladder.ladder_sweeper import LadderError, LadderSweeper

    axes = {"compile": ["none", "trace"], "run.steps": ["4", "1"], "precision": ["fp32", "bf16"], "+preset": ["a", "b"]}
    assert LadderSweeper()._walk_order(axes) == ["precision", "compile", "run.steps", "+preset"]
    assert LadderSweeper(order=["preset", "compile"])._walk_order(axes) == [
        "+preset", "compile", "run.steps", "precision"]
    with pytest.raises(LadderError, match="'atention'.*not swept"):
        LadderSweeper(order=["atention"])._walk_order(axes)
    assert LadderSweeper(start={"precision": "bf16"})._start(axes) == {
        "compile": "none", "run.steps": "4", "precision": "bf16", "+preset": "a"}
    with pytest.raises(LadderError, match="not one of the swept options"):
        LadderSweeper(start={"precision": "fp16"})._start(axes)
    with pytest.raises(LadderError, match="not a swept axis"):
        LadderSweeper(start={"attention": "sdpa"})._start(axes)


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model

TINY = ["run.steps=4", "run.warmup=1", "run.repeats=3"]
# Three axes, walked precision -> attention -> run.steps (DEFAULT_ORDER, then the command line):
# fp16 is unsupported on a CPU, run.steps=1 is a lossy "lever" (faster, a different image).
AXES = ["precision=fp32,fp16", "run.steps=4,1", "attention=classic,sdpa"]
LADDER = ["--multirun", "hydra/sweeper=ladder", "hydra.sweeper.noise=median", *TINY, *AXES]
RECIPES = 4  # baseline, + fp16, + sdpa, + steps=1 (each option once on top of the kept recipe)


def _rows(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(sweep_dir).glob("*/result.json")}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One ladder, interrupted (SIGKILL) after its first row, then run again twice in the same folder."""
    sweep_dir = tmp_path_factory.mktemp("ladder")
    args = [sys.executable, "-m", "sdbuild", *LADDER, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200  # a shared 2-core machine can take minutes for the first job
    while time.time() < deadline and not _rows(sweep_dir) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _rows(sweep_dir)
    second = run_cli(*LADDER, f"hydra.sweep.dir={sweep_dir}", timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    after_second = _rows(sweep_dir)
    third = run_cli(*LADDER, f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    return dict(dir=sweep_dir, first=first, after_second=after_second, final=_rows(sweep_dir),
                ladder=json.loads((sweep_dir / "ladder.json").read_text()), second=second, third=third)


def test_ladder_measures_each_option_once_not_the_grid(tuned):
    final, ladder = tuned["final"], tuned["ladder"]
    keys = [r["spec_key"] for r in final.values()]
    assert len(keys) == len(set(keys)) == RECIPES  # no recipe measured twice, across three runs
    assert ladder["jobs"]["grid_size"] == 8 and ladder["jobs"]["recipes"] == RECIPES
    assert [s["axis"] for s in ladder["steps"]] == ["precision", "attention", "run.steps"]
    for step in ladder["steps"]:  # each step tried every option of its axis
        assert sorted(t["choices"][step["axis"]] for t in step["trials"]) == sorted(ladder["axes"][step["axis"]])


def test_interrupted_ladder_resumes_without_remeasuring(tuned):
    first, after_second = tuned["first"], tuned["after_second"]
    assert first  # the kill came after at least one row
    for name, row in first.items():  # rows of the killed run are reused as they are
        assert after_second[name]["latency_s"] == row["latency_s"] and after_second[name]["env"] == row["env"]
    assert len(after_second) == RECIPES  # the second run measured only what was missing
    assert tuned["final"].keys() == after_second.keys()  # the third run measured nothing
    assert "0 jobs launched" in tuned["third"].stdout, tuned["third"].stdout[-2000:]
    assert tuned["ladder"]["jobs"]["launched"] == 0 and tuned["ladder"]["jobs"]["reused"] == RECIPES


def test_unsupported_option_is_skipped_with_its_row(tuned):
    ladder = tuned["ladder"]
    rows = {r["choices"]["precision"]: r for r in tuned["final"].values() if r["spec"]["run"]["steps"] == 4
            and r["choices"]["attention"] == "classic"}
    assert rows["fp16"]["status"] == "unsupported" and "CUDA" in rows["fp16"]["error"]
    trial = next(t for t in ladder["steps"][0]["trials"] if t["choices"]["precision"] == "fp16")
    assert trial["verdict"] == "unsupported" and trial["job"] is not None
    assert ladder["winner"]["choices"]["precision"] == "fp32"


def test_lossy_lever_is_never_kept(tuned):
    ladder = tuned["ladder"]
    step = next(s for s in ladder["steps"] if s["axis"] == "run.steps")
    lossy = next(t for t in step["trials"] if t["choices"]["run.steps"] == "1")
    assert lossy["status"] == "ok" and lossy["verdict"] == "fidelity", lossy
    assert lossy["psnr_db"] != "inf" and lossy["psnr_db"] < ladder["bounds"]["psnr_db"]
    assert ladder["winner"]["choices"]["run.steps"] == "4"


def test_winner_is_never_slower_than_the_baseline(tuned):
    ladder = tuned["ladder"]
    assert ladder["winner"]["latency_s"]["median"] <= ladder["baseline"]["latency_s"]["median"]
    kept = [t for s in ladder["steps"] for t in s["trials"] if t["verdict"] == "kept"]
    for step in ladder["steps"]:
        if step["changed"]:
            assert any(t["choices"][step["axis"]] == step["kept"] for t in kept)


def test_preset_reproduces_the_winner(tuned):
    from sdbuild import compose
    from sdbuild.spec import spec_key, spec_to_dict

    preset = Path(tuned["ladder"]["preset"])
    assert preset == tuned["dir"] / "preset" / "ladder.yaml"
    assert preset.read_text().startswith("# @package _global_")
    spec = compose([f"hydra.searchpath=[file://{tuned['dir']}]", "+preset=ladder"])
    assert spec_key(spec_to_dict(spec)) == tuned["ladder"]["winner"]["spec_key"]
    assert spec.preset == "ladder"


def test_ladder_report_files(tuned):
    md = (tuned["dir"] / "ladder.md").read_text()
    assert "| baseline |" in md and "## Every row tried" in md and "full grid has 8 combinations" in md
    assert "unsupported" in md and "fidelity" in md
    assert (tuned["dir"] / "ladder.html").read_text().count("<table>") >= 2
    assert (tuned["dir"] / "report.md").exists()  # sdbuild's own report still follows the sweep


def test_settings_mistake_fails_before_any_job(tmp_path):
    out = run_cli("--multirun", "hydra/sweeper=ladder", f"hydra.sweep.dir={tmp_path}", *TINY,
                  "precision=fp32,bf16", "hydra.sweeper.order=[precision,atention]")
    assert out.returncode == 2, out.stderr[-2000:]  # a user's mistake (was Hydra's exit 1)
    assert "atention" in out.stderr and "not swept" in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.glob("*/result.json"))
    assert not list(tmp_path.glob(".sdbuild-sweep.lock"))  # released: the folder can be swept again (was left)
    out = run_cli("--multirun", "hydra/sweeper=interleaved", f"hydra.sweep.dir={tmp_path}", *TINY)
    assert out.returncode == 2 and "nothing is swept" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_plugin_is_discovered_when_installed(tmp_path):
    """A non-editable install (no checkout on the path) still offers hydra/sweeper=ladder."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = ("import hydra_plugins.sdbuild_ladder.ladder_sweeper as m, sdbuild;"
             "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper;"
             "print(m.__file__, sdbuild.__file__, [p.__name__ for p in Plugins.instance().discover(Sweeper)])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count(str(target)) == 2 and "LadderSweeper" in out.stdout
    cfg = subprocess.run([sys.executable, "-m", "sdbuild", "hydra/sweeper=ladder", "--cfg", "hydra"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert cfg.returncode == 0 and "LadderSweeper" in cfg.stdout and "psnr_db: 50.0" in cfg.stdout


GRID_AXES = ["precision=fp32,bf16", "memory_format=contiguous,channels_last",
             "attention=classic,sdpa,sdpa_math", "compile=none,trace"]


@pytest.mark.slow
def test_ladder_finds_the_grids_winner_within_noise_with_far_fewer_jobs(tmp_path):
    """The 24-combination grid, then the ladder on the grid's own rows (`resume=`): the greedy walk
    and the exhaustive search judged on identical measurements (benchmarks/ladder_vs_grid.py also
    measures the ladder afresh)."""
    grid = run_cli("--multirun", f"hydra.sweep.dir={tmp_path / 'grid'}", *TINY, *GRID_AXES, timeout=7200)
    assert grid.returncode == 0, grid.stderr[-3000:]
    out = run_cli("--multirun", "hydra/sweeper=ladder", f"hydra.sweep.dir={tmp_path / 'ladder'}", *TINY, *GRID_AXES,
                  f"resume={tmp_path / 'grid'}", timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    ladder = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    grid_rows = [r for r in _rows(tmp_path / "grid").values() if r["status"] == "ok"]
    assert len(grid_rows) == 24
    # the grid's answer under the same fidelity bound (bf16 is lossy: PSNR ~46 dB < 50 dB)
    image = lambda r: Path(r["job"]["output_dir"]) / r["image"]  # noqa: E731
    base = next(r for r in grid_rows if r["spec_key"] == ladder["baseline"]["spec_key"])
    admissible = [r for r in grid_rows if compare_files(image(r), image(base)).psnr_db >= ladder["bounds"]["psnr_db"]]
    best = min(admissible, key=lambda r: r["latency_s"]["median"])
    won = ladder["winner"]["latency_s"]
    assert won["min"] <= best["latency_s"]["max"], (ladder["winner"]["choices"], won, best["choices"],
                                                    best["latency_s"])
    assert ladder["jobs"]["recipes"] <= 6 + 4  # baseline + 1 + 1 + 2 + 1 new options; second pass <= 4 drops
    assert ladder["jobs"]["grid_size"] == 24


def test_a_baseline_that_cannot_run_stops_the_ladder_with_its_reason(tmp_path):
    out = run_cli("--multirun", "hydra/sweeper=ladder", f"hydra.sweep.dir={tmp_path}", *TINY,
                  "precision=fp16,fp16_vae32")
    assert out.returncode != 0
    assert "the baseline (precision=fp16) is unsupported" in out.stderr and "CUDA" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(list(tmp_path.glob("*/result.json"))) == 2  # both options have their row
    assert "| baseline |" in (tmp_path / "ladder.md").read_text()


def test_the_adherence_bound_keeps_a_lever_only_within_its_drop_from_the_baseline():
    """hydra.sweeper.adherence_drop (drawn models): the drop is measured against the baseline's own
    score by measure_fidelity, and a faster lever that draws worse than the bound allows is not kept."""
    base = _m("a", 1.0, 0.95, 1.05)
    close, far, none = _m("close", 0.5, 0.5, 0.5), _m("far", 0.4, 0.4, 0.4), _m("none", 0.3, 0.3, 0.3)
    for m, score in ((base, 0.95), (close, 0.92), (far, 0.70)):
        m.row["adherence"] = {"score": score, "images": 60}
    for m in (base, close, far, none):
        measure_fidelity(m, base)  # no images here: PSNR cannot be compared, adherence can
    assert close.adherence_drop == pytest.approx(0.03) and far.adherence_drop == pytest.approx(0.25)
    assert none.adherence_drop is None
    bounds = Bounds(psnr_db=None, adherence_drop=0.05)
    kept, trials = choose(base, [base, close, far, none], bounds)
    assert kept.spec_key == "close"
    verdicts, reasons = _verdicts(trials), {t.m.spec_key: t.reason for t in trials}
    assert verdicts["far"] == Verdict.fidelity and "0.250 below the baseline's" in reasons["far"]
    assert verdicts["none"] == Verdict.fidelity and "only drawn models" in reasons["none"]
    # without the bound, the fastest is kept
    assert choose(base, [base, close, far, none], Bounds(psnr_db=None))[0].spec_key == "none"


@pytest.mark.slow  # about a minute on 2 loaded cores: a degree-1 job, then a job of 2 gloo ranks
def test_an_interleaved_ladder_walks_parallel_as_separate_jobs_showing_the_efficiency(tmp_path):
    """`parallel` is an axis like any group; a parallel recipe runs as N ranks of its own, which one
    interleaved process cannot alternate: the ladder measures that step as separate jobs (basic launcher),
    judges it by the spread rule, says so, and shows each parallel trial's speed-up on the step's
    degree-1 recipe and its efficiency. Which option it keeps depends on the machine; that it decides does not."""
    out = run_cli("--multirun", "hydra/sweeper=ladder", "hydra.sweeper.interleave=true", f"hydra.sweep.dir={tmp_path}",
                  "model=tiny_flux", "run.steps=2", "run.warmup=1", "run.repeats=3", "parallel=none,ulysses",
                  timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    ladder = json.loads((tmp_path / "ladder.json").read_text())
    step, = ladder["steps"]
    assert step["axis"] == "parallel" and "separate jobs, not interleaved" in step["note"]
    assert "parallel=ulysses runs as 2 ranks" in step["note"] and "spread rule" in step["note"]
    trials = {t["choices"]["parallel"]: t for t in step["trials"]}
    one, two = trials["none"], trials["ulysses"]
    assert one["status"] == two["status"] == "ok", (one["error"], two["error"])
    assert one["measurement"]["mode"] == two["measurement"]["mode"] == "single"  # each its own job, no group
    assert two["verdict"] in ("kept", "slower", "within noise"), two["verdict"]
    gain = two["parallel"]
    assert (gain["world_size"], gain["reference_job"]) == (2, one["job"])
    assert gain["speedup"] == pytest.approx(one["latency_s"]["median"] / two["latency_s"]["median"])
    assert gain["efficiency"] == pytest.approx(gain["speedup"] / 2)
    assert "parallel" not in one  # a one-process recipe has no ranks to account for
    assert two["psnr_db"] == "inf" or two["psnr_db"] > 80  # the ranks' image is the degree-1 image (~1e-6)
    md = (tmp_path / "ladder.md").read_text()
    assert f"2: x{gain['speedup']:.2f} on job {one['job']}, efficiency {gain['efficiency']:.2f}" in md
    assert "Step 1 (parallel): measured as separate jobs" in md
    print(f"ladder parallel step: degree 1 {one['latency_s']['median']:.3f} s, ulysses 2 "
          f"{two['latency_s']['median']:.3f} s, x{gain['speedup']:.2f}, efficiency {gain['efficiency']:.2f}, "
          f"verdict {two['verdict']}, load {os.getloadavg()}")
