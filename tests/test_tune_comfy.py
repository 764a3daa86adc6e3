"""The ComfyUI node "Apply hasten preset" in the real engine, on the embedded weights: it equals chaining
hasten's own nodes by hand, and a preset does in ComfyUI what it does in diffusers."""

from __future__ import annotations

import json

import pytest
import torch

import hasten
from hasten import metrics

import comfy_env as ce

DIGITS = [0, 3, 7, 9]
STEPS, CFG, SEED = 20, 4.0, 0
PRESET = {"format": 1, "features": {"timestep_schedule": {"steps": 10, "shift": 1.0},
                                    "easycache": {"threshold": 0.1, "warmup": 0.2},
                                    "adaptive_guidance": {"mode": "truncate", "truncate": 0.8}}}


@pytest.fixture(scope="module")
def target(comfy):
    from hasten.bench.comfy import ComfyTarget

    return ComfyTarget()


def _run(target, model) -> tuple[torch.Tensor, int]:
    target.model = model
    try:
        with ce.ForwardCounter(target.base) as fc:
            img = target.generate(DIGITS, SEED, STEPS, CFG)
        return img, fc.rows
    finally:
        target.model = target.base


def _node(target):
    return target.env.nodes.NODE_CLASS_MAPPINGS["HastenApplyPreset"]


@pytest.fixture(scope="module")
def comfy_base(target):
    return _run(target, target.base)


@pytest.fixture(scope="module")
def comfy_preset(target):
    out = _node(target).execute(target.base, json.dumps(PRESET))
    assert "timestep_schedule, easycache, adaptive_guidance" in out.result[1]
    return _run(target, out.result[0])


def test_preset_node_equals_the_nodes_by_hand(target, comfy_preset) -> None:
    from hasten.caches import EasyCacheConfig
    from hasten.nodes import easycache, guidance
    from hasten.nodes.preset import patch_schedule
    from hasten.samplers.guidance import GuidanceConfig
    from hasten.tune import ScheduleConfig

    m = patch_schedule(target.base, ScheduleConfig(steps=10))
    m = easycache.patch_model(m, EasyCacheConfig(threshold=0.1, warmup=0.2))
    m = guidance.patch_model(m, GuidanceConfig(mode="truncate", truncate=0.8))
    img, rows = _run(target, m)
    p_img, p_rows = comfy_preset
    assert torch.equal(img, p_img) and rows == p_rows
    assert rows < 2 * 10 * len(DIGITS)  # 10 steps, fewer uncond rows, some steps reused


def test_preset_does_in_comfyui_what_it_does_in_diffusers(comfy_base, comfy_preset) -> None:
    """Same preset, same weights: real forwards within 15 % of the diffusers side's, the same digits read,
    and each engine's PSNR against its own baseline (ComfyUI euler vs. diffusers UniPC) above 25 dB."""
    from hasten.embedded import generate_digits
    from hasten.pipelines import features
    from hasten.tune.preset import disable_features

    pipe = hasten.load_embedded()
    d_base = generate_digits(pipe, DIGITS, seed=SEED, steps=STEPS, guidance=CFG)
    hasten.apply(pipe, PRESET)
    rows = []
    h = pipe.transformer.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        d_img = generate_digits(pipe, DIGITS, seed=SEED, steps=STEPS, guidance=CFG)
    finally:
        h.remove()
        disable_features(pipe, list(PRESET["features"]))
    assert features(pipe) == {}
    c_base, _ = comfy_base
    c_img, c_rows = comfy_preset
    assert abs(c_rows - sum(rows)) <= 0.15 * sum(rows), (c_rows, sum(rows))
    c_psnr, d_psnr = metrics.psnr(c_img, c_base), metrics.psnr(d_img, d_base)
    assert c_psnr > 25 and d_psnr > 25, (c_psnr, d_psnr)
    read = metrics.digit_accuracy
    assert read(c_img, DIGITS)["accuracy"] == read(c_base, DIGITS)["accuracy"]
    assert read(d_img, DIGITS)["accuracy"] == read(d_base, DIGITS)["accuracy"]


def test_schedule_resampling_is_exact_when_off() -> None:
    from hasten.nodes.preset import resample_sigmas
    from hasten.tune import ScheduleConfig

    s = torch.linspace(1, 0, 21)
    assert resample_sigmas(s, ScheduleConfig(steps=20), True) is s
    r = resample_sigmas(s, ScheduleConfig(steps=10, shift=2.0), True)
    assert r.shape[-1] == 11 and r[0] == 1 and r[-1] == 0 and bool((r[:-1] > r[1:]).all())
    assert torch.allclose(resample_sigmas(s, ScheduleConfig(steps=10), True), torch.linspace(1, 0, 11))


@pytest.mark.parametrize("preset, match", [
    ('{"format": 1, "features": {"warp_drive": {}}}', "unknown feature"),
    ('{"format": 1, "features": {"bottleneck_sampling": {}}}', "KSampler \\(Bottleneck, hasten\\)"),
    ("no/such/file.json", "no preset file"),
])
def test_bad_preset_is_a_node_error(target, preset, match) -> None:
    with pytest.raises(ValueError, match=match):
        _node(target).execute(target.base, preset)
