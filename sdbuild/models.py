"""Where pipeline weights come from.

Three sources (``model.source``), one loading path: every model ends up as a diffusers folder
with safetensors weights, loaded by its family's pipeline class (``from_pretrained``).

- ``pretrained``: a local folder, or a hub id already in the local Hugging Face cache (resolved
  to its snapshot folder here). Checked per component before loading. sdbuild downloads only when
  asked (``model.download=true``: huggingface_hub's snapshot_download, safetensors and configs only,
  into the normal HF cache, in the load step); the default stays offline.
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
from .spec import LoraAdapter, LoraMode, ModelFamily, ModelSource, ModelSpec, Spec

# Bump when the code that builds a random model changes, so stale caches are not reused.
RANDOM_MODEL_VERSION = 1

# The drawn models shipped with the package: family -> folder under sdbuild/data (scripts/train_tiny.py).
DATA_DIR = Path(__file__).parent / "data"
DRAWN_MODELS = {ModelFamily.sd15: "tiny_drawn", ModelFamily.flux: "tiny_flux_drawn"}


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
    """Return the folder to load; build and save the random model first if it is not cached whole, and
    download a hub id first with model.download=true (checked like any folder once it is here)."""
    if to_download(model):
        download_model(model)
    folder = model_folder(model, cache_dir)
    if model.source in (ModelSource.tiny, ModelSource.arch) and not random_model_complete(Path(folder), model.family):
        save_random_pipeline(random_model_name(model), Path(folder))
    return folder


def build_random_pipeline(name: str):
    """Build the random-weight pipeline `name` (fixed seeds) with the family that owns its layout."""
    return random_family(name).build_random(name)


def random_model_complete(folder: Path, family: ModelFamily) -> bool:
    """Whether a cached random model is whole: its model_index.json and safetensors weights in every
    component's folder (a folder without them is rebuilt, never loaded)."""
    return (folder / "model_index.json").is_file() and all(safetensors_in(folder / c) for c in COMPONENTS[family])


def save_random_pipeline(name: str, folder: Path) -> bool:
    """Build the random model `name` into `folder`, once, whoever else asks at the same time: under an
    exclusive lock on a file beside it (fcntl.flock: released by the kernel if the holder dies), built
    into a temporary sibling folder and renamed into place, so a reader sees no folder or a whole one.
    A process that waited for the lock finds the folder whole and builds nothing. A folder there that is
    not whole (a component without weights) is removed and built again. Returns whether this call built it."""
    import fcntl
    import logging

    family = random_family(name).family
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the file closes
        if random_model_complete(folder, family):
            return False  # built by another process while this one waited
        if folder.exists():
            logging.getLogger("sdbuild").warning("%s is not a whole model (a component has no weights): "
                                                 "building it again", folder)
            shutil.rmtree(folder)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            build_random_pipeline(name).save_pretrained(tmp, safe_serialization=True)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


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


# The files of a hub snapshot that say what it is (configs, tokenizers); weights are checked per component
# (folder_problems), so a snapshot holding only some of a repo's files (a download with allow_patterns,
# which leaves the repo's pickles behind) is still found.
CONFIG_PATTERNS = ("*.json", "*.txt", "*.model")


