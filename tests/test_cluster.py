"""Sweeps through Hydra's submitit launchers: each job in its own process (or SLURM job), rows written
by the jobs, the report built from the rows, and each row saying what hardware its job had.

The SLURM tests run against a real one-node cluster brought up by scripts/slurm_cluster.sh (apt-get
install, daemons as root): they run only when asked (SDBUILD_SLURM=1, as CI's second pass does),
since a plain `pytest` must not install packages or start daemons on a developer's machine.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, needs_packages, run_cli

TINY = ["run.steps=3", "run.warmup=0", "run.repeats=1"]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"

# Hydra's submitit launcher plugin (the `slurm` extra)
needs_submitit = needs_packages("submitit", "hydra_plugins.hydra_submitit_launcher", install='pip install -e ".[slurm]"')


def rows(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(sweep_dir).glob("*/result.json")}


def report_rows(sweep_dir):
    """Rebuild the report from the rows alone (as after any launcher) and return results.csv's rows."""
    for name in ("results.csv", "report.md", "index.html", "latency.png"):
        (Path(sweep_dir) / name).unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-m", "sdbuild.report", str(sweep_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(Path(sweep_dir) / "results.csv") as f:
        return list(csv.DictReader(f))


# --- submitit's local executor: one process per job, on this machine ---------------------------------


@needs_submitit
def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    out = run_cli("--multirun", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}",
                  "precision=fp32,bf16", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    found = rows(tmp_path)
    assert sorted(found) == ["0", "1"] and all(r["status"] == "ok" for r in found.values())
    jobs = [r["job"] for r in found.values()]
    assert all(j["launcher"] == "submitit_local" for j in jobs)
    assert len({j["pid"] for j in jobs}) == 2  # a process per job
    assert all(r["env"]["pid"] == r["job"]["pid"] for r in found.values())
    for j in jobs:
        hw = j["hardware"]
        # submitit's local executor shows a job no GPU unless gpus_per_node asks for some; the row says so
        assert hw["cuda_visible_devices"] == ""
        assert hw["cpus_allowed"] == sorted(os.sched_getaffinity(0))
        assert hw["slurm_job_id"] is None and hw["exclusive"] is None
    table = report_rows(tmp_path)
    assert sorted(r["precision"] for r in table) == ["bf16", "fp32"]
    assert all(r["status"] == "ok" for r in table)


