"""Triton kernels behind :mod:`hasten.kernels.quant_gemm` (fused dequantize-GEMM for int8 / int4 weights,
int8 x int8 GEMM). Imported lazily on first Triton use, so ``TRITON_INTERPRET=1`` set by a test takes effect.
Layouts and PyTorch references: see :mod:`hasten.kernels.quant_gemm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_dequant_gemm_kernel(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                              sxm, sxk, sqn, sqk, sym, syn,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        q = tl.load(q_ptr + rn[None, :] * sqn + kk[:, None] * sqk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc += tl.dot(x, q.to(x.dtype))
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))

@triton.jit
def _int4_dequant_gemm_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G,
                              sxm, sxk, spn, spk, ssn, ssg, sym, syn,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_KH: tl.constexpr):
    # BLOCK_KH packed bytes = 2 * BLOCK_KH weight columns per step: even columns come from the low
    # nibbles, odd ones from the high nibbles, so x is read as its even and odd columns.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_KH)
    KH = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, KH, BLOCK_KH):
        jj = j0 + rj
        mx = (rm[:, None] < M) & (jj[None, :] < KH)
        x_even = tl.load(x_ptr + rm[:, None] * sxm + (2 * jj)[None, :] * sxk, mask=mx, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * sxm + (2 * jj + 1)[None, :] * sxk, mask=mx, other=0.0)
        mw = (rn[None, :] < N) & (jj[:, None] < KH)
        p = tl.load(p_ptr + rn[None, :] * spn + jj[:, None] * spk, mask=mw, other=0).to(tl.int32)
        g = (2 * jj[:, None]) // G
        s = tl.load(s_ptr + rn[None, :] * ssn + g * ssg, mask=mw, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[None, :] * ssn + g * ssg, mask=mw, other=0).to(tl.float32)
        w_lo = (((p & 0xF).to(tl.float32) - z) * s).to(x_even.dtype)
        w_hi = (((p >> 4).to(tl.float32) - z) * s).to(x_even.dtype)
        acc += tl.dot(x_even, w_lo)
        acc += tl.dot(x_odd, w_hi)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))

@triton.jit
def _int8_gemm_kernel(a_ptr, q_ptr, rs_ptr, cs_ptr, b_ptr, y_ptr, M, N, K,
                      sam, sak, sqn, sqk, sym, syn,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        q = tl.load(q_ptr + rn[None, :] * sqn + kk[:, None] * sqk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        acc += tl.dot(a, q, out_dtype=tl.int32)
    rs = tl.load(rs_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
    cs = tl.load(cs_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * rs[:, None] * cs[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(m: int) -> tuple[int, int, int]:
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    return block_m, 64, 64


def int8_weight_linear_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                              bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bm, bn, bk = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_dequant_gemm_kernel[grid](x, q, scale, bias if bias is not None else scale, y, m, n, k,
                                    x.stride(0), x.stride(1), q.stride(0), q.stride(1),
                                    y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y


def int4_weight_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                              group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bm, bn, _ = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int4_dequant_gemm_kernel[grid](x, packed, scale, zero, bias if bias is not None else scale, y,
                                    m, n, k, group_size, x.stride(0), x.stride(1),
                                    packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
                                    y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=32)
    return y


def w8a8_linear_triton(a: torch.Tensor, row_scale: torch.Tensor, q: torch.Tensor, col_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = q.shape[0]
    y = torch.empty((m, n), device=a.device, dtype=out_dtype)
    bm, bn, bk = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int8_gemm_kernel[grid](a, q, row_scale, col_scale, bias if bias is not None else col_scale, y, m, n, k,
                            a.stride(0), a.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1),
                            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y


