"""W8A8: int8 weights and int8 activations with an int8 x int8 GEMM (int32 accumulation).

Smoothing (SmoothQuant's migration, in the direction of MergeQuant's static per-channel calibration)
divides each input channel j by ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` and multiplies the
weight column by it, moving activation outliers into the weights. Two activation modes:

* static (MergeQuant's quantization-step migration): the per-channel activation step ``s_j * d``
  (``d`` = calibrated range of the smoothed activation / 127) is folded into the weight, so at run
  time ``a = round(x_j / (s_j d))`` and ``y = col_scale * (a @ q.T)``; no per-call reductions.
* dynamic per-token (the fallback): ``a = round(x' / r_t)`` with ``r_t = max|x'_t| / 127`` per row.

A layer falls back to dynamic when it has no calibration data or when its static error on the
calibration rows exceeds ``fallback_ratio`` times the dynamic error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels.quant_gemm import dequant_int8_ref, w8a8_linear
from ..validation import check_choice, check_float
from .base import FLOAT_DTYPES, QuantConfig, QuantLinear, QuantWeight, check_shape, relative_error
from .int8 import quantize_int8_rows


@dataclass
class W8A8Config(QuantConfig):
    """Int8 weights and int8 activations for every ``nn.Linear``.

    Attributes:
        smooth_alpha: migration strength in [0, 1] (0 = no smoothing, 0.5 = SmoothQuant's default);
            ``None`` searches {0, 0.1, ..., 1} per layer on the calibration rows.
        activation: "static" (calibrated per-channel steps folded into the weights, dynamic fallback
            per layer) or "dynamic" (per-token scales everywhere).
        fallback_ratio: a layer uses dynamic per-token scales when its static calibration error is more
            than this many times the dynamic one (>= 1).
        keep_precision: kept layers become int8 weight-only (float activations) by default; "float" leaves
            them as they are.
        (plus the shared fields of :class:`~hasten.quant.base.QuantConfig`)
    """

    method: ClassVar[str] = "w8a8"
    bits: ClassVar[int] = 8

    smooth_alpha: float | None = 0.5
    activation: str = "static"
    fallback_ratio: float = 1.5
    keep_precision: str = "int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.smooth_alpha is not None:
            self.smooth_alpha = check_float(name, "smooth_alpha", self.smooth_alpha)
            if not 0.0 <= self.smooth_alpha <= 1.0:
                raise ValueError(f"{name}.smooth_alpha must be in [0, 1] or None, got {self.smooth_alpha}")
        self.activation = check_choice(name, "activation", self.activation, ("static", "dynamic"))
        self.fallback_ratio = check_float(name, "fallback_ratio", self.fallback_ratio, lo=1.0)

    def _build(self, w: torch.Tensor, bias: torch.Tensor | None, absmax: torch.Tensor | None,
               alpha: float, mode: str, dtype: torch.dtype = torch.float32) -> W8A8Linear:
        if absmax is None:
            mult = torch.ones(w.shape[1], device=w.device)
        else:
            s = (absmax.to(w.device).clamp_min(1e-5).pow(alpha)
                 / w.abs().amax(0).clamp_min(1e-5).pow(1.0 - alpha)).clamp(1e-4, 1e4)
            mult = 1.0 / s
        if mode == "static":
            assert absmax is not None
            d = float((absmax.to(w.device) * mult).max().clamp_min(1e-8)) / 127.0
            mult = mult / d
        q, scale = quantize_int8_rows(w / mult[None, :])
        return W8A8Linear(q, scale, bias, mult.float(), mode, dtype=dtype)

    def quantize_linear(self, linear: nn.Linear, stats: Any | None) -> W8A8Linear:
        w = linear.weight.detach().float()
        bias = linear.bias
        if stats is None or stats.samples.shape[0] == 0:
            return self._build(w, bias, None, 0.0, "dynamic", linear.weight.dtype)
        x = stats.samples.to(w.device, torch.float32)
        ref = x @ w.t()
        alphas = [self.smooth_alpha] if self.smooth_alpha is not None else [i / 10 for i in range(11)]
        modes = ["dynamic", "static"] if self.activation == "static" else ["dynamic"]
        best: dict[str, tuple[float, W8A8Linear]] = {}
        for mode in modes:
            for alpha in alphas:
                mod = self._build(w, None, stats.absmax, alpha, mode, linear.weight.dtype)
                err = relative_error(ref, mod(x))
                if mode not in best or err < best[mode][0]:
                    best[mode] = (err, mod)
        chosen = best["dynamic"][1]
        if "static" in best and best["static"][0] <= self.fallback_ratio * best["dynamic"][0]:
            chosen = best["static"][1]
        if bias is not None:
            chosen.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return chosen


class W8A8Weight(QuantWeight):
    """Int8 weight of a W8A8 layer: ``qweight`` int8 ``[N, K]``, ``scale`` ``[N]``, ``input_scale`` fp32
    ``[K]`` (smoothing, and for static activations the quantization step); ``extra = {"activation": ...}``.
    ``F.linear`` quantizes the input to int8 and runs the int8 x int8 GEMM."""

    method: ClassVar[str] = "w8a8"
    inner_names: ClassVar[tuple[str, ...]] = ("qweight", "scale", "input_scale")

    @property
    def activation(self) -> str:
        return str(self.extra["activation"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        w = dequant_int8_ref(self.qweight, self.scale, torch.float32) * self.input_scale.float()[None, :]
        return w.to(dtype or self.dtype)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 activations ``[M, K]`` and their per-row scale ``[M]``."""
        xs = x.reshape(-1, x.shape[-1]).float() * self.input_scale
        if self.activation == "static":
            row = torch.ones(xs.shape[0], device=x.device, dtype=torch.float32)
        else:
            row = xs.abs().amax(1).clamp_min(1e-12) / 127.0
            xs = xs / row[:, None]
        return torch.round(xs).clamp_(-127, 127).to(torch.int8), row

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a, row = self.quantize_input(x)
        y = w8a8_linear(a, row, self.qweight, self.scale, bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.shape[0])


class W8A8Linear(QuantLinear):
    """``nn.Linear`` replacement computing an int8 x int8 GEMM with per-token or static activation scales."""

    method: ClassVar[str] = "w8a8"
    weight_class: ClassVar[type[QuantWeight]] = W8A8Weight

    def __init__(self, qweight: torch.Tensor | W8A8Weight, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 activation: str = "dynamic", dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(qweight, W8A8Weight):
            if activation not in ("static", "dynamic"):
                raise ValueError(f"activation must be 'static' or 'dynamic', got {activation!r}")
            assert scale is not None and input_scale is not None
            qweight = W8A8Weight({"qweight": qweight.to(torch.int8).contiguous(), "scale": scale.contiguous(),
                                  "input_scale": input_scale.to(torch.float32).contiguous()},
                                 {"activation": activation}, dtype)
        super().__init__(qweight, bias)

    @property
    def activation(self) -> str:
        return str(self.extra_config()["activation"])

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.quantize_input(x)

    @classmethod
    def check_tensors(cls, in_features: int, out_features: int, extra: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> None:
        if set(extra) != {"activation"} or extra["activation"] not in ("static", "dynamic"):
            raise ValueError(f"w8a8 layers need activation 'static' or 'dynamic', got {extra!r}")
        check_shape("qweight", tensors.get("qweight"), (out_features, in_features), (torch.int8,))
        check_shape("scale", tensors.get("scale"), (out_features,), FLOAT_DTYPES)
        check_shape("input_scale", tensors.get("input_scale"), (in_features,), (torch.float32,))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], dtype: torch.dtype,
                     bias: torch.Tensor | None) -> QuantLinear:
        return cls(W8A8Weight(dict(tensors), extra, dtype), bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"
