"""The random models' cache folder (sdbuild.models.save_random_pipeline): two processes asking for it at
once build it once and both load a whole folder; a folder left without a component's weights is built
again, never loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

ASK = """
import json, sys, time
from sdbuild.models import ensure_model, save_random_pipeline, random_model_complete
import sdbuild.models as models
from sdbuild.spec import ModelSpec
built = []
real = models.save_random_pipeline
models.save_random_pipeline = lambda name, folder: built.append(real(name, folder))
asked = time.time()
folder = ensure_model(ModelSpec(), sys.argv[1])
print(json.dumps({"asked": asked, "returned": time.time(), "built": any(built), "folder": folder}))
"""


def ask_at_once(cache: Path, n: int = 2) -> list[dict]:
    """`n` real processes call ensure_model for the tiny SD 1.5 model into the same empty cache at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = [subprocess.Popen([sys.executable, "-c", ASK, str(cache)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(n)]
    said = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in said]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in said]


def test_two_processes_asking_for_the_same_random_model_at_once_build_it_once(tmp_path):
    from sdbuild.models import random_model_complete
    from sdbuild.spec import ModelFamily

    answers = ask_at_once(tmp_path)
    first, second = sorted(answers, key=lambda a: a["returned"])
    assert second["asked"] < first["returned"], answers  # they did overlap: the second asked while the first built
    assert [a["built"] for a in answers].count(True) == 1, answers  # the other waited on the lock, then loaded
    folder = Path(first["folder"])
    assert all(a["folder"] == str(folder) for a in answers) and random_model_complete(folder, ModelFamily.sd15)
    leftovers = [p.name for p in tmp_path.iterdir() if p != folder and not p.name.endswith(".lock")]
    assert leftovers == []  # no temporary folder left behind


def test_a_cached_folder_with_a_component_missing_its_weights_is_built_again(tmp_path):
    from sdbuild.models import ensure_model, random_model_complete
    from sdbuild.spec import ModelFamily, ModelSpec

    folder = Path(ensure_model(ModelSpec(), str(tmp_path)))
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.unlink()  # what a half-built cache looked like: model_index.json there, the UNet without weights
    assert (folder / "model_index.json").is_file() and not random_model_complete(folder, ModelFamily.sd15)
    assert ensure_model(ModelSpec(), str(tmp_path)) == str(folder)
    assert weights.is_file() and random_model_complete(folder, ModelFamily.sd15)
