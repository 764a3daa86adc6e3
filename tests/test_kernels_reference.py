"""PyTorch reference kernels (the CPU execution path) and the block-sparse index layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hasten.kernels.block_sparse import BlockSparsePattern, block_sparse_attention, block_sparse_reference
from hasten.kernels.flash_attention import attention_reference, flash_attention, pick_backend


@pytest.mark.parametrize("sq,sk", [(64, 64), (37, 53)])
def test_dense_reference_matches_sdpa_and_logsumexp(sq, sk):
    q, k, v = torch.randn(2, 3, sq, 16), torch.randn(2, 3, sk, 16), torch.randn(2, 3, sk, 16)
    out, lse = attention_reference(q, k, v, chunk=16)  # several query chunks
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5
    assert (lse - torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, -1)).abs().max() <= 1e-5


def test_dispatcher_uses_torch_on_cpu():
    q = torch.randn(1, 1, 8, 16)
    assert pick_backend(q) == "torch"
    out, _ = flash_attention(q, q, q)
    ref, _ = attention_reference(q, q, q)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="backend must be"):
        pick_backend(q, "cuda")


@pytest.mark.parametrize("seq,bs", [(64, 16), (50, 16), (70, 32)])
def test_block_sparse_reference_matches_masked_sdpa(seq, bs):
    q, k, v = (torch.randn(2, 2, seq, 16) for _ in range(3))
    nb = -(-seq // bs)
    mask = torch.rand(2, 2, nb, nb) < 0.4
    mask[..., 0] = True
    pattern = BlockSparsePattern.from_block_mask(mask, bs, seq, seq)
    tok = pattern.token_mask()
    out, lse = block_sparse_reference(q, k, v, pattern, max_elems=4096)  # chunked over query blocks
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=tok)).abs().max() <= 1e-5
    ref_lse = torch.logsumexp((q @ k.transpose(-1, -2) / 4.0).masked_fill(~tok, float("-inf")), -1)
    assert (lse - ref_lse).abs().max() <= 1e-5


def test_reference_gathers_listed_blocks_only():
    q, k, v = (torch.randn(1, 1, 48, 16) for _ in range(3))
    mask = torch.tensor([[[[True, False, False], [False, True, False], [True, False, True]]]])
    pattern = BlockSparsePattern.from_block_mask(mask, 16, 48, 48)
    out, _ = block_sparse_attention(q, k, v, pattern)
    assert torch.isfinite(out).all()
    poisoned = k.clone()
    poisoned[:, :, 32:48] = float("nan")
    out2, _ = block_sparse_attention(q[:, :, :32], poisoned, v, BlockSparsePattern(
        pattern.kv_num_blocks[:, :, :2], pattern.kv_indices[:, :, :2], 16, 32, 48))
    assert torch.isfinite(out2).all()  # query blocks 0 and 1 never touch key block 2


def test_pattern_layout_roundtrip_and_validation():
    mask = torch.rand(2, 3, 4, 5) < 0.5
    mask[..., 2] = True
    p = BlockSparsePattern.from_block_mask(mask, 16, 60, 70)
    assert torch.equal(p.block_mask(), mask)
    assert p.kv_num_blocks.dtype == torch.int32 and torch.equal(p.kv_num_blocks, mask.sum(-1).int())
    assert p.density() == pytest.approx(mask.float().mean().item())
    assert torch.equal(p.select([1]).block_mask(), mask[1:2])
    with pytest.raises(ValueError, match="kv_num_blocks must be"):
        BlockSparsePattern(p.kv_num_blocks, p.kv_indices, 32, 60, 70)


def test_reference_key_padding_lengths():
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    kv_lens = torch.tensor([33, 40])
    tok = (torch.arange(40) < kv_lens.view(-1, 1)).view(2, 1, 1, 40)
    out, _ = attention_reference(q, k, v, kv_lens=kv_lens)
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=tok)).abs().max() <= 1e-5
    mask = torch.rand(2, 2, 3, 3) < 0.6
    mask[..., 0] = True
    mask[0, :, :, 2] = True  # block 2 of row 0 is partly padding (33 of 40 keys real)
    pattern = BlockSparsePattern.from_block_mask(mask, 16, 40, 40)
    out_s, _ = block_sparse_reference(q, k, v, pattern, kv_lens=kv_lens)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.token_mask() & tok)
    assert (out_s - ref).abs().max() <= 1e-5


def test_bench_kernels_rows_and_cli(capsys):
    from hasten.cli import main
    from hasten.kernels.bench import bench, random_pattern

    p = random_pattern(1, 2, 128, 16, 0.75, "cpu")
    assert p.density() == 0.25 and p.block_mask()[..., torch.arange(8), torch.arange(8)].all()
    rows = bench([64], 1, 1, 16, torch.float32, 16, [0.0, 0.5, 0.75], 1, "cpu")
    assert [round(sp["density"], 2) for sp in rows[0]["sparse"].values()] == [1.0, 0.5, 0.25]
    assert rows[0]["backend"] == "torch" and rows[0]["sdpa_tflops"] > 0
    assert main(["bench-kernels", "--seq-lens", "64", "--heads", "1", "--head-dim", "16", "--block-size", "16",
                 "--repeats", "1", "--sparsities", "0.5"]) == 0
    assert "sparsity 0.50 (density 0.50)" in capsys.readouterr().out
