"""Speed-ups you can bet on (issue 15): paired intervals (sdbuild.stats), interleaved measurement
(sdbuild.measure.measure_group, sdbuild.interleave), run.repeats=auto, run.threads, energy, and
the busy flags in the ladder's outputs.

The synthetic pipelines here sleep: their call time is set by the test (a base time, a load
schedule, a seeded noise), so what is asserted is the measurement's logic, not this machine's speed.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sdbuild
from conftest import run_cli
from hydra_plugins.sdbuild_ladder._ladder import Bounds, Measured, NoiseRule, Verdict, choose
from sdbuild.measure import Candidate, EnergyMeter, measure, measure_group
from sdbuild.stats import distinguishable, median_interval, min_samples, paired_speedup


# ---------------------------------------------------------------------------------------------
# Paired intervals


def test_known_inputs_give_the_known_interval():
    # ratios 1..10: the exact 95 % interval of a median of 10 is [x(2), x(9)], coverage 1 - 2*11/1024
    reference = [2.0 * r for r in range(1, 11)]
    candidate = [2.0] * 10
    s = paired_speedup(reference, candidate)
    assert (s.median, s.low, s.high, s.n) == (5.5, 2.0, 9.0, 10)
    assert s.confidence == pytest.approx(1 - 22 / 1024)
    # 20 values: [x(6), x(15)], coverage 1 - 2 * P(B(20, 1/2) <= 5)
    s = median_interval(list(range(1, 21)))
    assert (s.low, s.high) == (6.0, 15.0)
    assert s.confidence == pytest.approx(1 - 2 * sum(math.comb(20, i) for i in range(6)) / 2 ** 20)


def test_fewer_than_six_pairs_have_no_95_percent_interval():
    assert min_samples() == 6
    five = paired_speedup([2.0] * 5, [1.0] * 5)  # twice as fast every time, but only 5 calls
    assert five.median == 2.0 and five.low is None and not distinguishable(five)
    six = paired_speedup([2.0] * 6, [1.0] * 6)
    assert six.low == 2.0 and distinguishable(six) and not distinguishable(six, min_gain=1.0)


def test_identical_a_and_b_never_yield_a_kept_lever():
    runs = [0.31, 0.29, 0.35, 0.30, 0.33, 0.28, 0.32, 0.30]
    assert not distinguishable(paired_speedup(runs, list(runs)))
    # the same distribution for both, 400 seeded draws: the one-sided false-keep rate of a 95 %
    # interval is at most 2.5 %
    rng = random.Random(0)
    kept = sum(distinguishable(paired_speedup([rng.gauss(1, 0.1) for _ in range(12)],
                                              [rng.gauss(1, 0.1) for _ in range(12)])) for _ in range(400))
    assert kept / 400 <= 0.05
    # and through the ladder's rule: identical rows of one group stay "not distinguishable"
    inc, same = _paired_rows(runs, runs)
    kept_m, trials = choose(inc, [inc, same], Bounds(noise=NoiseRule.paired, psnr_db=None))
    assert kept_m is inc
    assert trials[1].verdict == Verdict.within_noise and "not distinguishable from noise at 8 calls" in trials[1].reason


def _paired_rows(reference_runs, candidate_runs, busy=False, group="g1"):
    from sdbuild import results

    def row(key, runs, paired=None):
        return {"status": "ok", "latency_s": results.latency_stats(runs), "peak_memory_mb": 100.0,
                "measurement": {"mode": "interleaved", "group": group}, "paired": paired,
                "machine_load": {"busy": busy}}

    s = paired_speedup(reference_runs, candidate_runs)
    inc = Measured({"axis": "a"}, ["axis=a"], "a", row=row("a", reference_runs), psnr_db=math.inf, ssim=1.0)
    cand = Measured({"axis": "b"}, ["axis=b"], "b", row=row("b", candidate_runs, {**s.to_dict(), "reference": "a"}),
                    psnr_db=math.inf, ssim=1.0)
    return inc, cand


def test_paired_rule_keeps_a_lever_only_above_one_plus_min_gain():
    ref = [1.0, 1.1, 0.9, 1.2, 1.0, 1.05, 0.95, 1.0]
    inc, cand = _paired_rows(ref, [r / 1.3 for r in ref])  # 30 % faster in every pair
    kept, trials = choose(inc, [inc, cand], Bounds(noise=NoiseRule.paired))
    assert kept is cand and "paired speed-up x1.30" in trials[1].reason
    kept, _ = choose(inc, [inc, cand], Bounds(noise=NoiseRule.paired, min_gain=0.5))
    assert kept is inc
    # the same rows, but not from one group: no pairs, never kept
    cand.row["measurement"]["group"] = "another"
    assert choose(inc, [inc, cand], Bounds(noise=NoiseRule.paired))[0] is inc


def _drifting_pair(gain: float, noise: float, seed: int, calls: int = 12):
    """Paired calls of a reference and a lever `gain` times faster, on a machine whose load doubles
    over the calls, each call with its own +-noise."""
    rng = random.Random(seed)
    drift = [1 + i / (calls - 1) for i in range(calls)]
    reference = [0.1 * d * (1 + rng.uniform(-noise, noise)) for d in drift]
    candidate = [0.1 / gain * d * (1 + rng.uniform(-noise, noise)) for d in drift]
    return reference, candidate


def test_the_paired_ladder_refuses_a_lever_whose_median_says_faster_but_whose_interval_includes_one():
    """The case the paired rule exists for: a lever 2.5 % faster in 10 % noise, 12 pairs on a drifting
    machine. Its median paired ratio is above 1, its 95 % interval includes 1.0: not kept."""
    ref, cand = _drifting_pair(1.025, 0.10, seed=1)
    s = paired_speedup(ref, cand)
    assert s.median > 1.0 and s.low < 1.0 < s.high  # the case itself (seeded)
    inc, lever = _paired_rows(ref, cand)
    kept, trials = choose(inc, [inc, lever], Bounds(noise=NoiseRule.paired, psnr_db=None))
    assert kept is inc, trials[1].reason
    assert trials[1].verdict == Verdict.within_noise and "not distinguishable from noise at 12 calls" in trials[1].reason
    # and over 200 seeded groups of a lever that is no faster at all, the ladder keeps at most 5 %
    # (a rule on the median alone keeps about half)
    kept_count = 0
    for seed in range(200):
        inc, lever = _paired_rows(*_drifting_pair(1.0, 0.10, seed=seed))
        kept_count += choose(inc, [inc, lever], Bounds(noise=NoiseRule.paired, psnr_db=None))[0] is lever
    assert kept_count <= 10, kept_count


# ---------------------------------------------------------------------------------------------
# Interleaved measurement against drift


class Load:
    """The machine's load, changing between phases: call n of all pipelines sees `factors[phase]`."""

    def __init__(self, heavy_calls: int, heavy: float) -> None:
        self.calls, self.heavy_calls, self.heavy = 0, heavy_calls, heavy

    def factor(self) -> float:
        self.calls += 1
        return self.heavy if self.calls <= self.heavy_calls else 1.0


