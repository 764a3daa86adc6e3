"""The "Quantize Model (hasten)" node in the real ComfyUI engine (in-process) on tiny Wan 2.1."""

from __future__ import annotations

import sys

import pytest
import torch

import comfy_env as ce

STEPS = 6


@pytest.fixture(scope="module")
def wan(comfy):
    model = ce.tiny_wan()
    base = ce.run_ksampler(comfy, model, "wan", steps=STEPS)
    return model, base


def _node(comfy):
    return comfy.node_classes["HastenQuantize"]


def _patch(comfy, model, method, group=64, keep=0.05, calibration_file=""):
    """Run the node; returns (patched MODEL, stats text)."""
    res = _node(comfy).execute(model=model, method=method, group_size=group, keep_budget=keep,
                               calibration_file=calibration_file)
    return res.result[0], res.result[-1]


def _module(comfy):
    return sys.modules[_node(comfy).__module__]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_node_registered(comfy):
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["HastenQuantize"] == "Quantize Model (hasten)"


@pytest.mark.parametrize("method,group,bound", [("int8_weight_only", 64, 0.01), ("int4_weight_only", 64, 0.1),
                                                ("w8a8", 64, 0.05)])
def test_quantized_sampling_close_and_original_restored(comfy, wan, method, group, bound):
    model, base = wan
    dm = model.model.diffusion_model
    linears_before = {n: m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)}
    patched, text = _patch(comfy, model, method, group)
    rep = _module(comfy).report(patched)
    assert rep.method == method and len(rep.quantized) > 10
    assert f"{len(rep.quantized)} linear layers quantized" in text and "bf16" in text
    assert any(k.startswith("time_embedding") and v.startswith("rule") for k, v in rep.kept.items())
    assert any(k.startswith("time_projection") and v.startswith("rule") for k, v in rep.kept.items())
    # quantized layers plus, for int4 / W8A8, the kept layers stored as int8 weight-only
    assert {k for k in patched.object_patches} == {f"diffusion_model.{n}" for n in [*rep.quantized, *rep.precision]}
    assert bool(rep.precision) == (method != "int8_weight_only")
    seen: list[str] = []
    name = rep.quantized[0]
    layer = patched.object_patches[f"diffusion_model.{name}"]
    h = layer.register_forward_pre_hook(lambda *a: seen.append(name))
    out = ce.run_ksampler(comfy, patched, "wan", steps=STEPS)
    h.remove()
    assert len(seen) >= STEPS  # the quantized layer really ran (ComfyUI batches cond + uncond per step)
    err = _rel(out, base)
    assert 0 < err < bound, err
    # sampling the original MODEL unpatches the clone: the same layer objects are back, output bit-identical
    assert torch.equal(ce.run_ksampler(comfy, model, "wan", steps=STEPS), base)
    assert {n: m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)} == linears_before


def test_calibration_file(comfy, wan, tmp_path):
    from hasten.quant import record_activations

    model, base = wan
    dm = model.model.diffusion_model
    with record_activations(dm) as result:
        ce.run_ksampler(comfy, model, "wan", steps=2)
    calib = result()
    assert len(calib) > 10
    path = tmp_path / "calib.safetensors"
    calib.save(str(path))
    patched, _ = _patch(comfy, model, "int4_weight_only", 64, 0.05, str(path))
    rep = _module(comfy).report(patched)
    assert rep.calibrated
    out = ce.run_ksampler(comfy, patched, "wan", steps=STEPS)
    assert 0 < _rel(out, base) < 0.1
    with pytest.raises(FileNotFoundError, match="no calibration file"):
        _patch(comfy, model, "int8_weight_only", 64, 0.05, str(tmp_path / "missing.safetensors"))


def test_unsupported_model_is_refused(comfy):
    class NotAModel:
        model = object()

    with pytest.raises(ValueError, match="needs a ComfyUI diffusion MODEL"):
        _patch(comfy, NotAModel(), "int8_weight_only")


def test_layers_are_drop_in_for_code_reading_weight(comfy, wan):
    """ComfyUI's Wan feed-forward reads ``linear.weight`` (comfy/ops.py ``linear_input_act`` since 2026-08):
    a quantized layer keeps a ``.weight`` that F.linear runs through the quantized kernel."""
    import torch.nn.functional as F

    model, _ = wan
    patched, _ = _patch(comfy, model, "int8_weight_only")
    rep = _module(comfy).report(patched)
    name = next(n for n in rep.quantized if ".ffn." in n)
    layer = patched.object_patches[f"diffusion_model.{name}"]
    w = layer.weight
    assert isinstance(layer, torch.nn.Linear) and w.shape == (layer.out_features, layer.in_features)
    assert w.nbytes < 0.3 * w.numel() * 4  # still quantized in memory
    x = torch.randn(3, layer.in_features)
    assert torch.equal(F.linear(x, w, layer.bias), layer(x)) and torch.equal(layer(input=x), layer(x))


def test_second_node_quantizes_the_original_weights(comfy, wan):
    """After a quantized run ComfyUI keeps the quantized layers patched into the shared model; a second
    Quantize node on the same MODEL (and one chained after the first) must plan on the ORIGINAL layers."""
    model, base = wan
    dm = model.model.diffusion_model
    first, _ = _patch(comfy, model, "int8_weight_only")
    out1 = ce.run_ksampler(comfy, first, "wan", steps=STEPS)  # leaves the quantized layers patched in
    rep1 = _module(comfy).report(first)
    assert any(type(m).__name__ == "Int8WeightOnlyLinear" for m in dm.modules())  # still patched in
    again, _ = _patch(comfy, model, "int8_weight_only")
    rep2 = _module(comfy).report(again)
    assert rep2.quantized == rep1.quantized and rep2.kept == rep1.kept and len(rep2.quantized) > 10
    assert rep2.memory_after.quant_bytes == rep1.memory_after.quant_bytes < 0.6 * rep1.memory_before.bf16_bytes
    assert rep2.memory_before.quant_bytes == rep1.memory_before.quant_bytes == rep1.memory_before.bf16_bytes
    for name in rep1.quantized:  # built from the same original weights: identical packed data
        key = f"diffusion_model.{name}"
        assert torch.equal(again.object_patches[key].weight.qweight, first.object_patches[key].weight.qweight)
    assert torch.equal(ce.run_ksampler(comfy, again, "wan", steps=STEPS), out1)
    chained, _ = _patch(comfy, first, "int8_weight_only")  # Quantize -> Quantize: replaces, never stacks
    assert set(chained.object_patches) == set(first.object_patches)
    assert torch.equal(ce.run_ksampler(comfy, chained, "wan", steps=STEPS), out1)
    w4, _ = _patch(comfy, first, "int4_weight_only", 64)
    assert all(type(w4.object_patches[f"diffusion_model.{n}"]).__name__ == "Int4WeightOnlyLinear"
               for n in _module(comfy).report(w4).quantized)
    assert 0 < _rel(ce.run_ksampler(comfy, w4, "wan", steps=STEPS), base) < 0.1
    assert torch.equal(ce.run_ksampler(comfy, model, "wan", steps=STEPS), base)


def test_zero_quantized_layers_is_a_node_error(comfy, wan):
    model, _ = wan
    # no linear of tiny Wan (in_features 128, 256, 4096) is a multiple of 1000: nothing could be int4
    with pytest.raises(ValueError, match=r"Quantize Model \(hasten\): no linear layer could be quantized"):
        _patch(comfy, model, "int4_weight_only", 1000)
    with pytest.raises(ValueError, match="unknown quantization method"):
        _patch(comfy, model, "int2")
