"""A searched timestep schedule (AutoDiffusion): fewer steps with a searched sigma spacing.

AutoDiffusion shows that the uniform spacing of a fixed step count is rarely the best a model can do
with that budget. Here the schedule is two numbers a search can move: ``steps`` (how many denoiser
steps the run takes, whatever ``num_inference_steps`` the call asks for) and ``shift``, a flow-matching
time shift applied on top of the scheduler's own spacing::

    u_i = linspace(1, 1/T, steps + 1)[:-1]          (the scheduler's own flow spacing, T train steps)
    sigma_i = shift * u_i / (1 + (shift - 1) * u_i)   (shift > 1 spends more steps at high noise)

The sigmas go through the scheduler's own ``set_timesteps(sigmas=...)`` (UniPC / DPM-Solver++ with
``use_flow_sigmas``, FlowMatch Euler): its solver, its config shift and its final sigma still apply, so
``steps`` = the call's steps with ``shift=1`` is bit-identical to no schedule. Only the scheduler
*instance* is patched (an instance attribute that keeps the real signature, which pipelines inspect).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError
from ..validation import check_float, check_int

logger = logging.getLogger("hasten.tune")

FEATURE = "timestep_schedule"


@dataclass(frozen=True)
class ScheduleConfig:
    """``steps``: denoiser steps of every run; ``shift``: flow time shift of their spacing (1 = the
    scheduler's own spacing)."""

    steps: int = 20
    shift: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_int("ScheduleConfig", "steps", self.steps, lo=1, hi=1000))
        object.__setattr__(self, "shift", check_float("ScheduleConfig", "shift", self.shift, lo=0.05, hi=20.0))


def flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The ``steps`` sigmas (high to low, final zero excluded) of the schedule above."""
    import numpy as np

    u = np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1]
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return [float(v) for v in u]


def _is_flow(sched: Any) -> bool:
    cfg = getattr(sched, "config", {})
    return bool(cfg.get("use_flow_sigmas")) or type(sched).__name__.startswith("FlowMatch")


class ScheduleFeature:
    """The patched ``set_timesteps`` of one scheduler instance (a registry feature: ``remove`` restores it)."""

    name = FEATURE

    def __init__(self, pipe: Any, config: ScheduleConfig) -> None:
        sched = getattr(pipe, "scheduler", None)
        if sched is None or not hasattr(sched, "set_timesteps"):
            raise UnsupportedModelError(f"{type(pipe).__name__} has no scheduler with set_timesteps: a timestep "
                                        "schedule needs a diffusers scheduler")
        if "sigmas" not in inspect.signature(sched.set_timesteps).parameters or not _is_flow(sched):
            raise UnsupportedModelError(
                f"timestep schedule: {type(sched).__name__} does not take flow-matching sigmas; supported: "
                "FlowMatchEulerDiscreteScheduler, UniPC / DPM-Solver++ multistep with use_flow_sigmas=True")
        if "set_timesteps" in vars(sched):
            raise UnsupportedModelError("timestep schedule: the scheduler is already patched (bottleneck "
                                        "sampling?); the two cannot be combined, disable the other first")
        self.sched, self.config = sched, config
        self.sigmas = flow_sigmas(config.steps, config.shift, int(sched.config.get("num_train_timesteps", 1000)))
        self.asked: int | None = None
        orig = sched.set_timesteps
        import numpy as np

        @functools.wraps(orig)
        def set_timesteps(num_inference_steps: Any = None, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("sigmas", None)
            kwargs.pop("timesteps", None)
            self.asked = num_inference_steps
            out = orig(None, *args, sigmas=np.array(self.sigmas), **kwargs)
            logger.info("timestep schedule (hasten): %d steps (the call asked %s), shift %g",
                        config.steps, num_inference_steps, config.shift)
            return out

        sched.set_timesteps = set_timesteps

    def remove(self) -> None:
        if "set_timesteps" in vars(self.sched):
            delattr(self.sched, "set_timesteps")

    def stats(self) -> dict[str, Any]:
        return {"steps": self.config.steps, "shift": self.config.shift, "asked": self.asked}


def enable_timestep_schedule(pipe: Any, config: ScheduleConfig | None = None, **kwargs: Any) -> Any:
    """Run every call of ``pipe`` on the schedule ``config`` (or ``ScheduleConfig(**kwargs)``)."""
    from ..pipelines.registry import Feature, install, make_config

    cfg = make_config(ScheduleConfig, config, kwargs)

    class _F(ScheduleFeature, Feature):
        pass

    return install(pipe, FEATURE, lambda: _F(pipe, cfg))


def disable_timestep_schedule(pipe: Any) -> Any:
    """Give the scheduler back its own ``set_timesteps``."""
    from ..pipelines.registry import uninstall

    return uninstall(pipe, FEATURE)
