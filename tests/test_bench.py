"""hasten bench machinery on a tiny Wan pipeline: interleaving, forward counts, metrics, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hasten.bench.report import table, write_json, write_plot
from hasten.bench.runner import run_bench
from hasten.bench.variants import Variant, baseline, diffusers_fbc, hasten_easycache, preset

import tiny_pipes as tp


def _generate(pipe, kw):
    def gen(p, seed):
        g = torch.Generator().manual_seed(seed)
        out = p(**kw, num_inference_steps=10, generator=g, output_type="pt").frames
        return out[:, 0].float().clamp(0, 1)

    return gen


@pytest.fixture(scope="module")
def tiny_wan():
    pipe, kw = tp.wan(batch=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


def test_bench_rows(tiny_wan, tmp_path):
    pipe, kw = tiny_wan
    missing = Variant("peer-x", "peer", unavailable="peer-x is not installed")
    variants = [baseline(), hasten_easycache(0.0), hasten_easycache(0.5), diffusers_fbc(0.5), missing]
    rows = run_bench(pipe, variants, _generate(pipe, kw), seeds=[0, 1], repeats=2, progress=False)
    by = {r.name: r for r in rows}
    base = by["baseline"]
    assert base.speedup == pytest.approx(1.0) and len(base.times) == 2
    assert base.forwards_per_image == pytest.approx(20.0)  # 10 steps x (cond + uncond)
    zero = by["hasten-easycache@0"]
    assert zero.forwards_per_image == base.forwards_per_image and math.isinf(zero.psnr) and zero.ssim == pytest.approx(1.0)
    ec = by["hasten-easycache@0.5"]
    assert ec.forwards_per_image < base.forwards_per_image and math.isfinite(ec.psnr)
    assert by["diffusers-fbc@0.5"].error is None
    assert by["peer-x"].error == "peer-x is not installed" and by["peer-x"].median_s is None
    text = table(rows)
    assert "hasten-easycache@0.5" in text and "peer-x: not measured" in text
    write_json(rows, tmp_path / "b.json", {"k": 1})
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"] for r in data["rows"]] == [v.name for v in variants]
    write_plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5000
    assert pipe.transformer.forward.__name__ != "new_forward"  # every variant removed itself


def test_bench_requires_baseline_first(tiny_wan):
    pipe, kw = tiny_wan
    with pytest.raises(ValueError, match="baseline"):
        run_bench(pipe, [hasten_easycache(0.1)], _generate(pipe, kw), seeds=[0], repeats=1, progress=False)


def test_presets():
    names = [v.name for v in preset("default", 20)]
    assert names[0] == "baseline" and "hasten-easycache@0.2" in names
    assert any(n.startswith("diffusers-fbc") for n in names) and any(n.startswith("diffusers-magcache") for n in names)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope", 20)


def test_cache_dit_peer_runs_and_restores(tiny_wan):
    """The cache-dit DBCache peer (installed with the test extra) is measured like any variant."""
    from hasten.bench.variants import cache_dit_dbcache

    pipe, kw = tiny_wan
    gen = _generate(pipe, kw)
    peer = cache_dit_dbcache(0.5)
    assert peer.unavailable is None, peer.unavailable
    before = gen(pipe, 0)
    rows = run_bench(pipe, [baseline(), peer], gen, seeds=[0], repeats=1, progress=False)
    assert rows[1].error is None and rows[1].forwards_per_image <= rows[0].forwards_per_image
    assert torch.equal(gen(pipe, 0), before)  # removed without a trace
