"""``hasten bench-kernels``: time dense attention (hasten's kernel vs. PyTorch SDPA) and block-sparse
attention at several block sparsities over sequence lengths; prints TFLOP/s and ratios.

On CUDA the Triton kernels run (SDPA is pinned to its flash backend when available); on CPU the
PyTorch reference path runs, and its figures only show the code works, not kernel speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .block_sparse import BlockSparsePattern, block_sparse_attention
from .flash_attention import flash_attention, pick_backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help="token counts (default: 4K..32K on CUDA, 1K 2K on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 24 on CUDA, 4 on CPU")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--block-size", type=int, default=None, help="sparse block (default 128 CUDA, 64 CPU)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--e2e", choices=["embedded", "tiny-wan"], default=None,
                        help="instead of kernels: end-to-end PSNR vs. dense and per-layer attention error")
    parser.add_argument("--e2e-size", type=int, default=None,
                        help="image size (default 512 for tiny-wan = 1024 tokens, the model's own for embedded)")
    parser.add_argument("--e2e-steps", type=int, default=10)
    parser.add_argument("--target-mass", type=float, default=0.95)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--min-seq-len", type=int, default=0)


def random_pattern(batch: int, heads: int, seq: int, block: int, sparsity: float, device: Any,
                   seed: int = 0) -> BlockSparsePattern:
    """Each query block keeps round((1 - sparsity) * blocks) key blocks (its diagonal block always)."""
    nb = -(-seq // block)
    keep = max(1, round((1.0 - sparsity) * nb))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, nb, nb, generator=g)
    scores[..., torch.arange(nb), torch.arange(nb)] = 2.0
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(batch, heads, nb, nb, dtype=torch.bool).scatter(-1, top, True)
    return BlockSparsePattern.from_block_mask(mask.to(device), block, seq, seq)


def _time(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    fn()  # warm-up (compiles / autotunes on first call)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def bench(seq_lens: list[int], batch: int, heads: int, head_dim: int, dtype: torch.dtype, block: int,
          sparsities: list[float], repeats: int, device: str) -> list[dict[str, Any]]:
    cuda = device.startswith("cuda")
    rows = []
    for seq in seq_lens:
        g = torch.Generator(device=device).manual_seed(seq)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        flops = 4.0 * batch * heads * seq * seq * head_dim
        backend = pick_backend(q)
        t_sdpa = _time(partial(_sdpa_flash, q, k, v), repeats, cuda)
        t_dense = _time(partial(flash_attention, q, k, v), repeats, cuda)
        row: dict[str, Any] = {"seq": seq, "backend": backend, "sdpa_tflops": flops / t_sdpa / 1e12,
                               "dense_tflops": flops / t_dense / 1e12, "dense_vs_sdpa": t_sdpa / t_dense,
                               "sdpa_ms": t_sdpa * 1e3, "dense_ms": t_dense * 1e3, "sparse": {}}
        for s in sparsities:
            pattern = random_pattern(batch, heads, seq, block, s, device)
            t_sp = _time(partial(block_sparse_attention, q, k, v, pattern), repeats, cuda)
            row["sparse"][s] = {"density": pattern.density(), "ms": t_sp * 1e3,
                                "effective_tflops": flops * pattern.density() / t_sp / 1e12,
                                "speedup_vs_dense": t_dense / t_sp}
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(f"seq {r['seq']:>6} [{r['backend']}]  SDPA {r['sdpa_ms']:9.2f} ms {r['sdpa_tflops']:8.3f} TFLOP/s | "
                     f"dense {r['dense_ms']:9.2f} ms {r['dense_tflops']:8.3f} TFLOP/s ({r['dense_vs_sdpa']:.2f}x SDPA)")
        for s, sp in r["sparse"].items():
            lines.append(f"    sparsity {s:4.2f} (density {sp['density']:.2f}): {sp['ms']:9.2f} ms, "
                         f"{sp['effective_tflops']:8.3f} effective TFLOP/s, {sp['speedup_vs_dense']:.2f}x vs dense")
    return "\n".join(lines)


def run_e2e(args: argparse.Namespace) -> int:
    """End-to-end quality of sparse attention against the same-seed dense run (CPU or CUDA)."""
    from ..pipelines.sparse_attention import measure_sparse_attention, tiny_wan_pipeline

    settings = dict(target_mass=args.target_mass, warmup_steps=args.warmup_steps,
                    refresh_every=args.refresh_every, min_seq_len=args.min_seq_len)
    if args.block_size:
        settings["block_size"] = args.block_size
    if args.e2e == "embedded":
        from ..embedded import generate_digits, load_embedded

        pipe = load_embedded()
        size = args.e2e_size

        def generate(p: Any) -> torch.Tensor:
            extra = {"size": size} if size else {}
            return generate_digits(p, list(range(10)), steps=args.e2e_steps, **extra)
    else:
        pipe = tiny_wan_pipeline()
        size = args.e2e_size or 512
        g = torch.Generator().manual_seed(1)
        pe, ne = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)

        def generate(p: Any) -> torch.Tensor:
            return p(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size, num_frames=1,
                     num_inference_steps=args.e2e_steps, output_type="latent",
                     generator=torch.Generator().manual_seed(0))[0]

    res = measure_sparse_attention(pipe, generate, **settings)
    print(f"{args.e2e}: {args.e2e_steps} steps, settings {settings}")
    print(f"PSNR vs dense {res['psnr']:.2f} dB, max abs diff {res['max_abs']:.4f}, "
          f"time dense {res['seconds_dense']:.2f}s vs sparse {res['seconds_sparse']:.2f}s")
    for comp, st in res["stats"].items():
        if st is not None:
            print(f"[{comp}] {st.summary()}")
            for layer, (dens, cov) in st.layers.items():
                err = res["layer_errors"][comp].get(layer)
                err_s = f"{err:.4f}" if err is not None else "n/a"
                print(f"    {layer}: density {dens:.2f}, min coverage {cov:.3f}, attention rel. error {err_s}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.e2e:
        return run_e2e(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    seq_lens = args.seq_lens or ([4096, 8192, 16384, 32768] if cuda else [1024, 2048])
    heads = args.heads or (24 if cuda else 4)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    block = args.block_size or (128 if cuda else 64)
    rows = bench(seq_lens, args.batch, heads, args.head_dim, dtype, block, args.sparsities, args.repeats, device)
    print(f"attention forward, batch {args.batch}, heads {heads}, head dim {args.head_dim}, {dtype}, "
          f"block {block}, device {device}, median of {args.repeats}")
    if not cuda:
        print("(CPU: PyTorch reference path; figures show correctness of the wiring, not kernel speed)")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
