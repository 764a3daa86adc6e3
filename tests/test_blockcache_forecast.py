"""Forecasting reuse for the block caches (Δ-DiT, ProfilingDiT), and which caches stack: two step caches
(SADA + EasyCache) are refused in both frameworks; a block cache under EasyCache works (its steps stay right).

Block forwards are counted at each block's attention (a pre-hook a reused block never reaches)."""

from __future__ import annotations

import pytest
import torch
from test_blockcache import BlockCounter

import hasten
from hasten import DeltaDiTConfig, ProfilingDiTConfig, UnsupportedModelError, metrics
from hasten.caches.blockcache import DeltaDiT, ProfilingDiT

KEYS = [("uncond", 0), ("cond", 0)]


# -- core ------------------------------------------------------------------------------------------
def _residual(s: int, k: float, order: int) -> torch.Tensor:
    return torch.full((1, 3), k * (0.5 + 0.1 * s + (0.03 * s * s if order == 2 else 0.0)))


@pytest.mark.parametrize("forecast,order", [("none", 0), ("linear", 1), ("quadratic", 2)])
def test_reused_span_forecasts_its_residual(forecast, order):
    """Δ-DiT on 2 branches: a residual drifting as a polynomial of the forecast's order is extrapolated exactly
    per branch (each from its own history); "none" adds the last computed residual as a constant."""
    cache = DeltaDiT(DeltaDiTConfig(num_cached_blocks=2, boundary=1.0, interval=2, warmup=0.0, final_steps=0,
                                    forecast=forecast))
    cache.begin_run(12, 4)
    x = torch.zeros(2, 4)
    checked = 0
    last: dict[float, int] = {}
    for s in range(12):
        plan = cache.plan(KEYS, s, x)
        for span in plan.record:
            h = torch.zeros(2, 3)
            out = torch.cat([_residual(s, 1.0, max(order, 1)), _residual(s, -2.0, max(order, 1))])
            cache.remember(KEYS, span, [h], [h + out])
            last = {1.0: s, -2.0: s}
        for span in plan.reuse:
            h = torch.ones(2, 3)
            (got,) = cache.reuse(KEYS, span, [h])
            if order == 0:
                want = torch.cat([_residual(last[k], k, 1) for k in (1.0, -2.0)])
            elif s >= 2 * order + 1:  # enough computed residuals for the order
                want = torch.cat([_residual(s, k, order) for k in (1.0, -2.0)])
            else:
                continue
            torch.testing.assert_close(got - h, want, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 3


def test_forecast_history_resets_per_run_and_setting_is_validated():
    cache = ProfilingDiT(ProfilingDiTConfig(forecast="linear"))
    assert DeltaDiT(DeltaDiTConfig(forecast="none")).forecast_order == 0
    assert cache.forecast_order == 1 and DeltaDiT().forecast_order == 1  # "linear": measured best
    cache.begin_run(10, 2)
    cache.plan(KEYS[:1], 0, torch.zeros(1, 2))
    cache._branches[KEYS[0]].past[(0, 1)] = [(0, (torch.zeros(1),))]
    cache.begin_run(10, 2)
    assert not cache._branches
    for cls in (DeltaDiTConfig, ProfilingDiTConfig):
        with pytest.raises(ValueError, match="forecast"):
            cls(forecast="cubic")


# -- the embedded model (diffusers) ------------------------------------------------------------------
def _gen(pipe, gen) -> tuple[torch.Tensor, float]:
    counter = BlockCounter(pipe.transformer.blocks)
    try:
        img, _ = gen()
        return img, counter.take() / 6
    finally:
        counter.remove()


@pytest.fixture(scope="module")
def block_base(embedded):
    pipe, gen, _ = embedded
    return _gen(pipe, gen)


def test_off_with_forecast_is_bit_identical(embedded, block_base):
    pipe, gen, _ = embedded
    base, n_base = block_base
    pipe.enable_delta_dit(interval=1, forecast="quadratic")
    try:
        img, n = _gen(pipe, gen)
    finally:
        pipe.disable_delta_dit()
    assert n == n_base and torch.equal(img, base)


@pytest.mark.parametrize("feature,settings", [("delta_dit", dict(interval=2)),
                                              ("profiling_dit", dict(threshold=0.3, max_reuse=1))])
def test_linear_forecast_beats_constant_at_equal_block_forwards(embedded, block_base, feature, settings):
    """Measured (10 digits): Δ-DiT@2 39.1 -> 46.7 dB, ProfilingDiT@0.3-r1 45.7 -> 55.2 dB at identical block
    forwards (the schedules do not depend on the forecast)."""
    pipe, gen, _ = embedded
    base, n_base = block_base
    res = {}
    for forecast in ("none", "linear"):
        getattr(pipe, f"enable_{feature}")(forecast=forecast, **settings)
        try:
            img, n = _gen(pipe, gen)
        finally:
            getattr(pipe, f"disable_{feature}")()
        res[forecast] = (metrics.psnr(img, base), n)
    (p_none, n_none), (p_lin, n_lin) = res["none"], res["linear"]
    assert n_lin == n_none < 0.85 * n_base, (res, n_base)  # real block work saved, the same amount
    assert p_lin > p_none + 3.0, res


def test_sada_and_easycache_never_stack(embedded):
    pipe, _, _ = embedded
    pipe.enable_easycache(0.1)
    try:
        with pytest.raises(UnsupportedModelError, match="both step-level caches.*disable_easycache"):
            pipe.enable_sada()
        pipe.enable_easycache(0.2)  # replacing itself stays allowed
    finally:
        pipe.disable_easycache()
    pipe.enable_sada()
    try:
        with pytest.raises(UnsupportedModelError, match="both step-level caches.*disable_sada"):
            pipe.enable_easycache(0.1)
    finally:
        pipe.disable_sada()
    assert "sada" not in hasten.features(pipe) and "easycache" not in hasten.features(pipe)


def test_block_cache_under_easycache_sees_the_right_steps(embedded, block_base):
    """EasyCache skips whole steps above Δ-DiT: the block cache plans exactly the steps EasyCache computed, with
    their true step index (so its schedule and forecast stay right), and the two savings add up."""
    pipe, gen, _ = embedded
    base, n_base = block_base
    pipe.enable_delta_dit(interval=2, forecast="linear")
    pipe.enable_easycache(0.1)
    cache = hasten.features(pipe)["delta_dit"].hooks["transformer"].cache
    planned: list[int] = []
    plan = cache.plan

    def spy(keys, step, x, labels=None):
        planned.append(step)
        return plan(keys, step, x, labels)

    cache.plan = spy
    try:
        img, n = _gen(pipe, gen)
        ec = hasten.stats(pipe)["easycache"]["transformer"]
        dd = hasten.stats(pipe)["delta_dit"]["transformer"]
    finally:
        pipe.disable_easycache()
        pipe.disable_delta_dit()
    computed = sorted({s for b in ec.branches.values() for s, d in enumerate(b.decisions) if d})
    # the inner calls (cond and uncond: 2 per step) come exactly at the steps EasyCache computed, true index
    assert sorted(set(planned)) == computed and len(planned) == 2 * len(computed), (planned, computed)
    assert len(computed) < 20  # whole steps were skipped above the block cache
    assert 0 < ec.reused and 0 < dd.reused
    assert dd.calls == ec.computed  # the block cache saw exactly the calls EasyCache ran
    assert n < 0.6 * n_base, (n, n_base)
    assert metrics.psnr(img, base) > 30.0


# -- ComfyUI engine (embedded weights) -------------------------------------------------------------
@pytest.fixture(scope="module")
def target(comfy):
    from hasten.bench.comfy import ComfyTarget

    return ComfyTarget()


def _comfy(target, *nodes: tuple[str, dict]) -> tuple[torch.Tensor, int, object]:
    model = target.base
    for node_id, settings in nodes:
        model = target.env.nodes.NODE_CLASS_MAPPINGS[node_id].execute(model, **settings).result[0]
    target.model = model
    counter = BlockCounter(target.base.model.diffusion_model.blocks)
    try:
        return target.generate([0, 3, 7], 0, 20, 4.0), counter.take(), model
    finally:
        counter.remove()
        target.model = target.base


def test_comfy_block_nodes_forecast(target):
    from hasten.nodes.blockcache import HOLDER_KEY, stats

    base, n_base, _ = _comfy(target)
    out = {}
    for forecast in ("none", "linear"):
        img, n, m = _comfy(target, ("HastenDeltaDiT", dict(interval=2, forecast=forecast)))
        assert m.model_options["transformer_options"][HOLDER_KEY].make().config.forecast == forecast
        assert stats(m).computed == n < n_base
        out[forecast] = (metrics.psnr(img, base), n)
    assert out["linear"][1] == out["none"][1] and out["linear"][0] > out["none"][0] + 2.0, out


def test_comfy_step_caches_never_stack(target):
    nodes = target.env.nodes.NODE_CLASS_MAPPINGS
    ec = nodes["HastenEasyCache"].execute(target.base, reuse_threshold=0.1).result[0]
    with pytest.raises(Exception, match="two step-level caches never stack") as err:
        nodes["HastenSADA"].execute(ec, max_interval=1)
    assert type(err.value).__name__ == "UnsupportedModelError"
    sada = nodes["HastenSADA"].execute(target.base, max_interval=1).result[0]
    with pytest.raises(Exception, match="two step-level caches never stack"):
        nodes["HastenEasyCache"].execute(sada, reuse_threshold=0.1)
    nodes["HastenEasyCache"].execute(ec, reuse_threshold=0.2)  # re-patching the same cache replaces it


@pytest.mark.parametrize("block_first", [False, True])
def test_comfy_block_cache_with_easycache_in_either_order(target, block_first):
    from hasten.nodes import blockcache, easycache

    base, n_base, _ = _comfy(target)
    nodes = [("HastenEasyCache", dict(reuse_threshold=0.1)), ("HastenDeltaDiT", dict(interval=2))]
    img, n, m = _comfy(target, *(nodes[::-1] if block_first else nodes))
    ec, dd = easycache.stats(m), blockcache.stats(m)
    assert ec.reused > 0 and dd.reused > 0
    assert dd.calls == ec.computed and dd.computed == n < 0.6 * n_base, (dd.calls, ec.computed, n, n_base)
    assert metrics.psnr(img, base) > 30.0
