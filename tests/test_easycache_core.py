"""EasyCache core policy: decisions, reuse arithmetic, branch isolation, configuration errors."""

from __future__ import annotations

import pytest
import torch

from hasten.caches import EasyCache, EasyCacheConfig, run_cached


def _trajectory(cache: EasyCache, key, steps: int, x0: torch.Tensor, decay: float = 0.9):
    """Drive the policy with a smooth synthetic denoiser out = 0.5 * x + 1; returns decisions and outputs."""
    cache.begin_run(steps)
    x, decisions, outs = x0.clone(), [], []
    for s in range(steps):
        if cache.should_compute(key, x, s, steps):
            out = 0.5 * x + 1.0
            cache.remember(key, x, out)
            decisions.append(True)
        else:
            out = cache.reuse(key, x)
            decisions.append(False)
        outs.append(out)
        x = decay * x + 0.05 * out
    return decisions, outs


def test_threshold_zero_always_computes():
    cache = EasyCache(EasyCacheConfig(threshold=0.0))
    decisions, _ = _trajectory(cache, "a", 20, torch.randn(1, 4, 8, 8))
    assert all(decisions)


def test_reuses_after_warmup_and_computes_last_step():
    cfg = EasyCacheConfig(threshold=5.0, warmup=0.2, max_consecutive_reuse=3)
    cache = EasyCache(cfg)
    decisions, _ = _trajectory(cache, "a", 20, torch.randn(1, 4, 8, 8))
    assert all(decisions[:4]), "warm-up steps (20% of 20) must be computed"
    assert decisions[-1], "the final step must be computed"
    assert decisions.count(False) >= 8
    run = 0
    for d in decisions:  # consecutive-reuse cap
        run = 0 if d else run + 1
        assert run <= 3


def test_reuse_adds_cached_transformation_to_current_input():
    cache = EasyCache(EasyCacheConfig(threshold=10.0, warmup=0.0, final_steps=0, forecast="none"))
    cache.begin_run(10)
    x0 = torch.randn(1, 3, 4, 4)
    for s, x in enumerate([x0, x0 * 0.9]):  # two computed steps give the transformation rate
        assert cache.should_compute("k", x, s, 10)
        cache.remember("k", x, 2 * x + 1)
    x2 = x0 * 0.85
    assert not cache.should_compute("k", x2, 2, 10)
    expected = x2 + ((2 * x0 * 0.9 + 1) - x0 * 0.9)
    torch.testing.assert_close(cache.reuse("k", x2), expected)


def test_shape_mismatch_reuses_cached_output():
    cache = EasyCache(EasyCacheConfig(threshold=10.0, warmup=0.0, final_steps=0))
    cache.begin_run(10)
    x0 = torch.randn(1, 4, 4, 4)
    for s, x in enumerate([x0, x0 * 0.9]):
        cache.should_compute("k", x, s, 10)
        last = torch.cat([x, x], dim=1) * 3  # learned-sigma style: twice the input channels
        cache.remember("k", x, last)
    assert not cache.should_compute("k", x0 * 0.85, 2, 10)
    assert torch.equal(cache.reuse("k", x0 * 0.85), last)


def test_branches_are_independent():
    cfg = EasyCacheConfig(threshold=0.3, warmup=0.1)
    shared = EasyCache(cfg)
    alone_a, alone_b = EasyCache(cfg), EasyCache(cfg)
    xa, xb = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8) * 5
    da, oa = _trajectory(alone_a, "a", 16, xa, decay=0.95)
    db, ob = _trajectory(alone_b, "b", 16, xb, decay=0.7)
    # interleave both branches through one cache: each must behave exactly as when alone
    shared.begin_run(16)
    x = {"a": xa.clone(), "b": xb.clone()}
    decay = {"a": 0.95, "b": 0.7}
    got = {"a": [], "b": []}
    for s in range(16):
        for k in ("a", "b"):
            if shared.should_compute(k, x[k], s, 16):
                out = 0.5 * x[k] + 1.0
                shared.remember(k, x[k], out)
                got[k].append(True)
            else:
                out = shared.reuse(k, x[k])
                got[k].append(False)
            x[k] = decay[k] * x[k] + 0.05 * out
    assert got["a"] == da and got["b"] == db
    assert da != db, "the two trajectories should lead to different decisions"


def test_run_cached_computes_only_needed_rows_and_is_exact_when_all_compute():
    cache = EasyCache(EasyCacheConfig(threshold=0.0))
    cache.begin_run(4)
    x = torch.randn(3, 2, 4, 4)
    calls = []

    def compute(rows):
        calls.append(rows)
        return x * 2 if rows is None else x[rows] * 2

    out = run_cached(cache, ["a", "b", "c"], x, [0, 0, 0], 4, compute)
    assert calls == [None] and torch.equal(out, x * 2)


def test_run_cached_mixed_rows():
    cache = EasyCache(EasyCacheConfig(threshold=100.0, warmup=0.0, final_steps=1))
    cache.begin_run(10)
    x = torch.randn(2, 2, 4, 4)
    seen = []

    def compute(rows):
        seen.append(rows)
        sel = x if rows is None else x[rows]
        return sel * 2 + 1

    run_cached(cache, ["a", "b"], x, [0, 0], 10, lambda r: compute(r))
    run_cached(cache, ["a", "b"], x * 0.9, [1, 1], 10, lambda r: (x * 0.9 if r is None else (x * 0.9)[r]) * 2 + 1)
    # now make branch "b" forced to compute (its step is final), "a" may reuse
    seen.clear()
    out = run_cached(cache, ["a", "b"], x * 0.8, [2, 9], 10, compute)
    assert seen == [[1]]
    assert out.shape == x.shape


@pytest.mark.parametrize("bad", [dict(threshold=-1), dict(warmup=1.5), dict(end=0.1, warmup=0.5),
                                 dict(max_consecutive_reuse=-1), dict(threshold=float("nan"))])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="EasyCacheConfig"):
        EasyCacheConfig(**bad)


def test_stats_and_reset():
    cache = EasyCache(EasyCacheConfig(threshold=5.0))
    _trajectory(cache, "a", 10, torch.randn(1, 4, 8, 8))
    stats = cache.end_run()
    assert stats.calls == 10 and stats.computed + stats.reused == 10 and stats.reused > 0
    assert cache.last_run is stats and stats.estimated_speedup > 1
    assert "EasyCache" in stats.summary()
    assert cache.current_stats().calls == 0  # state gone after the run


def _two_branches(sync: bool):
    """Two branches of one batch item: cond's output barely moves relative to its size, uncond's moves as
    fast as the input. Without sync they decide differently; with sync they must decide together."""
    cache = EasyCache(EasyCacheConfig(threshold=0.15, warmup=0.1, sync_branches=sync))
    cache.begin_run(12)
    x = torch.ones(1, 2, 4, 4)
    got = {"cond": [], "uncond": []}
    for s in range(12):
        x = x * 0.9
        for k, offset in (("cond", 100.0), ("uncond", 0.0)):
            if cache.should_compute((k, 0), x, s, 12, k, group=0):
                cache.remember((k, 0), x, x + offset)
                got[k].append(True)
            else:
                cache.reuse((k, 0), x)
                got[k].append(False)
    return got


def test_branches_of_one_item_decide_together():
    synced = _two_branches(True)
    assert synced["cond"] == synced["uncond"]
    assert not all(synced["cond"]), "synchronised branches should still reuse"
    free = _two_branches(False)
    assert free["cond"] != free["uncond"], "without sync these branches decide differently"
