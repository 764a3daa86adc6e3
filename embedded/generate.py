"""``hasten generate``: a grid of digits from the embedded model, optionally with EasyCache, with its
wall time, digit accuracy and the accelerator summary."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..cli import nonneg_float, nonneg_int, positive_int, writable_file
from . import DEFAULT_GUIDANCE, DEFAULT_STEPS


def _digits(text: str) -> list[int]:
    try:
        digits = [int(c) for c in text.replace(",", " ").split()] if " " in text or "," in text else [int(c) for c in text]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--digits takes digits 0-9 such as 0123456789 or '1,2,3', got {text!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise argparse.ArgumentTypeError(f"--digits takes digits 0-9, got {text!r}")
    return digits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--digits", type=_digits, default=list(range(10)),
                        help="digits to draw, e.g. 0123456789 or 1,2,3 (one image each)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed of the first image (image i uses seed + i)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="denoising steps")
    parser.add_argument("--guidance", type=nonneg_float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale (1 = no guidance)")
    parser.add_argument("--easycache", type=nonneg_float, default=None, metavar="THRESHOLD",
                        help="enable hasten's EasyCache with this threshold (e.g. 0.2; 0 = on but never reusing)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (the model is tiny: 1 is fastest)")
    parser.add_argument("--out", type=Path, default=Path("digits.png"),
                        help="output PNG: the images side by side, 10 per row (checked before generating)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def save_grid(images: Any, path: Path, nrow: int = 10) -> None:
    """Tile (B, C, H, W) images in [0, 1] into one PNG, ``nrow`` per row."""
    import torch
    from PIL import Image

    b, c, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    grid = torch.zeros(c, rows * h, min(b, nrow) * w)
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = im
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr if c == 3 else arr[..., 0]).save(path)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .. import summary
    from ..metrics import digit_accuracy
    from . import generate_digits, load_embedded

    out = writable_file(args.out)
    torch.set_num_threads(args.threads)
    pipe = load_embedded(device=args.device)
    if args.easycache is not None:
        pipe.enable_easycache(threshold=args.easycache)
    bar = tqdm(total=args.steps, desc=f"{len(args.digits)} digits", unit="step", disable=args.no_progress)

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict) -> dict:
        bar.update(1)
        return kwargs

    t0 = time.perf_counter()
    images = generate_digits(pipe, args.digits, seed=args.seed, steps=args.steps, guidance=args.guidance,
                             callback_on_step_end=on_step)
    wall = time.perf_counter() - t0
    bar.close()
    save_grid(images, out)
    acc = digit_accuracy(images, args.digits)
    print(f"wrote {out.resolve()} ({len(args.digits)} digits of {images.shape[-1]}x{images.shape[-2]} px, "
          f"{args.steps} steps, guidance {args.guidance:g})")
    print(f"wall time {wall:.2f}s ({wall / len(args.digits):.3f}s per image)")
    print(f"digit accuracy {acc['accuracy']:.0%} (read as {''.join(map(str, acc['predictions']))})")
    print(summary(pipe))
    return 0
