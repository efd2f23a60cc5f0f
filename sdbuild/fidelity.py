"""How far an image moved from a reference: PSNR and SSIM. The one place fidelity is computed.

Both work on pixel arrays of the same shape (H x W or H x W x C), uint8 by default (peak 255);
float images in [0, 1] pass `peak=1.0`. PSNR is 10 log10(peak^2 / MSE), `inf` for identical
images. SSIM is Wang et al. (2004) with their recipe (11x11 Gaussian window, sigma 1.5,
K1 = 0.01, K2 = 0.03, population statistics), averaged over the pixels whose window lies inside
the image and over channels: the same figure as scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=peak, channel_axis=-1)`. numpy only: no scikit-image or torch for two numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The fidelity bound: an image at least this close to the baseline's (PSNR, dB) counts as the same
# picture. Lossless levers (fp32 SDPA, channels-last, tracing, export) pass it; lossy ones (bf16: ~45 dB
# on the tiny model, a tiny VAE, fewer steps, quantization) do not. The tuner's default bound, and the
# report's "fastest within the fidelity bound".
FIDELITY_BOUND_DB = 50.0

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # 2 * int(3.5 * sigma + 0.5) + 1, as scikit-image truncates its Gaussian
SSIM_K1, SSIM_K2 = 0.01, 0.03


@dataclass(frozen=True)
class Fidelity:
    """An image against its reference."""

    psnr_db: float  # inf when identical
    ssim: float  # 1.0 when identical
    max_abs_diff: float  # largest per-pixel difference, in the images' own units


def load_image(path: str | Path) -> np.ndarray:
    """A PNG (or any format Pillow reads) as an H x W x 3 uint8 array."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pair(image: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(image), np.asarray(reference)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of different shapes {a.shape} and {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(image: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; `inf` when the images are identical."""
    a, b = _pair(image, reference)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _gaussian_window() -> np.ndarray:
    x = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the first two axes, 'valid' region only (no padding)."""
    rows = np.lib.stride_tricks.sliding_window_view(x, len(g), axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, len(g), axis=1) @ g


def ssim(image: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> float:
    """Mean structural similarity (1.0 when identical, lower as structure departs)."""
    a, b = _pair(image, reference)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.shape[0] < SSIM_WINDOW or a.shape[1] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[:2]}")
    g = _gaussian_window()
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def compare(image: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> Fidelity:
    """PSNR, SSIM and the largest pixel difference of `image` against `reference`."""
    a, b = _pair(image, reference)
    return Fidelity(psnr_db=psnr(a, b, peak), ssim=ssim(a, b, peak), max_abs_diff=float(np.abs(a - b).max()))


def compare_files(path: str | Path, reference: str | Path) -> Fidelity:
    """`compare` on two image files (uint8 pixels)."""
    return compare(load_image(path), load_image(reference))
