"""ComfyUI adapter for hasten's quantization: node "Quantize Model (hasten)".

The core (:func:`hasten.quant.plan_quantization`) decides which linear layers of the MODEL's diffusion
model to quantize and builds their replacements; this adapter installs them as *object patches* on a
cloned ModelPatcher, so ComfyUI swaps them in when the patched model is loaded and puts the original
layers back when it is unpatched (the original MODEL and its weights are never modified).
Calibration comes from a saved :class:`hasten.quant.CalibrationData` file (``CalibrationData.save`` /
``pipe``-side ``calibrate_pipeline``) or is skipped (no AWQ scaling; W8A8 uses dynamic per-token scales).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import UnsupportedModelError
from ..quant import (
    CalibrationData,
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    QuantReport,
    W8A8Config,
    plan_quantization,
)

log = logging.getLogger("hasten")

HOLDER_KEY = "hasten_quant"  # model_options["transformer_options"] entry: the node's report
METHODS = ("int8_weight_only", "int4_weight_only", "w8a8")


def report(model: Any) -> QuantReport | None:
    """The quantization report of a MODEL patched by the node (None if it is not)."""
    return model.model_options.get("transformer_options", {}).get(HOLDER_KEY)


def make_config(method: str, group_size: int = 64, keep_budget: float = 0.05) -> QuantConfig:
    if method == "int8_weight_only":
        return Int8WeightOnlyConfig(keep_budget=keep_budget)
    if method == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=group_size, keep_budget=keep_budget)
    if method == "w8a8":
        return W8A8Config(keep_budget=keep_budget)
    raise ValueError(f"unknown quantization method {method!r}; choose one of {METHODS}")


def patch_model(model: Any, config: QuantConfig, calibration: CalibrationData | None = None) -> Any:
    """A clone of ``model`` whose diffusion model's selected linears are quantized (as object patches)."""
    inner = getattr(model, "model", None)
    dm = getattr(inner, "diffusion_model", None)
    if dm is None or not hasattr(model, "add_object_patch"):
        msg = (f"Quantize Model (hasten) needs a ComfyUI diffusion MODEL (a ModelPatcher whose model has a "
               f"diffusion_model, e.g. Wan/Flux/SD3/SDXL); got {type(inner).__name__}")
        log.error(msg)
        raise UnsupportedModelError(msg)
    m = model.clone()
    prev = report(m)
    if prev is not None:  # re-quantizing a quantized MODEL replaces the previous patches, never stacks
        for name in prev.quantized:
            m.object_patches.pop(f"diffusion_model.{name}", None)
    plan, rep = plan_quantization(dm, config, calibration)
    for name, ql in plan.items():
        m.add_object_patch(f"diffusion_model.{name}", ql)
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = rep
    log.info("Quantize Model (hasten): %s", rep.summary().replace("\n", "; "))
    return m


class HastenQuantize:
    """Node "Quantize Model (hasten)": low-bit linear layers for the diffusion model."""

    CATEGORY = "hasten"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("Quantizes the diffusion model's linear layers (int8 / group-wise int4 weight-only, or W8A8), "
                   "keeping timestep/modulation layers and the most error-sensitive ones in high precision. "
                   "Applied as model patches: the original weights come back when the patch is removed.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL",),
                "method": (list(METHODS), {"default": "int8_weight_only"}),
                "group_size": ("INT", {"default": 64, "min": 8, "max": 1024, "step": 8,
                                       "tooltip": "int4 only: input channels sharing one scale"}),
                "keep_budget": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.99, "step": 0.01,
                                          "tooltip": "fraction of layers with the largest measured error kept"}),
            },
            "optional": {
                "calibration_file": ("STRING", {"default": "", "tooltip": "a hasten calibration .safetensors "
                                                "(empty = no calibration)"}),
            },
        }

    def patch(self, model: Any, method: str, group_size: int = 64, keep_budget: float = 0.05,
              calibration_file: str = "") -> tuple:
        config = make_config(method, group_size, keep_budget)
        calibration = None
        if calibration_file:
            if not os.path.isfile(calibration_file):
                raise FileNotFoundError(f"Quantize Model (hasten): no calibration file at {calibration_file!r}")
            calibration = CalibrationData.load(calibration_file)
        return (patch_model(model, config, calibration),)


NODE_CLASS_MAPPINGS = {"HastenQuantize": HastenQuantize}
NODE_DISPLAY_NAME_MAPPINGS = {"HastenQuantize": "Quantize Model (hasten)"}
