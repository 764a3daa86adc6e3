"""Save a quantized module to safetensors with its quantization metadata, and load it back without
recalibration (bit-identical outputs). The file holds the module's whole state dict (quantized buffers
and the unquantized parameters), the method and settings, per-layer shapes, the kept layers and a
SHA-256 over every tensor; a corrupted, truncated or mismatched file is refused with :class:`QuantFileError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from .base import QuantConfig, QuantLinear, is_quant_linear
from .int4 import Int4WeightOnlyConfig, Int4WeightOnlyLinear
from .int8 import Int8WeightOnlyConfig, Int8WeightOnlyLinear
from .quantize import STATE_ATTR, QuantReport, QuantState, quant_state, weight_memory
from .w8a8 import W8A8Config, W8A8Linear

FORMAT = "hasten-quant"
VERSION = "1"
CONFIGS: dict[str, type[QuantConfig]] = {c.method: c for c in (Int8WeightOnlyConfig, Int4WeightOnlyConfig, W8A8Config)}
LINEARS: dict[str, type[QuantLinear]] = {c.method: c for c in (Int8WeightOnlyLinear, Int4WeightOnlyLinear, W8A8Linear)}


class QuantFileError(ValueError):
    """A quantized-model file that cannot be used: unreadable, corrupted, or made for another model."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    cls = CONFIGS.get(d.get("method", ""))
    if cls is None:
        raise QuantFileError(f"unknown quantization method {d.get('method')!r}; known: {sorted(CONFIGS)}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def save_quantized(module: nn.Module, path: str | os.PathLike) -> None:
    """Write a module quantized by :func:`hasten.quantize_` to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    st = quant_state(module)
    if st is None:
        raise ValueError("module is not quantized by hasten; call hasten.quantize_(module, config) first")
    tensors: dict[str, torch.Tensor] = {}
    ptrs: dict[tuple[int, int, tuple], str] = {}
    aliases: dict[str, str] = {}
    for key, t in module.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ident is not None and ident in ptrs:
            aliases[key] = ptrs[ident]
            continue
        if ident is not None:
            ptrs[ident] = key
        tensors[key] = t.detach().cpu().contiguous().clone()
    layers = {}
    for name, sub in module.named_modules():
        if is_quant_linear(sub):
            layers[name] = {"method": sub.method, "in_features": sub.in_features,
                            "out_features": sub.out_features, "bias": sub.bias is not None,
                            "extra": sub.extra_config()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": st.config.method,
        "bits": str(st.config.bits),
        "group_size": str(getattr(st.config, "group_size", "")),
        "config": json.dumps(st.config.to_dict()),
        "layers": json.dumps(layers),
        "kept": json.dumps(st.report.kept),
        "quantized": json.dumps(st.report.quantized),
        "precision": json.dumps(st.report.precision),
        "calibrated": json.dumps(st.report.calibrated),
        "errors": json.dumps(st.report.errors),
        "aliases": json.dumps(aliases),
        "model_class": type(module).__name__,
        "checksum": checksum(tensors),
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise QuantFileError(f"no such quantized-model file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several error types for damaged headers / data
        raise QuantFileError(f"{path} is not a readable safetensors file (corrupted or truncated?): {exc}") from exc
    if meta.get("format") != FORMAT:
        raise QuantFileError(f"{path} is not a hasten quantized-model file (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise QuantFileError(f"{path} has format version {meta.get('version')!r}; this hasten reads {VERSION!r}")
    if checksum(tensors) != meta.get("checksum"):
        raise QuantFileError(f"{path} is corrupted: the SHA-256 of its tensors does not match the one saved "
                             "with it")
    return meta, tensors


def load_quantized(module: nn.Module, path: str | os.PathLike) -> QuantReport:
    """Load a file written by :func:`save_quantized` into ``module`` (the same, unquantized architecture).

    The quantized layers are rebuilt from the file (no calibration) and every other parameter is
    loaded too, so outputs are bit-identical to the module that was saved. Returns its report.
    """
    path = os.fspath(path)
    meta, tensors = _read(path)
    if quant_state(module) is not None:
        raise ValueError("module is already quantized; call hasten.dequantize_(module) before loading")
    config = config_from_dict(json.loads(meta["config"]))
    layers: dict[str, dict[str, Any]] = json.loads(meta["layers"])
    aliases: dict[str, str] = json.loads(meta.get("aliases", "{}"))
    for key, src in aliases.items():
        tensors[key] = tensors[src]
    where = f"{path} (saved from a {meta.get('model_class')})"
    # check the architecture first, so a mismatched file leaves the module untouched
    targets: dict[str, nn.Linear] = {}
    for name, info in layers.items():
        try:
            lin = module.get_submodule(name)
        except AttributeError:
            raise QuantFileError(f"{where} does not match this {type(module).__name__}: it has no layer "
                                 f"{name!r}") from None
        if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (
                info["in_features"], info["out_features"]):
            got = (f"{lin.in_features}->{lin.out_features}" if isinstance(lin, nn.Linear)
                   else type(lin).__name__)
            raise QuantFileError(f"{where} does not match this {type(module).__name__}: layer {name!r} is "
                                 f"{got}, the file has {info['in_features']}->{info['out_features']}")
        targets[name] = lin
    expected = set(module.state_dict()) - {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    expected |= {k for k in tensors if any(k.startswith(n + ".") for n in layers)}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise QuantFileError(f"{where} does not match this {type(module).__name__}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")

    originals: dict[str, nn.Module] = {}
    devices: dict[str, torch.device] = {}
    for name, info in layers.items():
        lin = targets[name]
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        cls = LINEARS[info["method"]]
        bias_dtype = lin.bias.dtype if lin.bias is not None else torch.float32
        ql = cls.empty(info["in_features"], info["out_features"], info["bias"], bias_dtype, info["extra"], sub)
        device = lin.weight.device
        ql = ql.to(device)
        parent_path, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, attr, ql)
        devices[name] = device
        if config.restorable:
            originals[name] = lin
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in layers)}
    missing_keys, unexpected = module.load_state_dict(rest, strict=False)
    bad = [k for k in missing_keys if not any(k.startswith(n + ".") for n in layers)]
    if bad or unexpected:  # pragma: no cover - guarded by the key check above
        raise QuantFileError(f"{where}: state dict mismatch, missing {bad[:5]}, unexpected {unexpected[:5]}")
    report = QuantReport(method=config.method, quantized=json.loads(meta.get("quantized", "null")) or list(layers),
                         kept=json.loads(meta["kept"]), errors=json.loads(meta["errors"]),
                         calibrated=bool(json.loads(meta.get("calibrated", "true"))),
                         precision=json.loads(meta.get("precision", "{}")))
    report.memory_after = weight_memory(module)
    setattr(module, STATE_ATTR, QuantState(config, report, originals, devices))
    return report
