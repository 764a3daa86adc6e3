"""Adaptive guidance and bottleneck nodes in the real ComfyUI engine (tiny Wan 2.1, KSampler)."""

from __future__ import annotations

import sys

import pytest
import torch

import comfy_env as ce

STEPS = 8


@pytest.fixture(scope="module")
def wan(comfy):
    return ce.tiny_wan()


def _ag(comfy, model, **kw):
    node = comfy.node_classes["HastenAdaptiveGuidance"]
    args = dict(mode="ag", threshold=0.993, truncate_percent=0.5)
    args.update(kw)
    (m,) = ce.call_node(node, model, **args)
    return m, sys.modules[node.__module__]


def _sample(comfy, model, counter_model, **kw):
    with ce.ForwardCounter(counter_model) as fc:
        out = ce.run_ksampler(comfy, model, "wan", steps=STEPS, **kw)
    return out, fc.rows


def test_ag_node_off_identical_and_drops_real_rows(comfy, wan):
    base, n_base = _sample(comfy, wan, wan)
    assert n_base == 2 * STEPS
    off, _ = _ag(comfy, wan, threshold=1.5)
    out, n = _sample(comfy, off, wan)
    assert n == n_base and torch.equal(out, base)
    m, mod = _ag(comfy, wan, threshold=0.5)  # random model: cond and uncond agree far above 0.5
    out, n = _sample(comfy, m, wan)
    st = mod.stats(m)
    assert n == STEPS + 1 == st.forwards, (n, st.summary())
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    m, mod = _ag(comfy, wan, mode="truncate", truncate_percent=0.5)
    out, n = _sample(comfy, m, wan)
    assert n == STEPS + STEPS // 2


def test_ag_node_per_sample_in_a_batch(comfy, wan):
    """Item 0's negative equals its positive (converges at once); item 1's does not."""
    pos = ce.conditioning("wan", 1, batch=2)
    neg = ce.conditioning("wan", 2, batch=2)
    neg[0][0] = neg[0][0].clone()
    neg[0][0][0] = pos[0][0][0]
    neg[0][0][1] = -20 * pos[0][0][1]
    lat = ce.latent("wan", batch=2)
    m, mod = _ag(comfy, wan, threshold=0.999999)
    out, n = _sample(comfy, m, wan, positive=pos, negative=neg, lat=lat)
    st = mod.stats(m)
    assert "".join(st.uncond["0"]) == "C" + "." * (STEPS - 1)
    assert "".join(st.uncond["1"]) == "C" * STEPS
    assert n == 2 * STEPS + 1 + STEPS
    base, _ = _sample(comfy, wan, wan, positive=pos, negative=neg, lat=lat)
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)


def _bottleneck(comfy, model, scales="1,0.5,1", boundaries="0.25,0.75", **kw):
    node = comfy.node_classes["HastenBottleneckSampler"]
    pos, neg = ce.conditioning("wan", 1), ce.conditioning("wan", 2)
    out = ce.call_node(node, model, 0, STEPS, 3.0, "euler", "simple", pos, neg, ce.latent("wan", size=16),
                       scales, boundaries, 0.0)[0]
    return out["samples"]


def test_bottleneck_node_runs_stages_and_off_is_ksampler(comfy, wan):
    base = ce.run_ksampler(comfy, wan, "wan", steps=STEPS, seed=0)
    off = _bottleneck(comfy, wan, scales="1,1,1")
    assert torch.equal(off, base)
    shapes: list = []
    h = wan.model.diffusion_model.head.register_forward_pre_hook(lambda mod, a: shapes.append(a[0].shape[1]))
    out = _bottleneck(comfy, wan)
    h.remove()
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert min(shapes) * 4 == max(shapes)  # the middle stage ran on a quarter of the tokens
    assert len(shapes) == STEPS  # one batched cond+uncond call per step
    with pytest.raises(ValueError, match="multiple of"):
        _bottleneck(comfy, wan, scales="1,0.3,1")
    with pytest.raises(ValueError, match="start and end"):
        _bottleneck(comfy, wan, scales="0.5,1,1")


def test_ag_easycache_bottleneck_compose(comfy, wan):
    ec = comfy.node_classes["HastenEasyCache"]
    (m,) = ce.call_node(ec, wan, 0.1, 0.2, 1.0, 4, False)
    m, mod = _ag(comfy, m, threshold=0.5)
    with ce.ForwardCounter(wan) as fc:
        out = _bottleneck(comfy, m)
    assert torch.isfinite(out).all() and fc.rows < 2 * STEPS
