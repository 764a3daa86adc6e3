"""The embedded video model in the real ComfyUI engine: same weights, same 17-frame clip as diffusers.

Engines are compared with each other (never against absolute accuracy), so an undertrained snapshot of
the video model passes as well as the final one. Frames are 16x16 (the model's half size, 272 tokens)
and few steps to stay fast on two CPU cores.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
import torch

import hasten
from hasten import metrics

import comfy_env as ce

SIZE, FRAMES, STEPS, CFG, SEED = 16, 17, 4, 4.0, 5
PROMPT = (3, "left")


@pytest.fixture(scope="module")
def weights(comfy, tmp_path_factory):
    """A private copy of the video weights that every engine here loads (diffusers, the nodes called directly
    and the nodes in ComfyUI's graphs): the shipped folder may be replaced by a newer training snapshot
    while the tests run."""
    from hasten.embedded.video import VIDEO_WEIGHTS_DIR
    from hasten.nodes import embedded

    if not (VIDEO_WEIGHTS_DIR / "model_index.json").exists():
        pytest.skip(f"no embedded video model at {VIDEO_WEIGHTS_DIR}")
    copy = tmp_path_factory.mktemp("weights") / "weights_video"
    shutil.copytree(VIDEO_WEIGHTS_DIR, copy)
    pack_module = sys.modules[comfy.node_classes["HastenEmbeddedVideoLoader"].__module__]
    with pytest.MonkeyPatch.context() as mp:
        for mod in {embedded, pack_module}:
            orig = mod._weights_dir
            mp.setattr(mod, "_weights_dir", lambda model="image", orig=orig: copy if model == "video" else orig(model))
        yield copy


@pytest.fixture(scope="module")
def video_pipe(weights):
    return hasten.load_embedded("video", path=weights)


@pytest.fixture(scope="module")
def diffusers_clip(video_pipe):
    """diffusers' clip with the Euler flow scheduler at the model's own flow shift (ComfyUI's loader reads it
    from the scheduler config): the same solver and sigmas as KSampler euler / normal, so they must agree."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    orig = video_pipe.scheduler
    video_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=float(orig.config.flow_shift))
    try:
        out = video_pipe(prompt=f"digit {PROMPT[0]} moving {PROMPT[1]}", height=SIZE, width=SIZE, num_frames=FRAMES,
                         num_inference_steps=STEPS, guidance_scale=CFG, output_type="pt",
                         generator=torch.Generator().manual_seed(SEED)).frames[0]
    finally:
        video_pipe.scheduler = orig
    return out.float()  # (frames, 3, H, W)


def test_transformer_matches_diffusers_on_17_frames(comfy, video_pipe):
    """ComfyUI's Wan model on the converted weights: same output on a 17-latent-frame input (RoPE over time)."""
    from hasten.nodes.embedded import HastenEmbeddedVideoLoader, HastenMovingDigitPrompt

    mp = ce.call_node(HastenEmbeddedVideoLoader)[0]
    assert mp.model.latent_format.temporal_downscale_ratio == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, video_pipe.transformer.config.in_channels, FRAMES, SIZE // 2, SIZE // 2, generator=g)
    t = torch.tensor([900.0, 250.0])
    ctx = video_pipe.encode_prompt(["digit 3 moving left", ""], do_classifier_free_guidance=False,
                                   max_sequence_length=512, device=torch.device("cpu"))[0]
    pos, neg = ce.call_node(HastenMovingDigitPrompt, 3, "left")
    torch.testing.assert_close(torch.cat([pos[0][0], neg[0][0]]), ctx, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref = video_pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        got = mp.model.diffusion_model(x, t, ctx)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def _graph(steps: int = STEPS) -> dict:
    return {
        "1": {"class_type": "HastenEmbeddedVideoLoader", "inputs": {"weight_dtype": "float32"}},
        "2": {"class_type": "HastenMovingDigitPrompt", "inputs": {"digit": PROMPT[0], "direction": PROMPT[1]}},
        "3": {"class_type": "HastenEmptyDigitVideoLatent", "inputs": {"frames": FRAMES, "size": SIZE, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": steps, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
            "denoise": 1.0}},
        "5": {"class_type": "HastenDecodeDigitVideo", "inputs": {"samples": ["4", 0]}},
        # Save Animated WEBP lives in comfy_extras/nodes_images.py, which imports the web server (not loaded
        # in-process here; tests/test_comfy_server.py runs a real server): Save Image writes every frame
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "hasten_digit_video"}},
    }


