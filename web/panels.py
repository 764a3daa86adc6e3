"""One settings panel per acceleration family: its controls and how their values become a bench ``Variant``.

The app draws every registered panel once per accelerated configuration; a family that is not built has
no panel. Adding a family is one :func:`register_panel` call (controls + a ``build(values) -> Variant``).
Nothing here imports gradio, so the panels are testable (and reusable by other front ends) without a UI.
A panel that must calibrate on the model (CacheQuant) is ``contextual``: its ``build`` also gets a
:class:`PanelContext` (model handle, request, a :class:`CalibrationStore` kept by the app, progress).

A new family's panel, e.g.::

    register_panel(PanelSpec(
        family="guidance", title="Adaptive guidance",
        controls=(Control("threshold", "cosine threshold", default=0.993, minimum=0.9, maximum=1.0, step=0.001),),
        build=lambda threshold: Variant(f"hasten-ag@{threshold:g}", "hasten",
                                        lambda p: p.enable_adaptive_guidance(threshold=threshold),
                                        lambda p: p.disable_adaptive_guidance(), {"threshold": threshold}),
    ))
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..bench.variants import (
    Variant,
    adaptive_guidance,
    bottleneck,
    cfg_truncation,
    combo,
    hasten_easycache,
    hasten_feature,
    quantized,
    sparse_attention,
)
from ..caches import EasyCacheConfig
from ..caches.blockcache import DeltaDiTConfig, ProfilingDiTConfig
from ..caches.cachequant import CacheQuantConfig
from ..caches.sada import SADAConfig

ControlKind = Literal["slider", "checkbox", "dropdown", "number"]


@dataclass(frozen=True)
class Control:
    """One input of a panel (rendered as a gradio component of the same kind)."""

    name: str  # keyword passed to the panel's ``build``
    label: str
    kind: ControlKind = "slider"
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    info: str | None = None

    def check(self, value: Any) -> Any:
        """The value converted to the control's type; ValueError (naming the valid range) when out of range."""
        if self.kind == "checkbox":
            return bool(value)
        if self.kind == "dropdown":
            if value not in self.choices:
                raise ValueError(f"{self.label}: {value!r} is not one of {list(self.choices)}")
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.label}: expected a number, got {value!r}") from None
        if (self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum):
            raise ValueError(f"{self.label} must be in [{self.minimum:g}, {self.maximum:g}], got {v:g}")
        return int(v) if isinstance(self.default, int) and not isinstance(self.default, bool) else v


class CalibrationStore:
    """One-off calibrations kept for the app's lifetime, keyed by what they depend on (model, method, steps,
    ...): CacheQuant calibrates once per key, later runs reuse it. Thread-safe (one lock per store)."""

    def __init__(self, max_items: int = 8) -> None:
        self._items: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.max_items = max_items

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._lock:  # two sessions asking for the same key calibrate once
            if key not in self._items:
                while len(self._items) >= self.max_items:  # the oldest goes: recorded activations add up
                    self._items.pop(next(iter(self._items)))
                self._items[key] = make()
            return self._items[key]

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class PanelContext:
    """What a panel that calibrates needs besides its controls: the model handle (a
    :class:`~hasten.web.compare.ModelHandle`), the request it will run, where calibrations are kept and
    how to report progress ``(fraction, text)``."""

    handle: Any
    request: Any
    calibrations: CalibrationStore = field(default_factory=CalibrationStore)
    progress: Callable[[float, str], None] | None = None


