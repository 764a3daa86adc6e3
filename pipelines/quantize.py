"""diffusers adapter for hasten's quantization: calibrate on real sampling of the user's pipeline, then
hand the denoiser(s) and the recorded statistics to :func:`hasten.quant.quantize_`.

    pipe.quantize(Int8WeightOnlyConfig(), calibration_prompts=["a cat"], steps=4)
    pipe.dequantize()   # the original linear layers are back
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from ..quant import (
    CalibrationData,
    Int8WeightOnlyConfig,
    QuantConfig,
    QuantReport,
    as_config,
    dequantize_,
    quant_state,
    quantize_,
    record_activations,
)
from .denoiser import find_denoisers
from .registry import Feature, features

FEATURE = "quant"


class QuantFeature(Feature):
    """Quantized denoiser(s) of one pipeline; removing the feature restores the original layers."""

    name = FEATURE

    def __init__(self, modules: dict[str, torch.nn.Module], reports: dict[str, QuantReport]) -> None:
        self.modules = modules
        self.reports = reports

    def remove(self) -> None:
        for module in self.modules.values():
            dequantize_(module)
        self.reports = {}

    def stats(self) -> dict[str, QuantReport]:
        return dict(self.reports)


def calibrate_pipeline(pipe: Any, calibration_prompts: Sequence[str | dict[str, Any]], steps: int = 4,
                       components: Sequence[str] | None = None, max_samples: int = 256,
                       **call_kwargs: Any) -> dict[str, CalibrationData]:
    """Run the pipeline on each calibration prompt for ``steps`` steps (latent output, no decode) while
    recording every denoiser linear layer's inputs. An item may be a prompt string or a dict of call
    arguments (e.g. ``{"prompt_embeds": ...}``); ``call_kwargs`` are passed to every call."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not calibration_prompts:
        raise ValueError("calibration_prompts must name at least one prompt (or dict of call arguments)")
    mods = _denoisers(pipe, components)
    results = {}
    with ExitStack() as stack, torch.no_grad():
        for comp, module in mods.items():
            results[comp] = stack.enter_context(record_activations(module, max_samples=max_samples))
        for i, item in enumerate(calibration_prompts):
            kwargs = {"prompt": item} if isinstance(item, str) else dict(item)
            kwargs.update(call_kwargs)
            kwargs.setdefault("output_type", "latent")
            kwargs.setdefault("generator", torch.Generator().manual_seed(i))
            pipe(num_inference_steps=steps, **kwargs)
    return {comp: get() for comp, get in results.items()}


def _denoisers(pipe: Any, components: Sequence[str] | None) -> dict[str, torch.nn.Module]:
    mods = find_denoisers(pipe)
    if components is not None:
        unknown = [c for c in components if c not in mods]
        if unknown:
            raise ValueError(f"unknown denoiser component(s) {unknown}; this pipeline has {sorted(mods)}")
        mods = {c: mods[c] for c in components}
    return mods


def quantize_pipeline(pipe: Any, config: QuantConfig | None = None,
                      calibration_prompts: Sequence[str | dict[str, Any]] | None = None, steps: int = 4,
                      calibration: CalibrationData | dict[str, CalibrationData] | None = None,
                      components: Sequence[str] | None = None, **call_kwargs: Any) -> Any:
    """Quantize ``pipe``'s denoiser(s) with ``config`` (default :class:`Int8WeightOnlyConfig`).

    With ``calibration_prompts``, the pipeline first samples each for ``steps`` steps and the recorded
    activations drive AWQ / smoothing scales and the sensitive-layer selection; ``calibration`` passes
    statistics recorded earlier instead. Calling it again re-quantizes from the original weights.
    Returns the pipeline; reports are in ``pipe.hasten_stats()["quant"]``.
    """
    config = as_config(config if config is not None else Int8WeightOnlyConfig())
    reg = features(pipe)
    if FEATURE in reg:
        reg.pop(FEATURE).remove()
    mods = _denoisers(pipe, components)
    for comp, module in mods.items():
        if quant_state(module) is not None:
            raise ValueError(f"pipe.{comp} is already quantized outside this pipeline; dequantize_ it first")
    if calibration_prompts is not None and calibration is not None:
        raise TypeError("pass either calibration_prompts or calibration, not both")
    if calibration_prompts is not None:
        calib: dict[str, CalibrationData | None] = dict(
            calibrate_pipeline(pipe, calibration_prompts, steps, list(mods), config.sample_rows, **call_kwargs))
    elif isinstance(calibration, CalibrationData):
        if len(mods) != 1:
            raise ValueError(f"this pipeline has {len(mods)} denoisers {sorted(mods)}: pass calibration as a "
                             "dict by component name")
        calib = {next(iter(mods)): calibration}
    else:
        calib = dict(calibration or {})
    reports = {}
    try:
        for comp, module in mods.items():
            reports[comp] = quantize_(module, config, calibration=calib.get(comp))
    except Exception:
        for module in mods.values():
            dequantize_(module)
        raise
    reg[FEATURE] = QuantFeature(mods, reports)
    return pipe


def dequantize_pipeline(pipe: Any) -> Any:
    """Restore the original (unquantized) denoiser layers of ``pipe``. Returns the pipeline."""
    feat = features(pipe).pop(FEATURE, None)
    if feat is not None:
        feat.remove()
    return pipe
