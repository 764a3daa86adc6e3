"""hasten's ComfyUI nodes in real workflows: with ComfyUI's LoRA loader, ControlNet apply and model compile.

Issue 15, ComfyUI side, in the real engine (0.3.75, or ``$HASTEN_COMFYUI_DIR`` for 0.33.0):

- **LoRA** (``LoraLoaderModelOnly``): a LoRA written in-test in ComfyUI's key format for Wan
  (``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` / ``lora_B`` / ``alpha``), applied to the
  embedded digit model loaded by hasten's loader node. Under every hasten node the LoRA must still change
  the output as it does without the node: delta(node) = out(LoRA -> node) - out(node) against
  delta(base) = out(LoRA) - out(base).
- **ControlNet** (``ControlNetApplyAdvanced``): ComfyUI has no ControlNet path for Wan 2.1 (WanModel's
  forward takes no ``control``; Wan's control models are VACE / Fun-Control variants with their own
  weights, not Apply ControlNet), so this runs on a tiny SD1.5 UNet with a tiny ``comfy.cldm`` ControlNet
  built from the same config: the control delta must survive every hasten node.
- **Compile** (``TorchCompileModel`` → ``comfy_api.torch_helpers.set_torch_compile_wrapper``): the
  same wrapper with a graph-counting eager backend (inductor on 2 CPU cores takes minutes per graph; the
  wrapper, guards and graph breaks are the backend-independent part). Output must match the eager run of
  the same node exactly and the number of compiled graphs must not grow with a second run.

The newer caches (Δ-DiT, ProfilingDiT, SADA, CacheQuant: ``NEW_NODES``) run in the LoRA tests (they must reuse
work and leave nothing behind: the node alone and the plain model give the same output after the LoRA'd run)
and, except the block caches (the UNet has no ``patches_replace['dit']`` blocks: refused), in the SD1.5
ControlNet tests. Flux ControlNet, and compile with a block cache: test_comfy_compat2.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from graph_counter import GraphCounter

import comfy_env as ce

STEPS = 8
CFG = 4.0
LORA_NAME = "hasten_test_wan_lora.safetensors"
RANK = 4


# -- the embedded model and its prompts ----------------------------------------------------------
@pytest.fixture(scope="module")
def emb(comfy) -> dict[str, Any]:
    import comfy.utils as comfy_utils

    from hasten.nodes.embedded import HastenDigitPrompt, HastenEmbeddedLoader, HastenEmptyDigitLatent

    comfy_utils.PROGRESS_BAR_ENABLED = False
    (model,) = ce.call_node(HastenEmbeddedLoader, "float32")
    return {"model": model, "pos": ce.call_node(HastenDigitPrompt, "digit 3")[0],
            "neg": ce.call_node(HastenDigitPrompt, "")[0], "lat": ce.call_node(HastenEmptyDigitLatent, 32, 1)[0],
            "cache": {}}


def _ksample(comfy, model, pos, neg, lat) -> torch.Tensor:
    (out,) = comfy.nodes.KSampler().sample(model, 0, STEPS, CFG, "euler", "simple", pos, neg, lat, denoise=1.0)
    return out["samples"]


# hasten node -> (patch MODEL -> MODEL) or None for the Bottleneck KSampler (a sampler, not a patch)
def _patch(comfy, feature: str, model: Any) -> Any:
    nc = comfy.node_classes
    if feature == "easycache":
        return ce.call_node(nc["HastenEasyCache"], model, reuse_threshold=0.3, start_percent=0.2, end_percent=1.0)[0]
    if feature == "guidance":
        return ce.call_node(nc["HastenAdaptiveGuidance"], model, "ag", 0.993, 0.5)[0]
    if feature == "sparse":
        return ce.call_node(nc["HastenSparseAttention"], model, 0.8, 2, 16, 3, 0)[0]
    if feature == "quant":
        return ce.call_node(nc["HastenQuantize"], model, "int8_weight_only", 64, 0.0)[0]
    if feature in NEW_NODES:
        node_id, settings = NEW_NODES[feature]
        return ce.call_node(nc[node_id], model, **settings)[0]
    raise KeyError(feature)


# The caches added after the first compatibility pass (issues 13/14): node id and settings that skip work in 8 steps.
NEW_NODES: dict[str, tuple[str, dict]] = {
    "delta_dit": ("HastenDeltaDiT", dict(interval=2, num_cached_blocks=1)),
    "profiling_dit": ("HastenProfilingDiT", dict(threshold=0.3)),
    "sada": ("HastenSADA", dict(threshold=0.5)),
    "cachequant": ("HastenCacheQuant", dict(schedule="0,1,2,4,6,7", steps=STEPS, method="int8_weight_only")),
}
BLOCK_CACHES = ("delta_dit", "profiling_dit")  # blocks through patches_replace['dit']: not the SD1.x UNet


def reused(comfy, feature: str, patched: Any) -> int:
    """Block forwards (block caches) or branch forwards (step caches) the node reused in its last run."""
    import importlib

    node_id = NEW_NODES[feature][0]
    run = importlib.import_module(comfy.node_classes[node_id].__module__).stats(patched)
    assert run is not None, f"{node_id} recorded no run"
    return run.reused


FEATURES = ["easycache", "guidance", "bottleneck", "sparse", "quant", *NEW_NODES]
# The Bottleneck KSampler moves the image itself (measured: 0.92 relative to the baseline on the tiny SD1.5, where
# the control delta is 0.04), so the delta's direction changes with it: only its size is compared there.
LOOSE = {"bottleneck"}


def _check_delta(what: str, feature: str, ratio: float, err: float) -> None:
    if feature in LOOSE:
        assert 0.4 < ratio < 2.5, (what, feature, ratio, err)
    else:
        assert 0.7 < ratio < 1.3 and err < 0.35, (what, feature, ratio, err)


def _run(comfy, feature: str, model: Any, pos, neg, lat, counted: Any = None) -> tuple[torch.Tensor, int]:
    """Sample ``model`` with ``feature`` (or none: "base"); returns the latent and the rows reaching the first
    transformer block of ``counted`` (default ``model``). A new cache's reuse count lands in ``LAST_REUSED``."""
    with ce.ForwardCounter(counted or model) as fc:
        if feature == "bottleneck":
            node = comfy.node_classes["HastenBottleneckSampler"]
            out = ce.call_node(node, model, 0, STEPS, CFG, "euler", "simple", pos, neg, lat, "1,0.5,1",
                               "0.25,0.75")[0]["samples"]
        else:
            patched = model if feature == "base" else _patch(comfy, feature, model)
            out = _ksample(comfy, patched, pos, neg, lat)
            if feature in NEW_NODES:
                LAST_REUSED[feature] = reused(comfy, feature, patched)
    return out, fc.rows


