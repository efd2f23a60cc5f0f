"""Faults and bad inputs (issue 18): nothing finished is lost, no job hangs a sweep, no spec value is
evaluated, one owner per sweep folder. Each test reproduces one fault on the tiny model."""

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, ROOT, run_cli

import sdbuild
from sdbuild import results
from sdbuild.errors import SpecError

QUICK = ["run.steps=2", "run.warmup=0", "run.repeats=1"]  # FAST without run.timeout_s: the sweep default


def rows(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(sweep_dir).glob("*/result.json") if p.is_file()}


def csv_rows(sweep_dir):
    with open(Path(sweep_dir) / "results.csv") as f:
        return {r["job"]: r for r in csv.DictReader(f)}


def measured_row(folder, overrides, latency):
    """An `ok` row with its image, as an earlier sweep leaves it, for the spec these overrides compose."""
    from sdbuild.spec import spec_key, spec_to_dict

    spec = spec_to_dict(sdbuild.compose([*FAST, *overrides]))
    folder.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(len(str(folder))).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        folder / results.IMAGE_FILE)
    row = results.new_row(status="ok", choices={}, overrides=[*FAST, *overrides], spec=spec, spec_key=spec_key(spec),
                          job={"num": int(folder.name)}, latency_s=results.latency_stats(latency),
                          image=results.IMAGE_FILE)
    results.write_row(folder, row)
    return row


# 1. Resume in place ------------------------------------------------------------------------------


