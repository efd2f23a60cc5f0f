"""Write a diffusers SD 1.x pipeline folder as one .safetensors file in the original (LDM /
CompVis) single-file key layout, the way fine-tuned checkpoints are shared: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, CLIP under
`cond_stage_model.transformer.`. Test-only: it lets a test make a real single-file checkpoint from
the embedded tiny model and load it back with diffusers' from_single_file (whose converters go the
other way). Written for the layouts the embedded models use (any block count and layers_per_block)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    for diffusers, ldm in RESNET:
        if rest.startswith(diffusers + "."):
            return ldm + rest[len(diffusers):]
    raise KeyError(rest)


def unet_key(key: str, config: dict) -> str:
    per = config["layers_per_block"]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, tail = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (per + 1) + j
        return f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (per + 1) + j
        return f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{i * (per + 1) + per}.{2 if has_attention else 1}.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    raise KeyError(key)


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, config: dict) -> str:
    blocks = len(config["block_out_channels"])
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    return key.replace("conv_norm_out", "norm_out")  # conv_in, conv_out, quant_conv, post_quant_conv


def _component(folder: Path, name: str):
    weights = next((folder / name).glob("*.safetensors"))
    return load_file(weights), json.loads((folder / name / "config.json").read_text())


def write_single_file(folder: Path, out: Path) -> Path:
    """The SD 1.x pipeline in `folder` as one LDM-layout .safetensors file at `out`."""
    unet, unet_config = _component(folder, "unet")
    vae, vae_config = _component(folder, "vae")
    clip, _ = _component(folder, "text_encoder")
    state = {f"model.diffusion_model.{unet_key(k, unet_config)}": v for k, v in unet.items()}
    for k, v in vae.items():
        ldm = vae_key(k, vae_config)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # LDM's VAE attention is 1x1 convolutions
        state[f"first_stage_model.{ldm}"] = v
    # original checkpoints hold CLIP as `transformer.text_model.*` (transformers >= 5.6 saves it flattened)
    state.update({f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in clip.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