LAST_REUSED: dict[str, int] = {}


def _effect(with_: torch.Tensor, without: torch.Tensor, base_with: torch.Tensor, base_without: torch.Tensor
            ) -> tuple[float, float]:
    """(|delta| / |delta_base|, |delta - delta_base| / |delta_base|): the LoRA/control delta under a node
    against the same delta with no node."""
    d, d0 = with_ - without, base_with - base_without
    return (d.norm() / d0.norm()).item(), ((d - d0).norm() / d0.norm()).item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- LoRA ----------------------------------------------------------------------------------------
def write_wan_lora(model: Any, name: str = LORA_NAME, rank: int = RANK, strength: float = 0.5, seed: int = 0) -> str:
    """A LoRA on every attention projection of a ComfyUI Wan MODEL, in ComfyUI's Wan key format, written to
    the ``loras`` folder. ``B @ A * alpha / rank`` has ``strength`` x the layer weight's std per entry."""
    import folder_paths
    from safetensors.torch import save_file

    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(len(dm.blocks)):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                w = getattr(getattr(dm.blocks[i], attn), proj).weight
                out_f, in_f = w.shape
                a = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
                b = torch.randn(out_f, rank, generator=g) * (strength * w.float().std().item() * in_f ** 0.5 / rank ** 0.5)
                key = f"diffusion_model.blocks.{i}.{attn}.{proj}"
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = a, b
                sd[f"{key}.alpha"] = torch.tensor(float(rank))
    folder = folder_paths.get_folder_paths("loras")[0]
    import os

    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, name))
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.pop("loras", None)
    return name