def _read_frames(entries: list[dict]) -> torch.Tensor:
    """The saved frames (PNG files, in order) as (frames, 3, H, W) in [0, 1]."""
    import folder_paths
    import numpy as np
    from PIL import Image

    out = []
    for e in entries:
        path = Path(folder_paths.get_output_directory()) / e.get("subfolder", "") / e["filename"]
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            out.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def test_graph_renders_the_same_video_as_diffusers(comfy, weights, diffusers_clip):
    """loader -> moving-digit prompt -> empty video latent -> KSampler -> decode -> Save Image: 17 frames,
    the same clip as diffusers with the same seed and steps (only 8-bit rounding apart)."""
    ex = ce.run_graph(comfy, _graph())
    assert ex.success, ex.status_messages[-3:]
    frames = _read_frames(ex.history_result["outputs"]["6"]["images"])
    assert frames.shape == (FRAMES, 3, SIZE, SIZE)
    assert metrics.psnr(frames, diffusers_clip) > 40
    # the clip is a clip: its frames are not all the same picture
    assert (frames[0] - frames[-1]).abs().max() > 0.05


def test_hasten_easycache_on_the_video_graph(comfy, video_pipe):
    """hasten's EasyCache node on the video model in the engine: fewer real forwards at the first block,
    the clip close to the uncached one."""
    from hasten.nodes.embedded import (
        HastenDecodeDigitVideo,
        HastenEmbeddedVideoLoader,
        HastenEmptyDigitVideoLatent,
        HastenMovingDigitPrompt,
    )

    model = ce.call_node(HastenEmbeddedVideoLoader)[0]
    pos, neg = ce.call_node(HastenMovingDigitPrompt, *PROMPT)
    lat = ce.call_node(HastenEmptyDigitVideoLatent, FRAMES, SIZE, 1)[0]
    cached = ce.call_node(comfy.node_classes["HastenEasyCache"], model, reuse_threshold=0.2, start_percent=0.2,
                          end_percent=1.0)[0]
    steps = 10
    clips, rows = {}, {}
    for name, m in {"base": model, "cached": cached}.items():
        with ce.ForwardCounter(m) as counter:
            (out,) = comfy.nodes.KSampler().sample(m, SEED, steps, CFG, "euler", "normal", pos, neg, lat, denoise=1.0)
        rows[name] = counter.rows
        clips[name] = ce.call_node(HastenDecodeDigitVideo, out)[0]
    assert clips["base"].shape == (FRAMES, SIZE, SIZE, 3)
    assert rows["base"] == steps * 2
    assert 0 < rows["cached"] < rows["base"]
    assert metrics.psnr(clips["cached"].permute(0, 3, 1, 2), clips["base"].permute(0, 3, 1, 2)) > 20


def test_video_nodes_say_what_is_missing(comfy, weights, monkeypatch, tmp_path):
    """No weights: a node error naming the training command, not a bare traceback; bad sizes refused."""
    from hasten.nodes import embedded

    with pytest.raises(ValueError, match="multiple of 4"):
        embedded.HastenEmptyDigitVideoLatent.execute(frames=FRAMES, size=18, batch_size=1)
    monkeypatch.setattr(embedded, "_weights_dir", lambda model="image": tmp_path / model)
    with pytest.raises(FileNotFoundError, match="train-embedded --video"):
        embedded.HastenEmbeddedVideoLoader.execute()
