"""CacheQuant (Liu et al., CVPR 2025): a step-cache schedule chosen *for* a quantized model, plus a
decoupled per-channel correction of the cached+quantized output. Framework-neutral core.

Contract (for ``hasten tune`` and the adapters; keep it stable)
---------------------------------------------------------------
* Calibration = two sets of traces of the same sampling runs (same prompts, seeds, step count): the
  full-precision (FP) model and the quantized model, every step computed. A trace is, per run and per
  branch label (``"cond[0]"``, ``"uncond[0]"`` ...), the denoiser's input ``x_k`` and output ``o_k`` at
  every step ``k``. :class:`TraceRecorder` (a :class:`~hasten.caches.base.StepCache` that computes
  everything and records) makes them through any adapter's step-cache hook.
* ``CacheQuantCalibration(reference=fp_runs, quantized=q_runs).plan(num_computed)`` returns a
  :class:`CacheQuantPlan` (which steps compute, how reuse estimates, the correction) for ANY number of
  computed steps without running the model again — a search (``hasten tune``) calibrates once and asks
  for as many plans as it likes. :func:`plan` is the pure dynamic programme on an error matrix.
* :class:`CacheQuantCache` applies a plan (implements ``StepCache``); the diffusers adapter is
  ``hasten.pipelines.cachequant.enable_cachequant(pipe, method, num_computed_steps=..., ...)`` (or
  ``plan=`` / ``calibration=`` to skip calibrating), the ComfyUI node takes ``plan.schedule_text()``.

The method
----------
**DP cache schedule (DPS).** Reusing the output computed at step ``i`` for a later step ``k`` costs
``E[i, k] = ||est(i, k) - o^FP_k||² / Σ_k ||o^FP_k||²``, where ``est(i, k)`` is the *quantized* model's
step-``i`` output carried to step ``k`` (``E[k, k]`` is the quantization error alone). A schedule of
``K`` computed steps ``0 = c_1 < ... < c_K`` splits the run into segments; its error is
``Σ_m Σ_{k=c_m}^{c_{m+1}-1} E[c_m, k]``, and the minimum over all schedules is found exactly by
dynamic programming over segment boundaries:
``D[m, j] = min_i D[m-1, i] + S(i, j)``, ``S(i, j) = Σ_{k=i}^{j-1} E[i, k]`` (``O(K·N²)``).

**Decoupled error correction (DEC).** On each reused step ``k`` and per output channel ``c`` the
estimate is corrected by the least-squares line toward the FP reference,
``ô_k[c] = a_{k,c} · est_k[c] + b_{k,c}``, ``a = cov(est, o^FP) / var(est)``, ``b = E[o^FP] − a·E[est]``,
fitted on the calibration traces per branch (cond / uncond err differently). The identity (a=1, b=0)
is in the family, so on the calibration data the correction never increases the error.

Reuse estimate: ``"residual"`` (EasyCache's ``x_k + (o_i − x_i)``), ``"output"`` (DeepCache/FORA's
``o_i``) or ``"auto"`` (whichever gives the smaller DP error on the calibration traces).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..validation import check_bool, check_choice, check_float, check_int, check_seed, check_str_tuple
from .base import BranchKey, BranchStats, RunStats

log = logging.getLogger("hasten.cachequant")

REUSE_MODES = ("auto", "residual", "output")
METHODS = ("int8", "int4", "w8a8")
Trace = dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]]  # branch label -> per step (x, out)


def branch_name(label: str | None) -> str:
    """``"cond[0]"`` -> ``"cond"``: corrections are per kind of branch, shared by the batch items."""
    return (label or "cond").split("[", 1)[0]


@dataclass
class CacheQuantConfig:
    """Settings for CacheQuant (see the module docstring).

    Attributes:
        method: quantization of the denoiser: ``"int8"``, ``"int4"``, ``"w8a8"`` (hasten.quant's methods).
        num_computed_steps: computed steps K of the schedule (step 0 included); or give ``speedup``.
        speedup: target ratio N / K (K = ceil(N / speedup)) when ``num_computed_steps`` is not given.
        reuse: ``"auto"``, ``"residual"`` or ``"output"`` (how a reused step is estimated).
        correction: fit and apply the decoupled per-channel error correction on reused steps.
        calibration_prompts: prompts of the calibration runs (the adapter may supply its own default).
        calibration_seeds: seeds of the calibration runs (each prompt x each seed).
        forced_steps: steps that always compute (step 0 always does).
    """

    method: str = "int8"
    num_computed_steps: int | None = None
    speedup: float | None = None
    reuse: str = "auto"
    correction: bool = True
    calibration_prompts: tuple[str, ...] = ()
    calibration_seeds: tuple[int, ...] = (0,)
    forced_steps: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        own = "CacheQuantConfig"
        self.method = check_choice(own, "method", self.method, METHODS)
        if self.num_computed_steps is not None and self.speedup is not None:
            raise ValueError(f"{own}: give num_computed_steps or speedup, not both")
        if self.num_computed_steps is not None:
            self.num_computed_steps = check_int(own, "num_computed_steps", self.num_computed_steps, lo=1)
        if self.speedup is not None:
            self.speedup = check_float(own, "speedup", self.speedup, lo=1.0)
        self.reuse = check_choice(own, "reuse", self.reuse, REUSE_MODES)
        self.correction = check_bool(own, "correction", self.correction)
        self.calibration_prompts = check_str_tuple(own, "calibration_prompts", self.calibration_prompts)
        if isinstance(self.calibration_seeds, (int, str)) or not isinstance(self.calibration_seeds, Sequence):
            raise TypeError(f"{own}.calibration_seeds must be a sequence of seeds, got {self.calibration_seeds!r}")
        self.calibration_seeds = tuple(check_seed(own, "calibration_seeds", s) for s in self.calibration_seeds)
        if not self.calibration_seeds:
            raise ValueError(f"{own}.calibration_seeds must name at least one seed")
        if isinstance(self.forced_steps, (int, str)) or not isinstance(self.forced_steps, Sequence):
            raise TypeError(f"{own}.forced_steps must be a sequence of step indices, got {self.forced_steps!r}")
        self.forced_steps = tuple(check_int(own, "forced_steps", f, lo=0) for f in self.forced_steps)

    def computed_for(self, num_steps: int) -> int:
        """K for a run of ``num_steps`` steps (default: speedup 2)."""
        if self.num_computed_steps is not None:
            return min(self.num_computed_steps, num_steps)
        return max(1, min(num_steps, math.ceil(num_steps / (self.speedup or 2.0))))


# -- the dynamic programme ---------------------------------------------------------------------------
def segment_costs(errors: torch.Tensor) -> torch.Tensor:
    """``S[i, j]`` = error of computing at ``i`` and reusing it for steps ``i+1 .. j-1`` (``j > i``);
    ``errors[i, k]`` is the error of serving step ``k`` from step ``i`` (only ``k >= i`` is read)."""
    e = torch.as_tensor(errors, dtype=torch.float64)
    n = e.shape[0]
    if e.shape != (n, n):
        raise ValueError(f"error matrix must be square (N, N), got {tuple(e.shape)}")
    upper = torch.triu(e)
    s = torch.full((n, n + 1), math.inf, dtype=torch.float64)
    csum = torch.cumsum(upper, dim=1)  # csum[i, k] = sum_{k' <= k} E[i, k']
    for i in range(n):
        s[i, i + 1:] = csum[i, i:]
    return s


def plan(errors: torch.Tensor, num_computed: int, forced: Sequence[int] = (0,)) -> tuple[tuple[int, ...], float]:
    """The schedule of ``num_computed`` computed steps minimising the summed error (exact DP).

    ``errors``: (N, N) matrix, ``errors[i, k]`` = error of serving step ``k >= i`` with the computation of
    step ``i``. Step 0 always computes; every step in ``forced`` computes too. Returns (computed steps,
    total error).
    """
    s = segment_costs(errors)
    n = s.shape[0]
    forced_set = {int(f) for f in forced if 0 <= int(f) < n} | {0}
    k = check_int("plan", "num_computed", num_computed, lo=1)
    if k < len(forced_set):
        raise ValueError(f"num_computed={k} is fewer than the {len(forced_set)} forced steps {sorted(forced_set)}")
    k = min(k, n)
    for i in range(n):  # a segment may not swallow a forced step
        for j in range(i + 2, n + 1):
            if any(i < f < j for f in forced_set):
                s[i, j] = math.inf
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[-1] * (n + 1) for _ in range(k + 1)]
    for j in range(1, n + 1):
        best[1][j] = float(s[0, j])
    for m in range(2, k + 1):
        for j in range(m, n + 1):
            # the last segment starts at i (m-1 <= i < j) and covers i .. j-1
            cand = [best[m - 1][i] + float(s[i, j]) for i in range(m - 1, j)]
            idx = min(range(len(cand)), key=cand.__getitem__)
            best[m][j], back[m][j] = cand[idx], idx + m - 1
    if not math.isfinite(best[k][n]):
        raise ValueError(f"no schedule of {k} computed steps satisfies the forced steps {sorted(forced_set)}")
    steps, j = [], n
    for m in range(k, 1, -1):
        i = back[m][j]
        steps.append(i)
        j = i
    steps.append(0)
    return tuple(sorted(steps)), best[k][n]


def brute_force_plan(errors: torch.Tensor, num_computed: int, forced: Sequence[int] = (0,)
                     ) -> tuple[tuple[int, ...], float]:
    """Reference for :func:`plan` by enumeration (tests; exponential)."""
    e = torch.as_tensor(errors, dtype=torch.float64)
    n = e.shape[0]
    must = {int(f) for f in forced} | {0}
    best: tuple[tuple[int, ...], float] = ((), math.inf)
    for rest in itertools.combinations(range(1, n), num_computed - 1):
        steps = (0, *rest)
        if not must <= set(steps):
            continue
        total, src = 0.0, 0
        for k in range(n):
            if k in steps:
                src = k
            total += float(e[src, k])
        if total < best[1]:
            best = (steps, total)
    return best


# -- calibration ---------------------------------------------------------------------------------
def _estimate(src: tuple[torch.Tensor, torch.Tensor], x_k: torch.Tensor, residual: bool) -> torch.Tensor:
    x_i, o_i = src
    if residual and o_i.shape == x_i.shape == x_k.shape:
        return x_k.float() + (o_i.float() - x_i.float())
    return o_i.float()


def _pairs(reference: Sequence[Trace], quantized: Sequence[Trace]) -> list[tuple[str, list, list]]:
    """(branch label, fp steps, quantized steps) for every branch present in both, run by run."""
    if len(reference) != len(quantized):
        raise ValueError(f"{len(reference)} reference runs but {len(quantized)} quantized runs: calibrate both on "
                         "the same prompts and seeds")
    out = []
    for ref, q in zip(reference, quantized):
        for label, steps in ref.items():
            if label in q and len(q[label]) == len(steps):
                out.append((label, steps, q[label]))
    if not out:
        raise ValueError("the reference and quantized calibration traces share no branch with the same step count")
    return out


@dataclass
class CacheQuantPlan:
    """A fixed cache schedule for a run of ``num_steps`` steps, chosen for a quantized model.

    ``correction`` maps a branch name (``"cond"``, ``"uncond"`` ...) to per-step, per-channel ``(a, b)``
    tensors of shape (num_steps, C): on a reused step ``k`` the estimate becomes ``a[k] * est + b[k]``
    (computed steps keep a=1, b=0). ``predicted_error`` is the DP objective on the calibration traces.
    """

    num_steps: int
    computed: tuple[int, ...]
    reuse: str = "residual"
    predicted_error: float = 0.0
    correction: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    channel_dim: int = 1
    method: str | None = None  # the quantization the schedule was chosen for (informative)

    def __post_init__(self) -> None:
        own = "CacheQuantPlan"
        self.num_steps = check_int(own, "num_steps", self.num_steps, lo=1)
        self.computed = tuple(sorted({check_int(own, "computed", c, lo=0, hi=self.num_steps - 1)
                                      for c in self.computed}))
        if not self.computed or self.computed[0] != 0:
            raise ValueError(f"{own}.computed must include step 0, got {self.computed}")
        self.reuse = check_choice(own, "reuse", self.reuse, ("residual", "output"))

    @property
    def num_computed(self) -> int:
        return len(self.computed)

    @property
    def speedup(self) -> float:
        """Denoiser forwards of the full run over those of the plan."""
        return self.num_steps / self.num_computed

    def schedule_text(self) -> str:
        """Computed steps as a comma-separated list (what the ComfyUI node takes)."""
        return ",".join(str(c) for c in self.computed)

    def timeline(self) -> str:
        return "".join("C" if k in self.computed else "." for k in range(self.num_steps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (corrections as nested lists)."""
        corr = None if self.correction is None else {
            n: {"a": a.tolist(), "b": b.tolist()} for n, (a, b) in self.correction.items()}
        return {"num_steps": self.num_steps, "computed": list(self.computed), "reuse": self.reuse,
                "predicted_error": self.predicted_error, "channel_dim": self.channel_dim, "method": self.method,
                "correction": corr}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheQuantPlan:
        corr = d.get("correction")
        correction = None if corr is None else {
            n: (torch.tensor(v["a"], dtype=torch.float32), torch.tensor(v["b"], dtype=torch.float32))
            for n, v in corr.items()}
        return cls(num_steps=d["num_steps"], computed=tuple(d["computed"]), reuse=d.get("reuse", "residual"),
                   predicted_error=float(d.get("predicted_error", 0.0)), correction=correction,
                   channel_dim=int(d.get("channel_dim", 1)), method=d.get("method"))

    @classmethod
    def from_text(cls, text: str, num_steps: int, reuse: str = "residual") -> CacheQuantPlan:
        """A plan from ``"0,1,2,5,9"`` (no correction): a schedule computed elsewhere."""
        try:
            steps = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
        except ValueError:
            raise ValueError(f"a schedule is a comma-separated list of step indices such as '0,1,2,5,9', got "
                             f"{text!r}") from None
        return cls(num_steps=num_steps, computed=steps, reuse=reuse)


@dataclass
class CacheQuantCalibration:
    """FP and quantized traces of the same calibration runs; makes plans for any number of computed steps.

    ``extra`` carries adapter data needed to re-apply the quantization without recalibrating (e.g. the
    recorded linear-layer statistics); the core never reads it.
    """

    reference: list[Trace]
    quantized: list[Trace]
    method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(_pairs(self.reference, self.quantized)[0][1])

    def error_matrix(self, reuse: str = "residual") -> torch.Tensor:
        """``E[i, k]`` (k >= i): summed squared error of serving step k from step i's quantized computation,
        against the FP output at step k, relative to the FP outputs' total energy."""
        check_choice("error_matrix", "reuse", reuse, ("residual", "output"))
        pairs = _pairs(self.reference, self.quantized)
        n = len(pairs[0][1])
        err = torch.zeros(n, n, dtype=torch.float64)
        energy = 0.0
        for _, ref, q in pairs:
            for k in range(n):
                if ref[k] is None or q[k] is None:
                    raise ValueError("a calibration trace is missing a step (was every step computed?)")
                target = ref[k][1].float()
                energy += float(target.pow(2).sum())
                for i in range(k + 1):
                    est = _estimate(q[i], q[k][0], reuse == "residual")
                    err[i, k] += float((est - target).pow(2).sum())
        return err / max(energy, 1e-30)

    def plan(self, num_computed: int, reuse: str = "auto", correction: bool = True,
             forced: Sequence[int] = (0,), channel_dim: int = 1) -> CacheQuantPlan:
        """The DP schedule of ``num_computed`` steps (and, with ``correction``, the fitted DEC)."""
        check_choice("plan", "reuse", reuse, REUSE_MODES)
        check_bool("plan", "correction", correction)
        modes = ("residual", "output") if reuse == "auto" else (reuse,)
        best: tuple[tuple[int, ...], float, str] | None = None
        for mode in modes:
            steps, cost = plan(self.error_matrix(mode), num_computed, forced)
            if best is None or cost < best[1]:
                best = (steps, cost, mode)
        assert best is not None
        steps, cost, mode = best
        p = CacheQuantPlan(num_steps=self.num_steps, computed=steps, reuse=mode, predicted_error=cost,
                           channel_dim=channel_dim, method=self.method)
        if correction:
            p.correction = self.fit_correction(p)
        return p

    def reuse_sources(self, p: CacheQuantPlan) -> list[int]:
        """For each step, the computed step whose output serves it."""
        src, out = 0, []
        for k in range(p.num_steps):
            if k in p.computed:
                src = k
            out.append(src)
        return out

    def fit_correction(self, p: CacheQuantPlan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Least-squares per-channel line (a, b) per reused step and branch name (DEC)."""
        pairs = _pairs(self.reference, self.quantized)
        src = self.reuse_sources(p)
        cd = p.channel_dim
        by_name: dict[str, list[tuple[list, list]]] = {}
        for label, ref, q in pairs:
            by_name.setdefault(branch_name(label), []).append((ref, q))
        out = {}
        for name, runs in by_name.items():
            channels = runs[0][0][0][1].shape[cd]
            a = torch.ones(p.num_steps, channels)
            b = torch.zeros(p.num_steps, channels)
            for k in range(p.num_steps):
                if src[k] == k:
                    continue
                est = torch.cat([_move(_estimate(q[src[k]], q[k][0], p.reuse == "residual"), cd) for _, q in runs], 1)
                tgt = torch.cat([_move(ref[k][1].float(), cd) for ref, _ in runs], 1)
                mx, my = est.mean(1), tgt.mean(1)
                var = (est - mx[:, None]).pow(2).mean(1)
                cov = ((est - mx[:, None]) * (tgt - my[:, None])).mean(1)
                ok = var > 1e-12 * (mx.abs() + 1).pow(2)
                a[k] = torch.where(ok, cov / var.clamp_min(1e-30), torch.ones_like(var))
                b[k] = torch.where(ok, my - a[k] * mx, my - mx)
            out[name] = (a, b)
        return out


def _move(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(C, everything else) view of a tensor whose channels are at ``channel_dim``."""
    return t.movedim(channel_dim, 0).reshape(t.shape[channel_dim], -1)


# -- the StepCache policies ------------------------------------------------------------------------------
class _Stats:
    """Per-branch compute/reuse decisions for :class:`RunStats` (shared by both policies)."""

    method = "CacheQuant"

    def _init_stats(self) -> None:
        self._stats: dict[BranchKey, BranchStats] = {}
        self._num_steps: int | None = None
        self.last_run: RunStats | None = None

    def _record(self, key: BranchKey, label: str | None, compute: bool) -> None:
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = BranchStats(label=label or str(key))
        st.decisions.append(compute)

    def current_stats(self) -> RunStats:
        return RunStats(method=self.method, num_steps=self._num_steps,
                        branches={s.label: s for s in self._stats.values()})


class TraceRecorder(_Stats):
    """A StepCache that computes every step and records each branch's (input, output) per step.

    Each sampling run becomes one :data:`Trace` in :attr:`runs` (branches keyed by their label).
    """

    method = "CacheQuant calibration"

    def __init__(self) -> None:
        self._init_stats()
        self.runs: list[Trace] = []
        self._labels: dict[BranchKey, tuple[str, int]] = {}

    def begin_run(self, num_steps: int | None) -> None:
        self._stats, self._labels, self._num_steps = {}, {}, num_steps
        self.runs.append({})

    def end_run(self) -> RunStats:
        st = self.current_stats()
        if st.calls:
            self.last_run = st
        self._stats, self._labels = {}, {}
        if self.runs and not self.runs[-1]:
            self.runs.pop()
        return st

    def should_compute(self, key: BranchKey, x: torch.Tensor, step: int, num_steps: int | None,
                       label: str | None = None, group: Hashable | None = None) -> bool:
        if not self.runs:
            self.begin_run(num_steps)
        self._labels[key] = (label or str(key), step)
        self._record(key, label, True)
        return True

    def reuse(self, key: BranchKey, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never asked
        raise RuntimeError("TraceRecorder never reuses")

    def remember(self, key: BranchKey, x: torch.Tensor, out: torch.Tensor) -> None:
        label, step = self._labels[key]
        steps = self.runs[-1].setdefault(label, [])
        while len(steps) <= step:
            steps.append(None)
        steps[step] = (x.detach().float().cpu().clone(), out.detach().float().cpu().clone())


@dataclass
class _Branch:
    name: str
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None
    step: int = 0


class CacheQuantCache(_Stats):
    """Applies a :class:`CacheQuantPlan`: compute on the planned steps, reuse (and correct) on the others.

    Every branch follows the same schedule, so CFG's cond/uncond always compute together. A run whose step
    count differs from the plan's gets the schedule stretched to it (same fractions) without the
    correction, with a warning.
    """

    def __init__(self, plan: CacheQuantPlan) -> None:
        self.plan = plan
        self._init_stats()
        self._branches: dict[BranchKey, _Branch] = {}
        self._computed: set[int] = set(plan.computed)
        self._correct = plan.correction is not None
        self._warned: set[int] = set()

    def begin_run(self, num_steps: int | None) -> None:
        self._stats, self._branches, self._num_steps = {}, {}, num_steps
        p = self.plan
        if num_steps is None or num_steps == p.num_steps:
            self._computed, self._correct = set(p.computed), p.correction is not None
            return
        self._computed = {min(num_steps - 1, round(c * num_steps / p.num_steps)) for c in p.computed} | {0}
        self._correct = False
        if num_steps not in self._warned:
            self._warned.add(num_steps)
            log.warning("hasten CacheQuant: the plan was made for %d steps but this run has %d: its schedule is "
                        "stretched to %d computed steps and the error correction is off (re-plan for %d steps)",
                        p.num_steps, num_steps, len(self._computed), num_steps)

    def end_run(self) -> RunStats:
        st = self.current_stats()
        if st.calls:
            self.last_run = st
        self._stats, self._branches = {}, {}
        return st

    def should_compute(self, key: BranchKey, x: torch.Tensor, step: int, num_steps: int | None,
                       label: str | None = None, group: Hashable | None = None) -> bool:
        b = self._branches.get(key)
        if b is None:
            b = self._branches[key] = _Branch(branch_name(label))
        b.step = step
        compute = (step in self._computed or b.out is None or b.x is None or b.x.shape != x.shape
                   or b.x.dtype != x.dtype or b.x.device != x.device)
        self._record(key, label, compute)
        return compute

    def reuse(self, key: BranchKey, x: torch.Tensor) -> torch.Tensor:
        b = self._branches[key]
        assert b.out is not None and b.x is not None
        if self.plan.reuse == "residual" and b.out.shape == x.shape:
            est = x + (b.out - b.x).to(x.dtype)
        else:
            est = b.out.clone()
        corr = self.plan.correction.get(b.name) if self._correct and self.plan.correction else None
        if corr is not None and b.step < corr[0].shape[0] and est.ndim > self.plan.channel_dim \
                and est.shape[self.plan.channel_dim] == corr[0].shape[1]:
            shape = [1] * est.ndim
            shape[self.plan.channel_dim] = -1
            a = corr[0][b.step].to(est.device, est.dtype).view(shape)
            c = corr[1][b.step].to(est.device, est.dtype).view(shape)
            est = a * est + c
        return est

    def remember(self, key: BranchKey, x: torch.Tensor, out: torch.Tensor) -> None:
        b = self._branches[key]
        b.x, b.out = x.detach(), out.detach()


__all__ = [
    "CacheQuantCache",
    "CacheQuantCalibration",
    "CacheQuantConfig",
    "CacheQuantPlan",
    "REUSE_MODES",
    "TraceRecorder",
    "branch_name",
    "brute_force_plan",
    "plan",
    "segment_costs",
]
