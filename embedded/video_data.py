"""Moving digits for the embedded video model: scikit-learn's 8x8 digits sliding across a black canvas.

A clip is ``NUM_FRAMES`` frames; the digit (about 60% of the canvas wide, +-10% scale) travels
``TRAVEL`` of the canvas in the prompted direction ("digit 3 moving left"). Clips are rendered at the top
resolution and area-downsampled for the half resolution, so both resolutions show the same motion (the
low-resolution prior that bottleneck sampling relies on). Shared by training and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

NUM_FRAMES = 17
FULL_SIZE = 32
HALF_SIZE = 16
DIRECTIONS = ("left", "right", "up", "down")
# unit motion (dx, dy) in image coordinates (y grows downwards)
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
DIGIT_FRACTION = 0.6  # digit box side / canvas side
TRAVEL = 0.3125  # centre displacement first -> last frame, as a fraction of the canvas side (10 px at 32)
JITTER = 0.03  # random offset of the path (fraction of the canvas), both axes
SCALE = 0.1


def video_prompt(digit: int, direction: str) -> str:
    """``"digit N moving DIRECTION"``."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return f"digit {int(digit)} moving {direction}"


def video_prompts(digits: Sequence[int], directions: Sequence[str]) -> list[str]:
    if len(digits) != len(directions):
        raise ValueError(f"{len(digits)} digits but {len(directions)} directions")
    return [video_prompt(d, r) for d, r in zip(digits, directions)]


def load_digit_sprites() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 8, 8) float in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target, dtype=torch.long)


def render_clips(
    sprites: torch.Tensor,
    directions: torch.Tensor,
    generator: torch.Generator,
    size: int = FULL_SIZE,
    frames: int = NUM_FRAMES,
    jitter: bool = True,
) -> torch.Tensor:
    """Render clips (B, frames, size, size) in [0, 1]: sprite ``i`` moving ``DIRECTIONS[directions[i]]``."""
    n = len(sprites)
    big = F.interpolate(sprites, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    vec = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS])[directions]  # (n, 2) as (dx, dy)
    if jitter:
        scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * SCALE
        off = (torch.rand(n, 2, generator=generator) * 2 - 1) * JITTER
        speed = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    else:
        scale, off, speed = torch.ones(n), torch.zeros(n, 2), torch.ones(n)
    t = torch.linspace(-0.5, 0.5, frames)
    # centre in [-1, 1] normalised coordinates (canvas = 2 units): path through (off) along vec
    centre = off[:, None, :] + vec[:, None, :] * (TRAVEL * 2 * speed[:, None, None]) * t[None, :, None]
    half = DIGIT_FRACTION * scale  # digit half-side in normalised units
    theta = torch.zeros(n, frames, 2, 3)
    theta[..., 0, 0] = 1.0 / half[:, None]
    theta[..., 1, 1] = 1.0 / half[:, None]
    theta[..., :, 2] = -centre / half[:, None, None]
    grid = F.affine_grid(theta.view(n * frames, 2, 3), [n * frames, 1, size, size], align_corners=False)
    src = big.repeat_interleave(frames, dim=0)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(n, frames, size, size).clamp(0, 1)


def downsample(clips: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample (B, T, H, W) clips to ``size``."""
    b, t, h, w = clips.shape
    return F.interpolate(clips.reshape(b * t, 1, h, w), size=(size, size), mode="area").view(b, t, size, size)


def to_vae(clips: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W) in [0, 1] -> (B, 3, T, H, W) in [-1, 1], the layout AutoencoderKLWan expects."""
    return (clips * 2 - 1).unsqueeze(1).repeat(1, 3, 1, 1, 1)


def digit_crops(frames: torch.Tensor, out: int = 32) -> torch.Tensor:
    """Crop each (N, C, H, W) frame around its intensity centroid at the training scale and resize to
    ``out`` x ``out``, so the digit sits as in the 32x32 images the classifier knows (24 px in 32 px)."""
    x = frames.float().mean(1, keepdim=True).clamp(0, 1)
    n, _, h, w = x.shape
    c = centroids(x[:, 0])  # (n, 2) in pixels (x, y)
    side = DIGIT_FRACTION * h * 32 / 24  # crop side in pixels
    cx = (c[:, 0] + 0.5) / w * 2 - 1
    cy = (c[:, 1] + 0.5) / h * 2 - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = side / w
    theta[:, 1, 1] = side / h
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, 1, out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def centroids(frames: torch.Tensor) -> torch.Tensor:
    """Intensity centroids (x, y) in pixels of (N, H, W) frames (background below 0.15 ignored)."""
    x = (frames.float() - 0.15).clamp(min=0)
    n, h, w = x.shape
    mass = x.sum((1, 2)).clamp(min=1e-6)
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    cx = (x.sum(1) * xs).sum(1) / mass
    cy = (x.sum(2) * ys).sum(1) / mass
    empty = x.sum((1, 2)) < 1e-3
    cx[empty] = (w - 1) / 2
    cy[empty] = (h - 1) / 2
    return torch.stack([cx, cy], 1)
