"""Every hasten ComfyUI node (EasyCache, Adaptive Guidance, Quantize Model, Sparse Attention, the Bottleneck
KSampler) on every ComfyUI model family, in the real engine (0.3.75, or ``$HASTEN_COMFYUI_DIR``).

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


# -- Quantize Model, Sparse Attention and the Bottleneck KSampler on every family ------------------
def _weights(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_family(comfy, built, family) -> None:
    import sys

    m, kind, base, n_base = _base(comfy, built, family)
    node = comfy.node_classes["HastenQuantize"]
    before = _weights(m)
    pm, text = ce.call_node(node, m, "int8_weight_only", 64, 0.0)
    rep = sys.modules[node.__module__].report(pm)
    assert rep is not None and len(rep.quantized) > 0, text
    assert f"{len(rep.quantized)} linear layers quantized" in text
    out, n = _run(comfy, pm, m, kind)
    assert n == n_base
    # int8 per-output-channel weights: rounding error <= 1/254 of each row's largest weight; through the few
    # layers of these tiny models it stays near that over the run (measured <= 0.002): 0.02 leaves a 10x margin,
    # and a quantized run must differ from the float one at all (> 0: the patches were swapped in)
    assert torch.isfinite(out).all() and 0 < _rel(out, base) < 0.02, _rel(out, base)
    # the original MODEL is unchanged: same weights, same image
    again, _ = _run(comfy, m, m, kind)
    assert torch.equal(again, base)
    after = _weights(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_attention_on_family(comfy, built, family) -> None:
    import sys

    m, kind, base, n_base = _base(comfy, built, family)
    node = comfy.node_classes["HastenSparseAttention"]
    mod = sys.modules[node.__module__]
    (off,) = ce.call_node(node, m, 1.0, 1, 16, 0, 0)
    assert torch.equal(_run(comfy, off, m, kind)[0], base)  # target_mass 1.0: off, bit-identical
    (pm,) = ce.call_node(node, m, 0.5, 1, 16, 0, 0)
    out, n = _run(comfy, pm, m, kind)
    st = mod.stats(pm)
    holder = pm.model_options["transformer_options"][mod.HOLDER_KEY]
    assert holder.warning is None, holder.warning  # a silent (or warned) no-op fails here
    assert st is not None and st.sparse_calls > 0 and st.blocks_kept < st.blocks_total, st
    assert n == n_base
    # random tiny models attend almost uniformly, so the dropped key blocks barely move the output (measured
    # <= 1e-3); it must move at all (the sparse outputs were used) and stay within 5% of the dense run
    assert not torch.equal(out, base)
    assert torch.isfinite(out).all() and _rel(out, base) < 0.05, (_rel(out, base), st.summary())
    (text,) = ce.call_node(comfy.node_classes["HastenRunStats"], pm, {"samples": out})
    assert f"{st.sparse_calls} sparse" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_bottleneck_on_family(comfy, built, family) -> None:
    m, kind, base, _ = _base(comfy, built, family)
    node = comfy.node_classes["HastenBottleneckSampler"]
    lat = ce.latent(kind)
    full = tuple(lat["samples"].shape[-2:])
    seen: list[int] = []  # latent elements per row reaching the diffusion model, call by call
    hook = m.model.diffusion_model.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].numel()))
    try:
        with ce.ForwardCounter(m) as fc:
            out, text = ce.call_node(node, m, 0, STEPS, 3.0, "euler", "simple", ce.conditioning(kind, 1),
                                     ce.conditioning(kind, 2), lat, "1,0.5,1", "0.25,0.75")
    finally:
        hook.remove()
    out = out["samples"]
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert f"3 stages: 1x latent {full[0]}x{full[1]}" in text, text
    assert f"0.5x latent {full[0] // 2}x{full[1] // 2}" in text, text
    assert fc.rows == 2 * STEPS  # every step ran (cond + uncond), the middle ones on fewer cells
    big = max(seen)
    assert sorted(set(seen)) == [big // 4, big], seen  # the middle stage really ran at half the side
    assert seen.count(big // 4) == seen.count(big), seen  # 4 of 8 steps
    assert not torch.equal(out, base)
    (off, _) = ce.call_node(node, m, 0, STEPS, 3.0, "euler", "simple", ce.conditioning(kind, 1),
                            ce.conditioning(kind, 2), ce.latent(kind), "1", "")
    assert torch.equal(off["samples"], base)  # scales all 1: the plain KSampler, bit-identical


@pytest.mark.parametrize("family", FAMILIES)
def test_bottleneck_refuses_sizes_it_cannot_halve(comfy, built, family) -> None:
    m, kind, _, _ = _base(comfy, built, family)
    node = comfy.node_classes["HastenBottleneckSampler"]
    lat = ce.latent(kind, size=10)  # half of 10 (LTX: of 5) is no whole multiple of any family's patch size
    with ce.ForwardCounter(m) as fc, pytest.raises(ValueError, match=r"KSampler \(Bottleneck, hasten\): .*whole "
                                                                      r"multiple of \d+"):
        ce.call_node(node, m, 0, STEPS, 3.0, "euler", "simple", ce.conditioning(kind, 1), ce.conditioning(kind, 2),
                     lat, "1,0.5,1", "0.25,0.75")
    assert fc.rows == 0  # refused before any sampling work, not a tensor-size crash midway


def test_wan22_two_experts_quantized_and_sparse(comfy) -> None:
    """Wan 2.2: each expert quantized / made sparse by its own node; both experts' work changes, the originals
    don't. (The Bottleneck KSampler samples all steps with one MODEL: a two-expert run is KSamplerAdvanced's.)"""
    import sys

    high, low = ce.tiny_wan(seed=1), ce.tiny_wan(seed=2)
    base = _two_experts(comfy, high, low)
    quant = comfy.node_classes["HastenQuantize"]
    qh, ql = (ce.call_node(quant, m, "int8_weight_only", 64, 0.0)[0] for m in (high, low))
    qmod = sys.modules[quant.__module__]
    assert len(qmod.report(qh).quantized) > 0 and len(qmod.report(ql).quantized) > 0
    out = _two_experts(comfy, qh, ql)
    assert torch.isfinite(out).all() and 0 < _rel(out, base) < 0.02, _rel(out, base)
    assert torch.equal(_two_experts(comfy, high, low), base)  # originals unchanged
    sparse = comfy.node_classes["HastenSparseAttention"]
    smod = sys.modules[sparse.__module__]
    sh, sl = (ce.call_node(sparse, m, 0.5, 1, 16, 0, 0)[0] for m in (high, low))
    out = _two_experts(comfy, sh, sl)
    for pm in (sh, sl):  # each expert's run is its own: warm-up, search and sparse steps within its 4 steps
        st = smod.stats(pm)
        assert pm.model_options["transformer_options"][smod.HOLDER_KEY].warning is None
        assert st is not None and st.sparse_calls > 0 and st.blocks_kept < st.blocks_total, st
    assert not torch.equal(out, base) and torch.isfinite(out).all() and _rel(out, base) < 0.05, _rel(out, base)
