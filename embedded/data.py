"""The real digits the embedded model learns: scikit-learn's 8x8 ``load_digits``, rendered at 32x32.

Shared by training (``hasten train-embedded``) and the metrics' classifier so both see the same images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
_DIGIT_SIZE = 24  # the 8x8 digit is upsampled to 24x24 and centred on a 32x32 black canvas


def load_real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 32, 32) float in [0, 1] (white strokes on black) and (N,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(_DIGIT_SIZE, _DIGIT_SIZE), mode="bilinear", align_corners=False)
    pad = (IMAGE_SIZE - _DIGIT_SIZE) // 2
    x = F.pad(x, (pad, pad, pad, pad)).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def augment(x: torch.Tensor, generator: torch.Generator, shift: float = 2.0, scale: float = 0.1) -> torch.Tensor:
    """Light augmentation: random scale (1 +- ``scale``) and shift (+- ``shift`` pixels), bilinear resampling."""
    n, _, h, _ = x.shape
    s = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 * shift / h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)