def _task_pids(sweep_dir):
    """The live submitit task processes of this sweep (`python -m submitit.core._submit <sweep>/.submitit/...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(str(sweep_dir).encode() in part for part in cmd):
            pids.append(int(proc.name))
    return pids


@needs_submitit
def test_a_killed_job_leaves_the_other_row_and_the_report(tmp_path):
    # job 0 is quick; job 1 is long enough to be still running when job 0 has written its row
    args = [sys.executable, "-m", "sdbuild", "--multirun", "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={tmp_path}", "run.steps=3", "run.warmup=0", "run.repeats=1,100"]
    sweep = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and not (tmp_path / "0" / "result.json").exists() and sweep.poll() is None:
        time.sleep(0.5)
    assert (tmp_path / "0" / "result.json").exists(), "job 0 never wrote its row"
    while time.time() < deadline and len(victims := _task_pids(tmp_path)) > 1:
        time.sleep(0.2)  # job 0's process is exiting
    assert not (tmp_path / "1" / "result.json").exists(), "job 1 finished too soon to be killed"
    assert len(victims) == 1, f"expected job 1's process alone, found {victims}"
    os.kill(victims[0], signal.SIGKILL)  # the OOM killer, a node failure
    log, _ = sweep.communicate(timeout=300)
    assert not (tmp_path / "1" / "result.json").exists()
    assert sweep.returncode != 0  # Hydra's submitit launcher reports the lost job ...
    assert "has not produced any output" in log, log[-3000:]  # submitit's word for a job that died
    kept = rows(tmp_path)
    assert list(kept) == ["0"] and kept["0"]["status"] == "ok"  # ... and the finished row stays
    table = report_rows(tmp_path)  # the report is built from what exists, and names what does not
    assert [r["spec_key"] for r in table if r["status"] == "ok"] == [kept["0"]["spec_key"]]
    assert [(r["job"], r["status"]) for r in table if r["status"] != "ok"] == [("1", "missing")]
    assert "run.repeats=100" in (tmp_path / "report.md").read_text()


def test_report_names_a_job_that_left_no_row(tmp_path):
    # The state a killed job leaves, without the wait: a two-job sweep's folders, one row missing.
    out = run_cli("--multirun", f"hydra.sweep.dir={tmp_path}", "run.steps=2,3", "run.warmup=0", "run.repeats=1")
    assert out.returncode == 0, out.stderr[-2000:]
    (tmp_path / "1" / "result.json").unlink()
    report_rows(tmp_path)
    assert "run.steps=3" in (tmp_path / "report.md").read_text()


# --- one node, several GPUs, no scheduler (hydra/launcher=local_gpus) --------------------------------

# A job process as submitit's local executor starts it, on a node whose CUDA shows two GPUs. (The GPU
# count is the one thing faked: this machine has none. The claiming, locks and waiting are real.)
CLAIM = """
import os, sys
from sdbuild import hardware
hardware._visible_gpus = lambda: ["0", "1"]
gpu = hardware.claim_gpu(lock_dir=sys.argv[1], poll_s=0.1)
print(gpu, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.read()  # hold the GPU until the test closes stdin
"""


def test_local_gpus_jobs_each_claim_a_gpu_of_their_own_and_wait_for_a_free_one(tmp_path):
    import select

    env = {**os.environ, "SUBMITIT_EXECUTOR": "local"}
    jobs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path)], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(3)]
    try:
        said = {}
        deadline = time.time() + 120
        while len(said) < 2 and time.time() < deadline:
            ready, _, _ = select.select([j.stdout for j in jobs if j not in said], [], [], 1)
            for job in jobs:
                if job.stdout in ready:
                    said[job] = job.stdout.readline().split()
        assert sorted(said.values()) == [["0", "0"], ["1", "1"]]  # two GPUs, two jobs, one each
        waiting = next(j for j in jobs if j not in said)
        assert select.select([waiting.stdout], [], [], 2)[0] == []  # the third waits: no GPU is free
        holder = next(iter(said))
        holder.stdin.close()
        holder.wait(timeout=60)
        assert select.select([waiting.stdout], [], [], 60)[0], "the waiting job never got the freed GPU"
        assert waiting.stdout.readline().split() == said[holder]
    finally:
        for job in jobs:
            job.kill()
            job.wait()


# --- a real SLURM cluster: one node, this machine ----------------------------------------------------


def _slurm_skip_reason():
    if os.environ.get("SDBUILD_SLURM") != "1":
        return ("starts a one-node SLURM cluster on this machine (apt-get install, daemons as root): "
                "run with SDBUILD_SLURM=1")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to start a SLURM cluster (scripts/slurm_cluster.sh)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "no SLURM here and no apt-get to install it (scripts/slurm_cluster.sh is for Debian/Ubuntu)"
    return None


needs_slurm = pytest.mark.skipif(_slurm_skip_reason() is not None, reason=_slurm_skip_reason() or "")


@pytest.fixture(scope="module")
def slurm_cluster():
    """Bring the one-node cluster up (idempotent: a running one is reused) and return its facts."""
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    hello = subprocess.run(["srun", "hostname"], capture_output=True, text=True, timeout=120)
    assert hello.returncode == 0, hello.stderr
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    jobcomp = re.search(r"^JobCompLoc\s*=\s*(\S+)", config, re.M).group(1)
    return {"node": hello.stdout.strip(), "jobcomp": Path(jobcomp)}


def _job_times(jobcomp: Path, job_id: str):
    """(start, end) of a finished SLURM job, from the job-completion log the cluster script configures
    (slurmctld may write it a moment after the job's result reached the sweep)."""
    deadline = time.time() + 60
    while True:
        for line in jobcomp.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == job_id:
                return tuple(datetime.fromisoformat(fields[k]) for k in ("StartTime", "EndTime"))
        assert time.time() < deadline, f"job {job_id} is not in {jobcomp}"
        time.sleep(1)


@needs_slurm
@needs_submitit
def test_slurm_cpu_exclusive_sweep_gives_each_job_the_whole_node(slurm_cluster, tmp_path):
    out = run_cli("--multirun", "hydra/launcher=slurm_cpu_exclusive", f"hydra.sweep.dir={tmp_path}",
                  "precision=fp32,bf16", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sacct error" not in out.stdout + out.stderr  # the cluster keeps accounting: submitit can follow its jobs
    found = rows(tmp_path)
    assert sorted(found) == ["0", "1"] and all(r["status"] == "ok" for r in found.values())
    hws = [r["job"]["hardware"] for r in found.values()]
    assert all(r["job"]["launcher"] == "submitit_slurm" for r in found.values())
    assert len({hw["slurm_job_id"] for hw in hws}) == 2  # two SLURM jobs
    for hw in hws:  # each had the node to itself, every core of it
        assert hw["node"] == slurm_cluster["node"] and hw["exclusive"] is True
        assert hw["slurm_cpus"] == os.cpu_count() and hw["cpus_allowed"] == list(range(os.cpu_count()))
    first, second = sorted(_job_times(slurm_cluster["jobcomp"], hw["slurm_job_id"]) for hw in hws)
    assert first[1] <= second[0], f"the jobs overlapped: {first} and {second}"  # one after the other
    table = report_rows(tmp_path)
    assert sorted(r["precision"] for r in table) == ["bf16", "fp32"]


@needs_slurm
@needs_submitit
def test_slurm_shared_node_rows_record_the_cores_each_job_had(slurm_cluster, tmp_path):
    # Plain submitit_slurm with one core per job: SLURM may run both jobs at once on the node, and
    # each row must say it had one core and no exclusivity (so a reader knows it timed under load).
    out = run_cli("--multirun", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1",
                  f"hydra.sweep.dir={tmp_path}", "precision=fp32,bf16", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    found = rows(tmp_path)
    assert sorted(found) == ["0", "1"] and all(r["status"] == "ok" for r in found.values())
    for r in found.values():
        hw = r["job"]["hardware"]
        assert hw["exclusive"] is False and hw["slurm_cpus"] == 1 and len(hw["cpus_allowed"]) == 1


@needs_slurm
@needs_submitit
def test_slurm_gpu_parallel_runs_one_task_per_rank_and_rank_zero_writes_the_row(slurm_cluster, tmp_path):
    # The parallel launcher config on the CPU node: two SLURM tasks, each one gloo rank (no GPUs asked for), their
    # rank environment from submitit; only rank 0's task writes the row, and the sweep takes rank 0's return.
    out = run_cli("--multirun", "hydra/launcher=slurm_gpu_parallel", "hydra.launcher.gpus_per_node=null",
                  "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={tmp_path}", "model=tiny_flux", "run.steps=2",
                  "run.warmup=1", "run.repeats=2", "parallel=ulysses", timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    found = rows(tmp_path)
    assert sorted(found) == ["0"] and found["0"]["status"] == "ok", found["0"].get("error")
    row = found["0"]
    assert row["job"]["launcher"] == "submitit_slurm" and row["job"]["hardware"]["slurm_job_id"]
    par = row["parallel"]
    assert par["launcher"].startswith("submitit SLURM tasks") and par["world_size"] == 2 and par["backend"] == "gloo"
    assert [r["rank"] for r in par["ranks"]] == [0, 1] and len({r["pid"] for r in par["ranks"]}) == 2
    assert all(r["threads"]["torch_threads"] == 1 for r in par["ranks"])  # each task's one core
    assert par["fidelity"]["within_tolerance"] is True
