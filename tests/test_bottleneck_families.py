"""Bottleneck sampling beyond the plain text-to-image path: custom sigmas and dynamic shift, img2img
strength, UNet samplers (Euler, DPM++), clear refusals, the user's seed, config validation, logging."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch

import hasten
from hasten.samplers.bottleneck import BottleneckConfig, fresh_noise, noise_seeds

import tiny_pipes as tp


def _sizes(pipe, name: str) -> tuple[list, object]:
    """Spatial size of the latent each denoiser call really receives."""
    sizes: list = []

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        sizes.append(tuple(x.shape[-2:]))

    return sizes, tp.denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)


def test_scheduler_signatures_are_kept():
    """diffusers' retrieve_timesteps / prepare_extra_step_kwargs inspect these signatures."""
    pipe, _ = tp.sd3()
    before = {n: inspect.signature(getattr(pipe.scheduler, n)) for n in ("set_timesteps", "step")}
    pipe.enable_bottleneck_sampling()
    for n, sig in before.items():
        assert inspect.signature(getattr(pipe.scheduler, n)) == sig
    assert "sigmas" in inspect.signature(pipe.scheduler.set_timesteps).parameters
    pipe.disable_bottleneck_sampling()


@pytest.mark.parametrize("mode", ["sigmas", "dynamic_mu"])
def test_flow_custom_sigmas_and_dynamic_shift(mode):
    """A pipeline passing ``sigmas`` (and ``mu`` with dynamic shifting) runs all stages at both sizes."""
    pipe, kw = tp.sd3()
    kw = {**kw, "height": 32, "width": 32}
    pipe.set_progress_bar_config(disable=True)
    extra: dict = {}
    if mode == "sigmas":
        extra["sigmas"] = list(np.linspace(1.0, 0.1, tp.STEPS))
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                         base_image_seq_len=16, max_image_seq_len=256)
    base = tp.run(pipe, kw, **extra)
    pipe.enable_bottleneck_sampling()
    sizes, h = _sizes(pipe, "sd3")
    out = tp.run(pipe, kw, **extra)
    h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert sorted(set(sizes)) == [(8, 8), (16, 16)]
    if mode == "dynamic_mu":  # the half-size stage gets the mu of a quarter of the tokens (256 -> 64)
        import math

        patch = hasten.features(pipe)["bottleneck"].patch
        m = (1.15 - 0.5) / (256 - 16)
        assert patch.mu == pytest.approx(0.5 + m * (256 - 16))
        assert patch.stages[1].shift == pytest.approx(math.exp(m * (64 - 256)))
        assert "dynamic shift" in str(hasten.stats(pipe)["bottleneck"])
    pipe.disable_bottleneck_sampling()
    assert torch.equal(tp.run(pipe, kw, **extra), base)


@pytest.mark.parametrize("sched", ["euler", "euler_a", "dpmpp_2m", "unipc"])
def test_unet_samplers(sched):
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    make = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[sched]
    pipe, kw = tp.sd15()
    # 16 px: an 8x8 latent -> 4x4, a multiple of the UNet's down-sampling factor 2
    pipe.scheduler = make.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base = tp.run(pipe, kw)
    pipe.enable_bottleneck_sampling()
    sizes, h = _sizes(pipe, "sd15")
    out = tp.run(pipe, kw)
    h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert sorted(set(sizes)) == [(4, 4), (8, 8)]
    # same noise level as the plain run at the end: a clean estimate, not a noisy or blown-up latent
    assert 0.3 < out.std() / base.std() < 3
    pipe.disable_bottleneck_sampling()


