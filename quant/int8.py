"""Int8 weight-only quantization: one scale per output channel, ``W ~= q * scale[:, None]`` with
``q = round(W / scale)`` in [-127, 127] and ``scale = max|W_row| / 127``, after AWQ's activation-aware
per-input-channel scaling (``W x = (W s)(x / s)``, ``s = mean|x|^alpha`` searched on calibration rows).

Activations stay in floating point: on CUDA a fused Triton dequantize-GEMM reads the int8 weight
directly (half the weight bytes of bf16), on CPU the weight is dequantized per call (smaller, not faster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels.quant_gemm import dequant_int8_ref, int8_weight_linear
from .base import QuantConfig, QuantLinear, fit_dtype, search_awq


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns ``(q int8 [N, K], scale [N])`` (scale stored as fp16 when exact enough)."""
    w = w.float()
    scale = fit_dtype(w.abs().amax(1).clamp_min(1e-12) / 127.0)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_int8_rows(w)
    return dequant_int8_ref(q, scale, torch.float32)


@dataclass
class Int8WeightOnlyConfig(QuantConfig):
    """Int8 weight-only quantization of every ``nn.Linear`` (per output channel).

    Attributes:
        awq_grid: number of steps of AWQ's exponent search over [0, 1] on calibration rows (0 = no
            activation-aware scaling; needs calibration data otherwise it is skipped).
        (plus the shared fields of :class:`~hasten.quant.base.QuantConfig`)
    """

    method: ClassVar[str] = "int8_weight_only"
    bits: ClassVar[int] = 8

    awq_grid: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.awq_grid <= 1000:
            raise ValueError(f"Int8WeightOnlyConfig.awq_grid must be in [0, 1000], got {self.awq_grid}")
        if self.keep_precision != "float":
            raise ValueError("Int8WeightOnlyConfig.keep_precision must be 'float' (int8 is this method itself)")

    def quantize_linear(self, linear: nn.Linear, stats: Any | None) -> Int8WeightOnlyLinear:
        w = linear.weight.detach().float()
        m = None
        if stats is not None and self.awq_grid > 0 and stats.samples.shape[0] > 0:
            m, _ = search_awq(w, stats.mean_abs, stats.samples, self.awq_grid, fake_quant_int8)
        q, scale = quantize_int8_rows(w / m if m is not None else w)
        return Int8WeightOnlyLinear(q, scale, linear.bias, None if m is None else fit_dtype(m))


class Int8WeightOnlyLinear(QuantLinear):
    """``nn.Linear`` replacement holding an int8 per-channel weight (and an optional AWQ input scale)."""

    method: ClassVar[str] = "int8_weight_only"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.contiguous())

    @classmethod
    def empty(cls, in_features: int, out_features: int, has_bias: bool, bias_dtype: torch.dtype,
              extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Int8WeightOnlyLinear:
        return cls(tensors["qweight"], tensors["scale"], tensors.get("bias"), tensors.get("input_scale"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return int8_weight_linear(x, self.qweight, self.scale, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        w = dequant_int8_ref(self.qweight, self.scale, torch.float32)
        return w if self.input_scale is None else w * self.input_scale.float()[None, :]