def test_resume_in_place_with_shifted_job_numbers_keeps_every_finished_row(tmp_path):
    """seed=1,2 measured as jobs 0 and 1; seed=0,1,2 resumed into the same folder shifts them to jobs
    1 and 2: job 0 (seed=0) must not delete seed=1's row, and both are reused, not measured again."""
    sweep_dir = tmp_path / "sweep"
    seed1 = measured_row(sweep_dir / "0", ["run.seed=1"], [0.51, 0.52, 0.53])
    seed2 = measured_row(sweep_dir / "1", ["run.seed=2"], [0.61, 0.62, 0.63])
    out = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", *FAST, "run.seed=0,1,2", f"resume={sweep_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    final = {r["spec"]["run"]["seed"]: r for r in rows(sweep_dir).values()}
    assert final[0]["reused_from"] is None and final[0]["status"] == "ok"  # measured
    for seed, old in ((1, seed1), (2, seed2)):  # reused by spec key, the measurement untouched
        assert final[seed]["reused_from"] and final[seed]["latency_s"]["runs"] == old["latency_s"]["runs"], seed
    set_aside = sorted(p.parent.name for p in sweep_dir.glob(f"*/{results.SET_ASIDE_DIR}/*/result.json"))
    assert set_aside == sorted([seed1["spec_key"], seed2["spec_key"]])  # moved, never deleted
    assert {r["run.seed"] for r in csv_rows(sweep_dir).values()} == {"0", "1", "2"}


def test_make_room_clears_only_a_failed_row_of_the_same_spec(tmp_path):
    folder = tmp_path / "0"
    old = measured_row(folder, ["run.seed=5"], [0.5])
    results.make_room(folder, old["spec_key"])  # even this spec's measured row is kept
    assert not (folder / "result.json").exists()
    assert results.read_row(folder / "set_aside" / old["spec_key"] / "result.json")["latency_s"]["runs"] == [0.5]
    results.write_row(folder, {**old, "status": "failed", "latency_s": None, "error": "x"})
    results.make_room(folder, old["spec_key"])
    assert not (folder / "result.json").exists() and len(list((folder / "set_aside").iterdir())) == 1


# 2. A job that cannot record its row -------------------------------------------------------------


def test_a_folder_that_cannot_take_its_row_gives_a_failed_row_and_the_report(tmp_path):
    """`result.json` is a directory in job 0's folder (a full disk fails the same write): job 0 ends in a
    `failed` row saying why, job 1 runs, the report is written and the lock released. Default sweep
    settings: each job in a child process (run.timeout_s's default)."""
    (tmp_path / "0" / "result.json").mkdir(parents=True)
    out = run_cli("--multirun", f"hydra.sweep.dir={tmp_path}", *QUICK, "run.seed=1,2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "could not record the job" in out.stdout and "Traceback" not in out.stderr
    table = csv_rows(tmp_path)
    assert table["0"]["status"] == "failed" and "could not record the job" in table["0"]["error"]
    assert table["1"]["status"] == "ok"
    one = rows(tmp_path)["1"]
    assert one["job"]["isolated"] and one["job"]["timeout_s"] == 4 * 3600  # the default limit, in a child
    assert not (tmp_path / results.LOCK_FILE).exists()


def test_run_job_returns_a_row_instead_of_raising_when_the_folder_cannot_take_it(tmp_path):
    from sdbuild.job import run_job

    (tmp_path / "result.json").mkdir()
    row = run_job(sdbuild.compose(QUICK), tmp_path, {}, list(QUICK), job={"num": 3})
    assert row["status"] == "failed" and row["job"]["unwritten"].startswith("IsADirectoryError")
    assert "it was measured" in row["error"] and len(row["latency_s"]["runs"]) == 1  # the timing is not lost


# 3. Floats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_before_anything_loads(value, tmp_path):
    from sdbuild.validate import validate

    spec = sdbuild.compose([*QUICK, f"run.guidance_scale={value}"])
    with pytest.raises(SpecError, match=r"run.guidance_scale=.*must be a finite number"):
        validate(spec)
    row = sdbuild.run(spec, tmp_path)
    assert row["status"] == "unsupported" and "finite" in row["error"]
    assert "NaN" not in (tmp_path / "result.json").read_text()


# 4. Time limit -----------------------------------------------------------------------------------


def test_sweep_timeout_default_and_off(monkeypatch):
    from sdbuild.job import SWEEP_TIMEOUT_S, sweep_timeout

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert sweep_timeout(sdbuild.compose(QUICK)) == SWEEP_TIMEOUT_S >= 3600
    assert sweep_timeout(sdbuild.compose([*QUICK, "run.timeout_s=0"])) is None
    assert sweep_timeout(sdbuild.compose([*QUICK, "run.timeout_s=12.5"])) == 12.5
    for refused in ("-1", "nan"):  # no limit to wait on: the job is refused in-process, before anything loads
        assert sweep_timeout(sdbuild.compose([*QUICK, f"run.timeout_s={refused}"])) is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # the launcher has its own limit (timeout_min)
    assert sweep_timeout(sdbuild.compose(QUICK)) is None
    with pytest.raises(SpecError, match="run.timeout_s"):
        sdbuild.show(sdbuild.compose([*QUICK, "run.timeout_s=-1"]))


def test_a_job_past_its_time_limit_ends_in_a_failed_row(tmp_path):
    """The parent's side of a time limit: the job's process is ended at the limit (here still starting
    up, or measuring) and the job comes back as a row, never as an exception or a hang."""
    from sdbuild.job import run_in_fresh_process

    overrides = [*QUICK, "run.repeats=150"]  # minutes of timed runs (bounded, should the limit not work)
    started = time.monotonic()
    row = run_in_fresh_process(sdbuild.compose(overrides), overrides, tmp_path, {}, {"num": 0}, timeout_s=5)
    assert time.monotonic() - started < 5 + 30 + 20  # the limit, the grace, slack for a loaded machine
    assert row["status"] == "failed" and row["error"].startswith("timed out after 5 s (run.timeout_s)"), row["error"]
    assert row["job"]["timed_out"] and row["job"]["timeout_s"] == 5
    assert results.read_row(tmp_path / "result.json")["error"] == row["error"]
    assert not _processes_mentioning(str(tmp_path))  # the child is gone


def _processes_mentioning(text):
    """Pids whose command line holds `text` (Linux /proc; empty elsewhere)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow  # 90 s at least: a limit that the short job surely meets on a loaded machine
def test_a_job_past_its_time_limit_is_a_failed_row_and_the_sweep_goes_on(tmp_path):
    """Job 0 would run for a day (100000 timed runs); run.timeout_s ends it, keeping the timed runs it
    finished; job 1 still runs, the report is written."""
    started = time.monotonic()
    out = run_cli("--multirun", f"hydra.sweep.dir={tmp_path}", "run.warmup=0", "run.steps=2",
                  "run.repeats=100000,1", "run.timeout_s=90", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.monotonic() - started < 400
    found = rows(tmp_path)
    assert found["0"]["status"] == "failed" and found["0"]["error"].startswith("timed out after 90 s"), found["0"]["error"]
    assert found["0"]["job"]["timed_out"] and found["0"]["job"]["isolated"] and "interrupted" not in found["0"]["job"]
    assert found["0"]["latency_s"]["runs"] and "timed runs finished" in found["0"]["error"]
    assert found["1"]["status"] == "ok"
    assert csv_rows(tmp_path)["0"]["status"] == "failed"


def test_the_sweeps_worker_survives_no_hung_or_crashed_job_and_the_next_job_gets_a_fresh_one(tmp_path):
    """The default sweep's long-lived worker (`run_in_worker`), job after job as a sweep hands them over:
    job 0 is measured; job 1 hangs (100000 timed runs) and ends at its limit, counted from its hand-over,
    in a `failed`, timed-out row, its worker's whole process group gone; job 2 starts a fresh worker,
    which is killed by SIGKILL mid-job (a segfault, the OOM killer): a `failed` row with its spec; job 3
    starts a fresh worker again, and job 4 reuses it."""
    from sdbuild.job import close_worker, run_in_worker

    def job(num, *extra, timeout_s=600):
        overrides = [*QUICK, "run.threads=1", *extra]
        return run_in_worker(sdbuild.compose(overrides), overrides, tmp_path / str(num), {}, {"num": num},
                             timeout_s=timeout_s)

    try:
        first = job(0)
        started = time.monotonic()
        hung = job(1, "run.repeats=100000", timeout_s=8)
        took = time.monotonic() - started
        killer = threading.Timer(4.0, lambda: [os.kill(pid, signal.SIGKILL) for pid in
                                               _processes_mentioning(f"sdbuild.worker\0{tmp_path / '2'}\0")])
        killer.start()
        crashed = job(2, "run.repeats=100000")
        killer.join()
        fresh, reused = job(3), job(4)
    finally:
        close_worker()
    assert first["status"] == "ok" and first["job"]["worker"]["jobs_before"] == 0, first["error"]
    assert hung["status"] == "failed" and hung["error"].startswith("timed out after 8 s (run.timeout_s)"), hung["error"]
    assert hung["job"]["timed_out"] and took < 8 + 30 + 20, took  # the limit, the grace, slack for a loaded machine
    assert hung["job"]["worker"] == {"pid": first["job"]["worker"]["pid"], "jobs_before": 1, "replaced_after": "timed out"}
    assert not _alive([first["job"]["worker"]["pid"]])
    assert crashed["status"] == "failed" and "exited with code -9" in crashed["error"], crashed["error"]
    assert crashed["spec"]["run"]["repeats"] == 100000 and crashed["job"]["worker"]["jobs_before"] == 0
    assert crashed["job"]["worker"]["replaced_after"] == "it exited without an answer"
    assert fresh["status"] == reused["status"] == "ok", (fresh["error"], reused["error"])
    pids = [r["job"]["worker"]["pid"] for r in (first, crashed, fresh)]
    assert len(set(pids)) == 3 and reused["job"]["worker"] == {"pid": pids[2], "jobs_before": 1}
    assert results.read_row(tmp_path / "1" / "result.json")["job"]["worker"]["replaced_after"] == "timed out"
    assert not _alive(pids)  # close_worker ended the last one


def test_a_workers_whole_process_group_is_ended():
    """A worker's own children (Inductor's compile workers, a parallel job's ranks) go with it: SIGTERM
    to the group, SIGKILL after the grace to what ignores it, and whatever is left once it ended."""
    from sdbuild.job import end_child

    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen([sys.executable, '-c', {STUCK!r}], stdout=subprocess.PIPE, text=True); "
                               "assert p.stdout.readline().strip() == 'ready'; print(p.pid, flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, process_group=0)
    grandchild = int(leader.stdout.readline())
    try:
        code, _ = end_child(leader, grace_s=1, group=True)
        assert code == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive([grandchild]):
            time.sleep(0.1)
        assert not _alive([grandchild]), "the worker's child (SIGTERM blocked) outlived its group's end"
    finally:
        for pid in _alive([grandchild]):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_retires_after_a_job_that_leaves_state_a_later_job_must_not_inherit(monkeypatch):
    """sdbuild.worker.retire_reason, on the real process state: a failed job, an Inductor/AOTInductor
    compile, and each kind of process-wide change no build sets again retire the worker; a finished
    job that changed only what every build sets (TF32 flags, intra-op threads) does not."""
    import torch

    from sdbuild.levers.precision import set_global_switches
    from sdbuild.worker import process_state, retire_reason

    plain, ok = sdbuild.compose(QUICK), {"status": "ok"}
    set_global_switches(plain)  # the state a worker has when it starts a job (a build set it last)
    before = process_state()
    set_global_switches(sdbuild.compose([*QUICK, "precision=tf32"]))  # set again by every build
    torch.set_num_threads(1)
    try:
        assert retire_reason(plain, ok, before, process_state()) is None
        assert retire_reason(plain, {"status": "unsupported"}, before, process_state()) is None
    finally:
        set_global_switches(plain)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    assert "failed" in retire_reason(plain, {"status": "failed"}, before, before)
    for method in ("inductor", "export"):
        assert f"compile={method}" in retire_reason(sdbuild.compose([*QUICK, f"compile={method}"]), ok, before, before)
    assert retire_reason(sdbuild.compose([*QUICK, "compile=trace"]), ok, before, before) is None
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert "environment variable TORCHINDUCTOR_CACHE_DIR" in retire_reason(plain, ok, before, process_state())
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    for change, undo, named in (
            (lambda: torch.set_default_dtype(torch.float64), lambda: torch.set_default_dtype(torch.float32), "default dtype"),
            (lambda: torch.backends.cuda.enable_math_sdp(False), lambda: torch.backends.cuda.enable_math_sdp(True),
             "SDPA kernel switches"),
            (lambda: torch.use_deterministic_algorithms(True), lambda: torch.use_deterministic_algorithms(False),
             "deterministic algorithms")):
        change()
        try:
            reason = retire_reason(plain, ok, before, process_state())
        finally:
            undo()
        assert reason and named in reason, (named, reason)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: None)  # a global patch
    assert "torch.nn.functional.scaled_dot_product_attention replaced" in retire_reason(plain, ok, before, process_state())
    monkeypatch.undo()
    assert retire_reason(plain, ok, before, process_state()) is None


# 5. Ending a job ---------------------------------------------------------------------------------

STUCK = "import signal, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); print('ready', flush=True); time.sleep(120)"


def _stuck_child():
    """A process that cannot be ended by SIGTERM (blocked, as in native code that never returns to Python)."""
    child = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace():
    from sdbuild.job import end_child

    child = _stuck_child()
    started = time.monotonic()
    code, signame = end_child(child, grace_s=1)
    assert code == -signal.SIGKILL and signame is None and time.monotonic() - started < 20


def test_a_second_signal_during_the_grace_kills_the_child_at_once():
    from sdbuild.app import interrupts_as_exceptions
    from sdbuild.job import end_child

    child = _stuck_child()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    with interrupts_as_exceptions():
        timer.start()
        code, signame = end_child(child, grace_s=60)
    assert code == -signal.SIGKILL and signame == "SIGTERM" and time.monotonic() - started < 30


def test_an_interrupted_run_keeps_the_timed_runs_that_finished(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sdbuild", "run.steps=2", "run.warmup=0", "run.repeats=100000",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "__main__.log"
    deadline = time.time() + 300
    while time.time() < deadline and "run 3/100000" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    row = results.read_row(tmp_path / "result.json")
    assert row["status"] == "failed" and row["job"]["interrupted"] == "SIGTERM"
    assert len(row["latency_s"]["runs"]) >= 3 and "timed runs finished" in row["error"]


# 6. Interpolations -------------------------------------------------------------------------------


def test_a_resolver_in_a_spec_value_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBUILD_TEST_SECRET", "hunter2")
    team = tmp_path / "team" / "preset"
    team.mkdir(parents=True)
    (team / "leak.yaml").write_text("# @package _global_\nrun:\n  prompt: a ${oc.env:SDBUILD_TEST_SECRET} cat\n")
    with pytest.raises(SpecError, match=r"run.prompt=a \$\{oc.env:SDBUILD_TEST_SECRET\} cat: calls the resolver"):
        sdbuild.compose([f"hydra.searchpath=[file://{tmp_path / 'team'}]", "+preset=leak"])
    out = run_cli("run.prompt=${oc.env:SDBUILD_TEST_SECRET}", *FAST, f"hydra.run.dir={tmp_path / 'run'}",
                  env={"SDBUILD_TEST_SECRET": "hunter2"})
    assert out.returncode == 2 and "oc.env" in out.stderr and "hunter2" not in out.stderr + out.stdout
    assert not (tmp_path / "run" / "result.json").exists()
    # a reference to another spec value is data, and an escaped ${ is literal text
    spec = sdbuild.compose(["run.height=128", "run.width=${run.height}", "run.prompt=cost \\${oc.env:X}"])
    assert spec.run.width == 128 and spec.run.prompt == "cost ${oc.env:X}"


def test_a_recorded_spec_is_plain_data(monkeypatch):
    from sdbuild.spec import spec_to_dict, to_spec

    monkeypatch.setenv("SDBUILD_TEST_SECRET", "hunter2")
    recorded = spec_to_dict(sdbuild.compose(FAST))
    recorded["run"]["prompt"] = "a ${oc.env:SDBUILD_TEST_SECRET} \\${x} cat"
    recorded["run"]["negative_prompt"] = "${run.prompt}"
    spec = to_spec(recorded)
    assert spec.run.prompt == "a ${oc.env:SDBUILD_TEST_SECRET} \\${x} cat"
    assert spec.run.negative_prompt == "${run.prompt}"
    assert spec_to_dict(spec)["run"]["prompt"] == recorded["run"]["prompt"]


# 7. The sweep lock -------------------------------------------------------------------------------


def _contend(sweep_dir, barrier, owners):
    from sdbuild.sweep import SweepError, acquire_lock

    barrier.wait()
    try:
        acquire_lock(sweep_dir)
        owners.put(os.getpid())
    except SweepError:
        pass


def test_two_sweeps_starting_together_never_both_own_the_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(40):
        sweep_dir, barrier, owners = tmp_path / str(trial), ctx.Barrier(2), ctx.Queue()
        sweep_dir.mkdir()
        procs = [ctx.Process(target=_contend, args=(sweep_dir, barrier, owners)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        got = []
        while not owners.empty():
            got.append(owners.get())
        assert len(got) <= 1, f"trial {trial}: two owners {got}"


def test_an_empty_lock_file_is_not_taken_over(tmp_path, capsys):
    from sdbuild.sweep import SweepError, acquire_lock

    (tmp_path / results.LOCK_FILE).write_text("")  # what a starting sweep's lock may look like, a moment long
    with pytest.raises(SweepError):
        acquire_lock(tmp_path)
    assert "cannot be read" in capsys.readouterr().err and (tmp_path / results.LOCK_FILE).read_text() == ""


def _started(pid):
    """The process's start as the lock records it: boot id and start time in clock ticks (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}:{stat[stat.rfind(')') + 2:].split()[19]}"


def test_a_lock_is_taken_over_only_when_its_owner_is_known_dead(tmp_path, capsys):
    from sdbuild.sweep import SweepError, acquire_lock, release_lock

    process_start = _started
    host = os.uname().nodename
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / results.LOCK_FILE
        lock.write_text(json.dumps({"pid": other.pid, "host": host, "start": process_start(other.pid)}))
        with pytest.raises(SweepError):  # alive, and the very process that took it
            acquire_lock(tmp_path)
        assert f"process {other.pid}" in capsys.readouterr().err
        lock.write_text(json.dumps({"pid": other.pid, "host": host, "start": "another-boot:1"}))
        acquire_lock(tmp_path)  # the pid now runs another process: the owner is dead
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        release_lock(tmp_path)
        assert not lock.exists()
    finally:
        other.kill()
        other.wait()


# 8. Replay of a wrongly typed spec ---------------------------------------------------------------


@pytest.mark.parametrize("section,key,value", [("run", "steps", "many"), ("precision", "dtype", "fp64")])
def test_replay_of_a_wrongly_typed_spec_is_a_clear_refusal(section, key, value, tmp_path):
    from sdbuild.spec import spec_key, spec_to_dict

    spec = spec_to_dict(sdbuild.compose(FAST))
    spec[section][key] = value
    (tmp_path / "old").mkdir()
    results.write_row(tmp_path / "old", results.new_row(status="failed", spec=spec, spec_key=spec_key(spec)))
    out = subprocess.run([sys.executable, "-m", "sdbuild.replay", str(tmp_path / "old")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert f"{section}.{key}" in out.stderr and value in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()


# Weak spots: one clear line, nothing written where nothing should be ----------------------------


def test_an_unwritable_sweep_folder_and_an_unreadable_ladder_state_are_one_line_each(tmp_path):
    (tmp_path / "a-file").write_text("")
    out = run_cli("--multirun", *FAST, "run.seed=1,2", f"hydra.sweep.dir={tmp_path / 'a-file' / 'sweep'}")
    assert out.returncode == 2 and "cannot be written" in out.stderr and "Traceback" not in out.stderr

    sweep_dir = tmp_path / "ladder"
    sweep_dir.mkdir()
    (sweep_dir / "ladder_state.json").write_text('{"next_job": 3, "jo')  # truncated by a full disk
    out = run_cli("--multirun", "hydra/sweeper=ladder", *FAST, "precision=fp32,bf16", f"hydra.sweep.dir={sweep_dir}")
    assert out.returncode == 2 and "ladder_state.json cannot be read" in out.stderr and "Traceback" not in out.stderr


def test_a_dry_run_sweep_writes_nothing_into_the_sweep_folder(tmp_path):
    measured_row(tmp_path / "0", ["run.seed=1"], [0.5])
    plan, report_md = tmp_path / results.PLAN_FILE, tmp_path / "report.md"
    plan.write_text(json.dumps({"jobs": [{"num": 0, "overrides": [*FAST, "run.seed=1"]}]}))
    report_md.write_text("the real report")
    out = run_cli("--multirun", "dry_run=true", *FAST, "run.seed=1,2", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "would build" in out.stdout
    assert json.loads(plan.read_text())["jobs"][0]["overrides"] == [*FAST, "run.seed=1"]
    assert report_md.read_text() == "the real report" and not (tmp_path / results.LOCK_FILE).exists()
    assert results.read_row(tmp_path / "0" / "result.json")["latency_s"]["runs"] == [0.5]


@pytest.mark.parametrize("sweeper", ["ladder", "interleaved"])
def test_a_dry_run_ladder_or_interleaved_sweep_shows_every_plan_and_measures_nothing(tmp_path, sweeper):
    """These sweepers build pipelines themselves (the interleaved ones in their own process), so the
    job's dry run alone would not stop them."""
    folder = tmp_path / "sweep"
    out = run_cli("--multirun", f"hydra/sweeper={sweeper}", "dry_run=true", *FAST, "attention=classic,xformers",
                  "run.seed=1,2", f"hydra.sweep.dir={folder}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"[{sweeper}] dry run: 4 combinations checked, none measured" in out.stdout
    assert out.stdout.count("would build") == 2 and out.stderr.count("refused (dry run)") == 2  # xformers on CPU
    assert "run 1/" not in out.stderr + out.stdout and not folder.exists()


def test_a_spec_whose_decode_cannot_fit_the_machine_is_refused_with_the_figure():
    import dataclasses

    from helpers import CPU
    from sdbuild.validate import validate

    host = dataclasses.replace(CPU, host_memory=24 * 2**30)  # this machine: 24 GiB
    huge = ["run.batch_size=64", "run.height=4096", "run.width=4096"]
    with pytest.raises(SpecError) as refused:
        validate(sdbuild.compose(huge), host)
    text = str(refused.value)  # 2 x 64 images x 16 channels x 4096 x 4096 float32 values
    assert "run.batch_size=64 run.height=4096 run.width=4096" in text and "at least 137 GB" in text
    assert "memory=vae_slicing (one image at a time: 2.1 GB)" in text
    assert validate(sdbuild.compose([*huge, "memory=vae_slicing"]), host) == "cpu"
    assert validate(sdbuild.compose(["run.batch_size=4", "run.height=1024", "run.width=1024"]), host) == "cpu"


# Compiler state between jobs of one process ------------------------------------------------------

OBSERVE_COMPILE = """
import json, runpy, sys
sys.path.insert(0, {root!r})  # this checkout's sdbuild, as `python -m sdbuild` from its root would run
import sdbuild.measure

original = sdbuild.measure.measure

def observed(call, *args, **kwargs):  # observe (not replace) what each job's pipeline runs and compiles
    import os

    import torch._inductor.config as inductor_config
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    pipe = getattr(call, "__wrapped__", call)  # job.pipeline_call's inference_mode wrapper, or the pipeline
    modules = {{"unet": pipe.unet, "vae_decoder": pipe.vae.decoder, "text_encoder": pipe.text_encoder}}
    # Dynamo's compiled code for these modules' forward, before this job has called anything: what an
    # earlier job left (its guards do not name the module object, so a new pipeline would reuse it).
    stale = sum(len(_debug_get_cache_entry_list(type(m).forward.__code__)) for m in modules.values())
    before = counters["stats"]["unique_graphs"]
    result = original(call, *args, **kwargs)
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"compiled": sorted(n for n, m in modules.items() if m._compiled_call_impl is not None),
                            "graphs": counters["stats"]["unique_graphs"] - before, "stale": stale,
                            "cache_dir": cache_dir(), "fx_graph_cache": inductor_config.fx_graph_cache,
                            "env": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}}) + "\\n")
    return result

sdbuild.measure.measure = observed
sys.argv = ["sdbuild", *sys.argv[1:]]
runpy.run_module("sdbuild", run_name="__main__", alter_sys=True)
"""


def observe_sweep(tmp_path, *overrides) -> tuple[list[dict], dict]:
    """Run one in-process sweep (FAST: run.timeout_s=0) under OBSERVE_COMPILE: what each job compiled, in
    job order, and its rows by job number."""
    log, script = tmp_path / "observed.jsonl", tmp_path / "observe.py"
    script.write_text(OBSERVE_COMPILE.format(root=str(ROOT), log=str(log)))
    out = subprocess.run([sys.executable, str(script), "--multirun", f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST,
                          "run.steps=2", "run.warmup=1", *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    found = rows(tmp_path / "sweep")
    assert all(r["status"] == "ok" for r in found.values()), {k: r.get("error") for k, r in found.items()}
    return [json.loads(line) for line in log.read_text().splitlines()], found


@pytest.mark.slow
@pytest.mark.parametrize("order", [("inductor_all", "none", "inductor"), ("inductor", "inductor_all", "none"),
                                   ("inductor", "inductor")])
def test_no_job_runs_or_reuses_what_an_earlier_job_compiled(order, tmp_path):
    """One in-process sweep: an eager job after compiled ones compiles and runs nothing compiled; a job
    compiled otherwise than the one before it compiles its own modules (and only those); a job compiled
    exactly as the one before it (another seed) compiles again rather than reusing the earlier job's
    graphs. Every job starts with no compiled code of an earlier job (torch.compiler.reset between builds)."""
    sweep = [f"compile={order[0]}", "run.seed=0,1"] if len(set(order)) == 1 else [f"compile={','.join(order)}"]
    seen, found = observe_sweep(tmp_path, *sweep)
    expected = {"none": [], "inductor": ["unet"], "inductor_all": ["text_encoder", "unet", "vae_decoder"]}
    assert [s["compiled"] for s in seen] == [expected[o] for o in order]
    for option, s in zip(order, seen):
        assert s["stale"] == 0, s  # nothing compiled by an earlier job is left to run
        assert (s["graphs"] > 0) == (option != "none"), (option, s)  # compiled its own graphs, or none at all
    eager = [r for r in found.values() if r["choices"]["compile"] == "none"]
    assert all(r["warmup_calls"] == 1 and r["steady"] for r in eager)  # no compile work in the eager job


@pytest.mark.slow
@pytest.mark.parametrize("first_cached", [True, False])
def test_a_jobs_inductor_cache_folder_does_not_outlive_it(first_cached, tmp_path):
    """One in-process sweep of two compiled jobs, one with its own compile.cache_dir: the job with it
    compiles into that folder (Inductor's own cache_dir() says so, and files appear there); the job
    without it, before or after, compiles into the folder the process started with (Inductor's
    setting restored), and each row names the folder its job used."""
    folder = tmp_path / "job_cache"
    values = [str(folder), "null"] if first_cached else ["null", str(folder)]
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    start = os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())  # Inductor's own choice
    seen, found = observe_sweep(tmp_path, "compile=inductor", f"compile.cache_dir={','.join(values)}")
    cached, plain = (seen[0], seen[1]) if first_cached else (seen[1], seen[0])
    assert cached["cache_dir"] == str(folder) and cached["fx_graph_cache"], cached
    assert plain["cache_dir"] == plain["env"] == start, plain
    assert cached["graphs"] > 0 and plain["graphs"] > 0 and cached["stale"] == plain["stale"] == 0
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files, "the cached job wrote nothing into its compile.cache_dir"
    by_dir = {r["compile_cache"]["dir"] for r in found.values()}
    assert by_dir == {str(folder), start}, by_dir  # each row says where its cache went


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="PR_SET_PDEATHSIG and /proc: Linux only")
def test_a_sweeps_child_job_dies_with_the_sweep_even_by_kill_9(tmp_path):
    """docs/robustness.md: a child gets SIGTERM when the sweep's process dies, even by kill -9. The
    sweep (each job in a child process, run.timeout_s's default) is killed while its first child
    measures a long job: a few seconds later no process of that job is left."""
    sweep_dir = tmp_path / "sweep"
    args = [sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={sweep_dir}", "run.steps=2",
            "run.warmup=0", "run.repeats=100000", "run.timeout_s=600", "precision=fp32,bf16"]
    sweep = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not children:  # the first job's own process has started
            time.sleep(0.2)
            children = [p for p in _processes_mentioning(f"sdbuild.worker\0{sweep_dir}") if p != sweep.pid]
        assert children, "no child job process started"
        time.sleep(1.0)  # in the middle of the job (importing or building: alive either way)
        assert all(Path(f"/proc/{p}").exists() for p in children)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(children):
            time.sleep(0.2)
        assert not _alive(children), f"the child job outlived its killed sweep: {_alive(children)}"
    finally:
        sweep.kill()
        for pid in _alive(children):
            os.kill(pid, signal.SIGKILL)


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie counts as gone: it runs nothing)."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if not stat[stat.rfind(")") + 2:].startswith("Z"):
            alive.append(pid)
    return alive


def test_a_job_refused_while_composing_is_a_row_and_the_sweep_goes_on(tmp_path):
    """A sweep value the resolver check refuses (`${oc.env:HOME}`) or that interpolates a key that does not
    exist (`${run.nosuch}`) is refused before the job has a spec: each is an `unsupported` row saying
    why, the other jobs run, the report is written and the lock released (default sweep settings)."""
    out = run_cli("--multirun", f"hydra.sweep.dir={tmp_path}", *QUICK,
                  "run.negative_prompt=ok,${oc.env:HOME},${run.nosuch}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    table = csv_rows(tmp_path)
    assert table["0"]["status"] == "ok"
    assert table["1"]["status"] == "unsupported" and "oc.env" in table["1"]["error"]
    assert table["2"]["status"] == "unsupported" and "run.nosuch" in table["2"]["error"]
    assert (tmp_path / "report.md").is_file() and not (tmp_path / results.LOCK_FILE).exists()


# Round three (issue 27) ------------------------------------------------------------------------

TEAM_CONF = ROOT / "tests" / "data" / "team_conf"


def test_a_child_job_runs_exactly_the_job_its_parent_composed(tmp_path):
    """Default sweep settings (each job in its own process). The parent composed each job from a search
    path (`+preset=team_fast`), an extra `--config-dir` (`model=extra_tiny`), `hydra.job.env_set`, into
    a sweep folder with a comma in its path: the child runs that very spec (before: it re-composed a
    re-typed command line, and every job failed "Could not find 'preset/team_fast'" or "Ambiguous value")."""
    extra = tmp_path / "extra_conf"
    (extra / "model").mkdir(parents=True)
    (extra / "model" / "extra_tiny.yaml").write_text("name: extra_tiny\nsource: tiny\nfamily: sd15\nresolution: 64\n")
    sweep_dir = tmp_path / "a,b"
    out = run_cli("--multirun", "--config-dir", str(extra), f"hydra.sweep.dir='{sweep_dir}'",
                  f"hydra.searchpath=[file://{TEAM_CONF}]", "+preset=team_fast", "model=extra_tiny",
                  "+hydra.job.env_set.SLURM_JOB_GPUS=team-env", *QUICK, "run.threads=1", "precision=fp32,bf16")
    assert out.returncode == 0, out.stderr[-3000:]
    found = rows(sweep_dir)
    assert sorted(found) == ["0", "1"], out.stdout[-3000:]
    for num, precision in (("0", "fp32"), ("1", "bf16")):
        row = found[num]
        assert row["status"] == "ok", row["error"]
        assert row["job"]["isolated"]
        assert (row["preset"], row["choices"]["model"], row["choices"]["attention"]) == ("team_fast", "extra_tiny", "sdpa")
        assert row["spec"]["precision"]["name"] == precision and row["spec"]["run"]["steps"] == 2  # command line wins
        assert row["job"]["hardware"]["slurm_gpus"] == "team-env"  # hydra.job.env_set reached the job's process
        assert "isolate=false" not in row["overrides"]  # the labels are the parent's, as typed
        hydra_record = sweep_dir / num / ".hydra"  # Hydra's record of the job, written by sdbuild's callback
        assert f"precision={precision}" in (hydra_record / "overrides.yaml").read_text()
        assert "team_fast" in (hydra_record / "config.yaml").read_text() and (hydra_record / "hydra.yaml").is_file()


ONE = ["run.steps=1", "run.warmup=0", "run.threads=1", "run.timeout_s=0"]


def test_an_image_that_cannot_be_written_keeps_the_measurement(tmp_path):
    """image.png cannot be written (a folder in its place; a full disk fails the same save): the row is
    `failed`, says so, and keeps the timings, load and build times (before: a failed row without them)."""
    from sdbuild.job import run_job

    (tmp_path / "image.png").mkdir()
    row = run_job(sdbuild.compose([*ONE, "run.repeats=2"]), tmp_path, {}, [*ONE, "run.repeats=2"], job={"num": 0})
    assert row["status"] == "failed" and "image.png could not be written" in row["error"], row["error"]
    assert len(row["latency_s"]["runs"]) == 2 and row["load_s"] is not None and row["image"] is None
    assert results.read_row(tmp_path / "result.json")["latency_s"]["runs"] == row["latency_s"]["runs"]


def test_an_error_in_timed_call_3_of_5_keeps_the_2_finished_calls(tmp_path, monkeypatch):
    """A MemoryError in the third timed call (raised by the real tiny pipeline's VAE decoder, as an
    allocation would) ends the job `failed`, keeping the 2 calls that finished, as an interrupt does."""
    from sdbuild import builder
    from sdbuild.job import run_job

    real_build = builder.build_pipeline
    calls = []

    def build_failing_on_call_3(*args, **kwargs):
        pipe, info = real_build(*args, **kwargs)

        def third_call_fails(module, inputs):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("cannot allocate the decoder's output")

        pipe.vae.decoder.register_forward_pre_hook(third_call_fails)
        return pipe, info

    monkeypatch.setattr(builder, "build_pipeline", build_failing_on_call_3)
    overrides = [*ONE, "run.repeats=5", "run.save_image=false"]
    row = run_job(sdbuild.compose(overrides), tmp_path, {}, overrides, job={"num": 0})
    assert len(calls) == 3
    assert row["status"] == "failed" and row["error"].startswith("MemoryError"), row["error"]
    assert len(row["latency_s"]["runs"]) == 2 and "2 of 5 timed runs finished" in row["error"]
    assert results.read_row(tmp_path / "result.json")["latency_s"]["runs"] == row["latency_s"]["runs"]


def test_a_job_process_that_cannot_write_its_row_still_hands_back_its_timings(tmp_path):
    """In a job's own process, result.json cannot be written (a folder in its place): the row comes back
    through the pipe with its timings, and its error's "its timings are in this row" is true (before:
    the parent read back only the file, and the row had no timings)."""
    from sdbuild.job import run_in_fresh_process

    (tmp_path / "result.json").mkdir()
    overrides = [*QUICK, "run.threads=1"]
    row = run_in_fresh_process(sdbuild.compose(overrides), overrides, tmp_path, {}, {"num": 0})
    assert row["status"] == "failed" and "it was measured: its timings are in this row" in row["error"], row["error"]
    assert len(row["latency_s"]["runs"]) == 1 and row["job"]["isolated"] and row["job"]["unwritten"]
    assert row["env"]["pid"] != os.getpid()  # measured in the job's own process


def _tmpfs(folder: Path, size: str) -> bool:
    """Mount a tmpfs of `size` on `folder` (root only); False where that is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_does_not_end_the_sweep(tmp_path):
    """A 2 MiB tmpfs left with just the 16 KiB the sweep's start needs (lock, plan, Hydra's multirun.yaml):
    Hydra's own `.hydra/*.yaml` write for job 0 would raise out of the launcher (before: exit 1, no
    report, lock left, job 1 never ran). Now each job says what it could not write and ends in a row
    (kept in memory), job 1 runs too, and the sweep ends with exit 0 and its lock released."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        os.truncate(filler, filler.stat().st_size - 16 * 1024)
        sweep_dir = disk / "sweep"
        out = run_cli("--multirun", f"hydra.sweep.dir={sweep_dir}", *QUICK, "run.threads=1", "run.seed=1,2")
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stdout.count("FAILED: could not record the job") == 2, out.stdout[-3000:]  # both jobs ran to a row
        assert "[sdbuild] job 2/2" in out.stdout and "could not write the report" in out.stdout
        assert not (sweep_dir / results.LOCK_FILE).exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "42"])
