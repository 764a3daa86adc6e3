"""One settings panel per acceleration family: its controls and how their values become a bench ``Variant``.

The app draws every registered panel once per accelerated configuration; a family that is not built has
no panel. Adding a family is one :func:`register_panel` call (controls + a ``build(values) -> Variant``).
Nothing here imports gradio, so the panels are testable (and reusable by other front ends) without a UI.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..bench.variants import (
    Variant,
    adaptive_guidance,
    bottleneck,
    cfg_truncation,
    combo,
    hasten_easycache,
    quantized,
    sparse_attention,
)

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

    def enabled_by_default(self, slot: int) -> bool:
        return self.default_enabled[slot] if slot < len(self.default_enabled) else False

    def defaults(self, slot: int = 0) -> dict[str, Any]:
        over = self.slot_defaults[slot] if slot < len(self.slot_defaults) else {}
        return {c.name: over.get(c.name, c.default) for c in self.controls}

    def variant(self, values: dict[str, Any]) -> Variant:
        """Validate ``values`` (missing ones take their defaults) and build the family's variant."""
        checked = {c.name: c.check(values.get(c.name, c.default)) for c in self.controls}
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


def configuration(name: str, choices: dict[str, dict[str, Any] | None]) -> Variant | None:
    """The variant of one accelerated configuration: ``choices`` maps family -> control values (None or a
    missing family = off). Returns None when no family is on. Unknown families raise ValueError."""
    parts = []
    for family, values in choices.items():
        if values is None:
            continue
        if family not in PANELS:
            raise ValueError(f"unknown acceleration family {family!r}; available: {', '.join(PANELS) or 'none'}")
        parts.append(PANELS[family].variant(values))
    if not parts:
        return None
    label = name + ": " + " + ".join(v.name.replace("hasten-", "") for v in parts)
    return compose(label, parts)


# --------------------------------------------------------------------------------------------- panels
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
    ),
    build=lambda threshold, warmup, max_consecutive_reuse: hasten_easycache(
        threshold, warmup=warmup, max_consecutive_reuse=max_consecutive_reuse),
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
