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
import os
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


def key_valid(kv_lens: torch.Tensor | None, kv_mask: torch.Tensor | None, seq_k: int,
              device: torch.device) -> torch.Tensor | None:
    """(B, S_k) boolean mask of real keys from per-row key counts and/or a key mask (None: all real)."""
    valid = None
    if kv_lens is not None:
        valid = torch.arange(seq_k, device=device) < kv_lens.to(device).view(-1, 1)
    if kv_mask is not None:
        m = kv_mask.to(device=device, dtype=torch.bool)
        if m.ndim != 2 or m.shape[1] != seq_k:
            raise ValueError(f"kv_mask must be (B, {seq_k}) booleans, got {tuple(kv_mask.shape)}")
        valid = m if valid is None else valid & m
    return valid


def key_padding(kv_lens: torch.Tensor | None, seq_k: int, device: torch.device,
                kv_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, 1, 1, S_k) boolean mask of real keys (None: every key is real)."""
    valid = key_valid(kv_lens, kv_mask, seq_k, device)
    return None if valid is None else valid.view(-1, 1, 1, seq_k)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, chunk: int = 1024,
    kv_lens: torch.Tensor | None = None, kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch attention returning ``(out, lse)``; computed in fp32, queries in chunks to bound memory.

    ``kv_lens`` (B,): keys at or past ``kv_lens[b]`` are padding and ignored for batch row ``b``;
    ``kv_mask`` (B, S_k) bool: False keys are padding. A query that sees no valid key outputs 0 (LSE -inf).
    """
    s = _scale(q, scale)
    kf, vf = k.float(), v.float()
    valid = key_padding(kv_lens, k.shape[2], q.device, kv_mask)
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        logits = torch.matmul(q[:, :, start : start + chunk].float(), kf.transpose(-1, -2)) * s
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def pick_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """'triton' on CUDA tensors when triton imports, else 'torch'; an explicit choice is checked."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "triton":
        problem = triton_problem()
        if problem is None and not q.is_cuda and not interpreting():
            problem = (f"the tensors are on {q.device.type}; the Triton kernels run on CUDA (or on the CPU "
                       "under TRITON_INTERPRET=1, for tests)")
        if problem:
            raise RuntimeError(f"backend='triton' cannot run: {problem}. Use backend='auto' or 'torch'.")
    return backend


def interpreting() -> bool:
    """True when Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_problem() -> str | None:
    """Why the Triton kernels cannot run on this machine (None: they can).

    Needs triton importable and a CUDA GPU, or Triton's CPU interpreter (``TRITON_INTERPRET=1``).
    Checked when a config asks for ``backend="triton"``, so the error comes at enable time.
    """
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU is available (the Triton kernels need one; TRITON_INTERPRET=1 runs them on the CPU " \
               "for tests)"
    if not triton_available():
        return f"triton cannot be imported ({_TRITON_ERROR})"
    return None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    block_m: int | None = None,
    block_n: int | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention ``(out, lse)`` for (B, H, S, D) tensors; ``lse`` is fp32 (B, H, S_q), natural log.

    ``kv_lens`` (B,) optionally marks trailing keys of each batch row as padding; ``kv_mask`` (B, S_k)
    bool marks any padding keys (False).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B,H,Sq,D) and k, v (B,H,Sk,D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if pick_backend(q, backend) == "triton":
        mod = triton_module()
        assert mod is not None
        valid = key_valid(kv_lens, kv_mask, k.shape[2], q.device)
        return mod.attention_fwd(q, k, v, _scale(q, scale), kv_mask=valid, block_m=block_m, block_n=block_n)
    return attention_reference(q, k, v, scale, kv_lens=kv_lens, kv_mask=kv_mask)
