"""`hydra/sweeper=ladder`: find the fastest recipe as a ladder, one lever at a time (the seed's method).

    python -m sdbuild --multirun hydra/sweeper=ladder precision=fp32,bf16 attention=classic,sdpa compile=none,trace

The swept overrides are the axes, their values the options (the first value is the baseline,
unless `hydra.sweeper.start` says otherwise); the other overrides hold for every job. From the
baseline the ladder walks the axes in `order`; each step launches every option of the axis on top
of the recipe kept so far as one batch through the configured launcher (basic, `isolate=true`,
submitit...), reads each job's row, and keeps the fastest admissible option (hydra_plugins/
sdbuild_ladder/ladder.py says which). A recipe is never measured twice: rows are cached by spec
key within the run, and rows already in the sweep folder (an earlier, interrupted run of the same
command with the same `hydra.sweep.dir`) are reused. Job numbers keep increasing across batches
and runs (ladder_state.json), so job folders never collide.

Outputs in the sweep folder: ladder.md, ladder.json, ladder.html, and the winner as a preset
(default `preset/ladder.yaml`); the usual report (report.md, index.html) follows from sdbuild's
sweep callback, over every row the ladder measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from sdbuild.fidelity import FIDELITY_BOUND_DB

from ._ladder import DEFAULT_ORDER, Bounds, Measured, NoiseRule, Step, Trial, Verdict, choose, measure_fidelity
from ._rows import index_sweep_dir, read_row
from ._state import LadderState
from sdbuild.stats import describe


class LadderError(CompactHydraException):
    """A mistake in the ladder's settings or a ladder that cannot start: Hydra prints the message only.
    Raised before any job ran, it is a user's mistake: `python -m sdbuild` then exits 2, not Hydra's 1
    (`raised` tells it one was raised in this process)."""

    raised = False

    def __init__(self, *args) -> None:
        super().__init__(*args)
        LadderError.raised = True


class LadderSweeper(Sweeper):
    def __init__(self, params: Optional[Dict[str, str]] = None, order: Optional[Sequence[str]] = None,
                 start: Optional[Dict[str, str]] = None, psnr_db: Optional[float] = FIDELITY_BOUND_DB,
                 ssim: Optional[float] = None, adherence_drop: Optional[float] = None,
                 memory_mb: Optional[float] = None, noise: Optional[NoiseRule] = None, min_gain: float = 0.0,
                 second_pass: bool = True, preset_path: Optional[str] = None, interleave: bool = False,
                 max_held: Optional[int] = None) -> None:
        super().__init__()
        self.params = dict(params or {})
        self.order = list(order) if order is not None else None
        self.start = {str(k): str(v) for k, v in (start or {}).items()}
        noise = NoiseRule(noise) if isinstance(noise, str) else noise
        if noise is None:  # paired intervals where the calls are paired, else the spread rule
            noise = NoiseRule.paired if interleave else NoiseRule.spread
        self.interleave, self.max_held = interleave, max_held
        self.bounds = Bounds(psnr_db=psnr_db, ssim=ssim, adherence_drop=adherence_drop, memory_mb=memory_mb,
                             noise=noise, min_gain=min_gain)
        self.second_pass = second_pass
        self.preset_path = preset_path
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _check_measurement_settings(self) -> None:
        if self.bounds.noise == NoiseRule.paired and not self.interleave:
            raise LadderError("hydra.sweeper.noise=paired needs paired calls: add hydra.sweeper.interleave=true "
                              "(each step's options measured alternately in one process), or use noise=spread")
        if self.max_held is not None and self.max_held < 2:
            raise LadderError(f"hydra.sweeper.max_held={self.max_held}: an interleaved step holds at least 2 "
                              f"pipelines (the current recipe and one option); use 2 or more, or null for no limit")

    # -----------------------------------------------------------------------------------------
    # Axes, order, start

    def _axes(self, arguments: List[str]) -> tuple[Dict[str, List[str]], List[str]]:
        """Swept keys -> options (in the order given), and the fixed overrides every job gets."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        values: Dict[str, List[str]] = {}
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)):
            key = o.get_key_element()
            if o.is_sweep_override():
                if not o.is_discrete_sweep():
                    raise LadderError(f"hydra/sweeper=ladder: {o.input_line!r} is a {o.value_type.name} sweep; "
                                      f"the ladder needs a list of options (key=a,b,c or range(...))")
                values[key] = list(dict.fromkeys(o.sweep_string_iterator()))
            else:
                values[key] = [o.get_value_element_as_str()]
        axes = {k: v for k, v in values.items() if len(v) > 1}
        fixed = [f"{k}={v[0]}" for k, v in values.items() if len(v) == 1]
        return axes, fixed

    def _walk_order(self, axes: Dict[str, List[str]]) -> List[str]:
        names = {k.lstrip("+~"): k for k in axes}
        if self.order is None:
            chosen = [names[n] for n in DEFAULT_ORDER if n in names]
        else:
            unknown = [n for n in self.order if n.lstrip("+~") not in names]
            if unknown:
                verb = "is" if len(unknown) == 1 else "are"
                raise LadderError(f"hydra.sweeper.order names {unknown}, which {verb} not swept; swept axes: "
                                  f"{list(names)}. Sweep it (key=a,b) or drop it from the order.")
            chosen = list(dict.fromkeys(names[n.lstrip("+~")] for n in self.order))
        return chosen + [k for k in axes if k not in chosen]

    def _start(self, axes: Dict[str, List[str]]) -> Dict[str, str]:
        names = {k.lstrip("+~"): k for k in axes}
        start = {k: options[0] for k, options in axes.items()}
        for name, value in self.start.items():
            key = names.get(name.lstrip("+~"))
            if key is None:
                raise LadderError(f"hydra.sweeper.start.{name}: {name!r} is not a swept axis; swept: {list(names)}")
            if value not in axes[key]:
                raise LadderError(f"hydra.sweeper.start.{name}={value}: not one of the swept options "
                                  f"{axes[key]}; add it to the sweep ({key}={','.join([value, *axes[key]])})")
            start[key] = value
        return start

    # -----------------------------------------------------------------------------------------
    # Measuring

    def _overrides(self, choices: Dict[str, str]) -> List[str]:
        return self.fixed + [f"{k}={choices[k]}" for k in self.axes]

    def _compose(self, overrides: List[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)

    def _grid(self) -> List[Dict[str, str]]:
        """Every combination of the swept options, in the basic sweeper's order."""
        return [dict(zip(self.axes, values)) for values in itertools.product(*self.axes.values())]

    def _dry_run(self, name: str) -> List[Any]:
        """`dry_run=true`: every combination's build plan or refusal (a ladder's later steps depend on
        measurements, so it shows the whole grid it could walk); nothing is built, measured or written."""
        from sdbuild.dryrun import say

        combos = self._grid()
        print(f"[{name}] dry run: {len(combos)} combinations checked, none measured", flush=True)
        for i, choices in enumerate(combos, 1):
            print(f"[{name}] {i}/{len(combos)}: {' '.join(self._overrides(choices))}", flush=True)
            say(self._compose(self._overrides(choices)))
        return []

    def _spec_key(self, overrides: List[str]) -> str:
        """The recipe's identity, from its composed spec (so two spellings of one recipe are one)."""
        return self._recipe(overrides)[0]

    def _recipe(self, overrides: List[str]) -> tuple[str, int]:
        """The recipe's spec key and how many ranks it runs as (parallel.world_size), from its composed spec."""
        from sdbuild.spec import spec_key, spec_to_dict, to_spec

        spec = to_spec(self._compose(overrides))
        return spec_key(spec_to_dict(spec)), spec.parallel.world_size

    def _not_interleavable(self, assignments: List[Dict[str, str]]) -> Optional[str]:
        """Why these recipes cannot be measured interleaved in this process (None: they can). A recipe
        run as N > 1 ranks makes collective calls in N processes of its own (sdbuild.distributed), which
        one process cannot alternate with another recipe's calls (sdbuild.interleave refuses it)."""
        ranks = {" ".join(f"{k}={a[k]}" for k in self.axes): n
                 for a in assignments if (n := self._recipe(self._overrides(a))[1]) > 1}
        if not ranks:
            return None
        named = "; ".join(f"{label} runs as {n} ranks" for label, n in ranks.items())
        return (f"measured as separate jobs, not interleaved: {named}, processes of their own whose collective "
                f"calls one process cannot alternate with another recipe's; judged by the "
                f"{self._step_bounds(True).noise.value} rule")

    def _step_bounds(self, separate_jobs: bool) -> Bounds:
        """The rules for a step: the ladder's own, but a step measured as separate jobs in an interleaved
        ladder has no paired calls, so the paired rule gives way to the spread rule there."""
        if separate_jobs and self.bounds.noise == NoiseRule.paired:
            return dataclasses.replace(self.bounds, noise=NoiseRule.spread)
        return self.bounds

    def _measure_interleaved(self, assignments: List[Dict[str, str]]) -> List[Measured]:
        """One Measured per assignment, all measured together by sdbuild.interleave.run_group: built
        in this process, their timed calls alternated; the first assignment is the reference (the
        current recipe). Never reused from earlier rows: a comparison is only as good as its pairs."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        from sdbuild.interleave import Member, run_group
        from sdbuild.spec import GROUPS, to_spec

        out, members = [], []
        for choices in assignments:
            overrides = self._overrides(choices)
            key, ranks = self._recipe(overrides)
            out.append(Measured(dict(choices), overrides, key, world_size=ranks))
        first = self.state.reserve([{"spec_key": m.spec_key, "overrides": m.overrides} for m in out])
        self.state.save(self.sweep_dir)
        for n, m in enumerate(out):
            cfg = self._compose(m.overrides)
            with open_dict(cfg):
                cfg.hydra.job.num = first + n
            HydraConfig.instance().set_config(cfg)
            folder = self.sweep_dir / str(cfg.hydra.sweep.subdir)
            runtime = cfg.hydra.runtime.choices
            choices = {g: runtime[g] for g in GROUPS if runtime.get(g)}
            members.append(Member(to_spec(cfg), folder, choices, list(m.overrides),
                                  {"num": first + n, "output_dir": str(folder)}))
            self.cache.setdefault(m.spec_key, m)
        rows = run_group(members, reference=0, max_held=self.max_held)
        self.returns.append(rows)
        for m, member, row in zip(out, members, rows):
            m.row, m.folder = row, member.out_dir
        if self.baseline is not None:
            for m in out:
                measure_fidelity(m, self.baseline)
        return out

    def _measure(self, assignments: List[Dict[str, str]]) -> List[Measured]:
        """A Measured per assignment: cached, reused from the sweep folder, or launched as one batch."""
        out, batch = [], []
        for choices in assignments:
            overrides = self._overrides(choices)
            key, ranks = self._recipe(overrides)
            m = self.cache.get(key)
            if m is None:
                m = self.cache[key] = Measured(dict(choices), overrides, key, world_size=ranks)
                if key in self.found:
                    m.row, m.folder = self.found[key]
                    m.reused = True
                    self.run["reused"] += 1
                else:
                    batch.append(m)
            out.append(m)
        if batch:
            first = self.state.reserve([{"spec_key": m.spec_key, "overrides": m.overrides} for m in batch])
            self.state.save(self.sweep_dir)
            returns = self.launcher.launch([m.overrides for m in batch], initial_job_idx=first)
            self.returns.append(returns)
            for m, ret in zip(batch, returns):
                m.row = read_row(ret)
                m.folder = _job_folder(ret, m.row)
                if m.row and m.row.get("spec_key") not in (None, m.spec_key):
                    print(f"[ladder] warning: job {m.row.get('job', {}).get('num')} measured spec "
                          f"{m.row['spec_key']}, expected {m.spec_key}", flush=True)
        if self.baseline is not None:
            for m in out:
                if m.psnr_db is None and m.fidelity_error is None:
                    measure_fidelity(m, self.baseline)
        return out

    # -----------------------------------------------------------------------------------------
    # The ladder

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        started = time.perf_counter()
        self._check_measurement_settings()
        self.axes, self.fixed = self._axes(arguments)
        order, start = self._walk_order(self.axes), self._start(self.axes)
        for key in order:  # a misspelt option fails here, before any job runs
            for option in self.axes[key]:
                self._compose(self._overrides({**start, key: option}))
        if self.config.get("dry_run"):
            return self._dry_run("ladder")
        self.sweep_dir = Path(self.config.hydra.sweep.dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.state = LadderState.load(self.sweep_dir)
        self.run = self.state.start_run()
        self.found = index_sweep_dir(self.sweep_dir)
        self.cache: Dict[str, Measured] = {}
        self.returns: List[Any] = []
        self.baseline: Optional[Measured] = None
        self.second_note: Optional[str] = None  # how the second pass was measured, when not as the settings say
        grid = math.prod(len(v) for v in self.axes.values())
        walk = ", ".join(f"{k} {{{','.join(self.axes[k])}}}" for k in order)
        print(f"[ladder] {len(self.axes)} axes in this order: {walk} ({grid} combinations in the full grid); "
              f"{len(self.found)} rows already in {self.sweep_dir}", flush=True)

        steps: List[Step] = []
        current = dict(start)
        for key in order or [None]:
            options = [{**current, key: o} for o in self.axes[key]] if key else [current]
            separate = self._not_interleavable(options) if self.interleave else None
            if self.interleave and separate is None:  # the current recipe first: the reference of the step's pairs
                print(f"[ladder] step {len(steps) + 1}: {len(options)} recipes of {key} measured interleaved",
                      flush=True)
                measured = self._measure_interleaved([current] + [o for o in options if o != current])
                incumbent = measured[0]
            else:
                if separate:
                    print(f"[ladder] step {len(steps) + 1}: {len(options)} recipes of {key} {separate}", flush=True)
                measured = self._measure(options)
                incumbent = self._measure([current])[0]
            if self.baseline is None:
                self.baseline = incumbent
                if not incumbent.ok:
                    self._finish(steps, incumbent, [], None, started, grid, order, start)
                    raise LadderError(
                        f"hydra/sweeper=ladder: the baseline ({incumbent.label(order)}) is {incumbent.status}: "
                        f"{(incumbent.row or {}).get('error') or 'no row'}. Start from a recipe that runs here: "
                        f"put a supported option first in each axis or set +hydra.sweeper.start.<axis>=<option>.")
                for m in self.cache.values():
                    measure_fidelity(m, incumbent)
            if key is None:
                break
            verdict = Verdict.baseline if incumbent is self.baseline else Verdict.current
            kept, trials = choose(incumbent, measured, self._step_bounds(separate is not None), verdict)
            steps.append(Step(key, incumbent, kept, trials, note=separate))
            note = f"kept {key}={kept.choices[key]}" + ("" if kept is not incumbent else " (no other option qualified)")
            gain = (f"paired {describe(kept.paired_on(incumbent))} on the step's current recipe"
                    if kept.paired_on(incumbent) else f"x{self.baseline.median / kept.median:.2f} on the baseline")
            print(f"[ladder] step {len(steps)}: {note}; median {kept.median:.4f} s, {gain}", flush=True)
            current = dict(kept.choices)

        winner = steps[-1].kept if steps else self.baseline
        second: List[Trial] = []
        if self.second_pass:
            levers = [k for k in order if winner.choices[k] != start[k]]
            if levers:
                dropped = [{**winner.choices, k: start[k]} for k in levers]
                reference = winner
                separate = self._not_interleavable([dict(winner.choices)] + dropped) if self.interleave else None
                if self.interleave and separate is None:  # the winner measured again, alternated with each drop
                    drops = self._measure_interleaved([dict(winner.choices)] + dropped)
                    reference = drops[0]  # listed in the second pass as `current`, the drops' reference
                else:
                    if separate:
                        print(f"[ladder] second pass: {separate}", flush=True)
                        self.second_note = separate
                    drops = self._measure(dropped)
                best, second = choose(reference, drops, self._step_bounds(separate is not None), Verdict.current)
                if best is not reference:
                    print(f"[ladder] second pass: without {_dropped(best, winner, order)} the recipe is "
                          f"faster beyond noise; it becomes the winner", flush=True)
                    winner = best
        self._finish(steps, winner, second, None, started, grid, order, start, write_preset=True)
        return self.returns

    def _finish(self, steps, winner, second, preset, started, grid, order, start, write_preset=False) -> None:
        from . import _render as render

        self.state.save(self.sweep_dir)
        ladder = render.Ladder(
            axes=self.axes, order=order, start=start, fixed=self.fixed, bounds=self.bounds, baseline=self.baseline,
            steps=steps, second_pass=second, winner=winner, preset=preset, grid_size=grid,
            launched=self.run["launched"], reused=self.run["reused"], launched_all_runs=len(self.state.jobs),
            recipes=len(self.cache), wall_s=time.perf_counter() - started, runs=len(self.state.runs),
            interleaved=self.interleave, extra={"second_pass_note": self.second_note} if self.second_note else {})
        if write_preset:
            preset = ladder.preset = self._write_preset(winner, ladder)
        paths = render.write_outputs(ladder, self.sweep_dir)
        print(f"[ladder] {ladder.launched} jobs launched, {ladder.reused} rows reused, {ladder.recipes} recipes "
              f"of {grid} in the full grid; {paths['md']}" + (f"; winner preset: {preset}" if preset else ""),
              flush=True)

    def _write_preset(self, winner: Measured, ladder: Any) -> Optional[Path]:
        """The winner as a `# @package _global_` preset: its group choices, then every field its
        spec sets beyond what those choices compose to (e.g. run.steps from the command line)."""
        from sdbuild.spec import GROUPS, spec_to_dict, to_spec

        from . import _render as render

        choices = {g: o for g, o in ((winner.row or {}).get("choices") or {}).items() if g in GROUPS}
        if not winner.ok or not choices:
            return None
        path = Path(self.preset_path) if self.preset_path else self.sweep_dir / "preset" / "ladder.yaml"
        wanted = spec_to_dict(to_spec(self._compose(winner.overrides)))
        plain = spec_to_dict(to_spec(self._compose([f"{g}={o}" for g, o in choices.items()])))
        fields = render.spec_diff(wanted, plain)
        speedup = self.baseline.median / winner.median
        fidelity = "identical pixels" if winner.psnr_db == math.inf else f"PSNR {winner.psnr_db:.1f} dB"
        comment = (f"The fastest recipe the ladder found in {self.sweep_dir}: median {winner.median:.4f} s, "
                   f"x{speedup:.2f} on its baseline, {fidelity} against it "
                   f"({_machine(self.baseline)}). {render.preset_notes(ladder)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render.preset_yaml(path.stem, choices, fields, comment, path))
        return path


def _job_folder(job_return: Any, row: Optional[Dict[str, Any]]) -> Optional[Path]:
    if job_return.hydra_cfg is not None:
        return Path(job_return.hydra_cfg.hydra.runtime.output_dir)
    out = ((row or {}).get("job") or {}).get("output_dir")
    return Path(out) if out else None


def _dropped(m: Measured, winner: Measured, order: Sequence[str]) -> str:
    return " ".join(f"{k}={winner.choices[k]}" for k in order if m.choices[k] != winner.choices[k])


def _machine(m: Optional[Measured]) -> str:
    env = ((m.row if m else None) or {}).get("env") or {}
    return env.get("device_name") or env.get("cpu") or "unknown machine"
