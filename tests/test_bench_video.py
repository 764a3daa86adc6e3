"""``hasten bench --model video`` end to end on the embedded video model (tiny run: one clip, 4 steps).

Checks the wiring and the figures' presence and sanity, not the model's quality (test_embedded_video.py holds
the quality asserts), so it passes on an undertrained snapshot too: every requested variant is measured,
each family really engages on the 5-D video latents (fewer forwards, a low-resolution stage, skipped key
blocks at 1088 tokens), and the JSON carries the video metrics.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from hasten import cli
from hasten.bench.variants import preset, video_preset
from hasten.embedded import video as video_mod

VARIANTS = ["hasten-easycache@0.5-w0.1-r8", "hasten-bottleneck@0.5-0.2-0.7", "hasten-sparse@0.8-b16"]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """The shipped video weights, or (until they are trained) the architecture initialised from the image model."""
    if (video_mod.VIDEO_WEIGHTS_DIR / "model_index.json").exists():
        return video_mod.VIDEO_WEIGHTS_DIR
    from diffusers import WanPipeline

    from hasten.embedded.train import portable_tokenizer_class
    from hasten.embedded.video_train import build_components

    root = tmp_path_factory.mktemp("weights_video")
    WanPipeline(**build_components(0)).save_pretrained(root, safe_serialization=True)
    portable_tokenizer_class(root)
    return root


def test_video_presets_cover_every_family():
    """The default video preset has every family, the whole stack and every peer; the families grid adds
    the remaining settings (int4, CFG truncation, more thresholds, block sizes, boundaries)."""
    compact = [v.name for v in preset("video", 20)]
    grid = [v.name for v in video_preset(20, "families")]
    for names in (compact, grid, [v.name for v in video_preset(20, "peers")]):
        assert names[0] == "baseline" and len(names) == len(set(names))
    for family in ("hasten-easycache@", "hasten-ag@", "hasten-bottleneck@", "hasten-sparse", "hasten-quant-w8a8",
                   "hasten-easycache+ag+bottleneck", "hasten-stack",
                   "diffusers-fbc@", "diffusers-taylorseer@", "diffusers-magcache@", "cache-dit-dbcache@"):
        assert any(n.startswith(family) for n in compact), family
    for family in ("hasten-cfg-truncate@", "hasten-quant-int8", "hasten-quant-int4", "hasten-stack"):
        assert any(n.startswith(family) for n in grid), family
    assert set(VARIANTS) <= set(grid)


def test_only_rejects_unknown_names_and_the_video_preset_needs_the_video_model(capsys, tmp_path):
    assert cli.main(["bench", "--model", "video", "--only", "nope@1", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "nope@1" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "video", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "--model video" in capsys.readouterr().err


def test_video_bench_json(weights_dir, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.setattr(video_mod, "VIDEO_WEIGHTS_DIR", weights_dir)
    out = tmp_path / "out"
    rc = cli.main(["bench", "--model", "video", "--preset", "families", "--only", ",".join(VARIANTS),
                   "--clips", "1", "--steps", "4",
                   "--repeats", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "motion acc" in printed and "keys kept" in printed
    data = json.loads((out / "bench.json").read_text())
    meta, rows = data["meta"], {r["name"]: r for r in data["rows"]}
    assert meta["tokens"] == 1088 and meta["frames"] == 17 and meta["steps"] == 4
    assert list(rows) == ["baseline", *VARIANTS]
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert r["median_s"] > 0 and r["speedup"] > 0 and r["forwards_per_image"] > 0
        for key in ("accuracy", "motion_accuracy", "clip_accuracy"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert math.isfinite(r["frechet"]) and r["frechet"] >= 0
        assert set(map(int, r["per_class"])) == {0}  # eval_pairs(1): digit 0
        if name != "baseline":
            assert r["psnr"] is not None and 0 < r["ssim"] <= 1.0
            assert r["summary"], name  # what hasten's feature did in that run
    base = rows["baseline"]
    assert base["forwards_per_image"] == pytest.approx(8.0)  # 4 steps x (cond + uncond)
    assert rows["hasten-easycache@0.5-w0.1-r8"]["forwards_per_image"] < base["forwards_per_image"]
    # bottleneck ran its middle stage at half the latent size, frames kept (17 x 4 x 4 tokens): fewer tokens
    # through the blocks, as many forwards
    bn = rows["hasten-bottleneck@0.5-0.2-0.7"]
    assert "(8, 8)" in bn["summary"] and bn["work"] < 1.0 and base["work"] == pytest.approx(1.0)
    assert bn["forwards_per_image"] == pytest.approx(base["forwards_per_image"])
    # sparse attention engaged at the top resolution and skipped key blocks
    kept = rows["hasten-sparse@0.8-b16"]["key_blocks_kept"]
    assert kept is not None and 0 < kept < 1
    assert (out / "pareto.png").stat().st_size > 5000
