#!/usr/bin/env bash
# sdbuild's GPU proof: one call on a fresh lent GPU machine (torch preinstalled, no network).
#
#   bash benchmarks/gpu/run.sh          # GPU: SD 1.5 architecture, 512x512, 50 DDIM steps (<= 9 min)
#   bash benchmarks/gpu/run.sh --cpu    # the same steps on the tiny model on CPU (what CI runs)
#
# Steps, each under its own time limit inside one overall budget (BUDGET seconds, default 510):
#   1. install the carried wheels offline (.gpu/wheels, see fetch_wheels.sh), only on the GPU
#   2. preflight (check.py): versions, toolchain, TF32 flags, event timing, SDPA kernel matrix,
#      xformers, torchao, trace, torch.compile
#   3. the seed table (5 rows), 4. the catalog's best CUDA recipe, 5. the SDPA kernels,
#   6. the compile rows; 7. report.md per sweep and summary.txt (one line per row, steps/s)
# Everything lands under $OUT (default: a new temporary folder): logs, sweeps, report, summary.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); ROOT=$(cd "$HERE/../.." && pwd); cd "$ROOT"
CPU=0; [ "${1:-}" = "--cpu" ] && CPU=1
O=${OUT:-$(mktemp -d)}; S=$O/sweeps; mkdir -p "$O" "$S"
PY=$(command -v python || command -v python3); BUDGET=${BUDGET:-510}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the random-weight model cache (GBs for sd15_arch) stays outside $OUT, which comes back to the caller
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} SDBUILD_CACHE=${SDBUILD_CACHE:-${TMPDIR:-/tmp}/sdbuild-model-cache}
if [ $CPU = 1 ]; then
  # tiny model, 2 steps, 1 warmup + 1 timed call; CUDA-only rows come back `unsupported` at once
  ROWS="model=tiny run.steps=2 run.warmup=1 run.repeats=1 run.save_image=false"
  FORCE_CUDA="run.device=cuda"  # the best recipe would compile for minutes on CPU: checked, not run
else
  ROWS="model=sd15_arch run.height=512 run.width=512 run.steps=50 scheduler=ddim run.warmup=1 run.repeats=3"
  FORCE_CUDA=""
fi

step() {  # step SECONDS NAME COMMAND...: run under min(SECONDS, budget left), log to $O/NAME.log
  local s=$1 name=$2 left=$((BUDGET - SECONDS)); shift 2; ((s > left)) && s=$left
  if ((s < 10)); then echo "== SKIP $name (budget spent)" | tee -a "$O/steps.txt"; return 1; fi
  echo "== [${SECONDS}s] $name (limit ${s}s)" | tee -a "$O/steps.txt"
  timeout -k 5 "$s" "$@" >"$O/$name.log" 2>&1; local rc=$?
  tail -n 3 "$O/$name.log"; echo "== $name rc=$rc at ${SECONDS}s" | tee -a "$O/steps.txt"; return $rc
}
sweep() {  # sweep SECONDS NAME OVERRIDES...: one sdbuild multirun into $S/NAME
  local s=$1 name=$2; shift 2
  step "$s" "$name" "$PY" -m sdbuild --multirun "$@" $ROWS "hydra.sweep.dir=$S/$name"
}

[ $CPU = 0 ] && { nvidia-smi -L 2>&1 | tee "$O/device.txt"; }
if [ $CPU = 0 ] && [ -d "$ROOT/.gpu/wheels" ]; then
  W=$ROOT/.gpu/wheels
  echo "torch==$($PY -c 'import torch; print(torch.__version__)')" >"$O/constraints.txt"
  # xformers apart and without dependencies: its wheel pins the torch it was built for, and the
  # torch of the image must stay (whether its kernels load is what the row records)
  step 90 install "$PY" -m pip install --no-index --find-links "$W" -c "$O/constraints.txt" \
    diffusers hydra-core omegaconf antlr4-python3-runtime importlib_metadata zipp torchao
  step 30 install_xformers "$PY" -m pip install --no-deps --no-index --find-links "$W" xformers
fi
step 75 preflight "$PY" "$HERE/check.py" preflight $([ $CPU = 1 ] && echo --cpu)
cat "$O/preflight.log"
sweep 200 seed +experiment=seed_table
sweep 150 best +preset=cuda_best $FORCE_CUDA
sweep 70 sdpa precision=fp16 attention=sdpa,sdpa_flash,sdpa_efficient,sdpa_cudnn,sdpa_fused
sweep 150 compile precision=fp16 attention=sdpa memory_format=channels_last \
  compile=inductor,inductor_reduce_overhead
BUDGET=$((BUDGET + 30))
for name in seed best sdpa compile; do
  [ -d "$S/$name" ] && "$PY" -m sdbuild.report "$S/$name" >>"$O/report.log" 2>&1
done
"$PY" "$HERE/check.py" summary "$S" | tee "$O/summary.txt"
echo "== done in ${SECONDS}s: $O"
