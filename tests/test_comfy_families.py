"""hasten's EasyCache and Adaptive Guidance nodes on every ComfyUI model family, in the real engine.

Tiny random models (tests/comfy_env.py): Wan 2.1 and SD3 through ComfyUI's loader and detection; SD1.x,
SDXL, Flux, Qwen-Image, HunyuanVideo and LTX-Video built directly (their detection needs full-size
weights). Wan 2.2 A14B is two Wan-architecture experts sampled by two KSamplerAdvanced nodes. Work is
counted as rows reaching each diffusion model's first block; outputs are compared with the unpatched run.
"""

from __future__ import annotations

import pytest
import torch

import comfy_env as ce

STEPS = 8
FAMILIES = list(ce.FAMILIES)
# EasyCache threshold per family that skips on these random tiny models (UNets change faster per step)
THRESHOLD = {"sd15": 0.2, "sdxl": 0.2}


@pytest.fixture(scope="module")
def built(comfy) -> dict:
    return {}


def _model(built: dict, family: str):
    if family not in built:
        build, kind = ce.FAMILIES[family]
        built[family] = (build(), kind, None, 0)
    return built[family]


def _run(comfy, model, counter_model, kind):
    with ce.ForwardCounter(counter_model) as fc:
        out = ce.run_ksampler(comfy, model, kind, steps=STEPS)
    return out, fc.rows


def _base(comfy, built, family):
    m, kind, base, _ = _model(built, family)
    if base is None:
        base, rows = _run(comfy, m, m, kind)
        built[family] = (m, kind, base, rows)
    return built[family]


def _rel(out: torch.Tensor, base: torch.Tensor) -> float:
    return ((out - base).abs().max() / base.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_easycache_on_family(comfy, built, family) -> None:
    m, kind, base, n_base = _base(comfy, built, family)
    assert n_base == 2 * STEPS  # cond + uncond reach the first block every step
    node = comfy.node_classes["HastenEasyCache"]
    off, n_off = _run(comfy, ce.call_node(node, m, 0.0, 0.2, 1.0, 4, False)[0], m, kind)
    assert n_off == n_base and torch.equal(off, base)  # threshold 0: bit-identical
    (pm,) = ce.call_node(node, m, THRESHOLD.get(family, 0.1), 0.2, 1.0, 4, False)
    out, n = _run(comfy, pm, m, kind)
    assert n <= n_base - (2 if family in THRESHOLD else 4), (family, n, n_base)
    assert torch.isfinite(out).all() and _rel(out, base) < 0.1, _rel(out, base)
    (text,) = ce.call_node(comfy.node_classes["HastenRunStats"], pm, {"samples": out})
    assert f"EasyCache (hasten): {n}/{n_base} branch forwards computed" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_guidance_on_family(comfy, built, family) -> None:
    m, kind, base, n_base = _base(comfy, built, family)
    node = comfy.node_classes["HastenAdaptiveGuidance"]
    off, n_off = _run(comfy, ce.call_node(node, m, "ag", 1.5, 0.5)[0], m, kind)
    assert n_off == n_base and torch.equal(off, base)  # threshold > 1: plain CFG, bit-identical
    (pm,) = ce.call_node(node, m, "ag", 0.5, 0.5)  # random models: cond and uncond agree at once
    out, n = _run(comfy, pm, m, kind)
    assert n == STEPS + 1, (family, n)  # the uncond pass ran on the first step only
    assert torch.isfinite(out).all() and _rel(out, base) < 0.05, _rel(out, base)
    (text,) = ce.call_node(comfy.node_classes["HastenRunStats"], pm, {"samples": out})
    assert f"Adaptive Guidance (hasten): {n}/{n_base} rows run" in text


def _two_experts(comfy, high, low, switch: int = 4) -> torch.Tensor:
    """Wan 2.2 A14B style: the high-noise expert samples steps [0, switch), the low-noise one the rest."""
    ksa = comfy.nodes.KSamplerAdvanced()
    pos, neg = ce.conditioning("wan", 1), ce.conditioning("wan", 2)
    (mid,) = ksa.sample(high, "enable", 0, STEPS, 3.0, "euler", "simple", pos, neg, ce.latent("wan"), 0, switch,
                        "enable")
    (out,) = ksa.sample(low, "disable", 0, STEPS, 3.0, "euler", "simple", pos, neg, mid, switch, 10000, "disable")
    return out["samples"]


def test_wan22_two_experts_each_with_its_own_cache(comfy) -> None:
    import sys

    high, low = ce.tiny_wan(seed=1), ce.tiny_wan(seed=2)
    with ce.ForwardCounter(high) as fh, ce.ForwardCounter(low) as fl:
        base = _two_experts(comfy, high, low)
    assert (fh.rows, fl.rows) == (8, 8)
    node = comfy.node_classes["HastenEasyCache"]
    mod = sys.modules[node.__module__]
    off = _two_experts(comfy, *(ce.call_node(node, m, 0.0, 0.2, 1.0, 4, False)[0] for m in (high, low)))
    assert torch.equal(off, base)
    ph, pl = (ce.call_node(node, m, 0.3, 0.0, 1.0, 4, False)[0] for m in (high, low))
    with ce.ForwardCounter(high) as fh, ce.ForwardCounter(low) as fl:
        out = _two_experts(comfy, ph, pl)
    sh, sl = mod.stats(ph), mod.stats(pl)
    # each expert's run is its own: 4 steps, its own branches, and the low-noise expert starts fresh
    assert sh.num_steps == sl.num_steps == 4
    assert all(b.calls == 4 for b in [*sh.branches.values(), *sl.branches.values()])
    assert all(b.decisions[0] for b in sl.branches.values())  # nothing carried over from the other expert
    assert sh.computed == fh.rows and sl.computed == fl.rows and fh.rows + fl.rows < 16
    assert torch.isfinite(out).all() and _rel(out, base) < 0.1, _rel(out, base)
    # the same patched expert pair again: identical (state reset between runs)
    assert torch.equal(_two_experts(comfy, ph, pl), out)
