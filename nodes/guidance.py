"""ComfyUI adapter for adaptive guidance: a MODEL patch usable with the plain KSampler.

A keyed ``CALC_COND_BATCH`` wrapper sees each step's ``[cond, uncond]`` pair. Per sample it asks
:class:`hasten.samplers.guidance.AdaptiveGuidance` whether the uncond pass is still needed; the cond
pass always runs, the uncond pass runs only on the rows (latent batch items) that still need it, and
the dropped rows get the cond prediction (CFG then equals cond). Similarity is measured on
``x - denoised`` (ComfyUI's noise-prediction space; cosine is invariant to the sigma scale).
An ``OUTER_SAMPLE`` wrapper gives every sampling run a fresh policy. LinearAG is diffusers-only
(its coefficients are calibrated in the diffusers output space); this node offers "ag" and "truncate".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..samplers.guidance import AdaptiveGuidance, GuidanceConfig, GuidanceStats
from .runs import last_run_stats, num_steps_of, rewrap, scoped_run, step_index

log = logging.getLogger("hasten")

WRAPPER_KEY = "hasten_guidance"
HOLDER_KEY = "hasten_guidance"
RUN_KEY = "hasten_guidance_run"


@dataclass
class GuidanceHolder:
    config: GuidanceConfig
    last_run: GuidanceStats | None = None


@dataclass
class _Run:
    holder: GuidanceHolder
    policy: AdaptiveGuidance
    num_steps: int


def stats(model: Any) -> GuidanceStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh per-sample guidance policy for every sampling run; stats kept on the holder afterwards."""

    def start(holder: GuidanceHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        num_steps = num_steps_of(sigmas)
        policy = AdaptiveGuidance(holder.config)
        policy.begin_run(num_steps)

        def finish() -> None:
            result = policy.end_run()
            if result.cond_forwards:
                holder.last_run = result
                log.info("adaptive guidance (hasten): %d/%d rows run (%.0f%% saved)", result.forwards,
                         result.baseline_forwards, 100 * result.saved_fraction)

        return _Run(holder, policy, num_steps), finish

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def calc_cond_batch_wrapper(executor: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                            model_options: dict) -> list:
    run: _Run | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None or len(conds) != 2 or conds[1] is None or conds[0] is None:
        return executor(model, conds, x_in, timestep, model_options)
    pol, batch = run.policy, x_in.shape[0]
    step = step_index(model_options["transformer_options"].get("sample_sigmas"), timestep[0], run.num_steps)
    need = [pol.needs_uncond(i, step) for i in range(batch)]
    if all(need):
        out = executor(model, conds, x_in, timestep, model_options)
        for i in range(batch):
            pol.observe(i, step, x_in[i] - out[0][i], x_in[i] - out[1][i])
        return out
    cond = executor(model, [conds[0]], x_in, timestep, model_options)[0]
    rows = [i for i in range(batch) if need[i]]
    uncond = cond.clone()
    if rows:
        ts = timestep[rows] if timestep.ndim and timestep.shape[0] == batch else timestep
        sub = executor(model, [_slice_conds(conds[1], rows, batch)], x_in[rows], ts, model_options)[0]
        uncond[rows] = sub
    for i in range(batch):
        if need[i]:
            pol.observe(i, step, x_in[i] - cond[i], x_in[i] - uncond[i])
        else:
            pol.observe(i, step, x_in[i] - cond[i], None, x_in[i] - cond[i])
    return [cond, uncond]


def _slice_conds(conds: list, rows: list[int], batch: int) -> list:
    """Restrict per-item conditioning (tensors with one row per latent batch item) to ``rows``."""
    out = []
    for c in conds:
        mc = c.get("model_conds") if isinstance(c, dict) else None
        if not mc:
            out.append(c)
            continue
        new = {}
        for k, v in mc.items():
            t = getattr(v, "cond", None)
            if torch.is_tensor(t) and t.ndim and t.shape[0] == batch and hasattr(v, "_copy_with"):
                v = v._copy_with(t[rows])
            new[k] = v
        out.append({**c, "model_conds": new})
    return out


def patch_model(model: Any, config: GuidanceConfig) -> Any:
    """A clone of ``model`` with the adaptive-guidance wrappers (re-patching replaces, never stacks)."""
    if not hasattr(model, "add_wrapper_with_key"):
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"adaptive guidance (hasten) needs a ComfyUI MODEL (ModelPatcher), got "
                                    f"{type(model).__name__}")
    if config.mode == "linear":
        raise ValueError("the ComfyUI node supports modes 'ag' and 'truncate' (LinearAG is diffusers-only)")
    import comfy.patcher_extension as pe

    # off = plain CFG: no wrappers at all (bit-identical by construction)
    wrappers = {} if config.is_off else {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                         pe.WrappersMP.CALC_COND_BATCH: calc_cond_batch_wrapper}
    m = rewrap(model, WRAPPER_KEY, wrappers)
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = GuidanceHolder(config)
    return m


class HastenAdaptiveGuidance:
    """Node "Adaptive Guidance (hasten)": stop each sample's uncond pass once cond and uncond agree."""

    CATEGORY = "hasten"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Adaptive Guidance (Castillo et al.): per sample, once cos(cond, uncond) >= threshold the "
                   "negative/uncond pass is no longer computed. Use with the normal KSampler.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL",),
            "mode": (["ag", "truncate"], {"default": "ag"}),
            "threshold": ("FLOAT", {"default": 0.993, "min": 0.5, "max": 2.0, "step": 0.001,
                                    "tooltip": "AG: cosine similarity that stops the uncond pass (> 1 = off)"}),
            "truncate_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "truncate: fraction of steps keeping CFG (1 = off)"}),
        }}

    def patch(self, model: Any, mode: str, threshold: float, truncate_percent: float) -> tuple:
        return (patch_model(model, GuidanceConfig(mode=mode, threshold=threshold, truncate=truncate_percent)),)


NODE_CLASS_MAPPINGS = {"HastenAdaptiveGuidance": HastenAdaptiveGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"HastenAdaptiveGuidance": "Adaptive Guidance (hasten)"}