def _lora(comfy, model: Any, name: str, strength: float = 1.0) -> Any:
    return comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


@pytest.fixture(scope="module")
def lora(comfy, emb) -> dict[str, Any]:
    name = write_wan_lora(emb["model"])
    m = emb["model"]
    base, rows = _run(comfy, "base", m, emb["pos"], emb["neg"], emb["lat"])
    lm = _lora(comfy, m, name)
    with_lora, _ = _run(comfy, "base", lm, emb["pos"], emb["neg"], emb["lat"], counted=m)
    return {"name": name, "base": base, "rows": rows, "lora_model": lm, "with_lora": with_lora}


def test_lora_file_is_read_by_comfyui_and_changes_the_output(comfy, emb, lora) -> None:
    import comfy.lora as comfy_lora

    assert lora["rows"] == 2 * STEPS
    lm = lora["lora_model"]
    patched = {k for k in lm.patches if k.startswith("diffusion_model.blocks.")}
    assert len(patched) == 4 * 2 * len(emb["model"].model.diffusion_model.blocks)  # every projection, no key lost
    rel = ((lora["with_lora"] - lora["base"]).norm() / lora["base"].norm()).item()
    assert rel > 0.05, rel  # a LoRA with no visible effect would make the comparisons below meaningless
    assert comfy_lora.model_lora_keys_unet(emb["model"].model, {})  # the key map the loader used


@pytest.mark.parametrize("feature", FEATURES)
def test_lora_effect_survives_each_hasten_node(comfy, emb, lora, feature) -> None:
    """Loader -> LoraLoaderModelOnly -> hasten node -> KSampler: the LoRA changes the image as without the node."""
    m, pos, neg, lat = emb["model"], emb["pos"], emb["neg"], emb["lat"]
    feat, rows_feat = _run(comfy, feature, m, pos, neg, lat)
    both, rows_both = _run(comfy, feature, lora["lora_model"], pos, neg, lat, counted=m)
    assert not torch.equal(feat, lora["base"]), f"{feature} had no effect"  # not a silent no-op
    if feature in ("easycache", "guidance"):
        assert rows_feat < lora["rows"] and rows_both < lora["rows"], (rows_feat, rows_both)
    if feature in NEW_NODES:
        assert LAST_REUSED[feature] > 0, f"{feature} reused nothing under the LoRA"
        # no leak after the run: the plain model and the node alone give what they gave before the LoRA'd run
        again, _ = _run(comfy, feature, m, pos, neg, lat)
        plain, _ = _run(comfy, "base", m, pos, neg, lat)
        assert torch.equal(again, feat) and torch.equal(plain, lora["base"]), (_rel(again, feat), _rel(plain, lora["base"]))
    ratio, err = _effect(both, feat, lora["with_lora"], lora["base"])
    print(f"LoRA under {feature}: |delta| ratio {ratio:.3f}, rel. error of delta {err:.3f}; node alone vs base "
          f"{_rel(feat, lora['base']):.3f}, LoRA delta {_rel(lora['with_lora'], lora['base']):.3f}")
    _check_delta("LoRA", feature, ratio, err)


