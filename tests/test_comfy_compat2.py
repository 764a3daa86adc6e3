"""Flux ControlNet in ComfyUI under hasten's step and block caches, and ComfyUI's compile node with the block caches.

Issue 15, ComfyUI side (the SD1.5 ControlNet, LoRA and compile tests of the other nodes: test_comfy_compat.py).

- **Flux ControlNet**: a tiny Flux (4 double + 4 single blocks, hidden 64) and a tiny XLabs-format Flux ControlNet
  (``comfy.ldm.flux.controlnet.ControlNetFlux``: 2 double blocks, RGB hint; the state-dict layout ComfyUI's
  ``load_controlnet_state_dict`` routes to ``load_controlnet_flux_xlabs_mistoline``), wrapped as that loader wraps
  it (``comfy.controlnet.ControlNet`` with ``y``/``guidance`` extra conds) and applied with ``ControlNetApplyAdvanced``.
  The loader itself cannot build it at tiny size: it detects the config with ``model_config_from_unet``, whose Flux
  branch hard-codes 24 heads x 128 (hidden 3072), so the net is built directly, as the tiny Flux is. Under every
  cache the control delta (output with control - without, same cache) must match the delta with no cache.
- **Compile**: ComfyUI's TorchCompileModel wrapper over a block cache on the tiny Flux: the block patches run inside
  the compiled diffusion model. Compiled == eager exactly; a second run compiles no new graph.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from graph_counter import GraphCounter

import comfy_env as ce

STEPS = 8
CFG = 1.0  # Flux: distilled guidance (the ``guidance`` cond), no CFG batch
FLUX_CN_CONFIG = {**ce.FLUX_TINY_CONFIG, "depth": 4, "depth_single_blocks": 4}
CACHES: dict[str, tuple[str, dict]] = {  # node id and settings that skip work in 8 steps on the tiny Flux
    "easycache": ("HastenEasyCache", dict(reuse_threshold=0.3, start_percent=0.2, end_percent=1.0)),
    "sada": ("HastenSADA", dict(threshold=0.5)),
    "delta_dit": ("HastenDeltaDiT", dict(interval=2)),
    "profiling_dit": ("HastenProfilingDiT", dict(threshold=2.0, profile=0.25)),
    "cachequant": ("HastenCacheQuant", dict(schedule="0,1,2,4,6,7", steps=STEPS, method="int8_weight_only")),
}


def tiny_flux_controlnet(config: dict, seed: int = 5) -> Any:
    """An XLabs-format Flux ControlNet (2 double blocks, RGB hint) for a tiny Flux of ``config``, wrapped as
    ComfyUI's XLabs loader wraps one, with seeded weights."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management
    import comfy.ops

    cfg = {k: v for k, v in config.items() if k != "image_model"}
    cfg.update(depth=2, depth_single_blocks=0, **ce._newer_fields("Flux"))
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                                   device=torch.device("cpu"), **cfg)
    ce.fill_(dict(net.named_parameters()), seed)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device(),
                                      manual_cast_dtype=None, extra_conds=["y", "guidance"])


def _sample(comfy, model: Any, pos, neg, lat) -> torch.Tensor:
    (out,) = comfy.nodes.KSampler().sample(model, 0, STEPS, CFG, "euler", "simple", pos, neg, lat, denoise=1.0)
    return out["samples"]


def _patch(comfy, feature: str, model: Any) -> Any:
    node_id, settings = CACHES[feature]
    return ce.call_node(comfy.node_classes[node_id], model, **settings)[0]


