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

Options beyond the paper (defaults off): ``dense_final_steps`` runs the last steps of a run dense (the
detail-forming steps, where the output is most sensitive), and ``remainder="pooled"`` lets every skipped
key block still contribute through one pooled token (its mean key and value, weighted by its token count)
instead of nothing: where attention is spread out (video models), most of the mass lives in many mid-weight
blocks, and their pooled contribution recovers much of the error at the cost of one (S_q x KB) product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..validation import check_bool, check_choice, check_float, check_int
from .block_sparse import BlockSparsePattern, block_sparse_attention
from .eager import eager
from .flash_attention import flash_attention, key_valid, triton_problem

DenseRanges = tuple[tuple[int, int], ...]


@dataclass
class AdaSpaConfig:
    """Settings of the adaptive sparse attention; ``target_mass=1.0`` or ``enabled=False`` is off (dense).

    ``backend``: "auto" (Triton kernels on CUDA, PyTorch elsewhere), "torch", or "triton" (refused here,
    at config time, on a machine that cannot run it: no GPU and no ``TRITON_INTERPRET=1``).
    """

    target_mass: float = 0.95
    block_size: int = 64
    warmup_steps: int = 5
    refresh_every: int = 10
    min_seq_len: int = 1024
    max_refine_rounds: int = 3
    enabled: bool = True
    backend: str = "auto"
    measure_error: bool = False  # diagnostics: also run dense at sparse steps, record relative error per layer
    dense_final_steps: int = 0  # the last N steps of a run stay dense (needs the run's step count)
    remainder: str = "drop"  # skipped key blocks: "drop" (AdaSpa) or "pooled" (one mean key/value token each)

    def __post_init__(self) -> None:
        own = "AdaSpaConfig"
        self.target_mass = check_float(own, "target_mass", self.target_mass, lo=0.0, hi=1.0, lo_open=True)
        self.block_size = check_int(own, "block_size", self.block_size, lo=16, hi=256)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"{own}.block_size must be a power of two in [16, 256], got {self.block_size}")
        self.warmup_steps = check_int(own, "warmup_steps", self.warmup_steps, lo=0)
        self.refresh_every = check_int(own, "refresh_every", self.refresh_every, lo=0)
        self.min_seq_len = check_int(own, "min_seq_len", self.min_seq_len, lo=0)
        self.max_refine_rounds = check_int(own, "max_refine_rounds", self.max_refine_rounds, lo=0, hi=64)
        self.enabled = check_bool(own, "enabled", self.enabled)
        self.measure_error = check_bool(own, "measure_error", self.measure_error)
        self.backend = check_choice(own, "backend", self.backend, ("auto", "triton", "torch"))
        self.dense_final_steps = check_int(own, "dense_final_steps", self.dense_final_steps, lo=0)
        self.remainder = check_choice(own, "remainder", self.remainder, ("drop", "pooled"))
        if self.backend == "triton":
            problem = triton_problem()
            if problem:
                raise ValueError(f"{own}.backend='triton' cannot run on this machine: {problem}. "
                                 "Use backend='auto' (Triton on CUDA, PyTorch elsewhere) or 'torch'.")

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


