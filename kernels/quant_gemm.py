"""Quantized GEMMs for hasten's quantized linears: fused dequantize-GEMM for int8 / int4 weights and an
int8 x int8 GEMM for W8A8, each as a Triton kernel (GPU) with the PyTorch reference right beside it.

Layouts (shared with the weight classes of :mod:`hasten.quant.int8`, :mod:`~hasten.quant.int4` and :mod:`~hasten.quant.w8a8`):

* int8 weight-only: ``q`` int8 ``[N, K]``, ``scale`` ``[N]``; ``W = q * scale[:, None]``.
* int4 weight-only: ``packed`` uint8 ``[N, K // 2]`` (column ``2j`` in the low nibble, ``2j + 1`` in the
  high nibble), per-group ``scale`` ``[N, K // G]`` and unsigned ``zero`` uint8 ``[N, K // G]``;
  ``W[n, k] = (nibble(n, k) - zero[n, k // G]) * scale[n, k // G]``.
* W8A8: activations int8 ``[M, K]`` with a per-row scale ``[M]`` (ones for static quantization), weights
  int8 ``[N, K]`` with a per-output-channel scale ``[N]``; ``y = (a @ q.T) * row[:, None] * col[None, :]``.

``*_linear`` functions dispatch: Triton on CUDA tensors when Triton is importable, PyTorch otherwise (the
CPU path saves memory but is not faster: it dequantizes the weight on every call).
Set ``HASTEN_FORCE_TRITON=1`` (with ``TRITON_INTERPRET=1`` on CPU) to route through the kernels in tests.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _kernels():
    """The Triton kernels module, imported on first use (so TRITON_INTERPRET set later still applies)."""
    from . import _quant_triton

    return _quant_triton


def _use_triton(x: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if os.environ.get("HASTEN_FORCE_TRITON") == "1":
        return True
    return x.is_cuda


# ----------------------------------------------------------------------------- packing helpers


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values ``[N, K]`` (0..15, K even) two per byte into uint8 ``[N, K // 2]``."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[N, K // 2]`` -> uint8 values 0..15 ``[N, K]``."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ----------------------------------------------------------------------------- PyTorch references


def dequant_int8_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def dequant_int4_ref(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(packed).to(torch.float32)
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    w = (q - zero.to(torch.float32)[..., None]) * scale.to(torch.float32)[..., None]
    return w.view(n, k).to(dtype)


def int8_weight_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (q * scale).T + bias`` by dequantizing the weight to ``x``'s dtype."""
    b = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, dequant_int8_ref(q, scale, x.dtype), b)


def int4_weight_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    b = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, dequant_int4_ref(packed, scale, zero, group_size, x.dtype), b)


def int8_mm_ref(a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ q.T`` for int8 ``a [M, K]`` and ``q [N, K]``."""
    try:
        return torch._int_mm(a, q.t())
    except (RuntimeError, NotImplementedError):  # pragma: no cover - backends without _int_mm
        return a.to(torch.int32) @ q.to(torch.int32).t()


def w8a8_linear_ref(a: torch.Tensor, row_scale: torch.Tensor, q: torch.Tensor, col_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    acc = int8_mm_ref(a, q).to(torch.float32)
    y = acc * row_scale.to(torch.float32)[:, None] * col_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------- dispatch


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]).contiguous(), tuple(x.shape[:-1])


def int8_weight_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with an int8 per-output-channel weight (Triton on CUDA, PyTorch elsewhere)."""
    if not _use_triton(x):
        return int8_weight_linear_ref(x, q, scale, bias)
    x2, lead = _flat(x)
    return _kernels().int8_weight_linear_triton(x2, q, scale, bias).view(*lead, q.shape[0])


def int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a packed group-wise int4 weight (Triton on CUDA, PyTorch elsewhere)."""
    if not _use_triton(x):
        return int4_weight_linear_ref(x, packed, scale, zero, group_size, bias)
    x2, lead = _flat(x)
    return _kernels().int4_weight_linear_triton(x2, packed, scale, zero, group_size, bias).view(*lead, packed.shape[0])


def w8a8_linear(a: torch.Tensor, row_scale: torch.Tensor, q: torch.Tensor, col_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int8 activations ``[M, K]`` x int8 weights ``[N, K]`` with row/column scales, int32 accumulation."""
    if not _use_triton(a):
        return w8a8_linear_ref(a, row_scale, q, col_scale, bias, out_dtype)
    return _kernels().w8a8_linear_triton(a.contiguous(), row_scale.contiguous(), q, col_scale, bias, out_dtype)


# ----------------------------------------------------------------------------- timing

# (tokens M, in K, out N) of DiT linears: Wan 2.1 1.3B / 14B attention and FFN projections at 480p
DIT_SHAPES: tuple[tuple[int, int, int], ...] = ((4096, 1536, 1536), (4096, 1536, 8960), (4096, 5120, 5120),
                                                (4096, 5120, 13824))


def time_quant_gemm(shapes: tuple[tuple[int, int, int], ...] = DIT_SHAPES, device: str = "cuda",
                    dtype: torch.dtype = torch.bfloat16, repeats: int = 20, group_size: int = 128
                    ) -> list[dict[str, float | int | str]]:
    """Median time of ``x @ W.T`` in ``dtype`` vs. the int8 / int4 weight-only and W8A8 GEMMs (whatever
    path :func:`int8_weight_linear` & co. take on ``device``: Triton on CUDA, PyTorch on CPU)."""
    import statistics
    import time
    from functools import partial

    def timed(fn) -> float:
        fn()
        out = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e3

    rows: list[dict[str, float | int | str]] = []
    g = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = (torch.randn(n, k, generator=g) * 0.02).to(device, dtype)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        scale = torch.full((n,), 1e-3, dtype=torch.float16, device=device)
        packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device)
        gscale = torch.full((n, k // group_size), 1e-3, dtype=torch.float16, device=device)
        zero = torch.full((n, k // group_size), 8, dtype=torch.uint8, device=device)
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
        row = torch.ones(m, device=device)
        base = timed(partial(F.linear, x, w))
        times = {
            "int8_weight_only": timed(partial(int8_weight_linear, x, q, scale)),
            "int4_weight_only": timed(partial(int4_weight_linear, x, packed, gscale, zero, group_size)),
            "w8a8_gemm": timed(partial(w8a8_linear, a, row, q, scale.float(), None, dtype)),
        }
        for name, ms in times.items():
            rows.append({"shape": f"{m}x{k}x{n}", "kernel": name, "ms": ms, "baseline_ms": base,
                         "speedup": base / ms, "device": device})
    return rows
