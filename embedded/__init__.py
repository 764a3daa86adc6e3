"""The embedded, trained digit model: a tiny diffusers ``WanPipeline`` shipped in ``weights/``.

Prompts ``"digit N"`` (N = 0..9) generate that handwritten digit at 32x32; the empty / negative prompt is the
unconditional branch. Reproduce the weights with ``hasten train-embedded``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
DEFAULT_SIZE = 32  # output images are DEFAULT_SIZE x DEFAULT_SIZE (latent 16x16, 64 transformer tokens)

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_SIZE",
    "DEFAULT_STEPS",
    "WEIGHTS_DIR",
    "digit_prompts",
    "generate_digits",
    "load_embedded",
]


def load_embedded(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """Load the embedded digit model as a ``diffusers.WanPipeline`` from the repo, never touching the network."""
    from diffusers import WanPipeline

    root = Path(path) if path is not None else WEIGHTS_DIR
    if not (root / "model_index.json").exists():
        raise FileNotFoundError(f"no embedded weights at {root}; run `hasten train-embedded` to create them")
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; accept both versions
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = WanPipeline.from_pretrained(root, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def digit_prompts(digits: Sequence[int]) -> list[str]:
    """The prompts for ``digits``: ``"digit N"``."""
    for d in digits:
        if not 0 <= int(d) <= 9:
            raise ValueError(f"digits must be in 0..9, got {d}")
    return [f"digit {int(d)}" for d in digits]


def generate_digits(
    pipe: Any,
    digits: Sequence[int],
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    size: int = DEFAULT_SIZE,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate one image per digit as a (B, 3, size, size) float tensor in [0, 1].

    Image ``i`` uses its own generator seeded ``seed + i``, so it does not depend on the batch around it
    (the same seed gives the same baseline for PSNR/SSIM comparisons).
    """
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(digits))]
    out = pipe(
        prompt=digit_prompts(digits),
        negative_prompt="",
        height=size,
        width=size,
        num_frames=1,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        output_type="pt",
        **kwargs,
    ).frames
    return out[:, 0].float().cpu()
