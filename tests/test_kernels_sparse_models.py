"""Sparse attention through the attention call of each model (no module-level swap): isolation between
models of one class, deepcopy, UNets (F.scaled_dot_product_attention), Chroma's padded joint attention,
resolution changes and the once-per-run log line."""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch

from hasten.pipelines import disable_sparse_attention, enable_sparse_attention, registry

import tiny_pipes as tp

SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")


def _wan(size: int = 128):
    pipe, kw = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    kw.update(height=size, width=size)
    return pipe, kw


def _run(pipe, kw, steps: int = 6):
    return tp.run(pipe, kw, steps=steps)


def _st(pipe):
    return registry.stats(pipe)["sparse_attention"]["transformer"]


def test_untouched_model_of_same_class_is_bit_identical_and_uncounted():
    a, kw = _wan()
    b, _ = _wan()
    base_b = _run(b, kw)
    enable_sparse_attention(a, **SPARSE)
    try:
        out_a = _run(a, kw)
        calls = _st(a).calls
        assert _st(a).sparse_calls > 0
        for _ in range(2):  # interleaved: the untouched pipeline is unaffected and adds no calls
            assert torch.equal(_run(b, kw), base_b)
            assert torch.equal(_run(a, kw), out_a) and _st(a).calls == calls
        # at the same time, from two threads
        res: dict[str, torch.Tensor] = {}
        threads = [threading.Thread(target=lambda n=n, p=p: res.__setitem__(n, _run(p, kw))) for n, p in
                   (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.equal(res["b"], base_b) and torch.equal(res["a"], out_a)
        assert not (out_a - base_b).abs().max() == 0  # the sparse one did change something
    finally:
        disable_sparse_attention(a)


def test_deepcopy_is_independent():
    a, kw = _wan()
    base = _run(a, kw)
    enable_sparse_attention(a, **SPARSE)
    try:
        out = _run(a, kw)
        b = copy.deepcopy(a)
        with torch.no_grad():
            for p in b.transformer.parameters():
                p.mul_(0.5)
        out_b = _run(b, kw)
        assert not torch.equal(out_b, out)  # the copy runs its own weights
        assert torch.equal(_run(a, kw), out)  # and the original is untouched by the copy
        assert registry.stats(b)["sparse_attention"]["transformer"].sparse_calls > 0
        disable_sparse_attention(b)
        assert torch.equal(_run(a, kw), out)  # disabling the copy leaves the original on
    finally:
        disable_sparse_attention(a)
    assert torch.equal(_run(a, kw), base)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_unet_self_attention_through_sdpa(name):
    pipe, kw = tp.BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    kw.update(height=64, width=64)  # 32x32 latents: 1024 then 256 self-attention tokens
    base = _run(pipe, kw)
    before = dict(pipe.unet.attn_processors)
    enable_sparse_attention(pipe, **{**SPARSE, "target_mass": 1.0})
    assert torch.equal(_run(pipe, kw), base)
    enable_sparse_attention(pipe, **SPARSE)
    try:
        out = _run(pipe, kw)
        st = registry.stats(pipe)["sparse_attention"]["unet"]
        assert st.sparse_calls > 0 and not st.fallbacks
        assert all(".attn1" in n for n in st.layers)  # attn2 (cross-attention to the text) passes through
        assert (out - base).abs().max() <= 0.05 * base.abs().max()
    finally:
        disable_sparse_attention(pipe)
    after = pipe.unet.attn_processors
    assert all(after[k] is p for k, p in before.items())
    assert torch.equal(_run(pipe, kw), base)


class _TransformerOnly:
    """A pipeline stand-in holding only a transformer."""


def test_chroma_padded_joint_attention_is_handled_not_silently_dense():
    from diffusers import ChromaTransformer2DModel

    tr = tp._init(ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                           approximator_hidden_dim=16, approximator_layers=1), 3)
    pipe = _TransformerOnly()
    pipe.transformer = tr
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 64, 7
    x, ehs = torch.randn(1, n_img, 4, generator=g), torch.randn(1, n_txt, 16, generator=g)
    tok = torch.ones(1, n_txt + n_img, dtype=torch.bool)
    tok[0, 5:n_txt] = False  # two padded text tokens (Chroma's pipeline masks them as keys and queries)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"),
                          -1).reshape(-1, 3)

    def call(t=0.5):  # a new timestep = a new denoising step
        with torch.no_grad():
            return tr(hidden_states=x, encoder_hidden_states=ehs, timestep=torch.tensor([t]), img_ids=img_ids,
                      txt_ids=torch.zeros(n_txt, 3), attention_mask=tok, return_dict=False)[0]

    base = call()
    enable_sparse_attention(pipe, **{**SPARSE, "warmup_steps": 1, "refresh_every": 0, "target_mass": 0.999})
    try:
        ts = (0.9, 0.7, 0.5)
        disable_sparse_attention(pipe)
        bases = [call(t) for t in ts]
        enable_sparse_attention(pipe, **{**SPARSE, "warmup_steps": 1, "refresh_every": 0, "target_mass": 0.999})
        outs = [call(t) for t in ts]
        st = _st(pipe)
        assert not st.fallbacks  # the padding mask is understood, nothing left dense unannounced
        assert (st.dense_calls, st.search_calls, st.sparse_calls) == (2, 2, 2)  # double + single block
        for out, ref in zip(outs, bases):
            assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    finally:
        disable_sparse_attention(pipe)
    assert torch.equal(call(), base)


