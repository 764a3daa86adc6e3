"""Adaptive guidance: skip the unconditional pass of classifier-free guidance once it stops mattering.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models":

* **AG** — at every step compute, per sample, ``gamma_t = cos(eps_cond, eps_uncond)``; once
  ``gamma_t >= threshold`` (the paper studies 0.991-0.996) the sample drops its unconditional pass for
  the rest of the run. With the uncond prediction replaced by the cond one, CFG's
  ``uncond + g * (cond - uncond)`` is exactly ``cond``.
* **LinearAG** — on every other step, estimate the unconditional prediction as a linear combination
  of the current cond and the previous step's cond/uncond predictions,
  ``eps_u(t) ~= a_t * eps_c(t) + b_t * eps_c(t-1) + c_t * eps_u(t-1)``, with per-step coefficients
  fitted by least squares on calibration trajectories (:func:`fit_linear_ag`).
* **truncate** — the fixed baseline: CFG for the first ``truncate`` fraction of steps, cond only after.

Decisions are per sample (batch item), never per batch. Off settings (AG threshold > 1, truncate 1.0)
ask for every unconditional pass, which adapters turn into the unmodified model call.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..validation import check_choice, check_float, check_int

MODES = ("ag", "linear", "truncate")
LINEAR_FEATURES = ("cond_t", "cond_prev", "uncond_prev")
COEFF_FILE = "hasten_linear_ag.json"


@dataclass
class LinearAGCoefficients:
    """Per-step LinearAG coefficients ``[a_t, b_t, c_t]`` fitted for one model at ``num_steps`` steps."""

    num_steps: int
    coefficients: list[list[float] | None]  # index = step; None where the uncond pass always runs
    model_key: str = ""
    residual: list[float | None] = field(default_factory=list)  # relative LS residual per step

    def at(self, step: int, num_steps: int | None) -> list[float] | None:
        """Coefficients for ``step`` of a ``num_steps`` run (nearest calibrated step by run fraction)."""
        if not self.coefficients:
            return None
        if num_steps is None or num_steps == self.num_steps:
            idx = step
        else:
            idx = round(step * (self.num_steps - 1) / max(num_steps - 1, 1))
        if not 0 <= idx < len(self.coefficients):
            return None
        return self.coefficients[idx]

    def to_dict(self) -> dict:
        return {"format": "hasten-linear-ag-1", "features": list(LINEAR_FEATURES), "num_steps": self.num_steps,
                "model_key": self.model_key, "coefficients": self.coefficients, "residual": self.residual}

    @classmethod
    def from_dict(cls, d: dict) -> LinearAGCoefficients:
        if d.get("format") != "hasten-linear-ag-1" or list(d.get("features", [])) != list(LINEAR_FEATURES):
            raise ValueError("not a hasten LinearAG coefficient file (format hasten-linear-ag-1)")
        return cls(num_steps=int(d["num_steps"]), coefficients=d["coefficients"], model_key=d.get("model_key", ""),
                   residual=d.get("residual", []))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearAGCoefficients:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class GuidanceConfig:
    """Settings for :class:`AdaptiveGuidance`.

    Attributes:
        mode: "ag" (cosine-similarity stop), "linear" (LinearAG estimates) or "truncate" (fixed cut-off).
        threshold: AG's gamma; a sample stops its uncond pass once cos(cond, uncond) >= threshold.
            Must be in (0, 2]; anything > 1 never triggers (plain CFG, bit-identical).
        truncate: truncate mode: fraction of steps (from the start) that keep CFG, in [0, 1]; 1.0 = plain CFG.
        min_steps: AG never stops before this many steps have run with CFG.
        coefficients: LinearAG coefficients (mode "linear"); adapters auto-load them when None.
        linear_every: LinearAG estimates the uncond pass on every ``linear_every``-th step (2 = alternate).
        linear_until: LinearAG estimates only during this leading fraction of the run, in [0, 1]; AG's
            cosine stop (``threshold``) still applies in linear mode.
    """

    mode: str = "ag"
    threshold: float = 0.993
    truncate: float = 0.5
    min_steps: int = 1
    coefficients: LinearAGCoefficients | None = None
    linear_every: int = 2
    linear_until: float = 1.0

    def __post_init__(self) -> None:
        own = "GuidanceConfig"
        check_choice(own, "mode", self.mode, MODES)
        self.threshold = check_float(own, "threshold", self.threshold)
        if not 0.0 < self.threshold <= 2.0:
            raise ValueError(f"GuidanceConfig.threshold must be in (0, 2] (paper: 0.991-0.996; > 1 = off), "
                             f"got {self.threshold}")
        self.truncate = check_float(own, "truncate", self.truncate)
        if not 0.0 <= self.truncate <= 1.0:
            raise ValueError(f"GuidanceConfig.truncate must be in [0, 1] (1.0 = off), got {self.truncate}")
        self.min_steps = check_int(own, "min_steps", self.min_steps, lo=0)
        self.linear_every = check_int(own, "linear_every", self.linear_every, lo=2)
        self.linear_until = check_float(own, "linear_until", self.linear_until)
        if not 0.0 <= self.linear_until <= 1.0:
            raise ValueError(f"GuidanceConfig.linear_until must be in [0, 1], got {self.linear_until}")
        if self.coefficients is not None and not isinstance(self.coefficients, LinearAGCoefficients):
            raise TypeError(f"GuidanceConfig.coefficients must be LinearAGCoefficients or None, got "
                            f"{type(self.coefficients).__name__}")

    @property
    def is_off(self) -> bool:
        """True when no unconditional pass can ever be dropped (bit-identical to plain CFG)."""
        if self.mode == "truncate":
            return self.truncate >= 1.0
        if self.mode == "ag":
            return self.threshold > 1.0
        return self.threshold > 1.0 and self.coefficients is None


@dataclass
class GuidanceStats:
    """What adaptive guidance did in one run: per sample, which steps ran the uncond pass."""

    mode: str
    num_steps: int | None
    uncond: dict[str, list[str]] = field(default_factory=dict)  # item label -> "C" run, "." dropped, "L" linear
    cosine: dict[str, list[float]] = field(default_factory=dict)
    stop_step: dict[str, int | None] = field(default_factory=dict)

    @property
    def cond_forwards(self) -> int:
        return sum(len(v) for v in self.uncond.values())

    @property
    def uncond_forwards(self) -> int:
        return sum(v.count("C") for v in self.uncond.values())

    @property
    def forwards(self) -> int:
        """Denoiser rows run (cond + uncond)."""
        return self.cond_forwards + self.uncond_forwards

    @property
    def baseline_forwards(self) -> int:
        return 2 * self.cond_forwards

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.forwards / self.baseline_forwards if self.baseline_forwards else 0.0

    @property
    def calls(self) -> int:  # registry.summary() compatibility
        return self.cond_forwards

    def summary(self) -> str:
        lines = [f"adaptive guidance ({self.mode}): {self.forwards}/{self.baseline_forwards} denoiser rows run, "
                 f"{self.saved_fraction:.0%} saved ({self.num_steps} steps)"]
        for label, tl in self.uncond.items():
            lines.append(f"  uncond {label:<10} stop@{self.stop_step.get(label)}  {''.join(tl)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "num_steps": self.num_steps, "forwards": self.forwards,
                "baseline_forwards": self.baseline_forwards, "saved_fraction": self.saved_fraction,
                "uncond": {k: "".join(v) for k, v in self.uncond.items()}, "cosine": self.cosine,
                "stop_step": self.stop_step}


@dataclass
class _Sample:
    label: str
    stopped_at: int | None = None
    timeline: list[str] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    prev_cond: torch.Tensor | None = None
    prev_uncond: torch.Tensor | None = None  # real or estimated uncond of the previous step
    trajectory: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two predictions of one sample, in float64 over all elements."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12).item()


class AdaptiveGuidance:
    """The per-sample decision "is this sample's unconditional pass still needed at this step?"."""

    def __init__(self, config: GuidanceConfig | None = None, record: bool = False) -> None:
        self.config = config or GuidanceConfig()
        self.record = record
        self._samples: dict[Hashable, _Sample] = {}
        self._num_steps: int | None = None
        self.last_run: GuidanceStats | None = None
        self.recorded: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # calibration trajectories

    # -- run lifecycle -------------------------------------------------------------------------
    def begin_run(self, num_steps: int | None) -> None:
        self._samples = {}
        self._num_steps = num_steps

    def end_run(self) -> GuidanceStats:
        st = self.current_stats()
        if st.cond_forwards:
            self.last_run = st
        if self.record:
            self.recorded.extend(s.trajectory for s in self._samples.values() if s.trajectory)
        self._samples = {}
        return st

    def current_stats(self) -> GuidanceStats:
        st = GuidanceStats(mode=self.config.mode, num_steps=self._num_steps)
        for s in self._samples.values():
            st.uncond[s.label] = list(s.timeline)
            st.cosine[s.label] = list(s.cosine)
            st.stop_step[s.label] = s.stopped_at
        return st

    def _sample(self, item: Hashable) -> _Sample:
        s = self._samples.get(item)
        if s is None:
            s = self._samples[item] = _Sample(label=str(item))
        return s

    # -- decisions -----------------------------------------------------------------------------
    def _linear_coeffs(self, step: int) -> list[float] | None:
        cfg = self.config
        if cfg.coefficients is None or step == 0 or step % cfg.linear_every == 0:
            return None
        n = self._num_steps
        if n is not None and step >= math.ceil(cfg.linear_until * n):
            return None
        return cfg.coefficients.at(step, n)

    def needs_uncond(self, item: Hashable, step: int) -> bool:
        """True when sample ``item`` must run its unconditional pass at ``step``."""
        cfg, s = self.config, self._sample(item)
        if cfg.mode == "truncate":
            n = self._num_steps
            return n is None or cfg.truncate >= 1.0 or step < math.ceil(cfg.truncate * n)
        if s.stopped_at is not None:
            return False
        if cfg.mode == "linear" and s.prev_cond is not None and s.prev_uncond is not None:
            if self._linear_coeffs(step) is not None:
                return False
        return True

    def estimate_uncond(self, item: Hashable, step: int, cond: torch.Tensor) -> torch.Tensor:
        """Stand-in for a dropped uncond prediction: LinearAG's estimate, else ``cond`` (CFG -> cond)."""
        s = self._sample(item)
        coeffs = self._linear_coeffs(step) if self.config.mode == "linear" and s.stopped_at is None else None
        if coeffs is not None and s.prev_cond is not None and s.prev_uncond is not None \
                and s.prev_cond.shape == cond.shape:
            a, b, c = coeffs
            est = a * cond.float() + b * s.prev_cond.float() + c * s.prev_uncond.float()
            return est.to(cond.dtype)
        return cond.clone()

    def observe(self, item: Hashable, step: int, cond: torch.Tensor, uncond: torch.Tensor | None,
                estimated: torch.Tensor | None = None) -> None:
        """Record one step of sample ``item``: ``uncond`` if really computed, else the ``estimated`` stand-in."""
        cfg, s = self.config, self._sample(item)
        if uncond is not None:
            s.timeline.append("C")
            gamma = cosine(cond, uncond)
            s.cosine.append(gamma)
            if (cfg.mode in ("ag", "linear") and s.stopped_at is None and gamma >= cfg.threshold
                    and len(s.cosine) >= max(cfg.min_steps, 1)):
                s.stopped_at = step + 1
            if self.record:
                s.trajectory.append((cond.detach().float().cpu(), uncond.detach().float().cpu()))
        else:
            s.timeline.append("L" if cfg.mode == "linear" and s.stopped_at is None else ".")
        if s.prev_cond is not None and s.prev_cond.shape != cond.shape:  # resolution changed mid-run
            s.prev_cond = s.prev_uncond = None
        s.prev_cond = cond.detach()
        s.prev_uncond = (uncond if uncond is not None else estimated)
        if s.prev_uncond is not None:
            s.prev_uncond = s.prev_uncond.detach()


