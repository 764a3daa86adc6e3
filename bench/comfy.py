"""The ComfyUI side of ``hasten bench``: the same embedded weights sampled by the real ComfyUI engine,
baseline vs. ComfyUI's built-in EasyCache vs. hasten's EasyCache node, measured by the same runner."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .variants import Variant


class ComfyTarget:
    """What the bench runner drives: a ComfyUI MODEL (patched per variant) plus the network to count on."""

    def __init__(self, base_dir: Path | None = None) -> None:
        from .comfy_engine import start

        self.env = start(Path(base_dir or tempfile.mkdtemp(prefix="hasten-comfy-")))
        import comfy.utils

        from ..nodes.embedded import load_comfy_model  # needs the engine on sys.path (start above)

        comfy.utils.PROGRESS_BAR_ENABLED = False  # the bench has its own progress bar
        self.base = load_comfy_model()
        self.model = self.base
        self.transformer = self.base.model.diffusion_model  # ForwardCounter counts its blocks

    def generate(self, digits: Sequence[int], seed: int, steps: int, cfg: float, sampler: str = "euler",
                 scheduler: str = "simple") -> torch.Tensor:
        """KSampler on ``self.model`` for one image per digit; returns (B, 3, H, W) images in [0, 1]."""
        from ..nodes.embedded import HastenDecodeDigits, HastenDigitPrompt, HastenEmptyDigitLatent

        def enc(text: str) -> torch.Tensor:
            return HastenDigitPrompt.execute(text).result[0][0][0]

        pos = [[torch.cat([enc(f"digit {d}") for d in digits]), {}]]
        neg = [[torch.cat([enc("")] * len(digits)), {}]]
        lat = HastenEmptyDigitLatent.execute(32, len(digits)).result[0]
        (out,) = self.env.nodes.KSampler().sample(self.model, seed, steps, cfg, sampler, scheduler, pos, neg, lat,
                                                  denoise=1.0)
        return HastenDecodeDigits.execute(out).result[0].permute(0, 3, 1, 2).contiguous()


def _node_variant(name: str, settings: dict[str, Any], make) -> Variant:
    def apply(target: ComfyTarget) -> None:
        target.model = make(target)

    def remove(target: ComfyTarget) -> None:
        target.model = target.base

    return Variant(name, name.split("@")[0], apply, remove, settings)


def comfy_baseline() -> Variant:
    return Variant("baseline", "baseline")


def comfy_builtin_easycache(threshold: float) -> Variant:
    """ComfyUI's own EasyCache node (comfy_extras/nodes_easycache.py) at its default start/end percent."""

    def make(t: ComfyTarget) -> Any:
        res = t.env.nodes.NODE_CLASS_MAPPINGS["EasyCache"].execute(t.base.clone(), threshold, 0.15, 0.95, False)
        return res.result[0] if hasattr(res, "result") else res[0]

    return _node_variant(f"comfyui-builtin-easycache@{threshold:g}", {"reuse_threshold": threshold}, make)


def comfy_hasten_easycache(threshold: float) -> Variant:
    """hasten's "EasyCache (hasten)" node, as loaded by ComfyUI from the node pack."""

    def make(t: ComfyTarget) -> Any:
        node = t.env.nodes.NODE_CLASS_MAPPINGS["HastenEasyCache"]
        from ..caches import EasyCacheConfig

        d = EasyCacheConfig()
        return node.execute(t.base, threshold, d.warmup, d.end, d.max_consecutive_reuse).result[0]

    return _node_variant(f"comfyui-hasten-easycache@{threshold:g}", {"reuse_threshold": threshold}, make)


def comfy_preset(thresholds: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)) -> list[Variant]:
    return [comfy_baseline(), *[comfy_hasten_easycache(t) for t in thresholds],
            *[comfy_builtin_easycache(t) for t in thresholds]]