def _default(config_cls: type, name: str) -> Any:
    """The library's default for one setting (panels show the library's defaults, never their own)."""
    f = config_cls.__dataclass_fields__[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


@dataclass(frozen=True)
class PanelSpec:
    """An acceleration family's panel: its controls and ``build(**values) -> Variant``."""

    family: str
    title: str
    controls: tuple[Control, ...]
    build: Callable[..., Variant]
    description: str = ""
    # default on/off state for configuration slots A, B, C (families usually start off)
    default_enabled: tuple[bool, ...] = field(default_factory=tuple)
    slot_defaults: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # per-slot default overrides
    contextual: bool = False  # build also takes ``context`` (a PanelContext): the model and request

    def enabled_by_default(self, slot: int) -> bool:
        return self.default_enabled[slot] if slot < len(self.default_enabled) else False

    def defaults(self, slot: int = 0) -> dict[str, Any]:
        over = self.slot_defaults[slot] if slot < len(self.slot_defaults) else {}
        return {c.name: over.get(c.name, c.default) for c in self.controls}

    def variant(self, values: dict[str, Any], context: PanelContext | None = None) -> Variant:
        """Validate ``values`` (missing ones take their defaults) and build the family's variant."""
        checked = {c.name: c.check(values.get(c.name, c.default)) for c in self.controls}
        if self.contextual:
            if context is None:
                raise ValueError(f"{self.title} needs the model and request (a PanelContext) to build")
            return self.build(context=context, **checked)
        return self.build(**checked)


PANELS: dict[str, PanelSpec] = {}


def register_panel(spec: PanelSpec) -> PanelSpec:
    """Add (or replace) a family's panel; the app shows panels in registration order."""
    PANELS[spec.family] = spec
    return spec


def panels() -> list[PanelSpec]:
    return list(PANELS.values())


def compose(name: str, variants: Sequence[Variant]) -> Variant:
    """One variant applying ``variants`` in order and removing them in reverse order (see bench's combo)."""
    return combo(name, *variants)


def _keeps_others(part: Variant) -> Variant:
    """``part`` whose apply fails (after removing itself) when it switched off a feature an earlier part of
    the configuration turned on: the pipeline replaced it instead of stacking (Δ-DiT and ProfilingDiT, two
    quantizations). Asks the pipeline what is on rather than restating which families stack."""
    from ..pipelines import features

    def apply(pipe: Any) -> None:
        before = dict(features(pipe))
        part.apply(pipe)
        now = features(pipe)
        lost = [name for name, feat in before.items() if now.get(name) is not feat]  # gone, or replaced
        if lost:
            part.remove(pipe)
            raise ValueError(f"{part.name} replaced {', '.join(sorted(lost))} instead of stacking with it: these "
                             "do not combine; switch one of them off in this configuration")

    return replace(part, apply=apply)


def configuration(name: str, choices: dict[str, dict[str, Any] | None],
                  context: PanelContext | None = None) -> Variant | None:
    """The variant of one accelerated configuration: ``choices`` maps family -> control values (None or a
    missing family = off). Returns None when no family is on. Unknown families raise ValueError. Panels
    that calibrate (CacheQuant) need ``context`` (the model handle and the request)."""
    parts = []
    for family, values in choices.items():
        if values is None:
            continue
        if family not in PANELS:
            raise ValueError(f"unknown acceleration family {family!r}; available: {', '.join(PANELS) or 'none'}")
        parts.append(PANELS[family].variant(values, context))
    if not parts:
        return None
    label = name + ": " + " + ".join(v.name.replace("hasten-", "") for v in parts)
    return compose(label, [_keeps_others(p) if i else p for i, p in enumerate(parts)])


# --------------------------------------------------------------------------------------------- panels
def _named(v: Variant, name: str) -> Variant:
    v.name = name
    return v


register_panel(PanelSpec(
    family="easycache",
    title="EasyCache (step cache)",
    description="Reuses the denoiser's last transformation while the predicted output change stays under the "
                "threshold. 0 = off (identical to the baseline); 0.1 ~ mild, 0.3+ = aggressive.",
    controls=(
        Control("threshold", "threshold", default=0.2, minimum=0.0, maximum=1.0, step=0.01,
                info="accumulated relative change allowed before recomputing"),
        Control("warmup", "warm-up fraction", default=0.2, minimum=0.0, maximum=1.0, step=0.05,
                info="first steps always computed"),
        Control("max_consecutive_reuse", "max reuses in a row", default=4, minimum=0, maximum=20, step=1,
                info="0 = no cap"),
        Control("forecast", "forecast on a reused step", kind="dropdown",
                default=_default(EasyCacheConfig, "forecast"), choices=("linear", "quadratic", "none"),
                info="extrapolate the change from the last 2 (linear) or 3 (quadratic) computed steps; none = "
                     "reuse the last change as is (the paper)"),
    ),
    build=lambda threshold, warmup, max_consecutive_reuse, forecast: _named(hasten_easycache(
        threshold, warmup=warmup, max_consecutive_reuse=max_consecutive_reuse, forecast=forecast),
        f"hasten-easycache@{threshold:g}" + ("" if forecast == _default(EasyCacheConfig, "forecast")
                                             else f"-{forecast}")),
    default_enabled=(True, True, False),
    slot_defaults=({"threshold": 0.1}, {"threshold": 0.3}, {"threshold": 0.5}),
))

register_panel(PanelSpec(
    family="guidance",
    title="Adaptive guidance (skip the unconditional pass)",
    description="AG stops computing the unconditional pass once cos(cond, uncond) reaches the threshold, per "
                "sample; 'truncate' drops CFG after a fixed fraction of the steps. A threshold above 1 is off.",
    controls=(
        Control("mode", "mode", kind="dropdown", default="ag", choices=("ag", "truncate")),
        Control("threshold", "AG cosine threshold", default=0.993, minimum=0.9, maximum=1.5, step=0.001),
        Control("truncate", "truncate after fraction", default=0.5, minimum=0.0, maximum=1.0, step=0.05),
    ),
    build=lambda mode, threshold, truncate: (adaptive_guidance(threshold) if mode == "ag"
                                             else cfg_truncation(truncate)),
))

register_panel(PanelSpec(
    family="bottleneck",
    title="Bottleneck sampling (high → low → high resolution)",
    description="Runs the middle stage at a lower resolution, with re-noising at the up-sampling and a "
                "per-stage timestep shift. Scale 1 is off.",
    controls=(
        Control("scale", "middle-stage scale", default=0.5, minimum=0.25, maximum=1.0, step=0.25),
        Control("start", "low-res stage starts at", default=0.2, minimum=0.0, maximum=1.0, step=0.05),
        Control("end", "low-res stage ends at", default=0.7, minimum=0.0, maximum=1.0, step=0.05),
    ),
    build=lambda scale, start, end: bottleneck(scale, (start, end)),
))

register_panel(PanelSpec(
    family="sparse",
    title="Sparse attention (AdaSpa-style, block-sparse)",
    description="Per head, keeps the key blocks holding the target share of attention mass; searched once "
                "after the dense warm-up and reused. Mass 1.0 is dense. Faster on GPU (Triton); on CPU it is "
                "the correctness path and slower than dense.",
    controls=(Control("target_mass", "target attention mass", default=0.95, minimum=0.5, maximum=1.0, step=0.01),),
    build=lambda target_mass: sparse_attention(target_mass),
))

register_panel(PanelSpec(
    family="quant",
    title="Low-bit quantization of the denoiser",
    description="int8 / int4 weights (AWQ-style scales) or W8A8, calibrated on a few real sampling steps; "
                "sensitive layers kept. On CPU the weights are smaller, not faster (except W8A8).",
    controls=(Control("method", "method", kind="dropdown", default="int8", choices=("int8", "int4", "w8a8")),),
    build=lambda method: quantized(method, **({"group_size": 64} if method == "int4" else {})),
))


def _steps(name: str, label: str, config_cls: type, lo: int, hi: int, info: str | None = None) -> Control:
    return Control(name, label, default=_default(config_cls, name), minimum=lo, maximum=hi, step=1, info=info)


def _fraction(name: str, label: str, config_cls: type, info: str | None = None, step: float = 0.05) -> Control:
    return Control(name, label, default=_default(config_cls, name), minimum=0.0, maximum=1.0, step=step, info=info)


def _forecast(config_cls: type) -> tuple[Control, ...]:
    """The forecast choice of a block cache, when the installed core has one (issue 13's forecasting reuse)."""
    if "forecast" not in config_cls.__dataclass_fields__:
        return ()
    return (Control("forecast", "forecast on a reused step", kind="dropdown",
                    default=_default(config_cls, "forecast"), choices=("none", "linear", "quadratic"),
                    info="extrapolate the cached residual from the last computed steps; none = reuse it as is"),)


def _forecast_tag(config_cls: type, settings: dict[str, Any]) -> str:
    """``-quadratic`` in a variant's name when its forecast is not the library's default."""
    f = settings.get("forecast")
    return "" if f is None or f == _default(config_cls, "forecast") else f"-{f}"


def _checked(config_cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` after the library's own validation (its message, before anything runs)."""
    config_cls(**settings)
    return settings


HALF = "half"  # Δ-DiT's default span: half of the model's blocks (num_cached_blocks=None)


def _delta_dit(**values: Any) -> Variant:
    blocks = values.pop("num_cached_blocks")
    values["num_cached_blocks"] = None if blocks == HALF else int(blocks)
    settings = _checked(DeltaDiTConfig, values)
    label = f"{settings['interval']}" + ("" if blocks == HALF else f"-n{blocks}") + _forecast_tag(DeltaDiTConfig, settings)
    return hasten_feature(f"hasten-delta-dit@{label}", "delta_dit", **settings)


register_panel(PanelSpec(
    family="delta_dit",
    title="Δ-DiT (block cache: rear blocks early, front blocks late)",
    description="Caches the residual of a span of transformer blocks: the rear span before the boundary, the "
                "front span after it, recomputed every 'interval' steps. Interval 1 is off (identical to the "
                "baseline). Needs a transformer with a list of repeated blocks (not a UNet).",
    controls=(
        _steps("interval", "cache interval (steps)", DeltaDiTConfig, 1, 10, "span recomputed every N steps"),
        Control("num_cached_blocks", "blocks in the cached span", kind="dropdown", default=HALF,
                choices=(HALF, "1", "2", "3", "4", "6", "8", "12", "16", "24"),
                info="'half' = half of the model's blocks"),
        _fraction("boundary", "rear -> front switch at", DeltaDiTConfig),
        _fraction("warmup", "warm-up fraction", DeltaDiTConfig, "first steps always computed"),
        _steps("final_steps", "final steps computed", DeltaDiTConfig, 0, 10),
        *_forecast(DeltaDiTConfig),
    ),
    build=_delta_dit,
))


def _profiling_dit(**values: Any) -> Variant:
    settings = _checked(ProfilingDiTConfig, values)
    label = f"{settings['threshold']:g}-r{settings['max_reuse']}" + _forecast_tag(ProfilingDiTConfig, settings)
    return hasten_feature(f"hasten-profiling-dit@{label}", "profiling_dit", **settings)


register_panel(PanelSpec(
    family="profiling_dit",
    title="ProfilingDiT (block cache of the stable blocks)",
    description="Profiles each block's residual change over the first steps and reuses the blocks that change "
                "less than the threshold, up to 'max reuses' steps in a row. Threshold 0 is off. Needs a "
                "transformer with a list of repeated blocks (not a UNet).",
    controls=(
        Control("threshold", "threshold", default=_default(ProfilingDiTConfig, "threshold"), minimum=0.0,
                maximum=1.0, step=0.01, info="mean relative residual change per step below which a block is cached"),
        _fraction("profile", "profiling fraction", ProfilingDiTConfig, "first steps computed and profiled"),
        _steps("max_reuse", "max reuses in a row", ProfilingDiTConfig, 1, 10),
        _fraction("max_cached_fraction", "at most this share of blocks cached", ProfilingDiTConfig),
        _steps("final_steps", "final steps computed", ProfilingDiTConfig, 0, 10),
        *_forecast(ProfilingDiTConfig),
    ),
    build=_profiling_dit,
))


def _sada(**values: Any) -> Variant:
    settings = _checked(SADAConfig, values)
    label = f"{settings['max_interval']}" + ("" if (settings["threshold"], settings["order"]) == (0.0, 1)
                                             else f"-t{settings['threshold']:g}-o{settings['order']}")
    return hasten_feature(f"hasten-sada@{label}", "sada", **settings)


register_panel(PanelSpec(
    family="sada",
    title="SADA (stability-guided step skipping)",
    description="Skips a denoiser call while the trajectory is stable by SADA's criterion (its second-order "
                "difference against its first) and extrapolates it. Max skips 0 is off. A step cache: ticked "
                "with another one (EasyCache, CacheQuant), the library decides whether they stack.",
    controls=(
        _steps("max_interval", "max skips in a row", SADAConfig, 0, 5),
        Control("threshold", "stability threshold", default=_default(SADAConfig, "threshold"), minimum=-1.0,
                maximum=1.0, step=0.05, info="0 = the paper's sign test; larger skips more, negative less"),
        _fraction("start", "skipping starts at", SADAConfig),
        _fraction("end", "skipping ends at", SADAConfig, step=0.01),
        _steps("order", "extrapolation order", SADAConfig, 1, 2, "1 = linear, 2 = Lagrange"),
        _steps("final_steps", "final steps computed", SADAConfig, 0, 10),
    ),
    build=_sada,
))

CALIBRATION_SEED = 7  # CacheQuant calibrates on another seed than the compared one (as `hasten bench`)


def _calibration_prompts(handle: Any, request: Any) -> list[str]:
    """The embedded image model: all ten digits; the video model: four digits, one per direction; other
    models: the request's prompt (on another seed)."""
    if handle.directions:
        return [f"digit {d} moving {way}" for d, way in zip((0, 3, 5, 8), handle.directions)]
    if handle.digits:
        return [f"digit {d}" for d in range(10)]
    return handle.prompts(request)


def _cachequant(context: PanelContext, method: str, speedup: float, reuse: str, correction: bool) -> Variant:
    settings = _checked(CacheQuantConfig, {"method": method, "speedup": speedup, "reuse": reuse,
                                           "correction": correction})
    handle, request = context.handle, context.request
    key = ("cachequant", handle.name, id(handle.pipe), method, request.steps, request.guidance, request.size,
           request.negative_prompt, None if handle.digits else request.prompt)
    prompts = _calibration_prompts(handle, request)
    cal: list[Any] = []

    def calibrate(pipe: Any) -> Any:
        from ..pipelines.cachequant import calibrate_cachequant

        passes = ["full precision", method]
        total = len(passes) * request.steps

        def sample() -> None:
            name = passes[0]

            def on_step(step: int) -> None:
                if context.progress is not None:
                    done = (2 - len(passes)) * request.steps + step + 1  # pass 1: 1..N, pass 2: N+1..2N
                    context.progress(done / total, f"calibrating CacheQuant ({method}, once per model and steps): "
                                                   f"{name} pass, step {step + 1}/{request.steps}")

            handle.generate(replace(request, seed=CALIBRATION_SEED), prompts, on_step=on_step)
            passes.pop(0)

        return calibrate_cachequant(pipe, method=method, calibration_prompts=tuple(prompts),
                                    calibration_seeds=(CALIBRATION_SEED,), num_inference_steps=request.steps,
                                    sample=sample)

    def prepare(pipe: Any, _generate: Callable[[], Any]) -> None:
        if not cal:
            cal.append(context.calibrations.get(key, lambda: calibrate(pipe)))

    def apply(pipe: Any) -> None:
        prepare(pipe, lambda: None)
        pipe.enable_cachequant(calibration=cal[0], **settings)

    label = f"{method}@{speedup:g}x" + ("" if correction else "-nocorr") + ("" if reuse == "auto" else f"-{reuse}")
    return Variant(f"hasten-cachequant-{label}", "hasten", apply, lambda p: p.disable_cachequant(), settings,
                   prepare=prepare)


register_panel(PanelSpec(
    family="cachequant",
    title="CacheQuant (quantization + the cache schedule chosen for it)",
    description="Quantizes the denoiser and computes only the steps a dynamic programme picks under the "
                "quantization error, correcting the combined error on reused steps. Calibrated once per model, "
                "method and steps (two full generations of calibration prompts on another seed), then kept. "
                "Includes its own quantization: it does not stack with EasyCache, SADA or the quantization panel.",
    controls=(
        Control("method", "quantization", kind="dropdown", default=_default(CacheQuantConfig, "method"),
                choices=("int8", "int4", "w8a8")),
        Control("speedup", "target step speed-up", default=2.0, minimum=1.0, maximum=5.0, step=0.25,
                info="steps / computed steps (the library's default: 2)"),
        Control("reuse", "reused step estimate", kind="dropdown", default=_default(CacheQuantConfig, "reuse"),
                choices=("auto", "residual", "output")),
        Control("correction", "error correction", kind="checkbox", default=_default(CacheQuantConfig, "correction")),
    ),
    build=_cachequant,
    contextual=True,
))


def _preset_panel() -> PanelSpec:
    """A ``hasten tune`` preset as one family: the stack it holds, loaded into the slot as a whole."""
    from ..tune.preset import find_presets, preset_variant

    found = tuple(find_presets()) or ("(no preset found)",)

    def build(preset: str) -> Variant:
        if preset not in found or preset == "(no preset found)":
            raise ValueError("no preset: run `hasten tune` (writes tune-results/tuned.json) or set HASTEN_PRESETS "
                             "to a preset file or folder before `hasten demo`")
        return preset_variant(preset)

    return PanelSpec(family="preset", title="Tuned preset (hasten tune)",
                     description="The stack `hasten tune` chose (a JSON preset), with its own settings; found in "
                                 "HASTEN_PRESETS or ./tune-results.",
                     controls=(Control("preset", "preset file", kind="dropdown", default=found[0], choices=found),),
                     build=build)


register_panel(_preset_panel())
