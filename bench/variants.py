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


def fewer_steps(steps: int) -> Variant:
    """Plain fewer steps on the scheduler's own spacing (no accelerator): the reference any speed-up must beat,
    since lowering the step count is what a user tries first (``timestep_schedule`` at shift 1)."""

    def apply(pipe: Pipe) -> None:
        from ..tune import enable_timestep_schedule

        enable_timestep_schedule(pipe, steps=steps, shift=1.0)

    def remove(pipe: Pipe) -> None:
        from ..tune import disable_timestep_schedule

        disable_timestep_schedule(pipe)

    return Variant(f"fewer-steps@{steps}", "reference", apply, remove, {"steps": steps})


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


EASYCACHE_SWEEP = (0.05, 0.1, 0.15, 0.2, 0.3)  # forecast "linear" (the default) saturates at 0.3


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
            sada(1),
            sada_tokens(1, 0.25),
            delta_dit(2), profiling_dit(0.3, 2),
            quantized("int8"), quantized("int4", group_size=64), quantized("w8a8"),
            combo("hasten-easycache+ag", hasten_easycache(0.2), adaptive_guidance(0.993)),
            combo("hasten-int8+easycache-stacked", quantized("int8"), hasten_easycache(0.2)),
            cachequant("int8", max(1, round(steps * 0.4)), steps),  # ~EasyCache@0.2's forwards
            combo("hasten-easycache+ag+bottleneck", hasten_easycache(0.2), adaptive_guidance(0.993), bottleneck(0.5)),
        ]
    if name in ("peers", "default"):
        return [
            baseline(),
            *sweep,
            *[easycache_forecast(t) for t in (0.1, 0.2)], easycache_forecast(0.1, "none", 0.2), sada(1), sada(2),
            sada_tokens(1, 0.25), sada_tokens(1, 0.5), sada_tokens(2, 0.25),
            delta_dit(2, 1), delta_dit(2), delta_dit(3), profiling_dit(0.3, 1), profiling_dit(0.3, 2), profiling_dit(0.5, 3),
            delta_dit(2, forecast="none"), profiling_dit(0.3, 1, forecast="none"),
            diffusers_fbc(0.05), diffusers_fbc(0.1), diffusers_fbc(0.2),
            diffusers_taylorseer(2), diffusers_taylorseer(3),
            diffusers_magcache(0.06, steps), diffusers_magcache(0.12, steps), diffusers_magcache(0.24, steps),
            cache_dit_dbcache(0.08), cache_dit_dbcache(0.16), cache_dit_dbcache(0.3),
        ]
    if name == "video":
        return video_preset(steps)
    from .cli import PRESETS

    raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")



def cachequant(method: str, num_computed_steps: int, steps: int, correction: bool = True) -> Variant:
    """CacheQuant (quantization + the DP cache schedule chosen for it, with decoupled error correction),
    calibrated once on the 10 digit prompts at seed 7 (not a bench seed), outside the timed loop."""
    cal: list[Any] = []

    def prepare(pipe: Pipe, generate: Callable[[], Any]) -> None:
        if not cal:
            from ..embedded import digit_prompts
            from ..pipelines.cachequant import calibrate_cachequant

            cal.append(calibrate_cachequant(pipe, method=method, calibration_prompts=tuple(digit_prompts(range(10))),
                                            calibration_seeds=(7,), num_inference_steps=steps))

    def apply(pipe: Pipe) -> None:
        prepare(pipe, lambda: None)
        pipe.enable_cachequant(method=method, num_computed_steps=num_computed_steps, correction=correction,
                               calibration=cal[0])

    name = f"hasten-cachequant-{method}@{num_computed_steps}" + ("" if correction else "-nocorr")
    return Variant(name, "hasten", apply, lambda p: p.disable_cachequant(),
                   {"method": method, "num_computed_steps": num_computed_steps, "correction": correction},
                   prepare=prepare)


# ------------------------------------------------------------------- the embedded video model (issue 12)
def easycache_grid(threshold: float, warmup: float = 0.2, max_consecutive_reuse: int = 4,
                   forecast: str = "linear") -> Variant:
    """EasyCache with its warm-up, reuse cap and (when not the default "linear") forecast in the name
    (``hasten-easycache@0.3-w0.1-r6``, ``...-none``): at 20 steps the defaults (warm-up 0.2, at most 4 reuses
    in a row) cap the forward saving at 2.5x."""
    label = f"{threshold:g}" + ("" if (warmup, max_consecutive_reuse) == (0.2, 4)
                                 else f"-w{warmup:g}-r{max_consecutive_reuse}")
    label += "" if forecast == "linear" else f"-{forecast}"
    v = hasten_easycache(threshold, warmup=warmup, max_consecutive_reuse=max_consecutive_reuse, forecast=forecast)
    v.name = f"hasten-easycache@{label}"
    return v


def bottleneck_grid(boundaries: tuple[float, float], scale: float = 0.5) -> Variant:
    """Bottleneck sampling full -> ``scale`` -> full with the low stage between ``boundaries`` (named by them)."""
    v = bottleneck(scale, boundaries)
    v.name = f"hasten-bottleneck@{scale:g}-{boundaries[0]:g}-{boundaries[1]:g}"
    return v