class SleepPipeline:
    """A synthetic pipeline whose call takes base_s x the load's factor x a seeded noise."""

    def __init__(self, base_s: float, load: Load | None = None, noise: float = 0.0, seed: int = 0) -> None:
        self.base_s, self.load, self.noise, self.rng = base_s, load, noise, random.Random(seed)

    def __call__(self, **kwargs):
        factor = self.load.factor() if self.load else 1.0
        time.sleep(self.base_s * factor * (1 + self.rng.uniform(-self.noise, self.noise)))
        return type("Out", (), {"images": np.zeros((1, 4, 4, 3))})()


def test_drift_fools_sequential_measurement_but_not_interleaved():
    """fast is truly 25 % faster than slow. The machine is 3x busier for the first 8 calls: timed one
    after another, fast (measured first) looks slower; alternated, the pairs see the same load."""
    fast_s, slow_s, repeats = 0.020, 0.025, 6
    load = Load(heavy_calls=8, heavy=3.0)
    fast, slow = SleepPipeline(fast_s, load), SleepPipeline(slow_s, load)
    a = measure(fast, dict, "cpu", warmup=1, repeats=repeats, show_progress=False)
    b = measure(slow, dict, "cpu", warmup=1, repeats=repeats, show_progress=False)
    sequential_winner = "fast" if a.latency()["median"] < b.latency()["median"] else "slow"
    assert sequential_winner == "slow"  # the drift, not the pipeline, decided

    load = Load(heavy_calls=8, heavy=3.0)
    fast, slow = SleepPipeline(fast_s, load), SleepPipeline(slow_s, load)
    # the same order (fast first, in the busy phase), alternated: slow's paired speed-up on fast
    group = measure_group([Candidate(fast, dict, "fast"), Candidate(slow, dict, "slow")], "cpu", warmup=1,
                          repeats=repeats, show_progress=False)
    assert group.interleaved and group.rounds == repeats
    s = paired_speedup(group.measurements[0].runs_s, group.measurements[1].runs_s)
    interleaved_winner = "slow" if distinguishable(s) else "fast"
    assert interleaved_winner == "fast" and s.high < 1.0  # slow is slower beyond noise
    assert s.median == pytest.approx(fast_s / slow_s, rel=0.15)


