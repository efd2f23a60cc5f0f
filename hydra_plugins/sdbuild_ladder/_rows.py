"""Where the ladder gets its rows: from a finished job, and from what a sweep folder already holds.

`read_row` is the one place the tuner reads a row; it validates through `sdbuild.results` (the
row's owner), so a row that cannot be trusted is never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from sdbuild import results
from sdbuild.results import RESULT_FILE as RESULT
from sdbuild.results import Status

# Rows a resumed tuner reuses. A `failed` row is measured again: it may be the interruption itself.
REUSABLE = (Status.ok.value, Status.broken.value, Status.unsupported.value)


def read_row(job_return: Any = None, folder: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """The row of one job: the task's return value when it is the row (a dict), else the
    `result.json` in the job's folder (from `job_return`'s Hydra config, or `folder`).
    None when there is no readable row (the job died before writing one)."""
    if job_return is not None:
        try:
            value = job_return.return_value  # re-raises the task's exception when the job failed
        except Exception:
            value = None
        if isinstance(value, dict) and "status" in value:
            return value
        if folder is None and job_return.hydra_cfg is not None:
            folder = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
    if folder is None:
        return None
    try:
        return results.read_row(Path(folder) / RESULT)
    except (OSError, results.RowError):
        return None


def index_sweep_dir(sweep_dir: Path) -> Dict[str, Tuple[Dict[str, Any], Path]]:
    """spec_key -> (row, job folder) for every reusable row already in the sweep folder (the jobs
    of an earlier, perhaps interrupted, tuner run in the same folder). Later jobs win."""
    found: Dict[str, Tuple[Dict[str, Any], Path]] = {}
    for path in sorted(sweep_dir.glob(f"*/{RESULT}"), key=lambda p: _job_order(p.parent.name)):
        row = read_row(folder=path.parent)
        if row and row.get("status") in REUSABLE and row.get("spec_key"):
            found[row["spec_key"]] = (row, path.parent)
    return found


def _job_order(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
