"""The configurations ``hasten bench`` compares: hasten's accelerators and the peers', as named variants.

A variant knows how to switch itself on and off on a diffusers pipeline. Peers are only listed when their
package is importable; otherwise the variant is reported as unavailable with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Pipe = Any


@dataclass
class Variant:
    """One configuration in a bench run."""

    name: str
    family: str  # "baseline" | "hasten" | "diffusers" | "cache-dit" | ...
    apply: Callable[[Pipe], None] = lambda pipe: None
    remove: Callable[[Pipe], None] = lambda pipe: None
    settings: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None  # reason when the variant cannot run here
    prepare: Callable[[Pipe, Callable[[], Any]], None] | None = None  # one-off calibration before timing


def baseline() -> Variant:
    return Variant("baseline", "baseline")


def hasten_easycache(threshold: float, **kw: Any) -> Variant:
    def apply(pipe: Pipe) -> None:
        pipe.enable_easycache(threshold=threshold, **kw)

    return Variant(f"hasten-easycache@{threshold:g}", "hasten", apply, lambda p: p.disable_easycache(),
                   {"threshold": threshold, **kw})


def hasten_feature(name: str, feature: str, **settings: Any) -> Variant:
    """Any hasten accelerator with ``pipe.enable_<feature>(**settings)`` / ``pipe.disable_<feature>()``."""

    def apply(pipe: Pipe) -> None:
        getattr(pipe, f"enable_{feature}")(**settings)

    def remove(pipe: Pipe) -> None:
        getattr(pipe, f"disable_{feature}")()

    return Variant(name, "hasten", apply, remove, dict(settings))


def combo(name: str, *parts: Variant) -> Variant:
    """Several variants on at once (composition): applied in order, removed in reverse order. Every part is
    removed even if one removal fails; a failed apply removes what was already applied."""
    applied: list[Variant] = []

    def apply(pipe: Pipe) -> None:
        applied.clear()
        try:
            for v in parts:
                v.apply(pipe)
                applied.append(v)
        except Exception:
            remove(pipe)
            raise

    def remove(pipe: Pipe) -> None:
        errors = []
        for v in reversed(applied or list(parts)):
            try:
                v.remove(pipe)
            except Exception as exc:  # noqa: BLE001 - keep removing the others, re-raise the first
                errors.append(exc)
        applied.clear()
        if errors:
            raise errors[0]

    def prepare(pipe: Pipe, generate: Callable[[], Any]) -> None:
        for v in parts:
            if v.prepare is not None:
                v.prepare(pipe, generate)

    unavailable = "; ".join(v.unavailable for v in parts if v.unavailable) or None
    family = "hasten" if parts else "baseline"
    return Variant(name, family, apply, remove, {v.name: v.settings for v in parts}, unavailable,
                   prepare if any(v.prepare for v in parts) else None)


def quantized(method: str, **settings: Any) -> Variant:
    """hasten quantization of the denoiser (``int8``, ``int4`` or ``w8a8``), calibrated once on one real
    generation of the bench's own prompts (outside the timed loop); the weights are restored on removal."""
    from .. import quant

    make = {"int8": quant.Int8WeightOnlyConfig, "int4": quant.Int4WeightOnlyConfig, "w8a8": quant.W8A8Config}[method]
    calib: dict[str, Any] = {}
    label = method + ("".join(f"-g{v}" for k, v in settings.items() if k == "group_size"))

    def prepare(pipe: Pipe, generate: Callable[[], Any]) -> None:
        if calib:
            return
        from ..pipelines.denoiser import find_denoisers
        from ..quant.calibration import record_activations

        with contextlib.ExitStack() as stack, torch.no_grad():
            getters = {comp: stack.enter_context(record_activations(mod, max_samples=256))
                       for comp, mod in find_denoisers(pipe).items()}
            generate()
        calib.update({comp: get() for comp, get in getters.items()})

    def apply(pipe: Pipe) -> None:
        pipe.quantize(make(**settings), calibration=dict(calib) or None)

    return Variant(f"hasten-quant-{label}", "hasten", apply, lambda p: p.dequantize(), {"method": method, **settings},
                   prepare=prepare)


def adaptive_guidance(threshold: float) -> Variant:
    return hasten_feature(f"hasten-ag@{threshold:g}", "adaptive_guidance", mode="ag", threshold=threshold)


def cfg_truncation(fraction: float) -> Variant:
    return hasten_feature(f"hasten-cfg-truncate@{fraction:g}", "adaptive_guidance", mode="truncate", truncate=fraction)


def bottleneck(scale: float = 0.5, boundaries: tuple[float, float] = (0.2, 0.7)) -> Variant:
    return hasten_feature(f"hasten-bottleneck@{scale:g}", "bottleneck_sampling", scales=(1.0, scale, 1.0),
                          boundaries=boundaries)


def sparse_attention(mass: float) -> Variant:
    return hasten_feature(f"hasten-sparse@{mass:g}", "sparse_attention", target_mass=mass)


