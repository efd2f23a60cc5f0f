"""The drawn set: 64x64 coloured digits with their prompts, drawn with Pillow alone, and the
small classifier that reads them back (issue 26).

Each sample is a digit 0-9 in one colour on a background of another, at a varied position and
size, with the prompt that says so ("a red 7 on a blue background"). Everything follows from the
seed: `sample(seed, index)` is the same picture on every machine with the same Pillow.

The classifier (`Reader`) is a small CNN with three heads (digit, digit colour, background
colour), trained on this set by `train_reader` and shipped as safetensors next to this module
(`sdbuild/data/drawn_reader.safetensors`), so scoring a generated image needs no download.
`adherence(images, prompts)` is the fraction of images whose digit and both colours all match
their prompt. It is a regression signal for lossy levers on the drawn models, not a measure of a
real model's quality.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

SIZE = 64
# Colour names and their RGB values. Far apart in RGB so a blurred or shifted image still reads.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
DIGITS = tuple(range(10))

READER_WEIGHTS = Path(__file__).parent / "data" / "drawn_reader.safetensors"


@dataclass(frozen=True)
class Label:
    digit: int
    colour: int  # index into COLOUR_NAMES: the digit's colour
    background: int  # index into COLOUR_NAMES, never equal to colour

    @property
    def prompt(self) -> str:
        return f"a {COLOUR_NAMES[self.colour]} {self.digit} on a {COLOUR_NAMES[self.background]} background"


def all_labels() -> list[Label]:
    """Every (digit, colour, background) combination: 10 x 6 x 5 = 300 prompts."""
    return [
        Label(d, c, b)
        for d in DIGITS
        for c in range(len(COLOUR_NAMES))
        for b in range(len(COLOUR_NAMES))
        if b != c
    ]


def parse_prompt(prompt: str) -> Label:
    """The label a prompt of this set names; ValueError for any other prompt."""
    words = prompt.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a drawn-set prompt: {prompt!r} (use e.g. 'a red 7 on a blue background')")
    colour, digit, background = words[1], words[2], words[5]
    if colour not in COLOURS or background not in COLOURS or not digit.isdigit() or len(digit) != 1:
        raise ValueError(f"not a drawn-set prompt: {prompt!r} (colours: {', '.join(COLOUR_NAMES)}; digits 0-9)")
    if colour == background:
        raise ValueError(f"not a drawn-set prompt: {prompt!r} (digit and background colours must differ)")
    return Label(int(digit), COLOUR_NAMES.index(colour), COLOUR_NAMES.index(background))


def draw(label: Label, rng: random.Random) -> np.ndarray:
    """Draw one label as a 64x64 RGB uint8 array; size and position come from rng."""
    from PIL import Image, ImageDraw, ImageFont

    font_size = rng.randint(40, 60)
    font = ImageFont.load_default(size=font_size)
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[COLOUR_NAMES[label.background]])
    pen = ImageDraw.Draw(image)
    text = str(label.digit)
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = rng.randint(2, max(2, SIZE - 2 - w)) - left
    y = rng.randint(2, max(2, SIZE - 2 - h)) - top
    pen.text((x, y), text, font=font, fill=COLOURS[COLOUR_NAMES[label.colour]])
    return np.asarray(image, dtype=np.uint8)


def sample(seed: int, index: int) -> tuple[np.ndarray, Label]:
    """Sample `index` of the set drawn from `seed`: (64x64x3 uint8 image, label)."""
    rng = random.Random(f"drawn:{seed}:{index}")
    labels = all_labels()
    label = labels[rng.randrange(len(labels))]
    return draw(label, rng), label


def dataset(seed: int, n: int) -> tuple[np.ndarray, list[Label]]:
    """n samples from `seed`: (n x 64 x 64 x 3 uint8 array, labels)."""
    pairs = [sample(seed, i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# ---------------------------------------------------------------- the classifier


def _reader_module():
    import torch
    from torch import nn

    class Reader(nn.Module):
        """Three heads over a small CNN: digit (10), digit colour (6), background colour (6)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16
                nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8
                nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),  # 2
                nn.Flatten(),
            )
            self.digit = nn.Linear(256, len(DIGITS))
            self.colour = nn.Linear(256, len(COLOUR_NAMES))
            self.background = nn.Linear(256, len(COLOUR_NAMES))

        def forward(self, x):
            h = self.features(x)
            return self.digit(h), self.colour(h), self.background(h)

    return Reader, torch


def _to_tensor(images: np.ndarray):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    return x


def train_reader(seed: int = 0, n: int = 6000, epochs: int = 6, out: Path | None = READER_WEIGHTS, log=print):
    """Train the classifier on `n` samples from `seed` (seeded, CPU); save safetensors to `out`."""
    Reader, torch = _reader_module()
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    images, labels = dataset(seed, n)
    x = _to_tensor(images)
    y = torch.tensor([[l.digit, l.colour, l.background] for l in labels])
    model = Reader()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, 64):
            idx = order[start : start + 64]
            xb = x[idx]
            # Light augmentation: the generated images are blurrier and noisier than the drawn ones.
            xb = xb + 0.08 * torch.randn(xb.shape, generator=gen)
            d, c, b = model(xb)
            loss = loss_fn(d, y[idx, 0]) + loss_fn(c, y[idx, 1]) + loss_fn(b, y[idx, 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log(f"reader epoch {epoch}: loss {total / n:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return model


_READER = None


def load_reader():
    """The shipped classifier (loaded once)."""
    global _READER
    if _READER is None:
        Reader, _ = _reader_module()
        from safetensors.torch import load_file

        model = Reader()
        model.load_state_dict(load_file(str(READER_WEIGHTS)))
        model.eval()
        _READER = model
    return _READER


def read(images: np.ndarray, batch: int = 256) -> list[Label]:
    """What the classifier sees in each image (n x H x W x 3 uint8; resized to 64x64 if needed)."""
    import torch

    images = _as_64(images)
    model = load_reader()
    out: list[Label] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            d, c, b = model(_to_tensor(images[start : start + batch]))
            for di, ci, bi in zip(d.argmax(1).tolist(), c.argmax(1).tolist(), b.argmax(1).tolist()):
                out.append(Label(di, ci, bi))
    return out


def _as_64(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.shape[1:3] == (SIZE, SIZE):
        return images.astype(np.uint8)
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(im.astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)) for im in images]
    )


def adherence(images: np.ndarray, prompts: Sequence[str]) -> float:
    """Fraction of images whose digit, digit colour and background colour all match their prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    wanted = [parse_prompt(p) for p in prompts]
    seen = read(np.asarray(images))
    return sum(w == s for w, s in zip(wanted, seen)) / len(wanted)