def test_repeats_auto_keeps_a_20_percent_gain_with_3_percent_noise_within_its_cap():
    slow = SleepPipeline(0.050, noise=0.03, seed=1)
    fast = SleepPipeline(0.050 / 1.2, noise=0.03, seed=2)
    cap = 60.0
    began = time.perf_counter()
    group = measure_group([Candidate(slow, dict), Candidate(fast, dict)], "cpu", warmup=1, repeats=None,
                          show_progress=False, interval_target=0.03, max_measure_s=cap)
    assert time.perf_counter() - began < cap
    assert "within" in group.stop_reason and "max_measure_s" not in group.stop_reason, group.stop_reason
    s = paired_speedup(group.measurements[0].runs_s, group.measurements[1].runs_s)
    assert group.rounds >= min_samples() and s.n == group.rounds
    assert s.relative_half_width() <= 0.03 and distinguishable(s) and s.median == pytest.approx(1.2, rel=0.1)


class Bounded(SleepPipeline):
    """A SleepPipeline that raises once it has been called for `limit_s`: a measurement that ignores
    its time cap fails in seconds instead of running on toward 10,000 calls."""

    def __init__(self, *args, limit_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limit_s, self.began = limit_s, None

    def __call__(self, **kwargs):
        self.began = self.began or time.perf_counter()
        if time.perf_counter() - self.began > self.limit_s:
            raise AssertionError(f"still called after {self.limit_s} s: the time cap did not stop the measurement")
        return super().__call__(**kwargs)


def test_repeats_auto_stops_at_its_time_cap_and_says_so():
    one = Bounded(0.01, noise=0.9, seed=3, limit_s=5.0)  # far too noisy for +-0.1 %
    m = measure(one, dict, "cpu", warmup=0, repeats=None, show_progress=False, interval_target=0.001,
                max_measure_s=0.3)
    assert "max_measure_s=0.3" in m.stop_reason and len(m.runs_s) >= 3
    # never cut before an interval can exist: the fewest calls that give one, even past the cap
    # (3 calls of 10 ms already pass a 20 ms cap)
    one = Bounded(0.01, noise=0.9, seed=3, limit_s=5.0)
    short = measure(one, dict, "cpu", warmup=0, repeats=None, show_progress=False, interval_target=0.001,
                    max_measure_s=0.02)
    assert len(short.runs_s) == min_samples() and median_interval(short.runs_s).low is not None


def test_a_failing_candidate_leaves_the_group_and_the_others_go_on():
    class Fails(SleepPipeline):
        def __call__(self, **kwargs):
            raise RuntimeError("boom")

    group = measure_group([Candidate(SleepPipeline(0.001), dict), Candidate(Fails(0.001), dict)], "cpu", warmup=1,
                          repeats=3, show_progress=False, catch_errors=True)
    assert list(group.failures) == [1] and "boom" in str(group.failures[1][0])
    assert len(group.measurements[0].runs_s) == 3


# ---------------------------------------------------------------------------------------------
# Threads and energy on the tiny model


def test_run_threads_reaches_torch_and_the_row(tmp_path):
    """In a process of its own: torch's inter-op thread count cannot be set back once parallel work
    has started, so a job with run.threads=1 here would change every later test's environment."""
    code = f"""
import json, torch, sdbuild
default = torch.get_num_threads()
one = sdbuild.run(sdbuild.compose(["run.steps=2", "run.warmup=0", "run.repeats=1", "run.threads=1"]), {str(tmp_path / "one")!r})
threads_after_one = torch.get_num_threads()
auto = sdbuild.run(sdbuild.compose(["run.steps=2", "run.warmup=0", "run.repeats=1"]), {str(tmp_path / "auto")!r})
print(json.dumps(dict(default=default, one=one, after_one=threads_after_one, auto=auto, after_auto=torch.get_num_threads())))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    row = got["one"]
    assert row["status"] == "ok", row["error"]
    assert got["after_one"] == 1  # set in the process where the job ran
    assert row["env"]["torch_threads"] == 1 and row["measurement"]["threads"]["torch_threads"] == 1
    assert row["spec"]["run"]["threads"] == 1
    energy = row["energy"]
    assert (energy["joules_per_image"] is None and energy["reason"]) or \
           (energy["joules_per_image"] > 0 and energy["source"])
    # auto: torch's own default again
    assert got["after_auto"] == got["auto"]["env"]["torch_threads"] == got["default"]


def test_a_single_run_on_a_busy_cpu_is_told_to_try_one_thread(tmp_path):
    """A real busy machine: a spinning process runs beside the job for its whole length."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = run_cli("run.steps=2", "run.warmup=0", "run.repeats=1", "run.threads=2", f"hydra.run.dir={tmp_path}")
    finally:
        spinner.kill()
        spinner.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((tmp_path / "result.json").read_text())
    assert row["machine_load"]["busy"] and row["env"]["torch_threads"] == 2
    assert "note: busy CPU and every row ran 2+ torch threads" in done.stdout
    assert "sweep run.threads=auto,1" in done.stdout


def test_rapl_counters_are_read_and_their_wrap_handled(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core), not counted twice
    meter = EnergyMeter("cpu", rapl_root=tmp_path)
    assert meter.source.startswith("rapl") and meter.read() == 0.0
    (zone / "energy_uj").write_text("4000\n")  # wrapped: 1001 uJ to the top, then 4000
    assert meter.read() == pytest.approx(5001 / 1e6)
    missing = EnergyMeter("cpu", rapl_root=tmp_path / "nothing")
    assert missing.read() is None and "no RAPL" in missing.reason


# ---------------------------------------------------------------------------------------------
# The busy flag in the ladder's outputs


def _ladder(busy: bool, interleaved: bool):
    from hydra_plugins.sdbuild_ladder._ladder import Step
    from hydra_plugins.sdbuild_ladder._render import Ladder

    ref = [1.0, 1.1, 0.9, 1.2, 1.0, 1.05, 0.95, 1.0]
    inc, cand = _paired_rows(ref, [r / 1.3 for r in ref], busy=busy)
    if not interleaved:
        for m in (inc, cand):
            m.row["measurement"], m.row["paired"] = {"mode": "single"}, None
    bounds = Bounds(noise=NoiseRule.paired if interleaved else NoiseRule.median, psnr_db=None)
    kept, trials = choose(inc, [inc, cand], bounds, Verdict.baseline)
    return Ladder(axes={"axis": ["a", "b"]}, order=["axis"], start={"axis": "a"}, fixed=[], bounds=bounds,
                  baseline=inc, steps=[Step("axis", inc, kept, trials)], second_pass=[], winner=kept, preset=None,
                  grid_size=2, launched=2, reused=0, launched_all_runs=2, recipes=2, wall_s=1.0,
                  interleaved=interleaved)


def test_ladder_markdown_html_and_preset_carry_the_busy_flag():
    from hydra_plugins.sdbuild_ladder._render import caution, preset_notes, render_html, render_markdown

    busy = _ladder(busy=True, interleaved=False)
    md, page, notes = render_markdown(busy), render_html(busy), preset_notes(busy)
    for text in (md, page, notes):
        assert "2 of 2 rows measured on a busy machine" in text
        assert "decided on busy, non-interleaved rows" in text
    assert "| busy |" in md or "| busy, " in md

    paired = _ladder(busy=True, interleaved=True)  # busy, but its pairs saw the same load: no caution
    assert caution(paired) is None and "busy machine" in preset_notes(paired)
    assert "x1.30 (1.30–1.30, 8 pairs)" in render_markdown(paired)

    quiet = _ladder(busy=False, interleaved=False)
    assert caution(quiet) is None and "quiet: no row was busy or noisy" in render_markdown(quiet)


def test_a_busy_cpu_with_several_threads_per_row_is_told_to_sweep_run_threads():
    from types import SimpleNamespace

    from hydra_plugins.sdbuild_ladder._render import preset_notes, render_html, render_markdown
    from sdbuild.report.render import machine_lines

    def with_env(ladder, device="cpu", threads=(2, 2)):
        for m, n in zip((ladder.baseline, ladder.steps[0].trials[1].m), threads):
            m.row["env"] = {"device": device, "torch_threads": n}
        return ladder

    advice = "sweep run.threads=auto,1"
    busy = with_env(_ladder(busy=True, interleaved=True))
    for text in (render_markdown(busy), render_html(busy), preset_notes(busy)):
        assert advice in text and "every row ran 2+ torch threads" in text
    rows = [busy.baseline.row, busy.steps[0].trials[1].m.row]
    assert any(advice in text for _, text in machine_lines(SimpleNamespace(readable=rows)))
    # not said: a quiet machine, a row at 1 thread (threads already looked at), a GPU
    for ladder in (with_env(_ladder(busy=False, interleaved=True)),
                   with_env(_ladder(busy=True, interleaved=True), threads=(2, 1)),
                   with_env(_ladder(busy=True, interleaved=True), device="cuda")):
        assert advice not in render_markdown(ladder) and advice not in preset_notes(ladder)


# ---------------------------------------------------------------------------------------------
# The interleaved ladder, end to end on the tiny model


def test_interleaved_ladder_pairs_its_rows_and_falls_back_to_pairs_past_max_held(tmp_path):
    """3 attention options, at most 2 pipelines held: sdpa is alternated with the current recipe in
    the group, sliced in a pair of its own. 3 calls give no 95 % interval, so nothing is kept."""
    proc = run_cli("--multirun", "hydra/sweeper=ladder", "hydra.sweeper.interleave=true", "hydra.sweeper.max_held=2",
                   "run.steps=2", "run.warmup=1", "run.repeats=3", "attention=classic,sdpa,sliced",
                   f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/result.json")}
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows.values())
    by_attention = {r["choices"]["attention"]: r for r in rows.values()}
    classic, sdpa, sliced = (by_attention[k] for k in ("classic", "sdpa", "sliced"))
    assert {r["measurement"]["group"] for r in rows.values()} == {classic["measurement"]["group"]}
    assert classic["measurement"]["mode"] == sdpa["measurement"]["mode"] == "interleaved"
    assert sliced["measurement"]["mode"] == "pairs" and "max_held=2" in sliced["measurement"]["fallback"]
    for r in (sdpa, sliced):
        assert r["paired"]["reference"] == classic["spec_key"] and r["paired"]["n"] == 3
        assert r["paired"]["low"] is None  # 3 pairs: no 95 % interval
    ladder = json.loads((tmp_path / "ladder.json").read_text())
    assert ladder["interleaved"] and ladder["bounds"]["noise"] == "paired"
    assert ladder["winner"]["choices"]["attention"] == "classic"
    md = (tmp_path / "ladder.md").read_text()
    assert md.count("not distinguishable from noise at 3 calls") == 2


def test_interleaved_grid_sweep_pairs_every_row_with_the_first_and_reports_it(tmp_path):
    """`hydra/sweeper=interleaved` over run.threads=1,2: one group, each row with its own thread
    count (set again before each of its calls), the second paired on the first, in report and csv."""
    proc = run_cli("--multirun", "hydra/sweeper=interleaved", "run.steps=2", "run.warmup=1", "run.repeats=6",
                   "run.threads=1,2", f"hydra.sweep.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / str(n) / "result.json").read_text()) for n in (0, 1)]
    assert [r["measurement"]["threads"]["torch_threads"] for r in rows] == [1, 2]
    assert [r["measurement"]["mode"] for r in rows] == ["interleaved"] * 2
    assert rows[0]["measurement"]["group"] == rows[1]["measurement"]["group"]
    assert rows[0]["paired"] is None and rows[1]["paired"]["reference"] == rows[0]["spec_key"]
    assert rows[1]["paired"]["n"] == 6 and rows[1]["paired"]["low"] is not None
    report = (tmp_path / "report.md").read_text()
    assert "paired speed-up (95% interval)" in report and "6 pairs) on job 0" in report
    page = (tmp_path / "index.html").read_text()
    assert "paired speed-up (95% interval)</th>" in page and "6 pairs) on job 0" in page
    csv_text = (tmp_path / "results.csv").read_text()
    assert "paired_speedup" in csv_text.splitlines()[0] and "energy_j_per_image" in csv_text.splitlines()[0]


def test_new_run_fields_at_their_defaults_keep_older_rows_spec_keys():
    from sdbuild.spec import spec_key, spec_to_dict

    new = spec_to_dict(sdbuild.compose(["run.steps=2"]))
    old = json.loads(json.dumps(new))
    for name in ("threads", "interval_target", "max_measure_s"):  # a row written before these fields existed
        del old["run"][name]
    assert spec_key(new) == spec_key(old)
    assert spec_key(spec_to_dict(sdbuild.compose(["run.steps=2", "run.threads=1"]))) != spec_key(new)


def test_later_groups_and_fields_off_keep_older_rows_spec_keys():
    """The cache group, attention.backend and memory.layerwise_fp8 came after rows were recorded: off,
    they build what those rows built, so resume still finds them; on, the key changes. inference_mode
    is not such a field (older rows ran without it)."""
    from sdbuild.spec import spec_key, spec_to_dict

    base = ["run.steps=2", "run.inference_mode=false"]
    new = spec_to_dict(sdbuild.compose(base))
    old = json.loads(json.dumps(new))
    del old["cache"], old["attention"]["backend"], old["memory"]["layerwise_fp8"], old["run"]["inference_mode"]
    assert spec_key(new) != spec_key(old)  # inference_mode=false is recorded: it was not there before
    del new["run"]["inference_mode"]
    assert spec_key(new) == spec_key(old)
    for on in ("cache=deepcache", "memory=layerwise_fp8"):
        assert spec_key(spec_to_dict(sdbuild.compose([*base, on]))) != spec_key(spec_to_dict(sdbuild.compose(base))), on


def test_paired_noise_rule_without_interleaving_is_refused_before_any_job(tmp_path):
    out = run_cli("--multirun", "hydra/sweeper=ladder", "hydra.sweeper.noise=paired", "run.steps=2",
                  "attention=classic,sdpa", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "hydra.sweeper.noise=paired needs paired calls: add hydra.sweeper.interleave=true" in out.stderr
    assert not list(tmp_path.glob("*/result.json"))


# ---------------------------------------------------------------------------------------------
# What is in effect inside an interleaved member's call (read back from torch, not from the spec)

_GROUP_PROBE = r"""
import json, sys, torch, sdbuild, sdbuild.builder
from pathlib import Path
from sdbuild.interleave import Member, run_group

out, seen = Path(sys.argv[1]), []
real_build = sdbuild.builder.build_pipeline

def build_pipeline(spec, device, **kwargs):  # the real build; a hook on its denoiser reads torch's state per call
    pipe, info = real_build(spec, device, **kwargs)
    name = "threads=%s tf32=%s inference_mode=%s" % (spec.run.threads, spec.precision.tf32, spec.run.inference_mode)
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(dict(
        member=name, threads=torch.get_num_threads(), precision=torch.get_float32_matmul_precision(),
        tf32=torch.backends.cuda.matmul.allow_tf32, inference=torch.is_inference_mode_enabled())))
    return pipe, info

sdbuild.builder.build_pipeline = build_pipeline
members = []
for i, extra in enumerate(sys.argv[2:]):
    overrides = ["run.steps=1", "run.warmup=1", "run.repeats=6", "run.save_image=false", *extra.split()]
    members.append(Member(sdbuild.compose(overrides), out / str(i), {}, overrides))
rows = run_group(members)
print(json.dumps(dict(seen=seen, rows=[dict(status=r["status"], error=r.get("error"),
                                            inference_mode=r["spec"]["run"]["inference_mode"]) for r in rows])))
"""


def _probe_group(tmp_path, *members: str):
    done = subprocess.run([sys.executable, "-c", _GROUP_PROBE, str(tmp_path), *members], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r["status"] == "ok" for r in got["rows"]), got["rows"]
    return got


def test_each_interleaved_members_calls_run_under_its_own_threads_tf32_and_inference_mode(tmp_path):
    """In a process of its own (run.threads changes torch's inter-op threads for good). Two members
    whose threads and TF32 differ, built one after the other (so the second's build set its values
    last): call by call, inside the denoiser, each member's own values are in effect, and every call
    runs under torch.inference_mode, as a single job's calls do (run.inference_mode=true)."""
    got = _probe_group(tmp_path, "run.threads=1 precision.tf32=false", "run.threads=2 precision.tf32=true")
    seen = got["seen"]
    by_member = {m: [s for s in seen if s["member"] == m] for m in {s["member"] for s in seen}}
    assert len(by_member) == 2 and all(len(calls) >= 7 for calls in by_member.values()), by_member.keys()
    # the members alternated (so a member's values had to be set again before its call)
    assert any(a["member"] != b["member"] for a, b in zip(seen, seen[1:]))
    for s in seen:
        if s["member"].startswith("threads=1"):
            assert (s["threads"], s["tf32"], s["precision"]) == (1, False, "highest"), s
        else:
            assert (s["threads"], s["tf32"], s["precision"]) == (2, True, "high"), s
        assert s["inference"] is True, s
    assert all(r["inference_mode"] is True for r in got["rows"])


# ---------------------------------------------------------------------------------------------
# The busy flag's two halves, each on its own


def test_the_busy_flag_sees_another_running_process_with_a_quiet_load_average():
    """The process half alone: a real spinning process is counted (state R in /proc) and makes the
    machine busy even when the load average says quiet (it lags by a minute)."""
    from sdbuild import results

    quiet = {"loadavg_1m": 0.0, "cpu_count": 2, "busy_processes": 0}
    assert not results.is_busy(quiet)
    assert results.is_busy({**quiet, "busy_processes": 1})
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline, counted = time.monotonic() + 5, 0
        while time.monotonic() < deadline and not counted:  # the spinner runs once it has started
            time.sleep(0.1)
            counted = results.machine_load()["busy_processes"]
        snapshot = {**results.machine_load(), "loadavg_1m": 0.0}  # the load average ruled out
    finally:
        spinner.kill()
        spinner.wait()
    assert counted >= 1
    assert results.is_busy(snapshot), snapshot


def test_the_busy_flag_sees_a_high_load_average_with_no_other_process_running():
    """The load half alone: no other process running, the load average above one per CPU."""
    from sdbuild import results

    none_running = {"cpu_count": 2, "busy_processes": 0}
    assert results.is_busy({**none_running, "loadavg_1m": 2.5})
    assert not results.is_busy({**none_running, "loadavg_1m": 1.5})
    assert not results.is_busy({**none_running, "loadavg_1m": None, "busy_processes": None})  # off Linux
    assert results.load_record({**none_running, "loadavg_1m": 0.1}, {**none_running, "loadavg_1m": 4.0})["busy"]


def test_a_cpu_hog_that_runs_only_during_the_timed_calls_makes_the_row_busy(tmp_path, monkeypatch):
    """A real spinning process started when the first timed call begins and ended (waited for) within
    the last one: the snapshots before and after the job cannot see it; what other processes used
    during the calls (`machine_load.during`, the kernel's CPU counters) does, and the row is busy."""
    from sdbuild import builder, results
    from sdbuild.config import compose
    from sdbuild.job import run_job

    steps, repeats = 4, 5
    real_build, calls, hog = builder.build_pipeline, [], {}

    def build_with_a_hog_during_the_calls(*args, **kwargs):
        pipe, info = real_build(*args, **kwargs)

        def start(module, inputs):
            calls.append(1)
            if len(calls) == steps + 1:  # the first UNet step of the first timed call (warmup: 1 call)
                hog["p"] = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.3)  # the hog spins beside the calls, not only beside its own start-up

        def stop(module, inputs, output):
            if len(calls) == steps * (1 + repeats):  # the last UNet step of the last timed call
                hog["p"].kill()
                hog["p"].wait()

        pipe.unet.register_forward_pre_hook(start)
        pipe.unet.register_forward_hook(stop)
        return pipe, info

    monkeypatch.setattr(builder, "build_pipeline", build_with_a_hog_during_the_calls)
    overrides = [f"run.steps={steps}", "run.warmup=1", f"run.repeats={repeats}", "run.threads=1", "run.timeout_s=0"]
    try:
        row = run_job(compose(overrides), tmp_path, {}, overrides, job={"num": 0})
    finally:
        if "p" in hog and hog["p"].poll() is None:
            hog["p"].kill()
    assert row["status"] == "ok", row["error"]
    assert len(calls) == steps * (1 + repeats) and hog["p"].returncode is not None  # it ran, and ended in the calls
    during = row["machine_load"]["during"]
    assert during["busy"] and during["others_cpu"] >= results.BUSY_DURING_CPU, during
    assert during["seconds"] <= row["job"]["wall_s"] and row["machine_load"]["busy"]
    assert results.is_busy_row(results.read_row(tmp_path / "result.json"))
