"""``hasten calibrate-guidance``: fit LinearAG coefficients on full-CFG calibration trajectories.

The fit itself is :func:`hasten.samplers.guidance.fit_linear_ag`; this command only runs the model
(the embedded digit model by default, or a local diffusers pipeline folder) and saves the result
where ``enable_adaptive_guidance(mode="linear")`` looks for it (user cache dir, keyed by a hash of
the denoiser config, or ``--out``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import nonneg_float, positive_int

    parser.add_argument("--model", default="embedded",
                        help="'embedded' (default) or a local diffusers pipeline directory")
    parser.add_argument("--prompts", nargs="*", default=None,
                        help="calibration prompts (embedded default: 'digit 0' .. 'digit 9')")
    parser.add_argument("--seeds", type=positive_int, default=4, help="runs per prompt batch (default 4)")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampling steps (match your runs; default 20)")
    parser.add_argument("--guidance", type=nonneg_float, default=4.0, help="CFG scale (default 4.0)")
    parser.add_argument("--out", default=None, help="output JSON (default: user cache dir, auto-loaded)")
    parser.add_argument("--next-to-model", action="store_true",
                        help="save as hasten_linear_ag.json inside the model directory")


def run(args: argparse.Namespace) -> int:
    # The CLI is an entry point above both layers: it may use the diffusers adapter.
    import torch

    from ..cli import UserError, writable_file
    from ..pipelines.guidance import calibrate_pipeline
    from ..samplers.guidance import COEFF_FILE

    if args.guidance <= 1:
        raise UserError(f"--guidance {args.guidance:g}: LinearAG is fitted on CFG runs; use a guidance scale > 1")
    if args.out is not None:
        writable_file(args.out)  # checked now, not after the calibration runs

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.model == "embedded":
        from ..embedded import DEFAULT_SIZE, WEIGHTS_DIR, load_embedded

        pipe, model_dir = load_embedded(), WEIGHTS_DIR
        prompts = args.prompts or [f"digit {d}" for d in range(10)]
        extra = {"height": DEFAULT_SIZE, "width": DEFAULT_SIZE, "num_frames": 1}
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
        model_dir = args.model
        prompts = args.prompts or ["a photo"]
        extra = {}
    pipe.set_progress_bar_config(disable=True)

    def runner(seed: int) -> None:
        gen = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_inference_steps=args.steps,
             guidance_scale=args.guidance, generator=gen, output_type="latent", **extra)

    out = args.out
    if args.next_to_model:
        out = f"{model_dir}/{COEFF_FILE}"
        writable_file(out)
    coeffs, path = calibrate_pipeline(pipe, runner, list(range(args.seeds)), out)
    resid = [r for r in coeffs.residual if r is not None]
    print(f"LinearAG coefficients for model {coeffs.model_key} ({coeffs.num_steps} steps) saved to {path}; "
          f"mean relative residual {sum(resid) / max(len(resid), 1):.4f}")
    return 0
