"""AdaSpa-style adaptive block-sparse attention: per head, keep the key blocks that hold a target share
of the attention mass, searched once after warm-up and reused across denoising steps.

Search (at a dense step, which yields the exact LSE of every query):
1. coarse: block-pooled scores ``softmax_kb(mean_q(qb) . mean_k(kb) * scale + log|kb|)`` estimate each
   key block's share of a query block's mass; blocks are ranked by it and the smallest prefix whose
   estimate reaches the threshold is kept (head-adaptive: each head keeps as many blocks as it needs);
2. exact refinement: the block-sparse kernel's LSE over the kept blocks gives the exact mass they cover,
   ``coverage_i = exp(lse_sparse_i - lse_dense_i)``; query blocks whose mean coverage is below the
   target raise their threshold and are searched again, and after ``max_refine_rounds`` go dense.
Designated dense token ranges (text tokens of joint attention) are always kept: their key blocks are
visited by every query block and their query blocks visit every key block. The paper observes the
pattern and LSE are nearly invariant across steps, so the pattern is reused until the next refresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_sparse import BlockSparsePattern, block_sparse_attention
from .flash_attention import flash_attention

DenseRanges = tuple[tuple[int, int], ...]


@dataclass
class AdaSpaConfig:
    """Settings of the adaptive sparse attention; ``target_mass=1.0`` or ``enabled=False`` is off (dense)."""

    target_mass: float = 0.95
    block_size: int = 64
    warmup_steps: int = 5
    refresh_every: int = 10
    min_seq_len: int = 1024
    max_refine_rounds: int = 3
    enabled: bool = True
    backend: str = "auto"
    measure_error: bool = False  # diagnostics: also run dense at sparse steps, record relative error per layer

    def __post_init__(self) -> None:
        if not 0.0 < self.target_mass <= 1.0:
            raise ValueError(f"target_mass must be in (0, 1] (1.0 = dense), got {self.target_mass}")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two in [16, 256], got {self.block_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0 = never refresh), got {self.refresh_every}")
        if self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be >= 0, got {self.min_seq_len}")
        if self.max_refine_rounds < 0:
            raise ValueError(f"max_refine_rounds must be >= 0, got {self.max_refine_rounds}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")

    @property
    def off(self) -> bool:
        return not self.enabled or self.target_mass >= 1.0


def dense_blocks(seq_len: int, block_size: int, ranges: DenseRanges) -> torch.Tensor:
    """Boolean (num_blocks,) flags of the blocks that overlap any dense token range ``[start, end)``."""
    nb = -(-seq_len // block_size)
    flags = torch.zeros(nb, dtype=torch.bool)
    for start, end in ranges:
        start, end = max(0, start), min(seq_len, end)
        if end > start:
            flags[start // block_size : (end - 1) // block_size + 1] = True
    return flags


def _block_means(x: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S, D = x.shape
    nb = -(-S // bs)
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * bs - S)).view(B, H, nb, bs, D)
    counts = torch.full((nb,), float(bs), device=x.device)
    counts[-1] = S - (nb - 1) * bs
    return xp.sum(3) / counts[:, None], counts


def pooled_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Coarse estimate (B, H, QB, KB) of each key block's share of each query block's attention mass."""
    qm, _ = _block_means(q, block_size)
    km, kcount = _block_means(k, block_size)
    logits = torch.matmul(qm, km.transpose(-1, -2)) * scale + kcount.log()
    return torch.softmax(logits, dim=-1)


