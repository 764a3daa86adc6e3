"""Quantization on a tiny diffusers Wan pipeline end to end: calibration on real sampling, output close to
the unquantized pipeline, exact restore, composition with EasyCache, save/load of the denoiser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hasten
from hasten.quant import (
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    W8A8Config,
    load_quantized,
    save_quantized,
)

import tiny_pipes as tp

STEPS = 6


@pytest.fixture(scope="module")
def wan():
    pipe, kw = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    base = tp.run(pipe, kw, steps=STEPS)
    yield pipe, kw, base
    pipe.dequantize()
    pipe.disable_easycache()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# measured relative latent errors on this tiny model: int8 ~6e-4, int4 ~7e-3, w8a8 ~2e-3
CASES = [(Int8WeightOnlyConfig(), 0.005), (Int4WeightOnlyConfig(group_size=16), 0.03), (W8A8Config(), 0.01)]


@pytest.mark.parametrize("config,bound", CASES, ids=lambda c: getattr(c, "method", ""))
def test_wan_quantized_end_to_end_close_and_restored(wan, config, bound):
    pipe, kw, base = wan
    linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    pipe.quantize(config, calibration_prompts=[dict(kw)], steps=3)
    h.remove()
    assert len(calls) == 3 * 2  # 3 calibration steps x (cond, uncond) of real sampling
    report = pipe.hasten_stats()["quant"]["transformer"]
    assert report.calibrated and report.method == config.method
    # timestep embedding / modulation layers kept by rule, plus the measured most sensitive one
    # (int4 / W8A8 store them as int8 weight-only: mixed precision; int8 leaves them in float)
    for name in ("condition_embedder.time_embedder.linear_1", "condition_embedder.time_proj"):
        assert report.kept[name].startswith("rule")
        layer = pipe.transformer.get_submodule(name)
        if config.keep_precision == "float":
            assert isinstance(layer, nn.Linear) and name not in report.precision
        else:
            assert layer.method == "int8_weight_only" and report.precision[name] == "int8_weight_only"
    # the most sensitive layer is kept when its error matters (int4), not for near-lossless 8-bit methods
    n_sensitive = sum(why.startswith("sensitive") for why in report.kept.values())
    assert n_sensitive == (1 if config.method == "int4_weight_only" else 0)
    assert max(report.errors.values()) < config.keep_min_error or n_sensitive == 1
    # (pytest may run pipe.quantize from a second copy of the package, so check by duck type)
    assert all(getattr(pipe.transformer.get_submodule(n), "method", "") == config.method for n in report.quantized)
    assert len(report.quantized) == len(linears) - len(report.kept) > 15
    assert "[quant] transformer" in pipe.hasten_summary()
    out = tp.run(pipe, kw, steps=STEPS)
    err = rel(out, base)
    assert 0 < err < bound, err
    pipe.dequantize()
    assert "quant" not in pipe.hasten_stats()
    for n, m in pipe.transformer.named_modules():
        if isinstance(m, nn.Linear):
            assert m is linears[n]
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


def test_composes_with_easycache(wan):
    pipe, kw, base = wan
    hasten.quantize_pipeline(pipe, Int8WeightOnlyConfig(), calibration_prompts=[dict(kw)], steps=2)
    quant_only = tp.run(pipe, kw, steps=STEPS)
    counter = tp.RowCounter(pipe.transformer, "proj_out")
    pipe.enable_easycache(threshold=0.5)
    both = tp.run(pipe, kw, steps=STEPS)
    assert set(pipe.hasten_stats()) == {"quant", "easycache"}
    assert counter.take() < 2 * STEPS  # the cache skipped some denoiser rows on the quantized model
    counter.remove()
    assert rel(both, base) < 0.2 and not torch.equal(both, quant_only)
    pipe.disable_easycache()
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), quant_only)
    hasten.dequantize_pipeline(pipe)
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


def test_save_load_quantized_denoiser(wan, tmp_path):
    pipe, kw, base = wan
    pipe.quantize(Int4WeightOnlyConfig(group_size=16), calibration_prompts=[dict(kw)], steps=2)
    out = tp.run(pipe, kw, steps=STEPS)
    save_quantized(pipe.transformer, tmp_path / "wan.safetensors")
    pipe.dequantize()
    fresh, _ = tp.wan()  # same architecture; weights come from the file, no recalibration
    fresh.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for p in fresh.transformer.parameters():
            p.add_(1.0)
    load_quantized(fresh.transformer, tmp_path / "wan.safetensors")
    assert torch.equal(tp.run(fresh, kw, steps=STEPS), out)


def test_errors_name_the_problem(wan):
    pipe, kw, _ = wan
    with pytest.raises(ValueError, match=r"unknown quantization method 'int3'.*'int4'.*'int8'.*'w8a8'"):
        pipe.quantize("int3")
    with pytest.raises(TypeError, match="Int8WeightOnlyConfig"):
        pipe.quantize(8)
    with pytest.raises(TypeError, match="calibration_prompts items"):
        pipe.quantize("int8", calibration_prompts=[3])
    with pytest.raises(TypeError, match="steps must be an integer"):
        pipe.quantize("int8", steps=2.5)
    with pytest.raises(ValueError, match="unknown denoiser component"):
        pipe.quantize(Int8WeightOnlyConfig(), components=["unet"])

    class NoDenoiser:
        pass

    with pytest.raises(hasten.UnsupportedModelError, match="transformer or unet"):
        hasten.quantize_pipeline(NoDenoiser())


def test_save_pretrained_refused_while_quantized(wan, tmp_path):
    from hasten.errors import QuantFileError

    pipe, kw, base = wan
    pipe.quantize("int8")
    with pytest.raises(QuantFileError, match="hasten.save_quantized"):
        pipe.save_pretrained(tmp_path / "p")
    with pytest.raises(QuantFileError, match="hasten.save_quantized"):
        pipe.transformer.save_pretrained(tmp_path / "t")
    pipe.dequantize()
    assert "save_pretrained" not in vars(pipe.transformer)
    pipe.transformer.save_pretrained(tmp_path / "t")  # the original weights save again
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


def test_load_quantized_then_pipe_dequantize_restores(wan, tmp_path):
    pipe, kw, base = wan
    pipe.quantize(Int8WeightOnlyConfig(), calibration_prompts=dict(kw), steps=1)  # one dict = one item
    out = tp.run(pipe, kw, steps=STEPS)
    save_quantized(pipe.transformer, tmp_path / "q.safetensors")
    pipe.dequantize()
    load_quantized(pipe.transformer, tmp_path / "q.safetensors")
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), out)
    pipe.dequantize()  # not quantized through pipe.quantize, still restored
    assert not hasattr(pipe.transformer, "_hasten_quant")
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


def test_calibration_falls_back_when_latent_output_is_refused(wan):
    """Kandinsky 2.1 and Marigold refuse output_type="latent" (Kandinsky only after denoising)."""
    pipe, kw, base = wan
    seen: list = []
    original = type(pipe).__call__

    class Refusing(type(pipe)):
        def __call__(self, *args, **kwargs):
            seen.append(kwargs.get("output_type"))
            out = original(self, *args, **kwargs)  # denoises first, then refuses, like Kandinsky 2.1
            if kwargs.get("output_type", "pil") not in ("pt", "np", "pil"):
                raise ValueError(f"Only the output types `pt`, `pil` and `np` are supported not "
                                 f"output_type={kwargs.get('output_type')}")
            return out

    pipe.__class__ = Refusing
    try:
        calls = []
        h = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
        pipe.quantize(Int8WeightOnlyConfig(), calibration_prompts=[dict(kw), dict(kw)], steps=2)
        h.remove()
        assert seen[0] == "latent" and set(seen[1:]) == {"pt"} and len(seen) == 3
        report = pipe.hasten_stats()["quant"]["transformer"]
        assert report.calibrated and len(report.quantized) > 15
        pipe.__class__ = Refusing.__mro__[1]  # back to the plain pipeline to compare latents with the baseline
        assert 0 < rel(tp.run(pipe, kw, steps=STEPS), base) < 0.005
    finally:
        pipe.__class__ = Refusing.__mro__[1]
        pipe.dequantize()
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


def test_zero_quantized_layers_is_an_error_and_pipe_untouched(wan):
    pipe, kw, base = wan
    with pytest.raises(hasten.UnsupportedModelError, match="no linear layer could be quantized"):
        pipe.quantize(Int4WeightOnlyConfig(group_size=1000))
    assert "quant" not in pipe.hasten_stats() and not hasattr(pipe.transformer, "_hasten_quant")
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


def test_one_prompt_string_is_one_prompt():
    """``calibration_prompts="digit 3"`` calibrates on that prompt, not on 'd', 'i', 'g', ..."""
    from hasten.pipelines.quantize import _items, calibrate_pipeline

    class Pipe:
        def __init__(self) -> None:
            self.transformer = nn.Sequential(nn.Linear(8, 8))
            self.prompts: list = []

        def __call__(self, prompt, num_inference_steps, generator, output_type="pil"):
            self.prompts.append(prompt)
            self.transformer(torch.randn(2, 8, generator=generator))

    pipe = Pipe()
    assert _items("digit 3") == ["digit 3"] and _items({"prompt": "a"}) == [{"prompt": "a"}]
    calib = calibrate_pipeline(pipe, "digit 3", steps=1)
    assert pipe.prompts == ["digit 3"] and calib["transformer"].get("0").rows == 2
    with pytest.raises(ValueError, match="at least one"):
        _items([])
