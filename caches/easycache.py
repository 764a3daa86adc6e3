"""EasyCache: runtime-adaptive reuse of the denoiser's transformation (Zhou et al., "Less is Enough").

Per branch, at each call t with input x_t:

* after a computed step, remember the transformation Δ = out − x and the *transformation rate*
  k = mean|out_t − out_s| / mean|x_t − x_s| between the last two computed steps s < t;
* at a later call, add the predicted relative output change k · mean|x_t − x_{t−1}| / mean|out_s|
  to an accumulator E; while E < threshold, return x_t + Δ instead of running the model;
  once it crosses, compute for real and reset E to 0.

Warm-up steps and the final step(s) are always computed, and a cap bounds consecutive reuses. If the
output does not have the input's shape (e.g. PixArt's learned-sigma channels) the cached output is
reused as is. Nothing is shared between branches: conditional/unconditional passes and batch items
each keep their own state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import BranchKey, BranchStats, RunStats, mean_abs


@dataclass
class EasyCacheConfig:
    """Settings for :class:`EasyCache`.

    Attributes:
        threshold: accumulated predicted relative output change allowed before recomputing; 0 turns
            caching off (bit-identical to no cache). Larger = faster and less faithful.
        warmup: fraction of the run's steps always computed at the start (the paper computes 10 of 50).
        end: fraction of the run after which caching stops (1.0 = until the final steps).
        final_steps: the last ``final_steps`` steps are always computed.
        max_consecutive_reuse: at most this many reuses in a row per branch (0 = no cap).
    """

    threshold: float = 0.2
    warmup: float = 0.2
    end: float = 1.0
    final_steps: int = 1
    max_consecutive_reuse: int = 4

    def __post_init__(self) -> None:
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"EasyCacheConfig.threshold must be a finite number >= 0, got {self.threshold}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"EasyCacheConfig.warmup must be in [0, 1], got {self.warmup}")
        if not 0.0 <= self.end <= 1.0:
            raise ValueError(f"EasyCacheConfig.end must be in [0, 1], got {self.end}")
        if self.end < self.warmup:
            raise ValueError(f"EasyCacheConfig.end ({self.end}) must be >= warmup ({self.warmup})")
        if self.final_steps < 0 or self.max_consecutive_reuse < 0:
            raise ValueError("EasyCacheConfig.final_steps and max_consecutive_reuse must be >= 0")


@dataclass
class _Branch:
    stats: BranchStats
    prev_x: torch.Tensor | None = None  # input of the previous call (computed or reused)
    last_x: torch.Tensor | None = None  # input of the last computed call
    last_out: torch.Tensor | None = None  # output of the last computed call
    delta: torch.Tensor | None = None  # cached transformation (out - x), or out if shapes differ
    residual: bool = True
    out_norm: float = 0.0
    rate: float | None = None  # k, the transformation rate
    accum: float = 0.0
    consecutive: int = 0
    history: list[float] = field(default_factory=list)  # accumulator after each call (for plots)


class EasyCache:
    """The EasyCache decision policy (implements :class:`hasten.caches.base.StepCache`)."""

    method = "EasyCache"

    def __init__(self, config: EasyCacheConfig | None = None) -> None:
        self.config = config or EasyCacheConfig()
        self._branches: dict[BranchKey, _Branch] = {}
        self._num_steps: int | None = None
        self.last_run: RunStats | None = None

    # -- run lifecycle -------------------------------------------------------------------------
    def begin_run(self, num_steps: int | None) -> None:
        """Forget all branch state; a new sampling run of ``num_steps`` steps starts."""
        self._branches = {}
        self._num_steps = num_steps

    def end_run(self) -> RunStats:
        """Close the run: keep its statistics in :attr:`last_run` and drop cached tensors."""
        stats = self.current_stats()
        if stats.calls:
            self.last_run = stats
        self._branches = {}
        return stats

    def current_stats(self) -> RunStats:
        return RunStats(
            method=self.method,
            num_steps=self._num_steps,
            branches={b.stats.label: b.stats for b in self._branches.values()},
        )

    def invalidate(self) -> None:
        """Drop cached tensors but keep statistics (e.g. the resolution changed mid-run)."""
        for b in self._branches.values():
            b.prev_x = b.last_x = b.last_out = b.delta = None
            b.rate, b.accum, b.consecutive = None, 0.0, 0

    # -- decisions -----------------------------------------------------------------------------
    def _forced(self, step: int, num_steps: int | None) -> bool:
        if num_steps is None or num_steps <= 0:
            return step < 1
        cfg = self.config
        warm = math.ceil(cfg.warmup * num_steps)
        stop = math.floor(cfg.end * num_steps)
        return step < warm or step >= stop or step >= num_steps - cfg.final_steps

    def should_compute(self, key: BranchKey, x: torch.Tensor, step: int, num_steps: int | None,
                       label: str | None = None) -> bool:
        """True when the real forward must run for this branch at this call."""
        b = self._branches.get(key)
        if b is None:
            b = self._branches[key] = _Branch(stats=BranchStats(label=label or str(key)))
        elif b.prev_x is not None and (b.prev_x.shape != x.shape or b.prev_x.dtype != x.dtype
                                       or b.prev_x.device != x.device):
            b.prev_x = b.last_x = b.last_out = b.delta = None  # new shape: old cache is meaningless
            b.rate, b.accum, b.consecutive = None, 0.0, 0
        cfg = self.config
        compute = True
        if (
            cfg.threshold > 0
            and not self._forced(step, num_steps)
            and b.delta is not None
            and b.rate is not None
            and b.prev_x is not None
            and b.out_norm > 0
            and (cfg.max_consecutive_reuse == 0 or b.consecutive < cfg.max_consecutive_reuse)
        ):
            b.accum += b.rate * mean_abs(x - b.prev_x) / b.out_norm
            compute = b.accum >= cfg.threshold
        if compute:
            b.accum = 0.0
        b.history.append(b.accum)
        b.stats.decisions.append(compute)
        b.prev_x = x.detach()
        return compute

    def reuse(self, key: BranchKey, x: torch.Tensor) -> torch.Tensor:
        """Estimate the output for a skipped call: x + Δ (or the cached output if shapes differ)."""
        b = self._branches[key]
        assert b.delta is not None
        b.consecutive += 1
        return x + b.delta.to(x.dtype) if b.residual else b.delta.clone()

    def remember(self, key: BranchKey, x: torch.Tensor, out: torch.Tensor) -> None:
        """Store a computed output and update the transformation rate k."""
        b = self._branches[key]
        out = out.detach()
        if b.last_out is not None and b.last_x is not None and b.last_out.shape == out.shape:
            dx = mean_abs(x - b.last_x)
            if dx > 0:
                b.rate = mean_abs(out - b.last_out) / dx
        b.last_x = x.detach()
        b.last_out = out.clone()
        b.out_norm = mean_abs(out)
        b.residual = out.shape == x.shape
        b.delta = (out - x) if b.residual else b.last_out
        b.consecutive = 0
