#!/usr/bin/env python
"""Train the drawn-set models that ship with sdbuild (issue 26), seeded, on CPU.

    python scripts/train_tiny.py reader        # the digit reader -> sdbuild/data/drawn_reader.safetensors
    python scripts/train_tiny.py sd            # the tiny SD 1.x pipeline -> sdbuild/data/tiny_drawn/
    python scripts/train_tiny.py flux          # the tiny Flux pipeline -> sdbuild/data/tiny_flux_drawn/
                                               # (needs the SD one: it shares its trained VAE)

Each part logs its progress and ends with its held-out measurement. `--smoke` trains a few steps
into a temporary folder (what the test runs); the shipped weights come from the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_step(loss, opt, sched, params) -> None:
    """One optimizer step of the denoiser trainings: gradients clipped to norm 1, the LR schedule advanced."""
    import torch

    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def reader(args) -> None:
    import numpy as np

    from sdbuild import drawn

    out = Path(args.out) if args.out else drawn.READER_WEIGHTS
    n, epochs = (256, 1) if args.smoke else (args.samples, args.epochs)
    t0 = time.time()
    model = drawn.train_reader(seed=args.seed, n=n, epochs=epochs, out=out, log=log)
    log(f"trained in {time.time() - t0:.0f} s")
    # Held out: another seed of the set, read end to end (colours from pixels, digit by the CNN).
    images, labels = drawn.dataset(args.seed + 1000, 500 if args.smoke else 3000)
    seen = drawn.read(images, model=model)
    for field in ("digit", "colour", "background"):
        acc = np.mean([getattr(a, field) == getattr(b, field) for a, b in zip(seen, labels)])
        log(f"held-out {field} accuracy {acc:.4f}")
    log(f"held-out all-three accuracy {np.mean([a == b for a, b in zip(seen, labels)]):.4f}")


# The drawn SD 1.x pipeline: the embedded tiny UNet and CLIP text encoder (sdbuild/families/sd15.py: TINY_UNET,
# TINY_TEXT) with an AutoencoderTiny (TAESD's architecture at width 16, three blocks: 4x down, 4 latent channels,
# so 16x16 latents) in place of the AutoencoderKL. The AutoencoderKL's GroupNorms erase a flat image's colour
# (these images are two flat colours): in trials it learned nothing in 60 steps, even overfitting one batch;
# TAESD has no norm layers. At 8x down (four blocks, 8x8 latents) 1200 steps reconstructed the drawings at
# 18.6 dB and the reader read back 0.217 of them; at 4x, 22.8 dB and 0.947 (2026-12-03, one quiet run each).
DRAWN_VAE = dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                 num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)
DRAWN_UNET_SAMPLE = 16  # the latent side at 64x64 pixels


SD_FOLDER = Path(__file__).resolve().parent.parent / "sdbuild" / "data" / "tiny_drawn"


def sd(args) -> None:
    """Train the tiny SD 1.x pipeline on the canonical drawings of all 300 prompts: first the VAE
    (reconstruction, a little noise on the latents), then the UNet and the CLIP text encoder together on the
    VAE's latents (epsilon prediction, SD 1.5's noise schedule, 10 % empty prompts so classifier-free
    guidance has an unconditional branch). Saved with save_pretrained (safetensors), loaded back with
    from_pretrained, and measured: adherence of 50-step DDIM images on seeds never used in training."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdbuild import drawn
    from sdbuild.families.common import clip_text_encoder, clip_tokenizer
    from sdbuild.families.sd15 import SD15_SCHEDULER, TINY_TEXT, TINY_UNET

    out = Path(args.out) if args.out else SD_FOLDER
    vae_steps, unet_steps = (3, 3) if args.smoke else (args.vae_steps, args.unet_steps)
    gen = torch.Generator().manual_seed(args.seed)
    labels = drawn.all_labels()
    prompts = [l.prompt for l in labels]
    x = torch.from_numpy(drawn.canonical(labels)).float().permute(0, 3, 1, 2) / 127.5 - 1.0

    torch.manual_seed(args.seed)
    init = Path(args.init) if args.init else None
    vae = AutoencoderTiny.from_pretrained(init / "vae") if init else AutoencoderTiny(**DRAWN_VAE)
    if init:  # a second stage: the VAE stays as trained, the UNet and text encoder train on
        vae_steps = 0
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    vae_sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.vae_lr, total_steps=max(vae_steps, 1), pct_start=0.1)
    t0 = time.time()
    for step in range(vae_steps):
        idx = torch.randint(0, len(x), (args.vae_batch,), generator=gen)
        z = vae.encode(x[idx]).latents
        rec = vae.decode(z + args.vae_noise * torch.randn(z.shape, generator=gen)).sample
        loss = F.mse_loss(rec, x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        vae_sched.step()
        if step % 20 == 0 or step == vae_steps - 1:
            log(f"vae step {step}: loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latents for c in x.split(50)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(50)])
    recon_u8 = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    mse = float(((recon.clamp(-1, 1) - x) ** 2).mean() / 4)  # on a 0..1 scale
    read_back = drawn.adherence(recon_u8, prompts) if drawn.READER_WEIGHTS.exists() else float("nan")
    log(f"vae trained in {time.time() - t0:.0f} s; reconstruction PSNR {10 * np.log10(1 / mse):.1f} dB, "
        f"read back by the reader: {read_back:.3f}")
    scale = float(vae.config.scaling_factor) if init else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    tokenizer, vocab = clip_tokenizer()
    torch.manual_seed(args.seed + 1)
    text = (CLIPTextModel.from_pretrained(init / "text_encoder") if init
            else clip_text_encoder(CLIPTextModel, TINY_TEXT, vocab)).train()
    torch.manual_seed(args.seed + 2)
    unet = (UNet2DConditionModel.from_pretrained(init / "unet") if init
            else UNet2DConditionModel(**dict(TINY_UNET, sample_size=DRAWN_UNET_SAMPLE))).train()
    ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = len(prompts)
    # v-prediction (as SD 2.x; every UNet sampler sdbuild offers takes it): at high noise the target is the
    # image itself, which a briefly trained UNet learns first, and that is where the digit is decided.
    noise_schedule = DDIMScheduler(**dict(SD15_SCHEDULER, prediction_type="v_prediction"))
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(unet_steps, 1), pct_start=0.1)
    t0 = time.time()
    for step in range(unet_steps):
        idx = torch.randint(0, len(prompts), (args.unet_batch,), generator=gen)
        cond = torch.where(torch.rand(len(idx), generator=gen) < 0.1, empty, idx)
        noise = torch.randn((len(idx),) + latents.shape[1:], generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_schedule.add_noise(latents[idx], noise, t)
        pred = unet(noisy, t, text(ids[cond])[0]).sample
        loss = F.mse_loss(pred, noise_schedule.get_velocity(latents[idx], noise, t))
        train_step(loss, opt, sched, params)
        if step % 20 == 0 or step == unet_steps - 1:
            log(f"unet step {step}: loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
    log(f"unet + text encoder trained in {time.time() - t0:.0f} s")

    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae, text_encoder=text.eval(), tokenizer=tokenizer,
                                   scheduler=noise_schedule, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    log(f"saved to {out}")
    if not drawn.READER_WEIGHTS.exists():
        log("no reader weights yet: not measured (train the reader, then run: train_tiny.py sd-eval)")
        return
    evaluate(out, n=10 if args.smoke else args.eval_prompts, seeds=(1000,) if args.smoke else (1000, 1001),
             steps=3 if args.smoke else args.eval_steps, png=args.png)


FLUX_FOLDER = Path(__file__).resolve().parent.parent / "sdbuild" / "data" / "tiny_flux_drawn"
# The drawn Flux transformer: the embedded tiny Flux's layout (sdbuild/families/flux.py) at width 64 (4 heads
# of 16) with four single-stream blocks, on the drawn SD pipeline's VAE latents (4 channels, 4x down: packed
# 2x2, 16 in-channels and 64 image tokens at 64x64 pixels).
DRAWN_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
                              num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                              guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def flux(args) -> None:
    """Train the tiny Flux pipeline on the canonical drawings of all 300 prompts by flow matching, in the
    latent space of the drawn SD pipeline's trained VAE (an AutoencoderTiny: kept as trained, not trained
    again; FluxPipeline reads its 4x downsampling from `block_out_channels`, written into its config).
    The transformer, the CLIP and the T5 encoders (the embedded tiny sizes) train together: x_t =
    (1 - s) x0 + s noise, the target noise - x0, s drawn logit-normal (as SD3 and Flux train), the guidance
    embedding fed a random scale in [1, 10] so that any guidance_scale a run gives is one it has seen
    (FluxPipeline has no classifier-free guidance batch: the prompt alone must decide). Saved with
    save_pretrained (safetensors), loaded back with from_pretrained, and measured like the SD one."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderTiny, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from sdbuild import drawn
    from sdbuild.families.common import clip_text_encoder, clip_tokenizer, t5_encoder, t5_tokenizer
    from sdbuild.families.flux import FLUX_SCHEDULER, TINY_CLIP, TINY_T5

    out = Path(args.out) if args.out else FLUX_FOLDER
    steps = 3 if args.smoke else args.unet_steps
    gen = torch.Generator().manual_seed(args.seed)
    labels = drawn.all_labels()
    prompts = [l.prompt for l in labels]
    x = torch.from_numpy(drawn.canonical(labels)).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    sd_vae = Path(args.init) if args.init else SD_FOLDER / "vae"
    vae = AutoencoderTiny.from_pretrained(sd_vae).eval()
    vae.register_to_config(block_out_channels=list(vae.config.encoder_block_out_channels))  # FluxPipeline: 4x down
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latents for c in x.split(50)]) * vae.config.scaling_factor
    side = latents.shape[-1]

    init = Path(args.resume) if args.resume else None
    clip_tok, vocab = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(args.seed + 1)
    text = (CLIPTextModel.from_pretrained(init / "text_encoder") if init
            else clip_text_encoder(CLIPTextModel, TINY_CLIP, vocab)).train()
    torch.manual_seed(args.seed + 2)
    from transformers import T5EncoderModel

    t5 = (T5EncoderModel.from_pretrained(init / "text_encoder_2") if init else t5_encoder(TINY_T5, tokenizer_2)).train()
    torch.manual_seed(args.seed + 3)
    transformer = (FluxTransformer2DModel.from_pretrained(init / "transformer") if init
                   else FluxTransformer2DModel(**DRAWN_FLUX_TRANSFORMER)).train()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    pipe = FluxPipeline(transformer=transformer, vae=vae, text_encoder=text, text_encoder_2=t5, tokenizer=clip_tok,
                        tokenizer_2=tokenizer_2, scheduler=scheduler)
    clip_ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    t5_ids = tokenizer_2(prompts, padding="max_length", max_length=args.t5_tokens, truncation=True,
                         return_tensors="pt").input_ids
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(args.t5_tokens, 3)
    params = list(transformer.parameters()) + list(text.parameters()) + list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(steps, 1), pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(prompts), (args.unet_batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(len(idx), generator=gen))
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        packed = FluxPipeline._pack_latents(xt, len(idx), x0.shape[1], side, side)
        target = FluxPipeline._pack_latents(noise - x0, len(idx), x0.shape[1], side, side)
        pooled = text(clip_ids[idx], output_hidden_states=False).pooler_output
        per_token = t5(t5_ids[idx], output_hidden_states=False)[0]
        guidance = 1 + 9 * torch.rand(len(idx), generator=gen)
        pred = transformer(hidden_states=packed, timestep=s, guidance=guidance, pooled_projections=pooled,
                           encoder_hidden_states=per_token, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        train_step(loss, opt, sched, params)
        if step % 20 == 0 or step == steps - 1:
            log(f"transformer step {step}: loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
    log(f"transformer + text encoders trained in {time.time() - t0:.0f} s")
    for part in (transformer, text, t5):
        part.eval()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    log(f"saved to {out}")
    evaluate(out, n=10 if args.smoke else args.eval_prompts, seeds=(1000,) if args.smoke else (1000, 1001),
             steps=3 if args.smoke else args.eval_steps, png=args.png, flow=True, t5_tokens=args.t5_tokens)


def evaluate(folder: Path, n: int, seeds, steps: int, png: str | None = None, flow: bool = False,
             t5_tokens: int = 512) -> float:
    """Adherence of the saved pipeline, loaded with from_pretrained: n prompts spread over the set, each
    with every seed (seeds the training never drew), fp32, `steps` steps (SD: DDIM, classifier-free
    guidance 7.5; Flux, `flow`: its flow-matching Euler scheduler, guidance embedding 7.5)."""
    import numpy as np
    import torch
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from sdbuild import drawn

    if flow:
        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    labels = drawn.all_labels()
    prompts = [labels[i].prompt for i in np.linspace(0, len(labels) - 1, n).round().astype(int)]
    t0 = time.time()
    images, wanted = [], []
    for seed in seeds:
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        extra = dict(max_sequence_length=t5_tokens) if flow else {}
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens, output_type="np",
                   height=64, width=64, **extra).images
        images.append((out * 255).round().astype(np.uint8))
        wanted += prompts
    images = np.concatenate(images)
    hits = drawn.matches(images, wanted)
    seen = drawn.read(images)
    for field in ("digit", "colour", "background"):
        acc = np.mean([getattr(s, field) == getattr(drawn.parse_prompt(p), field) for s, p in zip(seen, wanted)])
        log(f"generated {field} accuracy {acc:.3f}")
    score = sum(hits) / len(hits)
    log(f"adherence {score:.3f} over {len(hits)} images ({len(prompts)} prompts x {len(seeds)} seeds, {steps} "
        f"steps, {time.time() - t0:.0f} s)")
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(images[r * 10:(r + 1) * 10]), 1) for r in range(min(4, len(images) // 10))], 0)
    if png:
        Image.fromarray(grid).save(png)
        log(f"samples: {png}")
    return score


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["reader", "sd", "sd-eval", "flux", "flux-eval"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", default=None, help="where to write (default: the shipped location under sdbuild/data)")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-noise", type=float, default=0.05)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--eval-prompts", type=int, default=60)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--init", default=None, help="sd: start from this saved pipeline folder (its VAE kept, "
                   "its UNet and text encoder trained on: a second stage)")
    p.add_argument("--resume", default=None, help="flux: start from this saved Flux folder (a second stage)")
    p.add_argument("--t5-tokens", type=int, default=512, help="flux: the T5 sequence, trained and evaluated "
                   "(FluxPipeline's max_sequence_length; a run uses the family's)")
    p.add_argument("--png", default=None, help="save a grid of evaluated samples here")
    p.add_argument("--smoke", action="store_true", help="a few seconds of training, to check the script runs")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.part in ("sd-eval", "flux-eval"):
        flow = args.part == "flux-eval"
        folder = Path(args.out) if args.out else FLUX_FOLDER if flow else SD_FOLDER
        evaluate(folder, n=args.eval_prompts, seeds=(1000, 1001), steps=args.eval_steps, png=args.png, flow=flow,
                 t5_tokens=args.t5_tokens)
    else:
        {"reader": reader, "sd": sd, "flux": flux}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
