"""ComfyUI adapter for SADA: node "SADA (hasten)" = EasyCache's APPLY_MODEL wrapper (per-branch rows, partial
batches, network-space outputs) driving :class:`hasten.caches.SADA`; every decision is the core's.

It uses EasyCache's wrapper key; on a MODEL that already has EasyCache (hasten) or CacheQuant (hasten) it is a
node error (and vice versa): two step caches never stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..caches import RunStats
from ..caches.sada import SADA, SADAConfig
from .easycache import (
    RUN_KEY,
    WRAPPER_KEY,
    _check_hookable,
    _Run,
    apply_model_wrapper,
    refuse_other_step_cache,
    step_cache_outermost,
)
from .runs import last_run_stats, num_steps_of, rewrap, scoped_run
from .schema import CATEGORY, advanced, io

log = logging.getLogger("hasten")
NAME = "SADA (hasten)"
HOLDER_KEY = "hasten_sada"

_DEFAULTS = SADAConfig()


def run_text(result: RunStats) -> str:
    """A run's statistics as the node reports them."""
    return (f"{NAME}: {result.computed}/{result.calls} branch forwards computed, {result.reused} skipped "
            f"(estimated {result.estimated_speedup:.2f}x, {result.num_steps} steps)")


@dataclass
class SADAHolder:
    """Settings of one node instance plus the statistics of its most recent sampling run."""

    config: SADAConfig
    last_run: RunStats | None = None
    notes: list[str] = field(default_factory=list)

    def stats_text(self) -> str | None:
        return None if self.last_run is None else run_text(self.last_run)

    def note_once(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s: %s", NAME, message)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh SADA policy per sampling run (EasyCache's APPLY_MODEL wrapper reads it under RUN_KEY)."""

    def start(holder: SADAHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        num_steps = num_steps_of(sigmas)
        cache = SADA(holder.config)
        cache.begin_run(num_steps)

        def finish() -> None:
            result = cache.end_run()
            if result.calls:
                holder.last_run = result
                log.info("%s", run_text(result))
                if result.reused == 0 and not holder.config.is_off:
                    log.warning("%s: nothing skipped over %s steps (the trajectory was never stable by SADA's "
                                "criterion in the acceleration range; raise threshold or use more steps)", NAME,
                                result.num_steps)

        return _Run(holder, cache, num_steps), finish  # type: ignore[arg-type]

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def patch_model(model: Any, config: SADAConfig) -> Any:
    """A clone of ``model`` with SADA (a node error on a MODEL that already has EasyCache / CacheQuant)."""
    _check_hookable(model)
    import comfy.patcher_extension as pe

    refuse_other_step_cache(model, NAME, outer_sample_wrapper)
    m = step_cache_outermost(rewrap(model, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                                         pe.WrappersMP.APPLY_MODEL: apply_model_wrapper}))
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = SADAHolder(config)
    return m


def stats(model: Any) -> RunStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


class HastenSADA(io.ComfyNode):
    """Node "SADA (hasten)": skip denoiser steps where the sampling trajectory is stable."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenSADA",
            display_name=NAME,
            category=CATEGORY,
            description=("SADA (Jiang et al., ICML 2025), training-free: skips a step when the second-order "
                         "difference of the denoiser's recent outputs says the ODE trajectory is stable, and "
                         "extrapolates the skipped output from them (Adams-Bashforth-like / Lagrange). Per CFG "
                         "branch, every ComfyUI diffusion model. Step-level only here: SADA's token-level sparsity is "
                         "in hasten's diffusers API (enable_sada(tokens=...), Wan family)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to accelerate (it is cloned, not changed)."),
                io.Int.Input("max_interval", default=_DEFAULTS.max_interval, min=0, max=10,
                             tooltip="Most skipped steps in a row. 0 = off (bit-identical to no cache)."),
                io.Float.Input("threshold", default=_DEFAULTS.threshold, min=-2.0, max=2.0, step=0.05,
                               tooltip="Stability test: skip while mean(-second difference) <= threshold x "
                                       "mean|first difference|. 0 = the paper's sign test; higher skips more."),
                io.Float.Input("start_percent", default=_DEFAULTS.start, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps always computed at the start."),
                io.Float.Input("end_percent", default=_DEFAULTS.end, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which every step is computed."),
                io.Int.Input("order", default=_DEFAULTS.order, min=1, max=2,
                             tooltip="Extrapolation order of a skipped step (1 = linear, 2 = Lagrange).",
                             **advanced()),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with SADA; connect it to any sampler.")],
        )

    @classmethod
    def execute(cls, model: Any, max_interval: int = _DEFAULTS.max_interval, threshold: float = _DEFAULTS.threshold,
                start_percent: float = _DEFAULTS.start, end_percent: float = _DEFAULTS.end,
                order: int = _DEFAULTS.order) -> io.NodeOutput:
        config = SADAConfig(max_interval=max_interval, threshold=threshold, start=start_percent, end=end_percent,
                            order=order)
        return io.NodeOutput(patch_model(model, config))


NODES = [HastenSADA]
