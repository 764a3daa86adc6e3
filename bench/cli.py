"""``hasten bench``: baseline vs. hasten vs. peers on the embedded model, speed and quality side by side."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from .report import table, write_json, write_plot
from .runner import run_bench
from .variants import preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="quick | easycache | peers | default (= peers)")
    p.add_argument("--digits", default="0123456789", help="digits to prompt, one image each per seed")
    p.add_argument("--seeds", type=int, default=2, help="number of seeds (batches of len(digits) images)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the embedded model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the embedded model's)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives stable timings)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and pareto.png")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..embedded import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_digits, load_embedded

    torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE
    digits = [int(c) for c in args.digits]
    pipe = load_embedded(device=args.device)
    variants = preset(args.preset, steps)

    def generate(p, seed: int) -> torch.Tensor:
        return generate_digits(p, digits, seed=1000 * seed, steps=steps, guidance=guidance)

    t0 = time.perf_counter()
    rows = run_bench(pipe, variants, generate, seeds=list(range(args.seeds)), targets=digits,
                     repeats=args.repeats, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "hasten embedded (WanPipeline, digits)", "steps": steps, "guidance": guidance,
            "digits": digits, "seeds": args.seeds, "repeats": args.repeats, "device": args.device,
            "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "bench_seconds": elapsed}
    write_json(rows, out / "bench.json", meta)
    write_plot(rows, out / "pareto.png", f"embedded model, {steps} steps, CFG {guidance:g}")
    print(table(rows))
    print(f"\n{len(digits) * args.seeds} images per variant, {args.repeats} interleaved repeats, "
          f"{steps} steps, CFG {guidance:g}, {args.device}, {args.threads} thread(s); bench took {elapsed:.0f} s")
    print(f"wrote {out / 'bench.json'} and {out / 'pareto.png'}")
    return 0
