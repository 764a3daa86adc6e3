"""CacheQuant: the DP schedule (optimal: brute force agrees), the schedule honoured at the first transformer
block, the decoupled error correction measured on the embedded model, exact restore, and the ComfyUI node."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hasten.caches.cachequant import (
    CacheQuantCache,
    CacheQuantCalibration,
    CacheQuantConfig,
    CacheQuantPlan,
    TraceRecorder,
    brute_force_plan,
    plan,
)

STEPS = 10
DIGITS = (1, 3, 7)


# -- core -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_dp_schedule_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    for n in range(2, 9):
        # growing with the reuse distance, plus noise: the shape of real caching errors, and random ties broken
        dist = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).clamp(min=0).float()
        errors = dist.pow(1.5) * torch.rand(n, n, generator=g) + 0.01 * torch.rand(n, n, generator=g)
        for k in range(1, n + 1):
            for forced in ((0,), (0, n - 1)):
                if k < len(set(forced)):
                    continue
                steps, cost = plan(errors, k, forced)
                ref_steps, ref_cost = brute_force_plan(errors, k, forced)
                assert math.isclose(cost, ref_cost, rel_tol=1e-9, abs_tol=1e-12), (n, k, steps, ref_steps)
                assert len(steps) == k and steps[0] == 0 and set(forced) <= set(steps)


def test_dp_refuses_impossible_requests():
    e = torch.rand(5, 5)
    with pytest.raises(ValueError, match="forced"):
        plan(e, 1, forced=(0, 4))
    with pytest.raises(ValueError, match="square"):
        plan(torch.rand(3, 4), 2)


def test_config_is_validated():
    with pytest.raises(ValueError, match="not both"):
        CacheQuantConfig(num_computed_steps=5, speedup=2)
    with pytest.raises(ValueError):
        CacheQuantConfig(method="int3")
    with pytest.raises(TypeError):
        CacheQuantConfig(calibration_prompts="digit 3")
    with pytest.raises(ValueError):
        CacheQuantConfig(speedup=0.5)
    assert CacheQuantConfig(speedup=2.5).computed_for(20) == 8
    assert CacheQuantConfig(num_computed_steps=30).computed_for(20) == 20


def test_plan_round_trip_and_text():
    p = CacheQuantPlan(num_steps=6, computed=(0, 2, 5), reuse="output",
                       correction={"cond": (torch.rand(6, 4), torch.rand(6, 4))})
    q = CacheQuantPlan.from_dict(p.to_dict())
    assert q.computed == p.computed and q.reuse == "output" and q.timeline() == "C.C..C"
    assert torch.allclose(q.correction["cond"][0], p.correction["cond"][0])
    assert CacheQuantPlan.from_text(p.schedule_text(), 6).computed == (0, 2, 5)
    with pytest.raises(ValueError, match="step 0"):
        CacheQuantPlan(num_steps=6, computed=(1, 2))
    with pytest.raises(ValueError):
        CacheQuantPlan.from_text("0,x", 6)


def test_correction_fits_a_known_affine_error():
    """A reused output off by a per-channel affine map is corrected back exactly (DEC's least squares)."""
    g = torch.Generator().manual_seed(0)
    n, runs_fp, runs_q = 4, [], []
    a_true, b_true = torch.tensor([1.5, 0.5]), torch.tensor([0.2, -0.1])
    for _ in range(3):
        outs = [torch.randn(1, 2, 8, 8, generator=g) for _ in range(n)]
        xs = [torch.randn(1, 2, 8, 8, generator=g) for _ in range(n)]
        runs_fp.append({"cond[0]": [(xs[k], outs[k]) for k in range(n)]})
        # the quantized model's step-0 output, reused for step 1, is an affine distortion of the FP step-1 output
        q = [(xs[k], outs[k]) for k in range(n)]
        q[0] = (xs[0], (outs[1] - b_true.view(1, 2, 1, 1)) / a_true.view(1, 2, 1, 1))
        runs_q.append({"cond[0]": q})
    cal = CacheQuantCalibration(runs_fp, runs_q)
    p = CacheQuantPlan(num_steps=n, computed=(0, 2, 3), reuse="output")
    a, b = cal.fit_correction(p)["cond"]
    assert torch.allclose(a[1], a_true, atol=1e-4) and torch.allclose(b[1], b_true, atol=1e-4)
    assert torch.equal(a[0], torch.ones(2)) and torch.equal(b[2], torch.zeros(2))  # computed steps untouched


def test_policy_follows_the_schedule_and_applies_the_correction():
    p = CacheQuantPlan(num_steps=4, computed=(0, 2), reuse="output",
                       correction={"cond": (torch.full((4, 2), 2.0), torch.full((4, 2), 1.0))})
    cache = CacheQuantCache(p)
    cache.begin_run(4)
    x = torch.zeros(1, 2, 3)
    out = torch.ones(1, 2, 3)
    decisions = []
    for step in range(4):
        c = cache.should_compute("k", x, step, 4, "cond[0]")
        decisions.append(c)
        if c:
            cache.remember("k", x, out)
        else:
            assert torch.equal(cache.reuse("k", x), 2.0 * out + 1.0)
    assert decisions == [True, False, True, False]
    assert cache.end_run().computed == 2


# -- the embedded model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    import hasten
    from hasten.embedded import digit_prompts

    pipe = hasten.load_embedded()
    cal = hasten.calibrate_cachequant(pipe, method="int8", calibration_prompts=digit_prompts(DIGITS),
                                      calibration_seeds=(0,), num_inference_steps=STEPS)
    return pipe, cal, _latents(pipe)


def _latents(pipe, seed=0):
    from hasten.embedded import digit_prompts

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(DIGITS))]
    return pipe(prompt=digit_prompts(DIGITS), num_inference_steps=STEPS, generator=gens, output_type="latent").frames


