"""``quantize_(module, config)``: replace a module's ``nn.Linear`` layers by quantized ones, keeping the
sensitive layers in high precision (QuEST's observation), and ``dequantize_`` to restore the originals.

Selection, in order:
1. ``exclude`` regexes and layers the method cannot handle (e.g. int4 with a non-multiple group) stay;
2. layers carrying the timestep embedding / modulation (``keep_patterns``) stay, by rule;
3. every other layer is quantized and its relative output error ``||XW^T - Q(X)||^2 / ||XW^T||^2`` is
   measured on its calibration rows (on the weight alone without calibration); the ``keep_budget``
   layers with the largest error are put back, if that error is at least ``keep_min_error``.
Kept layers (and those of a shape the method cannot take) stay in float, or (``keep_precision="int8"``,
the default of the 4-bit and W8A8 methods) are stored as int8 weight-only: mixed precision.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import QuantConfig, QuantLinear, is_quant_linear, relative_error
from .calibration import CalibrationData, calibrate

STATE_ATTR = "_hasten_quant"


@dataclass
class WeightMemory:
    """Weight bytes of a module: ``bytes`` as stored now, ``bf16_bytes`` of the unquantized model in bf16,
    and ``quant_bytes`` of the model in bf16 with its quantized layers at their real packed size."""

    bytes: int
    bf16_bytes: int
    quant_bytes: int

    @property
    def ratio(self) -> float:
        return self.quant_bytes / max(self.bf16_bytes, 1)

    def __str__(self) -> str:
        return (f"{self.quant_bytes / 2**20:.2f} MiB vs {self.bf16_bytes / 2**20:.2f} MiB bf16 "
                f"({self.ratio:.3f}x)")


def weight_memory(module: nn.Module) -> WeightMemory:
    """Weight memory accounting of ``module`` (parameters and buffers, quantized layers included)."""
    actual = bf16 = quant = 0
    quant_prefixes = []
    for name, sub in module.named_modules():
        if is_quant_linear(sub):
            quant_prefixes.append(name + "." if name else "")
            for buf in list(sub.buffers()) + list(sub.parameters()):
                actual += buf.numel() * buf.element_size()
            bf16 += 2 * sub.in_features * sub.out_features + (2 * sub.bias.numel() if sub.bias is not None else 0)
            quant += sub.storage_bytes(2)
    seen: set[int] = set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if any(name.startswith(p) for p in quant_prefixes) or id(t) in seen:
            continue
        seen.add(id(t))
        actual += t.numel() * t.element_size()
        eq = t.numel() * (2 if t.is_floating_point() else t.element_size())
        bf16 += eq
        quant += eq
    return WeightMemory(bytes=actual, bf16_bytes=bf16, quant_bytes=quant)


@dataclass
class QuantReport:
    """What ``quantize_`` did: which layers were quantized, which were kept in high precision and why,
    each layer's measured relative output error, and the weight memory."""

    method: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    memory_before: WeightMemory | None = None
    memory_after: WeightMemory | None = None
    calibrated: bool = False
    precision: dict[str, str] = field(default_factory=dict)  # kept layers stored as int8 (mixed precision)

    def summary(self) -> str:
        lines = [f"{self.method}: {len(self.quantized)} linear layers quantized, {len(self.kept)} kept in "
                 f"high precision ({'calibrated' if self.calibrated else 'no calibration'})"]
        if self.memory_after is not None:
            lines.append(f"  weights: {self.memory_after}")
        if self.errors:
            worst = max(self.errors.values())
            mean = sum(self.errors.values()) / len(self.errors)
            lines.append(f"  relative output MSE (||dY||^2/||Y||^2) of quantized layers: mean {mean:.2e}, max {worst:.2e}")
        for name, why in self.kept.items():
            lines.append(f"  kept {name}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "quantized": list(self.quantized), "kept": dict(self.kept),
                "errors": dict(self.errors), "calibrated": self.calibrated, "precision": dict(self.precision)}


@dataclass
class QuantState:
    config: QuantConfig
    report: QuantReport
    originals: dict[str, nn.Module]  # path -> the original nn.Linear (empty when not restorable)
    devices: dict[str, torch.device]


def quant_state(module: nn.Module) -> QuantState | None:
    """The quantization state of ``module`` (``None`` if it is not quantized by hasten)."""
    return getattr(module, STATE_ATTR, None)


def quant_report(module: nn.Module) -> QuantReport | None:
    st = quant_state(module)
    return st.report if st is not None else None


