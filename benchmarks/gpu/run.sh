#!/usr/bin/env bash
# sdbuild's GPU proof: one call on a fresh lent GPU machine (torch preinstalled, no network).
#
#   bash benchmarks/gpu/run.sh          # GPU: SD 1.5 architecture, 512x512, 50 DDIM steps
#   bash benchmarks/gpu/run.sh --cpu    # every step on CPU stand-ins: tiny model, bf16 for fp16,
#                                       # SDPA for xFormers (what CI runs, and rehearse.sh)
#
# The device tool runs it as:  run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=600)
# (.gpu/wheels from fetch_wheels.sh). BUDGET (default 550 s on a GPU) is the whole run; the call's
# timeout should be BUDGET + ~50 s. To rerun only some steps: STEPS="compile best" bash ... .
# Estimated cost of each step on an H100/H200 (SD 1.5 architecture, 50 steps): BENCHMARKS.md.
#
# Steps, in the order that gets the figures that matter back first (seed table, one compiled row,
# the best recipe; then the extras):
#   install    the carried wheels, offline, --no-deps, into WORK/site (the image untouched); then an
#              import smoke check that stops the run at once if sdbuild, hydra or diffusers fail
#   preflight  check.py: versions, toolchain, TF32 flags, event timing, SDPA kernel matrix, xformers,
#              torchao, jit.trace (its torch.compile check, two cold Triton compiles, only with
#              PREFLIGHT_COMPILE=1: the compile step compiles anyway)
#   model      the random-weight model built and saved once, not charged to a timed row
#   seed       diffusers' speed-up guide's table: fp32 -> fp16 -> +channels-last -> +trace -> +xFormers
#   compile    fp16 + SDPA + channels-last, UNet compiled (inductor, mode=default): one row
#   best       cuda_best_quick (cuda_best without max-autotune) in fp16, the compile step's dtype, so its
#              compile finds the compile step's Triton kernels in the shared cache
#   sdpa       fp16 with each SDPA kernel pinned, and fused QKV
#   parallel   tiny Flux at degree 1, then as 2 Ulysses ranks (parallel=ulysses, ulysses_degree=2: nccl, one GPU
#              each) in one sweep: latency, speed-up and efficiency on degree 1, fidelity to its image. Needs
#              2+ visible GPUs, else "skipped: 1 GPU" (steps.txt and summary.txt); --cpu: 2 gloo ranks
#   compile2   the compile row again in reduce-overhead mode (CUDA graphs), only if time is left
# Each step's limit comes from the time still left: at most its cap, and never eating the minimum
# of the steps after it. A step that cannot get its minimum is skipped (and says so).
#
# What comes back: the device tool returns at most 8 files, flat. The working folder (sweeps, logs)
# stays outside $OUT; after every step these files are (re)written into $OUT, and nothing else:
#   summary.txt (a line per row, then the targets), rows.jsonl (every row, whole), errors.txt (each
#   non-ok row's error and traceback tail), preflight.log, steps.txt, logs.tar.gz (the rest, < 16 MiB).
# Each step's rows are printed as soon as it ends, so a run killed at its limit still shows them.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); ROOT=$(cd "$HERE/../.." && pwd); cd "$ROOT"
CPU=0; [ "${1:-}" = "--cpu" ] && CPU=1
O=${OUT:-$(mktemp -d)}; mkdir -p "$O"
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/sdbuild-gpu-proof.XXXXXX")}; S=$WORK/sweeps; mkdir -p "$S"
STEPS=${STEPS:-install preflight model seed compile best sdpa parallel compile2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the random-weight model cache (3.4 GB for sd15_arch) stays outside $OUT, which comes back to the caller
# the carried wheels go into WORK/site (on PYTHONPATH), never into the image's own environment
SITE=$WORK/site; mkdir -p "$SITE"
export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH} SDBUILD_CACHE=${SDBUILD_CACHE:-${TMPDIR:-/tmp}/sdbuild-model-cache}
: >"$WORK/steps.txt"
say() { echo "$*" | tee -a "$WORK/steps.txt"; }

