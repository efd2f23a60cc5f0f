"""The tuner's state file in the sweep folder (`ladder_state.json`): what a resumed run needs.

It holds the next free job number (job folders never collide across batches or runs, even for a
job killed before it wrote its row) and each launched job's number and spec key. The rows
themselves stay in the job folders, the only record of a measurement: a rerun of the same
command in the same sweep folder (`hydra.sweep.dir=...`) reuses every row it finds there and
measures only what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

STATE = "ladder_state.json"


@dataclass
class LadderState:
    next_job: int = 0
    jobs: List[Dict[str, Any]] = field(default_factory=list)  # {num, spec_key, overrides}
    runs: List[Dict[str, Any]] = field(default_factory=list)  # {started, launched, reused}

    @classmethod
    def load(cls, sweep_dir: Path) -> "LadderState":
        path = sweep_dir / STATE
        if not path.exists():
            return cls(next_job=_next_free_job(sweep_dir))
        try:
            data = json.loads(path.read_text())
            state = cls(**{k: data[k] for k in ("next_job", "jobs", "runs") if k in data})
            state.next_job = int(state.next_job)
        except (OSError, ValueError, TypeError) as exc:  # truncated (a full disk), edited, not ours
            from sdbuild.sweep import SweepError

            raise SweepError(f"{path} cannot be read ({type(exc).__name__}: {exc}). The rows are in the job "
                             f"folders: delete {path.name} (job numbers start above the existing folders) and rerun, "
                             f"or use another hydra.sweep.dir") from None
        state.next_job = max(state.next_job, _next_free_job(sweep_dir))
        return state

    def start_run(self) -> Dict[str, Any]:
        self.runs.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "launched": 0, "reused": 0})
        return self.runs[-1]

    def reserve(self, planned: List[Dict[str, Any]]) -> int:
        """Number the jobs of a batch (before launching it) and return the first number."""
        first = self.next_job
        for i, job in enumerate(planned):
            self.jobs.append({"num": first + i, **job})
        self.next_job += len(planned)
        self.runs[-1]["launched"] += len(planned)
        return first

    def save(self, sweep_dir: Path) -> None:
        from sdbuild.results import write_atomic

        write_atomic(sweep_dir / STATE, json.dumps(asdict(self), indent=2))


def _next_free_job(sweep_dir: Path) -> int:
    """Above every numbered folder already in the sweep folder (e.g. a grid sweep's jobs)."""
    nums = [int(p.name) for p in sweep_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(nums, default=-1) + 1
