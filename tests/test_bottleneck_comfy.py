"""KSampler (Bottleneck, hasten) in the real ComfyUI engine, on the embedded digit model: the images must
read as the prompted digits and stay close to the plain KSampler's (a double ``process_latent_in`` of
the stage hand-off used to destroy them: 9.4 dB), progress runs across all stages, stats are reported."""

from __future__ import annotations

import logging

import pytest
import torch

DIGITS = [0, 3, 7, 8]
STEPS = 12


@pytest.fixture(scope="module")
def setup(comfy):
    from hasten.nodes.embedded import encode_prompts, load_comfy_model

    model = load_comfy_model()
    pos = [[encode_prompts([f"digit {d}" for d in DIGITS]), {}]]
    neg = [[encode_prompts([""] * len(DIGITS)), {}]]
    ch = model.get_model_object("latent_format").latent_channels
    lat = {"samples": torch.zeros(len(DIGITS), ch, 1, 16, 16)}  # 32x32 px images
    return comfy, model, pos, neg, lat


def _images(samples: torch.Tensor) -> torch.Tensor:
    from hasten.nodes.embedded import decode_latents

    return decode_latents(samples).permute(0, 3, 1, 2)


def test_bottleneck_ksampler_images_read_as_prompted_digits(setup, caplog):
    from hasten import metrics

    env, model, pos, neg, lat = setup
    import comfy.utils as cu

    node = env.node_classes["HastenBottleneckSampler"]
    (plain,) = env.nodes.KSampler().sample(model, 0, STEPS, 4.0, "euler", "simple", pos, neg, lat, denoise=1.0)
    progress: list[tuple[int, int]] = []
    old_hook = cu.PROGRESS_BAR_HOOK
    cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append((value, total)))
    sizes: list[tuple[int, int]] = []
    h = model.model.diffusion_model.head.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1]))
    try:
        with caplog.at_level(logging.INFO, logger="hasten"):
            res = node.execute(model=model, seed=0, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
                               positive=pos, negative=neg, latent_image=lat, scales="1,0.5,1", boundaries="0.3,0.9")
    finally:
        h.remove()
        cu.set_progress_bar_global_hook(old_hook)
    out, text = res.result
    assert out["samples"].shape == plain["samples"].shape
    assert len(set(sizes)) == 2  # really ran a lower-resolution stage (head sees fewer tokens)
    base_img, img = _images(plain["samples"]), _images(out["samples"])
    acc = metrics.digit_accuracy(img, DIGITS)["accuracy"]
    psnr = metrics.psnr(img, base_img)
    assert metrics.digit_accuracy(base_img, DIGITS)["accuracy"] >= 0.75
    # The digit reader (embedded/weights_reader) reads 2 of the 4 (3 and 7; the 0 and the 8 come out as blurred
    # ring and blob, which it reads as 5 and 1): the middle stage at 8x8 latents blurs them on this model trained
    # at one resolution (the method's own cost, README). The broken hand-off this guards against gave 0 of 4.
    assert acc >= 0.5, f"bottleneck images read as other digits (accuracy {acc})"
    assert psnr > 12.0, f"bottleneck image too far from the plain KSampler's: {psnr:.1f} dB"
    # one progress bar over the whole run, reaching the last step
    assert progress and progress[-1] == (STEPS, STEPS) and all(t == STEPS for _, t in progress)
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)
    assert "3 stages" in text and "0.5x latent 8x8" in text
    assert any("KSampler (Bottleneck, hasten): 3 stages" in r.getMessage() for r in caplog.records)


def test_size_error_uses_the_models_latent_factor(setup):
    from hasten.nodes.bottleneck import latent_factor

    env, model, pos, neg, lat = setup
    node = env.node_classes["HastenBottleneckSampler"]
    factor = latent_factor(model)
    assert factor == model.get_model_object("latent_format").spacial_downscale_ratio
    bad = {"samples": torch.zeros(1, lat["samples"].shape[1], 1, 6, 6)}  # 6 * 0.5 = 3: not a multiple of patch 2
    with pytest.raises(ValueError, match=f"multiples of {4 * factor} px"):
        node.execute(model=model, seed=0, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
                     positive=pos[:1], negative=neg[:1], latent_image=bad, scales="1,0.5,1", boundaries="0.3,0.9")
    with pytest.raises(ValueError, match="scales must start and end at 1.0"):
        node.execute(model=model, seed=0, steps=STEPS, cfg=4.0, sampler_name="euler", scheduler="simple",
                     positive=pos, negative=neg, latent_image=lat, scales="0.5,1", boundaries="0.5")


@pytest.mark.parametrize("kind", ["wan", "sd15"])
def test_flow_and_eps_models_run_all_stages(comfy, kind):
    """Flow (Wan) and EPS (SD1.x) models: both resolutions reach the model, output at the input's size."""
    import comfy_env

    model = comfy_env.tiny_wan() if kind == "wan" else comfy_env.tiny_sd15()
    node = comfy.node_classes["HastenBottleneckSampler"]
    lat = comfy_env.latent(kind, batch=2)
    sizes: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        sizes.append(tuple(x.shape[-2:]))

    h = model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        res = node.execute(model=model, seed=1, steps=8, cfg=3.0, sampler_name="dpmpp_2m", scheduler="normal",
                           positive=comfy_env.conditioning(kind, 1, batch=2),
                           negative=comfy_env.conditioning(kind, 2, batch=2), latent_image=lat, scales="1,0.5,1",
                           boundaries="0.25,0.75")
    finally:
        h.remove()
    out = res.result[0]["samples"]
    assert out.shape == lat["samples"].shape and torch.isfinite(out).all()
    assert sorted(set(sizes)) == [(8, 8), (16, 16)]
