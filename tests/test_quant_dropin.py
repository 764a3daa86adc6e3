"""Quantized linears are drop-in ``nn.Linear`` replacements (``.weight``, ``forward(input=...)``,
``isinstance``), quantization says what it did (zero layers is an error), configs are validated, and
quantized checkpoints load all or nothing (every metadata bit flip refused with the model untouched)."""

from __future__ import annotations

import copy
import json
import logging
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hasten
from hasten.errors import QuantFileError, UnsupportedModelError
from hasten.quant import (
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    QuantWeight,
    W8A8Config,
    dequantize_,
    load_quantized,
    quantize_,
    save_quantized,
)

D = 64
METHODS = [Int8WeightOnlyConfig(keep_budget=0), Int4WeightOnlyConfig(group_size=16, keep_budget=0),
           W8A8Config(keep_budget=0)]
IDS = ["int8", "int4", "w8a8"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class WeightReader(nn.Module):
    """Model code of the kinds that broke on quantized layers: reads ``linear.weight`` (dtype for a cast,
    the tensor itself in F.linear — ComfyUI's Wan feed-forward, HunyuanDiT, Z-Image), calls
    ``proj_in(input=...)`` (AnimateDiff) and finds its linears with ``isinstance``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(D, D)
        self.ff = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.proj_out = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj_in.weight.dtype)
        h = self.proj_in(input=x)
        up = self.ff[0]
        h = F.linear(h, up.weight, up.bias)  # ComfyUI's Wan FFN: the weight tensor itself
        h = self.ff[2](self.ff[1](h))
        assert all(isinstance(m, nn.Linear) for m in (self.proj_in, self.ff[0], self.ff[2], self.proj_out))
        return self.proj_out(h) + h @ self.proj_out.weight.t() * 0.1  # the weight in a plain matmul


def _x(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", METHODS, ids=IDS)
def test_quantized_layers_are_drop_in(config):
    model = WeightReader().eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        before = hasten.weight_memory(model)
        rep = quantize_(model, config, calibration=lambda: model(x))
        assert len(rep.quantized) == 4
        y = model(x)
    assert 0 < rel(y, ref) < (0.2 if config.method == "int4_weight_only" else 0.02)  # 4 random layers in a row
    lin = model.ff[0]
    w = lin.weight
    assert isinstance(lin, nn.Linear) and isinstance(w, QuantWeight) and isinstance(w, nn.Parameter)
    assert w.shape == (2 * D, D) and w.dtype == torch.float32 and w.device.type == "cpu"
    assert w.nbytes < 0.3 * w.numel() * 4  # packed bytes, not float32 bytes
    assert hasten.weight_memory(model).bytes < 0.5 * before.bytes  # memory stays quantized
    # F.linear on the weight runs the quantized kernel: identical to the layer's own forward
    with torch.no_grad():
        assert torch.equal(F.linear(x, w, lin.bias), lin(x)) and torch.equal(lin(input=x), lin(x))
        # any other op sees the dequantized weight
        assert torch.allclose(w.t().t(), w.dequantize()) and torch.allclose(w * 1.0, w.dequantize())
        if config.method != "w8a8":  # weight-only: x @ W_hat^T is exactly what the layer computes
            assert torch.allclose(x @ w.t() + lin.bias, lin(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="read-only"):
        w.add_(1.0)
    # dtype / device moves keep it quantized; deepcopy too
    m2 = copy.deepcopy(model)
    assert isinstance(m2.ff[0].weight, QuantWeight) and m2.ff[0].weight.qweight is not w.qweight
    with torch.no_grad():
        assert torch.equal(m2(x), y)
        m2.to(torch.bfloat16)
        assert isinstance(m2.ff[0].weight, QuantWeight) and m2.ff[0].weight.dtype == torch.bfloat16
        yb = m2(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel(yb, y) < 0.05
    assert dequantize_(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_root_exports_new_names():
    assert hasten.quant.QuantWeight is QuantWeight and hasten.errors.QuantFileError is QuantFileError
    assert hasten.quant.QuantFileError is QuantFileError


def test_zero_layers_is_an_error_and_counts_are_logged(caplog):
    model = nn.Sequential(nn.Linear(40, 8))
    with pytest.raises(UnsupportedModelError, match="no linear layer could be quantized"):
        quantize_(model, Int4WeightOnlyConfig(group_size=32))
    assert type(model[0]) is nn.Linear and not hasattr(model, "_hasten_quant")
    with pytest.raises(UnsupportedModelError, match="excluded by config"):
        quantize_(model, Int8WeightOnlyConfig(exclude=(".*",)))
    with caplog.at_level(logging.INFO, logger="hasten"):
        quantize_(model, "int8")
    assert "1 linear layers quantized, 0 kept" in caplog.text


@pytest.mark.parametrize("bad,exc,match", [
    (dict(keep_patterns="time"), TypeError, "keep_patterns must be a list or tuple"),
    (dict(exclude="ff"), TypeError, "exclude must be a list or tuple"),
    (dict(keep_budget=float("nan")), ValueError, "finite"),
    (dict(keep_budget=True), TypeError, "keep_budget"),
    (dict(keep_min_error=float("inf")), ValueError, "finite"),
    (dict(sample_rows=2.5), TypeError, "sample_rows must be an integer"),
    (dict(restorable="no"), TypeError, "restorable must be True or False"),
    (dict(awq_grid=1.5), TypeError, "awq_grid must be an integer"),
])
def test_config_types_checked(bad, exc, match):
    with pytest.raises(exc, match=match):
        Int8WeightOnlyConfig(**bad)


def test_config_types_checked_per_method():
    with pytest.raises(TypeError, match="group_size must be an integer"):
        Int4WeightOnlyConfig(group_size=64.0)
    with pytest.raises(ValueError, match="finite"):
        W8A8Config(smooth_alpha=float("nan"))
    with pytest.raises(ValueError, match="fallback_ratio"):
        W8A8Config(fallback_ratio=float("nan"))
    with pytest.raises(ValueError, match="unknown quantization method 'int2'"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), "int2")
    assert hasten.quant.as_config("INT4").group_size == 128 and hasten.quant.as_config("w8a8").method == "w8a8"


# ------------------------------------------------------------------ quantized checkpoints, all or nothing


class Tiny(nn.Module):
    """A small model with a config (as diffusers models have) and a non-linear parameter."""

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = {"in_channels": in_channels, "dim": 32}
        self.conv = nn.Conv1d(in_channels, 32, 1)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.a(self.conv(x).transpose(1, 2))))


def _tx() -> torch.Tensor:
    return torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))


def _snapshot(model: nn.Module) -> dict:
    return {"types": {n: type(m) for n, m in model.named_modules()},
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _untouched(model: nn.Module, snap: dict, ref: torch.Tensor) -> None:
    assert {n: type(m) for n, m in model.named_modules()} == snap["types"]
    assert not hasattr(model, "_hasten_quant")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["state"][k]), k
    with torch.no_grad():
        assert torch.equal(model(_tx()), ref)


def _saved(tmp_path, config=None):
    model = Tiny().eval()
    with torch.no_grad():
        quantize_(model, config or Int4WeightOnlyConfig(group_size=16, keep_budget=0), calibration=lambda: model(_tx()))
        out = model(_tx())
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    return path, out


def _header(raw: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def test_every_metadata_bit_flip_is_refused_and_model_untouched(tmp_path):
    path, _ = _saved(tmp_path)
    raw = path.read_bytes()
    n, header = _header(raw)
    start = raw.index(b'"__metadata__"', 8, 8 + n)
    end = start + len(json.dumps({"__metadata__": header["__metadata__"]}, separators=(",", ":")))
    target = Tiny().eval()
    snap = _snapshot(target)
    with torch.no_grad():
        ref = target(_tx())
    flipped = tmp_path / "flip.safetensors"
    buf = bytearray(raw)
    span = range(start, min(end, 8 + n))
    # one bit of every metadata byte (rotating through the 8 positions), and all 8 bits of 64 random bytes
    # (every bit of every byte was checked once: 10.7k loads, all refused; this keeps the test ~10 s)
    g = torch.Generator().manual_seed(0)
    sample = {span[int(j)] for j in torch.randint(len(span), (64,), generator=g)}
    flips = [(i, i % 8) for i in span] + [(i, b) for i in sorted(sample) for b in range(8)]
    for i, bit in flips:
        buf[i] ^= 1 << bit
        flipped.write_bytes(buf)
        buf[i] ^= 1 << bit
        with pytest.raises(QuantFileError):
            load_quantized(target, flipped)
    _untouched(target, snap, ref)
    assert len(span) > 500


def test_tampered_but_checksummed_metadata_is_validated(tmp_path):
    """A file whose checksum was recomputed after editing (so only validation can catch it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hasten.quant.serialize import checksum

    path, out = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def write(meta2, tensors2=tensors):
        meta2 = dict(meta2)
        meta2["checksum"] = checksum(tensors2, meta2)
        p = tmp_path / "t.safetensors"
        save_file(tensors2, str(p), metadata=meta2)
        return p

    layers = json.loads(meta["layers"])
    cases = {}
    bad = copy.deepcopy(layers)
    bad["a"]["extra"]["group_size"] = 8  # the packed scales are for 16
    cases["group_size"] = (dict(meta, layers=json.dumps(bad)), "shape")
    bad = copy.deepcopy(layers)
    bad["a"]["extra"]["group_size"] = 7
    cases["odd group"] = (dict(meta, layers=json.dumps(bad)), "group_size")
    bad = copy.deepcopy(layers)
    bad["zz"] = bad["a"]
    cases["unknown layer"] = (dict(meta, layers=json.dumps(bad)), "no plain nn.Linear 'zz'")
    bad = copy.deepcopy(layers)
    bad["a"]["method"] = "int3"
    cases["method"] = (dict(meta, layers=json.dumps(bad)), "no valid method")
    bad = copy.deepcopy(layers)
    bad["b"]["bias"] = True
    cases["bias"] = (dict(meta, layers=json.dumps(bad)), "bias")
    cases["config"] = (dict(meta, config=json.dumps({"method": "int4_weight_only", "group_size": "x"})), "settings")
    cases["model class"] = (dict(meta, model_class="Other"), "saved from a 'Other'")
    cases["quantized list"] = (dict(meta, quantized=json.dumps(["nope"])), "quantized layers")
    target = Tiny().eval()
    snap = _snapshot(target)
    with torch.no_grad():
        ref = target(_tx())
    for _what, (m, match) in cases.items():
        with pytest.raises(QuantFileError, match=match):
            load_quantized(target, write(m))
        _untouched(target, snap, ref)
    # a checksummed file is loaded bit-identically
    load_quantized(target, write(meta))
    with torch.no_grad():
        assert torch.equal(target(_tx()), out)


def test_mismatched_model_refused_by_config_and_shapes(tmp_path):
    path, _ = _saved(tmp_path)
    other = Tiny(in_channels=6).eval()
    snap = _snapshot(other)
    x6 = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = other(x6)
    with pytest.raises(QuantFileError, match="in_channels: file 4 vs model 6"):
        load_quantized(other, path)
    other.config = {"in_channels": 4, "dim": 32}  # config agrees, weights do not: refused by shape
    with pytest.raises(QuantFileError, match=r"conv.weight has shape"):
        load_quantized(other, path)
    assert {n: type(m) for n, m in other.named_modules()} == snap["types"]
    assert all(torch.equal(v, snap["state"][k]) for k, v in other.state_dict().items())
    with torch.no_grad():
        assert torch.equal(other(x6), ref)


def test_load_then_dequantize_restores_the_model_before_the_load(tmp_path):
    path, out = _saved(tmp_path)
    target = Tiny().eval()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.5)  # weights that differ from the file's
        ref = target(_tx())
    snap = _snapshot(target)
    load_quantized(target, path)
    with torch.no_grad():
        assert torch.equal(target(_tx()), out)
    assert dequantize_(target)
    _untouched(target, snap, ref)
    # restorable=False: the originals are unknown, dequantize says so
    path2, _ = _saved(tmp_path, Int8WeightOnlyConfig(restorable=False))
    t2 = Tiny().eval()
    load_quantized(t2, path2)
    with pytest.raises(ValueError, match="restorable=False"):
        dequantize_(t2)
