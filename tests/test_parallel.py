"""parallel=: context / tensor parallelism through diffusers' enable_parallelism, a job run as N ranks by
torch's elastic launcher (sdbuild/distributed.py). The rules are checked against diffusers itself; the
refusals come before anything loads; two real gloo ranks on the tiny Flux give the degree-1 image;
a rank killed mid-run fails the job with its error and leaves no process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_packages

from sdbuild.capabilities import CONTEXT_PARALLEL_BACKENDS, RING_BACKENDS
from sdbuild.config import compose
from sdbuild.errors import SpecError
from sdbuild.families import FAMILIES
from sdbuild.spec import AttentionBackend, ModelFamily, ParallelMethod, spec_key, spec_to_dict
from sdbuild.validate import Machine, validate

ROOT = Path(__file__).resolve().parent.parent
CPU = Machine(cuda=False, device_name="cpu", capability=None, packages=frozenset({"accelerate", "torchao"}),
              diffusers_version="0.42.1", c_compiler=True, cpu_count=2)
GPUS = Machine(cuda=True, device_name="NVIDIA H100", capability=(9, 0), packages=frozenset({"accelerate"}),
               diffusers_version="0.42.1", c_compiler=True, gpu_count=2, cpu_count=16)

DENOISERS = {ModelFamily.sd15: "UNet2DConditionModel", ModelFamily.sdxl: "UNet2DConditionModel",
             ModelFamily.flux: "FluxTransformer2DModel", ModelFamily.sd3: "SD3Transformer2DModel"}


@pytest.mark.parametrize("family", list(ModelFamily))
def test_each_familys_parallel_plans_are_the_ones_diffusers_has(family):
    import diffusers

    model_class = getattr(diffusers, DENOISERS[family])
    assert FAMILIES[family].context_parallel == (model_class._cp_plan is not None)
    assert FAMILIES[family].tensor_parallel == (model_class._tp_plan is not None)


def test_the_context_parallel_backends_are_the_ones_diffusers_registers():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    offered = {b.value for b in AttentionBackend if b is not AttentionBackend.default}
    ours = {b.value for b in CONTEXT_PARALLEL_BACKENDS if b is not AttentionBackend.default}
    assert ours == offered & set(_AttentionBackendRegistry._supports_context_parallel)
    assert AttentionBackend.native not in RING_BACKENDS and AttentionBackend.native_math not in RING_BACKENDS


def test_parallel_none_leaves_the_spec_key_of_rows_from_before_the_group():
    plain = spec_to_dict(compose(["model=tiny_flux"]))
    before = {k: v for k, v in plain.items() if k != "parallel"}
    assert spec_key(plain) == spec_key(before)
    assert spec_key(spec_to_dict(compose(["model=tiny_flux", "parallel=ulysses"]))) != spec_key(plain)
    # how long a rank waits in a collective is not what the job builds: the same recipe, the same key
    assert spec_key(spec_to_dict(compose(["model=tiny_flux", "parallel=ulysses", "parallel.collective_timeout_s=9"]))) \
        == spec_key(spec_to_dict(compose(["model=tiny_flux", "parallel=ulysses"])))
    assert compose(["model=tiny_flux", "parallel=unified"]).parallel.world_size == 4


def refusal(*overrides, machine=CPU) -> str:
    with pytest.raises(SpecError) as exc:
        validate(compose(list(overrides)), machine)
    return str(exc.value)


@pytest.mark.parametrize("overrides, said", [
    (["parallel=ulysses"], "model=tiny is family sd15"),  # no _cp_plan on the UNet
    (["model=tiny_sd3", "parallel=ulysses"], "model=tiny_sd3 is family sd3"),
    (["model=tiny_flux", "parallel=tensor"], "_SUPPORTED_TP_DEVICES"),  # diffusers' TP: no CPU mesh
    (["model=tiny_flux", "parallel=ring", "attention.backend=native_flash"], "not implement on CPU"),
    (["model=tiny_flux", "parallel=ring"], "does not support return_lse=True"),
    (["model=tiny_flux", "parallel=ulysses", "attention.backend=native_math"], "supports_context_parallel"),
    (["model=tiny_flux", "parallel=ulysses", "parallel.ulysses_degree=4"], "2 attention heads"),
    (["model=tiny_flux", "parallel=ulysses", "parallel.ulysses_degree=4"], "4 ranks and 2 CPU cores"),
    (["model=tiny_flux", "parallel=ulysses", "parallel.ulysses_degree=1"], "parallel=ulysses splits over ulysses_degree"),
    (["model=tiny_flux", "parallel.ulysses_degree=2"], "parallel=none runs one process"),
    (["model=tiny_flux", "parallel=ulysses", "run.height=48", "run.width=48"], "do not divide its 9 image tokens"),
    (["model=tiny_flux", "parallel=ulysses", "cache=first_block"], "parallel with cache"),
    (["model=tiny_flux", "parallel=ulysses", "compile=inductor"], "parallel with compile"),
    (["model=tiny_flux", "parallel=ulysses", "quant=int8wo"], "parallel with quant"),
    (["model=tiny_flux", "parallel=ulysses", "run.repeats=auto"], "parallel with run.repeats=auto"),
    (["model=tiny_flux", "parallel=ulysses", "parallel.backend=nccl"], "parallel.backend=nccl"),
    (["model=tiny_flux", "parallel=ulysses", "parallel.collective_timeout_s=0"], "must be a positive number of seconds"),
])
def test_each_parallel_rule_refuses_with_its_reason(overrides, said):
    assert said in refusal(*overrides)


def test_on_gpus_the_rules_count_gpus_and_let_ring_and_tensor_through():
    validate(compose(["model=tiny_flux", "parallel=ulysses"]), GPUS)
    validate(compose(["model=tiny_flux", "parallel=tensor"]), GPUS)
    # bf16: the flash kernels take half precision only on CUDA (capabilities: half-only backends)
    validate(compose(["model=tiny_flux", "parallel=ring", "attention.backend=native_flash", "precision=bf16"]), GPUS)
    said = refusal("model=tiny_flux", "parallel=unified", "attention.backend=native_flash", "precision=bf16",
                   machine=GPUS)
    assert "4 ranks and 2 GPUs are visible" in said
    assert "memory.offload" in refusal("model=tiny_flux", "parallel=ulysses", "memory=model_offload", machine=GPUS)


def test_a_refused_parallel_run_exits_2_before_torch_loads(tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdbuild", "model=tiny_flux", "parallel=tensor",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "parallel=tensor: needs CUDA" in done.stderr and "Traceback" not in done.stderr
    assert not any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())  # never imported
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "unsupported"


# ---------------------------------------------------------------------------------------------------
# Real ranks


def sdbuild(out: Path, *overrides: str) -> subprocess.Popen:
    """The CLI on the tiny Flux, its output in a file (a pipe nobody reads while waiting could fill and block it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "sdbuild", "model=tiny_flux", "run.steps=2", "run.warmup=1",
                             "run.repeats=2", f"hydra.run.dir={out}", *overrides], cwd=ROOT, env=env,
                            stdout=open(out.parent / f"{out.name}.log", "w+"), stderr=subprocess.STDOUT, text=True)


