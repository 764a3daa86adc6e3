"""ComfyUI adapter for bottleneck sampling: a KSampler-like node that runs the stages one by one.

Each stage is an ordinary ComfyUI sampling run (``comfy.sample.sample_custom``) over its slice of the
sigma schedule (flow models: with the stage's timestep shift). Between stages the last ``denoised``
estimate is resized and handed to the next stage as its clean latent together with fresh noise, so
ComfyUI's own ``noise_scaling`` puts it on the next stage's starting noise level (the re-noising of
:mod:`hasten.samplers.bottleneck`, for flow and EPS models alike). Patches on the MODEL (EasyCache,
adaptive guidance) apply inside each stage; each stage is a new run for them.

The sampler's ``denoised`` estimate lives in the model's internal latent space (after the latent
format's ``process_in``), while ``sample_custom`` expects a LATENT as the user holds it and applies
``process_in`` itself: the hand-off is converted back with ``process_latent_out`` first, otherwise the
latent normalisation would be applied twice and the image destroyed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..samplers.bottleneck import (
    BottleneckConfig,
    Stage,
    flops_fraction,
    fresh_noise,
    noise_seeds,
    plan,
    resize_latent,
    shift_sigma,
    stage_size,
)
from .schema import CATEGORY, advanced, fail, io, output, stats_output

log = logging.getLogger("hasten.bottleneck")

NAME = "KSampler (Bottleneck, hasten)"
_DEFAULTS = BottleneckConfig()


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as exc:
        raise ValueError(f"{NAME}: {what} must be comma-separated numbers, got {text!r}") from exc


def _patch_multiple(model: Any) -> int:
    dm = model.model.diffusion_model
    p = getattr(dm, "patch_size", None)
    if p is not None:
        return int(p[-1] if isinstance(p, (tuple, list)) else p)
    ch = getattr(dm, "channel_mult", None)
    return 2 ** (len(ch) - 1) if ch is not None else 1


def latent_factor(model: Any) -> int | None:
    """Pixels per latent cell of the model's latent format (its real VAE factor, not an assumed 8)."""
    fmt = model.get_model_object("latent_format")
    f = getattr(fmt, "spacial_downscale_ratio", None)
    return int(f) if isinstance(f, (int, float)) and f > 0 else None


def _stage_sigmas(sigmas: torch.Tensor, st: Stage, stages: list[Stage], config: BottleneckConfig, flow: bool,
                  steps: int) -> torch.Tensor:
    sig = sigmas[st.start : st.end + 1].clone()
    if flow and st.shift != 1.0:
        sig[:-1] = shift_sigma(sig[:-1].double(), st.shift).to(sig.dtype)
        if st.end < steps:
            sig[-1] = shift_sigma(sig[-1:].double(), st.shift).to(sig.dtype)[0]
    if flow and config.renoise > 0 and st.index > 0 and st.scale > stages[st.index - 1].scale:
        sig[0] = sig[0] + config.renoise * (1 - sig[0])  # extra noise re-injected when going up
    return sig


def describe(stages: list[Stage], sizes: list[tuple[int, int]], factor: int | None, config: BottleneckConfig,
             steps: int, seconds: float) -> str:
    """The run's statistics as one line (log and the node's ``stats`` output)."""
    parts = []
    for st, (h, w) in zip(stages, sizes):
        px = f" ({h * factor}x{w * factor} px)" if factor else ""
        parts.append(f"{st.scale:g}x latent {h}x{w}{px} steps {st.start + 1}-{st.end}")
    cost = flops_fraction(config, steps)
    return (f"{NAME}: {len(stages)} stages: " + "; ".join(parts)
            + f"; denoiser work ~{cost:.2f} of a plain run ({1 / cost:.2f}x fewer latent cells); {seconds:.2f} s")


