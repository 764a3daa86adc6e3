"""EasyCache forecasting reuse (TaylorSeer/FoCa-style): extrapolating the transformation Δ from the last
computed steps instead of reusing the last one as a constant. Core arithmetic, both adapters, and the
measured gain on the embedded model at equal forwards."""

from __future__ import annotations

import sys

import pytest
import torch

from hasten import metrics
from hasten.caches import EasyCache, EasyCacheConfig
from hasten.caches.easycache import lagrange_extrapolate

import comfy_env as ce


# -- core ----------------------------------------------------------------------------------------
def _drive(cache: EasyCache, deltas, steps: int, skip_from: int) -> list[torch.Tensor]:
    """Computed calls give out = x + deltas(step); from ``skip_from`` on, the reuse estimates are returned."""
    cache.begin_run(steps)
    x = torch.ones(1, 2, 3, 3)
    got = []
    for s in range(steps):
        x = x * 0.95
        if s < skip_from:
            assert cache.should_compute("k", x, s, steps)
            cache.remember("k", x, x + deltas(s))
        else:
            assert not cache.should_compute("k", x, s, steps)
            got.append(cache.reuse("k", x) - x)
    return got


@pytest.mark.parametrize("forecast,order", [("linear", 1), ("quadratic", 2)])
def test_forecast_is_exact_for_polynomial_drift(forecast, order):
    """A Δ that drifts as a polynomial of the forecast's order in step index is extrapolated exactly."""
    def deltas(s):
        return torch.full((1, 2, 3, 3), 0.3 + 0.1 * s + (0.02 * s * s if order == 2 else 0.0))

    cfg = dict(threshold=1e6, warmup=0.5, final_steps=0, max_consecutive_reuse=0)  # 4 of 8 computed
    got = _drive(EasyCache(EasyCacheConfig(forecast=forecast, **cfg)), deltas, 8, skip_from=4)
    for s, d in zip(range(4, 8), got):
        torch.testing.assert_close(d, deltas(s), rtol=1e-5, atol=1e-5)
    const = _drive(EasyCache(EasyCacheConfig(forecast="none", **cfg)), deltas, 8, skip_from=4)
    assert all(torch.allclose(d, deltas(3)) for d in const)  # constant Δ: the last computed one


def test_lagrange_extrapolate_matches_hand_computation():
    pts = [(0.0, torch.tensor([1.0])), (2.0, torch.tensor([5.0]))]
    assert lagrange_extrapolate(pts, 3.0).item() == pytest.approx(7.0)
    pts.append((3.0, torch.tensor([10.0])))  # the quadratic through the three points is 1 + x^2
    assert lagrange_extrapolate(pts, 4.0).item() == pytest.approx(17.0)


def test_forecast_setting_is_validated():
    with pytest.raises(ValueError, match="forecast"):
        EasyCacheConfig(forecast="cubic")
    assert EasyCacheConfig().forecast == "linear"  # the measured best (see the README bench)


def test_forecast_state_is_per_branch_and_per_run():
    cache = EasyCache(EasyCacheConfig(threshold=1e6, warmup=0.5, final_steps=0, forecast="linear"))
    cache.begin_run(4)
    x0 = torch.ones(1, 1, 2, 2)
    for s in range(2):
        x = x0 * (1 - 0.1 * s)
        for key, k in (("a", 1.0), ("b", -1.0)):
            assert cache.should_compute(key, x, s, 4)
            cache.remember(key, x, x + k * (s + 1))
    x = x0 * 0.8
    for key, k in (("a", 1.0), ("b", -1.0)):
        assert not cache.should_compute(key, x, 2, 4)
        torch.testing.assert_close(cache.reuse(key, x) - x, torch.full_like(x, 3.0 * k))
    cache.begin_run(4)
    assert cache.should_compute("a", x, 2, 4)  # nothing carried into the next run


# -- the embedded model (diffusers) --------------------------------------------------------------
# the `embedded` fixture (conftest.py): the model, a 6-digit generator counting block-0 rows, the baseline


def test_threshold_zero_with_forecast_is_bit_identical(embedded):
    pipe, gen, (base, base_fwd) = embedded
    pipe.enable_easycache(threshold=0.0, forecast="quadratic")
    try:
        img, fwd = gen()
    finally:
        pipe.disable_easycache()
    assert fwd == base_fwd and torch.equal(img, base)


def test_forecast_beats_constant_at_equal_forwards(embedded):
    """Measured: at the same threshold (same forwards within one per image) linear forecasting is several
    dB closer to the baseline than the constant Δ (10 digits: 44.8 vs 39.1 dB at ~20.8 of 40 forwards)."""
    pipe, gen, (base, base_fwd) = embedded
    res = {}
    for forecast in ("none", "linear"):
        pipe.enable_easycache(threshold=0.1, forecast=forecast)
        try:
            img, fwd = gen()
        finally:
            pipe.disable_easycache()
        res[forecast] = (metrics.psnr(img, base), fwd)
    (p_none, f_none), (p_lin, f_lin) = res["none"], res["linear"]
    assert f_lin < 0.6 * base_fwd and f_none < 0.6 * base_fwd, res  # both really skip (block-0 rows)
    assert f_lin <= f_none + 1.0, res
    assert p_lin > p_none + 2.0, res
    assert p_lin > 38.0, res


# -- ComfyUI engine ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan(comfy):
    return ce.tiny_wan()


def _run(comfy, model, counter_model, steps=10):
    with ce.ForwardCounter(counter_model) as fc:
        out = ce.run_ksampler(comfy, model, "wan", steps=steps)
    return out, fc.rows


@pytest.mark.parametrize("forecast", ["none", "linear", "quadratic"])
def test_comfy_node_passes_forecast_through(comfy, wan, forecast):
    node = comfy.node_classes["HastenEasyCache"]
    base, n_base = _run(comfy, wan, wan)
    (off,) = ce.call_node(node, wan, 0.0, 0.2, 1.0, 4, False, forecast=forecast)
    out0, n0 = _run(comfy, off, wan)
    assert n0 == n_base and torch.equal(out0, base)
    (pm,) = ce.call_node(node, wan, 0.1, 0.2, 1.0, 4, False, forecast=forecast)
    out, n = _run(comfy, pm, wan)
    holder = pm.model_options["transformer_options"][sys.modules[node.__module__].HOLDER_KEY]
    assert holder.config.forecast == forecast
    assert n < n_base and torch.isfinite(out).all()
    assert 0 < ((out - base).abs().max() / base.abs().max()).item() < 0.05