def finish(job: subprocess.Popen, out: Path, timeout: float = 900) -> str:
    job.wait(timeout)
    return (out.parent / f"{out.name}.log").read_text()


def _stat(pid) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, pgrp, session, ..., utime at 11."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) pids of session `sid`: the launcher starts its own session, and its ranks are in it."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = _stat(proc.name)
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(proc.name))
    return found


def launcher_pid(out: Path) -> int:
    """The launcher's pid: in the run id that torch elastic names its log folder after (ranks/logs/sdbuild-<pid>_...)."""
    folder, = (out / "ranks" / "logs").iterdir()
    return int(folder.name.split("_", 1)[0].split("-")[1])


def degree_one_image(*overrides: str):
    """The same spec's image at degree 1, built and called in this process (float, before the PNG)."""
    from sdbuild.builder import build_pipeline
    from sdbuild.job import pipeline_call
    from sdbuild.run_inputs import call_kwargs

    spec = compose(["model=tiny_flux", "run.steps=2", *overrides])
    pipe, _ = build_pipeline(spec, "cpu")
    return pipeline_call(spec, pipe)(**call_kwargs(spec, pipe, "cpu")).images


@pytest.mark.slow  # 2-3 minutes on 2 loaded cores: two ranks each import torch and diffusers and build the pipeline
def test_two_gloo_ranks_write_one_row_whose_image_is_the_degree_one_image(tmp_path):
    import numpy as np

    from sdbuild.fidelity import compare

    out = tmp_path / "ulysses"
    job = sdbuild(out, "parallel=ulysses")
    seen = set()
    while job.poll() is None:  # the launcher's session while it runs: the launcher and its 2 ranks (and spawn's helper)
        time.sleep(2)
        if (out / "ranks" / "logs").is_dir() and any((out / "ranks" / "logs").iterdir()):
            seen |= set(session_processes(launcher_pid(out)))
    log = finish(job, out)
    assert len(seen) >= 3, seen  # what the no-process-left check below looks for was there
    assert job.returncode == 0, log[-3000:]
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "ok" and len(row["latency_s"]["runs"]) == 2
    par = row["parallel"]
    assert (par["world_size"], par["backend"], par["mesh"]["dims"]) == (2, "gloo", {"ring": 1, "ulysses": 2})
    assert [r["rank"] for r in par["ranks"]] == [0, 1] and len({r["pid"] for r in par["ranks"]}) == 2
    assert all(r["threads"]["torch_threads"] == 1 for r in par["ranks"])  # 2 cores shared by 2 ranks
    assert all(m > 0 for m in par["peak_memory_mb_per_rank"])
    assert "parallel" in row["build_notes"][0] and list(out.glob("*.png")) == [out / "image.png"]  # one image, rank 0's
    parallel_image = np.load(out / "ranks" / "images.npy")
    single = degree_one_image()
    diff = float(np.abs(parallel_image - single).max())
    print(f"ulysses 2 vs degree 1: max abs diff {diff:.2e}, {compare(single[0], parallel_image[0])}")
    assert diff < 1e-4  # measured: 1.5e-6 (images in [0, 1]; the attention sums in another order across ranks)
    fidelity = par["fidelity"]  # the job's own comparison, rendered in rank 0 after the timed calls
    assert (fidelity["tolerance"], fidelity["within_tolerance"], fidelity["images"]) == (1e-4, True, 1), fidelity
    assert fidelity["max_abs_diff"] == pytest.approx(diff, rel=0.5, abs=1e-6) and fidelity["ssim"] > 0.9999
    assert session_processes(launcher_pid(out)) == []