def _reused(comfy, feature: str, patched: Any) -> int:
    node_id = CACHES[feature][0]
    run = importlib.import_module(comfy.node_classes[node_id].__module__).stats(patched)
    assert run is not None, f"{node_id} recorded no run"
    return run.reused


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def flux(comfy) -> dict[str, Any]:
    import comfy.utils as comfy_utils

    comfy_utils.PROGRESS_BAR_ENABLED = False
    m = ce.direct("Flux", FLUX_CN_CONFIG)
    pos, neg, lat = ce.conditioning("flux", 1), ce.conditioning("flux", 2), ce.latent("flux")
    g = torch.Generator().manual_seed(3)
    side = lat["samples"].shape[-1] * 8
    hint = (torch.rand(1, side // 16, side // 16, 3, generator=g) > 0.5).float()  # a blocky RGB pattern
    hint = hint.repeat_interleave(16, 1).repeat_interleave(16, 2)
    cn = tiny_flux_controlnet(FLUX_CN_CONFIG)
    cpos, cneg = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, hint, 1.0, 0.0, 1.0)[:2]
    with ce.ForwardCounter(m) as fc:
        base = _sample(comfy, m, pos, neg, lat)
    with_ctrl = _sample(comfy, m, cpos, cneg, lat)
    return {"model": m, "pos": pos, "neg": neg, "cpos": cpos, "cneg": cneg, "lat": lat, "base": base,
            "with": with_ctrl, "rows": fc.rows, "net": cn.control_model}


def test_flux_controlnet_is_xlabs_format_and_steers(flux) -> None:
    sd = flux["net"].state_dict()
    # the keys comfy.controlnet.load_controlnet_state_dict routes to its XLabs Flux loader (the norm's parameter is
    # ``scale`` in checkpoints and 0.3.75's module, ``weight`` in 0.33's RMSNorm)
    assert "controlnet_blocks.0.weight" in sd, sorted(sd)[:8]
    assert any(k.startswith("double_blocks.0.img_attn.norm.key_norm.") for k in sd), sorted(sd)[:8]
    rel = _rel(flux["with"], flux["base"])
    assert flux["rows"] == STEPS and rel > 0.03, rel  # measured 0.064


@pytest.mark.parametrize("feature", list(CACHES))
def test_flux_controlnet_effect_survives_each_cache(comfy, flux, feature) -> None:
    """Tiny Flux + Flux ControlNet (Apply ControlNet) + hasten cache -> KSampler: the control steers as without it."""
    f, m = flux, flux["model"]
    feat = _sample(comfy, _patch(comfy, feature, m), f["pos"], f["neg"], f["lat"])
    ctrl_rows: list[int] = []
    hook = f["net"].register_forward_pre_hook(
        lambda mod, args, kw: ctrl_rows.append(int((args[0] if args else kw["x"]).shape[0])), with_kwargs=True)
    patched = _patch(comfy, feature, m)
    try:
        with ce.ForwardCounter(m) as fc:
            both = _sample(comfy, patched, f["cpos"], f["cneg"], f["lat"])
    finally:
        hook.remove()
    reused = _reused(comfy, feature, patched)
    d, d0 = both - feat, f["with"] - f["base"]
    ratio, err = (d.norm() / d0.norm()).item(), ((d - d0).norm() / d0.norm()).item()
    print(f"Flux ControlNet under {feature}: {reused} reused, {sum(ctrl_rows)} control rows, {fc.rows} rows at the "
          f"first block; |delta| ratio {ratio:.3f}, rel. error of delta {err:.3f}; cache alone vs base "
          f"{_rel(feat, f['base']):.2e}")
    # the cache really skipped work (ProfilingDiT reused 0 blocks on Flux before the in-place fix: Flux blocks
    # update their input streams in place, so every residual it measured was 0) and changed the output
    assert reused > 0 and not torch.equal(feat, f["base"]), (reused, feature)
    assert sum(ctrl_rows) >= fc.rows  # the control net ran for every row the model computed
    assert 0.8 < ratio < 1.2 and err < 0.2, (feature, ratio, err)


# -- compile --------------------------------------------------------------------------------------


# One dynamo trace of ComfyUI's Flux forward takes minutes on 2 busy cores (measured on the 4+4-block Flux, eager
# backend, load ~10: plain 20 graphs in 226 s; Δ-DiT 28 graphs 272 s; ProfilingDiT 34 graphs 226 s; SADA 20 graphs
# 362 s; CacheQuant 20 graphs 406 s; every one compiled == eager bit for bit and 0 new graphs in run 2). SADA and
# CacheQuant wrap apply_model, outside the compiled diffusion model; the block caches' patches run inside it, so
# ProfilingDiT (profiling and caching phases) runs here, on a 2+1-block Flux.
@pytest.mark.slow
def test_compile_node_with_a_block_cache(comfy, flux, monkeypatch) -> None:
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    ce.pin_free_memory(monkeypatch)  # ComfyUI's memory-sized attention chunks would otherwise be guarded on

    f = flux
    m = ce.direct("Flux", {**ce.FLUX_TINY_CONFIG, "depth": 2, "depth_single_blocks": 1})
    patched = ce.call_node(comfy.node_classes["HastenProfilingDiT"], m, threshold=2.0, profile=0.25)[0]
    eager = _sample(comfy, patched, f["pos"], f["neg"], f["lat"])
    torch._dynamo.reset()
    counter = GraphCounter()
    cm = patched.clone()
    set_torch_compile_wrapper(model=cm, backend=counter)
    first = _sample(comfy, cm, f["pos"], f["neg"], f["lat"])
    after_first = counter.graphs
    reused = _reused(comfy, "profiling_dit", cm)
    second = _sample(comfy, cm, f["pos"], f["neg"], f["lat"])
    print(f"compile + ProfilingDiT: {after_first} graphs in run 1, {counter.graphs - after_first} new in run 2, "
          f"{reused} blocks reused")
    assert after_first > 0 and reused > 0
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert counter.graphs == after_first, "the second run recompiled"
