"""AdaSpa adaptive pattern: mass coverage, dense text tokens, reuse across steps, refresh, off == dense."""

from __future__ import annotations

import pytest
import torch

from hasten.kernels.adaspa import (
    AdaSpa,
    AdaSpaConfig,
    block_coverage,
    dense_blocks,
    pooled_block_mass,
    search_pattern,
    select_blocks,
)
from hasten.kernels.block_sparse import BlockSparsePattern, block_sparse_reference
from hasten.kernels.flash_attention import attention_reference

BS = 16


def _structured(B=1, H=3, S=128, D=16, seed=0):
    """Queries/keys with local structure (per-block shared component) so a sparse pattern exists."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randn(S // BS + 1, D, generator=g) * 1.5).repeat_interleave(BS, 0)[:S]
    sharp = torch.tensor([0.3, 1.0, 2.0])[:H].view(1, H, 1, 1)  # heads differ in how peaked they are
    q = torch.randn(B, H, S, D, generator=g) * 0.5 + pos * sharp
    k = torch.randn(B, H, S, D, generator=g) * 0.5 + pos * sharp
    return q, k, torch.randn(B, H, S, D, generator=g)


def _exact_block_mass(q, k, pattern):
    """Independent check: share of the softmax mass inside the pattern, averaged per query block."""
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    kept = (p * pattern.token_mask()).sum(-1)  # (B, H, S)
    S = q.shape[2]
    nb = -(-S // BS)
    kept = torch.nn.functional.pad(kept, (0, nb * BS - S), value=float("nan")).view(*kept.shape[:2], nb, BS)
    return kept.nanmean(-1)


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_pattern_covers_target_mass_and_adapts_per_head(target):
    q, k, v = _structured()
    _, lse = attention_reference(q, k, v)
    cfg = AdaSpaConfig(target_mass=target, block_size=BS, backend="torch")
    pattern, coverage = search_pattern(q, k, v, lse, cfg)
    exact = _exact_block_mass(q, k, pattern)
    assert (exact >= target - 1e-4).all()
    assert (coverage - exact).abs().max() < 1e-4  # the kernel-LSE coverage is the exact mass
    per_head = pattern.kv_num_blocks.float().mean(-1)[0]
    assert pattern.density() < 0.9
    assert per_head[0] > per_head[2]  # the flatter head keeps more blocks (head-adaptive)


def test_exact_refinement_fixes_coarse_misses():
    """Unstructured, peaky attention: the pooled estimate alone misses the target; the LSE check fixes it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g) * 3 for _ in range(3))
    _, lse = attention_reference(q, k, v)
    coarse = select_blocks(pooled_block_mass(q, k, BS, 0.25), torch.full((1, 2, 8), 0.8))
    _, lse_coarse = block_sparse_reference(q, k, v, BlockSparsePattern.from_block_mask(coarse, BS, 128, 128))
    assert (block_coverage(lse_coarse, lse, BS) < 0.8).any()  # the coarse level alone falls short
    densities = []
    for rounds in (0, 1, 3):
        cfg = AdaSpaConfig(target_mass=0.8, block_size=BS, max_refine_rounds=rounds, backend="torch")
        pattern, coverage = search_pattern(q, k, v, lse, cfg)
        assert (coverage >= 0.8 - 1e-4).all()
        assert (_exact_block_mass(q, k, pattern) >= 0.8 - 1e-4).all()
        densities.append(pattern.density())
    assert densities[2] <= densities[0] < 1.0  # refining is cheaper than making short rows dense


def test_ragged_sequence_pattern_is_valid():
    q, k, v = _structured(S=120)
    _, lse = attention_reference(q, k, v)
    pattern, _ = search_pattern(q, k, v, lse, AdaSpaConfig(block_size=BS, backend="torch"))
    assert pattern.kv_num_blocks.shape[-1] == 8
    assert (_exact_block_mass(q, k, pattern) >= 0.95 - 1e-4).all()


def test_text_tokens_stay_dense():
    q, k, v = _structured(S=128)
    _, lse = attention_reference(q, k, v)
    ranges = ((100, 128),)  # text at the back, not block aligned
    pattern, _ = search_pattern(q, k, v, lse, AdaSpaConfig(block_size=BS, backend="torch"), ranges)
    mask = pattern.block_mask()
    text_blocks = dense_blocks(128, BS, ranges)
    assert text_blocks.tolist() == [False] * 6 + [True] * 2
    assert mask[:, :, :, text_blocks].all()  # every query block sees all text keys
    assert mask[:, :, text_blocks, :].all()  # text queries see everything
    assert not mask.all()


