"""Save a quantized module to safetensors with its quantization metadata, and load it back without
recalibration (bit-identical outputs).

The file holds the packed tensors of every quantized layer (``<layer>.qweight``, ``.scale``, ...), every
other tensor of the module's state dict, the method and settings, per-layer shapes and settings, the
kept layers, the model's class and config, and one SHA-256 over every tensor *and* every metadata entry.
Loading is all or nothing: the file is read, checksummed and checked in full against the target module
(layer names, shapes, dtypes, per-layer settings, the model's config) before the module is touched;
anything wrong raises :class:`~hasten.errors.QuantFileError` and leaves the module exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from ..errors import QuantFileError
from .base import FLOAT_DTYPES, QuantConfig, QuantLinear, check_shape, is_quant_linear, is_quant_weight
from .int4 import Int4WeightOnlyConfig, Int4WeightOnlyLinear
from .int8 import Int8WeightOnlyConfig, Int8WeightOnlyLinear
from .quantize import QuantReport, QuantState, install_quant_state, log_report, quant_state, weight_memory
from .w8a8 import W8A8Config, W8A8Linear

FORMAT = "hasten-quant"
VERSION = "2"
CONFIGS: dict[str, type[QuantConfig]] = {c.method: c for c in (Int8WeightOnlyConfig, Int4WeightOnlyConfig, W8A8Config)}
LINEARS: dict[str, type[QuantLinear]] = {c.method: c for c in (Int8WeightOnlyLinear, Int4WeightOnlyLinear, W8A8Linear)}

__all__ = ["CONFIGS", "LINEARS", "QuantFileError", "checksum", "config_from_dict", "load_quantized",
           "save_quantized"]


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name), then over every
    metadata entry but ``checksum`` itself."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """The config saved as ``d`` (``QuantFileError`` if it is not a valid one)."""
    if not isinstance(d, dict):
        raise QuantFileError(f"quantization config must be a JSON object, got {type(d).__name__}")
    cls = CONFIGS.get(d.get("method", ""))
    if cls is None:
        raise QuantFileError(f"unknown quantization method {d.get('method')!r}; known: {sorted(CONFIGS)}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise QuantFileError(f"invalid quantization settings: {exc}") from exc


def _model_config(module: nn.Module) -> dict[str, Any] | None:
    """The model's public config (diffusers' ``module.config``) as plain JSON data, or None."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "items"):
        return None
    try:
        return json.loads(json.dumps({k: v for k, v in cfg.items() if not str(k).startswith("_")},
                                     sort_keys=True, default=str))
    except (TypeError, ValueError):
        return None


def save_quantized(module: nn.Module, path: str | os.PathLike) -> None:
    """Write a module quantized by :func:`hasten.quantize_` (or loaded by :func:`load_quantized`) to
    ``path`` (safetensors)."""
    from safetensors.torch import save_file

    st = quant_state(module)
    if st is None:
        raise ValueError("module is not quantized by hasten; call hasten.quantize_(module, config) first")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, sub in module.named_modules():
        if not is_quant_linear(sub):
            continue
        if not is_quant_weight(sub.weight):
            raise QuantFileError(f"layer {name!r}'s weight was replaced by a float tensor after quantization; "
                                 "cannot save it as quantized")
        inner = sub.weight.tensors()
        for key, t in inner.items():
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous().clone()
        if sub.bias is not None:
            tensors[f"{name}.bias"] = sub.bias.detach().cpu().contiguous().clone()
        layers[name] = {"method": sub.method, "in_features": sub.in_features, "out_features": sub.out_features,
                        "bias": sub.bias is not None, "extra": sub.extra_config(), "tensors": sorted(inner),
                        "dtype": str(sub.weight.dtype).removeprefix("torch.")}
    ptrs: dict[tuple[int, int, tuple], str] = {}
    aliases: dict[str, str] = {}
    for key, t in module.state_dict().items():
        if key.rpartition(".")[0] in layers:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ident is not None and ident in ptrs:
            aliases[key] = ptrs[ident]
            continue
        if ident is not None:
            ptrs[ident] = key
        tensors[key] = t.detach().cpu().contiguous().clone()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": st.config.method,
        "bits": str(st.config.bits),
        "config": json.dumps(st.config.to_dict()),
        "layers": json.dumps(layers),
        "kept": json.dumps(st.report.kept),
        "quantized": json.dumps(st.report.quantized),
        "precision": json.dumps(st.report.precision),
        "calibrated": json.dumps(st.report.calibrated),
        "errors": json.dumps(st.report.errors),
        "aliases": json.dumps(aliases),
        "model_class": type(module).__name__,
        "model_config": json.dumps(_model_config(module)),
    }
    meta["checksum"] = checksum(tensors, meta)
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
        raise QuantFileError(f"{path} has format version {meta.get('version')!r}; this hasten reads {VERSION!r} "
                             "(re-save it with hasten.save_quantized)")
    if checksum(tensors, meta) != meta.get("checksum"):
        raise QuantFileError(f"{path} is corrupted: the SHA-256 of its tensors and metadata does not match the "
                             "one saved with it")
    return meta, tensors


