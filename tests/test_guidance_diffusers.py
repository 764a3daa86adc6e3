"""Adaptive guidance on tiny diffusers pipelines: off is exact, dropped uncond rows are really not run."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry

import hasten
from hasten import GuidanceConfig

import tiny_pipes as tp

FAMILIES = ["sd15", "sdxl", "sd3", "pixart_sigma", "flux", "wan"]
STEPS = tp.STEPS


def _build(name: str, batch: int = 2):
    pipe, kw = tp.BUILDERS[name](batch=batch)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw, tp.RowCounter(tp.denoiser(pipe), tp.OUTPUT_LAYER[name])


def _stats(pipe):
    return next(iter(hasten.stats(pipe)["guidance"].values()))


def _one_converges(name: str, kw: dict) -> dict:
    """Item 0's negative prompt = its positive (cos(cond, uncond) = 1), item 1 keeps a different one."""
    kw = dict(kw)
    for pos, neg in (("prompt_embeds", "negative_prompt_embeds"),
                     ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")):
        if neg in kw:
            kw[neg] = kw[neg].clone()
            kw[neg][0] = kw[pos][0]
            kw[neg][1] = -20 * kw[pos][1]  # far from its prompt, so item 1 keeps its uncond pass
    return kw


@pytest.mark.parametrize("name", FAMILIES)
def test_off_is_bit_identical_and_per_sample_decisions(name):
    pipe, kw, counter = _build(name)
    kw = _one_converges(name, kw)
    base = tp.run(pipe, kw, seed=[1, 2])
    base_rows = counter.take()
    assert base_rows == 4 * STEPS
    for off in (dict(threshold=1.5), dict(mode="truncate", truncate=1.0)):
        pipe.enable_adaptive_guidance(**off)
        assert torch.equal(tp.run(pipe, kw, seed=[1, 2]), base)
        assert counter.take() == base_rows
    pipe.enable_adaptive_guidance(threshold=0.999999)
    out = tp.run(pipe, kw, seed=[1, 2])
    rows = counter.take()
    st = _stats(pipe)
    # item 0 converged after its first step; item 1 never did: its uncond row ran every step
    assert "".join(st.uncond["0"]) == "C" + "." * (STEPS - 1)
    assert "".join(st.uncond["1"]) == "C" * STEPS
    assert rows == st.forwards == 2 * STEPS + 1 + STEPS  # the dropped rows never reached the network
    # item 0: uncond == cond makes CFG == cond, so dropping it changes nothing; item 1 ran full CFG
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)
    pipe.disable_adaptive_guidance()
    assert torch.equal(tp.run(pipe, kw, seed=[1, 2]), base)
    assert "guidance" not in hasten.stats(pipe)
    counter.remove()


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_ag_saves_rows_and_truncate_baseline(name):
    pipe, kw, counter = _build(name, batch=1)
    base = tp.run(pipe, kw)
    base_rows = counter.take()
    pipe.enable_adaptive_guidance(threshold=0.5)  # random models: cos is well above 0.5 -> stop at once
    out = tp.run(pipe, kw)
    assert counter.take() == STEPS + 1 and _stats(pipe).saved_fraction == pytest.approx(0.45)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert "adaptive guidance (ag)" in hasten.summary(pipe)
    pipe.enable_adaptive_guidance(mode="truncate", truncate=0.3)
    tp.run(pipe, kw)
    assert counter.take() == STEPS + 3 and "".join(_stats(pipe).uncond["0"]) == "CCC" + "." * (STEPS - 3)
    hasten.disable_adaptive_guidance(pipe)
    assert counter.take() == 0 and base_rows == 2 * STEPS


def test_composes_with_easycache_keys_stay_per_branch():
    pipe, kw, counter = _build("sd15")
    kw = _one_converges("sd15", kw)
    pipe.enable_easycache(threshold=0.0)  # exact cache below the guidance hook: sees only the rows run
    pipe.enable_adaptive_guidance(threshold=0.999999)
    den = tp.denoiser(pipe)
    order = [n for n in HookRegistry.check_if_exists_or_initialize(den)._hook_order if n.startswith("hasten")]
    assert order == ["hasten_easycache", "hasten_guidance"]  # guidance outermost
    tp.run(pipe, kw, seed=[1, 2])
    rows = counter.take()
    ec = next(iter(hasten.stats(pipe)["easycache"].values()))
    calls = {lbl: b.calls for lbl, b in ec.branches.items()}
    assert calls == {"uncond[0]": 1, "uncond[1]": STEPS, "cond[0]": STEPS, "cond[1]": STEPS}
    assert rows == 3 * STEPS + 1
    pipe.enable_easycache(threshold=0.5)  # enabled after guidance: still stacked below it
    order = [n for n in HookRegistry.check_if_exists_or_initialize(den)._hook_order if n.startswith("hasten")]
    assert order == ["hasten_easycache", "hasten_guidance"]
    tp.run(pipe, kw, seed=[1, 2])
    assert counter.take() < rows
    assert next(iter(hasten.stats(pipe)["easycache"].values())).reused > 0
    pipe.disable_adaptive_guidance()
    pipe.disable_easycache()
    assert not hasattr(den, "_diffusers_hook")


def test_linear_mode_needs_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path))
    pipe, kw, counter = _build("wan", batch=1)
    with pytest.raises(ValueError, match="calibrate-guidance"):  # UnsupportedModelError
        pipe.enable_adaptive_guidance(mode="linear")
    with pytest.raises(TypeError):
        hasten.enable_adaptive_guidance(pipe, GuidanceConfig(), threshold=0.9)


def test_calibrate_then_linear_autoloads(tmp_path, monkeypatch):
    from hasten.pipelines.guidance import calibrate_pipeline

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path))
    pipe, kw, counter = _build("wan", batch=1)
    base = tp.run(pipe, kw)
    counter.take()
    co, path = calibrate_pipeline(pipe, lambda seed: tp.run(pipe, kw, seed=seed), seeds=[0, 1])
    assert path.exists() and co.coefficients[0] is None and len(co.coefficients) == STEPS
    assert counter.take() == 2 * 2 * STEPS  # calibration runs are full CFG
    pipe.enable_adaptive_guidance(mode="linear", threshold=1.5)
    out = tp.run(pipe, kw)
    st = _stats(pipe)
    assert "".join(st.uncond["0"]) == "CL" * (STEPS // 2)
    assert counter.take() == STEPS + STEPS // 2
    rel = ((out - base).abs().max() / base.abs().max()).item()
    assert rel < 0.2, rel
    pipe.disable_adaptive_guidance()
