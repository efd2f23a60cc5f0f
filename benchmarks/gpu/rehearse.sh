#!/usr/bin/env bash
# Rehearse the GPU proof here, without a GPU, against a stand-in of the lent GPU machine's Python:
#
#   bash benchmarks/gpu/rehearse.sh
#
# 1. a Python 3.12 venv (pyenv's python3.12) in $REHEARSE_DIR (default ${TMPDIR:-/tmp}/sdbuild-rehearse),
#    holding what the GPU image holds: torch 2.11.0 (the registry's default build, CUDA 13),
#    transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0, safetensors 0.8.0, numpy, pillow,
#    matplotlib, tqdm, pyyaml, and none of diffusers, hydra-core, omegaconf, torchao, xformers.
#    Cost: the first run downloads the CUDA build of torch and its nvidia-* wheels (about 4 GB on disk,
#    several minutes); the venv is kept, so later runs start at step 2. REHEARSE_FRESH=1 rebuilds it.
# 2. .gpu/wheels filled by fetch_wheels.sh (the carried wheels)
# 3. run.sh --cpu in that venv with the network off (a new network namespace where this runs as
#    root, and pip's configuration and local indexes ignored): the install step installs exactly the
#    carried wheels with run.sh's own command, then every step runs on the tiny model
# 4. $OUT checked against what the device tool returns (at most 8 flat files, 16 MiB each), and every
#    measured step must have come back with ok rows.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); cd "$ROOT"
R=${REHEARSE_DIR:-${TMPDIR:-/tmp}/sdbuild-rehearse}; V=$R/venv
PY312=
# a pyenv shim named python3.12 exists even where that version is not selected: take one that runs
for c in python3.12 "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12.*/bin/python3.12; do
  "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { PY312=$c; break; }
done
[ -n "$PY312" ] || { echo "rehearse: no python3.12 here (pyenv install 3.12)"; exit 2; }
[ "${REHEARSE_FRESH:-0}" = 1 ] && rm -rf "$V"
# What the image holds of what sdbuild, diffusers and hydra import (device/KINDS.md lists the whole
# image): diffusers checks requests, filelock and regex at import, so they belong to the stand-in.
IMAGE=(torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 safetensors==0.8.0
       numpy pillow matplotlib tqdm pyyaml requests filelock regex packaging psutil)
if [ ! -f "$V/.stand-in-ready" ]; then
  echo "== building the stand-in venv in $V ($("$PY312" --version); downloads torch 2.11.0 + CUDA wheels once)"
  rm -rf "$V"; "$PY312" -m venv "$V"
fi
# the machine's pip constraints cap torch for its own CPU wheels: the stand-in asks the registry
# (a no-op once everything is there)
PIP_CONSTRAINT="" "$V/bin/pip" install -q "${IMAGE[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
touch "$V/.stand-in-ready"
"$V/bin/python" -c 'import torch; print("== stand-in: python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
if "$V/bin/python" -c 'import diffusers' 2>/dev/null || "$V/bin/python" -c 'import hydra' 2>/dev/null; then
  echo "== removing diffusers/hydra/omegaconf/torchao/xformers left by an earlier rehearsal (the image has none)"
  "$V/bin/pip" uninstall -q -y diffusers hydra-core omegaconf antlr4-python3-runtime torchao xformers || true
fi

bash benchmarks/gpu/fetch_wheels.sh >/dev/null
echo "== carried wheels: $(ls .gpu/wheels | tr '\n' ' ')"

OUT=$(mktemp -d "${TMPDIR:-/tmp}/sdbuild-rehearse-out.XXXXXX")
NONET=()
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then NONET=(unshare -n); echo "== network: off (unshare -n)"
else echo "== network: left on (unshare -n needs root); pip still runs with --no-index"; fi
set +e
env PATH="$V/bin:$PATH" PYTHON="$V/bin/python3" OUT="$OUT" PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 \
  PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT= "${NONET[@]}" bash benchmarks/gpu/run.sh --cpu
rc=$?
set -e
echo "== run.sh --cpu exit $rc; \$OUT = $OUT:"; ls -la "$OUT"
"$V/bin/python" benchmarks/gpu/check.py limits "$OUT"
# every measured step came back with rows, all ok
"$V/bin/python" - "$OUT" <<'EOF'
import json, sys, collections
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/rows.jsonl")]
by_step = collections.Counter((r["step"], r["status"]) for r in rows)
print("== rows:", dict(by_step))
steps = {r["step"] for r in rows}
bad = [f'{r["step"]}/{r["job"]}: {r["status"]}: {r.get("error")}' for r in rows if r["status"] != "ok"]
missing = {"seed", "compile", "best", "sdpa", "compile2"} - steps
if bad or missing:
    sys.exit(f"rehearse FAILED: non-ok rows {bad}, steps with no row {sorted(missing)}")
print(f"== rehearse passed: {len(rows)} ok rows over steps {sorted(steps)}")
EOF
exit $rc