def test_a_lock_file_that_is_not_a_lock_record_is_named_as_such(tmp_path, capsys, content):
    from sdbuild.sweep import SweepError, acquire_lock

    (tmp_path / results.LOCK_FILE).write_text(content)
    with pytest.raises(SweepError):
        acquire_lock(tmp_path)
    said = capsys.readouterr().err
    assert "not a lock record" in said and "None" not in said, said  # before: "process None on None"
    assert (tmp_path / results.LOCK_FILE).read_text() == content  # never taken over


def test_overrides_are_recorded_as_typed_in_the_row_and_the_plan(tmp_path):
    """Defect 5: the documented `\\${` escape and a `${run.seed}` reference, swept. Both rows are `ok` in
    the report (before: "unreadable: written by another sweep", plan.json held the resolved overrides,
    the rows the escaped ones), and the row, the plan and the report's csv record each override as typed
    (before: plan.json said `run.prompt=0`), while the spec holds what they mean."""
    typed = ["run.prompt=a \\${x} b", "run.prompt=${run.seed}"]
    out = run_cli("--multirun", f"hydra.sweep.dir={tmp_path}", *QUICK, "run.threads=1", "run.timeout_s=0",
                  "run.prompt=a \\${x} b,${run.seed}")
    assert out.returncode == 0, out.stderr[-3000:]
    plan = {str(j["num"]): j["overrides"] for j in json.loads((tmp_path / results.PLAN_FILE).read_text())["jobs"]}
    found, table = rows(tmp_path), csv_rows(tmp_path)
    for num, override, prompt in (("0", typed[0], "a ${x} b"), ("1", typed[1], "0")):
        assert table[num]["status"] == "ok", table[num]["error"]
        assert found[num]["overrides"][-1] == override and plan[num][-1] == override, (found[num]["overrides"], plan[num])
        assert found[num]["spec"]["run"]["prompt"] == prompt
    assert "written by another sweep" not in (tmp_path / "report.md").read_text()


