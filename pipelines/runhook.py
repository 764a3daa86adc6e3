"""One run lifecycle for the diffusers hooks that drive a per-run cache policy (EasyCache, SADA, CacheQuant,
the block caches): start the policy when a run starts, report once what it did, close it when the run ends.

The hooks differ only in what one denoiser call does (:meth:`RunHook.run_call`) and in what their report
says (:meth:`RunHook.log_run`); everything about runs lives here once.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from .denoiser import CallInfo, DenoiserHook, in_flight
from .registry import HookFeature


class RunHook(DenoiserHook):
    """A denoiser hook driving ``cache`` (anything with ``begin_run``/``end_run``/``current_stats``/``last_run``).

    Each call is identified (a new run closes the previous one and starts the policy afresh), run through
    :meth:`run_call`, and after the run's last call (or at the next run's start, whichever comes first) the
    run is reported exactly once through :meth:`log_run`.
    """

    def __init__(self, pipe: Any, cache: Any) -> None:
        super().__init__(pipe)
        self.cache = cache
        self._reported = False

    # -- lifecycle -----------------------------------------------------------------------------
    def begin_cache(self, num_steps: int | None) -> None:
        """Start the policy for a run of ``num_steps`` steps (override to pass more, e.g. the block count)."""
        self.cache.begin_run(num_steps)

    def on_run_start(self, num_steps: int | None) -> None:
        self.begin_cache(num_steps)
        self._reported = False

    def on_run_end(self) -> None:
        self.report()
        self.cache.end_run()

    def report(self) -> None:
        """Log once per run what the policy did (nothing before the run's first call)."""
        st = self.cache.current_stats()
        if self._reported or not st.calls:
            return
        self._reported = True
        self.log_run(st)

    def log_run(self, stats: Any) -> None:
        """Write the run's one log line (a run that did nothing where something was asked for warns)."""
        raise NotImplementedError

    def run_stats(self) -> tuple[Any, Any]:
        """(statistics of the run in progress or None, statistics of the last finished run or None)."""
        cur = self.cache.current_stats()
        return (cur if cur.calls else None), self.cache.last_run

    # -- one call ------------------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with in_flight(self):
            info = self.identify(module, args, kwargs)
            out = self.run_call(module, info, args, kwargs)
            if self.pattern.last_call(info):
                self.report()
            return out

    def run_call(self, module: torch.nn.Module, info: CallInfo, args: tuple, kwargs: dict) -> Any:
        """Run one identified denoiser call."""
        raise NotImplementedError


class RunHookFeature(HookFeature):
    """A :class:`HookFeature` of ``hook_class(pipe, config)`` hooks (:class:`RunHook` s): statistics come from
    the hooks' policies."""

    hook_class: type = RunHook

    def __init__(self, pipe: Any, config: Any) -> None:
        self.config = config
        super().__init__(pipe, lambda: self.hook_class(pipe, config))

    def run_stats(self, hook: RunHook) -> tuple[Any, Any]:
        return hook.run_stats()


# Features that decide per denoiser call whether the model runs at all (feature name -> display name).
STEP_CACHES = {"easycache": "EasyCache", "sada": "SADA", "cachequant": "CacheQuant"}


def refuse_stacked_step_cache(pipe: Any, name: str) -> None:
    """Raise :class:`UnsupportedModelError` when another step cache than ``name`` is on ``pipe``'s denoiser.

    Two step caches on one denoiser would feed one's estimates into the other's criterion as if they were
    real forwards (the outer one's change measure sees the inner one's extrapolations, errors compound) and
    each one's statistics would count the other's skips as work. A block cache (Δ-DiT, ProfilingDiT) is
    not a step cache: it combines with one.
    """
    from .registry import features

    others = [n for n in features(pipe) if n in STEP_CACHES and n != name]
    if others:
        other = others[0]
        raise UnsupportedModelError(
            f"{STEP_CACHES[name]} and {STEP_CACHES[other]} are both step-level caches (each decides per denoiser call "
            f"whether the model runs); stacked, one would treat the other's estimates as real forwards and their "
            f"errors compound. Disable {STEP_CACHES[other]} first (pipe.disable_{other}()). hasten supports one step "
            f"cache per denoiser, plus a block cache (Δ-DiT / ProfilingDiT) with it.")


# Schedulers whose every step re-noises the latent with *fresh* random noise (multistep consistency sampling):
# a reused denoiser output predicts noise that is no longer in the latent. Measured on a tiny SD 1.5, 8 steps:
# SADA 28.0 dB under LCM vs. 51.5 dB under DDIM; CacheQuant reusing 2 of 8 steps 15.6 vs. 34.4 dB.
FRESH_NOISE_SCHEDULERS = ("LCMScheduler",)


def refuse_fresh_noise_scheduler(pipe: Any, what: str) -> None:
    """Raise :class:`UnsupportedModelError` when ``pipe``'s scheduler re-noises with fresh noise every step
    (LCM): reusing a step's denoiser output there is not an approximation but a different image."""
    scheduler = type(getattr(pipe, "scheduler", None)).__name__
    if scheduler in FRESH_NOISE_SCHEDULERS:
        raise UnsupportedModelError(
            f"hasten {what} reuses denoiser outputs across steps, which {scheduler} cannot take: every step "
            "re-noises the latent with fresh noise, so a reused output predicts noise that is no longer there. "
            "On few-step LCM runs use adaptive guidance, quantization (hasten.quantize_pipeline) or sparse "
            f"attention instead, or a deterministic scheduler (DDIM, Euler, flow matching) with {what}.")
