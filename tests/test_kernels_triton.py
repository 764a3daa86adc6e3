"""Triton attention kernels under TRITON_INTERPRET=1 (CPU): dense and block-sparse vs SDPA, LSE, ragged edges."""

from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (tests/conftest.py sets it earlier too)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hasten.kernels.block_sparse import BlockSparsePattern, block_sparse_attention  # noqa: E402
from hasten.kernels.flash_attention import flash_attention, triton_module  # noqa: E402

_mod = triton_module()
if _mod is None:
    pytest.skip("triton is not importable; the Triton kernels cannot be tested", allow_module_level=True)
if not torch.cuda.is_available() and type(_mod.tl.sum).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1",
                allow_module_level=True)


def _ref_lse(q, k, scale, mask=None):
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("sq,sk,d", [(64, 64, 32), (50, 50, 16), (37, 45, 24), (8, 70, 64)])
def test_dense_matches_sdpa_and_logsumexp(sq, sk, d):
    q = torch.randn(2, 3, sq, d)
    k, v = torch.randn(2, 3, sk, d), torch.randn(2, 3, sk, d)
    out, lse = flash_attention(q, k, v, backend="triton", block_m=16, block_n=16)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-3
    assert (lse - _ref_lse(q, k, d**-0.5)).abs().max() <= 1e-3
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, sq)


def test_dense_custom_scale_and_fp16():
    q, k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float16) for _ in range(3))
    out, lse = flash_attention(q, k, v, scale=0.3, backend="triton", block_m=16, block_n=16)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3)
    assert out.dtype == torch.float16
    assert (out.float() - ref).abs().max() <= 2e-3
    assert (lse - _ref_lse(q, k, 0.3)).abs().max() <= 2e-3


def test_bf16_is_upcast_under_interpreter():
    q, k, v = (torch.randn(1, 1, 33, 16, dtype=torch.bfloat16) for _ in range(3))
    out, _ = flash_attention(q, k, v, backend="triton", block_m=16, block_n=16)
    assert out.dtype == torch.bfloat16
    assert (out.float() - F.scaled_dot_product_attention(q.float(), k.float(), v.float())).abs().max() <= 2e-2


@pytest.mark.parametrize("seq", [64, 50, 33])
def test_block_sparse_matches_masked_sdpa(seq):
    torch.manual_seed(1)
    bs = 16
    q, k, v = (torch.randn(2, 2, seq, 32) for _ in range(3))
    nb = -(-seq // bs)
    mask = torch.rand(2, 2, nb, nb) < 0.5
    mask[..., -1] = True  # the ragged last block is visited
    pattern = BlockSparsePattern.from_block_mask(mask, bs, seq, seq)
    tok = pattern.token_mask()
    out, lse = block_sparse_attention(q, k, v, pattern, backend="triton")
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=tok)).abs().max() <= 1e-3
    assert (lse - _ref_lse(q, k, 32**-0.5, tok)).abs().max() <= 1e-3


def test_unlisted_blocks_are_never_read():
    """NaN in every key/value block that is not listed: any load of them would poison the output."""
    bs, seq = 16, 64
    q, k, v = (torch.randn(1, 2, seq, 16) for _ in range(3))
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, :, :, 1] = True
    mask[0, 0, :, 3] = True
    pattern = BlockSparsePattern.from_block_mask(mask, bs, seq, seq)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0:16], v2[:, :, 0:16] = float("nan"), float("nan")
    k2[:, 1, 48:], v2[:, 1, 48:] = float("nan"), float("nan")
    out, _ = block_sparse_attention(q, k2, v2, pattern, backend="triton")
    assert torch.isfinite(out).all()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.token_mask())
    assert (out - ref).abs().max() <= 1e-3


def test_block_sparse_all_blocks_equals_dense():
    q, k, v = (torch.randn(1, 2, 45, 32) for _ in range(3))
    full = BlockSparsePattern.dense(1, 2, 45, 45, 16)
    o_s, l_s = block_sparse_attention(q, k, v, full, backend="triton")
    o_d, l_d = flash_attention(q, k, v, backend="triton", block_m=16, block_n=16)
    assert (o_s - o_d).abs().max() <= 1e-5 and (l_s - l_d).abs().max() <= 1e-5


def test_key_padding_lengths_match_masked_sdpa():
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    kv_lens = torch.tensor([40, 27])
    tok = (torch.arange(40) < kv_lens.view(-1, 1)).view(2, 1, 1, 40)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    out, lse = flash_attention(q, k, v, backend="triton", block_m=16, block_n=16, kv_lens=kv_lens)
    assert (out - ref).abs().max() <= 1e-3
    assert (lse - _ref_lse(q, k, 0.25, tok)).abs().max() <= 1e-3
    mask = torch.ones(2, 2, 3, 3, dtype=torch.bool)
    mask[1, :, 0, 2] = False
    pattern = BlockSparsePattern.from_block_mask(mask, 16, 40, 40)  # row 1 lists block 2: padding only
    both = pattern.token_mask() & tok
    out_s, _ = block_sparse_attention(q, k, v, pattern, backend="triton", kv_lens=kv_lens)
    assert torch.isfinite(out_s).all()
    assert (out_s - F.scaled_dot_product_attention(q, k, v, attn_mask=both)).abs().max() <= 1e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_key_mask_with_holes_and_fully_masked_queries_match_sdpa(backend):
    """Chroma-style padding: keys masked anywhere (not only at the end); masked queries see no key (-> 0)."""
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    ok = torch.ones(2, 40, dtype=torch.bool)
    ok[0, 5:9] = False  # padded text tokens between text and image
    ok[1, 17:33] = False  # a whole key block of padding
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ok.view(2, 1, 1, 40))
    out, lse = flash_attention(q, k, v, backend=backend, block_m=16, block_n=16, kv_mask=ok)
    assert (out - ref).abs().max() <= 1e-3
    assert (lse - _ref_lse(q, k, 0.25, ok.view(2, 1, 1, 40))).abs().max() <= 1e-3
    mask = torch.rand(2, 2, 3, 3) < 0.6
    mask[..., 0] = True
    pattern = BlockSparsePattern.from_block_mask(mask, 16, 40, 40)
    out_s, _ = block_sparse_attention(q, k, v, pattern, backend=backend, kv_mask=ok)
    both = pattern.token_mask() & ok.view(2, 1, 1, 40)
    assert torch.isfinite(out_s).all()
    assert (out_s - F.scaled_dot_product_attention(q, k, v, attn_mask=both)).abs().max() <= 1e-3
    none = torch.zeros(1, 40, dtype=torch.bool)  # a row with no valid key at all: output 0, no NaN
    out0, _ = flash_attention(q[:1], k[:1], v[:1], backend=backend, block_m=16, block_n=16, kv_mask=none)
    assert torch.equal(out0, torch.zeros_like(out0))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import hasten.kernels.flash_attention as fa

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: no CUDA GPU"):
        fa.pick_backend(torch.zeros(1), "triton")
