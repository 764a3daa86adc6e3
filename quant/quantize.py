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

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import QuantConfig, QuantLinear, is_quant_linear, relative_error
from .calibration import CalibrationData, calibrate

STATE_ATTR = "_hasten_quant"
log = logging.getLogger("hasten.quant")


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
            w = sub.weight
            actual += w.nbytes  # a QuantWeight's nbytes is its packed size
            if sub.bias is not None:
                actual += sub.bias.numel() * sub.bias.element_size()
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
    restore_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # overwritten by load_quantized


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


# short names accepted wherever a config is: ``pipe.quantize("int8")``, the ComfyUI node's method list
METHOD_NAMES: dict[str, str] = {
    "int8": "int8_weight_only", "int8_weight_only": "int8_weight_only",
    "int4": "int4_weight_only", "int4_weight_only": "int4_weight_only",
    "w8a8": "w8a8",
}


def config_for(method: str) -> QuantConfig:
    """The default config of a method named by a short string (``"int8"``, ``"int4"``, ``"w8a8"`` or the
    methods' full names)."""
    from .serialize import CONFIGS

    key = METHOD_NAMES.get(method.strip().lower()) if isinstance(method, str) else None
    if key is None:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {sorted(METHOD_NAMES)} "
                         "or pass a config (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=...), "
                         "W8A8Config())")
    return CONFIGS[key]()