def select_blocks(est: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Block mask keeping, per query block, the fewest top-ranked key blocks whose estimate reaches ``threshold``."""
    vals, order = torch.sort(est, dim=-1, descending=True)
    before = torch.cumsum(vals, dim=-1) - vals  # mass of the better-ranked blocks
    keep_sorted = before < threshold.unsqueeze(-1)
    keep_sorted[..., 0] = True
    keep_sorted |= (threshold >= 1.0).unsqueeze(-1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def block_coverage(lse_sparse: torch.Tensor, lse_dense: torch.Tensor, block_size: int) -> torch.Tensor:
    """Exact attention mass kept, averaged over each query block: mean_i exp(lse_sparse_i - lse_dense_i)."""
    B, H, S = lse_dense.shape
    nb = -(-S // block_size)
    cov = torch.exp((lse_sparse - lse_dense).clamp(max=0.0))
    cov = torch.nn.functional.pad(cov, (0, nb * block_size - S), value=float("nan")).view(B, H, nb, block_size)
    return cov.nanmean(-1)


def search_pattern(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse_dense: torch.Tensor, config: AdaSpaConfig,
    dense_ranges: DenseRanges = (), scale: float | None = None, kv_lens: torch.Tensor | None = None,
) -> tuple[BlockSparsePattern, torch.Tensor]:
    """Hierarchical search (coarse pooled ranking, exact LSE-based coverage); returns (pattern, coverage)."""
    bs, target = config.block_size, config.target_mass
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    Sq, Sk = q.shape[2], k.shape[2]
    est = pooled_block_mass(q, k, bs, s)
    qd = dense_blocks(Sq, bs, dense_ranges).to(q.device)
    kd = dense_blocks(Sk, bs, dense_ranges).to(q.device)
    threshold = torch.full(est.shape[:3], target, device=q.device)
    final = config.max_refine_rounds + 1  # after the refinement rounds, short query blocks go dense
    for rnd in range(final + 1):
        mask = select_blocks(est, threshold) | kd
        mask[:, :, qd, :] = True
        pattern = BlockSparsePattern.from_block_mask(mask, bs, Sq, Sk)
        _, lse_sparse = block_sparse_attention(q, k, v, pattern, s, config.backend, kv_lens)
        coverage = block_coverage(lse_sparse, lse_dense, bs)
        short = coverage < target - 1e-6
        if rnd == final or not bool(short.any()):
            break
        raised = torch.ones_like(threshold) if rnd + 1 == final else 1 - (1 - threshold) / 4
        threshold = torch.where(short, raised, threshold)
    return pattern, coverage


def stack_patterns(patterns: list[BlockSparsePattern]) -> BlockSparsePattern:
    """One batched pattern from single-row patterns of the same shape (index widths padded)."""
    width = max(p.kv_indices.shape[-1] for p in patterns)
    idx = [torch.nn.functional.pad(p.kv_indices, (0, width - p.kv_indices.shape[-1])) for p in patterns]
    p0 = patterns[0]
    return BlockSparsePattern(torch.cat([p.kv_num_blocks for p in patterns]), torch.cat(idx), p0.block_size,
                              p0.seq_q, p0.seq_k)


@dataclass
class AdaSpaStats:
    """What the policy did during one run: calls by kind, and the latest density/coverage per layer."""

    dense_calls: int = 0
    search_calls: int = 0
    sparse_calls: int = 0
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (density, min coverage)
    errors: dict[str, float] = field(default_factory=dict)  # layer -> max ||sparse - dense|| / ||dense||

    def mean_density(self) -> float | None:
        return sum(d for d, _ in self.layers.values()) / len(self.layers) if self.layers else None

    def summary(self) -> str:
        dens = self.mean_density()
        tail = f", mean block density {dens:.2f}" if dens is not None else ""
        return (f"sparse attention: {self.sparse_calls} sparse, {self.search_calls} search, "
                f"{self.dense_calls} dense calls{tail}")


class AdaSpa:
    """Per-run state: patterns keyed by (layer, branch), searched after warm-up and refreshed at a cadence."""

    def __init__(self, config: AdaSpaConfig | None = None) -> None:
        self.config = config or AdaSpaConfig()
        self.patterns: dict[tuple[Any, Any], BlockSparsePattern] = {}
        self.stats = AdaSpaStats()
        self.last_run: AdaSpaStats | None = None

    def begin_run(self) -> None:
        self.patterns = {}
        self.stats = AdaSpaStats()

    def end_run(self) -> None:
        if self.stats.dense_calls or self.stats.search_calls or self.stats.sparse_calls:
            self.last_run = self.stats
        self.begin_run()

    def is_search_step(self, step: int) -> bool:
        c = self.config
        if step == c.warmup_steps:
            return True
        return c.refresh_every > 0 and step > c.warmup_steps and (step - c.warmup_steps) % c.refresh_every == 0

    def decide(self, step: int, seq_len: int) -> str:
        """'dense' (caller runs its own attention, bit-identical), 'search' or 'sparse'."""
        c = self.config
        if c.off or seq_len < c.min_seq_len or step < c.warmup_steps:
            return "dense"
        return "search" if self.is_search_step(step) else "sparse"

    def attend(
        self, layer: Any, rows: list[Any], step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        scale: float | None = None, dense_ranges: DenseRanges = (), kv_lens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Attention for (B, H, S, D) ``q, k, v`` whose batch rows are branches ``rows``; None = run dense.

        ``kv_lens`` (B,) optionally marks trailing keys of each row as padding (key-padding masks).
        """
        decision = self.decide(step, k.shape[2])
        if decision == "dense" or q.shape[2] != k.shape[2]:
            self.stats.dense_calls += 1
            return None
        keys = [(layer, r) for r in rows]
        shape = (q.shape[1], q.shape[2], self.config.block_size)
        have = [self.patterns.get(key) for key in keys]
        if decision == "sparse" and all(
            p is not None and (p.kv_num_blocks.shape[1], p.seq_q, p.block_size) == shape for p in have
        ):
            self.stats.sparse_calls += 1
            out, _ = block_sparse_attention(q, k, v, stack_patterns(have), scale, self.config.backend, kv_lens)
            if self.config.measure_error:
                ref, _ = flash_attention(q, k, v, scale, self.config.backend, kv_lens=kv_lens)
                err = float(((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item())
                self.stats.errors[str(layer)] = max(err, self.stats.errors.get(str(layer), 0.0))
            return out
        # search: a dense pass with exact LSE, then the pattern for the following steps
        self.stats.search_calls += 1
        out, lse = flash_attention(q, k, v, scale, self.config.backend, kv_lens=kv_lens)
        pattern, coverage = search_pattern(q, k, v, lse, self.config, dense_ranges, scale, kv_lens)
        for i, key in enumerate(keys):
            self.patterns[key] = pattern.select([i])
        self.stats.layers[str(layer)] = (pattern.density(), float(coverage.min().item()))
        return out
