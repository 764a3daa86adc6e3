"""SADA: stability-guided adaptive step skipping (Jiang et al., "SADA: Stability-guided Adaptive Diffusion
Acceleration", ICML 2025), as a framework-neutral step cache.

SADA reads the stability of the sampling ODE from the solver's recent gradient estimates f (the denoiser
output: velocity for flow-matching models, noise for ε-models) and skips a step when the trajectory is
locally stable. Per branch, with the last three *computed* outputs f₀, f₁, f₂ at steps s₀ < s₁ < s₂:

* first divided differences d₀ = (f₁ − f₀)/(s₁ − s₀), d₁ = (f₂ − f₁)/(s₂ − s₁);
* the paper's stability momentum  m = −(d₁ − d₀)  (its flow-matching criterion ``momentum = −Δ²f``);
* the next call is skipped when mean(m) ≤ ``threshold`` · mean|d₁| (paper: threshold 0, i.e. the sign of
  the mean second-order difference), inside the acceleration range and at most ``max_interval`` in a row;
* a skipped call is approximated from the solver's gradient information: f is extrapolated from the last
  computed outputs (``order`` 1 = the Adams–Bashforth-like f̂ = f₂ + (t − s₂)·d₁ the paper uses; ``order``
  2 = the Lagrange polynomial through three points, the paper's late-stage Lagrange interpolation).

Off (``max_interval=0``) computes every call, bit-identical to no cache. Branches (cond/uncond, batch
items) keep their own state; with ``sync_branches`` the branches of one batch item decide together.

With ``tokens`` (a fraction) the paper's second half is on too: a call the step-level test must compute is
computed *token-level* when the branch has a trajectory to read: only the ``tokens`` fraction of tokens (the
fastest-moving ones by the branch's own trajectory, plus a spatially spread subset) goes through the transformer
blocks as queries and MLP rows, and the pruned tokens' outputs come from the cache
(:mod:`hasten.caches.sada_tokens`). At most ``token_interval`` token-level calls follow each other before a full
one refreshes every token. The adapter gathers/scatters the tokens around the block chain and completes the
attention keys/values (model-specific wiring: the Wan family).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from ..validation import check_bool, check_float, check_int
from .base import BranchKey, BranchRuns, BranchStats
from .forecast import forecast, push
from .sada_tokens import choose_tokens, fill_pruned, latent_mask, token_grid, token_scores


@dataclass
class SADAConfig:
    """Settings for :class:`SADA`.

    Attributes:
        max_interval: at most this many skipped calls in a row per branch; 0 turns SADA off
            (bit-identical to no cache).
        threshold: skip while mean(−Δ²f) ≤ threshold · mean|Δf| (0 = the paper's sign test; larger
            skips more, negative skips less).
        start: fraction of the run's steps always computed at the start (paper: 10 of 50 steps).
        end: fraction after which every step is computed (paper: 47 of 50).
        final_steps: the last ``final_steps`` steps are always computed.
        order: extrapolation order for a skipped call (1 = Adams–Bashforth-like linear, 2 = Lagrange).
        sync_branches: the cond/uncond branches of one batch item compute or skip together.
        tokens: token-level sparsity: the fraction of tokens a token-level call computes (the rest are
            extrapolated); None = step-level only (bit-identical to SADA without it). With ``max_interval=0``
            SADA skips no step and only prunes tokens.
        token_stride: one token per ``token_stride × token_stride`` cell is always computed (the paper's strided
            destination tokens, sx = sy), so every region stays computed.
        token_interval: at most this many token-level calls in a row per branch, then a full call.
        token_order: a pruned token's output: 0 = its last computed output (measured best), 1 = extrapolated
            linearly from its last two (the solver's gradient information).
    """

    max_interval: int = 1
    threshold: float = 0.0
    start: float = 0.2
    end: float = 0.94
    final_steps: int = 1
    order: int = 1
    sync_branches: bool = True
    tokens: float | None = None
    token_stride: int = 2
    token_interval: int = 1
    token_order: int = 0

    def __post_init__(self) -> None:
        own = "SADAConfig"
        self.max_interval = check_int(own, "max_interval", self.max_interval, lo=0)
        self.threshold = check_float(own, "threshold", self.threshold)
        self.start = check_float(own, "start", self.start, lo=0.0, hi=1.0)
        self.end = check_float(own, "end", self.end, lo=0.0, hi=1.0)
        if self.end < self.start:
            raise ValueError(f"SADAConfig.end ({self.end}) must be >= start ({self.start})")
        self.final_steps = check_int(own, "final_steps", self.final_steps, lo=0)
        self.order = check_int(own, "order", self.order, lo=1, hi=2)
        self.sync_branches = check_bool(own, "sync_branches", self.sync_branches)
        if self.tokens is not None:
            self.tokens = check_float(own, "tokens", self.tokens, lo=0.0, hi=1.0)
            if self.tokens <= 0:
                raise ValueError("SADAConfig.tokens must be in (0, 1] (the fraction of tokens computed) or None")
        self.token_stride = check_int(own, "token_stride", self.token_stride, lo=1)
        self.token_interval = check_int(own, "token_interval", self.token_interval, lo=1)
        self.token_order = check_int(own, "token_order", self.token_order, lo=0, hi=1)

    @property
    def is_off(self) -> bool:
        return self.max_interval == 0 and not self.token_level

    @property
    def token_level(self) -> bool:
        """Token-level sparsity asked for (a fraction below 1)."""
        return self.tokens is not None and self.tokens < 1.0


@dataclass
class _Branch:
    stats: BranchStats
    past: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, f) of recent computed calls
    shape: tuple | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    step: int = 0
    skipped: int = 0  # consecutive skipped calls
    momentum: list[float] = field(default_factory=list)  # normalised mean momentum at each decision (plots)
    pruned: int = 0  # consecutive token-level calls
    kept: torch.Tensor | None = None  # this call's kept token indices (token-level call) or None
    mask: torch.Tensor | None = None  # latent positions of the kept tokens
    num_tokens: int = 0  # tokens of the current call's grid

    def forget(self) -> None:
        self.past, self.skipped, self.pruned, self.kept, self.mask = [], 0, 0, None, None


class SADA(BranchRuns):
    """The SADA decision policy (implements :class:`hasten.caches.base.StepCache`)."""

    method = "SADA"

    def __init__(self, config: SADAConfig | None = None) -> None:
        super().__init__()
        self.config = config or SADAConfig()
        self.token_calls = 0  # branch calls computed token-level in the current run
        self.tokens_kept = 0  # tokens computed in those calls
        self.tokens_total = 0  # tokens those calls would have computed in full

    def begin_run(self, num_steps: int | None) -> None:
        super().begin_run(num_steps)
        self.token_calls, self.tokens_kept, self.tokens_total = 0, 0, 0

    def invalidate(self) -> None:
        """Drop cached tensors but keep statistics (e.g. the resolution changed mid-run)."""
        for b in self._branches.values():
            b.forget()

    # -- decisions -----------------------------------------------------------------------------
    def _forced(self, step: int, num_steps: int | None) -> bool:
        if num_steps is None or num_steps <= 0:
            return True  # without the run length the acceleration range is unknown: never skip
        cfg = self.config
        return (step < math.ceil(cfg.start * num_steps) or step >= math.floor(cfg.end * num_steps)
                or step >= num_steps - cfg.final_steps)

    def stability(self, b: _Branch) -> float | None:
        """mean(−(d₁ − d₀)) / mean|d₁| over the last three computed outputs (None with fewer)."""
        if len(b.past) < 3:
            return None
        (s0, f0), (s1, f1), (s2, f2) = b.past[-3:]
        d0 = (f1 - f0) / float(s1 - s0)
        d1 = (f2 - f1) / float(s2 - s1)
        scale = d1.abs().mean().item()
        if scale <= 0:
            return -math.inf  # the output stopped changing: perfectly stable
        return (-(d1 - d0)).mean().item() / scale

    def _wants_compute(self, b: _Branch, x: torch.Tensor, step: int, num_steps: int | None) -> bool:
        cfg = self.config
        if (cfg.is_off or self._forced(step, num_steps) or b.skipped >= cfg.max_interval
                or b.shape != tuple(x.shape) or not b.past or b.past[-1][0] >= step):
            return True
        m = self.stability(b)
        return m is None or m > cfg.threshold

    def should_compute(self, key: BranchKey, x: torch.Tensor, step: int, num_steps: int | None,
                       label: str | None = None, group: Hashable | None = None) -> bool:
        """True when the real forward must run for this branch at this call."""
        b = self._branches.get(key)
        if b is None:
            b = self._branches[key] = _Branch(stats=BranchStats(label=label or str(key)))
        elif b.shape is not None and (b.shape != tuple(x.shape) or b.dtype != x.dtype or b.device != x.device):
            b.forget()  # new shape: the trajectory so far says nothing about this one
        compute = self._wants_compute(b, x, step, num_steps)
        if group is not None and self.config.sync_branches:
            compute = self._group_decision(group, key, step, compute,
                                           lambda br: self._wants_compute(br, x, step, num_steps))
        b.step = step
        b.stats.decisions.append(compute)
        return compute

    # -- token level ---------------------------------------------------------------------------
    def _token_eligible(self, b: _Branch, x: torch.Tensor) -> bool:
        cfg = self.config
        return (cfg.token_level and len(b.past) >= 2 and b.past[-1][0] < b.step and b.shape == tuple(x.shape)
                and b.pruned < cfg.token_interval and not self._forced(b.step, self._num_steps))

    def token_plan(self, keys: list[BranchKey], rows: list[torch.Tensor],
                   patch: tuple[int, int, int], allowed: bool = True) -> list[torch.Tensor] | None:
        """Kept token indices per branch for one forward computing the branches ``keys`` (input ``rows``), or None
        for a full forward. All or nothing: one batched forward keeps the same token count for every row, so
        the call is token-level only when every branch in it can be (each from its own trajectory) and the
        adapter ``allowed`` it (e.g. it holds the branches' attention context)."""
        if any(k not in self._branches for k in keys):
            return None  # a forward the policy was not asked about (an adapter's fallback path): full
        branches = [self._branches[k] for k in keys]
        for b in branches:
            b.kept = b.mask = None
        if not allowed or not branches or not all(self._token_eligible(b, x) for b, x in zip(branches, rows, strict=True)):
            return None
        cfg = self.config
        plans = []
        for b, x in zip(branches, rows, strict=True):
            grid = token_grid(tuple(x.shape), patch)
            scores = token_scores(b.past, patch)
            if scores is None or scores.numel() != grid[0] * grid[1] * grid[2]:
                for bb in branches:
                    bb.kept = bb.mask = None
                return None
            b.kept = choose_tokens(scores, grid, cfg.tokens or 1.0, cfg.token_stride)
            b.num_tokens = scores.numel()
            b.mask = latent_mask(b.kept, grid, patch, x)
            plans.append(b.kept)
        return plans

    def fill(self, key: BranchKey, out: torch.Tensor) -> torch.Tensor:
        """A token-level call's output row with its pruned tokens' positions extrapolated from the trajectory
        (unchanged after a full call)."""
        b = self._branches[key]
        if b.kept is None or b.mask is None:
            return out
        est = forecast(b.past, b.step, 1) if self.config.token_order == 1 else None
        est = b.past[-1][1] if est is None else est
        self.token_calls += 1
        self.tokens_kept += int(b.kept.numel())
        self.tokens_total += b.num_tokens
        return fill_pruned(out, est.view_as(out), b.mask)

    def reuse(self, key: BranchKey, x: torch.Tensor) -> torch.Tensor:
        """The skipped call's output, extrapolated in step index from the last computed outputs."""
        b = self._branches[key]
        b.skipped += 1
        est = forecast(b.past, b.step, self.config.order)
        return b.past[-1][1].to(x.dtype).clone() if est is None else est.to(x.dtype)

    def remember(self, key: BranchKey, x: torch.Tensor, out: torch.Tensor) -> None:
        """Store a computed output (the solver's gradient estimate at this step)."""
        b = self._branches[key]
        b.past = push(b.past, b.step, out.detach().float().clone(), 2)  # 3 points: the stability test needs them
        b.shape, b.dtype, b.device = tuple(x.shape), x.dtype, x.device
        b.skipped = 0
        b.pruned = b.pruned + 1 if b.kept is not None else 0
        b.kept = b.mask = None
        m = self.stability(b)
        if m is not None:
            b.momentum.append(m)