def as_config(config: Any) -> QuantConfig:
    """``config`` itself; a method name (``"int8"``, ``"int4"``, ``"w8a8"``) as its default config; or the
    equivalent from this copy of hasten of a config made by another copy of the package (ComfyUI loads
    the same folder under another module name)."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return config_for(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and type(config).__name__.endswith("Config"):
        from .serialize import CONFIGS, config_from_dict

        if getattr(config, "method", None) in CONFIGS:
            return config_from_dict(to_dict())
    raise TypeError(f"config must be one of Int8WeightOnlyConfig, Int4WeightOnlyConfig, W8A8Config or a "
                    f"method name {sorted(METHOD_NAMES)}; got {type(config).__name__}")


def plan_quantization(module: nn.Module, config: QuantConfig,
                      calibration: CalibrationData | Callable[[], Any] | None = None,
                      originals: Mapping[str, nn.Linear] | None = None,
                      skip: Mapping[str, str] | None = None,
                      ) -> tuple[dict[str, QuantLinear], QuantReport]:
    """Decide and build, without touching ``module``: the quantized replacement of every selected
    ``nn.Linear`` (by module path) and the report. :func:`quantize_` applies it in place; an adapter
    (e.g. ComfyUI's model patcher) may apply it as attribute patches instead.

    ``originals`` maps the path of a layer that is currently a hasten quantized linear (patched in by an
    adapter) to the original ``nn.Linear`` to quantize instead; a quantized layer without an original is
    refused (quantizing quantized weights again would compound the error). ``skip`` maps layer paths to a
    reason they are left as they are (reported as kept).
    """
    config = as_config(config)
    if isinstance(module, nn.Linear):
        raise UnsupportedModelError("quantize_ replaces the nn.Linear layers inside a module; wrap a bare "
                                    "nn.Linear in a container (e.g. nn.Sequential) first")
    originals = dict(originals or {})
    linears: list[tuple[str, nn.Linear]] = []
    already: list[str] = []
    for n, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if is_quant_linear(m):
            if n not in originals:
                already.append(n)
                continue
            m = originals[n]
            if is_quant_linear(m):
                already.append(n)
                continue
        linears.append((n, m))
    if already:
        raise ValueError(f"{type(module).__name__} already holds {len(already)} hasten-quantized layers "
                         f"(e.g. {already[0]!r}) whose original weights are unknown here; dequantize it first "
                         "(hasten.dequantize_ / pipe.dequantize()) so the original weights are quantized")
    if not linears:
        raise UnsupportedModelError(f"{type(module).__name__} has no nn.Linear layers; hasten quantizes the "
                                    "nn.Linear layers of any torch module (DiT / UNet denoisers, MLPs)")
    if callable(calibration) and not isinstance(calibration, CalibrationData):
        calibration = calibrate(module, calibration, max_samples=config.sample_rows)
    report = QuantReport(method=config.method, calibrated=calibration is not None)
    report.memory_before = before = weight_memory(module)
    for n, orig in originals.items():  # account layers patched in by an adapter as their originals
        cur = module.get_submodule(n)
        if is_quant_linear(cur) and not is_quant_linear(orig):
            ob = sum(t.nbytes for t in orig.parameters(recurse=False))
            before.bytes += ob - cur.weight.nbytes - (cur.bias.nbytes if cur.bias is not None else 0)
            before.quant_bytes += sum(2 * t.numel() for t in orig.parameters(recurse=False)) - cur.storage_bytes(2)

    candidates: dict[str, tuple[nn.Linear, QuantLinear]] = {}
    for name, lin in linears:
        if skip and name in skip:
            report.kept[name] = skip[name]
            continue
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
    modules = dict(linears)
    if config.keep_precision == "int8":  # mixed precision: kept layers in int8 weight-only, not float
        from .int8 import Int8WeightOnlyConfig

        int8 = Int8WeightOnlyConfig(awq_grid=getattr(config, "awq_grid", 20))
        for name, why in list(report.kept.items()):
            if why.startswith(("rule", "sensitive", "unsupported shape")):
                stats = calibration.get(name) if calibration is not None else None
                with torch.no_grad():
                    plan[name] = int8.quantize_linear(modules[name], stats)
                plan[name].train(modules[name].training)
                report.kept[name] = why + "; stored as int8 weight-only"
                report.precision[name] = "int8_weight_only"
    before = report.memory_before
    gone = [modules[n] for n in plan]
    report.memory_after = WeightMemory(  # what the module will hold once the plan is applied
        bytes=before.bytes - sum(sum(t.nbytes for t in m.parameters(recurse=False)) for m in gone)
        + sum(ql.weight.nbytes + (ql.bias.nbytes if ql.bias is not None else 0) for ql in plan.values()),
        bf16_bytes=before.bf16_bytes,
        quant_bytes=before.quant_bytes - sum(sum(2 * t.numel() for t in m.parameters(recurse=False)) for m in gone)
        + sum(ql.storage_bytes(2) for ql in plan.values()))
    return plan, report


def check_not_empty(report: QuantReport, where: str) -> None:
    """Zero quantized layers where quantization was asked for is an error, not a silent success."""
    if report.quantized:
        return
    why = "; ".join(f"{n}: {r}" for n, r in list(report.kept.items())[:4]) or "no linear layer found"
    more = f" (and {len(report.kept) - 4} more)" if len(report.kept) > 4 else ""
    hint = (" Int4 needs in_features divisible by group_size: try a smaller Int4WeightOnlyConfig(group_size=...)."
            if report.method == "int4_weight_only" else "")
    raise UnsupportedModelError(f"{where}: no linear layer could be quantized with {report.method} "
                                f"({len(report.kept)} kept: {why}{more}).{hint}")


def log_report(report: QuantReport, where: str) -> None:
    """One log line per quantization: how many layers, how many kept, weight bytes."""
    mem = f", weights {report.memory_after}" if report.memory_after is not None else ""
    log.info("hasten.quant: %s: %s: %d linear layers quantized, %d kept (%d of them as int8)%s", where,
             report.method, len(report.quantized), len(report.kept), len(report.precision), mem)


def _refuse_save_pretrained(module: nn.Module) -> None:
    """Shadow ``module.save_pretrained`` (diffusers models) with a clear refusal while it is quantized: the
    plain checkpoint it would write holds packed tensors no loader understands."""
    if not callable(getattr(module, "save_pretrained", None)) or "save_pretrained" in vars(module):
        return

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        from ..errors import QuantFileError

        raise QuantFileError(
            f"this {type(module).__name__} is quantized by hasten: save_pretrained would write packed int "
            "tensors that from_pretrained cannot read. Save it with hasten.save_quantized(module, path) and "
            "load that into the unquantized model with hasten.load_quantized(module, path); or call "
            "pipe.dequantize() / hasten.dequantize_(module) first to save the original weights")

    save_pretrained._hasten_refusal = True  # type: ignore[attr-defined]
    object.__setattr__(module, "save_pretrained", save_pretrained)


def _allow_save_pretrained(module: nn.Module) -> None:
    fn = vars(module).get("save_pretrained")
    if fn is not None and getattr(fn, "_hasten_refusal", False):
        del module.__dict__["save_pretrained"]


def install_quant_state(module: nn.Module, state: QuantState) -> None:
    """Record ``state`` on ``module`` (and refuse plain checkpoint saving while it is quantized)."""
    setattr(module, STATE_ATTR, state)
    _refuse_save_pretrained(module)


def quantize_(module: nn.Module, config: QuantConfig | str,
              calibration: CalibrationData | Callable[[], Any] | None = None) -> QuantReport:
    """Quantize ``module``'s ``nn.Linear`` layers in place according to ``config`` (a config object or a
    method name: ``"int8"``, ``"int4"``, ``"w8a8"``).

    ``calibration`` is a :class:`CalibrationData` (from :func:`hasten.quant.calibrate`), or a callable
    running a few real forward passes of ``module`` (recorded here), or ``None`` (no activation-aware
    scaling, sensitivity measured on the weights, W8A8 falls back to dynamic per-token scales).
    Returns the :class:`QuantReport` (also available as ``hasten.quant.quant_report(module)``); raises
    :class:`~hasten.errors.UnsupportedModelError` (module untouched) when no layer can be quantized.
    """
    config = as_config(config)
    if quant_state(module) is not None:
        raise ValueError("module is already quantized by hasten; call hasten.dequantize_(module) first")
    plan, report = plan_quantization(module, config, calibration)
    check_not_empty(report, type(module).__name__)
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
    install_quant_state(module, QuantState(config, report, originals, devices))
    log_report(report, type(module).__name__)
    return report


def dequantize_(module: nn.Module) -> bool:
    """Put the original ``nn.Linear`` layers back (same objects, same weights) — after
    :func:`~hasten.quant.load_quantized` also the parameters the file had overwritten, so the module is
    exactly as before the load. False if the module is not quantized; raises if its originals were freed
    (``restorable=False``)."""
    st = quant_state(module)
    if st is None:
        return False
    if not st.config.restorable and (st.report.quantized or st.report.precision):
        raise ValueError("this module was quantized with restorable=False: its original weights were freed; "
                         "reload the model instead")
    for name, lin in st.originals.items():
        parent, attr = _parent(module, name)
        current = getattr(parent, attr)
        if isinstance(getattr(current, "base_layer", None), nn.Module):  # a LoRA (PEFT) loaded on the quantized
            parent, attr, current = current, "base_layer", current.base_layer  # layer: keep the LoRA, swap its base
        w = getattr(current, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else st.devices[name]  # follows a later .to(device)
        setattr(parent, attr, lin.to(device) if lin.weight.device != device else lin)
    if st.restore_tensors:
        with torch.no_grad():
            current = dict(module.named_parameters()) | dict(module.named_buffers())
            for key, value in st.restore_tensors.items():
                current[key].copy_(value.to(current[key].device))
        log.info("hasten.quant: restored %d parameters overwritten by load_quantized", len(st.restore_tensors))
    delattr(module, STATE_ATTR)
    _allow_save_pretrained(module)
    return True
