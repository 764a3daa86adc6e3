"""Triton attention kernels: one flash-attention forward (online softmax over key tiles) used dense or
block-sparse, returning the output and the natural-log log-sum-exp of every query row.

This module imports triton and defines the kernels at import time, so it is loaded lazily by
:mod:`hasten.kernels.flash_attention` / :mod:`hasten.kernels.block_sparse` on first Triton use (that
is also when ``TRITON_INTERPRET=1`` takes effect for CPU testing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Hopper (H100/H200) autotune space: large query tiles with 8 warps and 3-4 stage pipelines win for head
# dim 128; 64-wide tiles are kept for head dim 64 and short sequences.
HOPPER_DENSE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 128, 8, 3),
        (128, 64, 8, 3),
        (128, 64, 4, 4),
        (128, 128, 8, 2),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
    ]
]
# The block-sparse kernel's tiles are fixed by the pattern's block size; only warps/stages are tuned.
HOPPER_SPARSE_CONFIGS = [
    triton.Config({}, num_warps=w, num_stages=s) for w, s in [(8, 3), (8, 2), (4, 4), (4, 3), (8, 4)]
]


@triton.jit
def _attn_fwd(
    Q, K, V, Out, LSE, KV_NUM, KV_IDX, KV_OK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_lb, s_lh,
    s_nb, s_nh, s_nm,
    s_ib, s_ih, s_im,
    s_okb,
    H, SEQ_Q, SEQ_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    seq_k = SEQ_K
    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < SEQ_Q) & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        n_iter = tl.load(KV_NUM + b * s_nb + h * s_nh + pid_m * s_nm)
    else:
        n_iter = tl.cdiv(seq_k, BLOCK_N)
    idx_base = KV_IDX + b * s_ib + h * s_ih + pid_m * s_im
    for it in range(0, n_iter):
        if SPARSE:
            start_n = tl.load(idx_base + it) * BLOCK_N  # only the listed key blocks are visited
        else:
            start_n = it * BLOCK_N
        kn = start_n + offs_n
        n_ok = kn < seq_k
        if HAS_KV_MASK:  # per-row key-padding mask (text padding of joint attention)
            n_ok = n_ok & (tl.load(KV_OK + b * s_okb + kn, mask=n_ok, other=0) != 0)
        k = tl.load(
            K + b * s_kb + h * s_kh + kn[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )
        v = tl.load(
            V + b * s_vb + h * s_vh + kn[:, None] * s_vn + offs_d[None, :] * s_vd,
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )
        qk = tl.dot(q, k) * qk_scale  # base-2 logits
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of padding only: no NaN
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a query that sees no valid key: output 0 (as PyTorch SDPA)
    acc = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    o_ptrs = Out + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < SEQ_Q) & d_ok[None, :])
    tl.store(LSE + b * s_lb + h * s_lh + offs_m, lse, mask=offs_m < SEQ_Q)


_dense_tuned = triton.autotune(configs=HOPPER_DENSE_CONFIGS, key=["SEQ_Q", "SEQ_K", "HEAD_DIM"])(_attn_fwd)
_sparse_tuned = triton.autotune(configs=HOPPER_SPARSE_CONFIGS, key=["SEQ_Q", "SEQ_K", "HEAD_DIM", "BLOCK_M"])(
    _attn_fwd
)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    kv_num_blocks: torch.Tensor | None = None,
    kv_indices: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on (B, H, S, D) tensors; sparse when ``kv_num_blocks``/``kv_indices`` are given.

    ``kv_mask`` (B, S_k) bool: False keys are padding for that batch row (ignored by every query).

    Dense launches on GPU are autotuned over :data:`HOPPER_DENSE_CONFIGS`; under the interpreter (or when
    ``block_m``/``block_n`` are given) a fixed tile is used.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    interp = _interpreting()
    orig_dtype = q.dtype
    if interp and q.dtype == torch.bfloat16:  # numpy has no bf16: compute in fp32 on the CPU interpreter
        q, k, v = q.float(), k.float(), v.float()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    sparse = kv_num_blocks is not None
    if sparse:
        num, idx = kv_num_blocks.to(torch.int32), kv_indices.to(torch.int32)
    else:
        num = idx = torch.zeros((1, 1, 1, 1), device=q.device, dtype=torch.int32)
    block_d = max(16, triton.next_power_of_2(D))
    if kv_mask is not None:
        ok = kv_mask.to(device=q.device, dtype=torch.int8).contiguous()
    else:
        ok = torch.zeros((1, 1), device=q.device, dtype=torch.int8)
    args = (
        q, k, v, out, lse, num, idx, ok,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1),
        num.stride(0), num.stride(1), num.stride(2),
        idx.stride(0), idx.stride(1), idx.stride(2),
        ok.stride(0),
        H, Sq, Sk, scale * LOG2E,
    )
    common = {"HEAD_DIM": D, "BLOCK_D": block_d, "SPARSE": sparse, "HAS_KV_MASK": kv_mask is not None}
    if sparse:
        bm, bn = block_m, block_n
        grid = (triton.cdiv(Sq, bm), B * H)
        if interp:
            _attn_fwd[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **common)
        else:
            _sparse_tuned[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **common)
    elif interp or block_m is not None:
        bm, bn = block_m or 32, block_n or 32
        _attn_fwd[(triton.cdiv(Sq, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **common)
    else:
        _dense_tuned[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)](*args, **common)
    return out.to(orig_dtype), lse
