"""The drawn set: 64x64 coloured digits with their prompts, drawn with Pillow alone, and the
small classifier that reads them back (issue 26).

Each sample is a digit 0-9 in one colour on a background of another, at a varied position and
size, with the prompt that says so ("a red 7 on a blue background"). Everything follows from the
seed: `sample(seed, index)` is the same picture on every machine with the same Pillow.

The reader reads the colours from pixel statistics (no learning) and the digit with a small CNN
(`Reader`) over a colour-free "ink" map, trained on this set by `train_reader` and shipped as safetensors next to this module
(`sdbuild/data/drawn_reader.safetensors`), so scoring a generated image needs no download.
`adherence(images, prompts)` is the fraction of images whose digit and both colours all match
their prompt. It is a regression signal for lossy levers on the drawn models, not a measure of a
real model's quality.
"""

from __future__ import annotations

import functools
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
CANONICAL_SIZE = 50  # the font size of the canonical drawing

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


@functools.lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw(label: Label, rng: random.Random | None) -> np.ndarray:
    """Draw one label as a 64x64 RGB uint8 array; size and position come from rng (None: the
    canonical drawing, size CANONICAL_SIZE and centred, what the drawn pipelines are trained on)."""
    from PIL import Image, ImageDraw

    font_size = CANONICAL_SIZE if rng is None else rng.randint(40, 60)
    font = _font(font_size)
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[COLOUR_NAMES[label.background]])
    pen = ImageDraw.Draw(image)
    text = str(label.digit)
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    if rng is None:
        x, y = (SIZE - w) // 2 - left, (SIZE - h) // 2 - top
    else:
        x = rng.randint(2, max(2, SIZE - 2 - w)) - left
        y = rng.randint(2, max(2, SIZE - 2 - h)) - top
    pen.text((x, y), text, font=font, fill=COLOURS[COLOUR_NAMES[label.colour]])
    return np.asarray(image, dtype=np.uint8)


def canonical(labels: Sequence[Label]) -> np.ndarray:
    """The canonical drawing of each label (centred, one size): n x 64 x 64 x 3 uint8."""
    return np.stack([draw(label, None) for label in labels])


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


# ---------------------------------------------------------------- the reader
#
# Colours are read from pixel statistics, not learned: every pixel within COLOUR_RADIUS of a palette
# colour votes for it; the background is the colour with most votes, the digit's colour the next one.
# Only the digit is learned: a small CNN reads the "ink" map (each pixel's position between the
# background and the digit colour, 0..1, at 32x32), so its input does not depend on the colours.

COLOUR_RADIUS = 80.0  # RGB distance: a blurred edge between two palette colours is farther than this from both
INK_SIZE = 32
_PALETTE = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)