# The interpreter that imports torch (and, on a GPU, sees CUDA); not whatever `python` is first.
pick_python() {
  local want='import torch'
  [ $CPU = 0 ] && want='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
  for c in ${PYTHON:-} /opt/torch/.venv/bin/python3 python3 python; do
    [ $CPU = 1 ] && [ "$c" = /opt/torch/.venv/bin/python3 ] && [ -z "${PYTHON:-}" ] && continue
    command -v "$c" >/dev/null 2>&1 && "$c" -c "$want" >/dev/null 2>&1 && { command -v "$c"; return 0; }
  done
  return 1
}
if ! PY=$(pick_python); then
  say "== STOP: no python3 here imports torch$([ $CPU = 0 ] && echo ' and sees a CUDA GPU') (tried \${PYTHON}, /opt/torch/.venv/bin/python3, python3, python)"
  cp "$WORK/steps.txt" "$O/"; exit 2
fi
say "== python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'))"

if [ $CPU = 1 ]; then
  BUDGET=${BUDGET:-1200}
  ROWS="model=tiny run.steps=2 run.warmup=1 run.repeats=2 run.save_image=false run.timeout_s=0"
  SEED="+experiment=seed_table_cpu"; HALF=bf16
  SDPA_ATTN=sdpa,sdpa_math,sdpa_fused; COMPILE=inductor; COMPILE2=regional
  BEST="+preset=cuda_best_quick compile.mode=default"
  # the parallel step's own rows (its model is not the other steps'): 2 gloo ranks of 1 thread on 2 cores cost
  # about 40 s for both jobs (the ranks import torch and diffusers and build the tiny Flux). run.threads=1: the
  # degree-1 row on 1 thread like each rank; with torch's 2 threads on a busy 2-core machine it measured 3.35 s
  # against 0.12 s for the ranks (x28, oversubscription, not parallelism)
  PAR_ROWS="model=tiny_flux run.steps=2 run.warmup=1 run.repeats=3 run.timeout_s=0 run.threads=1"
  #          install preflight model seed compile best sdpa parallel compile2   (seconds: cap / minimum)
  CAPS=(     60      60        60    240  240     240  180  180      240)
  FLOORS=(   10      10        10    60   60      60   30   60       60)
else
  BUDGET=${BUDGET:-550}
  ROWS="model=sd15_arch run.height=512 run.width=512 run.steps=50 scheduler=ddim run.warmup=1 run.repeats=3 run.timeout_s=0"
  SEED="+experiment=seed_table"; HALF=fp16
  SDPA_ATTN=sdpa,sdpa_flash,sdpa_efficient,sdpa_cudnn,sdpa_fused; COMPILE=inductor; COMPILE2=inductor_reduce_overhead
  BEST="+preset=cuda_best_quick precision=fp16"  # fp16: the compile step's dtype (the cache serves it)
  PAR_ROWS="model=tiny_flux run.steps=4 run.warmup=1 run.repeats=5 run.timeout_s=0"
  #          install preflight model seed compile best sdpa parallel compile2   (seconds: cap / minimum; estimates in BENCHMARKS.md)
  CAPS=(     60      60        120   180  240     180  90   120      600)
  FLOORS=(   10      15        30    60   100     60   30   45       60)
fi
ORDER=(install preflight model seed compile best sdpa parallel compile2)
RESERVE=20  # for the last collect, the tarball and the limits check
# run.timeout_s=0: each sweep runs its jobs in one process (weights loaded once per dtype, no
# per-job imports); the step's own limit bounds a job that hangs
# the compile rows and the best recipe share one Inductor cache (and, with it, Triton's: compile.cache_dir
# sets both): the later compiles reuse the first one's kernels (their warmup_s says so), the steady-state
# medians are unaffected
CACHE="compile.cache_dir=$WORK/compile_cache"

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# The parallel step needs 2 ranks: 2 visible GPUs (one per rank), on CPU 2 cores. Without them it is left out of
# the plan here, before any limit is worked out, so its minimum is not kept from the other steps.
PAR_SKIP=""
if [ $CPU = 0 ]; then
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  ((NGPU < 2)) && PAR_SKIP="skipped: $NGPU GPU (parallel=ulysses runs 2 ranks, one GPU each)"
else
  NCPU=$("$PY" -c 'import os; print(os.cpu_count() or 1)')
  ((NCPU < 2)) && PAR_SKIP="skipped: $NCPU CPU core (2 gloo ranks need one core each)"
