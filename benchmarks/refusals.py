"""Wall time of `python -m sdbuild` refusing each bad input of tests/test_refusals.py, for two
checkouts called in alternation (before, now, before, now, ...), with the load average recorded.

    git archive dcc1382 | tar -x -C /tmp/sdbuild-before      # the code before the torch-free refusals
    python benchmarks/refusals.py 5 /tmp/sdbuild-before .    # 5 rounds

Each checkout runs with this interpreter, from its own folder (`python -m` finds its sdbuild there).
"""
import os
import statistics
import subprocess
import sys
import time

PY = sys.executable
CASES = [["run.height=4100"], ["run.steps=0"], ["model=sd15"], ["precision=fp16", "attention=xformers"],
         ["compile=inductor_reduce_overhead"], ["resume=/nonexistent/sweep"], ["precison=fp16"], ["+precison=fp16"],
         ["dry_run=true", "precision=fp16"]]
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
TREES = {"before": sys.argv[2], "now": sys.argv[3]} if len(sys.argv) > 3 else {"now": "."}
times = {(t, " ".join(c)): [] for t in TREES for c in CASES}
loads = []
env = {**os.environ, "HF_HOME": "/tmp/sdbuild-refusals-hf"}  # an empty Hugging Face cache: model=sd15 is not there
out_dir = "/tmp/sdbuild-refusals"
for r in range(rounds):
    for case in CASES:
        for tree, cwd in TREES.items():
            loads.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            out = subprocess.run([PY, "-m", "sdbuild", *case, f"hydra.run.dir={out_dir}/run",
                                  f"hydra.sweep.dir={out_dir}/sweep"], cwd=cwd, capture_output=True, text=True, env=env)
            times[(tree, " ".join(case))].append(time.perf_counter() - t0)
            assert out.returncode in (1, 2), (tree, case, out.returncode, out.stderr[-300:])
print(f"{rounds} rounds, interleaved; load average during the runs: min {min(loads):.1f}, "
      f"median {statistics.median(loads):.1f}, max {max(loads):.1f} ({os.cpu_count()} CPUs)")
print("| refusal | " + " | ".join(f"{t} (median, max; s)" for t in TREES) + " |")
print("|---|" + "---:|" * len(TREES))
for case in CASES:
    k = " ".join(case)
    cells = [f"{statistics.median(times[(t, k)]):.2f}, {max(times[(t, k)]):.2f}" for t in TREES]
    print(f"| `{k}` | " + " | ".join(cells) + " |")
