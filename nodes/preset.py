"""Node "Apply hasten preset": a ``hasten tune`` preset (JSON file or text) applied to a MODEL.

Each feature goes through its own node module's ``patch_model`` with the config the preset stores (the
same config classes as the diffusers side), so the result is exactly what chaining those nodes by hand
gives. The timestep schedule becomes an ``OUTER_SAMPLE`` wrapper that resamples the sampler's sigmas to
the preset's step count (``sigma_i = s(i / steps)`` on the sampler's own schedule ``s``) with the
preset's flow shift, outermost so the other features see the new step count. Quantization runs without
AWQ calibration here (the diffusers side calibrates on the preset's prompts). Bottleneck sampling is a
sampler, not a MODEL patch: a preset holding it is refused with the node to use instead.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

from ..tune.preset import PresetError, load_preset
from ..tune.schedule import ScheduleConfig
from .runs import rewrap
from .schema import CATEGORY, fail, io, output

log = logging.getLogger("hasten")

NAME = "Apply hasten preset"
SCHEDULE_KEY = "hasten_schedule"

# preset features with a ComfyUI node, in the order they wrap the model (after the timestep schedule)
_PATCH_ORDER = (("quantize", "quantize"), ("sparse_attention", "sparse_attention"), ("easycache", "easycache"),
                ("adaptive_guidance", "guidance"))


def resample_sigmas(sigmas: torch.Tensor, config: ScheduleConfig, flow: bool) -> torch.Tensor:
    """The sampler's schedule ``sigmas`` (steps + 1 values, last 0) resampled to ``config.steps`` steps; on
    flow models the shift ``config.shift`` is applied too. Same steps and shift 1 give ``sigmas`` itself."""
    m = int(sigmas.shape[-1]) - 1
    if m < 1 or (config.steps == m and config.shift == 1.0):
        return sigmas
    src = sigmas.detach().double().cpu()
    x = torch.arange(config.steps + 1, dtype=torch.float64) * (m / config.steps)
    lo = x.floor().long().clamp(max=m)
    hi = (lo + 1).clamp(max=m)
    w = x - lo
    new = src[lo] * (1 - w) + src[hi] * w
    if config.shift != 1.0:
        new = config.shift * new / (1 + (config.shift - 1) * new)
    new[-1] = src[-1]
    return new.to(sigmas.dtype).to(sigmas.device)


def _is_flow(guider: Any) -> bool:
    import comfy.model_sampling

    return isinstance(guider.model_patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def schedule_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """OUTER_SAMPLE: run the sampling on the preset's schedule."""
    guider = executor.class_obj
    config: ScheduleConfig = guider.model_options["transformer_options"][SCHEDULE_KEY]
    args = list(args)
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    flow = _is_flow(guider)
    if not flow and config.shift != 1.0:
        fail(NAME, f"the preset's schedule shift {config.shift:g} applies to flow-matching models (Wan, SD3, Flux, "
                   "...); this model is not one (use a preset with shift 1)", ValueError)
    new = resample_sigmas(sigmas, config, flow)
    log.info("%s: timestep schedule %d -> %d steps (shift %g)", NAME, int(sigmas.shape[-1]) - 1, config.steps,
             config.shift)
    if len(args) > 3:
        args[3] = new
    else:
        kwargs["sigmas"] = new
    return executor(*args, **kwargs)


def patch_schedule(model: Any, config: ScheduleConfig) -> Any:
    import comfy.patcher_extension as pe

    m = rewrap(model, SCHEDULE_KEY, {pe.WrappersMP.OUTER_SAMPLE: schedule_wrapper})
    m.model_options.setdefault("transformer_options", {})[SCHEDULE_KEY] = config
    return m


def apply_preset(model: Any, preset: str | dict[str, Any]) -> tuple[Any, list[str]]:
    """A clone of ``model`` with the preset's features, through each feature's own node module."""
    from ..tune.space import SPACE

    try:
        data = load_preset(preset)
    except (PresetError, FileNotFoundError) as exc:
        fail(NAME, str(exc), ValueError)
    feats = data["features"]
    if "bottleneck_sampling" in feats:
        fail(NAME, "the preset holds bottleneck sampling, a sampler rather than a MODEL patch: use the "
                   "'KSampler (Bottleneck, hasten)' node with its settings", ValueError)
    done = []
    m = model
    # the schedule first: its wrapper is then the outermost, so the others see the new step count
    if "timestep_schedule" in feats:
        m = patch_schedule(m, SPACE["timestep_schedule"].validate(feats["timestep_schedule"]))
        done.append("timestep_schedule")
    for feature, module in _PATCH_ORDER:  # each node module's patch_model, imported only when used
        if feature in feats:
            patch = importlib.import_module(f"{__package__}.{module}").patch_model
            m = patch(m, SPACE[feature].validate(feats[feature]))
            done.append(feature)
    missing = [n for n in feats if n not in done]
    if missing:
        fail(NAME, f"feature(s) {', '.join(missing)} of this preset have no ComfyUI node yet; supported here: "
                   "timestep_schedule, quantize, sparse_attention, easycache, adaptive_guidance", ValueError)
    if m is model:
        m = model.clone()
    return m, done


class HastenApplyPreset(io.ComfyNode):
    """Node "Apply hasten preset": every feature of a ``hasten tune`` preset on a MODEL at once."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenApplyPreset",
            display_name=NAME,
            category=CATEGORY,
            description=("Applies a preset written by `hasten tune` (the fastest stack found for a quality floor): "
                         "timestep schedule, quantization, sparse attention, EasyCache and adaptive guidance, each "
                         "through its own hasten node's logic. The preset's measured speed-up and quality are in "
                         "its 'measured' field."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL (it is cloned, not changed)."),
                io.String.Input("preset", default="tuned.json", multiline=True,
                                tooltip="Path to a preset JSON file, or the JSON text itself."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with the preset's features; connect it to a KSampler."),
                     io.String.Output("stats", display_name="stats", tooltip="What was applied.")],
        )

    @classmethod
    def execute(cls, model: Any, preset: str) -> io.NodeOutput:
        m, done = apply_preset(model, preset.strip())
        text = f"{NAME}: " + (", ".join(done) if done else "nothing (the preset is the baseline)")
        log.info("%s", text)
        return output(m, stats=text)


NODES = [HastenApplyPreset]
