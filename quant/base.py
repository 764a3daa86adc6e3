"""Shared pieces of hasten's quantization methods: the common config fields, the quantized-linear base
class (storage accounting, serialization hooks) and the activation-aware scale search (AWQ).

Every quantized linear computes ``y = GEMM(x * input_scale, Q) + bias`` where ``input_scale`` (per input
channel) is the inverse of the AWQ / smoothing scale folded into the weight before quantizing it:
``W x = (W / m) (m x)`` is exact before rounding, and a good ``m`` moves rounding error off the
channels that carry large activations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

# Names (regular expressions, searched in the lower-cased module path) of layers carrying the timestep
# embedding or the adaptive-norm modulation computed from it: QuEST finds these most sensitive, so
# they stay in high precision by rule. Covers diffusers' Wan, Flux, SD3, PixArt, HunyuanVideo and UNets.
DEFAULT_KEEP_PATTERNS: tuple[str, ...] = (
    r"time_?emb",  # time_embedding, time_embedder, time_emb_proj (UNet resnets)
    r"timestep",
    r"time_proj",
    r"time_text_embed",
    r"(^|\.)norm1(_context)?\.linear$",  # AdaLayerNormZero
    r"(^|\.)norm\.linear$",  # AdaLayerNormZeroSingle
    r"norm_out\.linear$",  # AdaLayerNormContinuous
    r"ada_?ln",  # adaln_single / adaLN_modulation
    r"modulation",
)


def fit_dtype(t: torch.Tensor) -> torch.Tensor:
    """Store a scale as float16 when that loses only the low mantissa bits, else keep float32."""
    t = t.to(torch.float32)
    a = t.abs()
    if bool(torch.isfinite(t).all()) and float(a.min()) >= 6.2e-5 and float(a.max()) <= 6.0e4:
        return t.to(torch.float16)
    return t


@dataclass
class QuantConfig:
    """Settings shared by every method.

    Attributes:
        keep_patterns: regexes of layer names kept in high precision by rule (timestep embedding and
            modulation layers by default).
        keep_budget: how many of the remaining layers with the largest measured relative output error
            are also kept: a float in [0, 1) is a fraction of the quantizable layers, an int >= 1 a count.
        keep_min_error: a layer is kept for sensitivity only if its relative output MSE is at least this
            (so near-lossless methods such as int8 do not spend memory on layers that do not need it).
        exclude: regexes of layer names never quantized (reported as "excluded").
        restorable: keep the original ``nn.Linear`` modules (offloaded to CPU when they were on an
            accelerator) so :func:`hasten.dequantize_` restores them exactly; ``False`` frees them.
        sample_rows: calibration rows kept per layer to measure quantization error.
        keep_precision: what "kept in high precision" means for rule / sensitivity-kept layers:
            "float" (left as they are) or "int8" (int8 weight-only, float activations: the mixed-precision
            choice for 4-bit and W8A8 methods, where those layers are a large share of a small model).
    """

    method: ClassVar[str] = "base"
    bits: ClassVar[int] = 16

    keep_patterns: tuple[str, ...] = DEFAULT_KEEP_PATTERNS
    keep_budget: float = 0.05
    keep_min_error: float = 1e-4
    exclude: tuple[str, ...] = ()
    restorable: bool = True
    sample_rows: int = 256
    keep_precision: str = "float"

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.keep_patterns = tuple(self.keep_patterns)
        self.exclude = tuple(self.exclude)
        for p in self.keep_patterns + self.exclude:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{name}: invalid layer-name regex {p!r}: {exc}") from exc
        b = self.keep_budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise ValueError(f"{name}.keep_budget must be a fraction in [0, 1) or a count >= 1, got {b!r}")
        if isinstance(b, float) and b >= 1.0 and not b.is_integer():
            raise ValueError(f"{name}.keep_budget must be a fraction in [0, 1) or a whole count, got {b}")
        if not (math.isfinite(self.keep_min_error) and self.keep_min_error >= 0):
            raise ValueError(f"{name}.keep_min_error must be a finite number >= 0, got {self.keep_min_error}")
        if self.sample_rows < 1:
            raise ValueError(f"{name}.sample_rows must be >= 1, got {self.sample_rows}")
        if self.keep_precision not in ("float", "int8"):
            raise ValueError(f"{name}.keep_precision must be 'float' or 'int8', got {self.keep_precision!r}")

    def keep_count(self, n_layers: int) -> int:
        """Number of measured-sensitive layers to keep out of ``n_layers`` quantizable ones."""
        b = self.keep_budget
        if b < 1:
            return min(n_layers, int(math.floor(b * n_layers + 0.5)))
        return min(n_layers, int(b))

    def supports(self, linear: nn.Linear) -> str | None:
        """``None`` if ``linear`` can be quantized by this method, else the reason it cannot."""
        return None

    def quantize_linear(self, linear: nn.Linear, stats: Any | None) -> QuantLinear:  # pragma: no cover
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: getattr(self, k) for k in self.__dataclass_fields__}}


class QuantLinear(nn.Module):
    """Base of the quantized replacements of ``nn.Linear``; subclasses define the buffers and forward."""

    method: ClassVar[str] = "base"
    # buffers whose bytes count as quantization metadata (stored in their own dtype whatever the model's)
    _int_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # the bias stays a (frozen) float Parameter: model code reads a submodule's dtype from its parameters
        # (e.g. diffusers' Wan: ``next(iter(self.time_embedder.parameters())).dtype``)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_config(self) -> dict[str, Any]:
        """Per-layer settings saved next to the tensors (enough to rebuild an empty module)."""
        return {}

    @classmethod
    def empty(cls, in_features: int, out_features: int, has_bias: bool, bias_dtype: torch.dtype,
              extra: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantLinear:  # pragma: no cover
        raise NotImplementedError

    def storage_bytes(self, float_bytes: int = 2) -> int:
        """Bytes of this layer if float activations/biases were ``float_bytes`` wide (bf16 = 2): integer
        weights and quantization scales count at their real size."""
        total = 0
        for name, buf in list(self.named_buffers(recurse=False)) + list(self.named_parameters(recurse=False)):
            if buf is None:
                continue
            if name == "bias":
                total += buf.numel() * float_bytes
            else:
                total += buf.numel() * buf.element_size()
        return total

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover
        """The effective float weight ``W_hat`` such that ``forward(x) ~= x @ W_hat.T + bias`` (fp32)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


