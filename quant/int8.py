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
from ..validation import check_int
from .base import FLOAT_DTYPES, QuantConfig, QuantLinear, QuantWeight, check_shape, fit_dtype, search_awq


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
        self.awq_grid = check_int(type(self).__name__, "awq_grid", self.awq_grid, lo=0, hi=1000)
        if self.keep_precision != "float":
            raise ValueError("Int8WeightOnlyConfig.keep_precision must be 'float' (int8 is this method itself)")

    def quantize_linear(self, linear: nn.Linear, stats: Any | None) -> Int8WeightOnlyLinear:
        w = linear.weight.detach().float()
        m = None
        if stats is not None and self.awq_grid > 0 and stats.samples.shape[0] > 0:
            m, _ = search_awq(w, stats.mean_abs, stats.samples, self.awq_grid, fake_quant_int8)
        q, scale = quantize_int8_rows(w / m if m is not None else w)
        return Int8WeightOnlyLinear(q, scale, linear.bias, None if m is None else fit_dtype(m),
                                    dtype=linear.weight.dtype)


class Int8Weight(QuantWeight):
    """Int8 per-output-channel weight: ``qweight`` int8 ``[N, K]``, ``scale`` ``[N]``, optional AWQ
    ``input_scale`` ``[K]`` (``W_hat = qweight * scale[:, None] * input_scale[None, :]``)."""

    method: ClassVar[str] = "int8_weight_only"
    inner_names: ClassVar[tuple[str, ...]] = ("qweight", "scale", "input_scale")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        w = dequant_int8_ref(self.qweight, self.scale, torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale.float()[None, :]
        return w.to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return int8_weight_linear(x, self.qweight, self.scale, bias)


class Int8WeightOnlyLinear(QuantLinear):
    """``nn.Linear`` replacement holding an int8 per-channel weight (and an optional AWQ input scale)."""

    method: ClassVar[str] = "int8_weight_only"
    weight_class: ClassVar[type[QuantWeight]] = Int8Weight

    def __init__(self, qweight: torch.Tensor | Int8Weight, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(qweight, Int8Weight):
            assert scale is not None
            qweight = Int8Weight({"qweight": qweight.to(torch.int8).contiguous(), "scale": scale.contiguous(),
                                  "input_scale": None if input_scale is None else input_scale.contiguous()},
                                 {}, dtype)
        super().__init__(qweight, bias)

    @classmethod
    def check_tensors(cls, in_features: int, out_features: int, extra: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> None:
        if extra:
            raise ValueError(f"int8 layers take no settings, got {sorted(extra)}")
        check_shape("qweight", tensors.get("qweight"), (out_features, in_features), (torch.int8,))
        check_shape("scale", tensors.get("scale"), (out_features,), FLOAT_DTYPES)
        if "input_scale" in tensors:
            check_shape("input_scale", tensors["input_scale"], (in_features,), FLOAT_DTYPES)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], dtype: torch.dtype,
                     bias: torch.Tensor | None) -> QuantLinear:
        return cls(Int8Weight(dict(tensors), extra, dtype), bias=bias)
