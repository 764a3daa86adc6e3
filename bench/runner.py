"""Run variants side by side on one pipeline: interleaved repeats, median wall time, forwards, quality."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..kernels.eager import eager
from ..quant import weight_memory
from .variants import Variant

Generate = Callable[[Any, int], torch.Tensor]  # (pipe, seed) -> images (B,3,H,W) or clips (B,T,3,H,W) in [0,1]
# (all outputs of one variant, concatenated over seeds) -> task metrics: "accuracy", "per_class", "frechet",
# and for videos "motion_accuracy", "clip_accuracy" (any subset)
Score = Callable[[torch.Tensor], dict[str, Any]]


@dataclass
class BenchRow:
    """One variant's measured figures (quality against the baseline of the same seeds)."""

    name: str
    family: str
    settings: dict[str, Any]
    times: list[float] = field(default_factory=list)
    median_s: float | None = None
    speedup: float | None = None
    forwards_per_image: float | None = None
    work: float | None = None  # denoiser tokens processed per image vs. the baseline's (bottleneck's smaller stage)
    weight_ratio: float | None = None  # denoiser weight bytes vs. the unquantized model in bf16
    psnr: float | None = None
    psnr_worst: float | None = None  # the lowest per-image (per-clip) PSNR: one collapsed output a mean hides
    ssim: float | None = None
    accuracy: float | None = None  # per image; per frame on videos
    per_class: dict[int, float] | None = None
    frechet: float | None = None
    motion_accuracy: float | None = None  # videos: the digit moves the prompted way
    clip_accuracy: float | None = None  # videos: majority reading over a clip's frames
    key_blocks_kept: float | None = None  # sparse attention: kept / visited-if-dense key blocks (last batch)
    summary: str | None = None  # what hasten's features did in the last batch of the first repeat
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ForwardCounter:
    """Counts denoiser work as full-forward equivalents: rows through every transformer block / num blocks.

    Each block is counted at its first child holding a linear layer (its attention), which runs only when the
    block really computes and survives quantization (which swaps the linear layers themselves): fair
    to block caches (diffusers' FirstBlockCache replaces skipped blocks' forward, yet the block is still
    *called*) as well as to step caches (nothing runs at all).
    """

    def __init__(self, denoiser: torch.nn.Module) -> None:
        lists = [m for n, m in denoiser.named_children() if isinstance(m, torch.nn.ModuleList) and "block" in n]
        probes = []
        for block in (b for lst in lists for b in lst):  # the first child holding a linear layer (attention)
            probes.append(next((c for c in block.children()
                                if any(isinstance(m, torch.nn.Linear) for m in c.modules())), block))
        if not probes:  # UNets: count rows through the output convolution
            probes = [denoiser.conv_out]
        self.probes = probes
        self.rows = 0
        self.tokens = 0
        # counted eagerly: a Python counter inside a compiled region would recompile on every new value
        self._handles = [p.register_forward_pre_hook(eager(self._hook)) for p in probes]

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        self.rows += x.shape[0]
        # tokens: (B, S, D) sequences, or the spatial positions of (B, C, H, W...) feature maps
        self.tokens += x.shape[0] * x.shape[1] if x.ndim == 3 else x.shape[0] * math.prod(x.shape[2:])

    def take(self) -> float:
        n, self.rows = self.rows, 0
        return n / len(self.probes)

    def take_tokens(self) -> float:
        """Tokens through every block since the last call, per block (full-forward token equivalents)."""
        n, self.tokens = self.tokens, 0
        return n / len(self.probes)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """Clips (B, T, C, H, W) as one image per clip, frames stacked vertically (B, C, T*H, W): PSNR then takes
    the mean squared error over the whole clip; images pass through."""
    if x.ndim != 5:
        return x
    b, t, c, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b, c, t * h, w)


def _as_frames(x: torch.Tensor) -> torch.Tensor:
    """Clips (B, T, C, H, W) as their frames (B*T, C, H, W) (SSIM's window stays inside one frame)."""
    return x.reshape(-1, *x.shape[2:]) if x.ndim == 5 else x


def _feature_figures(pipe: Any) -> tuple[float | None, str | None]:
    """(key blocks kept fraction of sparse attention, hasten.summary) after a run; (None, None) without hasten
    features (peers, baseline)."""
    from ..pipelines.registry import features

    try:
        feats = features(pipe)
    except Exception:  # noqa: BLE001 - not a diffusers pipeline (e.g. the ComfyUI target)
        return None, None
    if not feats:
        return None, None
    from ..pipelines.registry import summary

    kept = total = 0
    for feat in feats.values():
        for st in feat.stats().values():
            kept += getattr(st, "blocks_kept", 0) or 0
            total += getattr(st, "blocks_total", 0) or 0
    return (kept / total if total else None), summary(pipe)


def digit_scorer(targets: Sequence[int]) -> Score:
    """Task metrics of the image bench: prompted-digit accuracy (overall, per class) and the Fréchet distance
    (``targets``: the prompted digit of every image, over all seeds)."""

    def score(images: torch.Tensor) -> dict[str, Any]:
        acc = metrics.digit_accuracy(images, targets)
        # a Fréchet distance needs >= 2 images (a covariance): left empty for one-image benches
        return {"accuracy": acc["accuracy"], "per_class": acc["per_class"],
                "frechet": metrics.frechet_distance(images) if len(images) >= 2 else None}

    return score