def _hasten_hooks(pipe) -> list[str]:
    """hasten's hooks on the denoiser (diffusers' own cache_context may leave an empty registry)."""
    reg = getattr(pipe.transformer, "_diffusers_hook", None)
    return [n for n in (reg.hooks if reg is not None else {}) if n.startswith("hasten")]


class _BlockRows:
    """Rows reaching the first transformer block (the real work below every hook)."""

    def __init__(self, pipe):
        self.rows = 0
        self.h = pipe.transformer.blocks[0].register_forward_pre_hook(lambda m, a: self._add(a))

    def _add(self, args):
        self.rows += args[0].shape[0]


def test_calibration_leaves_the_pipeline_as_it_was(setup):
    pipe, cal, _ = setup
    from hasten.pipelines.registry import features

    assert cal.num_steps == STEPS and len(cal.reference) == len(cal.quantized) == 1
    assert set(cal.reference[0]) == {f"{b}[{i}]" for b in ("cond", "uncond") for i in range(len(DIGITS))}
    assert not features(pipe) and not _hasten_hooks(pipe)
    assert all(type(m) is torch.nn.Linear for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    # quantization error is in the matrix's diagonal; reusing further away costs more
    e = cal.error_matrix("output")
    assert 0 < e[3, 3] < e[3, 4] < e[3, 6]


def test_schedule_honoured_and_restored_exactly(setup):
    pipe, cal, base = setup
    state = copy.deepcopy(pipe.transformer.state_dict())
    k = 4
    pipe.enable_cachequant(method="int8", num_computed_steps=k, calibration=cal)
    from hasten.pipelines.cachequant import cachequant_plan

    assert cachequant_plan(pipe).num_computed == k
    counter = _BlockRows(pipe)
    try:
        out = _latents(pipe)
    finally:
        counter.h.remove()
    st = pipe.hasten_stats()["cachequant"]["transformer"]
    # one batched call per step with [uncond, cond] x 3 digits: k computed steps x 6 branches reach block 0
    assert counter.rows == k * 2 * len(DIGITS), counter.rows
    assert st.computed == k * 6 and st.reused == (STEPS - k) * 6
    assert any(type(m).__name__.startswith("Int8") for m in pipe.transformer.modules())  # really quantized
    assert 0 < (out - base).abs().max() and (out - base).norm() / base.norm() < 0.5
    pipe.disable_cachequant()
    assert not _hasten_hooks(pipe) and "quant" not in pipe.hasten_stats()
    assert all(torch.equal(v, state[n]) for n, v in pipe.transformer.state_dict().items())
    assert torch.equal(_latents(pipe), base)


def test_correction_lowers_the_error_on_the_embedded_model(setup):
    """Measured, not assumed: the final latents with DEC are closer to the FP baseline than without."""
    pipe, cal, base = setup
    errs = {}
    for corr in (False, True):
        pipe.enable_cachequant(method="int8", plan=cal.plan(4, correction=corr), calibration=cal)
        try:
            errs[corr] = float((_latents(pipe) - base).norm() / base.norm())
        finally:
            pipe.disable_cachequant()
    assert errs[True] < errs[False], errs


def test_dp_schedule_beats_a_uniform_one_at_equal_steps(setup):
    pipe, cal, _ = setup
    e = cal.error_matrix("output")
    dp = cal.plan(4, reuse="output", correction=False)
    uniform = (0, 3, 6, 9)
    src, total = 0, 0.0
    for k in range(STEPS):
        src = k if k in uniform else src
        total += float(e[src, k])
    assert dp.predicted_error <= total


def test_refusals_name_the_problem(setup):
    pipe, cal, _ = setup
    pipe.enable_easycache(0.2)
    try:
        with pytest.raises(ValueError, match="disable EasyCache"):
            pipe.enable_cachequant(method="int8", calibration=cal, num_computed_steps=4)
    finally:
        pipe.disable_easycache()
    pipe.quantize("int8")
    try:
        with pytest.raises(ValueError, match="full-precision"):
            pipe.enable_cachequant(method="int8", calibration_prompts=["digit 1"], num_computed_steps=4)
    finally:
        pipe.dequantize()
    with pytest.raises(ValueError, match="calibration_prompts"):
        pipe.enable_cachequant(method="int8", num_computed_steps=4)
    assert "cachequant" not in pipe.hasten_stats() and "quant" not in pipe.hasten_stats()


def test_recorder_records_every_step():
    rec = TraceRecorder()
    rec.begin_run(3)
    for step in range(3):
        assert rec.should_compute(("cond", 0), torch.zeros(1, 2), step, 3, "cond[0]")
        rec.remember(("cond", 0), torch.zeros(1, 2), torch.full((1, 2), float(step)))
    rec.end_run()
    assert [o[1][0, 0].item() for o in rec.runs[0]["cond[0]"]] == [0.0, 1.0, 2.0]


# -- ComfyUI ------------------------------------------------------------------------------------------
def test_comfy_node_follows_the_schedule(comfy):
    import comfy_env as ce

    model = ce.tiny_wan()
    base = ce.run_ksampler(comfy, model, "wan", steps=6)
    node = comfy.node_classes["HastenCacheQuant"]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["HastenCacheQuant"] == "CacheQuant (hasten)"
    patched, text = ce.call_node(node, model=model, schedule="0,1,3", steps=6, method="int8_weight_only")
    assert "CC.C.." in text and "3/6" in text
    with ce.ForwardCounter(patched) as fc:
        out = ce.run_ksampler(comfy, patched, "wan", steps=6)
    assert fc.rows == 3 * 2, fc.rows  # 3 computed steps x [cond, uncond]
    assert torch.isfinite(out).all() and 0 < float((out - base).norm() / base.norm()) < 0.5
    st = __import__(node.__module__, fromlist=["stats"]).stats(patched)
    assert st.computed == 6 and st.reused == 6
    # the original MODEL is untouched
    assert torch.equal(ce.run_ksampler(comfy, model, "wan", steps=6), base)
    with pytest.raises(ValueError, match="bad schedule"):
        node.execute(model=model, schedule="1,2", steps=6)