fi
wanted parallel || PAR_SKIP=""
[ -n "$PAR_SKIP" ] && { STEPS=" $STEPS "; STEPS=${STEPS// parallel / }; }

limit_for() {  # limit_for INDEX: min(cap, time left - reserve - the minimums of the wanted steps after it)
  local i=$1 later=0 j
  for ((j = i + 1; j < ${#ORDER[@]}; j++)); do wanted "${ORDER[j]}" && later=$((later + FLOORS[j])); done
  local left=$((BUDGET - SECONDS - RESERVE - later)) cap=${CAPS[i]}
  ((left < cap)) && cap=$left
  echo "$cap"
}

copy_back() {  # the six files, rewritten after every step; never more, never deeper
  "$PY" "$HERE/check.py" collect "$WORK" "$O" "${1:-}" 2>>"$WORK/collect.log" || say "   (collect failed: see collect.log)"
  cp "$WORK/steps.txt" "$O/steps.txt"
  [ -f "$WORK/preflight.log" ] && cp "$WORK/preflight.log" "$O/preflight.log"
  # the rest (every log, report, result.json, image), without the compile cache; images go first
  # if the tarball would not fit in 16 MiB
  tar -czf "$O/logs.tar.gz" -C "$WORK" --exclude='./compile_cache*' --exclude=./site . 2>/dev/null
  if [ "$(stat -c %s "$O/logs.tar.gz")" -gt $((15 * 2**20)) ]; then
    tar -czf "$O/logs.tar.gz" -C "$WORK" --exclude='./compile_cache*' --exclude=./site --exclude='*.png' . 2>/dev/null
  fi
}

run_step() {  # run_step NAME COMMAND...: under its limit, output to WORK/NAME.log
  local name=$1 i s rc; shift
  for i in "${!ORDER[@]}"; do [ "${ORDER[i]}" = "$name" ] && break; done
  s=$(limit_for "$i")
  if ((s < FLOORS[i])); then say "== SKIP $name: ${s}s left for it, it needs ${FLOORS[i]}s"; return 1; fi
  say "== [${SECONDS}s] $name (limit ${s}s of ${BUDGET}s)"
  timeout -k 5 "$s" "$@" >"$WORK/$name.log" 2>&1; rc=$?
  ((rc == 124 || rc == 137)) && say "   $name stopped at its ${s}s limit: rows it finished are kept"
  say "== $name rc=$rc at ${SECONDS}s"
  return $rc
}

sweep() {  # sweep NAME OVERRIDES...: one sdbuild multirun into WORK/sweeps/NAME, its rows printed at once
  local name=$1; shift
  wanted "$name" || return 0
  run_step "$name" "$PY" -m sdbuild --multirun "$@" ${SWEEP_ROWS:-$ROWS} "hydra.sweep.dir=$S/$name"
  local rc=$?
  if ((rc == 124 || rc == 137)) && [[ " $* " == *" $CACHE "* ]]; then
    # killed mid-compile, it may have left a half-written kernel library in the shared cache (the next
    # compile loads it: "ImportError: ... .so: file too short"): the later steps get a fresh folder
    CACHE="compile.cache_dir=$WORK/compile_cache_after_$name"
    say "   $name was stopped while it may have been compiling: later steps use a fresh compile cache"
  fi
  [ -f "$WORK/$name.log" ] && tail -n 2 "$WORK/$name.log" | sed "s/^/   /"
  copy_back "$name"
}

# --- install ------------------------------------------------------------------------------------
W=$ROOT/.gpu/wheels
if wanted install; then
  if "$PY" -c 'import diffusers, hydra, omegaconf' >/dev/null 2>&1; then
    say "== install: diffusers, hydra-core and omegaconf already import: nothing installed"
  elif [ -d "$W" ]; then
    # exactly the carried wheels, with no dependency resolution: nothing reaches for the network and
    # the image's torch stays (xformers' wheel pins the torch it was built for; whether its kernels
    # load on this torch is what its rows record). importlib_metadata is not needed on Python >= 3.10.
    WHEELS=()
    for name in diffusers hydra_core omegaconf antlr4_python3_runtime torchao xformers; do
      f=$(ls "$W"/"$name"-*.whl 2>/dev/null | head -n 1)
      [ -n "$f" ] && WHEELS+=("$f") || say "   no $name wheel in $W"
    done
    run_step install "$PY" -m pip install --no-index --no-deps --no-cache-dir --no-compile --target "$SITE" "${WHEELS[@]}"
    tail -n 2 "$WORK/install.log" | sed 's/^/   /'
  else
    say "== install: no $W (run benchmarks/gpu/fetch_wheels.sh here and carry .gpu)"
  fi
fi
SMOKE='
try:
    import sdbuild, sdbuild.builder, hydra, omegaconf, diffusers
except Exception as exc:  # one line: the exception, not the hint pip prints after it
    words = " ".join(str(exc).split())
    raise SystemExit(type(exc).__name__ + ": " + words)'
if ! err=$("$PY" -c "$SMOKE" 2>&1); then
  say "== STOP: the import smoke check failed, no sweep can run: $(echo "$err" | tail -n 1)"
  copy_back; exit 3
fi
say "== imports ok: sdbuild, hydra $("$PY" -c 'import hydra; print(hydra.__version__)'), diffusers $("$PY" -c 'import diffusers; print(diffusers.__version__)')"

# --- preflight, model -----------------------------------------------------------------------------
[ $CPU = 0 ] && { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/== device: /' | tee -a "$WORK/steps.txt"; }
if wanted preflight; then
  run_step preflight "$PY" "$HERE/check.py" preflight $([ $CPU = 1 ] && echo --cpu)
  cat "$WORK/preflight.log"
  copy_back
fi
if wanted model; then
  run_step model "$PY" "$HERE/check.py" model $ROWS
  tail -n 1 "$WORK/model.log" | sed 's/^/   /'
  copy_back
fi

# --- the measured steps ---------------------------------------------------------------------------
sweep seed "$SEED"
sweep compile precision=$HALF attention=sdpa memory_format=channels_last compile=$COMPILE "$CACHE"
sweep best $BEST "$CACHE"
sweep sdpa precision=$HALF attention=$SDPA_ATTN
if [ -n "$PAR_SKIP" ]; then  # said at its turn, and kept for summary.txt (check.py collect reads it)
  say "== SKIP parallel: $PAR_SKIP"; echo "$PAR_SKIP" >"$WORK/parallel.skip"; copy_back
else  # conf/parallel/ulysses.yaml is ulysses_degree=2: the same spec at degree 1 first, its reference
  SWEEP_ROWS=$PAR_ROWS sweep parallel parallel=none,ulysses
fi
sweep compile2 precision=$HALF attention=sdpa memory_format=channels_last compile=$COMPILE2 "$CACHE"

# a report for every sweep that was stopped before it wrote its own (it goes into logs.tar.gz)
for d in "$S"/*/; do
  [ -f "$d/report.md" ] || timeout 30 "$PY" -m sdbuild.report "$d" >>"$WORK/report.log" 2>&1
done
say "== done in ${SECONDS}s (budget ${BUDGET}s); working folder $WORK"
copy_back
echo "== summary"; cat "$O/summary.txt"
"$PY" "$HERE/check.py" limits "$O"
