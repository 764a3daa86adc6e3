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
import torch.nn.functional as F
from torch import nn

from ..validation import check_bool, check_choice, check_float, check_int, check_str_tuple

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
        self.keep_patterns = check_str_tuple(name, "keep_patterns", self.keep_patterns)
        self.exclude = check_str_tuple(name, "exclude", self.exclude)
        for p in self.keep_patterns + self.exclude:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{name}: invalid layer-name regex {p!r}: {exc}") from exc
        b = self.keep_budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"{name}.keep_budget must be a fraction in [0, 1) or a count >= 1, got {b!r}")
        b = check_float(name, "keep_budget", b, lo=0.0)
        if b >= 1.0 and not b.is_integer():
            raise ValueError(f"{name}.keep_budget must be a fraction in [0, 1) or a whole count, got {b}")
        self.keep_min_error = check_float(name, "keep_min_error", self.keep_min_error, lo=0.0)
        self.restorable = check_bool(name, "restorable", self.restorable)
        self.sample_rows = check_int(name, "sample_rows", self.sample_rows, lo=1, hi=1 << 20)
        self.keep_precision = check_choice(name, "keep_precision", self.keep_precision, ("float", "int8"))

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


class QuantWeight(torch.Tensor):
    """The weight of a quantized linear, as a tensor: drop-in for code that reads ``layer.weight``.

    A wrapper tensor subclass (torchao's design) with the *logical* shape ``[out, in]``, the original
    float dtype and the device of its integer data, holding the packed tensors (``qweight``, scales, ...)
    inside. ``F.linear(x, w, b)`` runs the quantized GEMM (:meth:`linear`); every other operation sees the
    dequantized float weight (``w.t()``, ``w * 2``, ``w.float().mean()``...); ``.to(device)`` / ``.to(dtype)``
    / ``detach`` / ``clone`` / ``deepcopy`` keep it quantized (a dtype change only changes the float dtype
    it computes in); in-place writes raise (the weight is read-only: dequantize first). ``nbytes`` is the
    real size of the packed data.
    """

    method: ClassVar[str] = "base"
    inner_names: ClassVar[tuple[str, ...]] = ("qweight",)  # tensors held; all but qweight may be None

    @staticmethod
    def __new__(cls, tensors: dict[str, torch.Tensor | None], extra: dict[str, Any], dtype: torch.dtype
                ) -> QuantWeight:
        q = tensors["qweight"]
        assert q is not None
        return torch.Tensor._make_wrapper_subclass(cls, cls.logical_shape(tensors, extra), dtype=dtype,
                                                   device=q.device, requires_grad=False)

    def __init__(self, tensors: dict[str, torch.Tensor | None], extra: dict[str, Any], dtype: torch.dtype) -> None:
        for name in self.inner_names:
            setattr(self, name, tensors.get(name))
        self.extra = dict(extra)

    @classmethod
    def logical_shape(cls, tensors: dict[str, torch.Tensor | None], extra: dict[str, Any]) -> tuple[int, int]:
        q = tensors["qweight"]
        assert q is not None
        return (q.shape[0], q.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors actually held (optional ones that are None left out)."""
        return {n: t for n in self.inner_names if (t := getattr(self, n)) is not None}

    def _rebuild(self, fn: Any, dtype: torch.dtype | None = None) -> QuantWeight:
        return type(self)({n: fn(t) for n, t in self.tensors().items()}, self.extra, dtype or self.dtype)

    # -- what a subclass defines
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The effective float weight ``W_hat`` (``F.linear(x, W_hat, b)`` ~= the quantized linear)."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, self, bias)`` through the quantized kernel."""
        raise NotImplementedError

    # -- storage
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        return self.storage_bytes()

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"{type(self).__name__}(method={self.method}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}, bytes={self.storage_bytes()})")

    # -- torch integration (torch.compile / swap_tensors need flatten/unflatten)
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return list(self.tensors()), (self.dtype, dict(self.extra))

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, torch.Tensor], ctx: tuple, outer_size: Any,
                             outer_stride: Any) -> QuantWeight:
        return cls(dict(inner), ctx[1], ctx[0])

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if is_quant_weight(w) and not is_quant_weight(x) and not (b is not None and is_quant_weight(b)):
                return w.linear(x, b)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._rebuild(lambda t: t)
        if func is aten.clone.default:
            return args[0]._rebuild(lambda t: t.clone())
        if func is aten._to_copy.default and (kwargs.get("dtype") is None or kwargs["dtype"].is_floating_point):
            w = args[0]
            device = kwargs.get("device") or w.device
            nb = bool(kwargs.get("non_blocking", False))
            return w._rebuild(lambda t: t.to(device, non_blocking=nb), kwargs.get("dtype") or w.dtype)
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(arg.name)
                if is_quant_weight(v):
                    raise RuntimeError(
                        f"hasten: the weight of a quantized linear is read-only ({func} would write into it); "
                        "call hasten.dequantize_(module) / pipe.dequantize() first, or replace the parameter")

        def plain(t: Any) -> Any:
            return t.dequantize() if is_quant_weight(t) else t

        return func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})


