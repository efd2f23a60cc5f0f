"""Where pipeline weights come from.

Three sources (``model.source``), one loading path: every model ends up as a diffusers folder
with safetensors weights, loaded by its family's pipeline class (``from_pretrained``).

- ``pretrained``: a local folder, or a hub id already in the local Hugging Face cache (resolved
  to its snapshot folder here: sdbuild never downloads). Checked per component before loading.
- ``tiny`` / ``arch``: a pipeline built from code with a fixed seed and random weights: the
  embedded tiny model, or a published architecture (SD 1.5, SDXL, Flux, SD 3.5) at full size. It is saved once
  to the cache folder and loaded from there like any real model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import problem
from .families import FAMILIES
from .spec import ModelSource, ModelSpec, Spec

# Bump when the code that builds a random model changes, so stale caches are not reused.
RANDOM_MODEL_VERSION = 1

# Published Stable Diffusion 1.5 component configs (runwayml/stable-diffusion-v1-5).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    act_fn="silu",
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# The embedded tiny model: the SD 1.x layout (cross-attention and plain blocks, a VAE that
# downsamples 8x, a CLIP text encoder) at dimensions that run 50 steps in seconds on a CPU.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
)

# Published Stable Diffusion XL base 1.0 component configs (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14 text tower, with projection
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="gelu",
    projection_dim=1280,
)

# The tiny SDXL: SDXL's layout (two text encoders, added time/text conditioning, linear
# projections, multi-layer transformer blocks) at CPU-test dimensions.
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,  # the two text encoders' hidden states, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
    norm_num_groups=16,
)
TINY_SDXL_TEXT_2 = dict(TINY_TEXT, hidden_act="gelu")

RANDOM_MODELS: Dict[str, Dict[str, Any]] = {
    "tiny-sd15": dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, scheduler=SD15_SCHEDULER),
    "sd15-arch": dict(unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, scheduler=SD15_SCHEDULER),
    "tiny-sdxl": dict(unet=TINY_SDXL_UNET, vae=TINY_VAE, text=TINY_TEXT, text_2=TINY_SDXL_TEXT_2,
                      scheduler=SD15_SCHEDULER),
    "sdxl-arch": dict(unet=SDXL_UNET, vae=SDXL_VAE, text=SD15_TEXT, text_2=SDXL_TEXT_2, scheduler=SD15_SCHEDULER),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDBUILD_CACHE", Path.home() / ".cache" / "sdbuild"))


def random_model_name(model: ModelSpec) -> str:
    if model.source is ModelSource.tiny:
        return f"tiny-{model.family.name}"
    return f"{model.family.name}-arch"


def model_folder(model: ModelSpec, cache_dir: str | None) -> str:
    """The local folder `from_pretrained` reads for this model spec (a hub id: its cached snapshot)."""
    if model.source is ModelSource.pretrained:
        return str(local_folder(model.path))
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return str(root / f"{random_model_name(model)}-v{RANDOM_MODEL_VERSION}")


def ensure_model(model: ModelSpec, cache_dir: str | None) -> str:
    """Return the folder to load; build and save the random model first if it is not cached."""
    folder = model_folder(model, cache_dir)
    if model.source is not ModelSource.pretrained and not (Path(folder) / "model_index.json").exists():
        save_random_pipeline(random_model_name(model), Path(folder))
    return folder


def _byte_level_vocab() -> Dict[str, int]:
    """A complete byte-level BPE vocabulary with no merges: every string tokenizes, one
    token per character. Real CLIP has 49k merges; the encoder does not care which ids it sees."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _random_tokenizer():
    """A CLIPTokenizer over the byte-level vocabulary, and the vocabulary itself."""
    from transformers import CLIPTokenizer

    vocab = _byte_level_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        # Positional file paths: accepted by transformers 4.x and 5.x alike.
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77), vocab


def _text_encoder(cls, config: Dict[str, Any], vocab: Dict[str, int]):
    from transformers import CLIPTextConfig

    eos = vocab["<|endoftext|>"]
    config = dict(config, vocab_size=max(config.get("vocab_size", 0), len(vocab)))
    return cls(CLIPTextConfig(bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, **config)).eval()


def seeded(**builders):
    """name -> (seed, build) in, name -> built module out: each built right after `torch.manual_seed(seed)`,
    in the order given, so random weights are the same on every machine; the caller's RNG is left as it was."""
    import torch

    state = torch.random.get_rng_state()
    try:
        built = {}
        for name, (seed, build) in builders.items():
            torch.manual_seed(seed)
            built[name] = build()
        return built
    finally:
        torch.random.set_rng_state(state)


def build_random_pipeline(name: str):
    """Build a pipeline with random weights (fixed seeds): SD 1.x or SDXL from RANDOM_MODELS, a
    transformer family from its own module (sdbuild/families)."""
    from .families.flux import RANDOM_FLUX, build_random_flux
    from .families.sd3 import RANDOM_SD3, build_random_sd3

    if name in RANDOM_FLUX:
        return build_random_flux(name)
    if name in RANDOM_SD3:
        return build_random_sd3(name)
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = RANDOM_MODELS[name]
    tokenizer, vocab = _random_tokenizer()
    parts = seeded(unet=(0, lambda: UNet2DConditionModel(**cfg["unet"])), vae=(1, lambda: AutoencoderKL(**cfg["vae"])),
                   text_encoder=(2, lambda: _text_encoder(CLIPTextModel, cfg["text"], vocab)))
    scheduler = DDIMScheduler(**cfg["scheduler"])
    if "text_2" in cfg:
        parts.update(seeded(text_encoder_2=(4, lambda: _text_encoder(CLIPTextModelWithProjection, cfg["text_2"], vocab))))
        return StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)
    return StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


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
    if not HUB_ID.match(path):
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
        instead = f"Download it once yourself (`hf download {path}`), or set {fix}" if HUB_ID.match(path) else f"Set {fix}"
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


def model_problems(spec: Spec) -> list[str]:
    """Problems with the spec's weight folders, found before anything loads."""
    problems = []
    if spec.model.source is ModelSource.pretrained:
        problems += folder_problems("model.path", spec.model.path, "model_index.json", COMPONENTS[spec.model.family],
                                    "model.path=/path/to/a/diffusers/folder")
    if spec.vae.path:
        problems += folder_problems("vae.path", spec.vae.path, "config.json", ("",),
                                    "vae.path=/path/to/taesd (a folder with config.json and safetensors weights)")
    return problems
