"""The "EasyCache (hasten)" node in the real ComfyUI engine (in-process), on tiny Wan 2.1, SD1.x, SD3."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

import comfy_env as ce

KINDS = {"wan": ce.tiny_wan, "sd15": ce.tiny_sd15, "sd3": ce.tiny_sd3}
STEPS = 10


@pytest.fixture(scope="module")
def models(comfy) -> dict:
    return {k: build() for k, build in KINDS.items()}


def _node(comfy):
    return comfy.node_classes["HastenEasyCache"]


def _stats(comfy, model):
    return sys.modules[_node(comfy).__module__].stats(model)


def _patch(comfy, model, threshold, start=0.2, end=1.0, cap=4):
    (patched,) = ce.call_node(_node(comfy), model, threshold, start, end, cap, False)
    return patched


def _sample(comfy, model, counter_model, kind, **kw):
    with ce.ForwardCounter(counter_model) as fc:
        out = ce.run_ksampler(comfy, model, kind, steps=STEPS, **kw)
    return out, fc.rows


def test_pack_loads_through_comfyui_loader(comfy) -> None:
    assert "HastenEasyCache" in comfy.node_classes
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["HastenEasyCache"] == "EasyCache (hasten)"
    # loaded from <tmp>/custom_nodes/hasten by ComfyUI itself, not from our editable install
    assert Path(comfy.pack.__file__).parent.name == "hasten"
    assert Path(comfy.pack.__file__).parent.parent.name == "custom_nodes"
    assert _node(comfy).__module__.startswith(comfy.pack.__name__)


@pytest.mark.parametrize("kind", list(KINDS))
def test_threshold_zero_is_bit_identical(comfy, models, kind) -> None:
    m = models[kind]
    base, n_base = _sample(comfy, m, m, kind)
    out, n = _sample(comfy, _patch(comfy, m, 0.0), m, kind)
    assert n_base == 2 * STEPS  # cond + uncond per step (euler)
    assert n == n_base
    assert torch.equal(out, base)


@pytest.mark.parametrize("kind,threshold,max_rel_err", [("wan", 0.1, 0.05), ("sd15", 0.2, 0.2),
                                                        ("sd3", 0.1, 0.05)])
def test_skips_real_forwards(comfy, models, kind, threshold, max_rel_err) -> None:
    m = models[kind]
    base, n_base = _sample(comfy, m, m, kind)
    pm = _patch(comfy, m, threshold)
    out, n = _sample(comfy, pm, m, kind)
    st = _stats(comfy, pm)
    assert st.calls == n_base and st.computed == n  # stats agree with the rows that reached the network
    assert n <= n_base - 4, (n, n_base)
    assert torch.isfinite(out).all()
    rel = ((out - base).abs().max() / base.abs().max()).item()
    assert 0 < rel < max_rel_err, rel
    # CFG branches are cached separately and both reuse
    assert set(st.branches) == {"cond[0]", "uncond[0]"}
    assert all(b.reused > 0 and b.calls == STEPS for b in st.branches.values())


def test_second_order_sampler(comfy, models) -> None:
    """Heun evaluates twice per step; steps come from the sigma schedule, so warm-up/final still hold."""
    m = models["wan"]
    base, n_base = _sample(comfy, m, m, "wan", sampler="heun")
    out0, n0 = _sample(comfy, _patch(comfy, m, 0.0), m, "wan", sampler="heun")
    assert n_base == 2 * (2 * STEPS - 1) and n0 == n_base and torch.equal(out0, base)
    pm = _patch(comfy, m, 0.1)
    out, n = _sample(comfy, pm, m, "wan", sampler="heun")
    assert n < n_base // 2
    assert _stats(comfy, pm).branches["cond[0]"].decisions[-1]  # the final evaluation is computed
    assert ((out - base).abs().max() / base.abs().max()).item() < 0.05


def test_state_resets_between_runs(comfy, models) -> None:
    m = models["wan"]
    pm = _patch(comfy, m, 0.1)
    out1, n1 = _sample(comfy, pm, m, "wan")
    s1 = _stats(comfy, pm).to_dict()
    out2, n2 = _sample(comfy, pm, m, "wan")
    assert torch.equal(out1, out2) and n1 == n2 < 2 * STEPS
    assert _stats(comfy, pm).to_dict() == s1


@pytest.mark.parametrize("kind", ["wan", "sd3"])
def test_batch_of_two_equals_each_item_alone(comfy, models, kind) -> None:
    m = models[kind]
    pm = _patch(comfy, m, 0.1)
    pos = [ce.conditioning(kind, 11)[0], ce.conditioning(kind, 12)[0]]
    neg = ce.conditioning(kind, 2)

    def batched(items: list[int]) -> dict:
        cond = torch.cat([pos[i][0] for i in items])
        extra = {k: torch.cat([pos[i][1][k] for i in items]) for k in pos[0][1]}
        lat = ce.latent(kind, batch=len(items))
        lat["batch_index"] = items  # same per-item noise in the batch and alone
        return {"positive": [[cond, extra]], "negative": neg, "lat": lat}

    both, n_both = _sample(comfy, pm, m, kind, **batched([0, 1]))
    st = _stats(comfy, pm)
    assert set(st.branches) == {"cond[0]", "cond[1]", "uncond[0]", "uncond[1]"}
    for i in (0, 1):
        alone, _ = _sample(comfy, pm, m, kind, **batched([i]))
        assert _stats(comfy, pm).branches["cond[0]"].decisions == st.branches[f"cond[{i}]"].decisions
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-4, atol=1e-4)
    assert n_both < 4 * STEPS
    # different prompts really differ (the test would be vacuous otherwise)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_api_graph_through_prompt_executor(comfy, models, caplog) -> None:
    name = ce.save_wan_for_unet_loader(comfy)

    class _TestConditioning:  # test-only source of CONDITIONING (no text encoder in tiny models)
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "make"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

        def make(self, seed: int) -> tuple:
            return (ce.conditioning("wan", seed),)

    comfy.nodes.NODE_CLASS_MAPPINGS["HastenTestConditioning"] = _TestConditioning

    def graph(with_cache: bool, prefix: str) -> dict:
        g = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
            "2": {"class_type": "HastenTestConditioning", "inputs": {"seed": 1}},
            "3": {"class_type": "HastenTestConditioning", "inputs": {"seed": 2}},
            "4": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 128, "height": 128, "length": 1, "batch_size": 1}},
            "6": {"class_type": "KSampler", "inputs": {
                "model": ["5", 0] if with_cache else ["1", 0], "seed": 0, "steps": STEPS, "cfg": 3.0,
                "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
                "latent_image": ["4", 0], "denoise": 1.0}},
            "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}},
        }
        if with_cache:
            g["5"] = {"class_type": "HastenEasyCache", "inputs": {
                "model": ["1", 0], "reuse_threshold": 0.1, "start_percent": 0.2, "end_percent": 1.0,
                "max_consecutive_reuse": 4, "verbose": False}}
        return g

    from safetensors.torch import load_file

    with caplog.at_level(logging.INFO, logger="hasten"):
        ex = ce.run_graph(comfy, graph(True, "hasten_cached"))
    assert ex.success, ex.status_messages
    assert any(f"/{2 * STEPS} branch forwards computed" in r.getMessage() for r in caplog.records)
    ex0 = ce.run_graph(comfy, graph(False, "hasten_base"))
    assert ex0.success

    def saved(prefix: str) -> torch.Tensor:
        (path,) = sorted((comfy.base_dir / "output").rglob(f"{prefix}*.latent"))
        return load_file(str(path))["latent_tensor"]

    cached, base = saved("hasten_cached"), saved("hasten_base")
    # the graph ran the same computation as the in-process KSampler path with the same model weights
    direct = ce.run_ksampler(comfy, _patch(comfy, ce.tiny_wan(), 0.1), "wan", steps=STEPS,
                             lat=ce.latent("wan", size=16))
    torch.testing.assert_close(cached, direct)
    assert 0 < (cached - base).abs().max() < 0.05 * base.abs().max()
    with pytest.raises(ValueError, match="invalid graph"):
        bad = graph(True, "bad")
        bad["5"]["inputs"]["reuse_threshold"] = -1.0
        ce.run_graph(comfy, bad)


def _builtin(comfy, model, threshold):
    res = comfy.nodes.NODE_CLASS_MAPPINGS["EasyCache"].execute(model.clone(), threshold, 0.15, 0.95, False)
    return res.result[0] if hasattr(res, "result") else res[0]


def test_beats_builtin_easycache_on_wan(comfy, models) -> None:
    m = models["wan"]
    base, n_base = _sample(comfy, m, m, "wan")

    def sweep(make) -> list[tuple[int, float]]:
        points = []
        for th in (0.05, 0.1, 0.2, 0.4):
            out, n = _sample(comfy, make(th), m, "wan")
            points.append((n_base - n, (out - base).abs().max().item()))
        return points

    theirs = sweep(lambda th: _builtin(comfy, m, th))
    ours = sweep(lambda th: _patch(comfy, m, th))
    assert any(s > 0 for s, _ in theirs)  # the peer does skip on Wan
    for skipped, err in theirs:  # at every peer operating point: as many skips at no more error
        if skipped == 0:
            continue
        assert any(s >= skipped and e <= err for s, e in ours), (theirs, ours)


def test_builtin_silently_skips_nothing_on_sd3_while_ours_does(comfy, models) -> None:
    m = models["sd3"]
    base, n_base = _sample(comfy, m, m, "sd3")
    out_b, n_b = _sample(comfy, _builtin(comfy, m, 0.2), m, "sd3")
    assert n_b == n_base and torch.equal(out_b, base)  # documents the peer's silent no-op on MMDiT
    out, n = _sample(comfy, _patch(comfy, m, 0.2), m, "sd3")
    assert n < n_base - 4


def test_unhookable_model_is_a_clear_error(comfy) -> None:
    class NotAModel:
        model = torch.nn.Linear(2, 2)

        def clone(self):
            return self

    with pytest.raises(Exception, match="cannot hook Linear"):
        _patch(comfy, NotAModel(), 0.2)


def test_bad_settings_are_rejected(comfy, models) -> None:
    with pytest.raises(ValueError, match="end"):
        _patch(comfy, models["wan"], 0.2, start=0.5, end=0.3)


def test_rows_that_must_compute_are_sliced_out(comfy, models) -> None:
    """When only the uncond chunk must compute, the executor sees only those rows (and their kwargs)."""
    mod = sys.modules[_node(comfy).__module__]
    base_model = models["sd3"].model
    seen: list[dict] = []

    class Executor:  # stands in for ComfyUI's WrapperExecutor around BaseModel._apply_model
        class_obj = base_model

        def __call__(self, x, t, c_concat, c_crossattn, control, topts, **kw):
            seen.append({"rows": x.shape[0], "uuids": list(topts["uuids"]), "y": kw["y"].shape[0],
                         "cond_or_uncond": list(topts["cond_or_uncond"])})
            return base_model._apply_model(x, t, c_concat, c_crossattn, control, topts, **kw)

    class Scripted(mod.EasyCache):  # the real core, with one decision forced per label
        force: dict | None = None

        def should_compute(self, key, x, step, num_steps, label=None, group=None):
            decided = super().should_compute(key, x, step, num_steps, label, group)
            return self.force[label] if self.force else decided

    cache = Scripted(mod.EasyCacheConfig(threshold=0.0))
    cache.begin_run(4)
    run = mod._Run(mod.EasyCacheHolder(cache.config), cache, 4)
    g = torch.Generator().manual_seed(0)
    ctx, y = torch.randn(2, 8, 4096, generator=g), torch.randn(2, 2048, generator=g)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    opts = {"uuids": ["c", "u"], "cond_or_uncond": [0, 1], "sample_sigmas": sigmas, mod.RUN_KEY: run}
    x1, x2 = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    ex = Executor()
    t1, t2 = torch.full((2,), 0.75), torch.full((2,), 0.5)
    mod.apply_model_wrapper(ex, x1, t1, None, ctx, None, dict(opts), y=y)
    full1 = base_model._apply_model(x1, t1, None, ctx, None, dict(opts), y=y)
    full2 = base_model._apply_model(x2, t2, None, ctx, None, dict(opts), y=y)
    cache.force = {"cond[0]": False, "uncond[0]": True}
    out = mod.apply_model_wrapper(ex, x2, t2, None, ctx, None, dict(opts), y=y)
    assert seen[-1] == {"rows": 1, "uuids": ["u"], "y": 1, "cond_or_uncond": [1]}
    torch.testing.assert_close(out[1:], full2[1:], rtol=1e-5, atol=1e-5)  # computed row: the real output
    ms = base_model.model_sampling  # reused row: x2 + (raw1 - x1) mapped back to denoised
    raw1 = (x1[:1] - full1[:1]) / 0.75  # CONST sampling: denoised = x - sigma * raw
    torch.testing.assert_close(out[:1], ms.calculate_denoised(t2[:1], x2[:1] + (raw1 - x1[:1]), x2[:1]))
    assert (out[:1] - full2[:1]).abs().max() > 1e-3
    assert [s["rows"] for s in seen] == [2, 1]  # one full call, then only the uncond row
