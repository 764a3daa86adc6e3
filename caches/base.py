"""Framework-neutral plumbing shared by every step cache.

A *step cache* decides, per denoiser call and per branch (one row of the batch: a batch item of the
conditional or unconditional pass), whether the real forward must run or a cached estimate can stand
in. Adapters (diffusers hooks, ComfyUI wrappers) only know how to call the model on a subset of rows;
:func:`run_cached` does the rest, so the batching logic exists once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

BranchKey = Hashable


@dataclass
class BranchStats:
    """What one branch did during one sampling run: a decision per denoiser call."""

    label: str
    decisions: list[bool] = field(default_factory=list)  # True = computed, False = reused

    @property
    def computed(self) -> int:
        return sum(self.decisions)

    @property
    def reused(self) -> int:
        return len(self.decisions) - self.computed

    @property
    def calls(self) -> int:
        return len(self.decisions)


@dataclass
class RunStats:
    """Per-run summary of a step cache, kept after the run ends so users can read it."""

    method: str
    num_steps: int | None
    branches: dict[str, BranchStats] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(b.calls for b in self.branches.values())

    @property
    def computed(self) -> int:
        return sum(b.computed for b in self.branches.values())

    @property
    def reused(self) -> int:
        return self.calls - self.computed

    @property
    def estimated_speedup(self) -> float:
        """Ratio of branch-forwards asked for to branch-forwards run (ignores the cache's own overhead)."""
        return self.calls / self.computed if self.computed else float("inf") if self.calls else 1.0

    def summary(self) -> str:
        lines = [
            f"{self.method}: {self.computed}/{self.calls} branch forwards computed, {self.reused} reused "
            f"(estimated speed-up {self.estimated_speedup:.2f}x, {self.num_steps} steps)"
        ]
        for label, b in self.branches.items():
            timeline = "".join("C" if d else "." for d in b.decisions)
            lines.append(f"  {label:<16} computed {b.computed:>3} reused {b.reused:>3}  {timeline}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "num_steps": self.num_steps,
            "calls": self.calls,
            "computed": self.computed,
            "reused": self.reused,
            "estimated_speedup": self.estimated_speedup,
            "branches": {k: {"computed": b.computed, "reused": b.reused, "decisions": b.decisions}
                         for k, b in self.branches.items()},
        }


@runtime_checkable
class StepCache(Protocol):
    """The decision interface adapters talk to. One instance serves one denoiser."""

    def begin_run(self, num_steps: int | None) -> None: ...

    def end_run(self) -> RunStats: ...

    def should_compute(self, key: BranchKey, x: torch.Tensor, step: int, num_steps: int | None,
                       label: str | None = None, group: Hashable | None = None) -> bool: ...

    def reuse(self, key: BranchKey, x: torch.Tensor) -> torch.Tensor: ...

    def remember(self, key: BranchKey, x: torch.Tensor, out: torch.Tensor) -> None: ...


def run_cached(
    cache: StepCache,
    keys: Sequence[BranchKey],
    x: torch.Tensor,
    steps: Sequence[int],
    num_steps: int | None,
    compute: Callable[[list[int] | None], torch.Tensor],
    labels: Sequence[str] | None = None,
    groups: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Run one denoiser call through ``cache``: ask per row, compute only the rows that need it.

    ``x`` is the denoiser input with one row per entry of ``keys``; ``compute(rows)`` must return the
    denoiser output for those rows (``None`` = every row, in which case its output is returned
    untouched, which keeps the all-compute path bit-identical to the uncached model). ``groups`` names
    the batch item of each row, so the branches of one item (cond/uncond) can decide together.
    """
    n = x.shape[0]
    if len(keys) != n or len(steps) != n:
        raise ValueError(f"run_cached: {len(keys)} keys / {len(steps)} steps for a batch of {n} rows")
    rows = [x[i : i + 1] for i in range(n)]
    decide = [
        cache.should_compute(keys[i], rows[i], steps[i], num_steps, labels[i] if labels else None,
                             groups[i] if groups else None)
        for i in range(n)
    ]
    todo = [i for i in range(n) if decide[i]]
    if len(todo) == n:
        out = compute(None)
        for i in range(n):
            cache.remember(keys[i], rows[i], out[i : i + 1])
        return out
    computed: dict[int, torch.Tensor] = {}
    if todo:
        sub = compute(todo)
        for j, i in enumerate(todo):
            computed[i] = sub[j : j + 1]
            cache.remember(keys[i], rows[i], computed[i])
    parts = [computed[i] if decide[i] else cache.reuse(keys[i], rows[i]) for i in range(n)]
    return torch.cat(parts, dim=0)


def mean_abs(t: torch.Tensor) -> float:
    """Mean absolute value in float32 (the change metric EasyCache and its peers use)."""
    return t.detach().float().abs().mean().item()


class BranchRuns:
    """The run lifecycle shared by per-branch step caches: branch state, batch-item membership and slots
    reset per run; :meth:`end_run` keeps the run's statistics in :attr:`last_run`."""

    method = "cache"

    def __init__(self) -> None:
        self._branches: dict = {}
        self._members: dict[Hashable, list[BranchKey]] = {}  # batch item -> its branches
        self._slots: dict[Hashable, tuple[int, bool, set]] = {}  # batch item -> (step, decision, asked)
        self._num_steps: int | None = None
        self.last_run: RunStats | None = None

    def begin_run(self, num_steps: int | None) -> None:
        """Forget all branch state; a new sampling run of ``num_steps`` steps starts."""
        self._branches, self._members, self._slots = {}, {}, {}
        self._num_steps = num_steps

    def end_run(self) -> RunStats:
        """Close the run: keep its statistics in :attr:`last_run` and drop cached tensors."""
        stats = self.current_stats()
        if stats.calls:
            self.last_run = stats
        self._branches, self._members, self._slots = {}, {}, {}
        return stats

    def _peers(self, group: Hashable, key: BranchKey) -> list[BranchKey]:
        """The other branches of batch item ``group`` whose state still speaks for this call: those asked at the
        item's previous call. A branch the pipeline stopped calling (adaptive guidance dropping the uncond
        pass) keeps stale state that always asks to compute; consulting it would stop the item from ever
        reusing again."""
        members = self._members.setdefault(group, [])
        if key not in members:
            members.append(key)
        slot = self._slots.get(group)
        return [m for m in members if m != key and (slot is None or m in slot[2])]

    def _group_decision(self, group: Hashable, key: BranchKey, step: int, own: bool,
                        wants: Callable[[object], bool]) -> bool:
        """One decision per batch item and call: the first branch asked also consults ``wants`` for every
        other branch still called (CFG branches share the latent), and the item computes when any must;
        the item's other branches then follow that decision."""
        peers = self._peers(group, key)
        slot = self._slots.get(group)
        if slot is None or slot[0] != step or key in slot[2]:
            slot = (step, own or any(wants(self._branches[m]) for m in peers), set())
            self._slots[group] = slot
        slot[2].add(key)
        return slot[1] or own

    def current_stats(self) -> RunStats:
        return RunStats(method=self.method, num_steps=self._num_steps,
                        branches={b.stats.label: b.stats for b in self._branches.values()})
