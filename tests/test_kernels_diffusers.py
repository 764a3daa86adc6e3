"""diffusers adapter for sparse attention on tiny Wan, Flux and SD3 pipelines (random weights)."""

from __future__ import annotations

import pytest
import torch
import torchmetrics  # noqa: F401  (imported before the ComfyUI tests install their torchvision stand-in)

from hasten import UnsupportedModelError
from hasten.pipelines import (
    disable_easycache,
    disable_sparse_attention,
    enable_easycache,
    enable_sparse_attention,
    registry,
)

import tiny_pipes as tp

SIZES = {"wan": 128, "flux": 64, "sd3": 32}
SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")


def _build(name):
    pipe, kw = getattr(tp, name)()
    pipe.set_progress_bar_config(disable=True)
    kw.update(height=SIZES[name], width=SIZES[name], num_inference_steps=6, output_type="latent")
    return pipe, kw


def _run(pipe, kw):
    return pipe(**kw, generator=torch.Generator().manual_seed(0))[0]


@pytest.fixture(scope="module", params=["wan", "flux", "sd3"])
def family(request):
    pipe, kw = _build(request.param)
    return request.param, pipe, kw, _run(pipe, kw)


def test_off_is_bit_identical(family):
    _, pipe, kw, base = family
    enable_sparse_attention(pipe, target_mass=1.0)
    try:
        assert torch.equal(_run(pipe, kw), base)
    finally:
        disable_sparse_attention(pipe)


def test_sparse_runs_close_to_dense_and_resets_per_run(family):
    name, pipe, kw, base = family
    enable_sparse_attention(pipe, **SPARSE)
    try:
        out = _run(pipe, kw)
        st = registry.stats(pipe)["sparse_attention"]["transformer"]
        # 6 steps: dense 0-1, search at 2 and 5, sparse at 3-4 (per call; CFG rows may share a call)
        assert st.sparse_calls > 0 and st.search_calls == st.sparse_calls and st.dense_calls == st.sparse_calls
        assert all(0.0 < d <= 1.0 and c >= 0.9 - 1e-4 for d, c in st.layers.values())
        assert (out - base).abs().max() <= 1e-2 * base.abs().max()
        again = _run(pipe, kw)  # the second run starts from scratch: same result, same counts
        assert torch.equal(again, out)
        st2 = registry.stats(pipe)["sparse_attention"]["transformer"]
        assert (st2.sparse_calls, st2.search_calls) == (st.sparse_calls, st.search_calls)
    finally:
        disable_sparse_attention(pipe)


def test_disable_restores_processors_exactly_and_enable_does_not_stack(family):
    _, pipe, kw, base = family
    before = dict(pipe.transformer.attn_processors)
    enable_sparse_attention(pipe, **SPARSE)
    enable_sparse_attention(pipe, **SPARSE)
    wrapped = pipe.transformer.attn_processors
    assert any(type(p).__name__ == "SparseAttnProcessor" for p in wrapped.values())
    assert not any(type(getattr(p, "inner", None)).__name__ == "SparseAttnProcessor" for p in wrapped.values())
    disable_sparse_attention(pipe)
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not hasattr(pipe.transformer, "_diffusers_hook")
    assert "sparse_attention" not in registry.features(pipe)
    assert torch.equal(_run(pipe, kw), base)


def test_wan_sparsifies_self_attention_only():
    pipe, kw = _build("wan")
    enable_sparse_attention(pipe, **SPARSE)
    try:
        _run(pipe, kw)
        st = registry.stats(pipe)["sparse_attention"]["transformer"]
        assert st.layers and all(".attn1" in name for name in st.layers)  # cross-attention passes through
        assert not st.fallbacks
    finally:
        disable_sparse_attention(pipe)


def test_flux_text_tokens_stay_dense():
    pipe, kw = _build("flux")
    enable_sparse_attention(pipe, **{**SPARSE, "target_mass": 0.5})
    try:
        seen = {}
        policy = registry.features(pipe)["sparse_attention"].policies["transformer"]
        orig_end = policy.end_run
        policy.end_run = lambda: (seen.update(policy.patterns), orig_end())[1]
        _run(pipe, kw)
        policy.end_run()
        text_len = kw["prompt_embeds"].shape[1]  # 7 tokens at the front of Flux's joint sequence
        assert seen
        for pattern in seen.values():
            mask = pattern.block_mask()
            assert mask[..., 0].all()  # the text key block is visited by every query block
            assert mask[:, :, 0].all()  # text queries attend to every block
            assert pattern.seq_q > text_len
    finally:
        disable_sparse_attention(pipe)


