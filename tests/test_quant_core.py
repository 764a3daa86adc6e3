"""hasten.quant core on small random models: error bounds per method, int4 packing, AWQ, sensitive-layer
selection, weight-bytes ratios, save/load (bit-identical, corruption refused), exact restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hasten
from hasten import UnsupportedModelError
from hasten.kernels.quant_gemm import pack_int4, unpack_int4
from hasten.quant import (
    Int4WeightOnlyConfig,
    Int4WeightOnlyLinear,
    Int8WeightOnlyConfig,
    Int8WeightOnlyLinear,
    QuantFileError,
    W8A8Config,
    W8A8Linear,
    calibrate,
    dequantize_,
    load_quantized,
    quant_report,
    quantize_,
    record_activations,
    save_quantized,
    weight_memory,
)

D = 256


def mlp(seed: int = 0, dim: int = D, layers: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(dim, dim))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods).eval()


def inputs(n: int = 64, outliers: bool = True, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    if outliers:
        x[:, :4] *= 20.0  # a few activation outlier channels, as in DiT linears
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def single(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, D)).eval()


# per-method bounds on ||y_q - y|| / ||y|| for one random 256x256 linear (measured ~1/3 of these)
BOUNDS = [
    (lambda: Int8WeightOnlyConfig(keep_budget=0), Int8WeightOnlyLinear, 0.01),
    (lambda: Int4WeightOnlyConfig(group_size=64, keep_budget=0), Int4WeightOnlyLinear, 0.15),
    (lambda: W8A8Config(keep_budget=0), W8A8Linear, 0.03),
    (lambda: W8A8Config(activation="dynamic", keep_budget=0), W8A8Linear, 0.03),
]


@pytest.mark.parametrize("make,cls,bound", BOUNDS)
@pytest.mark.parametrize("calibrated", [False, True])
def test_error_bounds(make, cls, bound, calibrated):
    model = single()
    x = inputs()
    ref = model(x)
    with torch.no_grad():
        rep = quantize_(model, make(), calibration=(lambda: model(x)) if calibrated else None)
        y = model(x)
    assert isinstance(model[0], cls)
    assert rep.quantized == ["0"] and rep.calibrated == calibrated
    err = rel(y, ref)
    assert 0 < err < bound, err


def test_int4_packing_round_trip_and_halves_bytes():
    q = torch.randint(0, 16, (7, 34), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == (q[0, 0] | (q[0, 1] << 4))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_awq_scaling_reduces_int4_error_on_outlier_activations():
    x = inputs()
    errs = {}
    for calibrated in (False, True):
        model = single()
        ref = model(x)
        with torch.no_grad():
            quantize_(model, Int4WeightOnlyConfig(group_size=64, keep_budget=0),
                      calibration=(lambda m=model: m(x)) if calibrated else None)
            errs[calibrated] = rel(model(x), ref)
        if calibrated:
            assert model[0].input_scale is not None  # AWQ chose a non-trivial per-channel scale
    assert errs[True] < 0.95 * errs[False], errs


def test_w8a8_static_scales_and_dynamic_fallback():
    x = inputs(outliers=False)
    model = mlp()
    with torch.no_grad():
        quantize_(model, W8A8Config(keep_budget=0, fallback_ratio=100.0), calibration=lambda: model(x))
    assert all(m.activation == "static" for m in model if isinstance(m, W8A8Linear))
    # static: one calibrated multiplier per input channel, folded scales, no per-row scale at run time
    a, row = model[0].quantize_input(x)
    assert a.dtype == torch.int8 and torch.equal(row, torch.ones_like(row))
    dequantize_(model)
    with torch.no_grad():
        quantize_(model, W8A8Config(keep_budget=0))  # no calibration: dynamic per-token everywhere
    assert all(m.activation == "dynamic" for m in model if isinstance(m, W8A8Linear))


def test_sensitive_layer_selection_picks_planted_layer():
    model = mlp(layers=5)
    with torch.no_grad():  # plant: one large weight per row of layer "4" ruins its per-row int4 scales
        w = model[4].weight
        w[torch.arange(D), torch.randint(0, D, (D,))] = 3.0
    x = inputs()
    calib = calibrate(model, lambda: model(x))
    rep = quantize_(model, Int4WeightOnlyConfig(group_size=128, keep_budget=1, keep_precision="float"),
                    calibration=calib)
    assert list(rep.kept) == ["4"] and rep.kept["4"].startswith("sensitive")
    assert isinstance(model[4], nn.Linear) and "4" not in rep.quantized and len(rep.quantized) == 4
    assert "kept 4: sensitive" in rep.summary()
    dequantize_(model)
    # default mixed precision: the kept layer is stored as int8 weight-only instead of float
    rep = quantize_(model, Int4WeightOnlyConfig(group_size=128, keep_budget=1), calibration=calib)
    assert list(rep.kept) == ["4"] and rep.precision == {"4": "int8_weight_only"}
    assert isinstance(model[4], Int8WeightOnlyLinear) and isinstance(model[0], Int4WeightOnlyLinear)


def test_timestep_and_modulation_layers_kept_by_rule():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.time_embedder = nn.Linear(32, 32)
            self.norm1 = nn.Module()
            self.norm1.linear = nn.Linear(32, 64)
            self.proj = nn.Linear(32, 32)
            self.ff = nn.Linear(32, 32)

    model = Block()
    rep = quantize_(model, Int8WeightOnlyConfig(keep_budget=0, exclude=(r"^ff$",)))
    assert rep.quantized == ["proj"]
    assert rep.kept["time_embedder"].startswith("rule") and rep.kept["norm1.linear"].startswith("rule")
    assert rep.kept["ff"].startswith("excluded")
    model2 = nn.Sequential(nn.Linear(40, 8))
    with pytest.raises(UnsupportedModelError, match="no linear layer could be quantized.*not a multiple of group_size 32"):
        quantize_(model2, Int4WeightOnlyConfig(group_size=32))
    assert isinstance(model2[0], nn.Linear) and not hasattr(model2, "_hasten_quant")  # untouched


def test_weight_bytes_ratio():
    x = inputs()
    for cfg, limit in ((Int8WeightOnlyConfig(keep_budget=0), 0.55), (Int4WeightOnlyConfig(keep_budget=0), 0.35),
                       (W8A8Config(keep_budget=0), 0.55)):
        model = mlp()
        before = weight_memory(model)
        assert before.bf16_bytes == sum(p.numel() * 2 for p in model.parameters()) and before.ratio == 1.0
        rep = quantize_(model, cfg, calibration=lambda m=model: m(x))
        mem = weight_memory(model)
        assert mem.ratio <= limit, (cfg.method, mem.ratio)
        assert mem.bf16_bytes == before.bf16_bytes and rep.memory_after.quant_bytes == mem.quant_bytes
        assert mem.bytes < before.bytes  # real bytes of the fp32 model shrink too
    packed = model[0].qweight if isinstance(model[0], Int4WeightOnlyLinear) else None
    assert packed is None or packed.numel() == D * D // 2


def test_dequantize_restores_exactly():
    model = mlp()
    x = inputs()
    ref = model(x)
    params = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in params.items()}
    for cfg in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=64), W8A8Config()):
        quantize_(model, cfg, calibration=lambda: model(x))
        assert not torch.equal(model(x), ref)
        with pytest.raises(ValueError, match="already quantized"):
            quantize_(model, cfg)
        assert dequantize_(model) is True
        assert torch.equal(model(x), ref)
        for n, p in model.named_parameters():
            assert p is params[n] and torch.equal(p, values[n])
    assert dequantize_(model) is False
    quantize_(model, Int8WeightOnlyConfig(restorable=False))
    with pytest.raises(ValueError, match="restorable=False"):
        dequantize_(model)


def test_calibration_records_stats_and_removes_hooks():
    model = mlp()
    x = inputs(n=300)
    calib = calibrate(model, lambda: (model(x[:200]), model(x[200:])), max_samples=64)
    st = calib.get("0")
    assert calib.calls == 2 and st.rows == 300 and st.samples.shape == (64, D)
    assert torch.equal(st.absmax, x.abs().amax(0))
    torch.testing.assert_close(st.mean_abs, x.abs().mean(0))
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError):  # hooks are removed even when the calibration run fails
        with record_activations(model):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_calibration_file_round_trip(tmp_path):
    model = mlp()
    x = inputs()
    calib = calibrate(model, lambda: model(x))
    calib.save(str(tmp_path / "calib.safetensors"))
    again = type(calib).load(str(tmp_path / "calib.safetensors"))
    assert torch.equal(again.get("2").samples, calib.get("2").samples) and again.get("2").rows == 64
    a, b = mlp(), mlp()
    quantize_(a, Int4WeightOnlyConfig(group_size=64), calibration=calib)
    quantize_(b, Int4WeightOnlyConfig(group_size=64), calibration=again)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("make", [lambda: Int8WeightOnlyConfig(), lambda: Int4WeightOnlyConfig(group_size=64),
                                  lambda: W8A8Config()])
def test_save_load_bit_identical(tmp_path, make):
    model = mlp()
    x = inputs()
    rep = quantize_(model, make(), calibration=lambda: model(x))
    y = model(x)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    fresh = mlp(seed=123)  # different random weights everywhere: everything must come from the file
    rep2 = load_quantized(fresh, path)
    assert torch.equal(fresh(x), y)
    assert rep2.quantized == rep.quantized and rep2.kept == rep.kept and rep2.method == rep.method
    assert [type(m) for m in fresh] == [type(m) for m in model]
    assert quant_report(fresh) is rep2
    assert dequantize_(fresh)


def test_corrupted_or_mismatched_file_refused(tmp_path):
    model = mlp()
    x = inputs()
    quantize_(model, Int8WeightOnlyConfig(), calibration=lambda: model(x))
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    raw = bytearray(path.read_bytes())
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF  # one byte of tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(QuantFileError, match="corrupted"):
        load_quantized(mlp(), tmp_path / "flip.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(QuantFileError, match="not a readable safetensors"):
        load_quantized(mlp(), tmp_path / "cut.safetensors")
    other = mlp(dim=128)
    with pytest.raises(QuantFileError, match="does not match"):
        load_quantized(other, path)
    assert all(isinstance(m, (nn.Linear, nn.GELU)) for m in other)  # left untouched
    with pytest.raises(QuantFileError, match="does not match"):
        load_quantized(mlp(layers=2), path)
    with pytest.raises(QuantFileError, match="no such"):
        load_quantized(mlp(), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(mlp(), tmp_path / "x.safetensors")


def test_config_validation_and_unsupported_models():
    with pytest.raises(ValueError, match="group_size must be even"):
        Int4WeightOnlyConfig(group_size=7)
    with pytest.raises(ValueError, match=r"smooth_alpha must be in \[0, 1\]"):
        W8A8Config(smooth_alpha=1.5)
    with pytest.raises(ValueError, match="'static', 'dynamic'"):
        W8A8Config(activation="per-channel")
    with pytest.raises(ValueError, match="keep_budget"):
        Int8WeightOnlyConfig(keep_budget=-1)
    with pytest.raises(ValueError, match="keep_precision must be one of 'float', 'int8'"):
        W8A8Config(keep_precision="fp8")
    with pytest.raises(ValueError, match="keep_precision must be 'float'"):
        Int8WeightOnlyConfig(keep_precision="int8")
    with pytest.raises(ValueError, match="regex"):
        Int8WeightOnlyConfig(keep_patterns=("(",))
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        quantize_(nn.Sequential(nn.Conv2d(3, 3, 1)), Int8WeightOnlyConfig())
    with pytest.raises(UnsupportedModelError, match="bare"):
        quantize_(nn.Linear(4, 4), Int8WeightOnlyConfig())
    with pytest.raises(TypeError, match="config must be"):
        quantize_(mlp(), {"method": "int8"})


def test_root_exports_and_half_precision():
    assert hasten.quantize_ is quantize_ and hasten.Int4WeightOnlyConfig is Int4WeightOnlyConfig
    model = mlp().to(torch.bfloat16)
    x = inputs().to(torch.bfloat16)
    ref = model(x)
    quantize_(model, Int8WeightOnlyConfig(), calibration=lambda: model(x))
    y = model(x)
    assert y.dtype == torch.bfloat16 and rel(y.float(), ref.float()) < 0.02
    dequantize_(model)
    assert torch.equal(model(x), ref)


def test_near_lossless_methods_keep_nothing_for_sensitivity():
    model = mlp(layers=5)
    x = inputs()
    rep = quantize_(model, Int8WeightOnlyConfig(keep_budget=2), calibration=lambda: model(x))
    assert rep.kept == {} and len(rep.quantized) == 5
    assert max(rep.errors.values()) < Int8WeightOnlyConfig().keep_min_error
    dequantize_(model)
    rep = quantize_(model, Int8WeightOnlyConfig(keep_budget=2, keep_min_error=0.0), calibration=lambda: model(x))
    assert len(rep.kept) == 2 and len(rep.quantized) == 3


def test_gemm_timing_helper_rows():
    from hasten.kernels.quant_gemm import time_quant_gemm

    rows = time_quant_gemm(((16, 64, 32),), device="cpu", dtype=torch.float32, repeats=1, group_size=32)
    assert [r["kernel"] for r in rows] == ["int8_weight_only", "int4_weight_only", "w8a8_gemm"]
    assert all(r["ms"] > 0 and r["baseline_ms"] > 0 and r["shape"] == "16x64x32" for r in rows)
