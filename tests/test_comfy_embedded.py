"""The embedded model in the real ComfyUI engine: same weights, same network output, digits that read right."""

from __future__ import annotations

import pytest
import torch

import hasten

import comfy_env as ce


@pytest.fixture(scope="module")
def pack(comfy):
    return comfy.pack


def test_transformer_matches_diffusers(comfy, pack):
    from hasten.nodes.embedded import load_comfy_model

    pipe = hasten.load_embedded()
    mp = load_comfy_model()
    dm = mp.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.transformer.config.in_channels, 1, 16, 16, generator=g)
    t = torch.tensor([900.0, 250.0])
    ctx = pipe.encode_prompt(["digit 3", ""], do_classifier_free_guidance=False, device=torch.device("cpu"))[0]
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        got = dm(x, t, ctx)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_graph_generates_prompted_digits_and_hasten_easycache_skips(comfy, pack):
    """Loader -> prompts -> (EasyCache) -> KSampler -> decode, in the engine; digits read as prompted."""
    from hasten import metrics
    from hasten.nodes.embedded import (
        HastenDecodeDigits,
        HastenDigitPrompt,
        HastenEmptyDigitLatent,
        load_comfy_model,
    )

    nodes = comfy.nodes
    model = load_comfy_model()
    digits = [0, 3, 7]
    pos = [[torch.cat([ce.call_node(HastenDigitPrompt, f"digit {d}")[0][0][0] for d in digits]), {}]]
    neg = [[torch.cat([ce.call_node(HastenDigitPrompt, "")[0][0][0]] * len(digits)), {}]]
    lat = ce.call_node(HastenEmptyDigitLatent, 32, len(digits))[0]
    easy = comfy.node_classes["HastenEasyCache"]
    cached = ce.call_node(easy, model, reuse_threshold=0.2, start_percent=0.2, end_percent=1.0)[0]
    results = {}
    for name, m in {"base": model, "cached": cached}.items():
        counter_rows = []
        h = m.model.diffusion_model.head.register_forward_pre_hook(
            lambda mod, a, rows=counter_rows: rows.append(a[0].shape[0]))
        (out,) = nodes.KSampler().sample(m, 0, 20, 4.0, "euler", "simple", pos, neg, lat, denoise=1.0)
        h.remove()
        img = ce.call_node(HastenDecodeDigits, out)[0]
        results[name] = (img, sum(counter_rows))
    base_img, base_rows = results["base"]
    cached_img, cached_rows = results["cached"]
    assert base_rows == 20 * 2 * len(digits)
    assert cached_rows < base_rows
    acc = metrics.digit_accuracy(base_img.permute(0, 3, 1, 2), digits)["accuracy"]
    assert acc >= 2 / 3
    assert metrics.psnr(cached_img.permute(0, 3, 1, 2), base_img.permute(0, 3, 1, 2)) > 20


def test_builtin_empty_latent_image_gives_full_size_digits(comfy, pack):
    """The model's latent format says its VAE factor (2), so ComfyUI's own Empty Latent Image at 32x32 gives
    32x32 images (it gave 8x8 with the factor-8 default)."""
    from hasten.nodes.embedded import HastenDecodeDigits, HastenDigitPrompt, load_comfy_model

    model = load_comfy_model()
    assert model.model.latent_format.spacial_downscale_ratio == 2
    (lat,) = comfy.nodes.EmptyLatentImage().generate(32, 32, 1)
    if "downscale_ratio_spacial" not in lat:
        pytest.skip(f"ComfyUI {comfy.version}: Empty Latent Image does not pass its downscale ratio to the "
                    "sampler (newer versions do); use Empty Digit Latent (hasten) there")
    pos = ce.call_node(HastenDigitPrompt, "digit 7")[0]
    neg = ce.call_node(HastenDigitPrompt, "")[0]
    (out,) = comfy.nodes.KSampler().sample(model, 0, 4, 4.0, "euler", "simple", pos, neg, lat, denoise=1.0)
    img = ce.call_node(HastenDecodeDigits, out)[0]
    assert img.shape == (1, 32, 32, 3)
