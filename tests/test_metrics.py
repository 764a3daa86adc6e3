"""The digit classifier reads the embedded model's own baseline images (not only sklearn's digits)."""

from __future__ import annotations

import pytest
import torch

from hasten import metrics
from hasten.embedded import WEIGHTS_DIR

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(),
                                   reason="embedded weights not trained yet (hasten train-embedded)")


def test_holdout_accuracy_plain_and_augmented():
    """Held-out real digits, as rendered and shifted/scaled as the embedded model's training data were."""
    clf = metrics.digit_classifier()
    print(f"held-out accuracy: plain {clf.holdout_accuracy:.3f}, augmented {clf.holdout_accuracy_augmented:.3f}")
    assert clf.holdout_accuracy >= 0.97 and clf.holdout_accuracy_augmented >= 0.95


def test_reads_per_image_and_accuracy_over_sets():
    real, labels = metrics.real_digits()
    reads = metrics.read_digits(real[:20])
    assert len(reads) == 20 and all(isinstance(r, int) and 0 <= r <= 9 for r in reads)
    acc = metrics.digit_accuracy(real[:20], labels[:20])
    assert acc["predictions"] == reads and acc["accuracy"] == pytest.approx(
        sum(r == int(t) for r, t in zip(reads, labels[:20])) / 20)


@needs_weights
def test_reads_the_embedded_models_baseline_images():
    """All ten digits x 3 seeds from ``load_embedded()`` at its defaults (20 steps, CFG 4, 32x32): >= 95%."""
    import hasten
    from hasten.embedded import generate_digits

    pipe = hasten.load_embedded()
    images = torch.cat([generate_digits(pipe, list(range(10)), seed=s, steps=20, guidance=4.0) for s in (0, 10, 20)])
    assert images.shape == (30, 3, 32, 32)
    acc = metrics.digit_accuracy(images, list(range(10)) * 3)
    print(f"embedded baseline accuracy {acc['accuracy']:.3f}, per class {acc['per_class']}")
    assert acc["accuracy"] >= 0.95, acc


@pytest.mark.parametrize("size", [32, 16])
def test_reads_real_moving_digit_frames(size):
    """Frames of real rendered moving-digit clips (the video model's training data, ±10% scale, path offsets),
    cropped as the video scorer crops them, at the top and the half resolution: >= 95% per frame and >= 85%
    for every digit."""
    from hasten.embedded.video_data import digit_crops, downsample, load_digit_sprites, render_clips

    sprites, labels = load_digit_sprites()
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, len(sprites), (120,), generator=gen)
    clips = render_clips(sprites[idx], torch.randint(0, 4, (120,), generator=gen), gen)
    if size != clips.shape[-1]:
        clips = downsample(clips, size)
    crops = digit_crops(clips.reshape(-1, 1, size, size))
    acc = metrics.digit_accuracy(crops, labels[idx].repeat_interleave(clips.shape[1]))
    print(f"{size} px frame crops: accuracy {acc['accuracy']:.3f}, per digit {acc['per_class']}")
    assert acc["accuracy"] >= 0.95 and min(acc["per_class"].values()) >= 0.85, acc
