"""Where pipeline weights come from.

Three sources (``model.source``), one loading path: every model ends up as a diffusers folder
with safetensors weights, loaded by its family's pipeline class (``from_pretrained``).

- ``pretrained``: a local folder, or a hub id already in the local Hugging Face cache (resolved
  to its snapshot folder here: sdbuild never downloads). Checked per component before loading.
- ``drawn``: a tiny pipeline trained on the drawn set (sdbuild/drawn.py, scripts/train_tiny.py),
  shipped with the package as a diffusers folder under sdbuild/data/ (DRAWN_MODELS), loaded as is.
- ``tiny`` / ``arch``: a pipeline built from code with a fixed seed and random weights: the
  embedded tiny model, or a published architecture (SD 1.5, SDXL, Flux, SD 3.5) at full size, each
  laid out and built by its family (sdbuild/families/<family>.py). It is saved once to the cache
  folder and loaded from there like any real model.

Loading a folder into a pipeline (dtype, quantization, scheduler) is the `model` lever's
(sdbuild/levers/model.py); this module only says which folder, and checks it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import problem
from .families import FAMILIES, random_family
from .spec import ModelFamily, ModelSource, ModelSpec, Spec

# Bump when the code that builds a random model changes, so stale caches are not reused.
RANDOM_MODEL_VERSION = 1

# The drawn models shipped with the package: family -> folder under sdbuild/data (scripts/train_tiny.py).
DATA_DIR = Path(__file__).parent / "data"
DRAWN_MODELS = {ModelFamily.sd15: "tiny_drawn"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDBUILD_CACHE", Path.home() / ".cache" / "sdbuild"))


def random_model_name(model: ModelSpec) -> str:
    if model.source is ModelSource.tiny:
        return f"tiny-{model.family.name}"
    return f"{model.family.name}-arch"


def single_file(model: ModelSpec) -> bool:
    """Whether `model.path` names one checkpoint file (loaded with the family's from_single_file)."""
    return model.source is ModelSource.pretrained and bool(model.path) and Path(model.path).suffix.lower() == ".safetensors"


def model_folder(model: ModelSpec, cache_dir: str | None) -> str:
    """The local folder `from_pretrained` reads for this model spec (a hub id: its cached snapshot;
    a single-file checkpoint: the folder `model.config` names, which gives its layout)."""
    if single_file(model):
        return str(Path(model.config).expanduser())
    if model.source is ModelSource.pretrained:
        return str(local_folder(model.path))
    if model.source is ModelSource.drawn:
        return str(DATA_DIR / DRAWN_MODELS[model.family])
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return str(root / f"{random_model_name(model)}-v{RANDOM_MODEL_VERSION}")


def ensure_model(model: ModelSpec, cache_dir: str | None) -> str:
    """Return the folder to load; build and save the random model first if it is not cached."""
    folder = model_folder(model, cache_dir)
    if model.source in (ModelSource.tiny, ModelSource.arch) and not (Path(folder) / "model_index.json").exists():
        save_random_pipeline(random_model_name(model), Path(folder))
    return folder


def build_random_pipeline(name: str):
    """Build the random-weight pipeline `name` (fixed seeds) with the family that owns its layout."""
    return random_family(name).build_random(name)


def save_random_pipeline(name: str, folder: Path) -> None:
    """Save atomically: a half-written folder is never mistaken for a cached model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        build_random_pipeline(name).save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The components a pipeline folder must carry, each a subfolder with its own safetensors weights.
COMPONENTS = {family: f.components for family, f in FAMILIES.items()}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """Whether `path` is a valid hub id (org/name), by huggingface_hub's own rule (no `..`, no leading
    or trailing `-`/`.`, at most 96 characters), not only its shape."""
    if not HUB_ID.match(path):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


class NotLocal(FileNotFoundError):
    """A path that is neither a local folder nor a hub id in the local Hugging Face cache."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path} {why}")
        self.why = why