def read_colours(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(background, digit colour) palette indices per image (n x H x W x 3 uint8)."""
    import torch

    px = torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1, 3)).float()
    palette = torch.from_numpy(_PALETTE)
    k = len(COLOUR_NAMES)
    votes = []
    for chunk in px.split(256):
        dist = torch.cdist(chunk, palette.expand(len(chunk), k, 3))  # n x P x 6
        best, nearest = dist.min(-1)
        close = best < COLOUR_RADIUS
        one_hot = torch.nn.functional.one_hot(nearest, k)
        # Close pixels vote; ties (or no close pixel at all) are broken by the nearest colour.
        votes.append((one_hot * close[..., None]).sum(1) * px.shape[1] + one_hot.sum(1))
    v = torch.cat(votes).numpy() if votes else np.zeros((0, k), dtype=np.int64)
    background = v.argmax(1)
    v[np.arange(len(v)), background] = -1
    return background, v.argmax(1)


def ink(images: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Each pixel's place between its image's background (0) and digit colour (1), clipped, at
    INK_SIZE x INK_SIZE (2x2 means): n x 1 x INK_SIZE x INK_SIZE float32."""
    px = images.astype(np.float32)
    bg = _PALETTE[background][:, None, None, :]
    fg = _PALETTE[colour][:, None, None, :]
    axis = fg - bg
    t = ((px - bg) * axis).sum(-1) / (axis * axis).sum(-1)
    t = np.clip(t, 0.0, 1.0)
    n, h, w = t.shape
    f = h // INK_SIZE
    t = t.reshape(n, INK_SIZE, f, INK_SIZE, f).mean((2, 4))
    return t[:, None].astype(np.float32)


def _reader_module():
    import torch
    from torch import nn

    class Reader(nn.Module):
        """The digit reader: a small CNN over the 1 x 32 x 32 ink map, 10 logits."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4
                nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU(), nn.Linear(64, len(DIGITS)),
            )

        def forward(self, x):
            return self.net(x * 2.0 - 1.0)

    return Reader, torch


def _augment(x, gen, torch):
    """What a generated image does to the ink map: blur, noise, weaker contrast, a shift."""
    import torch.nn.functional as F

    n = len(x)
    blur = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
    x = x * (0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen))
    x = x + 0.15 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, (dy, dx), (2, 3)).clamp(0, 1)


def labelled_ink(seed: int, n: int):
    """The ink maps of n samples of `seed` (read with the samples' own colours) and their digits."""
    images, labels = dataset(seed, n)
    x = ink(images, np.array([l.background for l in labels]), np.array([l.colour for l in labels]))
    return x, np.array([l.digit for l in labels])


def train_reader(seed: int = 0, n: int = 20000, epochs: int = 8, out: Path | None = READER_WEIGHTS, log=print,
                 batch: int = 128, lr: float = 1e-3):
    """Train the digit reader on `n` samples from `seed` (seeded, CPU, Adam); save safetensors to `out`."""
    Reader, torch = _reader_module()
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = labelled_ink(seed, n)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model = Reader()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * ((n + batch - 1) // batch))
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total, right = 0.0, 0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            logits = model(_augment(x[idx], gen, torch))
            loss = loss_fn(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            right += int((logits.argmax(1) == y[idx]).sum())
        log(f"reader epoch {epoch}: loss {total / n:.4f}, train accuracy {right / n:.4f}")
    model.eval()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return model


_READER = None


def load_reader():
    """The shipped digit reader (loaded once)."""
    global _READER
    if _READER is None:
        Reader, _ = _reader_module()
        from safetensors.torch import load_file

        model = Reader()
        model.load_state_dict(load_file(str(READER_WEIGHTS)))
        model.eval()
        _READER = model
    return _READER


def read(images: np.ndarray, model=None, batch: int = 512) -> list[Label]:
    """What the reader sees in each image (n x H x W x 3 uint8, or one H x W x 3; resized to 64x64)."""
    import torch

    images = _as_64(images)
    background, colour = read_colours(images)
    x = ink(images, background, colour)
    model = model or load_reader()
    digits: list[int] = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            digits += model(torch.from_numpy(x[start : start + batch])).argmax(1).tolist()
    return [Label(d, int(c), int(b)) for d, c, b in zip(digits, colour, background)]


def _as_64(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.shape[1:3] == (SIZE, SIZE):
        return images.astype(np.uint8)
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(im.astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)) for im in images]
    )


def matches(images, prompts: Sequence[str]) -> list[bool]:
    """Per image: whether its digit, digit colour and background colour all match its prompt."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    wanted = [parse_prompt(p) for p in prompts]
    return [w == s for w, s in zip(wanted, read(images))]


# The fixed prompt list of a drawn model's row (fidelity.prompts unset): 30 of the 300, every digit
# three times, the colour pairs spread over the palette.
ADHERENCE_PROMPTS = tuple(label.prompt for label in all_labels()[7::10])


def adherence_record(wanted: Sequence[Label], seen: Sequence[Label], seconds: float | None = None) -> dict:
    """A row's `adherence`: the share of images whose digit and both colours match their prompt
    (`score`), each part's share, and how many images it was measured on."""
    n = len(wanted)
    share = lambda hits: sum(hits) / n if n else None  # noqa: E731
    record = dict(score=share([w == s for w, s in zip(wanted, seen)]),
                  digit=share([w.digit == s.digit for w, s in zip(wanted, seen)]),
                  colour=share([w.colour == s.colour for w, s in zip(wanted, seen)]),
                  background=share([w.background == s.background for w, s in zip(wanted, seen)]),
                  images=n)
    if seconds is not None:
        record["seconds"] = round(seconds, 3)
    return record


def adherence(images, prompts: Sequence[str]) -> float:
    """Fraction of images whose digit, digit colour and background colour all match their prompt."""
    hits = matches(images, prompts)
    return sum(hits) / len(hits)