def pooled_remainder(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, out: torch.Tensor,
    lse: torch.Tensor, scale: float | None = None, kv_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` (over the kept blocks, with its ``lse``) plus every skipped key block as one pooled token.

    A skipped block ``kb`` of ``n`` valid keys contributes ``n * exp(q . mean_k * scale)`` with value
    ``mean_v``; both parts are merged by their log-sum-exp. ``kv_valid`` (B, S_k) bool marks padding keys.
    """
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    B, H, Sq, D = q.shape
    Sk, bs = k.shape[2], pattern.block_size
    KB, pad = -(-Sk // bs), -(-Sk // bs) * bs - Sk
    ok = torch.ones(B, Sk, dtype=torch.bool, device=q.device) if kv_valid is None else kv_valid.to(q.device)
    w = torch.nn.functional.pad(ok.float(), (0, pad)).view(B, 1, KB, bs, 1)
    count = w.sum(3)  # (B, 1, KB, 1)
    km = (torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, H, KB, bs, D) * w).sum(3) / count.clamp_min(1)
    vm = (torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, H, KB, bs, D) * w).sum(3) / count.clamp_min(1)
    logits = torch.matmul(q.float(), km.transpose(-1, -2)) * s + count.view(B, 1, 1, KB).log()
    kept = pattern.block_mask().to(q.device).repeat_interleave(bs, dim=2)[:, :, :Sq]  # (B, H, S_q, KB)
    logits = logits.masked_fill(kept, float("-inf"))
    lse_r = torch.logsumexp(logits, dim=-1)  # -inf where nothing was skipped
    out_r = torch.matmul(torch.exp(logits - lse_r.unsqueeze(-1)).nan_to_num(0.0), vm)
    total = torch.logaddexp(lse.float(), lse_r)
    a = torch.exp(lse.float() - total).nan_to_num(0.0).unsqueeze(-1)
    b = torch.exp(lse_r - total).nan_to_num(0.0).unsqueeze(-1)
    return (out.float() * a + out_r * b).to(out.dtype)


def search_pattern(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse_dense: torch.Tensor, config: AdaSpaConfig,
    dense_ranges: DenseRanges = (), scale: float | None = None, kv_lens: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
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
        _, lse_sparse = block_sparse_attention(q, k, v, pattern, s, config.backend, kv_lens, kv_mask)
        coverage = block_coverage(lse_sparse, lse_dense, bs)  # NaN where every query of a block sees no key
        short = coverage < target - 1e-6
        if rnd == final or not bool(short.any()):
            break
        raised = torch.ones_like(threshold) if rnd + 1 == final else 1 - (1 - threshold) / 4
        threshold = torch.where(short, raised, threshold)
    return pattern, coverage


def key_padding_mask(mask: torch.Tensor, shape: tuple[int, int, int, int]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """Split an SDPA ``attn_mask`` for (B, H, S_q, S_k) attention into a key-padding mask.

    Returns ``(kv_mask (B, S_k) | None, q_valid (B, H or 1, S_q) | None)`` when the mask is "key j is padding
    for row b" (the same for every head and query) possibly combined with "query i is padding" (a fully
    masked query outputs 0, as PyTorch's SDPA does), as text padding makes; None for any other mask.
    """
    B, H, Sq, Sk = shape
    m = mask
    if m.ndim > 4 or m.shape[-1] != Sk:
        return None
    while m.ndim < 4:
        m = m.unsqueeze(0)
    try:
        torch.broadcast_shapes(m.shape, shape)
    except RuntimeError:
        return None
    if m.dtype == torch.bool:
        valid = m
    elif m.is_floating_point():
        valid = m == 0
        if not bool(((m == 0) | (m < -1e4)).all()):
            return None  # a real bias, not a mask
    else:
        return None
    kv = valid.any(dim=2)  # (Bm, Hm, Sk)
    qv = valid.any(dim=3)  # (Bm, Hm, Sqm)
    if not bool((kv == kv[:, :1]).all()) or not torch.equal(valid, qv[..., None] & kv[..., None, :]):
        return None
    if not valid.dtype == torch.bool or (mask.dtype != torch.bool and not bool(qv.all())):
        return None  # a float mask with a fully masked query: SDPA averages, not zero; leave it dense
    kv_mask = None if bool(kv.all()) else kv[:, 0].expand(B, Sk)
    q_valid = None if bool(qv.all()) else qv.expand(B, qv.shape[1], Sq) if qv.shape[2] == Sq else None
    if q_valid is None and not bool(qv.all()):
        return None
    return kv_mask, q_valid


def stack_patterns(patterns: list[BlockSparsePattern]) -> BlockSparsePattern:
    """One batched pattern from single-row patterns of the same shape (index widths padded)."""
    width = max(p.kv_indices.shape[-1] for p in patterns)
    idx = [torch.nn.functional.pad(p.kv_indices, (0, width - p.kv_indices.shape[-1])) for p in patterns]
    p0 = patterns[0]
    return BlockSparsePattern(torch.cat([p.kv_num_blocks for p in patterns]), torch.cat(idx), p0.block_size,
                              p0.seq_q, p0.seq_k)


@dataclass
class AdaSpaStats:
    """What the policy did during one run: self-attention calls by kind, blocks kept, per-layer density.

    ``fallbacks`` counts self-attention calls the adapter had to leave dense, by reason (a general mask,
    dropout, a causal or context-parallel call, a processor whose attention hasten cannot reach): they are
    never silent.
    """

    dense_calls: int = 0
    search_calls: int = 0
    sparse_calls: int = 0
    blocks_kept: int = 0  # visited (query block, key block) pairs over the sparse calls
    blocks_total: int = 0  # all pairs those calls would visit dense
    fallbacks: dict[str, int] = field(default_factory=dict)
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (density, min coverage)
    errors: dict[str, float] = field(default_factory=dict)  # layer -> max ||sparse - dense|| / ||dense||

    @property
    def calls(self) -> int:
        return self.dense_calls + self.search_calls + self.sparse_calls + sum(self.fallbacks.values())

    def mean_density(self) -> float | None:
        return sum(d for d, _ in self.layers.values()) / len(self.layers) if self.layers else None

    def summary(self) -> str:
        kept = (f", blocks kept {self.blocks_kept}/{self.blocks_total} "
                f"({self.blocks_kept / self.blocks_total:.0%})") if self.blocks_total else ""
        dens = self.mean_density()
        tail = f", mean searched density {dens:.2f}" if dens is not None else ""
        fb = "".join(f", {n} dense ({why})" for why, n in sorted(self.fallbacks.items()))
        return (f"sparse attention: {self.sparse_calls} sparse, {self.search_calls} search, "
                f"{self.dense_calls} dense calls{fb}{kept}{tail}")

    def no_effect_reason(self, config: AdaSpaConfig) -> str | None:
        """Why no call went sparse in this run (None when one did), for the adapters' warning. A search call
        is a dense pass that only finds the pattern for later steps: a run that ends after it gained nothing."""
        if self.sparse_calls:
            return None
        reasons = []
        if self.search_calls:
            reasons.append(f"{self.search_calls} calls searched a pattern but the run ended before a sparse step: "
                           f"steps 0-{config.warmup_steps - 1} are dense warm-up (warmup_steps="
                           f"{config.warmup_steps}) and step {config.warmup_steps} searches, so a run needs at least "
                           f"{config.warmup_steps + 2} steps (or a lower warmup_steps)")
        if self.dense_calls:
            reasons.append(f"{self.dense_calls} self-attention calls stayed dense: sequences shorter than "
                           f"min_seq_len={config.min_seq_len} or a run of no more than "
                           f"warmup_steps={config.warmup_steps} steps")
        reasons += [f"{n} calls dense: {why}" for why, n in sorted(self.fallbacks.items())]
        return "; ".join(reasons) or "no self-attention call ran"


class AdaSpa:
    """Per-run state: patterns keyed by (layer, branch), searched after warm-up and refreshed at a cadence.

    A pattern is only reused for the same head count, token count and block size: a resolution change
    (bottleneck sampling, another call size) searches anew instead of reusing a stale pattern.
    """

    def __init__(self, config: AdaSpaConfig | None = None) -> None:
        self.config = config or AdaSpaConfig()
        self.patterns: dict[tuple[Any, Any], BlockSparsePattern] = {}
        self.stats = AdaSpaStats()
        self.last_run: AdaSpaStats | None = None
        self.num_steps: int | None = None

    def begin_run(self, num_steps: int | None = None) -> None:
        """Start a run of ``num_steps`` steps (None: unknown; then ``dense_final_steps`` cannot apply)."""
        self.patterns = {}
        self.stats = AdaSpaStats()
        self.num_steps = num_steps

    def end_run(self) -> AdaSpaStats | None:
        """Close the run; returns its statistics if it made any attention call (else None)."""
        done = self.stats if self.stats.calls else None
        if done is not None:
            self.last_run = done
        self.begin_run()
        return done

    def fallback(self, reason: str) -> None:
        """Count a self-attention call the adapter had to run dense (``reason`` says why)."""
        self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1

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
        if c.dense_final_steps and self.num_steps is not None and step >= self.num_steps - c.dense_final_steps:
            return "dense"
        return "search" if self.is_search_step(step) else "sparse"

    @eager  # decisions branch on per-layer Python state: never traced (no per-layer recompiles)
    def attend(
        self, layer: Any, rows: list[Any], step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        scale: float | None = None, dense_ranges: DenseRanges = (), kv_lens: torch.Tensor | None = None,
        kv_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Attention for (B, H, S, D) ``q, k, v`` whose batch rows are branches ``rows``; None = run dense.

        The caller decides what is self-attention (queries and keys may differ in count when extra keys
        are appended, e.g. text keys in ``dense_ranges``); cross-attention should not be sent here.

        ``kv_lens`` (B,) / ``kv_mask`` (B, S) optionally mark padding keys of each row (key-padding masks).
        """
        decision = self.decide(step, k.shape[2])
        if decision == "dense":
            self.stats.dense_calls += 1
            return None
        keys = [(layer, r) for r in rows]
        shape = (q.shape[1], q.shape[2], k.shape[2], self.config.block_size)
        have = [self.patterns.get(key) for key in keys]
        fits = [p is not None and (p.kv_num_blocks.shape[1], p.seq_q, p.seq_k, p.block_size) == shape for p in have]
        for key, p, ok in zip(keys, have, fits):
            if p is not None and not ok:  # the resolution changed: the old pattern is of no use any more
                del self.patterns[key]
        if decision == "sparse" and all(fits):
            pattern = stack_patterns(have)
            self.stats.sparse_calls += 1
            self.stats.blocks_kept += int(pattern.kv_num_blocks.sum().item())
            self.stats.blocks_total += pattern.kv_num_blocks.numel() * pattern.num_key_blocks
            out, lse = block_sparse_attention(q, k, v, pattern, scale, self.config.backend, kv_lens, kv_mask)
            if self.config.remainder == "pooled":
                out = pooled_remainder(q, k, v, pattern, out, lse, scale, key_valid(kv_lens, kv_mask, k.shape[2], q.device))
            if self.config.measure_error:
                ref, _ = flash_attention(q, k, v, scale, self.config.backend, kv_lens=kv_lens, kv_mask=kv_mask)
                err = float(((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item())
                self.stats.errors[str(layer)] = max(err, self.stats.errors.get(str(layer), 0.0))
            return out
        # search: a dense pass with exact LSE, then the pattern for the following steps
        self.stats.search_calls += 1
        out, lse = flash_attention(q, k, v, scale, self.config.backend, kv_lens=kv_lens, kv_mask=kv_mask)
        pattern, coverage = search_pattern(q, k, v, lse, self.config, dense_ranges, scale, kv_lens, kv_mask)
        for i, key in enumerate(keys):
            self.patterns[key] = pattern.select([i])
        cov = coverage[~coverage.isnan()]
        self.stats.layers[str(layer)] = (pattern.density(), float(cov.min().item()) if cov.numel() else 1.0)
        return out
