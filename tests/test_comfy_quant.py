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
    (patched,) = _node(comfy)().patch(model, method, group, 0.05)
    rep = _module(comfy).report(patched)
    assert rep.method == method and len(rep.quantized) > 10
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
    (patched,) = _node(comfy)().patch(model, "int4_weight_only", 64, 0.05, str(path))
    rep = _module(comfy).report(patched)
    assert rep.calibrated
    out = ce.run_ksampler(comfy, patched, "wan", steps=STEPS)
    assert 0 < _rel(out, base) < 0.1
    with pytest.raises(FileNotFoundError, match="no calibration file"):
        _node(comfy)().patch(model, "int8_weight_only", 64, 0.05, str(tmp_path / "missing.safetensors"))


def test_unsupported_model_is_refused(comfy):
    class NotAModel:
        model = object()

    with pytest.raises(ValueError, match="needs a ComfyUI diffusion MODEL"):
        _node(comfy)().patch(NotAModel(), "int8_weight_only", 64, 0.05)