def test_composes_with_easycache():
    pipe, kw = _build("flux")
    base = _run(pipe, kw)
    enable_easycache(pipe, threshold=0.1)
    enable_sparse_attention(pipe, **{**SPARSE, "warmup_steps": 1})
    try:
        out = _run(pipe, kw)
        st = registry.stats(pipe)
        assert st["easycache"]["transformer"].calls > 0
        assert st["sparse_attention"]["transformer"].search_calls > 0
        assert (out - base).abs().max() <= 0.1 * base.abs().max()
    finally:
        disable_sparse_attention(pipe)
        disable_easycache(pipe)
    assert torch.equal(_run(pipe, kw), base)


def test_unsupported_model_gets_clear_error():
    from diffusers.models.attention_processor import AttnProcessor

    pipe, _ = tp.sd15()
    pipe.unet.set_attn_processor(AttnProcessor())  # the classic processor: matmul + softmax, no SDPA
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(UnsupportedModelError, match=r"AttnProcessor.*dispatch_attention_fn"):
        enable_sparse_attention(pipe)
    assert "sparse_attention" not in registry.features(pipe)
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())


def test_bad_setting_is_rejected():
    pipe, _ = _build("wan")
    with pytest.raises(ValueError, match="target_mass"):
        enable_sparse_attention(pipe, target_mass=0.0)
    with pytest.raises(TypeError, match="AdaSpaConfig"):
        enable_sparse_attention(pipe, 0.9)
    assert "sparse_attention" not in registry.features(pipe)


class _TransformerOnly:
    """A pipeline stand-in holding only a transformer (HunyuanVideo's pipeline needs large text encoders)."""


def test_hunyuan_video_with_text_padding_mask():
    from diffusers import HunyuanVideoTransformer3DModel

    from hasten.pipelines.sparse_attention import key_padding_mask

    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4)).eval()
    pipe = _TransformerOnly()
    pipe.transformer = tr
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 1, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0  # two padded text tokens in row 0

    def call(t=500):  # a new timestep = a new denoising step
        with torch.no_grad():
            return tr(hidden_states=x, timestep=torch.tensor([t, t]), encoder_hidden_states=ehs,
                      encoder_attention_mask=mask, pooled_projections=torch.ones(2, 8),
                      guidance=torch.tensor([3.0, 3.0]), return_dict=False)[0]

    base = call()
    enable_sparse_attention(pipe, **{**SPARSE, "warmup_steps": 1, "refresh_every": 0})
    try:
        ts = (900, 700, 500, 300)
        disable_sparse_attention(pipe)
        bases = [call(t) for t in ts]
        enable_sparse_attention(pipe, **{**SPARSE, "warmup_steps": 1, "refresh_every": 0})
        outs = [call(t) for t in ts]
        st = registry.stats(pipe)["sparse_attention"]["transformer"]
        # 2 joint layers x 4 calls (+ the token refiner's self-attention, 16 tokens: a general mask, dense)
        assert (st.dense_calls, st.search_calls, st.sparse_calls) == (2, 2, 4)
        for out, ref in zip(outs, bases):  # random weights: every block kept, so padding must match exactly
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    finally:
        disable_sparse_attention(pipe)
    assert torch.equal(call(), base)
    m = torch.tensor([[True, True, False], [True, True, True]]).view(2, 1, 1, 3)
    kv, qv = key_padding_mask(m, (2, 1, 3, 3))
    assert kv.tolist() == [[True, True, False], [True, True, True]] and qv is None
    row = torch.tensor([True, False, True])  # Chroma-style: padded text is neither key nor query
    kv, qv = key_padding_mask((row[:, None] & row[None, :]).view(1, 1, 3, 3), (1, 2, 3, 3))
    assert kv.tolist() == [[True, False, True]] and qv.flatten().tolist() == [True, False, True]
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    assert key_padding_mask(causal, (1, 1, 3, 3)) is None  # not key padding: dense (and counted)
    assert key_padding_mask(torch.randn(1, 1, 3, 3), (1, 1, 3, 3)) is None  # a bias


def test_bench_kernels_end_to_end_report(capsys):
    from hasten.cli import main

    assert main(["bench-kernels", "--e2e", "tiny-wan", "--e2e-size", "128", "--e2e-steps", "4",
                 "--warmup-steps", "1", "--block-size", "16", "--target-mass", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "PSNR vs dense" in out and "attention rel. error" in out
    # 4 layers x 2 branches (Wan runs cond and uncond as separate calls): 1 dense, 1 search, 2 sparse steps
    assert "16 sparse, 8 search, 8 dense calls" in out
