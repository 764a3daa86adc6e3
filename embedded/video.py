"""The embedded text-to-video model: a tiny diffusers ``WanPipeline`` shipped in ``weights_video/``.

Prompts ``"digit N moving DIRECTION"`` (N = 0..9, DIRECTION in left/right/up/down) generate a 17-frame clip
of that handwritten digit sliding across a black canvas, at 32x32 (1088 transformer tokens: 17 latent frames
x 8 x 8; the VAE is frame-wise) or at the half size 16x16 (272 tokens) it was also trained at. Reproduce the weights with
``hasten train-embedded --video``; score them with :func:`evaluate_video`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .video_data import DIRECTION_VECTORS, DIRECTIONS, FULL_SIZE, HALF_SIZE, NUM_FRAMES, TRAVEL, video_prompts

if TYPE_CHECKING:
    import torch

VIDEO_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights_video"
VIDEO_DEFAULT_STEPS = 20
VIDEO_DEFAULT_GUIDANCE = 4.0
VIDEO_DEFAULT_SIZE = FULL_SIZE
VIDEO_HALF_SIZE = HALF_SIZE
VIDEO_DEFAULT_FRAMES = NUM_FRAMES

# What a call without arguments uses (diffusers' WanPipeline defaults to 480x832, 81 frames, 50 steps).
VIDEO_CALL_DEFAULTS: dict[str, Any] = {
    "height": VIDEO_DEFAULT_SIZE,
    "width": VIDEO_DEFAULT_SIZE,
    "num_frames": VIDEO_DEFAULT_FRAMES,
    "num_inference_steps": VIDEO_DEFAULT_STEPS,
    "guidance_scale": VIDEO_DEFAULT_GUIDANCE,
    "negative_prompt": "",
}

__all__ = [
    "DIRECTIONS",
    "VIDEO_CALL_DEFAULTS",
    "VIDEO_DEFAULT_FRAMES",
    "VIDEO_DEFAULT_GUIDANCE",
    "VIDEO_DEFAULT_SIZE",
    "VIDEO_DEFAULT_STEPS",
    "VIDEO_HALF_SIZE",
    "VIDEO_WEIGHTS_DIR",
    "evaluate_video",
    "eval_pairs",
    "generate_videos",
    "load_video_embedded",
    "real_clip_crops",
    "score_videos",
    "video_prompts",
]


def load_video_embedded(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        path: str | Path | None = None) -> Any:
    """Load the embedded video model as a ``diffusers.WanPipeline`` from the repo, never touching the network.

    ``pipe(prompt="digit 3 moving left")`` alone works: unset call arguments default to the trained settings
    (32x32, 17 frames, ``VIDEO_DEFAULT_STEPS`` steps, CFG ``VIDEO_DEFAULT_GUIDANCE``, empty negative prompt).
    """
    from . import load_pipeline

    root = Path(path) if path is not None else VIDEO_WEIGHTS_DIR
    return load_pipeline(root, VIDEO_CALL_DEFAULTS, device, dtype, "hasten train-embedded --video")


def eval_pairs(n: int) -> tuple[list[int], list[str]]:
    """``n`` (digit, direction) pairs cycling through the digits; 40 covers every combination once and any
    multiple of 10 gives each digit distinct directions, spread evenly."""
    digits = [i % 10 for i in range(n)]
    dirs = [DIRECTIONS[(i // 10 + i) % 4] for i in range(n)]
    return digits, dirs


def generate_videos(
    pipe: Any,
    digits: Sequence[int],
    directions: Sequence[str],
    seed: int = 0,
    steps: int = VIDEO_DEFAULT_STEPS,
    guidance: float = VIDEO_DEFAULT_GUIDANCE,
    size: int = VIDEO_DEFAULT_SIZE,
    frames: int = VIDEO_DEFAULT_FRAMES,
    **kwargs: Any,
) -> torch.Tensor:
    """One clip per (digit, direction) as a (B, frames, 3, size, size) float tensor in [0, 1].

    Clip ``i`` uses its own generator seeded ``seed + i``, so it does not depend on the batch around it.
    """
    import torch

    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(digits))]
    out = pipe(
        prompt=video_prompts(digits, directions),
        negative_prompt="",
        height=size,
        width=size,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        output_type="pt",
        **kwargs,
    ).frames
    return out.float().cpu()


@functools.lru_cache(maxsize=4)
def real_clip_crops(size: int = VIDEO_DEFAULT_SIZE, clips: int = 200, seed: int = 0) -> torch.Tensor:
    """Frame crops (as :func:`score_videos` takes them) of ``clips`` real rendered clips at ``size``: the
    Fréchet reference, so the distance measures the model, not the crop/scale change."""
    import torch

    from .video_data import digit_crops, downsample, load_digit_sprites, render_clips

    sprites, _ = load_digit_sprites()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(sprites), (clips,), generator=gen)
    dirs = torch.randint(0, len(DIRECTIONS), (clips,), generator=gen)
    c = render_clips(sprites[idx], dirs, gen)
    if size != c.shape[-1]:
        c = downsample(c, size)
    return digit_crops(c.reshape(-1, 1, size, size))


def score_videos(videos: Any, digits: Sequence[int], directions: Sequence[str]) -> dict[str, Any]:
    """Task quality of clips (B, T, C, H, W) in [0, 1] prompted with ``digits`` moving ``directions``.

    - per-frame digit accuracy: each frame is cropped around its intensity centroid at the training scale
      and read by hasten's digit classifier; ``clip_digit_accuracy`` takes the majority over a clip's frames;
    - motion accuracy: the centroid moves the prompted way from the first to the last frame (the larger
      component of the displacement is along the prompted direction, and at least a quarter of the
      trained travel);
    - ``frechet``: Fréchet distance (classifier features) of the frame crops to those of real rendered clips
      of the same size (:func:`real_clip_crops`).
    """
    import torch

    from ..metrics import digit_accuracy, digit_classifier, frechet_distance
    from .video_data import centroids, digit_crops

    v = torch.as_tensor(videos).float()
    if v.ndim != 5:
        raise ValueError(f"videos must be (B, T, C, H, W), got {tuple(v.shape)}")
    b, t, _, h, w = v.shape
    if len(digits) != b or len(directions) != b:
        raise ValueError(f"{b} clips but {len(digits)} digits and {len(directions)} directions")
    crops = digit_crops(v.reshape(b * t, *v.shape[2:]))
    targets = torch.as_tensor(list(digits)).long().repeat_interleave(t)
    acc = digit_accuracy(crops, targets)
    pred = torch.as_tensor(acc["predictions"]).view(b, t)
    clip_pred = torch.mode(pred, dim=1).values
    clip_ok = clip_pred == torch.as_tensor(list(digits))
    grey = v.mean(2)
    first, last = centroids(grey[:, 0]), centroids(grey[:, -1])
    disp = last - first  # (b, 2) pixels (dx, dy)
    vec = torch.tensor([DIRECTION_VECTORS[d] for d in directions])
    along = (disp * vec).sum(1)
    across = (disp * vec.flip(1)).sum(1).abs()
    moved = (along > across) & (along > 0.25 * TRAVEL * min(h, w))
    per_dir = {d: float(moved[[i for i, r in enumerate(directions) if r == d]].float().mean())
               for d in DIRECTIONS if d in directions}
    digit_classifier()  # fitted once, shared by both metrics
    return {
        "digit_accuracy": acc["accuracy"],
        "digit_per_class": acc["per_class"],
        "clip_digit_accuracy": float(clip_ok.float().mean()),
        "clip_predictions": clip_pred.tolist(),
        "motion_accuracy": float(moved.float().mean()),
        "motion_per_direction": per_dir,
        "displacement_px": [[round(float(x), 2) for x in row] for row in disp],
        "frechet": frechet_distance(crops, real_clip_crops(h)) if len(crops) >= 2 else float("nan"),
    }


def evaluate_video(
    pipe: Any,
    clips: int = 40,
    seed: int = 0,
    steps: int = VIDEO_DEFAULT_STEPS,
    guidance: float = VIDEO_DEFAULT_GUIDANCE,
    size: int = VIDEO_DEFAULT_SIZE,
    frames: int = VIDEO_DEFAULT_FRAMES,
    batch: int = 4,
    per_pair: int | None = None,
) -> dict[str, Any]:
    """Generate ``clips`` clips over :func:`eval_pairs` (or ``per_pair`` x all 40 pairs) and score them."""
    import torch

    n = 40 * per_pair if per_pair is not None else clips
    digits, dirs = eval_pairs(n)
    videos = torch.cat([
        generate_videos(pipe, digits[i : i + batch], dirs[i : i + batch], seed=seed + i, steps=steps,
                        guidance=guidance, size=size, frames=frames)
        for i in range(0, n, batch)
    ])
    scores = score_videos(videos, digits, dirs)
    scores.update({"samples": n, "steps": steps, "guidance": guidance, "size": size, "frames": frames})
    return scores
