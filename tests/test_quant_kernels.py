"""Quantized-GEMM Triton kernels under TRITON_INTERPRET=1 (CPU) against their PyTorch references, and the
quantized linears routed through the kernels (HASTEN_FORCE_TRITON=1) against their CPU path."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py sets it earlier too)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hasten.kernels import quant_gemm as qg  # noqa: E402

if not qg.HAS_TRITON:
    pytest.skip("triton is not installed (pip install 'hasten[kernels]'); kernel tests skipped",
                allow_module_level=True)
if "triton" in sys.modules and type(sys.modules["triton"].language.zeros).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1",
                allow_module_level=True)

from hasten.kernels import _quant_triton as kt  # noqa: E402
from hasten.quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, W8A8Config, quantize_  # noqa: E402

SHAPES = [(5, 96, 70), (33, 128, 64)]  # (M, K, N): ragged M and N exercise the masks


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_dequant_gemm_matches_reference(dtype, m, k, n):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).half()
    bias = torch.randn(n, generator=g).to(dtype)
    y = kt.int8_weight_linear_triton(x, q, scale, bias)
    ref = qg.int8_weight_linear_ref(x.float(), q, scale, bias.float())
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("group", [32, 16])
def test_int4_dequant_gemm_matches_reference(dtype, m, k, n, group):
    g = torch.Generator().manual_seed(k + group)
    x = torch.randn(m, k, generator=g).to(dtype)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half()
    zero = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    y = kt.int4_weight_linear_triton(x, packed, scale, zero, group, None)
    ref = qg.int4_weight_linear_ref(x.float(), packed, scale, zero, group, None)
    torch.testing.assert_close(y.float(), ref, **_tol(dtype))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_int8_gemm_is_exact(m, k, n):
    g = torch.Generator().manual_seed(n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    row, col = torch.rand(m, generator=g), torch.rand(n, generator=g)
    bias = torch.randn(n, generator=g)
    acc = kt.w8a8_linear_triton(a, torch.ones(m), q, torch.ones(n), None, torch.float32)
    assert torch.equal(acc, (a.to(torch.int64) @ q.to(torch.int64).t()).float())  # int32 accumulation
    y = kt.w8a8_linear_triton(a, row, q, col, bias, torch.float32)
    torch.testing.assert_close(y, qg.w8a8_linear_ref(a, row, q, col, bias, torch.float32), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: Int8WeightOnlyConfig(keep_budget=0),
                                  lambda: Int4WeightOnlyConfig(group_size=32, keep_budget=0),
                                  lambda: W8A8Config(keep_budget=0)])
def test_quantized_linear_through_kernels_matches_cpu_path(make, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 64)).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        quantize_(model, make(), calibration=lambda: model(x))
        ref = model(x)
        monkeypatch.setenv("HASTEN_FORCE_TRITON", "1")
        y = model(x)
    assert y.shape == ref.shape == (2, 9, 64)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
