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
from ..validation import check_int
from .base import FLOAT_DTYPES, QuantConfig, QuantLinear, QuantWeight, check_shape, fit_dtype, search_awq


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
        name = type(self).__name__
        self.group_size = check_int(name, "group_size", self.group_size)
        if not (8 <= self.group_size <= 1024 and self.group_size % 2 == 0):
            raise ValueError(f"{name}.group_size must be even and in [8, 1024], got {self.group_size}")
        self.awq_grid = check_int(name, "awq_grid", self.awq_grid, lo=0, hi=1000)

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
                                    None if m is None else fit_dtype(m), dtype=linear.weight.dtype)


class Int4Weight(QuantWeight):
    """Packed group-wise int4 weight: ``qweight`` uint8 ``[N, K / 2]``, ``scale`` / ``zero`` ``[N, K / G]``,
    optional AWQ ``input_scale`` ``[K]``; ``extra = {"group_size": G}``."""

    method: ClassVar[str] = "int4_weight_only"
    inner_names: ClassVar[tuple[str, ...]] = ("qweight", "scale", "zero", "input_scale")

    @classmethod
    def logical_shape(cls, tensors: dict[str, torch.Tensor | None], extra: dict[str, Any]) -> tuple[int, int]:
        q = tensors["qweight"]
        assert q is not None
        return (q.shape[0], q.shape[1] * 2)

    @property
    def group_size(self) -> int:
        return int(self.extra["group_size"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        w = dequant_int4_ref(self.qweight, self.scale, self.zero, self.group_size, torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale.float()[None, :]
        return w.to(dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return int4_weight_linear(x, self.qweight, self.scale, self.zero, self.group_size, bias)


class Int4WeightOnlyLinear(QuantLinear):
    """``nn.Linear`` replacement holding a packed group-wise int4 weight."""

    method: ClassVar[str] = "int4_weight_only"
    weight_class: ClassVar[type[QuantWeight]] = Int4Weight

    def __init__(self, packed: torch.Tensor | Int4Weight, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None, group_size: int = 0, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(packed, Int4Weight):
            assert scale is not None and zero is not None
            packed = Int4Weight({"qweight": packed.to(torch.uint8).contiguous(), "scale": scale.contiguous(),
                                 "zero": zero.to(torch.uint8).contiguous(),
                                 "input_scale": None if input_scale is None else input_scale.contiguous()},
                                {"group_size": int(group_size)}, dtype)
        super().__init__(packed, bias)

    @property
    def group_size(self) -> int:
        return int(self.extra_config()["group_size"])

    @property
    def zero(self) -> torch.Tensor | None:
        return self._inner("zero")

    @classmethod
    def check_tensors(cls, in_features: int, out_features: int, extra: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> None:
        if set(extra) != {"group_size"}:
            raise ValueError(f"int4 layers take exactly the setting 'group_size', got {sorted(extra)}")
        g = extra["group_size"]
        if isinstance(g, bool) or not isinstance(g, int) or not (8 <= g <= 1024 and g % 2 == 0):
            raise ValueError(f"int4 group_size must be an even integer in [8, 1024], got {g!r}")
        if in_features % g:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {g}")
        check_shape("qweight", tensors.get("qweight"), (out_features, in_features // 2), (torch.uint8,))
        check_shape("scale", tensors.get("scale"), (out_features, in_features // g), FLOAT_DTYPES)
        check_shape("zero", tensors.get("zero"), (out_features, in_features // g), (torch.uint8,))
        if "input_scale" in tensors:
            check_shape("input_scale", tensors["input_scale"], (in_features,), FLOAT_DTYPES)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], dtype: torch.dtype,
                     bias: torch.Tensor | None) -> QuantLinear:
        return cls(Int4Weight(dict(tensors), extra, dtype), bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
