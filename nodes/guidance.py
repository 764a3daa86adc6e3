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
from .schema import CATEGORY, advanced, fail, io

log = logging.getLogger("hasten")
NAME = "Adaptive Guidance (hasten)"

WRAPPER_KEY = "hasten_guidance"
HOLDER_KEY = "hasten_guidance"
RUN_KEY = "hasten_guidance_run"


@dataclass
class GuidanceHolder:
    """Settings of one node instance plus the statistics of its most recent sampling run."""

    config: GuidanceConfig
    last_run: GuidanceStats | None = None

    def stats_text(self) -> str | None:
        """The last run's statistics as one line (None before the first run)."""
        return None if self.last_run is None else run_text(self.last_run)


def run_text(result: GuidanceStats) -> str:
    """A run's statistics as the node reports them (log line and Run Stats node)."""
    return (f"{NAME}: {result.forwards}/{result.baseline_forwards} rows run "
            f"({100 * result.saved_fraction:.0f}% saved)")


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
                log.info("%s", run_text(result))
                if result.forwards >= result.baseline_forwards:
                    log.warning("%s: no uncond pass was saved in this run (cond and uncond never agreed at "
                                "threshold %g; lower it, or use mode 'truncate')", NAME, holder.config.threshold)
            else:
                log.warning("%s: this sampling run had no separate cond/uncond passes (CFG 1.0, or a "
                            "guider that batches differently): nothing to drop", NAME)

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
    if not hasattr(model, "add_wrapper_with_key") or not hasattr(getattr(model, "model", None), "apply_model"):
        fail(NAME, f"needs a ComfyUI diffusion MODEL (a ModelPatcher of SD1.x/SDXL/SD3/Flux/Wan/Qwen-Image/"
                   f"HunyuanVideo/LTX ...), got {type(getattr(model, 'model', model)).__name__}")
    if config.mode == "linear":
        fail(NAME, "modes 'ag' and 'truncate' are supported here (LinearAG is diffusers-only)", ValueError)
    import comfy.patcher_extension as pe

    # off = plain CFG: no wrappers at all (bit-identical by construction)
    wrappers = {} if config.is_off else {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                         pe.WrappersMP.CALC_COND_BATCH: calc_cond_batch_wrapper}
    m = rewrap(model, WRAPPER_KEY, wrappers)
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = GuidanceHolder(config)
    return m


class HastenAdaptiveGuidance(io.ComfyNode):
    """Node "Adaptive Guidance (hasten)": stop each sample's uncond pass once cond and uncond agree."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenAdaptiveGuidance",
            display_name=NAME,
            category=CATEGORY,
            description=("Adaptive Guidance (Castillo et al. 2023), training-free: per sample, once the cond and "
                         "uncond predictions agree (cosine >= threshold) the negative/uncond pass is no longer "
                         "computed and CFG uses the cond prediction. Use with the normal KSampler and CFG > 1; "
                         "works on every ComfyUI model. Statistics: log line and the Run Stats (hasten) node."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL (it is cloned, not changed)."),
                io.Combo.Input("mode", options=["ag", "truncate"], default="ag",
                               tooltip="ag: stop per sample when cond and uncond agree; truncate: keep CFG only "
                                       "for the first truncate_percent of the steps."),
                io.Float.Input("threshold", default=0.993, min=0.5, max=2.0, step=0.001,
                               tooltip="ag: cosine similarity of cond and uncond that stops the uncond pass "
                                       "(> 1 = off, bit-identical to plain CFG)."),
                io.Float.Input("truncate_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="truncate: fraction of the steps that keep CFG (1 = off).", **advanced()),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with adaptive guidance; connect it to a KSampler.")],
        )

    @classmethod
    def execute(cls, model: Any, mode: str = "ag", threshold: float = 0.993,
                truncate_percent: float = 0.5) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, GuidanceConfig(mode=mode, threshold=threshold,
                                                               truncate=truncate_percent)))


NODES = [HastenAdaptiveGuidance]