def sparse_grid(mass: float, block_size: int = 64, warmup_steps: int = 5) -> Variant:
    """Sparse attention with its key-block size in the name (``hasten-sparse@0.9-b16``)."""
    return hasten_feature(f"hasten-sparse@{mass:g}-b{block_size}", "sparse_attention", target_mass=mass,
                          block_size=block_size, warmup_steps=warmup_steps)


def video_preset(steps: int, kind: str = "video") -> list[Variant]:
    """Variant lists for the embedded video model (``hasten bench --model video --preset KIND``).

    ``video`` (the default): one or two settings per hasten family aimed at the issue-12 targets, the
    compositions up to the whole stack, and the peers, sized to finish in about 20 min on 2 CPU cores. The target
    rows: ``hasten-easycache@0.2-w0.1-r6`` (>= 2.5x at >= 30 dB) and ``hasten-easycache+ag+bottleneck`` (>= 4x
    within 5 points of the baseline's digit and motion accuracy);
    ``families``: the wider grid of every hasten family and composition; ``peers``: the EasyCache settings and
    every peer's sweep; ``easycache``: EasyCache only; ``quick``: a smoke run.
    """
    warm = max(1, round(steps / 4))  # sparse attention's dense warm-up: 5 of 20 steps (its default)
    w8a8 = quantized("w8a8")  # one calibration, shared by the row and the stack

    def stack() -> Variant:
        return combo("hasten-stack", easycache_grid(0.3, 0.1, 6), adaptive_guidance(0.998),
                     bottleneck_grid((0.1, 0.8)), sparse_grid(0.9, 16, warm), w8a8)

    def cpu_stack(guidance: Variant, name: str = "hasten-easycache+ag+bottleneck") -> Variant:
        """The whole stack of what is fast on a CPU (issue 12's >= 4x target): EasyCache + guidance + bottleneck."""
        return combo(name, easycache_grid(0.3, 0.1, 6), guidance, bottleneck_grid((0.1, 0.8)))

    # EasyCache's target setting (>= 2.5x at >= 30 dB): 0.2 with warm-up 0.1 and up to 6 reuses in a row
    easycache = [easycache_grid(0.2), easycache_grid(0.2, 0.1, 6), easycache_grid(0.3, 0.1, 6),
                 easycache_grid(0.5, 0.1, 8)]
    if kind == "quick":
        return [baseline(), easycache_grid(0.2, 0.1, 6), diffusers_fbc(0.1)]
    if kind == "easycache":  # the grid tried for the target (README, issue 12)
        return [baseline(), easycache_grid(0.1), easycache_grid(0.3), *easycache, easycache_grid(0.5, 0.05, 12),
                easycache_grid(0.15, 0.1, 6), easycache_grid(0.25, 0.1, 6), easycache_grid(0.2, 0.1, 8),
                easycache_grid(0.2, 0.15, 8), easycache_grid(0.3, 0.15, 6), easycache_grid(0.3, 0.1, 4),
                easycache_grid(0.25, 0.1, 6, "none"), easycache_grid(0.3, 0.1, 6, "none")]
    others = [easycache_forecast(0.3), sada(1), delta_dit(2), profiling_dit(0.3, 2)]  # this session's families
    if kind == "peers":
        return [baseline(), easycache_grid(0.1, 0.1, 6), easycache_grid(0.15, 0.1, 6), *easycache, *others,
                profiling_dit(0.3, 1),
                diffusers_fbc(0.05), diffusers_fbc(0.1), diffusers_fbc(0.2),
                diffusers_taylorseer(2), diffusers_taylorseer(3),
                diffusers_magcache(0.06, steps), diffusers_magcache(0.12, steps), diffusers_magcache(0.24, steps),
                cache_dit_dbcache(0.08), cache_dit_dbcache(0.16), cache_dit_dbcache(0.3)]
    if kind == "families":
        return [
            baseline(), easycache_grid(0.1), *easycache,
            adaptive_guidance(0.993), adaptive_guidance(0.996), adaptive_guidance(0.998), cfg_truncation(0.5),
            bottleneck_grid((0.2, 0.7)), bottleneck_grid((0.1, 0.8)), bottleneck_grid((0.1, 0.9)),
            bottleneck_grid((0.1, 0.8), 0.75),
            sparse_grid(0.9, 16, warm), sparse_grid(0.8, 16, warm), sparse_grid(0.7, 16, warm),
            sparse_grid(0.8, 32, warm), sparse_grid(0.8, 64, warm),
            sparse_pooled(0.6, 16, warm, dense_final_steps=3, refresh_every=3),
            quantized("int8"), quantized("int4", group_size=64), w8a8, *others,
            combo("hasten-easycache+ag", easycache_grid(0.3, 0.1, 6), adaptive_guidance(0.998)),
            cpu_stack(adaptive_guidance(0.998)), cpu_stack(adaptive_guidance(0.996), "hasten-easycache+ag0.996+bottleneck"),
            cpu_stack(cfg_truncation(0.5), "hasten-easycache+cfg-truncate+bottleneck"),
            stack(),
        ]
    if kind == "video":
        return [
            baseline(), easycache_grid(0.2, 0.1, 6), easycache_grid(0.3, 0.1, 6),
            adaptive_guidance(0.998), bottleneck_grid((0.1, 0.8)),
            sparse_pooled(0.6, 16, warm, dense_final_steps=3, refresh_every=3), w8a8,
            cpu_stack(adaptive_guidance(0.998)),  # the whole-stack target row (CFG truncation 0.5 loses 10 points)
            stack(),
            diffusers_fbc(0.1), diffusers_taylorseer(2), diffusers_magcache(0.12, steps), cache_dit_dbcache(0.16),
            sada(2), sada_tokens(1, 0.25),
        ]
    raise ValueError(f"unknown video preset {kind!r}; choose one of: video, families, peers, easycache, quick")


