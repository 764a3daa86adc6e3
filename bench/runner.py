"""Run variants side by side on one pipeline: interleaved repeats, median wall time, forwards, quality."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..quant import weight_memory
from .variants import Variant

Generate = Callable[[Any, int], torch.Tensor]  # (pipe, seed) -> images (B,3,H,W) in [0,1]


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
    weight_ratio: float | None = None  # denoiser weight bytes vs. the unquantized model in bf16
    psnr: float | None = None
    ssim: float | None = None
    accuracy: float | None = None
    per_class: dict[int, float] | None = None
    frechet: float | None = None
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
        self._handles = [p.register_forward_pre_hook(self._hook) for p in probes]

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.rows += args[0].shape[0]

    def take(self) -> float:
        n, self.rows = self.rows, 0
        return n / len(self.probes)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def run_bench(
    pipe: Any,
    variants: Sequence[Variant],
    generate: Generate,
    seeds: Sequence[int],
    targets: Sequence[int] | None = None,
    repeats: int = 3,
    progress: bool = True,
    on_progress: Callable[[float, str], None] | None = None,
) -> list[BenchRow]:
    """Measure every variant against the first one (the baseline), interleaved A B C A B C ... ``repeats`` times.

    ``generate(pipe, seed)`` produces one batch of images; ``targets`` (the prompted digit of each image in a
    batch) turns on the digit-accuracy and Fréchet metrics of the embedded model.
    """
    if not variants or variants[0].family != "baseline":
        raise ValueError("the first variant must be the baseline")
    rows = [BenchRow(v.name, v.family, v.settings, error=v.unavailable) for v in variants]
    runnable = [i for i, v in enumerate(variants) if v.unavailable is None]
    images: dict[int, torch.Tensor] = {}
    forwards: dict[int, float] = {}
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
                    fwd = counter.take()
                    if rep == 0:
                        images[i] = torch.cat(outs)
                        forwards[i] = fwd / images[i].shape[0]
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
    all_targets = list(targets) * len(seeds) if targets is not None else None
    for i in runnable:
        row = rows[i]
        if row.error or i not in images:
            continue
        row.median_s = statistics.median(row.times)
        row.speedup = base_time / row.median_s if base_time and row.median_s else None
        row.forwards_per_image = forwards[i]
        if i != base_i and base_i in images:
            row.psnr = metrics.psnr(images[i], images[base_i])
            row.ssim = metrics.ssim(images[i], images[base_i])
        if all_targets is not None:
            acc = metrics.digit_accuracy(images[i], all_targets)
            row.accuracy, row.per_class = acc["accuracy"], acc["per_class"]
            # a Fréchet distance needs >= 2 images (a covariance): left empty for one-image benches
            row.frechet = metrics.frechet_distance(images[i]) if len(images[i]) >= 2 else None
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
