"""hasten.quant: low-bit quantization of a denoiser's linear layers (core: tensors in, decisions out).

Shaped like torchao's ``quantize_(model, config)``::

    from hasten.quant import Int8WeightOnlyConfig, calibrate, quantize_, dequantize_
    calib = calibrate(model, lambda: model(x))          # a few real forward passes
    report = quantize_(model, Int8WeightOnlyConfig(), calibration=calib)
    print(report.summary())
    dequantize_(model)                                   # the original nn.Linear layers are back

A quantized layer is a real ``nn.Linear`` subclass whose ``weight`` is a :class:`QuantWeight` tensor
subclass holding the packed data: code reading ``layer.weight`` or calling ``F.linear`` keeps working.

Methods: :class:`Int8WeightOnlyConfig` (per-channel int8 + AWQ), :class:`Int4WeightOnlyConfig`
(group-wise packed int4 + AWQ) and :class:`W8A8Config` (smoothed int8 weights and activations).
"""

from __future__ import annotations

from .base import (
    DEFAULT_KEEP_PATTERNS,
    QuantConfig,
    QuantLinear,
    QuantWeight,
    is_quant_linear,
    is_quant_weight,
)
from .calibration import CalibrationData, LayerStats, calibrate, record_activations
from .int4 import Int4Weight, Int4WeightOnlyConfig, Int4WeightOnlyLinear
from .int8 import Int8Weight, Int8WeightOnlyConfig, Int8WeightOnlyLinear
from .quantize import (
    METHOD_NAMES,
    QuantReport,
    WeightMemory,
    as_config,
    check_not_empty,
    config_for,
    dequantize_,
    plan_quantization,
    quant_report,
    quant_state,
    quantize_,
    weight_memory,
)
from .serialize import QuantFileError, load_quantized, save_quantized
from .w8a8 import W8A8Config, W8A8Linear, W8A8Weight

__all__ = [
    "DEFAULT_KEEP_PATTERNS",
    "METHOD_NAMES",
    "Int4Weight",
    "Int8Weight",
    "QuantWeight",
    "W8A8Weight",
    "check_not_empty",
    "config_for",
    "is_quant_linear",
    "is_quant_weight",
    "CalibrationData",
    "Int4WeightOnlyConfig",
    "Int4WeightOnlyLinear",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyLinear",
    "LayerStats",
    "QuantConfig",
    "QuantFileError",
    "QuantLinear",
    "QuantReport",
    "W8A8Config",
    "W8A8Linear",
    "WeightMemory",
    "as_config",
    "calibrate",
    "dequantize_",
    "load_quantized",
    "plan_quantization",
    "quant_report",
    "quant_state",
    "quantize_",
    "record_activations",
    "save_quantized",
    "weight_memory",
]