@pytest.mark.slow  # 3-4 minutes on 2 loaded cores: a degree-1 job, then two ranks
def test_a_sweep_over_parallel_none_and_ulysses_reports_speedup_efficiency_and_fidelity(tmp_path):
    """The issue's "done when": `--multirun parallel=none,ulysses` reports the efficiency, from real rows."""
    from sdbuild import report

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={tmp_path}",
                           "model=tiny_flux", "run.steps=2", "run.warmup=1", "run.repeats=7", "parallel=none,ulysses"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = {r["job"]: r for r in report.analyse(tmp_path).rows}
    assert [rows[j]["status"] for j in ("0", "1")] == ["ok", "ok"]
    v = rows["1"]["parallel_vs_one"]
    assert v["reference_job"] == "0" and v["world_size"] == 2 and v["low"] is not None
    assert v["efficiency"] == pytest.approx(rows["0"]["latency_s"]["median"] / rows["1"]["latency_s"]["median"] / 2)
    assert rows["1"]["parallel"]["fidelity"]["within_tolerance"] is True
    text = (tmp_path / "report.md").read_text()
    assert f"of 2 ranks ({v['efficiency_low']:.2f}" in text and "(tolerance 0.0001: within)" in text
    print(f"sweep: degree 1 {rows['0']['latency_s']['median']:.3f} s, ulysses 2 {rows['1']['latency_s']['median']:.3f} s,"
          f" speed-up x{v['speedup']:.2f} ({v['low']:.2f}-{v['high']:.2f}), efficiency {v['efficiency']:.2f}, "
          f"max abs diff {rows['1']['parallel']['fidelity']['max_abs_diff']:.2e}, load {os.getloadavg()}")


