"""Reading a sweep folder: every job's row (through sdbuild.results) plus the planned jobs with no row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import results
from ..results import Status

MISSING_ERROR = "no row: the job never finished (the sweep was killed or is still running, or the job's process died)"


@dataclass
class Loaded:
    """The rows of a sweep folder in report order, and what was set aside."""

    rows: list[dict]
    planned: Optional[int] = None  # jobs in plan.json (None: no plan recorded)
    ignored: list[str] = field(default_factory=list)  # rows that are not part of this sweep's plan
    plan_error: Optional[str] = None  # plan.json is there but cannot be read: every row is unplanned


def find_result_files(sweep_dir: Path) -> list[Path]:
    """``result.json`` files one or two folders below the sweep folder (unordered), ``.hydra`` skipped."""
    name = results.RESULT_FILE
    found = set(sweep_dir.glob(f"*/{name}")) | set(sweep_dir.glob(f"*/*/{name}"))
    return [p for p in found if ".hydra" not in p.relative_to(sweep_dir).parts]


def existing_dir(sweep_dir: str | Path) -> Path:
    """The sweep folder as a Path; a clear FileNotFoundError when it is not a folder."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    return root


class PlanError(ValueError):
    """plan.json exists but cannot be read."""


def read_plan(root: Path) -> Optional[list[dict]]:
    """plan.json's jobs ({"num", "overrides"}); None when there is none; PlanError when it cannot be read."""
    path = root / results.PLAN_FILE
    if not path.exists():
        return None
    try:
        jobs = json.loads(path.read_text())["jobs"]
        return [{"num": int(j["num"]), "overrides": [str(o) for o in j["overrides"]]} for j in jobs]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{type(exc).__name__}: {exc}") from None


def _report_row(root: Path, path: Path) -> dict:
    """A validated row (``unreadable`` when it cannot be trusted), with ``job`` = its folder
    relative to the sweep (the row's own job dict kept as ``job_info``) and ``path``."""
    row = results.load_row(path)
    row["job_info"] = row.get("job") or {}
    row.update(job=path.parent.relative_to(root).as_posix(), path=str(path))
    return row


def _missing_row(job: dict) -> dict:
    row = results.new_row(status=Status.missing.value, error=MISSING_ERROR, overrides=job["overrides"])
    row.update(job_info={"num": job["num"]}, job=str(job["num"]), path=None)
    return row


def _memory_row(num: int, row: dict) -> dict:
    """A row its job's folder could not take, held in memory by the sweep (see sdbuild.job.write_row)."""
    row = results.validate(dict(row))
    row["job_info"] = row.get("job") or {}
    row.update(job=str(num), path=None)
    return row


def load(sweep_dir: str | Path, unwritten: Optional[dict[int, dict]] = None) -> Loaded:
    """Every row of the sweep folder plus a ``missing`` row for each planned job without one.

    With a plan, a numbered job folder outside it holds an earlier sweep's row: it is set aside
    (listed in ``ignored``), never mixed in; a row whose overrides are not the plan's for its
    folder was written by another sweep and is ``unreadable``.
    """
    root = existing_dir(sweep_dir)
    rows = [_report_row(root, path) for path in find_result_files(root)]
    if unwritten:  # in place of whatever the job's folder holds
        rows = [r for r in rows if not (r["job"].isdigit() and int(r["job"]) in unwritten)]
        rows += [_memory_row(num, row) for num, row in unwritten.items()]
    loaded = Loaded(rows)
    try:
        plan = read_plan(root)
    except PlanError as exc:
        plan, loaded.plan_error = None, str(exc)
    if plan is not None:
        by_num = {str(j["num"]): j for j in plan}
        kept = []
        for row in rows:
            if row["job"].isdigit() and row["job"] not in by_num:
                loaded.ignored.append(row["job"])
                continue
            planned = by_num.get(row["job"])
            if (planned and row["status"] != Status.unreadable.value
                    and results.parse_overrides(row["overrides"]) != results.parse_overrides(planned["overrides"])):
                row.update(status=Status.unreadable.value,
                           error=f"its overrides {row['overrides']} are not this sweep's for job {row['job']} "
                                 f"({planned['overrides']}): written by another sweep")
            kept.append(row)
        present = {r["job"] for r in kept}
        kept += [_missing_row(j) for j in plan if str(j["num"]) not in present]
        loaded.rows, loaded.planned = kept, len(plan)
    loaded.rows.sort(key=_row_order)
    return loaded


def load_rows(sweep_dir: str | Path) -> list[dict]:
    """The rows of :func:`load`, in report order."""
    return load(sweep_dir).rows


def _job_key(job: str) -> tuple:
    """Sort key for a job folder: numeric parts by number ("2" before "10"), then by name."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in job.split("/"))


def _row_order(row: dict) -> tuple:
    """Rows with a ``preset_order`` first, by it; then everything by job number."""
    order = row.get("preset_order")
    return (order is None, order or 0, _job_key(row["job"]))
