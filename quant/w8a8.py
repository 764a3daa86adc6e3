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
from .base import QuantConfig, QuantLinear, relative_error
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
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"W8A8Config.smooth_alpha must be in [0, 1] or None, got {self.smooth_alpha}")
        if self.activation not in ("static", "dynamic"):
            raise ValueError(f"W8A8Config.activation must be 'static' or 'dynamic', got {self.activation!r}")
        if not self.fallback_ratio >= 1.0:
            raise ValueError(f"W8A8Config.fallback_ratio must be >= 1, got {self.fallback_ratio}")

    def _build(self, w: torch.Tensor, bias: torch.Tensor | None, absmax: torch.Tensor | None,
               alpha: float, mode: str) -> W8A8Linear:
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
        return W8A8Linear(q, scale, bias, mult.float(), mode)

    def quantize_linear(self, linear: nn.Linear, stats: Any | None) -> W8A8Linear:
        w = linear.weight.detach().float()
        bias = linear.bias
        if stats is None or stats.samples.shape[0] == 0:
            return self._build(w, bias, None, 0.0, "dynamic")
        x = stats.samples.to(w.device, torch.float32)
        ref = x @ w.t()
        alphas = [self.smooth_alpha] if self.smooth_alpha is not None else [i / 10 for i in range(11)]
        modes = ["dynamic", "static"] if self.activation == "static" else ["dynamic"]
        best: dict[str, tuple[float, W8A8Linear]] = {}
        for mode in modes:
            for alpha in alphas:
                mod = self._build(w, None, stats.absmax, alpha, mode)
                err = relative_error(ref, mod(x))
                if mode not in best or err < best[mode][0]:
                    best[mode] = (err, mod)
        chosen = best["dynamic"][1]
        if "static" in best and best["static"][0] <= self.fallback_ratio * best["dynamic"][0]:
            chosen = best["static"][1]
        if bias is not None:
            chosen.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return chosen


class W8A8Linear(QuantLinear):
    """``nn.Linear`` replacement computing an int8 x int8 GEMM with per-token or static activation scales."""

    method: ClassVar[str] = "w8a8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor, activation: str) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        if activation not in ("static", "dynamic"):
            raise ValueError(f"activation must be 'static' or 'dynamic', got {activation!r}")
        self.activation = activation
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("input_scale", input_scale.to(torch.float32).contiguous())

    def extra_config(self) -> dict[str, Any]:
        return {"activation": self.activation}

    @classmethod
    def empty(cls, in_features: int, out_features: int, has_bias: bool, bias_dtype: torch.dtype,
              extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> W8A8Linear:
        return cls(tensors["qweight"], tensors["scale"], tensors.get("bias"), tensors["input_scale"],
                   str(extra["activation"]))

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 activations ``[M, K]`` and their per-row scale ``[M]``."""
        xs = x.reshape(-1, x.shape[-1]).float() * self.input_scale
        if self.activation == "static":
            row = torch.ones(xs.shape[0], device=x.device, dtype=torch.float32)
        else:
            row = xs.abs().amax(1).clamp_min(1e-12) / 127.0
            xs = xs / row[:, None]
        return torch.round(xs).clamp_(-127, 127).to(torch.int8), row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, row = self.quantize_input(x)
        y = w8a8_linear(a, row, self.qweight, self.scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequant_int8_ref(self.qweight, self.scale, torch.float32) * self.input_scale[None, :]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"
