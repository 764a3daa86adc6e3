"""SADA (stability-guided adaptive step skipping): the core criterion and extrapolation, the diffusers hook on
the embedded model (quality, block-0 forwards, off/restore exactness) and the ComfyUI node."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import EMBEDDED_DIGITS

import hasten
from hasten import metrics
from hasten.caches.sada import SADA, SADAConfig

import comfy_env as ce


# -- core ----------------------------------------------------------------------------------------
def _drive(cache: SADA, f, steps: int, key="k") -> tuple[list[bool], list[torch.Tensor]]:
    """Computed calls return f(step); returns the decisions and the outputs (real or extrapolated)."""
    cache.begin_run(steps)
    x = torch.ones(1, 2, 2, 2)
    decisions, outs = [], []
    for s in range(steps):
        if cache.should_compute(key, x, s, steps):
            out = f(s)
            cache.remember(key, x, out)
            decisions.append(True)
        else:
            out = cache.reuse(key, x)
            decisions.append(False)
        outs.append(out)
    return decisions, outs


def _linear(s):
    return torch.full((1, 2, 2, 2), 1.0 - 0.1 * s)


def test_off_always_computes():
    decisions, _ = _drive(SADA(SADAConfig(max_interval=0)), _linear, 20)
    assert all(decisions)


@pytest.mark.parametrize("max_interval", [1, 2, 3])
def test_stable_trajectory_skips_up_to_the_cap_and_extrapolates_exactly(max_interval):
    cfg = SADAConfig(max_interval=max_interval, start=0.2, end=1.0, final_steps=1)
    decisions, outs = _drive(SADA(cfg), _linear, 20)
    assert all(decisions[:4]) and decisions[-1]
    assert decisions.count(False) >= 4
    run = 0
    for d in decisions:
        run = 0 if d else run + 1
        assert run <= max_interval
    for s, out in enumerate(outs):  # a linear f is extrapolated exactly (Adams-Bashforth-like, order 1)
        torch.testing.assert_close(out, _linear(s))


def test_unstable_trajectory_is_computed():
    """f accelerating away (second difference against the first) never passes the stability test."""
    decisions, _ = _drive(SADA(SADAConfig(max_interval=4)), lambda s: torch.full((1, 2, 2, 2), -0.05 * s * s), 20)
    assert all(decisions)


def test_order_two_is_exact_for_quadratic_outputs():
    def f(s):
        return torch.full((1, 2, 2, 2), 0.02 * s * s)  # d1 - d0 > 0: stable by the criterion

    decisions, outs = _drive(SADA(SADAConfig(max_interval=1, order=2)), f, 20)
    assert decisions.count(False) >= 4
    for s, out in enumerate(outs):
        torch.testing.assert_close(out, f(s))


def test_branches_keep_their_own_state_and_runs_reset():
    cache = SADA(SADAConfig(max_interval=1, sync_branches=False))
    cache.begin_run(10)
    x = torch.ones(1, 1, 2, 2)
    for s in range(5):
        for key, k in (("a", 1.0), ("b", -2.0)):
            if cache.should_compute(key, x, s, 10):
                cache.remember(key, x, torch.full_like(x, k * s))
            else:
                torch.testing.assert_close(cache.reuse(key, x), torch.full_like(x, k * s))
    st = cache.end_run()
    assert set(st.branches) == {"a", "b"} and st.reused > 0
    cache.begin_run(10)
    assert cache.should_compute("a", x, 5, 10)  # nothing carried into the next run


def test_shape_change_restarts_the_trajectory():
    cache = SADA(SADAConfig(max_interval=2, start=0.0))
    cache.begin_run(10)
    for s in range(4):
        x = torch.ones(1, 1, 2, 2)
        if cache.should_compute("k", x, s, 10):
            cache.remember("k", x, _linear(s)[:, :1])
    assert cache.should_compute("k", torch.ones(1, 1, 4, 4), 4, 10)


@pytest.mark.parametrize("bad", [dict(max_interval=-1), dict(order=3), dict(start=0.5, end=0.2),
                                 dict(threshold="x"), dict(sync_branches=1)])
def test_bad_settings_are_rejected(bad):
    with pytest.raises((TypeError, ValueError)):
        SADAConfig(**bad)


# -- the embedded model (diffusers) --------------------------------------------------------------
DIGITS = EMBEDDED_DIGITS  # what the `embedded` fixture (conftest.py) generates


def test_off_is_bit_identical_and_disable_restores(embedded):
    pipe, gen, (base, base_fwd) = embedded
    forward = pipe.transformer.forward
    pipe.enable_sada(max_interval=0)
    try:
        img, fwd = gen()
    finally:
        pipe.disable_sada()
    assert fwd == base_fwd and torch.equal(img, base)
    assert pipe.transformer.forward == forward and "sada" not in hasten.features(pipe)
    img, fwd = gen()
    assert fwd == base_fwd and torch.equal(img, base)


def test_skips_real_forwards_and_stays_close(embedded, caplog):
    pipe, gen, (base, base_fwd) = embedded
    pipe.enable_sada(max_interval=2)
    try:
        with caplog.at_level("INFO", logger="hasten"):
            img, fwd = gen()
        st = next(iter(hasten.stats(pipe)["sada"].values()))
    finally:
        pipe.disable_sada()
    assert fwd < base_fwd - 4, (fwd, base_fwd)  # rows that reached block 0
    assert st.computed / len(DIGITS) == pytest.approx(fwd) and st.calls / len(DIGITS) == base_fwd
    assert any("SADA" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert metrics.psnr(img, base) > 28.0


# -- ComfyUI engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan(comfy):
    return ce.tiny_wan()


def _run(comfy, model, counter_model, steps=12):
    with ce.ForwardCounter(counter_model) as fc:
        out = ce.run_ksampler(comfy, model, "wan", steps=steps)
    return out, fc.rows


def test_comfy_node_off_identical_and_skips(comfy, wan):
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["HastenSADA"] == "SADA (hasten)"
    node = comfy.node_classes["HastenSADA"]
    mod = sys.modules[node.__module__]
    base, n_base = _run(comfy, wan, wan)
    (off,) = ce.call_node(node, wan, 0)
    out0, n0 = _run(comfy, off, wan)
    assert n0 == n_base and torch.equal(out0, base)
    (pm,) = ce.call_node(node, wan, 2, 1.0)  # threshold 1: skip whenever the curvature is not extreme
    out, n = _run(comfy, pm, wan)
    st = mod.stats(pm)
    assert st is not None and st.calls == n_base and st.computed == n
    assert n < n_base and torch.isfinite(out).all()
    assert set(st.branches) == {"cond[0]", "uncond[0]"}
    assert ((out - base).abs().max() / base.abs().max()).item() < 0.2
