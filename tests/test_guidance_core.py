"""Adaptive guidance core policy (samplers/guidance.py): per-sample decisions, LinearAG fit and files."""

from __future__ import annotations

import pytest
import torch

from hasten.samplers.guidance import (
    AdaptiveGuidance,
    GuidanceConfig,
    LinearAGCoefficients,
    find_coefficients,
    fit_linear_ag,
    model_key,
)


def test_config_validation_names_ranges():
    with pytest.raises(ValueError, match="mode"):
        GuidanceConfig(mode="foo")
    with pytest.raises(ValueError, match=r"\(0, 2\]"):
        GuidanceConfig(threshold=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GuidanceConfig(mode="truncate", truncate=1.5)
    assert GuidanceConfig(threshold=1.01).is_off and GuidanceConfig(mode="truncate", truncate=1.0).is_off
    assert not GuidanceConfig(threshold=0.99).is_off


def test_ag_stops_per_sample_not_per_batch():
    pol = AdaptiveGuidance(GuidanceConfig(threshold=0.99))
    pol.begin_run(6)
    a = torch.randn(1, 4, 8, 8)
    b = torch.randn(1, 4, 8, 8)
    for step in range(6):
        for item, unc in ((0, a.clone()), (1, -a)):  # item 0: cos = 1, item 1: cos = -1
            if pol.needs_uncond(item, step):
                pol.observe(item, step, a, unc)
            else:
                est = pol.estimate_uncond(item, step, a)
                assert torch.equal(est, a)  # AG answers a dropped uncond with cond (CFG -> cond)
                pol.observe(item, step, a, None, est)
    st = pol.end_run()
    assert st.uncond["0"] == ["C"] + ["."] * 5 and st.stop_step["0"] == 1
    assert st.uncond["1"] == ["C"] * 6 and st.stop_step["1"] is None
    assert st.forwards == 12 + 1 + 6 and st.baseline_forwards == 24
    assert pol.last_run is st
    del b


def test_off_threshold_and_truncate():
    pol = AdaptiveGuidance(GuidanceConfig(threshold=1.5))
    pol.begin_run(4)
    x = torch.ones(1, 3)
    for s in range(4):
        assert pol.needs_uncond(0, s)
        pol.observe(0, s, x, x)
    tr = AdaptiveGuidance(GuidanceConfig(mode="truncate", truncate=0.5))
    tr.begin_run(10)
    assert [tr.needs_uncond(0, s) for s in range(10)] == [True] * 5 + [False] * 5


def test_linear_ag_fit_recovers_coefficients_and_estimates(tmp_path):
    g = torch.Generator().manual_seed(0)
    true = [0.3, 0.5, 0.2]
    trajs = []
    for _ in range(3):
        c = [torch.randn(1, 4, 4, 4, generator=g) for _ in range(6)]
        u = [torch.randn(1, 4, 4, 4, generator=g)]
        for t in range(1, 6):
            u.append(true[0] * c[t] + true[1] * c[t - 1] + true[2] * u[t - 1])
        trajs.append(list(zip(c, u)))
    co = fit_linear_ag(trajs, model_key="abc")
    assert co.coefficients[0] is None
    for w in co.coefficients[1:]:
        assert w == pytest.approx(true, abs=1e-6)
    path = co.save(tmp_path / "abc.json")
    assert LinearAGCoefficients.load(path).coefficients == co.coefficients
    # linear mode: odd steps estimated (needs history), even steps computed
    pol = AdaptiveGuidance(GuidanceConfig(mode="linear", threshold=1.5, coefficients=co))
    pol.begin_run(6)
    c, u = zip(*trajs[0])
    for t in range(6):
        need = pol.needs_uncond(0, t)
        assert need == (t % 2 == 0)
        if need:
            pol.observe(0, t, c[t], u[t])
        else:
            est = pol.estimate_uncond(0, t, c[t])
            torch.testing.assert_close(est, u[t], atol=1e-5, rtol=1e-5)
            pol.observe(0, t, c[t], None, est)
    assert "".join(pol.current_stats().uncond["0"]) == "CLCLCL"


def test_coefficient_lookup_by_model_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    key = model_key({"num_layers": 2, "patch_size": [1, 2, 2]})
    assert key == model_key({"patch_size": [1, 2, 2], "num_layers": 2}) and len(key) == 16
    assert find_coefficients(key) is None
    co = LinearAGCoefficients(num_steps=4, coefficients=[None, [1.0, 0.0, 0.0]] * 2, model_key=key)
    co.save(tmp_path / "cache" / "linear_ag" / f"{key}.json")
    assert find_coefficients(key).coefficients == co.coefficients
    # a file next to the model wins, but only if it was calibrated for the same model
    other = LinearAGCoefficients(num_steps=4, coefficients=[None] * 4, model_key="different")
    other.save(tmp_path / "model" / "hasten_linear_ag.json")
    assert find_coefficients(key, tmp_path / "model").coefficients == co.coefficients