def test_lora_after_quantize_refuses(comfy, emb, lora) -> None:
    """Quantize -> LoRA: ComfyUI's weight patches cannot reach quantized layers (measured before the check: the
    LoRA changed nothing, bit-identical output), so sampling refuses and names the order that works."""
    m, pos, neg, lat = emb["model"], emb["pos"], emb["neg"], emb["lat"]
    late = _lora(comfy, _patch(comfy, "quant", m), lora["name"])
    with pytest.raises(Exception, match="load LoRAs BEFORE Quantize Model") as info:
        _ksample(comfy, late, pos, neg, lat)
    assert type(info.value).__name__ == "UnsupportedModelError"  # the pack's own copy of hasten.errors


def test_quantize_after_a_lora_run_quantizes_the_original_weights(comfy, emb, lora) -> None:
    """ComfyUI unpatches lazily: right after a LoRA'd clone sampled, the shared module still holds LoRA'd weights.
    Quantizing the plain model then must not bake that LoRA in (measured before the fix: output 0.008 from
    the LoRA run, 0.38 from the plain quantized one)."""
    m, pos, neg, lat = emb["model"], emb["pos"], emb["neg"], emb["lat"]
    fresh = _ksample(comfy, _patch(comfy, "quant", m), pos, neg, lat)
    _ksample(comfy, lora["lora_model"], pos, neg, lat)  # leaves its weights patched in
    late = _ksample(comfy, _patch(comfy, "quant", m), pos, neg, lat)
    assert torch.equal(late, fresh), _rel(late, fresh)


def test_lora_after_a_quantized_run_is_applied(comfy, emb, lora) -> None:
    """Plain run, quantized run, then a LoRA'd (quantized) clone: the LoRA must apply. ComfyUI marks patched
    modules and unmarks only those in the model when it unpatches, so the layers a quantized clone had swapped
    out came back marked "patched" and the LoRA skipped them (measured before the fix: LoRA delta 0.005
    instead of 0.378 under CacheQuant/Quantize)."""
    m, pos, neg, lat = emb["model"], emb["pos"], emb["neg"], emb["lat"]
    plain = _ksample(comfy, m, pos, neg, lat)
    quant = _ksample(comfy, _patch(comfy, "quant", m), pos, neg, lat)
    both = _ksample(comfy, _patch(comfy, "quant", lora["lora_model"]), pos, neg, lat)
    after = _ksample(comfy, lora["lora_model"], pos, neg, lat)  # a plain LoRA clone after the quantized ones
    assert torch.equal(plain, lora["base"]) and torch.equal(after, lora["with_lora"]), _rel(after, lora["with_lora"])
    ratio, err = _effect(both, quant, lora["with_lora"], lora["base"])
    assert 0.7 < ratio < 1.3 and err < 0.35, (ratio, err)


def _with_defaults(comfy, class_type: str, inputs: dict) -> dict:
    """``inputs`` plus the schema default of every other widget input (nodes gain inputs over time)."""
    spec = comfy.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    defaults = {k: v[1]["default"] for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]}
    return {**defaults, **inputs}


