"""ComfyUI adapter for CacheQuant: node "CacheQuant (hasten)" = quantized linear layers (the Quantize node's
patches) + a fixed cache schedule (EasyCache's APPLY_MODEL wrapper driving :class:`CacheQuantCache`).

The node takes a schedule computed elsewhere — ``hasten.calibrate_cachequant(pipe, ...).plan(K)
.schedule_text()`` on the diffusers side, or ``hasten tune`` — rather than calibrating inside the node:
the dynamic programme needs full-precision *and* quantized sampling runs of whole graphs (conditioning,
latent, sampler), which a MODEL-patching node does not have, and a schedule is only valid for the sampler
and step count it was planned for. The schedule travels as plain text; the per-channel error correction
(fitted against diffusers' sampler) does not, so reused steps are uncorrected here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..caches import RunStats
from ..caches.cachequant import CacheQuantCache, CacheQuantPlan
from .easycache import RUN_KEY, WRAPPER_KEY, _check_hookable, _Run, apply_model_wrapper, run_text
from .quantize import make_config
from .quantize import patch_model as quantize_model
from .runs import last_run_stats, num_steps_of, rewrap, scoped_run
from .schema import CATEGORY, advanced, fail, io, output, stats_output

log = logging.getLogger("hasten")
NAME = "CacheQuant (hasten)"
HOLDER_KEY = "hasten_cachequant"
METHODS = ("int8_weight_only", "int4_weight_only", "w8a8", "none")


@dataclass
class CacheQuantHolder:
    """The node's plan plus the statistics of its most recent sampling run."""

    plan: CacheQuantPlan
    last_run: RunStats | None = None
    notes: list[str] = field(default_factory=list)

    def stats_text(self) -> str | None:
        return None if self.last_run is None else run_text(self.last_run).replace("EasyCache", "CacheQuant")

    def note_once(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s: %s", NAME, message)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh schedule policy per sampling run (EasyCache's APPLY_MODEL wrapper reads it under RUN_KEY)."""

    def start(holder: CacheQuantHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        num_steps = num_steps_of(sigmas)
        cache = CacheQuantCache(holder.plan)
        cache.begin_run(num_steps)

        def finish() -> None:
            result = cache.end_run()
            if result.calls:
                holder.last_run = result
                log.info("%s: %d/%d branch forwards computed, %d reused (schedule %s)", NAME, result.computed,
                         result.calls, result.reused, holder.plan.timeline())

        return _Run(holder, cache, num_steps), finish  # type: ignore[arg-type]

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def patch_model(model: Any, plan: CacheQuantPlan, method: str = "int8_weight_only") -> Any:
    """A clone of ``model``: quantized (unless ``method`` is "none") and cached on ``plan``'s schedule.

    Uses EasyCache's wrapper key, so it replaces an EasyCache (hasten) patch and vice versa: two step caches
    never stack.
    """
    _check_hookable(model)
    import comfy.patcher_extension as pe

    m = model
    if method != "none":
        m = quantize_model(m, make_config(method))
    m = rewrap(m, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                pe.WrappersMP.APPLY_MODEL: apply_model_wrapper})
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = CacheQuantHolder(plan)
    return m


def stats(model: Any) -> RunStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


class HastenCacheQuant(io.ComfyNode):
    """Node "CacheQuant (hasten)": quantize the model and cache on a schedule chosen for the quantized model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenCacheQuant",
            display_name=NAME,
            category=CATEGORY,
            description=("CacheQuant (Liu et al. 2025): quantized linear layers plus a fixed step-cache schedule "
                         "chosen by dynamic programming for the quantized model. Paste the schedule that "
                         "hasten.calibrate_cachequant(...).plan(K).schedule_text() or `hasten tune` printed for "
                         "these weights, sampler and step count. Replaces an EasyCache (hasten) patch."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL (it is cloned, not changed)."),
                io.String.Input("schedule", default="0,1,2,3,5,7,9,12,15,19",
                                tooltip="Comma-separated steps that run the model (0-based; step 0 required); the "
                                        "others reuse the last computed output."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The step count the schedule was planned for (a different sampler step "
                                     "count stretches it, with a warning)."),
                io.Combo.Input("method", options=list(METHODS), default="int8_weight_only",
                               tooltip="Quantization of the linear layers (as Quantize Model (hasten)); none = "
                                       "schedule only (e.g. after your own Quantize node)."),
                io.Combo.Input("reuse", options=["output", "residual"], default="output",
                               tooltip="How a skipped step is estimated: the last output, or the last "
                                       "input-output residual added to the new input. Use what the plan says.",
                               **advanced()),
            ],
            outputs=[
                io.Model.Output(tooltip="The quantized, cached MODEL; connect it to any sampler."),
                stats_output("The schedule and quantization applied (run statistics: Run Stats (hasten))."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, schedule: str, steps: int = 20, method: str = "int8_weight_only",
                reuse: str = "output") -> io.NodeOutput:
        if method not in METHODS:
            fail(NAME, f"unknown method {method!r}; choose one of {METHODS}", ValueError)
        try:
            plan = CacheQuantPlan.from_text(schedule, num_steps=steps, reuse=reuse)
        except (TypeError, ValueError) as exc:
            fail(NAME, f"bad schedule {schedule!r} for {steps} steps: {exc}", ValueError)
        m = patch_model(model, plan, method)
        text = (f"{NAME}: {method}, schedule {plan.timeline()} ({plan.num_computed}/{plan.num_steps} steps "
                f"computed, reuse={plan.reuse})")
        log.info("%s", text)
        return output(m, stats=text)


NODES = [HastenCacheQuant]
