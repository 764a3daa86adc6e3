"""Dense attention forward that also returns the log-sum-exp (LSE) of every query row.

Two implementations of the same maths, ``out = softmax(q k^T * scale) v`` and
``lse_i = log sum_j exp(q_i . k_j * scale)``:
- the Triton flash-attention kernel (online softmax over key tiles, in :mod:`._triton`, with its
  Hopper autotune configurations), used on CUDA tensors when triton is importable;
- :func:`attention_reference`, pure PyTorch, the CPU execution path and the tests' ground truth.
Tensors are laid out (batch, heads, tokens, head_dim).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

_TRITON: ModuleType | None = None
_TRITON_ERROR: str | None = None


def triton_module() -> ModuleType | None:
    """The lazily imported Triton kernels module, or None when triton cannot be imported."""
    global _TRITON, _TRITON_ERROR
    if _TRITON is None and _TRITON_ERROR is None:
        try:
            _TRITON = importlib.import_module(f"{__package__}._triton")
        except Exception as exc:  # ImportError, or a triton build without a usable backend
            _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
    return _TRITON


def triton_available() -> bool:
    return triton_module() is not None


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch attention returning ``(out, lse)``; computed in fp32, queries in chunks to bound memory."""
    s = _scale(q, scale)
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start : start + chunk].float(), kf.transpose(-1, -2)) * s
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def pick_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """'triton' on CUDA tensors when triton imports, else 'torch'; an explicit choice is checked."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"triton backend requested but triton is unavailable ({_TRITON_ERROR})")
    return backend


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention ``(out, lse)`` for (B, H, S, D) tensors; ``lse`` is fp32 (B, H, S_q), natural log."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B,H,Sq,D) and k, v (B,H,Sk,D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if pick_backend(q, backend) == "triton":
        mod = triton_module()
        assert mod is not None
        return mod.attention_fwd(q, k, v, _scale(q, scale), block_m=block_m, block_n=block_n)
    return attention_reference(q, k, v, scale)