@pytest.mark.slow  # about 2 minutes: the ranks build before one is killed
def test_a_rank_killed_mid_run_fails_the_job_with_each_ranks_error_and_leaves_no_process(tmp_path):
    out = tmp_path / "killed"
    job = sdbuild(out, "parallel=ulysses", "run.steps=50", "run.repeats=50")
    deadline = time.monotonic() + 600
    victim = None
    while victim is None and time.monotonic() < deadline and job.poll() is None:
        time.sleep(1)
        logs = out / "ranks" / "logs"
        if logs.is_dir() and any(logs.iterdir()):
            launcher = launcher_pid(out)
            for pid in session_processes(launcher):
                # a rank well into its work: its pipeline built and calling (CPU time past the imports)
                if pid != launcher and int(_stat(pid)[11]) / os.sysconf("SC_CLK_TCK") > 25:
                    victim = pid
    assert victim is not None, f"no rank got going (job exit {job.poll()}): {finish(job, out)[-2000:] if job.poll() is not None else ''}"
    os.kill(victim, signal.SIGKILL)
    log = finish(job, out)
    assert job.returncode == 1, log[-3000:]
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "failed" and "a rank failed" in row["error"]
    errors = row["parallel"]["errors"]
    assert sorted(errors) == ["0", "1"] and any("SIGKILL" in why for why in errors.values()), errors
    assert session_processes(launcher_pid(out)) == []


@pytest.mark.slow  # about 2.5 minutes each: the ranks build, one hangs, the job waits out run.timeout_s=100 or the
@pytest.mark.parametrize("first", ["job limit", "collective timeout"])  # collective's 10 s and the launcher's ending
def test_a_hung_rank_fails_the_job_within_run_timeout_s_naming_the_hang_and_leaves_no_process(tmp_path, first):
    """A rank that hangs (SIGSTOP: alive, never at the next collective) ends the job within run.timeout_s with
    every rank's word, whichever fires first: the job's limit (it ends the launcher's session; the default, the
    collective timeout being that same limit) or the ranks' own collective timeout (parallel.collective_timeout_s
    shorter: rank 0's collective raises, torch elastic's launcher ends the others)."""
    out = tmp_path / "hung"
    limit = 100
    started = time.monotonic()
    shorter = ["parallel.collective_timeout_s=10"] if first == "collective timeout" else []
    job = sdbuild(out, "parallel=ulysses", "run.steps=50", "run.repeats=50", f"run.timeout_s={limit}", *shorter)
    progress = out / "ranks" / "progress" / "1"
    wait_for_pipeline_call(progress, time.monotonic() + limit, lambda: job.poll() is None)
    assert job.poll() is None, finish(job, out)[-2000:]
    launcher = launcher_pid(out)
    victim = json.loads(progress.read_text())["pid"]  # the rank writes its own pid there
    assert victim in session_processes(launcher)
    stopped = time.monotonic()
    os.kill(victim, signal.SIGSTOP)  # hung: alive, never reaches the next barrier; rank 0 waits there for it
    log = finish(job, out, timeout=limit + 120)
    took = time.monotonic() - started
    assert job.returncode == 1, log[-3000:]
    row = json.loads((out / "result.json").read_text())
    errors = row["parallel"]["errors"]
    assert sorted(errors) == ["0", "1"], errors
    if first == "job limit":
        assert row["status"] == "failed" and f"timed out after {limit} s (run.timeout_s)" in row["error"], row["error"]
        assert "in pipeline call" in errors["1"] and f"process {victim} stopped)" in errors["1"], errors  # the hang
        assert "sleeping" in errors["0"], errors  # rank 0 waited for it (in a collective of that call, or the next barrier)
        assert "rank 1: no progress for" in row["error"] and "stopped" in row["error"]
    else:  # rank 0 gave up on its own, 10 s into the wait; the launcher ended rank 1 (SIGTERM, then SIGKILL)
        assert row["status"] == "failed" and "a rank failed" in row["error"], row["error"]
        assert "timed out after" not in row["error"]
        assert "Timed out" in errors["0"] or "timeout" in errors["0"].lower(), errors  # gloo's own word
        assert "it was last in pipeline call" in errors["1"], errors  # where the hung rank stood
        assert time.monotonic() - stopped < limit - 10, took  # well before the job's limit
    print(f"{first} first: {took:.0f} s; {errors}")
    assert took < limit + 60, took  # the limit, the two ending signals' grace, and the row
    assert session_processes(launcher) == []


