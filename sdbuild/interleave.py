"""Several recipes measured together: built in one process, their timed calls alternated.

Rows measured one after another are not comparable when the machine's load drifts between them,
and on a shared machine it always drifts. `run_group` builds every member of a group (weights
read once per dtype, as sweeps do), warms each up, then times their calls round-robin
(`sdbuild.measure.measure_group`), so call i of each member saw the same minute of the machine.
Each member gets its own row in its own folder, as a job would write it; a member other than the
group's reference also gets `paired`: the median of its paired speed-ups on the reference with a
95 % interval (`sdbuild.stats`).

When memory cannot hold the whole group (an out-of-memory error while building, or `max_held`
pipelines already held), the members that did not fit are measured in pairs: the others are
released and each one left over is alternated with the reference alone, in its own batch
(`measurement.mode = pairs`, with the reason in `measurement.fallback`).

A `lora=hotswap` member swaps its later adapters in after the whole batch's timed calls, outside them
(`sdbuild.levers.lora.measure_swaps`, under its own switches, as a single job does after its own timed
calls): each swap's time, the call after it and the Dynamo graphs compiled meanwhile are in its row's
`lora.swaps`. No other member calls in between, so the process-wide graph count is the swap's own.

Before each call the member's own process-wide switches (TF32, cuDNN flags), Inductor and Triton
cache folders and thread count are set again; each call goes through `job.pipeline_call`, as a single job's calls do (under
`torch.inference_mode` when `run.inference_mode`). Peak memory is that of the shared process (its
other pipelines included).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import results
from .errors import SpecError
from .results import ERROR_LOG, MeasureMode, Status
from .spec import Spec

log = logging.getLogger("sdbuild")


@dataclasses.dataclass
class Member:
    """One recipe of a group, with where its row goes."""

    spec: Spec
    out_dir: Path
    choices: Dict[str, str]
    overrides: List[str]
    job: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_group(members: Sequence[Member], reference: int = 0, max_held: Optional[int] = None,
              show_progress: bool = False, group_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """Measure `members` interleaved; write and return one row per member (in the order given).

    The reference's run settings (warmup, repeats, interval target, time cap) hold for the group."""
    from .builder import build_pipeline
    from .levers import lora
    from .levers.compile import set_inductor_caches
    from .levers.precision import set_numeric_flags
    from .job import (ImageNotSaved, adherence_fields, base_row, environment, measured_fields, pipeline_call,
                      release_memory, write_row)
    from .measure import Candidate, apply_threads, measure_group
    from .run_inputs import call_kwargs
    from .spec import repeat_count, thread_count
    from .validate import validate

    group_id = group_id or uuid.uuid4().hex[:12]
    rows = [base_row(m.spec, m.choices, m.overrides, m.job) for m in members]
    keys = [r["spec_key"] for r in rows]
    for m in members:
        m.out_dir.mkdir(parents=True, exist_ok=True)
        results.clear_row(m.out_dir)  # a row found there later can only be this group's
    load_before, started = results.machine_load(), time.perf_counter()
    devices: Dict[int, str] = {}
    built: Dict[int, tuple] = {}  # index -> (pipe, info, threads)
    done: Dict[int, Dict[str, Any]] = {}  # index -> fields of a finished row
    during: Dict[int, Any] = {}  # index -> other processes' CPU use during its timed calls (results.CpuWindow)
    leftovers: List[int] = []
    fallback: Optional[str] = None
    run = members[reference].spec.run

    def finish(i: int, status: Status, error: Optional[str], **fields: Any) -> None:
        done[i] = {"status": status.value, "error": error, **fields}

    def fail(i: int, exc: BaseException, tb: str) -> None:
        (members[i].out_dir / ERROR_LOG).write_text(tb)
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        finish(i, Status.failed, ("out of memory: " if _out_of_memory(exc) else "") + text + " (traceback in error.log)")

    def build(i: int) -> None:
        spec = members[i].spec
        threads = apply_threads(thread_count(spec.run))
        pipe, info = build_pipeline(spec, devices[i], reuse_weights=True)
        built[i] = (pipe, info, threads)

    def candidate(i: int) -> Candidate:
        spec, (pipe, _, threads) = members[i].spec, built[i]

        def prepare() -> None:  # the threads recorded are those of its timed calls
            set_numeric_flags(spec)
            set_inductor_caches(spec.compile.cache_dir)  # its own Inductor and Triton folders (compiles lazily)
            threads.update(apply_threads(thread_count(spec.run)))

        label = " ".join(f"{k}={v}" for k, v in results.parse_overrides(members[i].overrides).items())
        # through job.pipeline_call, as a single job's calls: under torch.inference_mode when run.inference_mode
        return Candidate(pipeline_call(spec, pipe), lambda: call_kwargs(spec, pipe, devices[i]), label or f"member {i}",
                         prepare, spec.run.batch_size)

    def swap(i: int) -> None:
        """lora=hotswap: the member's swaps, after the batch's timed calls (none for other modes)."""
        spec, (pipe, info, _) = members[i].spec, built[i]
        set_numeric_flags(spec)
        set_inductor_caches(spec.compile.cache_dir)
        apply_threads(thread_count(spec.run))
        call = pipeline_call(spec, pipe)
        if (swaps := lora.measure_swaps(pipe, spec, lambda: call(**call_kwargs(spec, pipe, devices[i])))):
            info.lora["swaps"] = swaps  # the row's image and latency stay the first adapter's

    def measure_batch(batch: List[int], mode: MeasureMode) -> None:
        group = measure_group([candidate(i) for i in batch], devices[batch[0]], run.warmup, repeat_count(run),
                              show_progress=show_progress, max_warmup=run.max_warmup,
                              reference=batch.index(reference) if reference in batch else 0,
                              interval_target=run.interval_target, max_measure_s=run.max_measure_s,
                              catch_errors=True)
        ref_pos = batch.index(reference) if reference in batch else None
        from .stats import paired_speedup

        for pos, i in enumerate(batch):
            if i in done:  # the reference, measured in an earlier batch
                continue
            if pos in group.failures:
                fail(i, *group.failures[pos])
                continue
            m, (pipe, info, threads) = group.measurements[pos], built[i]
            try:
                fields = measured_fields(members[i].spec, m, info, members[i].out_dir, None)
            except ImageNotSaved as exc:  # measured: the failed row keeps the timings
                finish(i, Status.failed, str(exc), **exc.fields)
                continue
            set_numeric_flags(members[i].spec)  # drawn models: the adherence pass, under this member's flags
            try:
                fields["adherence"] = adherence_fields(members[i].spec, pipe, devices[i])
            except Exception as exc:  # the timings stand; the score could not be taken
                fields["adherence"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            try:  # after the adherence pass: the row's image, latency and score are all the first adapter's
                swap(i)
            except Exception as exc:  # as a single job's: a swap that fails fails the row (traceback in error.log)
                fail(i, exc, traceback.format_exc())
                continue
            if info.lora is not None:
                fields["lora"] = info.lora  # with its swaps
            fields["measurement"] = results.measurement_record(
                mode=mode, repeats=run.repeats, calls=len(m.runs_s), stop=group.stop_reason, threads=threads,
                group=group_id, members=keys, position=i, reference=keys[reference], fallback=fallback)
            if i != reference and ref_pos is not None and ref_pos not in group.failures:
                speedup = paired_speedup(group.measurements[ref_pos].runs_s, m.runs_s)
                fields["paired"] = {**speedup.to_dict(), "reference": keys[reference],
                                    "reference_job": members[reference].job.get("num")}
            status, error = Status.ok, None
            if (broken := results.broken_image(fields.get("image_stats"))):
                status, error = Status.broken, broken
            during[i] = m.load_during  # the batch's timed calls: what other processes used meanwhile
            finish(i, status, error, **fields)

    try:
        for i, m in enumerate(members):
            try:
                devices[i] = validate(m.spec)
            except SpecError as exc:
                finish(i, Status.unsupported, str(exc))
                continue
            if m.spec.parallel.world_size > 1:  # its calls are N processes' collective calls, not this process's
                finish(i, Status.unsupported, f"interleaved measurement calls every member in this one process; "
                       f"parallel={m.spec.parallel.name} runs as {m.spec.parallel.world_size} ranks of their own: "
                       "sweep it with the basic sweeper (its degree-1 reference as another job)")
        order = [reference] + [i for i in range(len(members)) if i != reference]
        for i in order:
            if i in done:
                continue
            if i != reference and devices[i] != devices.get(reference, devices[i]):
                finish(i, Status.unsupported, f"interleaved measurement needs one device for the group: "
                                              f"this recipe runs on {devices[i]}, its reference on {devices[reference]}")
                continue
            if max_held is not None and len(built) >= max_held and i != reference:
                fallback = fallback or f"max_held={max_held}: at most {max_held} pipelines held at once"
                leftovers.append(i)
                continue
            try:
                build(i)
            except Exception as exc:
                if _out_of_memory(exc) and i != reference and reference in built:
                    fallback = fallback or f"out of memory building the group's pipeline {len(built) + 1}: {exc}"
                    release_memory()
                    leftovers.append(i)
                else:
                    fail(i, exc, traceback.format_exc())
        first = [i for i in order if i in built]
        if first:
            measure_batch(first, MeasureMode.interleaved)
        for i in leftovers:  # alternated with the reference alone, in its own batch
            for j in [j for j in built if j != reference]:
                del built[j]
            release_memory()
            try:
                build(i)
            except Exception as exc:
                fail(i, exc, traceback.format_exc())
                continue
            measure_batch([reference, i] if reference in built else [i], MeasureMode.pairs)
    except KeyboardInterrupt as exc:
        signame = getattr(exc, "signame", "SIGINT")
        for i in range(len(members)):
            if i not in done:
                finish(i, Status.failed, f"interrupted ({signame}) before the group's measurement finished")
                rows[i]["job"]["interrupted"] = signame
        raise
    finally:
        built.clear()
        after = results.machine_load()
        for i, row in enumerate(rows):
            row.update(done.get(i) or {"status": Status.failed.value, "error": "the group stopped before this recipe "
                                       "was measured"})
            row["env"] = environment(devices.get(i))
            row["job"]["wall_s"] = time.perf_counter() - started
            row["machine_load"] = results.load_record(load_before, after, during.get(i))
            if row.get("peak_memory_mb") is not None:
                row["peak_memory_scope"] = results.memory_scope(devices.get(i), isolated_process=False)
            write_row(members[i].out_dir, row)
        release_memory()
    return rows