# -- LinearAG calibration ----------------------------------------------------------------------
def fit_linear_ag(trajectories: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                  model_key: str = "") -> LinearAGCoefficients:
    """Least-squares LinearAG coefficients from full-CFG trajectories ``[(cond_t, uncond_t), ...]``.

    For each step t >= 1, solve ``min ||[c_t, c_{t-1}, u_{t-1}] w - u_t||^2`` pooled over all
    trajectories and elements (3 scalars per step, as the paper's affine-combination estimator).
    """
    if not trajectories:
        raise ValueError("fit_linear_ag needs at least one calibration trajectory")
    num_steps = min(len(t) for t in trajectories)
    if num_steps < 2:
        raise ValueError("calibration trajectories need at least 2 steps")
    coeffs: list[list[float] | None] = [None]
    resid: list[float | None] = [None]
    for t in range(1, num_steps):
        xs, ys = [], []
        for traj in trajectories:
            (c, u), (cp, up) = traj[t], traj[t - 1]
            if c.shape != cp.shape:
                continue
            xs.append(torch.stack([c.flatten(), cp.flatten(), up.flatten()], dim=1).double())
            ys.append(u.flatten().double())
        if not xs:
            coeffs.append(None)
            resid.append(None)
            continue
        x, y = torch.cat(xs), torch.cat(ys)
        w = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
        coeffs.append([float(v) for v in w])
        resid.append(float((x @ w - y).norm() / y.norm().clamp_min(1e-12)))
    return LinearAGCoefficients(num_steps=num_steps, coefficients=coeffs, model_key=model_key, residual=resid)


def model_key(config: Any) -> str:
    """Stable short hash of a denoiser's config (a dict or an object with ``to_dict``/``__dict__``)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif not isinstance(config, dict):
        config = dict(vars(config))
    clean = {k: v for k, v in sorted(config.items()) if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """User cache dir for calibration files: ``$HASTEN_CACHE`` or ``~/.cache/hasten``."""
    root = os.environ.get("HASTEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hasten")
    return Path(root) / "linear_ag"


def coefficient_paths(key: str, model_dir: str | Path | None = None) -> list[Path]:
    """Where LinearAG coefficients for model ``key`` are looked for, in order: next to the model, cache."""
    paths = []
    if model_dir is not None and Path(model_dir).is_dir():
        paths.append(Path(model_dir) / COEFF_FILE)
    paths.append(cache_dir() / f"{key}.json")
    return paths


def find_coefficients(key: str, model_dir: str | Path | None = None) -> LinearAGCoefficients | None:
    """Load the first coefficient file for ``key`` whose recorded model key matches (None if none)."""
    for p in coefficient_paths(key, model_dir):
        if p.is_file():
            c = LinearAGCoefficients.load(p)
            if not c.model_key or c.model_key == key:
                return c
    return None
