"""diffusers adapter for SADA: EasyCache's denoiser hook (branch split, partial batches, output packing)
driving :class:`hasten.caches.SADA`; every decision is the core's."""

from __future__ import annotations

from typing import Any

from ..caches import EasyCacheConfig, RunStats
from ..caches.sada import SADA, SADAConfig
from .denoiser import log
from .easycache import PRIORITY, EasyCacheHook
from .registry import install, make_config, uninstall
from .runhook import RunHookFeature, refuse_stacked_step_cache

HOOK_NAME = "hasten_sada"


class SADAHook(EasyCacheHook):
    """Runs each denoiser call through :func:`hasten.caches.run_cached` with a SADA policy."""

    def __init__(self, pipe: Any, config: SADAConfig) -> None:
        super().__init__(pipe, EasyCacheConfig(threshold=0.0))
        self.cache = SADA(config)  # type: ignore[assignment]

    def log_run(self, st: RunStats) -> None:
        """What SADA did (skipping nothing while on is a warning, with the reason)."""
        cfg = self.cache.config
        if st.reused or cfg.is_off:
            log.info("hasten SADA on %s: %d/%d branch forwards computed, %d skipped (%d branches)",
                     self.pattern.pipe_name, st.computed, st.calls, st.reused, len(st.branches))
        else:
            log.warning("hasten SADA on %s skipped nothing in this run (%d branch forwards): the trajectory was "
                        "never stable by its criterion (threshold %g) inside the acceleration range, or the run "
                        "is too short", self.pattern.pipe_name, st.calls, cfg.threshold)


class SADAFeature(RunHookFeature):
    name = "sada"
    hook_name = HOOK_NAME
    priority = PRIORITY
    hook_class = SADAHook


def enable_sada(pipe: Any, config: SADAConfig | None = None, **kwargs: Any) -> Any:
    """Turn on SADA step skipping for ``pipe``'s denoiser(s); settings as in :class:`SADAConfig`.

    Calling it again replaces the previous settings. Returns the pipeline.
    """
    config = make_config(SADAConfig, config, kwargs)
    refuse_stacked_step_cache(pipe, "sada")
    return install(pipe, "sada", lambda: SADAFeature(pipe, config))


def disable_sada(pipe: Any) -> Any:
    """Remove SADA from ``pipe``; the denoiser's forward is restored exactly. Returns the pipeline."""
    return uninstall(pipe, "sada")