def test_a_job_interrupted_as_its_process_finishes_is_not_ok(tmp_path, monkeypatch):
    """The signal comes as the job's process finishes its `ok` row (Ctrl-C right after the child's
    last call): the row keeps its timings but does not claim ok (before: `ok` with job.interrupted)."""
    from sdbuild.job import Interrupted, run_in_fresh_process

    wait, calls = subprocess.Popen.wait, []

    def wait_then_interrupted(self, timeout=None):
        code = wait(self, timeout)
        calls.append(code)
        if len(calls) == 1:  # the job's own wait: its process has finished, then the signal arrives
            raise Interrupted("SIGINT")
        return code

    monkeypatch.setattr(subprocess.Popen, "wait", wait_then_interrupted)
    spec = sdbuild.compose([*QUICK, "run.threads=1"])
    with pytest.raises(KeyboardInterrupt):
        run_in_fresh_process(spec, list(QUICK), tmp_path, {}, {"num": 0})
    row = results.read_row(tmp_path / results.RESULT_FILE)
    assert calls[0] == 0 and row["job"]["interrupted"] == "SIGINT"
    assert row["status"] == "failed" and "interrupted" in row["error"] and len(row["latency_s"]["runs"]) == 1


def test_ctrl_c_of_a_single_run_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C (SIGINT) while a single run measures: its row is written, stderr says so in one line,
    no traceback, exit 130 (before: a 42-frame traceback)."""
    proc = subprocess.Popen([sys.executable, "-m", "sdbuild", "run.steps=2", "run.warmup=0", "run.repeats=100000",
                             "run.threads=1", f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "__main__.log"
    deadline = time.time() + 300
    while time.time() < deadline and "run 2/100000" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "sdbuild: interrupted (SIGINT)" in err, err[-3000:]
    assert results.read_row(tmp_path / "result.json")["job"]["interrupted"] == "SIGINT"


def test_sigterm_of_a_sweep_writes_its_report_and_releases_the_lock(tmp_path):
    """`timeout N python -m sdbuild --multirun ...`: SIGTERM while job 2 of 3 runs. One line, no
    traceback; the report covers what was measured (job 0 ok, job 1 interrupted, job 2 missing) and
    the lock is released (before: an `Interrupted: SIGTERM` traceback, no report, the lock left)."""
    proc = subprocess.Popen([sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={tmp_path}",
                             "run.steps=2", "run.warmup=0", "run.threads=1", "run.repeats=1,100000,1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and "run 2/100000" not in "".join(
            p.read_text() for p in tmp_path.glob("1/*.log")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "sdbuild: interrupted (SIGTERM)" in err, err[-3000:]
    table = csv_rows(tmp_path)
    assert table["0"]["status"] == "ok" and table["1"]["status"] == "failed" and table["2"]["status"] == "missing"
    assert (tmp_path / "report.md").is_file() and not (tmp_path / results.LOCK_FILE).exists()