def bottleneck_sample(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                      positive: Any, negative: Any, latent: dict, config: BottleneckConfig) -> tuple[dict, str]:
    """Sample ``latent`` in stages; returns the output LATENT and the run's statistics line."""
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers
    import latent_preview

    t0 = time.perf_counter()
    if latent.get("noise_mask") is not None:
        raise UnsupportedModelError(f"{NAME}: latents with a noise mask (inpainting) are not supported: the mask "
                                    "is at full resolution. Use the plain KSampler for inpainting.")
    x = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if getattr(x, "is_nested", False) or x.ndim not in (4, 5):
        raise UnsupportedModelError(f"{NAME}: supports image (B, C, H, W) and video (B, C, F, H, W) latents; got "
                                    f"{'a nested latent' if getattr(x, 'is_nested', False) else tuple(x.shape)}.")
    noise = comfy.sample.prepare_noise(x, seed, latent.get("batch_index"))
    if config.is_off:
        out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, x,
                                  seed=seed, callback=latent_preview.prepare_callback(model, steps))
        return {**latent, "samples": out}, f"{NAME}: off (all scales 1), plain sampling of {steps} steps"
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
    flow = isinstance(ms, comfy.model_sampling.CONST)
    full = (int(x.shape[-2]), int(x.shape[-1]))
    mult, factor = _patch_multiple(model), latent_factor(model)
    stages = plan(config, steps)
    sizes = [stage_size(full, st.scale, mult, factor) for st in stages]  # every stage checked before any work
    sampler = comfy.samplers.sampler_object(sampler_name)
    seeds = noise_seeds(noise, config.seed)
    preview = latent_preview.prepare_callback(model, steps)  # one progress bar across all stages
    clean, cur_noise = x, noise
    for st in stages:
        sig = _stage_sigmas(sigmas, st, stages, config, flow, steps)
        last: dict[str, torch.Tensor] = {}

        def callback(step: int, x0: torch.Tensor, xt: torch.Tensor, total: int, _last: dict = last,
                     _start: int = st.start) -> None:
            _last["x0"] = x0
            preview(_start + step, x0, xt, steps)

        out = comfy.sample.sample_custom(model, cur_noise, cfg, sampler, sig, positive, negative, clean,
                                         callback=callback, disable_pbar=True, seed=seed)
        if st.index == len(stages) - 1:
            text = describe(stages, sizes, factor, config, steps, time.perf_counter() - t0)
            log.info("%s", text)
            return {**latent, "samples": out}, text
        # denoised estimate of the stage's last step, in the model's internal space -> user latent space
        x0 = last["x0"] if "x0" in last else model.model.process_latent_in(out)
        x0 = model.model.process_latent_out(x0.to(out.device, torch.float32))
        clean = resize_latent(x0, sizes[st.index + 1], config.upsample).to(out.dtype).cpu()
        cur_noise = fresh_noise(clean, seeds, st.index + 1).cpu()
    raise AssertionError("unreachable")


class HastenBottleneckSampler(io.ComfyNode):
    """KSampler that denoises high -> low -> high resolution (fewer latent cells in the middle steps)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        d = _DEFAULTS
        return io.Schema(
            node_id="HastenBottleneckSampler",
            display_name=NAME,
            category=CATEGORY,
            description=("Bottleneck Sampling (Tian et al.): a KSampler that runs the first and last steps at full "
                         "resolution and the middle ones at a lower resolution, re-noising the clean estimate at "
                         "each change (flow models also get a per-stage timestep shift). Faster for the same "
                         "steps; works on image and video latents of any model (no inpainting masks)."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL (patches such as EasyCache apply per stage)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise; the re-injected noise follows it too."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Total denoising steps over all stages (at least one per stage)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="Sampler of each stage (multistep samplers restart at each stage)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="Sigma schedule of the whole run, sliced into stages."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="Starting LATENT (full resolution; no noise mask)."),
                io.String.Input("scales", default=",".join(f"{s:g}" for s in d.scales),
                                tooltip="Resolution factor of each stage, comma-separated; first and last must be "
                                        "1. All 1 = plain sampling. The lower sizes must stay whole multiples of "
                                        "the model's patch size."),
                io.String.Input("boundaries", default=",".join(f"{b:g}" for b in d.boundaries),
                                tooltip="Fraction of the steps at which each stage ends (one fewer than scales, "
                                        "increasing, in (0, 1))."),
                io.Float.Input("renoise", default=d.renoise, min=0.0, max=0.99, step=0.01,
                               tooltip="Extra noise when going back up, as a fraction of the gap to pure noise.",
                               **advanced()),
                io.Combo.Input("upsample", options=["bicubic", "bilinear", "nearest"], default=d.upsample,
                               tooltip="Interpolation used when going back up (down-sampling uses area).",
                               **advanced()),
            ],
            outputs=[
                io.Latent.Output(tooltip="The denoised LATENT at the input's resolution."),
                stats_output("Stages, sizes and steps of the run and its estimated saving (also in the log)."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                positive: Any, negative: Any, latent_image: dict, scales: str, boundaries: str,
                renoise: float = _DEFAULTS.renoise, upsample: str = _DEFAULTS.upsample) -> io.NodeOutput:
        try:
            config = BottleneckConfig(scales=_floats(scales, "scales"), boundaries=_floats(boundaries, "boundaries"),
                                      renoise=renoise, upsample=upsample)
        except (TypeError, ValueError) as exc:
            fail(NAME, str(exc), exc=ValueError)
        try:
            out, text = bottleneck_sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, config)
        except UnsupportedModelError as exc:
            fail(NAME, str(exc).removeprefix(f"{NAME}: "))
        except ValueError as exc:  # sizes that do not fit the model's patch size, too few steps
            fail(NAME, str(exc), exc=ValueError)
        return output(out, stats=text)


NODES = [HastenBottleneckSampler]
