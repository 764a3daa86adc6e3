"""The embedded text-to-video model: offline loading, call defaults, token counts at both sizes, the
moving-digit data and scorer, and (slow) that default-settings clips show the prompted digit and motion."""

from __future__ import annotations

import pytest
import torch

from hasten.embedded.video import (
    DIRECTIONS,
    VIDEO_DEFAULT_FRAMES,
    VIDEO_DEFAULT_SIZE,
    VIDEO_HALF_SIZE,
    VIDEO_WEIGHTS_DIR,
    eval_pairs,
    generate_videos,
    load_video_embedded,
    score_videos,
)
from hasten.embedded.video_data import load_digit_sprites, render_clips, video_prompt

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


SHIPPED = (VIDEO_WEIGHTS_DIR / "model_index.json").exists()
NOT_SHIPPED = "embedded/weights_video/ not trained yet: run `hasten train-embedded --video` (see issue 12)"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The shipped video model, or (until it is trained) the same architecture initialised from the image
    model, saved and loaded back through the same offline loader."""
    torch.set_num_threads(1)
    if SHIPPED:
        return load_video_embedded()
    from diffusers import WanPipeline

    from hasten.embedded.train import portable_tokenizer_class
    from hasten.embedded.video_train import build_components

    root = tmp_path_factory.mktemp("weights_video")
    WanPipeline(**build_components(0)).save_pretrained(root, safe_serialization=True)
    portable_tokenizer_class(root)
    return load_video_embedded(path=root)


def _tokens_seen(pipe) -> list[int]:
    """Sequence lengths entering the first transformer block (real work below hasten's hooks)."""
    seen: list[int] = []
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.append(int((a or (kw["hidden_states"],))[0].shape[1])), with_kwargs=True)
    return seen


def _real_clips(digits, dirs, seed=0):
    sprites, labels = load_digit_sprites()
    idx = torch.tensor([int(torch.nonzero(labels == d)[i, 0]) for i, d in enumerate(digits)])
    clips = render_clips(sprites[idx], torch.tensor([DIRECTIONS.index(r) for r in dirs]),
                         torch.Generator().manual_seed(seed))
    return clips.unsqueeze(2).repeat(1, 1, 3, 1, 1)


@pytest.mark.skipif(not SHIPPED, reason=NOT_SHIPPED)
def test_weights_shipped_and_small():
    files = list(VIDEO_WEIGHTS_DIR.rglob("*.safetensors"))
    assert files, "weights_video/ has no safetensors"
    assert sum(f.stat().st_size for f in files) < 30e6
    assert (VIDEO_WEIGHTS_DIR / "TRAINING.md").exists() and (VIDEO_WEIGHTS_DIR / "TRAINING.json").exists()


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-embedded --video"):
        load_video_embedded(path=tmp_path)


def test_prompt_words_are_in_vocabulary(pipe):
    for direction in DIRECTIONS:
        ids = pipe.tokenizer(video_prompt(3, direction)).input_ids
        assert pipe.tokenizer.unk_token_id not in ids
    with pytest.raises(ValueError):
        video_prompt(3, "sideways")


def test_default_call_is_full_size_clip_over_1024_tokens(pipe):
    seen = _tokens_seen(pipe)
    out = pipe(prompt="digit 3 moving left", num_inference_steps=2, output_type="pt").frames
    assert out.shape == (1, VIDEO_DEFAULT_FRAMES, 3, VIDEO_DEFAULT_SIZE, VIDEO_DEFAULT_SIZE)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert seen and seen[0] >= 1024 and set(seen) == {seen[0]}
    assert seen[0] == VIDEO_DEFAULT_FRAMES * (VIDEO_DEFAULT_SIZE // 4) ** 2  # 17 latent frames x 8 x 8 = 1088
    assert len(seen) == 2 * 2  # two steps, CFG batched as two passes (cond + uncond)


def test_half_size_is_a_quarter_of_the_tokens(pipe):
    seen = _tokens_seen(pipe)
    out = generate_videos(pipe, [7], ["up"], steps=2, size=VIDEO_HALF_SIZE)
    assert out.shape == (1, VIDEO_DEFAULT_FRAMES, 3, VIDEO_HALF_SIZE, VIDEO_HALF_SIZE)
    assert torch.isfinite(out).all()
    assert seen[0] * 4 == VIDEO_DEFAULT_FRAMES * (VIDEO_DEFAULT_SIZE // 4) ** 2


def test_scorer_reads_real_clips_and_rejects_wrong_motion():
    digits, dirs = eval_pairs(12)
    clips = _real_clips(digits, dirs)
    good = score_videos(clips, digits, dirs)
    assert good["digit_accuracy"] >= 0.95 and good["clip_digit_accuracy"] == 1.0
    assert good["motion_accuracy"] == 1.0
    assert score_videos(clips, digits, [OPPOSITE[r] for r in dirs])["motion_accuracy"] == 0.0
    static = clips[:, :1].repeat(1, VIDEO_DEFAULT_FRAMES, 1, 1, 1)
    assert score_videos(static, digits, dirs)["motion_accuracy"] == 0.0
    assert score_videos(clips, [(d + 1) % 10 for d in digits], dirs)["clip_digit_accuracy"] <= 0.2


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason=NOT_SHIPPED)
def test_default_settings_draw_prompted_digit_moving_prompted_way(pipe):
    digits, dirs = [3, 0, 7, 1], ["left", "down", "right", "up"]
    videos = generate_videos(pipe, digits, dirs, seed=1234)
    s = score_videos(videos, digits, dirs)
    assert s["motion_accuracy"] >= 0.75, s
    assert s["clip_digit_accuracy"] >= 0.75, s