def _transformer_cache(name: str, make_config: Callable[[], Any], settings: dict) -> Variant:
    def apply(pipe: Pipe) -> None:
        pipe.transformer.enable_cache(make_config())

    def remove(pipe: Pipe) -> None:
        pipe.transformer.disable_cache()

    return Variant(name, "diffusers", apply, remove, settings)


def diffusers_fbc(threshold: float) -> Variant:
    from diffusers import FirstBlockCacheConfig

    return _transformer_cache(f"diffusers-fbc@{threshold:g}", lambda: FirstBlockCacheConfig(threshold=threshold),
                              {"threshold": threshold})


def diffusers_taylorseer(interval: int, warmup: int = 3) -> Variant:
    import torch
    from diffusers import TaylorSeerCacheConfig

    return _transformer_cache(
        f"diffusers-taylorseer@{interval}",
        # diffusers' default patterns ("^blocks.*attn", full-match) match no module of Wan (attn1/attn2), so
        # TaylorSeer silently does nothing there: name Wan's blocks explicitly for a fair comparison.
        lambda: TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup,
                                      taylor_factors_dtype=torch.float32, cache_identifiers=[r"^blocks\.\d+$"]),
        {"cache_interval": interval, "disable_cache_before_step": warmup},
    )


def diffusers_magcache(threshold: float, steps: int) -> Variant:
    """MagCache needs per-model magnitude ratios: calibrated once on the bench's own first generation."""
    from diffusers import MagCacheConfig

    ratios: list[float] = []

    def prepare(pipe: Pipe, generate: Callable[[], Any]) -> None:
        if ratios:
            return
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                generate()
        finally:
            pipe.transformer.disable_cache()
        found = re.findall(r"\[([-0-9.,\se]+)\]", buf.getvalue())
        if not found:
            raise RuntimeError("MagCache calibration printed no ratios")
        ratios.extend(float(v) for v in found[-1].split(",") if v.strip())

    def apply(pipe: Pipe) -> None:
        pipe.transformer.enable_cache(MagCacheConfig(threshold=threshold, num_inference_steps=steps,
                                                     mag_ratios=list(ratios)))

    return Variant(f"diffusers-magcache@{threshold:g}", "diffusers", apply, lambda p: p.transformer.disable_cache(),
                   {"threshold": threshold}, prepare=prepare)


def cache_dit_dbcache(rdt: float) -> Variant:
    """cache-dit's DBCache (optional peer: ``pip install cache-dit``)."""
    name = f"cache-dit-dbcache@{rdt:g}"
    if importlib.util.find_spec("cache_dit") is None:
        return Variant(name, "cache-dit", unavailable="cache-dit is not installed (pip install 'hasten[peers]')")

    def apply(pipe: Pipe) -> None:
        import cache_dit

        # DBCache's default Fn=8 front blocks exceed small models' depth: 1 front block, 0 back (its F1B0 setting)
        cfg = cache_dit.DBCacheConfig(residual_diff_threshold=rdt, Fn_compute_blocks=1, Bn_compute_blocks=0)
        cache_dit.enable_cache(pipe, cache_config=cfg)

    def remove(pipe: Pipe) -> None:
        import cache_dit

        cache_dit.disable_cache(pipe)

    return Variant(name, "cache-dit", apply, remove, {"residual_diff_threshold": rdt, "Fn": 1, "Bn": 0})


EASYCACHE_SWEEP = (0.05, 0.1, 0.2, 0.3, 0.5)


def preset(name: str, steps: int) -> list[Variant]:
    """Named variant lists: ``easycache`` (hasten's threshold sweep), ``peers`` (sweep + every peer),
    ``families`` (each hasten family and their compositions), ``quick``."""
    if name == "quick":
        return [baseline(), hasten_easycache(0.2), diffusers_fbc(0.1)]
    sweep = [hasten_easycache(t) for t in EASYCACHE_SWEEP]
    if name == "easycache":
        return [baseline(), *sweep]
    if name == "families":
        return [
            baseline(), hasten_easycache(0.2),
            adaptive_guidance(0.991), adaptive_guidance(0.993), adaptive_guidance(0.996), cfg_truncation(0.5),
            bottleneck(0.5),
            sparse_attention(0.95),
            quantized("int8"), quantized("int4", group_size=64), quantized("w8a8"),
            combo("hasten-easycache+ag", hasten_easycache(0.2), adaptive_guidance(0.993)),
            combo("hasten-cachequant-int8", quantized("int8"), hasten_easycache(0.2)),
            combo("hasten-easycache+ag+bottleneck", hasten_easycache(0.2), adaptive_guidance(0.993), bottleneck(0.5)),
        ]
    if name in ("peers", "default"):
        return [
            baseline(),
            *sweep,
            diffusers_fbc(0.05), diffusers_fbc(0.1), diffusers_fbc(0.2),
            diffusers_taylorseer(2), diffusers_taylorseer(3),
            diffusers_magcache(0.06, steps), diffusers_magcache(0.12, steps), diffusers_magcache(0.24, steps),
            cache_dit_dbcache(0.08), cache_dit_dbcache(0.16), cache_dit_dbcache(0.3),
        ]
    from .cli import PRESETS

    raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