def test_graph_loader_lora_easycache_ksampler(comfy, emb, lora) -> None:
    """The whole workflow as an API graph through ComfyUI's executor, every node by its id."""
    prompt = {
        "1": {"class_type": "HastenEmbeddedLoader", "inputs": {"weight_dtype": "float32"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora["name"],
                                                               "strength_model": 1.0}},
        "3": {"class_type": "HastenEasyCache", "inputs": _with_defaults(comfy, "HastenEasyCache", {
            "model": ["2", 0], "reuse_threshold": 0.3, "start_percent": 0.2, "end_percent": 1.0})},
        "4": {"class_type": "HastenDigitPrompt", "inputs": {"text": "digit 3"}},
        "5": {"class_type": "HastenDigitPrompt", "inputs": {"text": ""}},
        "6": {"class_type": "HastenEmptyDigitLatent", "inputs": {"size": 32, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "HastenRunStats", "inputs": {"model": ["3", 0], "latent": ["7", 0]}},
    }
    ex = ce.run_graph(comfy, prompt)
    assert ex.success, ex.status_messages[-3:]
    text = " ".join(str(t) for t in ex.history_result["outputs"]["8"]["text"])
    assert "EasyCache (hasten):" in text and f"/{2 * STEPS} branch forwards computed" in text, text


# -- ControlNet (tiny SD1.5: ComfyUI has no Apply-ControlNet path for Wan) --------------------------
def tiny_sd15_controlnet(seed: int = 1) -> Any:
    """A ComfyUI ControlNet (``comfy.cldm.cldm.ControlNet``, RGB hint) for the tiny SD1.5 UNet of comfy_env,
    built as ComfyUI's loader builds one from a checkpoint, with seeded non-zero weights (zero convs too)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    cfg = {k: v for k, v in ce.SD15_TINY_CONFIG.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, operations=comfy.ops.disable_weight_init,
                                     device=torch.device("cpu"), **cfg)
    ce.fill_(dict(net.named_parameters()), seed)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device(),
                                      manual_cast_dtype=None)


@pytest.fixture(scope="module")
def control(comfy) -> dict[str, Any]:
    m = ce.tiny_sd15()
    pos, neg = ce.conditioning("sd15", 1), ce.conditioning("sd15", 2)
    lat = ce.latent("sd15")
    g = torch.Generator().manual_seed(3)
    side = lat["samples"].shape[-1] * 8
    hint = (torch.rand(1, side // 16, side // 16, 3, generator=g) > 0.5).float()  # a blocky pattern
    hint = hint.repeat_interleave(16, 1).repeat_interleave(16, 2)
    cn = tiny_sd15_controlnet()
    cpos, cneg = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, hint, 1.0, 0.0, 1.0)[:2]
    base, rows = _run(comfy, "base", m, pos, neg, lat)
    with_ctrl, _ = _run(comfy, "base", m, cpos, cneg, lat)
    return {"model": m, "pos": pos, "neg": neg, "cpos": cpos, "cneg": cneg, "lat": lat, "base": base,
            "with": with_ctrl, "rows": rows, "net": cn.control_model}


def test_controlnet_steers_the_tiny_unet(control) -> None:
    rel = ((control["with"] - control["base"]).norm() / control["base"].norm()).item()
    assert control["rows"] == 2 * STEPS and rel > 0.02, rel  # measured 0.037


def test_block_caches_refuse_the_unet(comfy, control) -> None:
    """Δ-DiT / ProfilingDiT need blocks routed through patches_replace['dit']; the SD1.x UNet has none: a node
    error naming what is supported, at patch time (the Flux ControlNet runs them: test_comfy_compat2.py)."""
    for feature in BLOCK_CACHES:
        with pytest.raises(Exception, match="patches_replace") as info:
            _patch(comfy, feature, control["model"])
        assert type(info.value).__name__ == "UnsupportedModelError"


@pytest.mark.parametrize("feature", [f for f in FEATURES if f not in BLOCK_CACHES])
def test_controlnet_effect_survives_each_hasten_node(comfy, control, feature) -> None:
    c = control
    m = c["model"]
    feat, rows_feat = _run(comfy, feature, m, c["pos"], c["neg"], c["lat"])
    ctrl_rows: list[int] = []
    hook = c["net"].register_forward_pre_hook(
        lambda mod, args, kw: ctrl_rows.append(int((args[0] if args else kw["x"]).shape[0])), with_kwargs=True)
    try:
        both, rows_both = _run(comfy, feature, m, c["cpos"], c["cneg"], c["lat"])
    finally:
        hook.remove()
    # the control net ran for every row the UNet computed (none lost its hint); ComfyUI computes the control in
    # calc_cond_batch, before apply_model, so steps a cache skips still run it (measured: 16 control rows for 14
    # UNet rows under EasyCache)
    assert sum(ctrl_rows) >= rows_both, (sum(ctrl_rows), rows_both)
    print(f"ControlNet under {feature}: {sum(ctrl_rows)} control rows, {rows_both} UNet rows")
    assert not torch.equal(feat, c["base"]), f"{feature} had no effect"
    if feature in ("easycache", "guidance"):
        assert rows_both < c["rows"], rows_both
    if feature in NEW_NODES:
        assert LAST_REUSED[feature] > 0, f"{feature} reused nothing under the ControlNet"
    ratio, err = _effect(both, feat, c["with"], c["base"])
    print(f"ControlNet under {feature}: |delta| ratio {ratio:.3f}, rel. error of delta {err:.3f}; node alone vs "
          f"base {_rel(feat, c['base']):.3f}, control delta {_rel(c['with'], c['base']):.3f}")
    _check_delta("ControlNet", feature, ratio, err)


# -- compile (TorchCompileModel's wrapper) -------------------------------------------------------


def _compiled(model: Any, backend: Any) -> Any:
    """What ComfyUI's TorchCompileModel node does to a MODEL, with our backend instead of inductor."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    m = model.clone()
    set_torch_compile_wrapper(model=m, backend=backend)
    return m


# Each dynamo trace of ComfyUI's Wan forward takes 1-3 minutes on 2 busy CPU cores, so the nodes run stacked:
# plain, and Quantize -> Adaptive Guidance -> EasyCache (with ComfyUI's free-memory figure pinned: plain 13 graphs,
# the stack 26 (Adaptive Guidance's uncond-free steps run at batch 1: more shapes), none new on a second run; ComfyUI's own graph breaks (psutil's ``open`` in its memory checks) are the same with
# and without hasten). Sparse attention is not in the compiled region's supported list yet: its pattern search
# reads tensor values (``.item()``) and its per-layer state guards on the layer index, so dynamo recompiles
# per layer until its recompile limit and then runs it eagerly (same output, measured: 52 graphs).
COMPILE_STACKS = {"plain": (), "quant+guidance+easycache": ("quant", "guidance", "easycache")}


@pytest.mark.parametrize("stack", list(COMPILE_STACKS))
def test_compile_node_with_hasten_nodes(comfy, emb, stack, monkeypatch) -> None:
    """Compiled + nodes == eager + nodes exactly, and a second run compiles nothing new (no per-step recompiles)."""
    m, pos, neg, lat = emb["model"], emb["pos"], emb["neg"], emb["lat"]
    ce.pin_free_memory(monkeypatch)  # ComfyUI's memory-sized attention chunks would otherwise be guarded on
    patched = m
    for feature in COMPILE_STACKS[stack]:
        patched = _patch(comfy, feature, patched)
    eager = _ksample(comfy, patched, pos, neg, lat)
    torch._dynamo.reset()
    counter = GraphCounter()
    cm = _compiled(patched, counter)
    with ce.ForwardCounter(m) as fc:
        first = _ksample(comfy, cm, pos, neg, lat)
    after_first = counter.graphs
    with ce.ForwardCounter(m) as fc2:  # the same instrumentation in both runs (hooks are part of dynamo's guards)
        second = _ksample(comfy, cm, pos, neg, lat)
    assert fc2.rows == fc.rows, (fc.rows, fc2.rows)
    print(f"compile + {stack}: {after_first} graphs in run 1, {counter.graphs - after_first} new in run 2, "
          f"{fc.rows} rows at the first block")
    assert after_first > 0  # the compiled module really ran
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert counter.graphs == after_first, "the second run recompiled"
    if stack != "plain":
        assert fc.rows < 2 * STEPS  # the hasten nodes still skipped work under compile
        (text,) = ce.call_node(comfy.node_classes["HastenRunStats"], cm, {"samples": first})
        assert "EasyCache (hasten):" in text and "Adaptive Guidance (hasten):" in text, text
