"""diffusers adapter for EasyCache: a forward hook on the denoiser that defers every decision to
:class:`hasten.caches.EasyCache`."""

from __future__ import annotations

from typing import Any

import torch

from ..caches import EasyCache, EasyCacheConfig, RunStats, run_cached
from .denoiser import CallInfo, log, main_tensor, row_keys, slice_batch, split_input
from .registry import install, make_config, uninstall
from .runhook import RunHook, RunHookFeature, refuse_fresh_noise_scheduler, refuse_stacked_step_cache

HOOK_NAME = "hasten_easycache"
PRIORITY = 50  # hook stacking: below guidance (100) and sparse attention (75)


class EasyCacheHook(RunHook):
    """Runs each denoiser call through :func:`run_cached` with one branch per batch row and call position.

    Subclasses (SADA, CacheQuant) drive another step-cache policy through the same call handling.
    """

    label = "EasyCache"  # the name a refusal or log line uses

    def __init__(self, pipe: Any, config: EasyCacheConfig) -> None:
        super().__init__(pipe, EasyCache(config))

    def reuses_outputs(self) -> bool:
        """Whether this run may hand back a reused denoiser output (a threshold of 0 never does)."""
        return self.cache.config.threshold > 0

    def begin_cache(self, num_steps: int | None) -> None:
        if self.reuses_outputs():  # the scheduler may have been swapped since enabling
            refuse_fresh_noise_scheduler(self.pipe_ref() if self.pipe_ref is not None else None, self.label)
        super().begin_cache(num_steps)

    def log_run(self, st: RunStats) -> None:
        """What the cache did (a run that reused nothing at threshold > 0 says why)."""
        where = self.pattern.pipe_name
        n = st.num_steps
        if not st.reused and self.cache.config.threshold > 0 and n and n < 8:
            log.warning("hasten EasyCache on %s did nothing: a %d-step run is too short (warm-up, final steps and the "
                        "rate estimate leave no step to reuse); few-step models (LCM, distilled) gain nothing from step "
                        "caching - use >= 8 steps", where, n)
        elif st.reused or self.cache.config.threshold <= 0:
            log.info("hasten EasyCache on %s: %d/%d branch forwards computed, %d reused (%d branches)", where,
                     st.computed, st.calls, st.reused, len(st.branches))
        else:
            log.info("hasten EasyCache on %s reused nothing in this run (%d branch forwards, threshold %g): the "
                     "output changed faster than the threshold allows, or the run is too short for warm-up",
                     where, st.calls, self.cache.config.threshold)

    def run_call(self, module: torch.nn.Module, info: CallInfo, args: tuple, kwargs: dict) -> Any:
        x = split_input(args, kwargs)
        batch = x.shape[0]
        keys, labels = info.keys, info.labels
        steps = [info.step] * batch
        forward = self.original()
        full: list[Any] = []
        pag = any(k[0] == "perturbed" for k in keys)

        def compute(rows: list[int] | None) -> torch.Tensor:
            # row_keys: code below this hook (e.g. sparse-attention processors) keys its state per branch too
            if rows is None:
                with row_keys(module, keys, info.step):
                    result = forward(*args, **kwargs)
                full.append(result)
            elif pag:  # PAG's attention processors need the whole [(uncond,) cond, perturbed] batch
                with row_keys(module, keys, info.step):
                    result = forward(*args, **kwargs)
                self.packer.learn(result)
                return main_tensor(result)[rows]
            else:
                a, kw = slice_batch(args, kwargs, rows, batch)
                with row_keys(module, [keys[i] for i in rows], info.step):
                    result = forward(*a, **kw)
            self.packer.learn(result)
            return main_tensor(result)

        out = run_cached(self.cache, keys, x, steps, info.num_steps, compute, labels,
                         groups=[item for _, item in keys])
        if full:  # every row computed: hand back the model's own output object untouched
            return full[0]
        return self.packer.pack(out, kwargs.get("return_dict"))


class EasyCacheFeature(RunHookFeature):
    name = "easycache"
    hook_name = HOOK_NAME
    priority = PRIORITY
    hook_class = EasyCacheHook


def enable_easycache(pipe: Any, config: EasyCacheConfig | None = None, **kwargs: Any) -> Any:
    """Turn on EasyCache for ``pipe``'s denoiser(s); settings as in :class:`EasyCacheConfig`.

    Calling it again replaces the previous settings (caches never stack). Returns the pipeline.
    """
    config = make_config(EasyCacheConfig, config, kwargs)
    refuse_stacked_step_cache(pipe, "easycache")
    if config.threshold > 0:
        refuse_fresh_noise_scheduler(pipe, "EasyCache")
    return install(pipe, "easycache", lambda: EasyCacheFeature(pipe, config))


def disable_easycache(pipe: Any) -> Any:
    """Remove EasyCache from ``pipe``; the denoiser's forward is restored exactly. Returns the pipeline."""
    return uninstall(pipe, "easycache")