def _parent(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (module.get_submodule(parent_path) if parent_path else module), attr


def _match(patterns: tuple[str, ...], name: str) -> str | None:
    low = name.lower()
    for p in patterns:
        if re.search(p, low):
            return p
    return None


def _layer_error(linear: nn.Linear, ql: QuantLinear, stats: Any | None) -> float:
    w = linear.weight.detach().float()
    with torch.no_grad():
        if stats is not None and stats.samples.shape[0] > 0:
            x = stats.samples.to(w.device, torch.float32)
            approx = ql(x)
            if ql.bias is not None:
                approx = approx - ql.bias.float()
            return relative_error(x @ w.t(), approx)
        return relative_error(w, ql.dequantized_weight().to(w.device))


def as_config(config: Any) -> QuantConfig:
    """``config`` itself, or its equivalent from this copy of hasten when it comes from another copy of
    the package (ComfyUI loads the same folder under another module name)."""
    if isinstance(config, QuantConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and type(config).__name__.endswith("Config"):
        from .serialize import CONFIGS, config_from_dict

        if getattr(config, "method", None) in CONFIGS:
            return config_from_dict(to_dict())
    raise TypeError(f"config must be one of Int8WeightOnlyConfig, Int4WeightOnlyConfig, W8A8Config; "
                    f"got {type(config).__name__}")


def plan_quantization(module: nn.Module, config: QuantConfig,
                      calibration: CalibrationData | Callable[[], Any] | None = None
                      ) -> tuple[dict[str, QuantLinear], QuantReport]:
    """Decide and build, without touching ``module``: the quantized replacement of every selected
    ``nn.Linear`` (by module path) and the report. :func:`quantize_` applies it in place; an adapter
    (e.g. ComfyUI's model patcher) may apply it as attribute patches instead."""
    config = as_config(config)
    if isinstance(module, nn.Linear):
        raise UnsupportedModelError("quantize_ replaces the nn.Linear layers inside a module; wrap a bare "
                                    "nn.Linear in a container (e.g. nn.Sequential) first")
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnsupportedModelError(f"{type(module).__name__} has no nn.Linear layers; hasten quantizes the "
                                    "nn.Linear layers of any torch module (DiT / UNet denoisers, MLPs)")
    if callable(calibration) and not isinstance(calibration, CalibrationData):
        calibration = calibrate(module, calibration, max_samples=config.sample_rows)
    report = QuantReport(method=config.method, calibrated=calibration is not None)
    report.memory_before = weight_memory(module)

    candidates: dict[str, tuple[nn.Linear, QuantLinear]] = {}
    for name, lin in linears:
        if (p := _match(config.exclude, name)) is not None:
            report.kept[name] = f"excluded by config (matches {p!r})"
            continue
        if (why := config.supports(lin)) is not None:
            report.kept[name] = f"unsupported shape: {why}"
            continue
        if (p := _match(config.keep_patterns, name)) is not None:
            report.kept[name] = f"rule: timestep embedding / modulation layer (matches {p!r})"
            continue
        stats = calibration.get(name) if calibration is not None else None
        with torch.no_grad():
            ql = config.quantize_linear(lin, stats)
        ql.train(lin.training)
        report.errors[name] = _layer_error(lin, ql, stats)
        candidates[name] = (lin, ql)

    n_keep = config.keep_count(len(candidates))
    ranked = sorted(report.errors, key=report.errors.get, reverse=True)
    for rank, name in enumerate(ranked[:n_keep]):
        if report.errors[name] < config.keep_min_error:
            break
        report.kept[name] = (f"sensitive: relative output MSE {report.errors[name]:.3e} "
                             f"(rank {rank + 1} of {len(ranked)}, keep_budget={config.keep_budget})")
        del candidates[name]
        del report.errors[name]
    report.quantized = list(candidates)
    plan = {name: ql for name, (_, ql) in candidates.items()}
    if config.keep_precision == "int8":  # mixed precision: kept layers in int8 weight-only, not float
        from .int8 import Int8WeightOnlyConfig

        int8 = Int8WeightOnlyConfig(awq_grid=getattr(config, "awq_grid", 20))
        modules = dict(linears)
        for name, why in list(report.kept.items()):
            if why.startswith(("rule", "sensitive", "unsupported shape")):
                stats = calibration.get(name) if calibration is not None else None
                with torch.no_grad():
                    plan[name] = int8.quantize_linear(modules[name], stats)
                plan[name].train(modules[name].training)
                report.kept[name] = why + "; stored as int8 weight-only"
                report.precision[name] = "int8_weight_only"
    return plan, report


def quantize_(module: nn.Module, config: QuantConfig,
              calibration: CalibrationData | Callable[[], Any] | None = None) -> QuantReport:
    """Quantize ``module``'s ``nn.Linear`` layers in place according to ``config``.

    ``calibration`` is a :class:`CalibrationData` (from :func:`hasten.quant.calibrate`), or a callable
    running a few real forward passes of ``module`` (recorded here), or ``None`` (no activation-aware
    scaling, sensitivity measured on the weights, W8A8 falls back to dynamic per-token scales).
    Returns the :class:`QuantReport` (also available as ``hasten.quant.quant_report(module)``).
    """
    config = as_config(config)
    if quant_state(module) is not None:
        raise ValueError("module is already quantized by hasten; call hasten.dequantize_(module) first")
    plan, report = plan_quantization(module, config, calibration)
    originals: dict[str, nn.Module] = {}
    devices: dict[str, torch.device] = {}
    for name, ql in plan.items():
        parent, attr = _parent(module, name)
        lin = getattr(parent, attr)
        setattr(parent, attr, ql)
        devices[name] = lin.weight.device
        if config.restorable:
            originals[name] = lin.to("cpu") if lin.weight.device.type != "cpu" else lin
    report.memory_after = weight_memory(module)
    setattr(module, STATE_ATTR, QuantState(config, report, originals, devices))
    return report


def dequantize_(module: nn.Module) -> bool:
    """Put the original ``nn.Linear`` layers back (same objects, same weights); False if not quantized."""
    st = quant_state(module)
    if st is None:
        return False
    if not st.config.restorable and (st.report.quantized or st.report.precision):
        raise ValueError("this module was quantized with restorable=False: its original weights were freed; "
                         "reload the model instead")
    for name, lin in st.originals.items():
        parent, attr = _parent(module, name)
        current = getattr(parent, attr)
        qw = getattr(current, "qweight", None)
        device = qw.device if isinstance(qw, torch.Tensor) else st.devices[name]  # follows a later .to(device)
        setattr(parent, attr, lin.to(device) if lin.weight.device != device else lin)
    delattr(module, STATE_ATTR)
    return True
