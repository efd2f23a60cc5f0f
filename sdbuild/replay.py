"""`python -m sdbuild.replay RUN_DIR`: rerun exactly the spec a past run recorded.

The recorded `spec` (from RUN_DIR/result.json) is the whole input: it is checked against the
typed schema like any config (unknown keys refused) and run through `sdbuild.run`, the CLI's own
path, into a new `outputs/runs/<time>` folder with the old labels. No Hydra config is composed,
so nothing but data is read from the old run. Then it prints the new median beside the recorded
one and every environment fact that differs (versions, device, flags).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .results import Status

# Environment facts that are expected to change between any two runs.
_NOT_COMPARED = {"pid"}


def load_row(path: str | Path) -> Dict[str, Any]:
    """The row recorded in a run folder (or a result.json given directly)."""
    from .results import RESULT_FILE, RowError, read_row

    path = Path(path)
    result = path / RESULT_FILE if path.is_dir() else path
    if not result.is_file():
        raise SystemExit(f"sdbuild.replay: {result} does not exist: give a run folder that holds a {RESULT_FILE}")
    try:
        row = read_row(result)  # validated: a row that cannot be trusted is not replayed
    except RowError as exc:
        raise SystemExit(f"sdbuild.replay: {result} cannot be trusted ({exc}): nothing to replay") from None
    if not isinstance(row.get("spec"), dict) or not row["spec"]:  # absent: never the defaults under old labels
        raise SystemExit(f"sdbuild.replay: {result} records no spec (status {row.get('status')!r}): nothing to replay")
    return row


def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def env_differences(old: Optional[Dict[str, Any]], new: Optional[Dict[str, Any]]) -> List[str]:
    """`name: old -> new` for every environment fact (flags included) that differs."""
    old, new = _flatten(old or {}), _flatten(new or {})
    return [f"{key}: {old.get(key)} -> {new.get(key)}" for key in sorted(old.keys() | new.keys())
            if key not in _NOT_COMPARED and old.get(key) != new.get(key)]


def median(row: Dict[str, Any]) -> Optional[float]:
    return (row.get("latency_s") or {}).get("median")


def compare(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    """The lines replay prints: both medians, their ratio, and what differs in the environment."""
    lines = []
    before, after = median(old), median(new)
    if before is not None and after is not None:
        ratio = after / before
        lines.append(f"median {after:.3f} s now vs {before:.3f} s recorded (x{ratio:.2f}, "
                     f"{'slower' if ratio > 1 else 'faster' if ratio < 1 else 'same'})")
    else:
        lines.append(f"median now: {after if after is None else f'{after:.3f} s'} ({new['status']}); "
                     f"recorded: {before if before is None else f'{before:.3f} s'} ({old.get('status')})")
    if new.get("spec_key") != old.get("spec_key"):  # only when the schema's defaults changed since
        lines.append(f"note: spec key {old.get('spec_key')} recorded, {new.get('spec_key')} now")
    diffs = env_differences(old.get("env"), new.get("env"))
    lines.append("environment: same versions, device and flags" if not diffs else
                 "environment differences:\n" + "\n".join(f"  {d}" for d in diffs))
    return "\n".join(lines)


def replay(run_dir: str | Path, out_dir: Optional[str | Path] = None) -> Dict[str, Any]:
    """Rerun the spec recorded in `run_dir`; return the new row (written under `out_dir`)."""
    import sdbuild

    from .spec import to_spec

    old = load_row(run_dir)
    spec = to_spec(old["spec"])
    spec.resume = None  # a replay measures again; it never copies the old measurement
    spec.dry_run = False  # (and a recorded dry_run, which no job writes, does not make it print instead)
    return sdbuild.run(spec, out_dir, choices=sdbuild.choices_of(spec), overrides=labels_of(spec, old.get("overrides")),
                       job={"replay_of": str(Path(run_dir).resolve())})


def labels_of(spec: Any, overrides: Optional[List[Any]]) -> List[str]:
    """The recorded overrides that the spec bears out (`precision=bf16` where the spec's precision is
    bf16, `run.steps=4` where it runs 4 steps): a row's labels come from its spec, so a crafted
    override that says otherwise is dropped, never copied into the new row."""
    import yaml

    from .spec import spec_to_dict

    flat = _flatten(spec_to_dict(spec))
    kept = []
    for override in overrides or []:
        if not isinstance(override, str) or "=" not in override:
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        try:
            typed = yaml.safe_load(value)
        except yaml.YAMLError:
            typed = value
        recorded = flat.get(f"{key}.name", flat.get(key, _MISSING))
        if recorded is not _MISSING and (recorded == typed or str(recorded) == value):
            kept.append(override)
    return kept


_MISSING = object()


def show_progress() -> None:
    """Say what the run is doing as `python -m sdbuild` does: Hydra's log format on stderr, so loading,
    warmup and run k of N show (a bar on a terminal, a line per call otherwise). A process that has set
    up logging already (a test, a caller) keeps its own."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdbuild.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder holding result.json (outputs/runs/<time>, or a sweep's job folder)")
    parser.add_argument("--out", help="where to write the new run (default: a new outputs/runs/<time>)")
    args = parser.parse_args(argv)
    show_progress()

    from .app import summary_line
    from .errors import SpecError

    old = load_row(args.run_dir)
    try:
        new = replay(args.run_dir, args.out)
    except SpecError as exc:
        print(f"sdbuild.replay: the recorded spec is refused:\n{exc}", file=sys.stderr)
        return 2
    print(summary_line(new))
    print(compare(old, new))
    print(f"result: {Path(new['job']['output_dir']) / 'result.json'}")
    if new["status"] == Status.ok.value:
        return 0
    return 2 if new["status"] == Status.unsupported.value else 1


if __name__ == "__main__":
    sys.exit(main())