@pytest.mark.parametrize("name", ["sd15", "sd3"])
@pytest.mark.parametrize("strength", [0.9, 0.5])
def test_img2img_strength_keeps_input_size(name, strength):
    """img2img starts part-way through the schedule: the stages follow the real step, output is full size."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline

    pipe, kw = tp.BUILDERS[name]()
    cls = StableDiffusionImg2ImgPipeline if name == "sd15" else StableDiffusion3Img2ImgPipeline
    i2i = cls(**{**pipe.components, **({"image_encoder": None, "feature_extractor": None} if name == "sd3" else {})})
    i2i.set_progress_bar_config(disable=True)
    if i2i.vae.config.shift_factor is None:
        i2i.vae.register_to_config(shift_factor=0.0)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 32, 32, generator=g)
    kw = {k: v for k, v in kw.items() if k not in ("height", "width")}
    base = tp.run(i2i, kw, image=image, strength=strength)
    i2i.enable_bottleneck_sampling(boundaries=(0.3, 0.7))
    sizes, h = _sizes(i2i, name)
    out = tp.run(i2i, kw, image=image, strength=strength)
    h.remove()
    assert out.shape == base.shape
    assert sizes[-1] == tuple(base.shape[-2:]) and len(set(sizes)) == 2
    i2i.disable_bottleneck_sampling()


def test_refusals_name_the_reason_before_any_work():
    from diffusers import (
        AllegroPipeline,
        BriaPipeline,
        ChromaPipeline,
        CogVideoXPipeline,
        ControlNetModel,
        Flux2Pipeline,
        HunyuanDiTPipeline,
        OvisImagePipeline,
        QwenImagePipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionInpaintPipeline,
        WanImageToVideoPipeline,
    )

    from hasten.pipelines.bottleneck import check_pipeline

    # detected from the pipeline class (packing methods), not from a class-name prefix
    for cls in (ChromaPipeline, QwenImagePipeline, BriaPipeline, OvisImagePipeline, Flux2Pipeline):
        with pytest.raises(hasten.UnsupportedModelError, match=f"{cls.__name__}: it packs its latents"):
            check_pipeline(cls.__new__(cls))
    for cls in (CogVideoXPipeline, AllegroPipeline, HunyuanDiTPipeline):
        with pytest.raises(hasten.UnsupportedModelError, match="rotary"):
            check_pipeline(cls.__new__(cls))
    with pytest.raises(hasten.UnsupportedModelError, match="image"):
        check_pipeline(WanImageToVideoPipeline.__new__(WanImageToVideoPipeline))
    wan, _ = tp.wan()
    wan.register_to_config(expand_timesteps=True)  # Wan 2.2 TI2V 5B: per-token timesteps at full size
    with pytest.raises(hasten.UnsupportedModelError, match="expand_timesteps"):
        wan.enable_bottleneck_sampling()
    pipe, _ = tp.sd15()
    inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    with pytest.raises(hasten.UnsupportedModelError, match="mask_image"):
        inpaint.enable_bottleneck_sampling()
    cn = StableDiffusionControlNetPipeline(**pipe.components, controlnet=ControlNetModel.from_unet(pipe.unet))
    with pytest.raises(hasten.UnsupportedModelError, match="ControlNet"):
        cn.enable_bottleneck_sampling()
    from diffusers import HeunDiscreteScheduler

    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(hasten.UnsupportedModelError, match="HeunDiscreteScheduler.*supported"):
        pipe.enable_bottleneck_sampling()
    assert "bottleneck" not in hasten.features(pipe) and "step" not in vars(pipe.scheduler)


def test_config_validation():
    for bad in (dict(shifts=(1, float("nan"), 1)), dict(seed=-1), dict(seed=2**70), dict(renoise=float("nan")),
                dict(boundaries=(0.2, float("inf"))), dict(upsample="area")):
        with pytest.raises(ValueError):
            BottleneckConfig(**bad)
    for bad in (dict(scales="1"), dict(seed=1.5), dict(renoise=True)):
        with pytest.raises(TypeError):
            BottleneckConfig(**bad)
    pipe, _ = tp.wan()
    with pytest.raises(TypeError):
        hasten.enable_bottleneck_sampling(pipe, 0.5)


def test_renoise_follows_the_users_seed_not_the_batch_position():
    """Per-prompt generators: item 2 of a batch equals the same item generated alone (it did not before)."""
    pipe, kw = tp.wan(batch=2)
    kw = {**kw, "height": 32, "width": 32}
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_bottleneck_sampling()
    both = tp.run(pipe, kw, seed=[3, 8])
    alone_kw = {**kw, "prompt_embeds": kw["prompt_embeds"][1:], "negative_prompt_embeds": kw["negative_prompt_embeds"][1:]}
    alone = tp.run(pipe, alone_kw, seed=[8])
    assert (both[1] - alone[0]).abs().max() < 1e-4
    # the re-noise itself: derived from each row's own start noise, different for different seeds
    a, b = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert noise_seeds(a) != noise_seeds(b) and noise_seeds(a) == noise_seeds(a.clone())
    assert noise_seeds(torch.cat([b, a]))[1] == noise_seeds(a)[0]
    assert not torch.equal(fresh_noise(a, noise_seeds(a), 1), fresh_noise(a, noise_seeds(b), 1))


def test_logs_once_per_run(caplog):
    pipe, kw = tp.wan()
    kw = {**kw, "height": 32, "width": 32}
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_bottleneck_sampling()
    with caplog.at_level(logging.INFO, logger="hasten.bottleneck"):
        tp.run(pipe, kw)
        tp.run(pipe, kw)
    lines = [r.getMessage() for r in caplog.records if r.name == "hasten.bottleneck"]
    assert len(lines) == 2, lines
    assert "3 stages" in lines[0] and "2 resolution changes" in lines[0] and "0.5x latent 2x2" in lines[0]


def test_deepcopy_gets_its_own_scheduler_patch():
    import copy

    pipe, kw = tp.wan()
    kw = {**kw, "height": 32, "width": 32}
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_bottleneck_sampling()
    out = tp.run(pipe, kw)
    twin = copy.deepcopy(pipe)
    assert twin.scheduler.step.owner.sched is twin.scheduler
    assert torch.equal(tp.run(twin, kw), out)
    twin.disable_bottleneck_sampling()
    assert "step" not in vars(twin.scheduler) and "step" in vars(pipe.scheduler)
