"""Int4 weight-only quantization, group-wise and asymmetric: each group of ``group_size`` input
channels of a row has its own ``scale`` and integer ``zero``, ``W ~= (q - zero) * scale`` with q in
[0, 15], packed two values per byte (so the weight really takes half a byte per element). AWQ's
activation-aware scaling protects the channels with large calibration activations first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels.quant_gemm import dequant_int4_ref, int4_weight_linear, pack_int4
from .base import QuantConfig, QuantLinear, fit_dtype, search_awq


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: returns ``(packed uint8 [N, K/2], scale [N, K/G], zero uint8 [N, K/G])``."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(-1).clamp(max=0.0)
    hi = g.amax(-1).clamp(min=0.0)
    scale = fit_dtype(((hi - lo) / 15.0).clamp_min(1e-12))
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, 15)
    q = torch.round(g / s[..., None] + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scale, zero.to(torch.uint8)


@dataclass
class Int4WeightOnlyConfig(QuantConfig):
    """Int4 weight-only quantization of every ``nn.Linear`` whose input size is a multiple of the group.

    Attributes:
        group_size: input channels sharing one scale/zero pair (even, 8..1024; 128 is the usual choice,
            smaller is more accurate and slightly larger).
        awq_grid: steps of AWQ's exponent search over [0, 1] on calibration rows (0 = off).
        keep_precision: kept layers become int8 weight-only by default ("float" leaves them as they are).
        (plus the shared fields of :class:`~hasten.quant.base.QuantConfig`)
    """

    method: ClassVar[str] = "int4_weight_only"
    bits: ClassVar[int] = 4

    group_size: int = 128
    awq_grid: int = 20
    keep_precision: str = "int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (8 <= self.group_size <= 1024 and self.group_size % 2 == 0):
            raise ValueError(f"Int4WeightOnlyConfig.group_size must be even and in [8, 1024], got {self.group_size}")
        if not 0 <= self.awq_grid <= 1000:
            raise ValueError(f"Int4WeightOnlyConfig.awq_grid must be in [0, 1000], got {self.awq_grid}")

    def supports(self, linear: nn.Linear) -> str | None:
        if linear.in_features % self.group_size:
            return f"in_features {linear.in_features} is not a multiple of group_size {self.group_size}"
        return None

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        packed, scale, zero = quantize_int4_groups(w, self.group_size)
        return dequant_int4_ref(packed, scale, zero, self.group_size, torch.float32)

    def quantize_linear(self, linear: nn.Linear, stats: Any | None) -> Int4WeightOnlyLinear:
        w = linear.weight.detach().float()
        m = None
        if stats is not None and self.awq_grid > 0 and stats.samples.shape[0] > 0:
            m, _ = search_awq(w, stats.mean_abs, stats.samples, self.awq_grid, self.fake_quant)
        packed, scale, zero = quantize_int4_groups(w / m if m is not None else w, self.group_size)
        return Int4WeightOnlyLinear(packed, scale, zero, self.group_size, linear.bias,
                                    None if m is None else fit_dtype(m))


class Int4WeightOnlyLinear(QuantLinear):
    """``nn.Linear`` replacement holding a packed group-wise int4 weight."""

    method: ClassVar[str] = "int4_weight_only"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None = None) -> None:
        super().__init__(packed.shape[1] * 2, packed.shape[0], bias)
        self.group_size = int(group_size)
        self.register_buffer("qweight", packed.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", zero.to(torch.uint8).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.contiguous())

    def extra_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    @classmethod
    def empty(cls, in_features: int, out_features: int, has_bias: bool, bias_dtype: torch.dtype,
              extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Int4WeightOnlyLinear:
        return cls(tensors["qweight"], tensors["scale"], tensors["zero"], int(extra["group_size"]),
                   tensors.get("bias"), tensors.get("input_scale"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return int4_weight_linear(x, self.qweight, self.scale, self.zero, self.group_size, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        w = dequant_int4_ref(self.qweight, self.scale, self.zero, self.group_size, torch.float32)
        return w if self.input_scale is None else w * self.input_scale.float()[None, :]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
