"""The embedded, trained digit model: a tiny diffusers ``WanPipeline`` shipped in ``weights/``.

Prompts ``"digit N"`` (N = 0..9) generate that handwritten digit at 32x32; the empty / negative prompt is the
unconditional branch. Reproduce the weights with ``hasten train-embedded``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


# What a call without arguments uses: the size, frame count, steps and guidance the model was trained for
# (diffusers' WanPipeline defaults to 480x832, 81 frames, 50 steps, which this model cannot run).
CALL_DEFAULTS: dict[str, Any] = {
    "height": DEFAULT_SIZE,
    "width": DEFAULT_SIZE,
    "num_frames": 1,
    "num_inference_steps": DEFAULT_STEPS,
    "guidance_scale": DEFAULT_GUIDANCE,
    "negative_prompt": "",
}


@functools.cache
def embedded_pipeline_class() -> type:
    """``WanPipeline`` whose call defaults are the embedded model's trained settings (built on first use,
    so importing this module does not import diffusers)."""
    from diffusers import WanPipeline

    class EmbeddedWanPipeline(WanPipeline):
        """The embedded digit model: a ``WanPipeline`` whose unset call arguments default to its training."""

        call_defaults = CALL_DEFAULTS

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            for key, value in self.call_defaults.items():
                if kwargs.get(key) is None:
                    kwargs[key] = value
            if self.vae_scale_factor_temporal == 1 and kwargs.get("num_frames"):
                # A frame-wise VAE (the video model): WanPipeline turns any num_frames N into N + 1 (it wants
                # N % factor == 1, impossible for factor 1), so ask for N - 1 to get the N frames requested.
                kwargs["num_frames"] = int(kwargs["num_frames"]) - 1
                wan_log = logging.getLogger("diffusers.pipelines.wan.pipeline_wan")
                level = wan_log.level
                wan_log.setLevel(logging.ERROR)
                try:
                    return super().__call__(*args, **kwargs)
                finally:
                    wan_log.setLevel(level)
            return super().__call__(*args, **kwargs)

    # Named as the diffusers class it is: tools that dispatch on the class name (peers such as cache-dit)
    # treat it as the Wan pipeline, and save_pretrained writes a model_index.json any diffusers loads.
    EmbeddedWanPipeline.__name__ = EmbeddedWanPipeline.__qualname__ = "WanPipeline"
    return EmbeddedWanPipeline


MODELS = ("image", "video")


def load_embedded(model: str = "image", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  path: str | Path | None = None) -> Any:
    """Load an embedded model as a ``diffusers.WanPipeline`` from the repo, never touching the network.

    ``model="image"`` (default): the digit model; ``pipe(prompt="digit 3")`` alone works, unset call
    arguments defaulting to the trained settings (32x32, 1 frame, 20 steps, CFG 4, empty negative prompt).
    ``model="video"``: the moving-digit video model (``hasten.embedded.video``).
    """
    if model not in MODELS:
        raise ValueError(f"load_embedded: model must be one of {MODELS}, got {model!r} "
                         "(pass device=... by keyword)")
    if model == "video":
        from .video import load_video_embedded

        return load_video_embedded(device=device, dtype=dtype, path=path)
    return load_pipeline(Path(path) if path is not None else WEIGHTS_DIR, CALL_DEFAULTS, device, dtype,
                         "hasten train-embedded")


def load_pipeline(root: Path, call_defaults: dict[str, Any], device: Any, dtype: Any, train_command: str) -> Any:
    """``embedded_pipeline_class()`` from the diffusers folder ``root`` (offline) with ``call_defaults``."""
    import torch

    if not (root / "model_index.json").exists():
        raise FileNotFoundError(f"no embedded weights at {root}; run `{train_command} --out {root}` to create them")
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; accept both versions
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = embedded_pipeline_class().from_pretrained(root, torch_dtype=torch.float32 if dtype is None else dtype,
                                                         local_files_only=True)
    pipe.call_defaults = dict(call_defaults)
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
    import torch

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
