"""`python -m sdbuild.worker JOB_DIR --rows-fd N`: run the jobs a sweep's process hands over, exactly as
it composed them.

A sweep job with a time limit (and every `isolate=true` job) runs in a process of its own (see
`sdbuild.job.run_in_fresh_process`). That process composes nothing: it gets the parent's typed spec
as plain data (`spec_to_dict`, read back literally by `to_spec`), with the row's labels (choices,
overrides, job) and its folder, as one JSON line on stdin. So whatever composed the job in the
parent (`hydra.searchpath`, `--config-dir`, a sweep folder with a comma, a preset from a package,
`hydra.job.env_set`, whose variables the child inherits) has already done its work, and the child
runs the very spec its parent recorded. Each finished job's row goes back as one JSON line on the
file descriptor `--rows-fd`, also when `result.json` could not be written (a full disk): the parent
keeps the measurement either way.

JOB_DIR is the first job's folder, only so that the process can be told apart (`ps`, tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional


def _send(fd: int, row: Dict[str, Any]) -> None:
    """The row back to the parent, as one line; a parent that has gone away is not an error here."""
    from .results import _strict_json

    data = (json.dumps(_strict_json(row), default=str) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def run_one(line: str, rows_fd: int) -> Optional[str]:
    """Run the job of one request line, send its row; the name of the signal that interrupted it, if any."""
    from .app import interrupts_as_exceptions
    from .errors import SpecError
    from .job import Interrupted, environment, run_job
    from .results import Status, new_row
    from .spec import to_spec

    job = json.loads(line)
    out_dir = Path(job["out_dir"])
    try:
        spec = to_spec(job["spec"])  # plain data: nothing in it is evaluated
    except SpecError as exc:  # the parent's own spec: only a schema that changed under it
        row = new_row(status=Status.unsupported.value, error=str(exc), choices=job["choices"],
                      overrides=job["overrides"], job=job["job"], env=environment(None))
        _send(rows_fd, row)
        return None
    with interrupts_as_exceptions():
        try:
            row = run_job(spec, out_dir, job["choices"], job["overrides"], job=job["job"], show_progress=False)
        except KeyboardInterrupt as exc:  # the row is written; send it and stop
            if isinstance(getattr(exc, "row", None), dict):
                _send(rows_fd, exc.row)
            return exc.signame if isinstance(exc, Interrupted) else "SIGINT"
    _send(rows_fd, row)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdbuild.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("job_dir", help="the (first) job's folder: names this process, nothing is read from it")
    parser.add_argument("--rows-fd", type=int, required=True, help="file descriptor the rows are written to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for line in sys.stdin:
        if not line.strip():
            continue
        if run_one(line, args.rows_fd):
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