def is_quant_weight(t: Any) -> bool:
    """A hasten quantized weight, also one made by another copy of this package (ComfyUI loads the same
    folder under another module name)."""
    return isinstance(t, QuantWeight) or (isinstance(t, torch.Tensor) and hasattr(t, "inner_names")
                                          and callable(getattr(t, "linear", None)))


class QuantLinear(nn.Linear):
    """Base of the quantized replacements of ``nn.Linear``: a real ``nn.Linear`` subclass (``isinstance``
    checks hold, ``forward(input=...)`` works) whose ``weight`` parameter is a :class:`QuantWeight` (code
    reading ``layer.weight`` — shape, dtype, device or the tensor — keeps working while memory stays
    quantized). If something replaces ``weight`` by a float parameter (e.g. a LoRA patcher), that runs."""

    method: ClassVar[str] = "base"
    weight_class: ClassVar[type[QuantWeight]] = QuantWeight

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None) -> None:  # noqa: D107
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full float weight
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.weight = nn.Parameter(weight, requires_grad=False)
        # the bias stays a (frozen) float Parameter: model code reads a submodule's dtype from its parameters
        # (e.g. diffusers' Wan: ``next(iter(self.time_embedder.parameters())).dtype``)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the weight comes quantized (nn.Linear's init would write into it)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's argument name
        w = self.weight
        if is_quant_weight(w):
            return w.linear(input, self.bias)
        return F.linear(input, w, self.bias)

    # the packed tensors, by name (read-only views of the weight's data)
    def _inner(self, name: str) -> torch.Tensor | None:
        return getattr(self.weight, name, None)

    @property
    def qweight(self) -> torch.Tensor:
        q = self._inner("qweight")
        if q is None:
            raise AttributeError(f"{type(self).__name__}.weight is no longer quantized ({type(self.weight).__name__})")
        return q

    @property
    def scale(self) -> torch.Tensor | None:
        return self._inner("scale")

    @property
    def input_scale(self) -> torch.Tensor | None:
        return self._inner("input_scale")

    def extra_config(self) -> dict[str, Any]:
        """Per-layer settings saved next to the tensors (enough to rebuild the layer)."""
        return dict(getattr(self.weight, "extra", {}))

    @classmethod
    def check_tensors(cls, in_features: int, out_features: int, extra: dict[str, Any],
                      tensors: dict[str, torch.Tensor]) -> None:  # pragma: no cover - per method
        """Raise ``ValueError`` unless ``tensors`` / ``extra`` are a valid layer of this method and shape."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], dtype: torch.dtype,
                     bias: torch.Tensor | None) -> QuantLinear:
        """Rebuild a layer from its saved packed tensors (``check_tensors`` first)."""
        return cls(cls.weight_class(dict(tensors), extra, dtype), bias)

    def storage_bytes(self, float_bytes: int = 2) -> int:
        """Bytes of this layer if float biases were ``float_bytes`` wide (bf16 = 2): integer weights and
        quantization scales count at their real size."""
        w = self.weight
        total = w.storage_bytes() if is_quant_weight(w) else w.numel() * float_bytes
        if self.bias is not None:
            total += self.bias.numel() * float_bytes
        return total

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float weight ``W_hat`` such that ``forward(x) ~= x @ W_hat.T + bias`` (fp32)."""
        w = self.weight
        return w.dequantize(torch.float32) if is_quant_weight(w) else w.detach().float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method}")


def is_quant_linear(module: Any) -> bool:
    """A hasten quantized linear, also one built by another copy of this package (ComfyUI loads the same
    folder under another module name, so ``isinstance`` alone is not enough)."""
    return isinstance(module, QuantLinear) or (
        isinstance(module, nn.Module) and isinstance(getattr(module, "method", None), str)
        and callable(getattr(module, "storage_bytes", None)) and callable(getattr(module, "extra_config", None))
        and callable(getattr(module, "dequantized_weight", None)))


def check_shape(name: str, t: Any, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    """``ValueError`` unless ``t`` is a tensor of ``shape`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"tensor {name!r} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"tensor {name!r} holds non-finite values")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
