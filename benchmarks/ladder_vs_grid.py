"""The tuner against the grid: jobs, wall time and the winner's latency, side by side.

Three sweeps over the same space on the tiny model:
  grid     every combination (Hydra's basic sweeper), each measured;
  ladder   `hydra/sweeper=ladder`, measured afresh (what a user runs);
  replay   the ladder again, fed the grid's rows (`resume=<grid folder>`): the greedy walk and the
           exhaustive search judged on identical measurements, so machine noise cannot flatter
           or hurt either side.

    python benchmarks/ladder_vs_grid.py                       # 2 x 2 x 3 x 2 = 24 combinations
    python benchmarks/ladder_vs_grid.py --keep out/ run.repeats=5 compile=none,trace,export
    python benchmarks/ladder_vs_grid.py --keep out/ --print-only    # the table again, from out/

Extra arguments are overrides for all three sweeps (one naming an axis replaces it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's sdbuild, as in the sweeps (run from ROOT)

AXES = {"precision": "fp32,bf16", "memory_format": "contiguous,channels_last",
        "attention": "classic,sdpa,sdpa_math", "compile": "none,trace"}
RUN = ["run.steps=4", "run.warmup=1", "run.repeats=3"]


def sweep(sweep_dir: Path, args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdbuild", "--multirun", f"hydra.sweep.dir={sweep_dir.resolve()}",
                           *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"sweep failed ({sweep_dir}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def rows(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")]


def fastest(found: list[dict]) -> dict:
    return min((r for r in found if r["status"] == "ok"), key=lambda r: r["latency_s"]["median"])


def within(row: dict, baseline: dict, bound) -> bool:
    """Is the row's image within the PSNR bound of the baseline's (sdbuild.fidelity)?"""
    return bound is None or image_psnr(row, baseline) >= bound


def image_psnr(row: dict, baseline: dict) -> float:
    from sdbuild.fidelity import compare_files

    folder = lambda r: Path(r["job"]["output_dir"])  # noqa: E731
    return compare_files(folder(row) / row["image"], folder(baseline) / baseline["image"]).psnr_db


def label(row: dict) -> str:
    return " ".join(f"{k}={row['choices'][k]}" for k in AXES if k in row["choices"])


def lat(row: dict) -> str:
    s = row["latency_s"]
    return f"{s['median']:.4f} s ({s['min']:.4f}-{s['max']:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="keep the three sweep folders here")
    parser.add_argument("--print-only", action="store_true", help="only print the table of the folders in --keep")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args()
    given = {o.split("=", 1)[0] for o in ns.overrides}
    args = RUN + [f"{k}={v}" for k, v in AXES.items() if k not in given] + ns.overrides
    root = ns.keep or Path(tempfile.mkdtemp(prefix="ladder_vs_grid_"))
    grid_dir, ladder_dir, replay_dir = root / "grid", root / "ladder", root / "replay"
    walls = root / "wall_s.json"
    if not ns.print_only:
        for d in (grid_dir, ladder_dir, replay_dir):
            shutil.rmtree(d, ignore_errors=True)
        walls.write_text(json.dumps({
            "grid": sweep(grid_dir, args),
            "ladder": sweep(ladder_dir, ["hydra/sweeper=ladder", *args]),
            "replay": sweep(replay_dir, ["hydra/sweeper=ladder", *args, f"resume={grid_dir}"])}))
    wall = json.loads(walls.read_text())
    grid_rows = rows(grid_dir)
    ladder = json.loads((ladder_dir / "ladder.json").read_text())
    replay = json.loads((replay_dir / "ladder.json").read_text())
    by_key = {r["spec_key"]: r for r in grid_rows}
    replay_winner = by_key[replay["winner"]["spec_key"]]
    # The grid's answer under the ladder's own fidelity bound (PSNR against the same baseline image)
    bound = replay["bounds"]["psnr_db"]
    base = by_key[replay["baseline"]["spec_key"]]
    admissible = [r for r in grid_rows if r["status"] == "ok" and within(r, base, bound)]
    best, best_admissible = fastest(grid_rows), fastest(admissible)
    rank = sorted(admissible, key=lambda r: r["latency_s"]["median"])
    place = [r["spec_key"] for r in rank].index(replay_winner["spec_key"]) + 1

    machine = best["env"].get("device_name") or best["env"].get("cpu")
    print(f"machine: {machine}; torch {best['env']['torch']}; {' '.join(args)}")
    print(f"{'':8} {'jobs':>5} {'wall':>9}  winner (median, min-max)")
    print(f"{'grid':8} {len(grid_rows):>5} {wall['grid']:>8.1f}s  {lat(best_admissible)}  {label(best_admissible)}"
          f"  (fastest within PSNR >= {bound} dB)")
    if best is not best_admissible:
        print(f"{'':8} {'':>5} {'':>9}  {lat(best)}  {label(best)}  (fastest of all: PSNR "
              f"{image_psnr(best, base):.1f} dB)")
    w = ladder["winner"]
    print(f"{'ladder':8} {ladder['jobs']['launched']:>5} {wall['ladder']:>8.1f}s  "
          f"{w['latency_s']['median']:.4f} s ({w['latency_s']['min']:.4f}-{w['latency_s']['max']:.4f})  "
          f"{' '.join(f'{k}={v}' for k, v in w['choices'].items())}")
    print(f"{'replay':8} {replay['jobs']['recipes']:>5} {wall['replay']:>8.1f}s  {lat(replay_winner)}  "
          f"{label(replay_winner)}  (on the grid's rows: rank {place} of {len(rank)} within the bound)")
    print(f"folders: {root}")


if __name__ == "__main__":
    main()
