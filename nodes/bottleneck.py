"""ComfyUI adapter for bottleneck sampling: a KSampler-like node that runs the stages one by one.

Each stage is an ordinary ComfyUI sampling run (``comfy.sample.sample_custom``) over its slice of the
sigma schedule (flow models: with the stage's timestep shift). Between stages the last ``denoised``
estimate is resized and handed to the next stage as its clean latent together with fresh noise, so
ComfyUI's own ``noise_scaling`` puts it on the next stage's starting noise level (the re-noising of
:mod:`hasten.samplers.bottleneck`, for flow and EPS models alike). Patches on the MODEL (EasyCache,
adaptive guidance) apply inside each stage; each stage is a new run for them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..samplers.bottleneck import BottleneckConfig, fresh_noise, plan, resize_latent, shift_sigma, stage_size


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as exc:
        raise ValueError(f"bottleneck {what} must be comma-separated numbers, got {text!r}") from exc


def _patch_multiple(model: Any) -> int:
    dm = model.model.diffusion_model
    p = getattr(dm, "patch_size", None)
    if p is not None:
        return int(p[-1] if isinstance(p, (tuple, list)) else p)
    ch = getattr(dm, "channel_mult", None)
    return 2 ** (len(ch) - 1) if ch is not None else 1


def bottleneck_sample(model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                      positive: Any, negative: Any, latent: dict, config: BottleneckConfig) -> dict:
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers

    x = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(x, seed, latent.get("batch_index"))
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu()
    if config.is_off:
        out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, x, seed=seed)
        return {**latent, "samples": out}
    flow = isinstance(ms, comfy.model_sampling.CONST)
    full = (int(x.shape[-2]), int(x.shape[-1]))
    mult = _patch_multiple(model)
    stages = plan(config, steps)
    for st in stages:
        stage_size(full, st.scale, mult, 8)
    sampler = comfy.samplers.sampler_object(sampler_name)
    clean, cur_noise = x, noise
    for st in stages:
        sig = sigmas[st.start : st.end + 1].clone()
        if flow and st.shift != 1.0:
            sig[:-1] = shift_sigma(sig[:-1].double(), st.shift).to(sig.dtype)
            if st.end < steps:
                sig[-1] = shift_sigma(sig[-1:].double(), st.shift).to(sig.dtype)[0]
        if flow and config.renoise > 0 and st.index > 0 and st.scale > stages[st.index - 1].scale:
            sig[0] = sig[0] + config.renoise * (1 - sig[0])  # extra noise re-injected when going up
        last: dict[str, torch.Tensor] = {}

        def callback(step: int, x0: torch.Tensor, xt: torch.Tensor, total: int, _last: dict = last) -> None:
            _last["x0"] = x0

        out = comfy.sample.sample_custom(model, cur_noise, cfg, sampler, sig, positive, negative, clean,
                                         callback=callback, disable_pbar=True, seed=seed)
        if st.index == len(stages) - 1:
            return {**latent, "samples": out}
        nxt = stages[st.index + 1]
        size = stage_size(full, nxt.scale, mult, 8)
        x0 = last.get("x0", out).to(out.device, out.dtype)
        clean = resize_latent(x0, size, config.upsample)
        cur_noise = fresh_noise(clean, config.seed + seed, nxt.index).cpu()
        clean = clean.cpu()
    raise AssertionError("unreachable")


class HastenBottleneckSampler:
    """Node "KSampler (Bottleneck, hasten)": high -> low -> high resolution sampling."""

    CATEGORY = "hasten"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    DESCRIPTION = ("Bottleneck Sampling (Tian et al.): full resolution at the start and end, a lower one in "
                   "between, with re-noising at each transition and a per-stage timestep shift (flow models).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import comfy.samplers

        d = BottleneckConfig()
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "scales": ("STRING", {"default": ",".join(f"{s:g}" for s in d.scales),
                                  "tooltip": "resolution factor per stage; first and last 1 (all 1 = off)"}),
            "boundaries": ("STRING", {"default": ",".join(f"{b:g}" for b in d.boundaries),
                                      "tooltip": "fraction of steps where each stage ends"}),
            "renoise": ("FLOAT", {"default": d.renoise, "min": 0.0, "max": 0.99, "step": 0.01}),
        }}

    def sample(self, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: Any, negative: Any, latent_image: dict, scales: str, boundaries: str,
               renoise: float) -> tuple:
        config = BottleneckConfig(scales=_floats(scales, "scales"), boundaries=_floats(boundaries, "boundaries"),
                                  renoise=renoise)
        return (bottleneck_sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, config),)


NODE_CLASS_MAPPINGS = {"HastenBottleneckSampler": HastenBottleneckSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"HastenBottleneckSampler": "KSampler (Bottleneck, hasten)"}
