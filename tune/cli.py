"""``hasten tune``: search the fastest stack that keeps a quality floor on an embedded model (the digit image
model, or with ``--model video`` the moving-digit video model), or reaches a speed-up at the best quality;
write it as a preset JSON with held-out figures, and a Pareto plot."""

from __future__ import annotations

import argparse
import json
import math

from ..cli import UserError, nonneg_float, positive_int, writable_dir


def _fraction(text: str) -> float:
    v = nonneg_float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _above_one(text: str) -> float:
    v = nonneg_float(text)
    if v <= 1:
        raise argparse.ArgumentTypeError(f"expected a speed-up > 1, got {text!r}")
    return v


def _positive(text: str) -> float:
    v = nonneg_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


COMPARE = ("none", "singles")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.cli import _digit_string

    g = p.add_argument_group("objective (one quality floor or more, or --speedup)")
    g.add_argument("--min-psnr", type=nonneg_float, default=None, help="PSNR floor vs. the baseline, dB")
    g.add_argument("--min-worst-psnr", type=nonneg_float, default=None,
                   help="PSNR floor of every single image / clip (the mean can hide one collapsed output), dB")
    g.add_argument("--min-ssim", type=_fraction, default=None, help="SSIM floor vs. the baseline")
    g.add_argument("--min-digit-accuracy", type=_fraction, default=None,
                   help="share of images the digit classifier reads as the prompted digit (0-1)")
    g.add_argument("--min-motion-accuracy", type=_fraction, default=None,
                   help="--model video: share of clips whose digit moves the prompted way (0-1)")
    g.add_argument("--speedup", type=_above_one, default=None, help="speed target: the best quality at this speed-up")
    p.add_argument("--model", choices=["image", "video"], default="image",
                   help="embedded model to tune: image (digits) or video (moving digits, 17 frames at 32x32)")
    # 16 clips, screened on the first 4: a few clips' mean swings by +-2 dB with which clips they are (6 steps at
    # shift 1.5 with CFG on 70 %: 29.9 dB on clips 0-3, 31.9 dB on clips 0-15), which steered the search to the
    # wrong stacks; only trials near the floor on the first 4 run the other 12
    p.add_argument("--clips", type=positive_int, default=16,
                   help="--model video: calibration clips (hasten.embedded.video.eval_pairs; the held-out clips are "
                        "the next ones)")
    p.add_argument("--screen-clips", type=positive_int, default=4,
                   help="--model video: every trial runs these first clips of the calibration set (its speed is "
                        "timed there); only trials within --screen-slack dB of the floor run the rest")
    p.add_argument("--screen-slack", type=nonneg_float, default=3.0,
                   help="dB under the PSNR floor (+ margin) on the screen clips that still runs the rest")
    p.add_argument("--holdout-clips", type=positive_int, default=4, help="--model video: held-out clips")
    p.add_argument("--budget-minutes", type=_positive, default=15.0, help="search time budget (held-out check after)")
    p.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall",
                   help="what the budget counts: wall-clock time, or this process's CPU time (a shared, busy box)")
    p.add_argument("--trials", type=positive_int, default=None, help="stop after this many trials too")
    p.add_argument("--features", default=None,
                   help="comma-separated families to search (default: the registry's defaults; see --list-features)")
    p.add_argument("--list-features", action="store_true", help="list the searchable families and exit")
    p.add_argument("--digits", type=_digit_string, default="0123456789", help="calibration digits (one prompt each)")
    p.add_argument("--seeds", type=positive_int, default=1, help="calibration seeds (0, 1000, ...)")
    p.add_argument("--holdout-seeds", type=positive_int, default=None,
                   help="held-out seeds for the final figures (never searched on; default 2 images, 1 video)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="interleaved wall-clock repeats of the final timing")
    p.add_argument("--speed-samples", type=positive_int, default=3,
                   help="CPU-time samples of a trial that could be the answer (near the best, meeting the floors); "
                        "its speed is their median")
    p.add_argument("--compare", choices=COMPARE, default="none",
                   help="singles: also time hand-set single accelerators (EasyCache sweep, MagCache, TaylorSeer) "
                        "and, as a reference, plain fewer steps in the held-out run, to read the best one reaching "
                        "the floor")
    p.add_argument("--margin", type=nonneg_float, default=1.5, help="dB above --min-psnr required during the search")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--out", default="tune-results", help="folder for tuned.json, tune.json and pareto.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _singles(steps: int, model: str = "image") -> list:
    from ..bench import variants as v

    if model == "video":
        # the hand-set settings around 30 dB in `hasten bench --model video`: its best single reaching 30 dB,
        # EasyCache 0.2 w0.1 r6 (2.66x at 31.1 dB), and EasyCache 0.2 at its defaults, 0.3 w0.1 (29.1 dB),
        # MagCache 0.12 (31.3), TaylorSeer @2 (38.7), DBCache 0.16 (40.0); FirstBlockCache 0.1's 29.6 misses 30
        singles = [v.easycache_grid(0.2, 0.1, 6), v.easycache_grid(0.2), v.easycache_grid(0.3, 0.1, 6),
                   v.diffusers_magcache(0.12, steps), v.diffusers_taylorseer(2), v.cache_dit_dbcache(0.16)]
    else:  # the hand-set settings around 35 dB in `hasten bench` (EasyCache 0.2 gives 33.8 dB there)
        singles = [v.hasten_easycache(0.1), v.hasten_easycache(0.15), v.diffusers_magcache(0.24, steps),
                   v.diffusers_taylorseer(3)]
    # the reference no accelerator should lose to: plain fewer steps (a quarter to a third of them)
    return singles + [v.fewer_steps(max(2, round(steps * f))) for f in (0.25, 0.3, 0.35)]


def run(args: argparse.Namespace) -> int:
    from .space import SPACE, default_features

    if args.list_features:
        for name, e in SPACE.items():
            print(f"{name:22s} {'default' if e.default else 'opt-in: ' + e.why_not_default}"
                  + (f" (left out on a CPU: {e.why_not_on_cpu})" if e.why_not_on_cpu else ""))
        return 0
    if all(v is None for v in (args.min_psnr, args.min_ssim, args.min_digit_accuracy, args.speedup,
                                args.min_motion_accuracy, args.min_worst_psnr)):
        raise UserError("give an objective: --min-psnr, --min-worst-psnr, --min-ssim, --min-digit-accuracy, "
                        "--min-motion-accuracy or --speedup")
    if args.min_motion_accuracy is not None and args.model != "video":
        raise UserError("--min-motion-accuracy is a video floor: add --model video")
    # the embedded models run on the CPU here: families never faster there are left out unless named
    feats = (default_features(args.model, "cpu") if args.features is None
             else [f.strip() for f in args.features.split(",") if f.strip()])
    unknown = [f for f in feats if f not in SPACE]
    if unknown:
        raise UserError(f"unknown feature(s) {', '.join(unknown)}; known: {', '.join(SPACE)}")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("hasten tune needs optuna: pip install 'hasten[tune]'") from None
    out = writable_dir(args.out)

    import torch

    from ..embedded import DEFAULT_STEPS, digit_prompts, load_embedded
    from . import save_preset, tune
    from .plot import write_plot

    torch.set_num_threads(args.threads)
    video = args.model == "video"
    holdout_seeds = args.holdout_seeds or (1 if video else 2)
    seeds = [1000 * i for i in range(args.seeds)]
    holdout = [1000 * (args.seeds + i) + 7 for i in range(holdout_seeds)]
    if video:
        from ..embedded.video import VIDEO_DEFAULT_STEPS, eval_pairs, video_prompts

        steps = VIDEO_DEFAULT_STEPS
        pairs = eval_pairs(args.clips + args.holdout_clips)
        digits, dirs = pairs[0][:args.clips], pairs[1][:args.clips]
        prompts = video_prompts(digits, dirs)
        held = video_prompts(pairs[0][args.clips:], pairs[1][args.clips:])
        held_targets: list[int] | None = pairs[0][args.clips:]
        name = "hasten embedded video (WanPipeline, moving digits)"
    else:
        steps = DEFAULT_STEPS
        digits = [int(c) for c in args.digits]
        prompts, held, held_targets = digit_prompts(digits), None, None
        name = "hasten embedded (WanPipeline, digits)"
    pipe = load_embedded(args.model)
    log = out / "trials.jsonl"
    log.write_text("")

    def record(t) -> None:  # every trial as it ends: a long run can be read (or stopped) half-way
        from dataclasses import asdict

        with log.open("a") as f:
            f.write(json.dumps(asdict(t), default=_json_default) + "\n")

    result = tune(pipe, prompts, min_psnr=args.min_psnr, min_ssim=args.min_ssim,
                  min_digit_accuracy=args.min_digit_accuracy, min_motion_accuracy=args.min_motion_accuracy,
                  speedup=args.speedup, min_worst_psnr=args.min_worst_psnr, targets=digits, seeds=seeds,
                  holdout_seeds=holdout, holdout_prompts=held,
                  holdout_targets=held_targets, features=feats, budget_minutes=args.budget_minutes,
                  budget_clock=args.budget_clock, n_trials=args.trials, steps=steps,
                  margin_db=args.margin if args.min_psnr is not None else 0.0, repeats=args.repeats,
                  compare=_singles(steps, args.model) if args.compare == "singles" else (), model=name,
                  seed=args.seed, progress=not args.no_progress, on_trial=record,
                  screen=args.screen_clips if video else None, screen_slack_db=args.screen_slack,
                  speed_samples=args.speed_samples)
    (out / "tune.json").write_text(json.dumps(result.to_dict(), indent=1, default=_json_default) + "\n")
    write_plot(result, out / "pareto.png",
               f"hasten tune on the embedded {args.model} model ({len(result.trials)} trials)")
    ok = 0
    print(f"{len(result.trials)} trials in {result.search_seconds:.0f} s wall, "
          f"{result.preset['search']['cpu_seconds']:.0f} s CPU"
          + (" (interrupted: best so far kept)" if result.interrupted else ""))
    search = result.preset["search"]
    if search.get("screen_prompts"):
        print(f"screened on {search['screen_prompts']} of {search['calibration_prompts']} calibration clips: "
              f"{search['confirmed']} trial(s) near the floor ran them all")
    if result.best is None:
        print("no stack met the objective; nothing written to tuned.json")
        ok = 1
    else:
        save_preset(result.preset, out / "tuned.json")
        print("chosen:", json.dumps(result.features))
        h = result.held_out
        if h and h.get("speedup_wall") is not None:
            print(f"held-out (seeds {h['seeds']}, {h['repeats']} interleaved repeats): {h['speedup_wall']:.2f}x "
                  f"wall-clock, PSNR {h['psnr']:.2f} dB (worst {_db(h.get('psnr_worst'))}), SSIM {h['ssim']:.4f}, "
                  "digit accuracy "
                  f"{_pct(h['accuracy'])} (baseline {_pct(h['baseline_accuracy'])})"
                  + (f", motion accuracy {_pct(h['motion_accuracy'])} (baseline {_pct(h['baseline_motion_accuracy'])})"
                     if video else ""))
        elif h:
            print("held-out check failed for every candidate:", h.get("checks"))
            ok = 1
        if result.compared:
            from ..bench.report import table
            from ..bench.runner import BenchRow

            rows = [BenchRow(**r) for r in result.compared]
            print(table(rows))
            if args.min_psnr is not None and args.compare == "singles":  # nothing to read against otherwise
                _verdict(rows, args.min_psnr)
        print(f"wrote {out / 'tuned.json'}")
    print(f"wrote {out / 'tune.json'} and {out / 'pareto.png'}")
    return ok


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} dB"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _verdict(rows: list, floor: float) -> None:
    """The tuned stack against the fastest hand-set single, and against plain fewer steps, reaching ``floor``."""
    tuned = rows[1]
    for what, reference in (("single", False), ("plain fewer-steps run", True)):
        ok = [r for r in rows[2:] if r.psnr is not None and r.psnr >= floor and r.speedup
              and r.family != "candidate" and (r.family == "reference") == reference]
        if not ok:
            print(f"no {what} reached {floor:g} dB on the held-out clips/seeds")
            continue
        top = max(ok, key=lambda r: r.speedup)
        fwd = (f"; forwards per output {tuned.forwards_per_image:.1f} vs {top.forwards_per_image:.1f}: "
               f"{top.forwards_per_image / tuned.forwards_per_image:.2f}x fewer"
               if tuned.forwards_per_image and top.forwards_per_image else "")
        print(f"best {what} reaching {floor:g} dB: {top.name} {top.speedup:.2f}x ({top.psnr:.2f} dB); tuned stack "
              f"{tuned.speedup:.2f}x = {tuned.speedup / top.speedup:.2f}x of it{fwd}")


def _json_default(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)