def test_off_returns_none_and_short_sequences_stay_dense():
    q, k, v = _structured()
    for cfg in (AdaSpaConfig(target_mass=1.0, warmup_steps=0), AdaSpaConfig(enabled=False, warmup_steps=0),
                AdaSpaConfig(warmup_steps=0, min_seq_len=1024)):
        pol = AdaSpa(cfg)
        assert all(pol.attend("l", [0], s, q, k, v) is None for s in range(5))
        assert pol.stats.dense_calls == 5 and not pol.patterns


def test_warmup_search_reuse_and_refresh_cadence():
    q, k, v = _structured()
    cfg = AdaSpaConfig(block_size=BS, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")
    pol = AdaSpa(cfg)
    pol.begin_run()
    kinds, patterns = [], []
    for step in range(9):
        before = pol.stats.search_calls, pol.stats.sparse_calls
        out = pol.attend("layer0", [("cond", 0)], step, q, k, v)
        after = pol.stats.search_calls, pol.stats.sparse_calls
        kinds.append("dense" if out is None else "search" if after[0] > before[0] else "sparse")
        patterns.append(pol.patterns.get(("layer0", ("cond", 0))))
    assert kinds == ["dense", "dense", "search", "sparse", "sparse", "search", "sparse", "sparse", "search"]
    assert patterns[3] is patterns[2] and patterns[4] is patterns[2]  # reused, not searched again
    assert patterns[5] is not patterns[2]
    sparse_out = pol.attend("layer0", [("cond", 0)], 9, q, k, v)
    ref, _ = block_sparse_reference(q, k, v, patterns[8])
    assert torch.equal(sparse_out, ref)
    pol.end_run()
    assert not pol.patterns and pol.last_run is not None and pol.last_run.search_calls == 3


def test_patterns_are_per_layer_and_branch():
    qa, ka, va = _structured(seed=1)
    qb, kb, vb = _structured(seed=2)
    pol = AdaSpa(AdaSpaConfig(block_size=BS, warmup_steps=0, min_seq_len=0, backend="torch", target_mass=0.8))
    q, k, v = torch.cat([qa, qb]), torch.cat([ka, kb]), torch.cat([va, vb])
    pol.attend("l0", ["uncond", "cond"], 0, q, k, v)
    pa, pb = pol.patterns[("l0", "uncond")], pol.patterns[("l0", "cond")]
    _, lse_a = attention_reference(qa, ka, va)
    alone, _ = search_pattern(qa, ka, va, lse_a, pol.config)
    assert torch.equal(pa.block_mask(), alone.block_mask())
    assert not torch.equal(pa.block_mask(), pb.block_mask())
    # batch rows reordered: each row still gets its own branch's pattern
    out = pol.attend("l0", ["cond", "uncond"], 1, torch.cat([qb, qa]), torch.cat([kb, ka]), torch.cat([vb, va]))
    ref_b, _ = block_sparse_reference(qb, kb, vb, pb)
    assert (out[:1] - ref_b).abs().max() <= 1e-6


def test_config_validation_names_ranges():
    with pytest.raises(ValueError, match=r"target_mass must be <= 1.0"):
        AdaSpaConfig(target_mass=1.5)
    with pytest.raises(ValueError, match=r"target_mass must be > 0.0"):
        AdaSpaConfig(target_mass=0.0)
    with pytest.raises(ValueError, match="finite"):
        AdaSpaConfig(target_mass=float("nan"))
    with pytest.raises(ValueError, match="power of two"):
        AdaSpaConfig(block_size=48)
    with pytest.raises(ValueError, match="refresh_every must be >= 0"):
        AdaSpaConfig(refresh_every=-1)
    with pytest.raises(TypeError, match="warmup_steps must be an integer"):
        AdaSpaConfig(warmup_steps=2.5)
    with pytest.raises(TypeError, match="enabled must be True or False"):
        AdaSpaConfig(enabled="no")
    with pytest.raises(ValueError, match="backend must be one of"):
        AdaSpaConfig(backend="cuda")


def test_triton_backend_without_gpu_fails_at_config_time(monkeypatch):
    import hasten.kernels.flash_attention as fa

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fa.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' cannot run on this machine: no CUDA GPU"):
        AdaSpaConfig(backend="triton")
    AdaSpaConfig(backend="auto")  # auto picks PyTorch on such a machine
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter (tests) runs the kernels on the CPU
    if fa.triton_available():
        AdaSpaConfig(backend="triton")


def test_block_coverage_handles_ragged_tail():
    lse_d = torch.zeros(1, 1, 20)
    lse_s = torch.full((1, 1, 20), -0.1)
    cov = block_coverage(lse_s, lse_d, 16)
    assert cov.shape == (1, 1, 2) and torch.allclose(cov, torch.exp(torch.tensor(-0.1)).expand(1, 1, 2))