def test_general_mask_is_counted_as_dense():
    from diffusers import ChromaTransformer2DModel

    tr = tp._init(ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=0,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                           approximator_hidden_dim=16, approximator_layers=1), 3)
    pipe = _TransformerOnly()
    pipe.transformer = tr
    proc = next(iter(tr.attn_processors.values()))
    enable_sparse_attention(pipe, **{**SPARSE, "warmup_steps": 0})
    try:
        attn = tr.transformer_blocks[0].attn
        hs, ehs = torch.randn(1, 32, 16), torch.randn(1, 4, 16)
        causal = torch.ones(36, 36, dtype=torch.bool).tril().view(1, 1, 36, 36)
        ref = proc(attn, hs, ehs, attention_mask=causal)
        out = attn.processor(attn, hs, ehs, attention_mask=causal)
        assert all(torch.equal(r, o) for r, o in zip(ref, out))  # dense, bit-identical...
        assert _st(pipe).fallbacks == {"attention mask other than key padding": 1}  # ...and counted
    finally:
        disable_sparse_attention(pipe)


def test_resolution_change_searches_anew_and_runs_reset(caplog):
    pipe, kw = _wan(128)
    enable_sparse_attention(pipe, **SPARSE)
    try:
        with caplog.at_level(logging.INFO, logger="hasten"):
            _run(pipe, kw)
            first = _st(pipe)
            kw64 = {**kw, "height": 64, "width": 64}
            base64 = None
            disable_sparse_attention(pipe)
            base64 = _run(pipe, kw64)
            enable_sparse_attention(pipe, **SPARSE)
            out64 = _run(pipe, kw64)
            second = _st(pipe)
            _run(pipe, kw)
        assert second is not first and second.sparse_calls == first.sparse_calls
        assert (out64 - base64).abs().max() <= 0.05 * base64.abs().max()
        policy = registry.features(pipe)["sparse_attention"].policies["transformer"]
        # patterns for the old token count are never reused for the new one
        pat = next(iter(policy.last_run.layers))
        assert pat
        lines = [r.getMessage() for r in caplog.records if "sparse attention:" in r.getMessage()]
        assert len(lines) == 3 and all("blocks kept" in ln for ln in lines)  # once per run
    finally:
        disable_sparse_attention(pipe)


def test_policy_drops_pattern_of_other_token_count():
    from hasten.kernels.adaspa import AdaSpa, AdaSpaConfig

    pol = AdaSpa(AdaSpaConfig(block_size=16, warmup_steps=0, refresh_every=0, min_seq_len=0, backend="torch"))
    q = torch.randn(1, 2, 64, 8)
    pol.attend("l", ["c"], 0, q, q, q)  # search at 64 tokens
    q2 = torch.randn(1, 2, 48, 8)
    out = pol.attend("l", ["c"], 1, q2, q2, q2)  # a sparse step at another size: searched anew, not reused
    assert out is not None and pol.stats.search_calls == 2 and pol.stats.sparse_calls == 0
    assert pol.patterns[("l", "c")].seq_q == 48


def test_a_run_that_ends_at_its_search_step_warns_and_is_dense(caplog):
    """warmup_steps=2 and a 3-step run: steps 0-1 dense, step 2 only searches (a dense pass), nothing goes
    sparse. The output equals the dense run's, so the run must warn, naming the steps it would need."""
    pipe, kw = _wan()
    base = _run(pipe, kw, steps=3)
    enable_sparse_attention(pipe, **SPARSE)
    try:
        with caplog.at_level(logging.WARNING, logger="hasten"):
            out = _run(pipe, kw, steps=3)
        st = _st(pipe)
        assert st.search_calls > 0 and st.sparse_calls == 0
        assert torch.allclose(out, base, atol=1e-4)  # the search pass is dense attention (up to float order)
        msgs = [r.getMessage() for r in caplog.records if "had no effect" in r.getMessage()]
        assert msgs and "ended before a sparse step" in msgs[0] and "at least 4 steps" in msgs[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hasten"):
            _run(pipe, kw, steps=4)  # one sparse step: no warning
        assert _st(pipe).sparse_calls > 0
        assert not any("had no effect" in r.getMessage() for r in caplog.records)
    finally:
        disable_sparse_attention(pipe)


def test_no_effect_is_a_warning(caplog):
    pipe, kw = _wan()
    enable_sparse_attention(pipe, **{**SPARSE, "min_seq_len": 10**6})
    try:
        with caplog.at_level(logging.WARNING, logger="hasten"):
            _run(pipe, kw)
            pipe.transformer._reset_stateful_cache() if hasattr(pipe.transformer, "_reset_stateful_cache") else None
        assert any("had no effect" in r.getMessage() and "min_seq_len" in r.getMessage() for r in caplog.records)
    finally:
        disable_sparse_attention(pipe)