def video_scorer(digits: Sequence[int], directions: Sequence[str]) -> Score:
    """Task metrics of the video bench (``hasten.embedded.video.score_videos``): per-frame digit accuracy,
    clip (majority) digit accuracy, motion accuracy and the Fréchet distance of the frame crops."""

    def score(videos: torch.Tensor) -> dict[str, Any]:
        from ..embedded.video import score_videos

        s = score_videos(videos, digits, directions)
        frechet = s["frechet"] if len(videos) * videos.shape[1] >= 2 else None
        return {"accuracy": s["digit_accuracy"], "per_class": s["digit_per_class"], "frechet": frechet,
                "motion_accuracy": s["motion_accuracy"], "clip_accuracy": s["clip_digit_accuracy"]}

    return score


def run_bench(
    pipe: Any,
    variants: Sequence[Variant],
    generate: Generate,
    seeds: Sequence[int],
    targets: Sequence[int] | None = None,
    repeats: int = 3,
    progress: bool = True,
    on_progress: Callable[[float, str], None] | None = None,
    score: Score | None = None,
) -> list[BenchRow]:
    """Measure every variant against the first one (the baseline), interleaved A B C A B C ... ``repeats`` times.

    ``generate(pipe, seed)`` produces one batch of images (B, 3, H, W) or clips (B, T, 3, H, W); PSNR is per
    image (per clip, over all its frames) and SSIM per image (per frame) against the baseline. ``targets`` (the
    prompted digit of each image in a batch) turns on the embedded model's digit accuracy and Fréchet
    distance; ``score`` (e.g. :func:`video_scorer`) replaces them with any task metrics of all outputs.
    """
    if score is None and targets is not None:
        score = digit_scorer(list(targets) * len(seeds))
    if not variants or variants[0].family != "baseline":
        raise ValueError("the first variant must be the baseline")
    rows = [BenchRow(v.name, v.family, v.settings, error=v.unavailable) for v in variants]
    runnable = [i for i, v in enumerate(variants) if v.unavailable is None]
    images: dict[int, torch.Tensor] = {}
    forwards: dict[int, float] = {}
    tokens: dict[int, float] = {}
    counter = ForwardCounter(_denoiser(pipe))
    total = repeats * len(runnable) * len(seeds)
    bar = tqdm(total=total, desc="hasten bench", disable=not progress)
    done = 0
    try:
        for i in runnable:  # one-off calibration (e.g. MagCache ratios), outside the timed loop
            v = variants[i]
            if v.prepare is not None:
                try:
                    v.prepare(pipe, lambda: generate(pipe, seeds[0]))
                except Exception as exc:  # noqa: BLE001 - a peer failing must not sink the bench
                    rows[i].error = f"calibration failed: {exc}"
        for rep in range(repeats):
            for i in runnable:
                v, row = variants[i], rows[i]
                if row.error:
                    done += len(seeds)
                    bar.update(len(seeds))
                    continue
                try:
                    v.apply(pipe)
                    if rep == 0:
                        row.weight_ratio = weight_memory(_denoiser(pipe)).ratio
                    counter.take()
                    counter.take_tokens()
                    outs, elapsed = [], 0.0
                    for seed in seeds:
                        t0 = time.perf_counter()
                        outs.append(generate(pipe, seed))
                        elapsed += time.perf_counter() - t0
                        done += 1
                        bar.update(1)
                        if on_progress is not None:
                            on_progress(done / total, f"{v.name} (repeat {rep + 1}/{repeats})")
                    row.times.append(elapsed)
                    fwd, tok = counter.take(), counter.take_tokens()
                    if rep == 0:
                        images[i] = torch.cat(outs)
                        forwards[i] = fwd / images[i].shape[0]
                        tokens[i] = tok / images[i].shape[0]
                        row.key_blocks_kept, row.summary = _feature_figures(pipe)
                except Exception as exc:  # noqa: BLE001 - report, keep going with the other variants
                    row.error = f"{type(exc).__name__}: {exc}"
                finally:
                    try:
                        v.remove(pipe)
                    except Exception:  # noqa: BLE001
                        pass
    finally:
        bar.close()
        counter.remove()
    base_i = runnable[0]
    base_time = statistics.median(rows[base_i].times) if rows[base_i].times else None
    for i in runnable:
        row = rows[i]
        if row.error or i not in images:
            continue
        bad = metrics.nonfinite(images[i])
        if bad is not None:  # timed, but nothing to measure: report it instead of NaN metrics (or a crash)
            row.error = bad
            continue
        row.median_s = statistics.median(row.times)
        row.speedup = base_time / row.median_s if base_time and row.median_s else None
        row.forwards_per_image = forwards[i]
        row.work = tokens[i] / tokens[base_i] if tokens.get(base_i) else None
        if i != base_i and base_i in images:
            row.psnr, row.psnr_worst = metrics.psnr_mean_worst(_as_images(images[i]), _as_images(images[base_i]))
            row.ssim = metrics.ssim(_as_frames(images[i]), _as_frames(images[base_i]))
        if score is not None:
            for key, value in score(images[i]).items():
                setattr(row, key, value)
    return rows


def collect_images(pipe: Any, variants: Sequence[Variant], generate: Generate, seed: int) -> dict[str, torch.Tensor]:
    """One generation per variant (same seed), for visual comparison; variants are removed afterwards."""
    out = {}
    for v in variants:
        if v.unavailable:
            continue
        v.apply(pipe)
        try:
            out[v.name] = generate(pipe, seed)
        finally:
            v.remove(pipe)
    return out