# ------------------------------------------------------------------- forecasting EasyCache and SADA (issue 13)
def easycache_forecast(threshold: float, forecast: str = "linear", warmup: float = 0.1) -> Variant:
    """EasyCache with its forecast order and warm-up in the name (``hasten-easycache-linear@0.1-w0.1``)."""
    v = hasten_easycache(threshold, forecast=forecast, warmup=warmup)
    v.name = f"hasten-easycache-{forecast}@{threshold:g}-w{warmup:g}"
    return v


def sada(max_interval: int = 1, threshold: float = 0.0, order: int = 1) -> Variant:
    """SADA step skipping (stability criterion from the trajectory's second-order difference)."""
    label = f"{max_interval}" + ("" if (threshold, order) == (0.0, 1) else f"-t{threshold:g}-o{order}")
    return hasten_feature(f"hasten-sada@{label}", "sada", max_interval=max_interval, threshold=threshold, order=order)


# ------------------------------------------------------------------- block caches: Δ-DiT, ProfilingDiT (issue 13)
def delta_dit(interval: int = 2, num_cached_blocks: int | None = None, forecast: str = "linear") -> Variant:
    """Δ-DiT (rear blocks early, front blocks late, span recomputed every ``interval`` steps), named
    ``hasten-delta-dit@2`` (``-n1``: a span of one block instead of half the model's blocks; ``-none``: the
    paper's constant residual instead of the default linear forecast)."""
    label = f"{interval}" + ("" if num_cached_blocks is None else f"-n{num_cached_blocks}")
    label += "" if forecast == "linear" else f"-{forecast}"
    return hasten_feature(f"hasten-delta-dit@{label}", "delta_dit", interval=interval,
                          num_cached_blocks=num_cached_blocks, forecast=forecast)


def profiling_dit(threshold: float, max_reuse: int = 2, forecast: str = "linear") -> Variant:
    """ProfilingDiT (blocks whose profiled residual change is below ``threshold`` reused up to ``max_reuse``
    steps in a row), named ``hasten-profiling-dit@0.3-r2`` (``-none``: constant residual, no forecast)."""
    label = f"{threshold:g}-r{max_reuse}" + ("" if forecast == "linear" else f"-{forecast}")
    return hasten_feature(f"hasten-profiling-dit@{label}", "profiling_dit", threshold=threshold,
                          max_reuse=max_reuse, forecast=forecast)


# ------------------------------------------------------------------- sparse attention on spread attention (issue 12)
def sparse_pooled(mass: float, block_size: int = 16, warmup_steps: int = 5, dense_final_steps: int = 0,
                  refresh_every: int = 10) -> Variant:
    """Sparse attention whose skipped key blocks still count through one pooled token each (``remainder=
    "pooled"``), named ``hasten-sparse-pooled@0.67-b16`` (``-f4``: the last 4 steps dense; ``-r4``: re-searched
    every 4 steps)."""
    label = f"{mass:g}-b{block_size}" + (f"-f{dense_final_steps}" if dense_final_steps else "")
    label += "" if refresh_every == 10 else f"-r{refresh_every}"
    return hasten_feature(f"hasten-sparse-pooled@{label}", "sparse_attention", target_mass=mass,
                          block_size=block_size, warmup_steps=warmup_steps, remainder="pooled",
                          dense_final_steps=dense_final_steps, refresh_every=refresh_every)


# ------------------------------------------------------------------- SADA token-level sparsity (issue 13)
def sada_tokens(max_interval: int = 1, tokens: float = 0.5, token_interval: int = 1) -> Variant:
    """SADA with token-level sparsity: skipped steps plus, on computed steps, only the ``tokens`` fraction of
    tokens through the blocks; named ``hasten-sada-tokens@1-0.5`` (``-i2``: 2 token-level steps in a row)."""
    label = f"{max_interval}-{tokens:g}" + ("" if token_interval == 1 else f"-i{token_interval}")
    return hasten_feature(f"hasten-sada-tokens@{label}", "sada", max_interval=max_interval, tokens=tokens,
                          token_interval=token_interval)
