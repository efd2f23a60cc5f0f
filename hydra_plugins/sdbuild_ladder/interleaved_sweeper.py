"""`hydra/sweeper=interleaved`: a grid sweep whose rows are comparable on a shared machine.

    python -m sdbuild --multirun hydra/sweeper=interleaved attention=classic,sdpa memory_format=contiguous,channels_last

Every combination of the swept overrides (the basic sweeper's grid, in the same order) is built in
this one process and their timed calls are alternated (sdbuild.interleave.run_group): call i of
each saw the same minute of the machine. The first combination is the reference; every other row
records its paired speed-up on it with a 95 % interval (`paired`), which the report shows beside
the usual median speed-up. One row per combination, in numbered job folders, as the basic sweeper
writes them; the report follows from sdbuild's sweep callback. The launcher is not used (all
pipelines must share one process), so `isolate=true` and cluster launchers do not apply here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from .ladder_sweeper import LadderError, LadderSweeper
from ._rows import index_sweep_dir
from ._state import LadderState


class InterleavedSweeper(LadderSweeper):
    def __init__(self, params: Optional[Dict[str, str]] = None, max_held: Optional[int] = None) -> None:
        super().__init__(params=params, psnr_db=None, interleave=True, max_held=max_held, second_pass=False)

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        self._check_measurement_settings()
        self.axes, self.fixed = self._axes(arguments)
        if not self.axes:
            raise LadderError("hydra/sweeper=interleaved: nothing is swept; give at least one key=a,b")
        combos = self._grid()
        for choices in combos:  # a misspelt option fails here, before any pipeline is built
            self._compose(self._overrides(choices))
        if self.config.get("dry_run"):
            return self._dry_run("interleaved")
        self.sweep_dir = Path(self.config.hydra.sweep.dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        if self.config.get("isolate"):
            print("[interleaved] isolate=true does not apply: the grid's pipelines share this process", flush=True)
        self.state = LadderState.load(self.sweep_dir)
        self.run = self.state.start_run()
        self.found = index_sweep_dir(self.sweep_dir)
        self.cache, self.returns, self.baseline = {}, [], None
        print(f"[interleaved] {len(combos)} combinations built in one process, their timed calls alternated; "
              f"reference: {' '.join(self._overrides(combos[0])[len(self.fixed):]) or 'the first'}", flush=True)
        self._measure_interleaved(combos)
        self.state.save(self.sweep_dir)
        return self.returns