def is_quant_linear(module: nn.Module) -> bool:
    """A hasten quantized linear, also one built by another copy of this package (ComfyUI loads the same
    folder under another module name, so ``isinstance`` alone is not enough)."""
    return isinstance(module, QuantLinear) or (
        isinstance(module, nn.Module) and hasattr(module, "qweight") and callable(getattr(module, "storage_bytes", None))
        and callable(getattr(module, "extra_config", None)))


@dataclass
class ScaleSearch:
    """Result of an activation-aware scale search for one layer."""

    alpha: float
    error: float
    errors: dict[float, float] = field(default_factory=dict)


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx||^2 / ||ref||^2 (0 for a perfect match)."""
    num = (ref.float() - approx.float()).pow(2).sum()
    den = ref.float().pow(2).sum().clamp_min(1e-30)
    return float(num / den)


def awq_input_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale ``s = mean|x|^alpha`` normalized to geometric mean 1; returns the
    activation multiplier ``m = 1 / s`` (the weight is multiplied by ``s``)."""
    s = mean_abs.float().clamp_min(1e-8).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return 1.0 / s.clamp(1e-4, 1e4)


def search_awq(weight: torch.Tensor, mean_abs: torch.Tensor, samples: torch.Tensor, grid: int,
               fake_quant) -> tuple[torch.Tensor | None, ScaleSearch]:
    """Grid-search AWQ's exponent: pick the ``alpha`` in ``{0, 1/grid, ..., 1}`` minimizing the layer's
    output error on calibration rows. ``fake_quant(w) -> w_hat`` quantizes and dequantizes a weight.

    Returns the activation multiplier (``None`` when alpha 0, plain quantization, wins) and the search.
    """
    w = weight.float()
    x = samples.to(w.device, torch.float32)
    ref = x @ w.t()
    best: tuple[float, float, torch.Tensor | None] = (math.inf, 0.0, None)
    errors: dict[float, float] = {}
    for i in range(grid + 1):
        alpha = i / grid
        if alpha == 0:
            m = None
            err = relative_error(ref, x @ fake_quant(w).t())
        else:
            m = fit_dtype(awq_input_scale(mean_abs.to(w.device), alpha)).float()
            err = relative_error(ref, (x * m) @ fake_quant(w / m).t())
        errors[alpha] = err
        if err < best[0]:
            best = (err, alpha, m)
    return best[2], ScaleSearch(alpha=best[1], error=best[0], errors=errors)