def test_a_ranks_error_is_read_from_torch_elastics_own_error_file(tmp_path):
    """What the launcher says for a rank: the exception line `record` wrote (torch's ProcessFailure reads
    the file), or the signal that killed it."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from sdbuild.distributed import _failure_text

    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {"message": "ZeroDivisionError: integer modulo by zero",
                                                  "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "0"}}}))
    assert _failure_text(ProcessFailure(0, 123, 1, str(error_file))) == "ZeroDivisionError: integer modulo by zero"
    assert _failure_text(ProcessFailure(1, 124, -9, str(tmp_path / "none.json"))) == "killed by SIGKILL (exit code -9)"


# ---------------------------------------------------------------------------------------------------
# One SLURM task per rank (hydra/launcher=slurm_gpu_parallel): each task a rank, its environment from submitit


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_tasks(out: Path, *overrides: str, ntasks: int = 2) -> list[subprocess.Popen]:
    """The job's tasks as srun starts them under submitit's SLURM executor, on this machine: the same command,
    the variables submitit.JobEnvironment reads (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the node list, the
    job id) and the rendezvous port. Everything else is real: the processes, env:// and gloo."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for rank in range(ntasks):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242",
               "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "MASTER_PORT": str(port)}
        jobs.append(subprocess.Popen([sys.executable, "-m", "sdbuild", "model=tiny_flux", "run.steps=2", "run.warmup=1",
                                      "run.repeats=2", f"hydra.run.dir={out}", *overrides], cwd=ROOT, env=env,
                                     stdout=open(out.parent / f"{out.name}.task{rank}.log", "w+"),
                                     stderr=subprocess.STDOUT, text=True))
    return jobs


def task_logs(jobs: list[subprocess.Popen], out: Path, timeout: float = 900) -> list[str]:
    for job in jobs:
        job.wait(timeout)
    return [(out.parent / f"{out.name}.task{r}.log").read_text() for r in range(len(jobs))]


def wait_for_pipeline_call(progress: Path, deadline: float, running) -> None:
    """Until a rank's progress file says it is in a pipeline call (it writes where it is), the deadline
    passes or `running()` turns false."""
    while time.monotonic() < deadline and running():
        time.sleep(0.5)
        try:
            if "in pipeline call" in json.loads(progress.read_text())["at"]:
                return
        except (OSError, ValueError):
            continue


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


@needs_packages("submitit", install='pip install -e ".[slurm]"')  # the rank: submitit.JobEnvironment
@pytest.mark.slow  # about 30 s on 2 loaded cores: each task imports torch and builds the tiny Flux
def test_two_slurm_tasks_each_run_one_rank_and_only_rank_zero_writes_the_row(tmp_path):
    out = tmp_path / "tasks"
    jobs = slurm_tasks(out, "parallel=ulysses")
    logs = task_logs(jobs, out)
    assert [j.returncode for j in jobs] == [0, 0], logs
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "ok" and row["job"]["launcher"] == "submitit_slurm", row["error"]
    assert row["job"]["hardware"]["slurm_job_id"] == "4242"
    par = row["parallel"]
    assert par["launcher"].startswith("submitit SLURM tasks") and par["world_size"] == 2
    assert (par["backend"], par["mesh"]["dims"]) == ("gloo", {"ring": 1, "ulysses": 2})
    assert [r["rank"] for r in par["ranks"]] == [0, 1] and len({r["pid"] for r in par["ranks"]}) == 2
    assert all(r["threads"]["torch_threads"] == len(os.sched_getaffinity(0)) for r in par["ranks"])  # the task's cores
    assert par["fidelity"]["within_tolerance"] is True, par["fidelity"]
    assert "result:" in logs[0] and "result:" not in logs[1]  # rank 1's task wrote no row and said so
    assert "rank 1 of 2 done; rank 0's task writes the row" in logs[1]
    assert "SLURM task 0 of 2 is rank 0 (rendezvous localhost:" in logs[0]
    assert not any(alive(r["pid"]) for r in par["ranks"])  # each task ended its rank's process


