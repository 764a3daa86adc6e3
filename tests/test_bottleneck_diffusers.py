"""Bottleneck sampling: core schedule/validation and the diffusers scheduler patch on tiny pipelines."""

from __future__ import annotations

import pytest
import torch

import hasten
from hasten.samplers.bottleneck import BottleneckConfig, flow_transition, plan, resize_latent, stage_size

import tiny_pipes as tp


def test_config_and_plan_validation():
    with pytest.raises(ValueError, match="start and end at 1.0"):
        BottleneckConfig(scales=(0.5, 1.0), boundaries=(0.5,))
    with pytest.raises(ValueError, match="strictly increasing"):
        BottleneckConfig(boundaries=(0.7, 0.2))
    with pytest.raises(ValueError, match="needs 2 values"):
        BottleneckConfig(boundaries=(0.5,))
    st = plan(BottleneckConfig(), 20)
    assert [(s.start, s.end, s.scale) for s in st] == [(0, 4, 1.0), (4, 14, 0.5), (14, 20, 1.0)]
    assert stage_size((16, 16), 0.5, 2) == (8, 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        stage_size((6, 6), 0.5, 2, vae_factor=8)


def test_resize_video_and_exact_flow_renoise():
    x = torch.randn(2, 4, 3, 8, 8)
    assert resize_latent(x, (4, 4)).shape == (2, 4, 3, 4, 4)
    assert resize_latent(resize_latent(x, (4, 4)), (8, 8)).shape == x.shape
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    s = 0.6
    xt, v = (1 - s) * x0 + s * eps, eps - x0
    cfg = BottleneckConfig()
    new = flow_transition(xt, v, s, 0.4, (8, 8), cfg, 1, [7])  # same size: exact x0, fresh noise at 0.4
    from hasten.samplers.bottleneck import fresh_noise

    torch.testing.assert_close(new, 0.6 * x0 + 0.4 * fresh_noise(x0, [7], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["wan", "sd3", "sd15"])
def test_diffusers_stages_off_and_restore(name):
    pipe, kw = tp.BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    if name == "wan":
        kw.update(height=32, width=32)
    sched = pipe.scheduler
    base = tp.run(pipe, kw)
    pipe.enable_bottleneck_sampling(scales=(1.0, 1.0, 1.0))
    assert torch.equal(tp.run(pipe, kw), base)
    sizes: list = []
    layer = getattr(tp.denoiser(pipe), tp.OUTPUT_LAYER[name])
    h = layer.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1:]))
    pipe.enable_bottleneck_sampling()
    out = tp.run(pipe, kw)
    h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert len({tuple(s) for s in sizes}) == 2 and len(sizes) % tp.STEPS == 0
    assert "2 resolution changes" in str(hasten.stats(pipe)["bottleneck"])
    pipe.disable_bottleneck_sampling()
    assert "step" not in vars(sched) and "set_timesteps" not in vars(sched)
    assert torch.equal(tp.run(pipe, kw), base)


def test_diffusers_invalid_settings_raise_clearly():
    pipe, kw = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_bottleneck_sampling()
    with pytest.raises(ValueError, match="multiple of 2"):
        tp.run(pipe, kw)  # 16 px -> 2x2 latent -> 1x1 at scale 0.5, below Wan's patch size 2
    pipe.disable_bottleneck_sampling()
    fpipe, _ = tp.flux()
    with pytest.raises(hasten.UnsupportedModelError, match="FluxPipeline.*packs its latents"):
        hasten.enable_bottleneck_sampling(fpipe)


def test_guidance_bottleneck_easycache_compose():
    pipe, kw = tp.wan(batch=1)
    pipe.set_progress_bar_config(disable=True)
    kw.update(height=32, width=32)
    counter = tp.RowCounter(tp.denoiser(pipe), "proj_out")
    tp.run(pipe, kw)
    base_rows = counter.take()
    pipe.enable_easycache(threshold=0.3)
    pipe.enable_adaptive_guidance(threshold=0.5)
    pipe.enable_bottleneck_sampling()
    out = tp.run(pipe, kw)
    assert torch.isfinite(out).all() and counter.take() < base_rows
    for off in (pipe.disable_bottleneck_sampling, pipe.disable_adaptive_guidance, pipe.disable_easycache):
        off()
    assert not hasattr(tp.denoiser(pipe), "_diffusers_hook")


def test_multistep_flow_solver_restarts_history_at_stage_changes():
    """UniPC in flow mode (the embedded model's scheduler): stages run and the solver history is reset."""
    from diffusers import UniPCMultistepScheduler

    pipe, kw = tp.wan()
    kw = {**kw, "height": 32, "width": 32}  # a 4x4 latent, halved to 2x2 in the middle stage
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    base = tp.run(pipe, kw, steps=10)
    shapes = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["hidden_states"].shape[-2:])),
                                                   with_kwargs=True)
    orders = []
    orig_step = type(pipe.scheduler).step

    def spy(self, *a, **k):  # record the solver order it will use, just before each step
        orders.append(self.lower_order_nums)
        return orig_step(self, *a, **k)

    type(pipe.scheduler).step = spy
    pipe.enable_bottleneck_sampling(scales=(1.0, 0.5, 1.0), boundaries=(0.3, 0.7))
    try:
        out = tp.run(pipe, kw, steps=10)
    finally:
        type(pipe.scheduler).step = orig_step
        h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all()
    # steps 0-2 at 4x4, 3-6 at 2x2, 7-9 at 4x4 (two calls per step: cond and uncond)
    assert shapes == [(4, 4)] * 6 + [(2, 2)] * 8 + [(4, 4)] * 6, shapes
    assert orders[3] == 0 and orders[7] == 0, f"history not restarted at the stage changes: {orders}"
    pipe.disable_bottleneck_sampling()
    assert "step" not in vars(pipe.scheduler) and torch.equal(tp.run(pipe, kw, steps=10), base)
