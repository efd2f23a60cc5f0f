"""benchmarks/gpu/run.sh, the one call a lent GPU gets: its CPU mode runs every step on stand-ins, and
what it leaves in $OUT is exactly what the device tool brings back (at most 8 flat files, 16 MiB each)."""

import importlib.util
import json
import os
import subprocess

import pytest

from conftest import ROOT

RUN_SH = ROOT / "benchmarks/gpu/run.sh"
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu/check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def test_out_limits_are_those_of_the_device_tool(tmp_path):
    for name in check.OUT_FILES:
        (tmp_path / name).write_text("x")
    assert check.out_problems(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "result.json").write_text("{}")  # three folders down: never returns
    (tmp_path / "stray.log").write_text("x")
    with open(tmp_path / "summary.txt", "wb") as f:  # over 16 MiB (sparse: costs no disk)
        f.truncate(check.OUT_MAX_BYTES + 1)
    problems = check.out_problems(tmp_path)
    assert any("more than 2 folders" in p for p in problems)
    assert any(p.startswith("stray.log: not one of") for p in problems)
    assert any(p.startswith("summary.txt:") and "over" in p for p in problems)
    assert any("over 8" in p for p in problems) is False  # 8 files: still allowed
    (tmp_path / "more.txt").write_text("x")
    assert any(p == "9 files, over 8" for p in check.out_problems(tmp_path))


def _run(tmp_path, *args, **env):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(["bash", str(RUN_SH), "--cpu", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "WORK": str(work), **env}, timeout=1500)
    return done, out


@pytest.mark.slow
def test_gpu_proof_runs_every_step_in_cpu_mode(tmp_path):
    """Every step of the GPU run on CPU stand-ins (tiny model, bf16 for fp16, SDPA for xFormers), each
    measured; each step's rows printed as it ends; $OUT holds the six files and nothing else."""
    done, out = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert check.out_problems(out) == [] and sorted(p.name for p in out.iterdir()) == sorted(check.OUT_FILES)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    counts = {step: sum(r["step"] == step for r in rows) for step in check.STEP_ORDER}
    assert counts == {"seed": 5, "compile": 1, "best": 1, "sdpa": 3, "parallel": 2, "compile2": 1}, counts
    assert [r for r in rows if r["status"] != "ok"] == []
    assert all(r["steps_per_s"] > 0 for r in rows)
    # each step's rows are in the output right after that step ends, before the next one starts
    text = done.stdout
    for step, nxt in zip(check.STEP_ORDER, check.STEP_ORDER[1:] + ("== done",)):
        ended = text.index(f"== {step} rc=0")
        nxt_at = text.index(f"] {nxt} (limit" if nxt != "== done" else nxt, ended)
        assert text[ended:nxt_at].count(f"\n{step:8} ") == counts[step], text[ended:nxt_at]
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == len(rows) + 3 and summary[-1].startswith("targets: not judged: these rows ran on cpu")
    # the parallel step: tiny Flux at degree 1, then 2 gloo ranks; its line has the speed-up, efficiency, fidelity
    par = summary[-3]
    assert par.startswith("parallel: fp32 classic ulysses x2 ranks over gloo, 2 ranks: ") and "efficiency" in par, par
    assert "within: True" in par, par
    assert "model=tiny_flux" not in summary[-2] and "ulysses" not in summary[-2]  # not the fastest of the proof
    assert all("- vs fp32" in line for line in summary if line.startswith("parallel/"))  # another model than seed's
    assert "x1.00 vs fp32" in summary[0]  # the seed table's first row is the baseline
    assert "[ok] versions" in (out / "preflight.log").read_text()
    assert "no failed or unsupported row" in (out / "errors.txt").read_text()
    assert "[ok] $OUT limits" in text


def test_the_parallel_step_says_why_it_was_skipped_and_stays_out_of_the_targets(tmp_path):
    """run.sh leaves the parallel step out where fewer than 2 GPUs are visible and writes why; the summary says
    it ("skipped: 1 GPU"); and a parallel step's rows (another model) are never the proof's fastest row."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "sweeps").mkdir(parents=True)
    out.mkdir()
    (work / "parallel.skip").write_text("skipped: 1 GPU (parallel=ulysses runs 2 ranks, one GPU each)\n")
    assert check.collect(str(work), str(out)) == 0
    assert (out / "summary.txt").read_text().splitlines() == [
        "parallel: skipped: 1 GPU (parallel=ulysses runs 2 ranks, one GPU each)", "targets: no ok row"]
    text = RUN_SH.read_text()
    assert 'PAR_SKIP="skipped: $NGPU GPU' in text and "torch.cuda.device_count()" in text
    assert "SWEEP_ROWS=$PAR_ROWS sweep parallel parallel=none,ulysses" in text


@pytest.mark.slow
def test_a_step_without_time_left_is_skipped_and_said(tmp_path):
    """Limits come from the time left: with too little budget the measured step is skipped with its
    reason, and $OUT still holds the files (no row, so the targets line says so)."""
    done, out = _run(tmp_path, STEPS="preflight seed", BUDGET="40")
    assert done.returncode == 0, done.stdout[-3000:]
    steps = (out / "steps.txt").read_text()
    assert "== SKIP seed:" in steps and "it needs 60s" in steps
    assert check.out_problems(out) == []
    assert (out / "summary.txt").read_text().strip() == "targets: no ok row"


def test_the_gpu_plan_fits_one_600s_call_with_the_rows_that_matter_first():
    """The GPU mode's plan, read from run.sh: the seed table, one compiled row and the best recipe come first
    among the measured steps, the minimums of every step fit the budget, and the budget fits a 600 s call
    with time for the last copy-back."""
    import re

    text = RUN_SH.read_text()
    gpu = text[text.index("else\n  BUDGET="):text.index("\nfi\nORDER=")]
    budget = int(re.search(r"BUDGET=\$\{BUDGET:-(\d+)\}", gpu).group(1))
    floors = [int(x) for x in re.search(r"FLOORS=\(([^)]*)\)", gpu).group(1).split()]
    order = re.search(r"^ORDER=\(([^)]*)\)", text, re.M).group(1).split()
    reserve = int(re.search(r"^RESERVE=(\d+)", text, re.M).group(1))
    assert order[3:6] == ["seed", "compile", "best"] and tuple(s for s in order if s in check.STEP_ORDER) == check.STEP_ORDER
    assert len(floors) == len(order) and sum(floors) + reserve <= budget and budget + 40 <= 600
    assert "timeout_s=600" in text and "precision=fp16" in re.search(r'BEST="([^"]*)"', gpu).group(1)
    # the compile step compiles one row, in the dtype the best recipe runs in
    assert re.search(r"COMPILE=inductor;", gpu) and "HALF=fp16" in gpu