@needs_packages("submitit", install='pip install -e ".[slurm]"')  # the rank: submitit.JobEnvironment
def test_slurm_tasks_that_are_not_the_world_size_are_refused_by_rank_zero_before_loading(tmp_path):
    out = tmp_path / "mismatch"
    jobs = slurm_tasks(out, "parallel=none")
    logs = task_logs(jobs, out, timeout=300)
    assert [j.returncode for j in jobs] == [2, 0], logs
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "unsupported" and "hydra.launcher.tasks_per_node=1" in row["error"], row["error"]
    assert "SLURM started this job as 2 tasks" in logs[0] and "Traceback" not in logs[0] + logs[1]
    assert not (out / "ranks").exists()  # nothing ran


@needs_packages("submitit", install='pip install -e ".[slurm]"')  # the rank: submitit.JobEnvironment
@pytest.mark.slow  # about a minute: the tasks build, then one rank is killed mid-call
def test_a_slurm_tasks_rank_killed_mid_run_fails_the_row_with_each_ranks_error(tmp_path):
    out = tmp_path / "killed"
    jobs = slurm_tasks(out, "parallel=ulysses", "run.steps=50", "run.repeats=50")
    progress = out / "ranks" / "progress" / "1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and all(j.poll() is None for j in jobs):
        time.sleep(0.5)
        try:
            said = json.loads(progress.read_text())
        except (OSError, ValueError):
            continue
        if "in pipeline call 2" in said["at"]:
            break
    victim = json.loads(progress.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    logs = task_logs(jobs, out, timeout=300)
    assert [j.returncode for j in jobs] == [1, 0], logs  # rank 1's task does not fail the SLURM job: rank 0 reports
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "failed" and "2 SLURM tasks" in row["error"] and "a rank failed" in row["error"]
    errors = row["parallel"]["errors"]
    assert sorted(errors) == ["0", "1"] and "exited with code -9" in errors["1"], errors
    print(errors)
    assert errors["0"], errors  # rank 0's own end: gloo lost its peer, or its task stopped it after rank 1 failed
    pids = [json.loads((out / "ranks" / "progress" / r).read_text())["pid"] for r in "01"]
    assert not any(alive(p) for p in pids)


@needs_packages("submitit", install='pip install -e ".[slurm]"')  # the rank: submitit.JobEnvironment
@pytest.mark.slow  # about 1.5 minutes: the tasks build, rank 1 hangs, each task waits out run.timeout_s=60
def test_a_slurm_tasks_hung_rank_ends_within_run_timeout_s_with_each_ranks_word_and_no_process(tmp_path):
    """Per-task mode has no launcher to end the ranks: each task ends its own rank's session at the job's
    limit, and rank 0's row names where each one stood."""
    out = tmp_path / "hung"
    limit = 60
    started = time.monotonic()
    jobs = slurm_tasks(out, "parallel=ulysses", "run.steps=50", "run.repeats=50", f"run.timeout_s={limit}")
    progress = out / "ranks" / "progress" / "1"
    wait_for_pipeline_call(progress, started + limit, lambda: all(j.poll() is None for j in jobs))
    victim = json.loads(progress.read_text())["pid"]
    os.kill(victim, signal.SIGSTOP)
    logs = task_logs(jobs, out, timeout=limit + 120)
    took = time.monotonic() - started
    assert [j.returncode for j in jobs] == [1, 0], logs
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "failed" and f"timed out after {limit} s (run.timeout_s)" in row["error"], row["error"]
    errors = row["parallel"]["errors"]
    assert "ended by its task" in errors["1"] and f"process {victim} stopped" in errors["1"], errors
    assert "ended by its task" in errors["0"] or "stopped by its task" in errors["0"], errors
    assert took < limit + 60, took  # the limit, the ending grace, rank 0's gather
    pids = [json.loads((out / "ranks" / "progress" / r).read_text())["pid"] for r in "01"]
    assert not any(alive(p) for p in pids)
    print(f"task-mode hang: {took:.0f} s; {errors}")
