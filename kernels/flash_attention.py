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


def key_padding(kv_lens: torch.Tensor | None, seq_k: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1, 1, S_k) boolean mask of real keys from per-row key counts (None: every key is real)."""
    if kv_lens is None:
        return None
    return (torch.arange(seq_k, device=device) < kv_lens.to(device).view(-1, 1)).view(-1, 1, 1, seq_k)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, chunk: int = 1024,
    kv_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch attention returning ``(out, lse)``; computed in fp32, queries in chunks to bound memory.

    ``kv_lens`` (B,): keys at or past ``kv_lens[b]`` are padding and ignored for batch row ``b``.
    """
    s = _scale(q, scale)
    kf, vf = k.float(), v.float()
    valid = key_padding(kv_lens, k.shape[2], q.device)
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start : start + chunk].float(), kf.transpose(-1, -2)) * s
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
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
    kv_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention ``(out, lse)`` for (B, H, S, D) tensors; ``lse`` is fp32 (B, H, S_q), natural log.

    ``kv_lens`` (B,) optionally marks trailing keys of each batch row as padding.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B,H,Sq,D) and k, v (B,H,Sk,D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if pick_backend(q, backend) == "triton":
        mod = triton_module()
        assert mod is not None
        return mod.attention_fwd(q, k, v, _scale(q, scale), kv_lens=kv_lens, block_m=block_m, block_n=block_n)
    return attention_reference(q, k, v, scale, kv_lens=kv_lens)