def local_folder(path: str, patterns=CONFIG_PATTERNS) -> Path:
    """`path` as a local folder: itself if it exists, else the cached snapshot of the hub id it
    names. Never reaches for the network (`local_files_only`). huggingface_hub refuses a cached
    snapshot that lacks files its listing of the repo has (IncompleteSnapshotError) unless told which
    files are wanted: `patterns`, the configs by default."""
    folder = Path(path).expanduser()
    if folder.exists():
        return folder
    if not is_hub_id(path):
        raise NotLocal(path, "does not exist and is not a hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True, allow_patterns=list(patterns)))
    except IncompleteSnapshotError as exc:
        raise NotLocal(path, f"is a hub id whose cached snapshot is incomplete ({str(exc).split(': ', 1)[-1][:200]}), "
                             "and sdbuild downloads only when asked") from None
    except LocalEntryNotFoundError:
        raise NotLocal(path, "is a hub id that is not in the local Hugging Face cache, and sdbuild "
                             "downloads only when asked") from None


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
        download = " or set model.download=true (sdbuild fetches its safetensors and configs)," \
            if option == "model.path" else ""
        instead = f"Download it once yourself (`hf download {path}`),{download} or set {fix}" if is_hub_id(path) \
            else f"Set {fix}"
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
    if spec.model.variant is not None and (why := variant_problem(spec)):
        return [why]
    if spec.model.download and (why := download_problem(spec.model)):
        return [why]
    problems = []
    if spec.model.source is ModelSource.drawn:
        problems += drawn_problems(spec.model)
    if single_file(spec.model):
        problems += single_file_problems(spec.model)
    elif to_download(spec.model):
        pass  # checked like any folder once downloaded (the load step: download_model)
    elif spec.model.source is ModelSource.pretrained:
        problems += folder_problems("model.path", spec.model.path, "model_index.json", COMPONENTS[spec.model.family],
                                    "model.path=/path/to/a/diffusers/folder")
    if spec.model.variant is not None and not problems and not to_download(spec.model):
        problems += variant_folder_problems(spec.model)
    problems += lora_problems(spec)
    if spec.vae.path:
        problems += folder_problems("vae.path", spec.vae.path, "config.json", ("",),
                                    "vae.path=/path/to/taesd (a folder with config.json and safetensors weights)")
    return problems


def drawn_problems(model: ModelSpec) -> list[str]:
    """A drawn model exists for its family and its shipped folder is complete."""
    if model.family not in DRAWN_MODELS:
        return [problem("model.source=drawn", f"there is no drawn model of family {model.family.value}",
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


def denoiser_config(spec: Spec) -> Optional[dict]:
    """The denoiser's config (heads, head size, ...) without loading it: the family's random layout for
    tiny/arch models, else the local folder's `<denoiser>/config.json`. None where it cannot be read
    here (a hub id not in the cache, a malformed file): the rules that need it are then left to the load."""
    return _component_config(spec, FAMILIES[spec.model.family].denoiser)


def vae_downsampling(spec: Spec) -> int:
    """How many pixels a latent's side stands for, read as the pipelines do (2 ** (len(block_out_channels)
    - 1)) from the VAE's config without loading it; 8 (every real SD/Flux VAE) where it cannot be read."""
    config = _component_config(spec, "vae") or {}
    blocks = config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and 1 <= len(blocks) <= 8 else 8


def _component_config(spec: Spec, component: str) -> Optional[dict]:
    """A component's config: the family's random layout for tiny/arch models, else the local folder's
    (a shipped drawn model's too) `<component>/config.json`; None where it cannot be read here."""
    family = FAMILIES[spec.model.family]
    if spec.model.source in (ModelSource.tiny, ModelSource.arch):
        layout = family.random_models.get(random_model_name(spec.model), {})
        return dict(layout.get(component, {})) or None
    try:
        folder = Path(model_folder(spec.model, spec.cache_dir))
        config = json.loads((folder / component / "config.json").read_text())
        return config if isinstance(config, dict) else None
    except (OSError, ValueError):  # NotLocal is an OSError
        return None


# LoRA adapters ---------------------------------------------------------------------------------

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
MAX_HEADER = 100 * 2 ** 20  # a safetensors header (JSON) longer than this is no LoRA file
MAX_LORA_SCALE = 10.0
# Key prefixes that say which denoiser an adapter was trained for: diffusers' (peft) layout and
# kohya's. Keys without one of these (other trainers' layouts) are left to diffusers' converters.
UNET_PREFIXES = ("unet.", "lora_unet_")
TRANSFORMER_PREFIXES = ("transformer.", "lora_transformer_")


def hub_adapter(adapter: LoraAdapter) -> bool:
    """Whether an adapter's `path` names a hub repo (org/name): nothing by that name here, and a valid
    hub id. A local file or folder of the same name wins (as model.path's does)."""
    path = Path(adapter.path).expanduser()
    return (bool(adapter.path) and not path.exists() and path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES)
            and is_hub_id(adapter.path))  # `loras/a.safetensors` that is not there is a missing file, not a repo


def adapter_weight_name(adapter: LoraAdapter) -> str:
    return adapter.weight_name or LORA_WEIGHT_NAME


def cached_adapter(adapter: LoraAdapter) -> Optional[Path]:
    """A hub adapter's file in the local Hugging Face cache (the snapshot its `main` ref points at), or
    None; never reaches for the network (huggingface_hub's try_to_load_from_cache reads the cache folder)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(adapter.path, adapter_weight_name(adapter))
    return Path(found) if isinstance(found, str) else None


def lora_file(adapter: LoraAdapter) -> Path:
    """The .safetensors file an adapter names: `path` itself, `weight_name` inside the folder `path`, or
    a hub id's `weight_name` in the local HF cache (NotLocal when it is not there: the LoRA step
    downloads it first with `download: true`, see `download_adapter`)."""
    if hub_adapter(adapter):
        if (file := cached_adapter(adapter)) is None:
            raise NotLocal(adapter.path, f"is a hub id whose {adapter_weight_name(adapter)} is not in the local "
                                         "Hugging Face cache")
        return file
    path = Path(adapter.path).expanduser()
    return path / adapter_weight_name(adapter) if path.is_dir() else path


def adapter_label(adapter: LoraAdapter) -> str:
    """How the plan names an adapter without resolving it: its file, or `org/name:file` for a hub id."""
    return f"{adapter.path}:{adapter_weight_name(adapter)}" if hub_adapter(adapter) else str(lora_file(adapter))


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, offsets), read without
    loading a tensor. ValueError when the file is not safetensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("is shorter than a safetensors header")
        size = int.from_bytes(head, "little")
        if not 2 <= size <= MAX_HEADER:
            raise ValueError(f"declares a {size}-byte header: not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ValueError("has no JSON header: not a safetensors file") from None
    if not isinstance(header, dict):
        raise ValueError("has a header that is not a JSON object: not a safetensors file")
    return header


def _down_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_down." in name or name.endswith(("lora_A.weight", "lora_down.weight"))


def lora_rank(header: dict) -> int:
    """The largest rank among an adapter's layers: the first dimension of its down (A) matrices."""
    return max((int(v["shape"][0]) for k, v in header.items() if _down_key(k) and isinstance(v, dict) and v.get("shape")),
               default=0)


def lora_problems(spec: Spec) -> list[str]:
    """An adapter list that cannot work, found before weights load: adapters given with lora=none (they
    would be ignored), none given with a mode, hotswap with fewer than two, and each adapter's file
    (exists, safetensors not pickle, holds LoRA weights for this family's denoiser, a finite scale)."""
    lora, fix = spec.lora, "lora.adapters=[{path:/path/to/lora.safetensors,scale:1.0}]"
    if lora.mode is LoraMode.none:
        if lora.adapters:
            return [problem("lora.adapters", f"holds {len(lora.adapters)} adapter(s), but lora=none would ignore them",
                            "Choose how they run: lora=fused, lora=unfused or lora=hotswap")]
        return []
    if not lora.adapters:
        return [problem(f"lora={lora.mode.name}", "has no adapters to load", f"Set {fix}, or use lora=none")]
    if lora.mode is LoraMode.hotswap and len(lora.adapters) < 2:
        return [problem("lora=hotswap", "needs two adapters or more (the first is loaded before compile and measured, "
                        "each later one is swapped into its place)", "Add the adapter to swap in to lora.adapters, "
                        "or use lora=unfused for one adapter")]
    problems = []
    for i, adapter in enumerate(lora.adapters):
        problems += adapter_problems(f"lora.adapters[{i}]", adapter, spec.model.family)
    return problems


def adapter_problems(option: str, adapter: LoraAdapter, family) -> list[str]:
    import math

    if not adapter.path:
        return [problem(f"{option}.path", "is empty", "Point it at a LoRA .safetensors file")]
    for name in (adapter.path, adapter.weight_name or ""):
        if (pickled := pickle_problem(f"{option}.path", name)):
            return [pickled]
    if not (isinstance(adapter.scale, (int, float)) and math.isfinite(adapter.scale)
            and abs(adapter.scale) <= MAX_LORA_SCALE):
        return [problem(f"{option}.scale={adapter.scale}", f"must be a finite number from -{MAX_LORA_SCALE:g} to "
                        f"{MAX_LORA_SCALE:g} (the adapter's weight)", f"Use {option}.scale=1.0")]
    if hub_adapter(adapter):
        return hub_adapter_problems(option, adapter, family)
    if adapter.download:
        return [problem(f"{option}.download=true", f"needs {option}.path to be a hub id (org/name), not {adapter.path}",
                        f"Drop {option}.download for a local file or folder, or set {option}.path=<org/name>")]
    path = Path(adapter.path).expanduser()
    if not path.exists():
        return [problem(f"{option}.path={adapter.path}", "does not exist and is not a hub id (org/name)",
                        "Point it at a LoRA .safetensors file, a folder with weight_name inside it, or a hub id")]
    file = lora_file(adapter)
    if path.is_dir() and not file.exists():
        return [problem(f"{option}.path={adapter.path}", f"is a folder without {file.name}",
                        f"Set {option}.weight_name to the .safetensors file inside it")]
    return adapter_file_problems(option, adapter.path, file, family)


def hub_adapter_problems(option: str, adapter: LoraAdapter, family) -> list[str]:
    """A hub id adapter: its `weight_name` is safetensors, and it is in the local HF cache (then checked
    as any file), or `download: true` fetches it in the LoRA step (then checked, `download_adapter`).
    Not cached and not asked to download: refused, naming the flag; sdbuild stays offline by default."""
    name = adapter_weight_name(adapter)
    if not name.lower().endswith(".safetensors"):
        return [problem(f"{option}.weight_name={name}", "is not a .safetensors file (sdbuild loads only safetensors)",
                        f"Set {option}.weight_name to the repo's LoRA .safetensors file")]
    file = cached_adapter(adapter)
    if file is not None:
        return adapter_file_problems(option, adapter.path, file, family)
    fetch = f"download it once yourself (`hf download {adapter.path} {name}`)"
    if not adapter.download:
        return [problem(f"{option}.path={adapter.path}", f"is a hub id whose {name} is not in the local Hugging Face "
                        "cache, and sdbuild downloads only when asked",
                        f"Set {option}.download=true (fetches that one file into the HF cache; model.download=true "
                        f"fetches model.path only), or {fetch}")]
    if hub_offline():
        return [problem(f"{option}.download=true", f"{adapter.path}'s {name} is not in the cache and HF_HUB_OFFLINE "
                        "is set", f"Unset HF_HUB_OFFLINE to download it, or {fetch}")]
    return []  # checked once downloaded (the LoRA step: download_adapter)


def download_adapter(option: str, adapter: LoraAdapter, family) -> Path:
    """Fetch a hub adapter's one `weight_name` (a .safetensors file) into the normal HF cache with
    huggingface_hub's hf_hub_download (its progress bar), then check it like a local adapter file. An
    unreachable hub, a missing repo or file is a SpecError naming the option (exit 2), not a traceback."""
    from huggingface_hub import constants, hf_hub_download

    from .errors import SpecError

    try:
        file = Path(hf_hub_download(adapter.path, adapter_weight_name(adapter)))
    except Exception as exc:  # noqa: BLE001: every way a download fails is a refusal with its reason
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        raise SpecError([problem(f"{option}.path={adapter.path} {option}.download=true",
                                 f"{adapter_weight_name(adapter)} could not be downloaded from {constants.ENDPOINT} "
                                 f"({why})", f"Check the network, the hub id, {option}.weight_name and HF_ENDPOINT/"
                                 f"HF_TOKEN, or download it yourself (`hf download {adapter.path} "
                                 f"{adapter_weight_name(adapter)}`)")]) from None
    if (problems := adapter_file_problems(option, adapter.path, file, family)):
        raise SpecError(problems)
    return file


def adapter_file_problems(option: str, given: str, file: Path, family) -> list[str]:
    """An adapter's resolved file: a regular .safetensors file whose header holds LoRA weights for this
    family's denoiser (read without loading a tensor)."""
    from .families import FAMILIES

    if file.suffix.lower() != ".safetensors":
        return [problem(f"{option}.path={file}", "is not a .safetensors file (sdbuild loads only safetensors)",
                        "Point it at the adapter's .safetensors file")]
    if (why := weights_file_problem(file)):
        return [problem(f"{option}.path={given}", why, "Point it at a LoRA .safetensors file")]
    try:
        header = safetensors_header(file)
    except (OSError, ValueError) as exc:
        return [problem(f"{option}.path={file}", str(exc), "Point it at a LoRA .safetensors file")]
    names = [k for k in header if k != "__metadata__"]
    if not any(_down_key(k) for k in names):
        return [problem(f"{option}.path={file}", "holds no LoRA weights (no lora_A/lora_down tensors)",
                        "Point it at a LoRA adapter (diffusers' save_lora_weights, or a kohya-style LoRA)")]
    transformer = FAMILIES[family].transformer
    wrong = TRANSFORMER_PREFIXES if not transformer else UNET_PREFIXES
    if any(k.startswith(wrong) for k in names) and not any(k.startswith(UNET_PREFIXES if not transformer
                                                                        else TRANSFORMER_PREFIXES) for k in names):
        trained = "a transformer (Flux, SD3)" if not transformer else "a UNet (SD 1.x, SDXL)"
        return [problem(f"{option}.path={file}", f"is an adapter for {trained}, and model family {family.name}'s "
                        f"denoiser is {'a transformer' if transformer else 'a UNet'}",
                        "Use an adapter trained for this model's family")]
    return []


def adapter_record(adapter: LoraAdapter) -> dict:
    """What a row records of an adapter: its file, a content hash (sha256), its scale and rank."""
    import hashlib

    file = lora_file(adapter)
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = {"path": str(file), "sha256": digest.hexdigest(), "scale": adapter.scale,
              "rank": lora_rank(safetensors_header(file))}
    if hub_adapter(adapter):  # the cache path says where; these say what: the repo, its file and commit
        parts = file.parts
        commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
        record.update(hub_id=adapter.path, weight_name=adapter_weight_name(adapter), revision=commit)
    return record


# Variants (diffusers' variant=: <name>.<variant>.safetensors beside or instead of <name>.safetensors) ---

VARIANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def is_variant_file(path: Path, variant: str) -> bool:
    """Whether `path` is a weights file of `variant`: name.<variant>.safetensors, or a shard of it
    (name.<variant>-00001-of-00002.safetensors)."""
    return re.fullmatch(rf".+\.{re.escape(variant)}(-\d+-of-\d+)?\.safetensors", path.name) is not None


def variant_split(model: ModelSpec) -> tuple[list[str], list[str]]:
    """(components with the variant's files, components that load their default files instead)."""
    folder = local_folder(model.path)
    with_variant, without = [], []
    for c in COMPONENTS[model.family]:
        files = sorted((folder / c).glob("*.safetensors"))
        (with_variant if any(is_variant_file(f, model.variant) for f in files) else without).append(c or ".")
    return with_variant, without


def variant_problem(spec: Spec) -> Optional[str]:
    """model.variant where it cannot apply: a malformed name, a random-weight model (it would be ignored),
    a single-file checkpoint (one file, no variants)."""
    model = spec.model
    if not VARIANT.match(model.variant):
        return problem(f"model.variant={model.variant}", "is not a variant name (letters, digits, _)",
                       "Use model.variant=fp16 (the file names' infix: model.fp16.safetensors)")
    if model.source is not ModelSource.pretrained:
        return problem(f"model.variant={model.variant}", f"model={model.name} builds its weights from code and would "
                       "ignore the variant", "Drop model.variant, or choose a pretrained model with it")
    if single_file(model):
        return problem(f"model.variant={model.variant}", "names files inside a diffusers folder; model.path is one "
                       "checkpoint file", "Drop model.variant, or point model.path at a diffusers folder")
    return None


def variant_folder_problems(model: ModelSpec) -> list[str]:
    """The variant checked per component before loading: at least one component has its files (else
    diffusers refuses after the pipeline class is resolved); the others load their default files, which
    folder_problems has checked are there (the build notes and the plan say which)."""
    try:
        with_variant, without = variant_split(model)
    except NotLocal:
        return []  # folder_problems says so
    if not with_variant:
        return [problem(f"model.variant={model.variant}", f"no component of {model.path} has {model.variant} files "
                        f"(*.{model.variant}.safetensors)", "Drop model.variant (load the default files), or use the "
                        "variant the folder has")]
    return []


# Downloads on request (model.download=true) ------------------------------------------------------

# What a download fetches: configs, tokenizers and safetensors weights; never pickles (.bin, .ckpt, ...).
DOWNLOAD_PATTERNS = (*CONFIG_PATTERNS, "*.safetensors")


def download_patterns(variant: Optional[str]) -> list:
    """The files model.download=true fetches: configs and safetensors weights (only the variant's)."""
    if not variant:
        return list(DOWNLOAD_PATTERNS)
    return [*CONFIG_PATTERNS, f"*.{variant}.safetensors", f"*.{variant}-*-of-*.safetensors"]


def cached(path: str, patterns=CONFIG_PATTERNS) -> bool:
    try:
        local_folder(path, patterns)
    except NotLocal:
        return False
    return True


def to_download(model: ModelSpec) -> bool:
    """Whether the load step downloads first: model.download=true and a hub id not in the local cache."""
    return (model.download and model.source is ModelSource.pretrained and bool(model.path) and not single_file(model)
            and not Path(model.path).expanduser().exists() and is_hub_id(model.path)
            and not cached(model.path, download_patterns(model.variant)))  # an interrupted download resumes


def download_problem(model: ModelSpec) -> Optional[str]:
    """model.download=true where it cannot apply: a random-weight model, a local path, an offline hub."""
    if model.source is not ModelSource.pretrained:
        return problem("model.download=true", f"model={model.name} builds its weights from code: there is nothing "
                       "to download", "Drop model.download, or choose a pretrained model with model.path=<org/name>")
    if not model.path or single_file(model) or Path(model.path).expanduser().exists() or not is_hub_id(model.path):
        return problem("model.download=true", f"needs model.path to be a hub id (org/name), not {model.path}",
                       "Set model.path=<org/name>, or drop model.download for a local folder or file")
    if to_download(model) and hub_offline():
        return problem("model.download=true", f"{model.path} is not in the cache and HF_HUB_OFFLINE is set",
                       "Unset HF_HUB_OFFLINE to download it, or download it once yourself (`hf download "
                       f"{model.path}`)")
    return None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids huggingface_hub the network (a download would fail)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_model(model: ModelSpec) -> Path:
    """Fetch a hub id's configs and safetensors weights (only the variant's, with model.variant) into the
    normal Hugging Face cache with huggingface_hub's progress bar, then check the snapshot like any
    folder. An unreachable hub or a missing repo is a SpecError naming the option, not a traceback."""
    from huggingface_hub import constants, snapshot_download

    from .errors import SpecError

    try:
        folder = Path(snapshot_download(model.path, allow_patterns=download_patterns(model.variant)))
    except Exception as exc:  # noqa: BLE001: every way a download fails is a refusal with its reason
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        raise SpecError([problem(f"model.path={model.path} model.download=true",
                                 f"could not be downloaded from {constants.ENDPOINT} ({why})",
                                 "Check the network, the hub id and HF_ENDPOINT/HF_TOKEN (a gated model needs "
                                 f"`hf auth login`), or download it yourself (`hf download {model.path}`)")]) from None
    fix = "model.path=<org/name> of a diffusers pipeline repo"
    problems = folder_problems("model.path", str(folder), "model_index.json", COMPONENTS[model.family], fix)
    if not problems and model.variant:
        problems = variant_folder_problems(ModelSpec(**{**model.__dict__, "path": str(folder)}))
    if problems:
        raise SpecError(problems)
    return folder
