#!/usr/bin/env bash
# Fetch, here (with network), the wheels the lent GPU machine lacks into .gpu/wheels (git-ignored),
# which the device tool then carries:  run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"])
# The GPU image (Python 3.12, torch + CUDA, transformers, accelerate, safetensors, tokenizers,
# huggingface_hub, numpy, pillow, matplotlib, tqdm, pyyaml) lacks only these.
set -eu
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); W=$ROOT/.gpu/wheels; mkdir -p "$W"
SHARED=${SHARED_WHEELS:-$ROOT/../shared/gpu/wheels}
if compgen -G "$SHARED/*.whl" >/dev/null; then cp -n "$SHARED"/*.whl "$W"/; fi  # a prepared set, if any
PIP=(python -m pip download --no-deps --only-binary=:all: --python-version 3.12
     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any -d "$W")
for spec in diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 importlib_metadata zipp torchao==0.18.0 \
            xformers==0.0.35; do
  name=${spec%%=*}; name=${name//-/_}
  compgen -G "$W/${name}-*.whl" >/dev/null || "${PIP[@]}" "$spec"
done
# antlr4-python3-runtime 4.9.3 (omegaconf's pin) has no wheel on PyPI: build it from its sdist
compgen -G "$W/antlr4_python3_runtime-*.whl" >/dev/null || python -m pip wheel --no-deps -w "$W" antlr4-python3-runtime==4.9.3
du -sh "$W"; ls "$W"