def local_folder(path: str) -> Path:
    """`path` as a local folder: itself if it exists, else the cached snapshot of the hub id it
    names. Never reaches for the network (`local_files_only`)."""
    folder = Path(path).expanduser()
    if folder.exists():
        return folder
    if not is_hub_id(path):
        raise NotLocal(path, "does not exist and is not a hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except LocalEntryNotFoundError:
        raise NotLocal(path, "is a hub id that is not in the local Hugging Face cache, and sdbuild never "
                             "downloads") from None


def safetensors_in(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def folder_problems(option: str, path: str | None, index: str, components: tuple[str, ...], fix: str) -> list[str]:
    """What `path` (a folder or a hub id) lacks to load from local safetensors only: its `index`
    file, and safetensors weights in every component's own subfolder ("" is the folder itself):
    one stray .safetensors elsewhere is not enough."""
    if not path:
        return [problem(option, "is empty", f"Set {fix}")]
    try:
        folder = local_folder(path)
    except NotLocal as exc:
        instead = f"Download it once yourself (`hf download {path}`), or set {fix}" if is_hub_id(path) else f"Set {fix}"
        return [problem(f"{option}={path}", exc.why, instead)]
    parts = ", ".join([index] + [f"{c}/" for c in components if c])
    if not (folder / index).is_file():
        return [problem(f"{option}={path}", f"is not a diffusers folder (no {index} in {folder})",
                        f"Point it at the folder that holds {parts}")]
    missing = [f"{c}/" if c else str(folder) for c in components if not safetensors_in(folder / c)]
    if missing:
        return [problem(f"{option}={path}", f"holds no .safetensors weights in {', '.join(missing)} (sdbuild loads "
                        "only safetensors, never pickles)",
                        "Convert the weights with diffusers' save_pretrained(..., safe_serialization=True)")]
    if (why := config_file_problem(folder / index)):
        return [problem(f"{option}={path}", why, f"Point it at a folder saved by diffusers' save_pretrained ({parts})")]
    bad = [why for c in components for f in sorted((folder / c).glob("*.safetensors")) if (why := weights_file_problem(f))]
    if bad:
        return [problem(f"{option}={path}", "; ".join(bad), "Replace them with the model's real .safetensors files")]
    return []


def config_file_problem(path: Path) -> Optional[str]:
    """Why a diffusers config (model_index.json, config.json) cannot be what it claims: not a regular
    file, not a JSON object, or no `_class_name` (an empty `{}`). None when it looks right."""
    if not path.is_file():  # follows links: a FIFO or a link to /dev/zero is no file (and would hang a read)
        return f"{path} is not a regular file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{path} cannot be read as JSON ({type(exc).__name__}: {exc})"
    if not isinstance(data, dict) or "_class_name" not in data:
        return f"{path} is not a diffusers config (no _class_name)"
    return None


def weights_file_problem(path: Path) -> Optional[str]:
    """Why a .safetensors path cannot hold weights: not a regular file (a FIFO, a link to a device:
    loading would hang or read forever). Its content is checked by the loader (a failed row)."""
    return None if path.is_file() else f"{path} is not a regular file"


# Weight formats that are Python pickles: loading one runs whatever code it carries.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def pickle_problem(option: str, path: str) -> Optional[str]:
    """The refusal for a pickle weights file (by its suffix), with the conversion to use instead."""
    if Path(path).suffix.lower() not in PICKLE_SUFFIXES:
        return None
    return problem(f"{option}={path}", f"is a pickle file ({Path(path).suffix}): loading it runs any code it carries, "
                   "and sdbuild loads only safetensors",
                   "Convert it once in a trusted sandbox to .safetensors (safetensors.torch.save_file(torch.load(f, "
                   "weights_only=True)['state_dict'], 'model.safetensors'), or diffusers' from_single_file(...)"
                   ".save_pretrained(folder, safe_serialization=True)) and point the option at that")


def ignored_path_problem(spec: Spec) -> Optional[str]:
    """A `model.path` the chosen source would drop: tiny/arch models build random weights from code,
    drawn models load the weights shipped with sdbuild, so the path would be silently ignored while
    the row claims to measure it."""
    model = spec.model
    if model.source is ModelSource.pretrained or not model.path:
        return None
    pretrained = model.family.value  # conf/model/<family>.yaml is each family's pretrained model
    own = ("loads the weights shipped with sdbuild" if model.source is ModelSource.drawn
           else "builds its weights from code with a fixed seed")
    return problem(f"model.path={model.path}", f"model={model.name} (source={model.source.value}) {own} "
                   "and would ignore this path",
                   f"Choose the family's pretrained model with it: model={pretrained} model.path={model.path}, "
                   f"or drop model.path to measure the random model")


def model_problems(spec: Spec) -> list[str]:
    """Problems with the spec's weight folders, found before anything loads."""
    if (ignored := ignored_path_problem(spec)):
        return [ignored]  # the folder checks below assume a pretrained source
    for option, path in (("model.path", spec.model.path), ("vae.path", spec.vae.path)):
        if path and (pickled := pickle_problem(option, path)):
            return [pickled]
    problems = []
    if spec.model.source is ModelSource.drawn:
        problems += drawn_problems(spec.model)
    if single_file(spec.model):
        problems += single_file_problems(spec.model)
    elif spec.model.source is ModelSource.pretrained:
        problems += folder_problems("model.path", spec.model.path, "model_index.json", COMPONENTS[spec.model.family],
                                    "model.path=/path/to/a/diffusers/folder")
    if spec.vae.path:
        problems += folder_problems("vae.path", spec.vae.path, "config.json", ("",),
                                    "vae.path=/path/to/taesd (a folder with config.json and safetensors weights)")
    return problems


def drawn_problems(model: ModelSpec) -> list[str]:
    """A drawn model exists for its family and its shipped folder is complete."""
    if model.family not in DRAWN_MODELS:
        return [problem(f"model.source=drawn", f"there is no drawn model of family {model.family.value}",
                        "Use model=" + ", model=".join(DRAWN_MODELS.values()) + ", or source=tiny for a random one")]
    folder = DATA_DIR / DRAWN_MODELS[model.family]
    return folder_problems("model.source=drawn", str(folder), "model_index.json", COMPONENTS[model.family],
                           "reinstall sdbuild, or train it: python scripts/train_tiny.py sd")


def single_file_problems(model: ModelSpec) -> list[str]:
    """A single-file checkpoint loads offline: the file is a regular file, and its layout comes from
    a local diffusers folder (`model.config`: its model_index.json and each component's config),
    never from a hub at run time."""
    path = Path(model.path).expanduser()
    if not path.exists():
        return [problem(f"model.path={model.path}", "does not exist", "Point it at a .safetensors checkpoint file")]
    if (why := weights_file_problem(path)):
        return [problem(f"model.path={model.path}", why, "Point it at a .safetensors checkpoint file")]
    fix = ("model.config=/path/to/a/diffusers/folder of the same architecture (its model_index.json and component "
           "configs give the checkpoint's layout; its weights are not read)")
    if not model.config:
        return [problem(f"model.path={model.path}", "is a single-file checkpoint, and its layout (the components' "
                        "configs) must come from a local folder: sdbuild never asks a hub at run time", f"Set {fix}")]
    folder = Path(model.config).expanduser()
    if not folder.is_dir() or (why := config_file_problem(folder / "model_index.json")):
        return [problem(f"model.config={model.config}", "is not a diffusers folder" +
                        (f" ({why})" if folder.is_dir() else ""), f"Set {fix}")]
    missing = [c for c in COMPONENTS[model.family] if c and not (folder / c / "config.json").is_file()]
    if missing:
        return [problem(f"model.config={model.config}", f"has no config.json in {', '.join(c + '/' for c in missing)}",
                        f"Set {fix}")]
    return []