def _json(meta: dict[str, str], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    try:
        value = json.loads(meta[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise QuantFileError(f"{where}: metadata entry {key!r} is missing or not valid JSON") from exc
    if not isinstance(value, kind):
        raise QuantFileError(f"{where}: metadata entry {key!r} has the wrong JSON type ({type(value).__name__})")
    return value


def _str_map(d: dict, key: str, where: str, value_kind: type | tuple[type, ...] = str) -> dict:
    if not all(isinstance(k, str) and isinstance(v, value_kind) and not isinstance(v, bool) for k, v in d.items()):
        raise QuantFileError(f"{where}: metadata entry {key!r} has entries of the wrong type")
    return d


def _dtype(name: Any) -> torch.dtype | None:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


def load_quantized(module: nn.Module, path: str | os.PathLike) -> QuantReport:
    """Load a file written by :func:`save_quantized` into ``module`` (the same, unquantized architecture).

    The quantized layers are rebuilt from the file (no calibration) and every other parameter is
    loaded too, so outputs are bit-identical to the module that was saved. All or nothing: everything is
    checked before the module is touched. :func:`hasten.dequantize_` afterwards puts the module back
    exactly as it was before the load. Returns the report.
    """
    path = os.fspath(path)
    meta, tensors = _read(path)
    if quant_state(module) is not None:
        raise ValueError("module is already quantized; call hasten.dequantize_(module) before loading")
    where = f"{path} (saved from a {meta.get('model_class')})"
    mismatch = f"{where} does not match this {type(module).__name__}"
    config = config_from_dict(_json(meta, "config", dict, where))
    if config.method != meta.get("method"):
        raise QuantFileError(f"{where}: method {meta.get('method')!r} disagrees with its config ({config.method!r})")
    layers: dict[str, Any] = _json(meta, "layers", dict, where)
    aliases = _str_map(_json(meta, "aliases", dict, where), "aliases", where)
    kept = _str_map(_json(meta, "kept", dict, where), "kept", where)
    precision = _str_map(_json(meta, "precision", dict, where), "precision", where)
    errors = _str_map(_json(meta, "errors", dict, where), "errors", where, (int, float))
    quantized = _json(meta, "quantized", list, where)
    calibrated = _json(meta, "calibrated", bool, where)
    if not all(isinstance(n, str) and n in layers for n in quantized):
        raise QuantFileError(f"{where}: its list of quantized layers names layers it does not hold")
    if not all(n in layers for n in precision):
        raise QuantFileError(f"{where}: its mixed-precision layers are not among the layers it holds")
    if meta.get("model_class") != type(module).__name__:
        raise QuantFileError(f"{mismatch}: the file was saved from a {meta.get('model_class')!r}")
    saved_cfg, own_cfg = _json(meta, "model_config", (dict, type(None)), where), _model_config(module)
    if saved_cfg is not None and own_cfg is not None and saved_cfg != own_cfg:
        diff = sorted(k for k in set(saved_cfg) | set(own_cfg) if saved_cfg.get(k) != own_cfg.get(k))
        shown = ", ".join(f"{k}: file {saved_cfg.get(k)!r} vs model {own_cfg.get(k)!r}" for k in diff[:4])
        raise QuantFileError(f"{mismatch}: the model configs differ ({shown})")
    for key, src in aliases.items():
        if src not in tensors or key in tensors:
            raise QuantFileError(f"{where}: tensor alias {key!r} -> {src!r} is invalid")
        tensors[key] = tensors[src]

    # 1. every quantized layer: a matching nn.Linear in the module, and valid packed tensors
    built: dict[str, QuantLinear] = {}
    layer_keys: set[str] = set()
    for name, info in layers.items():
        if not isinstance(info, dict) or info.get("method") not in LINEARS:
            raise QuantFileError(f"{where}: layer {name!r} has no valid method (known: {sorted(LINEARS)})")
        fin, fout, has_bias = info.get("in_features"), info.get("out_features"), info.get("bias")
        extra, names = info.get("extra"), info.get("tensors")
        if not (isinstance(fin, int) and isinstance(fout, int) and fin > 0 and fout > 0
                and isinstance(has_bias, bool) and isinstance(extra, dict) and isinstance(names, list)):
            raise QuantFileError(f"{where}: layer {name!r} has malformed metadata")
        try:
            lin = module.get_submodule(name) if name else None
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or is_quant_linear(lin):
            raise QuantFileError(f"{mismatch}: it has no plain nn.Linear {name!r} "
                                 f"(found {type(lin).__name__ if lin is not None else 'nothing'})")
        if (lin.in_features, lin.out_features) != (fin, fout) or (lin.bias is not None) != has_bias:
            raise QuantFileError(f"{mismatch}: layer {name!r} is {lin.in_features}->{lin.out_features} "
                                 f"(bias {lin.bias is not None}), the file has {fin}->{fout} (bias {has_bias})")
        cls = LINEARS[info["method"]]
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        allowed = set(cls.weight_class.inner_names) | {"bias"}
        if set(sub) - allowed or sorted(set(sub) - {"bias"}) != sorted(names):
            raise QuantFileError(f"{where}: layer {name!r} holds tensors {sorted(sub)}, expected {sorted(names)} "
                                 f"(+ bias) out of {sorted(allowed)}")
        bias = sub.pop("bias", None)
        try:
            cls.check_tensors(fin, fout, extra, sub)
            if has_bias:
                check_shape("bias", bias, (fout,), FLOAT_DTYPES)
            elif bias is not None:
                raise ValueError("has a bias tensor but its metadata says it has none")
        except ValueError as exc:
            raise QuantFileError(f"{where}: layer {name!r} is invalid: {exc}") from exc
        device, dtype = lin.weight.device, lin.weight.dtype
        if bias is not None and lin.bias is not None:
            bias = bias.to(lin.bias.dtype)
        built[name] = cls.from_tensors({k: v.to(device) for k, v in sub.items()}, extra, dtype,
                                       None if bias is None else bias.to(device))
        built[name].train(lin.training)
        layer_keys |= {prefix + k for k in (*sub, *(["bias"] if bias is not None else []))}

    # 2. every other tensor: the same keys and shapes as the module's own state dict
    own = module.state_dict()
    expected = {k for k in own if k.rpartition(".")[0] not in layers}
    rest = {k: v for k, v in tensors.items() if k not in layer_keys}
    missing, extra_keys = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or extra_keys:
        raise QuantFileError(f"{mismatch}: missing {missing[:5]}, unexpected {extra_keys[:5]}")
    for key, value in rest.items():
        mine = own[key]
        if tuple(value.shape) != tuple(mine.shape):
            raise QuantFileError(f"{mismatch}: {key} has shape {tuple(value.shape)} in the file, "
                                         f"{tuple(mine.shape)} in the model")
        if value.is_floating_point() != mine.is_floating_point() or (
                not mine.is_floating_point() and value.dtype != mine.dtype):
            raise QuantFileError(f"{mismatch}: {key} has dtype {value.dtype} in the file, {mine.dtype} in the model")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in errors.values()):
        raise QuantFileError(f"{where}: metadata entry 'errors' holds non-finite values")
    params = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    unloadable = sorted(set(rest) - set(params))
    if unloadable:
        raise QuantFileError(f"{mismatch}: state-dict entries that are no parameter or buffer: {unloadable[:5]}")

    # 3. apply (nothing above touched the module)
    targets = {name: module.get_submodule(name) for name in built}
    live = {k: params[k] for k in rest}
    backup = {k: t.detach().to("cpu", copy=True) for k, t in live.items()} if config.restorable else {}
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(rest[key])
    originals: dict[str, nn.Module] = {}
    devices: dict[str, torch.device] = {}
    for name, ql in built.items():
        parent_path, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, attr, ql)
        devices[name] = targets[name].weight.device
        if config.restorable:
            originals[name] = targets[name]
    report = QuantReport(method=config.method, quantized=list(quantized), kept=kept, errors=errors,
                         calibrated=calibrated, precision=precision)
    report.memory_after = weight_memory(module)
    install_quant_state(module, QuantState(config, report, originals, devices, backup))
    log_report(report, f"{type(module).__name__} loaded from {path}")
    return report
