"""Block caches (Δ-DiT, ProfilingDiT): core schedule, diffusers hooks on tiny models, and the embedded model."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import hasten
from hasten import DeltaDiTConfig, ProfilingDiTConfig, UnsupportedModelError
from hasten.caches.blockcache import DeltaDiT, ProfilingDiT
from hasten.pipelines.blockcache import find_blocks

import tiny_pipes as tp

FEATURES = {  # feature -> (settings that cache on tiny random models, settings that are off)
    "delta_dit": (dict(interval=2, warmup=0.0), dict(interval=1)),
    "profiling_dit": (dict(threshold=10.0, profile=0.3, max_reuse=2), dict(threshold=0.0)),
}


class BlockCounter:
    """Counts rows really computed by each block: a pre-hook on each block's first child with a linear layer
    (its attention), which a reused block never reaches."""

    def __init__(self, blocks: torch.nn.ModuleList) -> None:
        self.rows = 0
        probes = [next(c for c in b.children() if any(isinstance(m, torch.nn.Linear) for m in c.modules()))
                  for b in blocks]
        self._h = [p.register_forward_pre_hook(self._hook) for p in probes]

    def _hook(self, module, args) -> None:
        self.rows += args[0].shape[0]

    def take(self) -> int:
        n, self.rows = self.rows, 0
        return n

    def remove(self) -> None:
        for h in self._h:
            h.remove()


def flux2(batch: int = 1) -> tuple[FluxPipeline, dict]:
    """A tiny Flux with 2 double-stream + 2 single-stream blocks (blocks returning (encoder, hidden) tuples)."""
    pipe, kw = tp.flux(batch=batch)
    tr = tp._init(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), 5)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=pipe.vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    return pipe, kw


BUILDERS = {"wan": tp.wan, "sd3": tp.sd3, "flux2": flux2}  # one tensor; (encoder, hidden) with None; tuples


# -- core ------------------------------------------------------------------------------------------
def _plans(cache, steps: int, blocks: int) -> list:
    cache.begin_run(steps, blocks)
    x = torch.zeros(1, 4)
    out = []
    for t in range(steps):
        plan = cache.plan([("cond", 0)], t, x)
        for span in plan.record:
            cache.remember([("cond", 0)], span, [torch.zeros(1, 3)], [torch.ones(1, 3)])
        out.append(plan)
    return out


def test_delta_dit_schedule_rear_then_front():
    plans = _plans(DeltaDiT(DeltaDiTConfig(num_cached_blocks=2, boundary=0.5, interval=2, warmup=0.1)), 10, 6)
    assert not plans[0].reuse and not plans[0].record  # warm-up
    assert plans[1].record == [(4, 6)] and plans[2].reuse == [(4, 6)] and plans[3].record == [(4, 6)]
    assert plans[5].record == [(0, 2)] and plans[6].reuse == [(0, 2)]  # boundary: front span, recorded first
    assert not plans[9].reuse and not plans[9].record  # final step
    assert all(p.role(b) is None for p in plans for b in (2, 3))  # the middle blocks always run


def test_profiling_dit_caches_the_stable_blocks():
    cache = ProfilingDiT(ProfilingDiTConfig(threshold=0.1, profile=0.3, max_reuse=2))
    cache.begin_run(10, 3)
    key = [("cond", 0)]
    for t in range(3):  # block 1 barely changes, blocks 0 and 2 change a lot
        plan = cache.plan(key, t, torch.zeros(1, 4))
        assert plan.profile and not plan.reuse
        for blk, scale in ((0, 1.0 + t), (1, 1.0 + 0.01 * t), (2, 1.0 - 0.5 * t)):
            cache.observe(key, blk, [torch.zeros(1, 5)], [torch.full((1, 5), scale)])
    plan = cache.plan(key, 3, torch.zeros(1, 4))
    assert plan.record == [(1, 2)] and cache.current_stats().cached_blocks == [1]
    cache.remember(key, (1, 2), [torch.zeros(1, 5)], [torch.ones(1, 5)])
    kinds = [bool(cache.plan(key, t, torch.zeros(1, 4)).reuse) for t in range(4, 10)]
    assert kinds == [True, True, False, True, True, False]  # reuse 2, refresh, ..., final step computed
    st = cache.end_run()
    assert st.reused == 4 and st.computed == 10 * 3 - 4


def test_new_branch_computes_and_branches_never_share():
    cache = DeltaDiT(DeltaDiTConfig(num_cached_blocks=1, interval=2, warmup=0.0, boundary=1.0))
    cache.begin_run(6, 2)
    a, b = ("uncond", 0), ("cond", 0)
    plan = cache.plan([a, b], 0, torch.zeros(2, 3))
    cache.remember([a, b], plan.record[0], [torch.zeros(2, 3)], [torch.tensor([[1.0] * 3, [2.0] * 3])])
    plan = cache.plan([a, b], 1, torch.zeros(2, 3))
    out = cache.reuse([a, b], plan.reuse[0], [torch.zeros(2, 3)])[0]
    assert out[0].eq(1).all() and out[1].eq(2).all()  # each branch its own residual
    plan = cache.plan([a, ("cond", 1)], 1, torch.zeros(2, 3))  # a new batch item has no residual: compute
    assert not plan.reuse and plan.record == [(1, 2)]


@pytest.mark.parametrize("bad", [dict(interval=0), dict(boundary=1.5), dict(num_cached_blocks=-1),
                                 dict(interval="2")])
def test_delta_config_validation(bad):
    with pytest.raises((TypeError, ValueError)):
        DeltaDiTConfig(**bad)


@pytest.mark.parametrize("bad", [dict(threshold=-1), dict(profile=2.0), dict(max_reuse=0),
                                 dict(threshold=float("nan"))])
def test_profiling_config_validation(bad):
    with pytest.raises((TypeError, ValueError)):
        ProfilingDiTConfig(**bad)


# -- diffusers: tiny models ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    pipe, kw = BUILDERS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    _, blocks = find_blocks(tp.denoiser(pipe))
    counter = BlockCounter(blocks)
    base = tp.run(pipe, kw)
    yield request.param, pipe, kw, counter, base, counter.take()
    counter.remove()


@pytest.mark.parametrize("feature", list(FEATURES))
def test_off_is_bit_identical(family, feature):
    name, pipe, kw, counter, base, base_rows = family
    getattr(pipe, f"enable_{feature}")(**FEATURES[feature][1])
    try:
        out = tp.run(pipe, kw)
        assert counter.take() == base_rows
        assert torch.equal(out, base)
    finally:
        getattr(pipe, f"disable_{feature}")()


@pytest.mark.parametrize("feature", list(FEATURES))
def test_reuses_blocks_and_restores_exactly(family, feature):
    name, pipe, kw, counter, base, base_rows = family
    den = tp.denoiser(pipe)
    _, blocks = find_blocks(den)
    before = [b.forward for b in blocks], den.forward
    getattr(pipe, f"enable_{feature}")(**FEATURES[feature][0])
    try:
        out = tp.run(pipe, kw)
        rows = counter.take()
        st = hasten.stats(pipe)[feature][next(iter(hasten.stats(pipe)[feature]))]
        assert rows < base_rows, f"{name}/{feature}: no block forward was skipped"
        # real work at the blocks matches the policy's own count (rows = branches x blocks computed)
        assert rows == st.computed and st.block_forwards == base_rows
        assert torch.isfinite(out).all() and not torch.equal(out, base)
        rel = (out - base).abs().mean() / base.abs().mean()
        assert rel < 0.5, f"{name}/{feature}: output drifted {rel:.2f}"
        again = tp.run(pipe, kw)  # state resets between runs
        assert torch.equal(again, out) and counter.take() == rows
    finally:
        getattr(pipe, f"disable_{feature}")()
    assert [b.forward for b in blocks] == before[0] and den.forward == before[1]
    assert not any(hasattr(m, "_diffusers_hook") for m in den.modules())
    assert feature not in hasten.stats(pipe)
    assert torch.equal(tp.run(pipe, kw), base) and counter.take() == base_rows


def test_methods_replace_each_other():
    pipe, kw = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_delta_dit(interval=2)
    pipe.enable_delta_dit(interval=3)
    pipe.enable_profiling_dit(0.5)  # a bare number is the threshold
    assert set(hasten.features(pipe)) == {"profiling_dit"}
    blocks = find_blocks(pipe.transformer)[1]
    assert all(len(b._diffusers_hook._hook_order) == 1 for b in blocks)
    pipe.disable_profiling_dit()
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.modules())


def test_cfg_branches_and_batch_items_keep_their_own_state():
    """A batch of two prompts, cached, equals each prompt run alone, cached; cond and uncond are branches."""
    pipe, kw = tp.wan(batch=2)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_delta_dit(interval=2, warmup=0.0)
    both = tp.run(pipe, kw, seed=[10, 20])
    st = hasten.stats(pipe)["delta_dit"]["transformer"]
    assert {lbl.split("[")[0] for lbl in st.branches} == {"cond", "uncond"} and len(st.branches) == 4
    assert st.reused > 0
    for i, seed in enumerate([10, 20]):
        one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v) for k, v in kw.items()}
        torch.testing.assert_close(both[i : i + 1], tp.run(pipe, one, seed=[seed]), atol=2e-4, rtol=1e-4)
    pipe.disable_delta_dit()


def test_unet_is_refused_and_left_untouched():
    pipe, kw = tp.sd15()
    forward = pipe.unet.forward
    with pytest.raises(UnsupportedModelError, match="repeated transformer blocks"):
        pipe.enable_delta_dit()
    with pytest.raises(UnsupportedModelError):
        hasten.enable_profiling_dit(pipe, ProfilingDiTConfig(threshold=0.1))
    assert pipe.unet.forward == forward and not hasattr(pipe.unet, "_diffusers_hook")
    assert not hasten.features(pipe)


def test_bad_settings_raise_at_enable():
    pipe, _ = tp.wan()
    with pytest.raises(ValueError):
        pipe.enable_delta_dit(interval=0)
    with pytest.raises(TypeError):
        pipe.enable_profiling_dit(ProfilingDiTConfig(), threshold=0.1)
    assert not hasten.features(pipe)


def test_composes_with_easycache():
    pipe, kw = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    base = tp.run(pipe, kw)
    pipe.enable_easycache(threshold=0.5)
    pipe.enable_delta_dit(interval=2, warmup=0.0)
    out = tp.run(pipe, kw)
    st = hasten.stats(pipe)
    assert st["easycache"]["transformer"].reused > 0 and st["delta_dit"]["transformer"].reused > 0
    assert torch.isfinite(out).all()
    pipe.disable_easycache()
    pipe.disable_delta_dit()
    assert torch.equal(tp.run(pipe, kw), base)


# -- the embedded (trained) model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    from hasten.embedded import generate_digits

    pipe = hasten.load_embedded(device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    counter = BlockCounter(find_blocks(pipe.transformer)[1])
    digits = [0, 3, 7]
    base = generate_digits(pipe, digits, seed=0)
    yield pipe, (lambda: generate_digits(pipe, digits, seed=0)), base, counter, counter.take()
    counter.remove()


@pytest.mark.slow
@pytest.mark.parametrize("feature,settings", [("delta_dit", dict(interval=2, num_cached_blocks=1)),
                                              ("profiling_dit", dict(threshold=0.3))])
def test_embedded_mild_setting_keeps_quality(embedded, feature, settings):
    from hasten import metrics

    pipe, gen, base, counter, base_rows = embedded
    getattr(pipe, f"enable_{feature}")(**settings)
    try:
        img = gen()
        rows = counter.take()
    finally:
        getattr(pipe, f"disable_{feature}")()
    psnr = metrics.psnr(img, base)
    assert rows < base_rows, f"{feature}: no block forward skipped on the embedded model"
    assert psnr >= 30.0, f"{feature} {settings}: PSNR {psnr:.1f} dB"
