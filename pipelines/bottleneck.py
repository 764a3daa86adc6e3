"""diffusers adapter for bottleneck sampling (see :mod:`hasten.samplers.bottleneck`).

Approach: the pipeline's own denoising loop is kept; only its scheduler instance is patched (two
instance attributes with the scheduler's real signatures, removed again by
``disable_bottleneck_sampling``). diffusers inspects those signatures (``retrieve_timesteps`` looks for
``sigmas``/``timesteps``, ``prepare_extra_step_kwargs`` for ``eta``/``generator``), so they are kept:

* ``set_timesteps`` lets the scheduler build its normal schedule (custom ``sigmas``, dynamic-shift
  ``mu`` and all), then (flow matching) applies each stage's extra timestep shift: the stage's scale,
  or under dynamic shifting the ratio of the ``mu`` its own token count would get to the run's ``mu``.
  It starts a run.
* ``step`` runs the scheduler's normal step, except where the next step belongs to a stage of another
  resolution: there it returns the latent already moved to that resolution and noise level. diffusers
  pipelines carry whatever ``scheduler.step`` returns into the next iteration, and the denoisers accept
  any size that respects their patch size, so no pipeline code is copied or forked.

The step index comes from the scheduler (``step_index`` / the timestep), so img2img and video2video
runs with ``strength < 1`` (which start part-way) follow the same plan and always end at full size.
Multistep solvers restart their history at each stage change (it belongs to the old resolution).

What cannot follow a resolution change from the scheduler is refused before any work, with the reason:
packed-latent pipelines (image tokens plus position ids computed once per call: Flux, Flux 2,
Qwen-Image, Chroma, Bria, Ovis, LTX...), full-resolution conditioning (ControlNet, inpainting masks,
conditioning images/videos, Wan 2.2 TI2V's per-token timesteps, rotary embeddings precomputed by the
pipeline as in CogVideoX/Allegro), and schedulers without a known noise parameterisation.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import replace as dc_replace
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..samplers.bottleneck import (
    BottleneckConfig,
    Stage,
    ddpm_transition,
    flow_sigmas,
    flow_transition,
    noise_seeds,
    plan,
    stage_size,
    ve_transition,
)
from .denoiser import find_denoisers
from .registry import Feature, install, make_config, uninstall

log = logging.getLogger("hasten.bottleneck")

SUPPORTED = ("text-to-image/video pipelines with 4D/5D latents (Wan 2.1, the embedded model, SD3, SD 1.5, SDXL, "
             "PixArt, HunyuanVideo, Mochi, ...) and their img2img / video2video variants (strength < 1), using "
             "FlowMatchEulerDiscreteScheduler (fixed or dynamic shift, custom sigmas), UniPC / DPM-Solver "
             "multistep (flow mode, or data prediction), Euler / Euler ancestral, DDIM or DDPM")
DDPM_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
VE_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
MULTISTEP = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")
# __call__ arguments that carry full-resolution conditioning the scheduler cannot resize
CONDITIONING_ARGS = ("mask_image", "mask", "control_image", "control_images", "control_video", "conditions",
                     "image_latents", "mask_latents", "conditioning_frames")
# ... and arguments that are conditioning only when the pipeline has no ``strength`` (img2img has one)
IMAGE_ARGS = ("image", "video", "images", "init_image", "reference_image", "last_image")


def _is_flow_multistep(sched: Any) -> bool:
    cfg = sched.config
    return type(sched).__name__ in MULTISTEP and (
        bool(getattr(cfg, "use_flow_sigmas", False)) or getattr(cfg, "prediction_type", None) == "flow_prediction")


def _predicts_x0(sched: Any) -> bool:
    cfg = sched.config
    if type(sched).__name__ == "UniPCMultistepScheduler":
        return bool(getattr(cfg, "predict_x0", True))
    return getattr(cfg, "algorithm_type", "dpmsolver++") in ("dpmsolver++", "sde-dpmsolver++")


def _restart_multistep(sched: Any) -> None:
    """Forget a multistep solver's history (outputs at the old resolution): it restarts at first order."""
    for attr in ("model_outputs", "timestep_list"):
        hist = getattr(sched, attr, None)
        if isinstance(hist, list):
            setattr(sched, attr, [None] * len(hist))
    if hasattr(sched, "lower_order_nums"):
        sched.lower_order_nums = 0
    if hasattr(sched, "last_sample"):
        sched.last_sample = None


def _patch_multiple(pipe: Any) -> int:
    den = next(iter(find_denoisers(pipe).values()))
    cfg = getattr(den, "config", None)
    p = getattr(cfg, "patch_size", None)
    if p is not None:
        return int(p[-1] if isinstance(p, (tuple, list)) else p)
    blocks = getattr(cfg, "block_out_channels", None)
    if blocks is not None:  # UNet: every down-block but the last halves the resolution
        return 2 ** (len(blocks) - 1)
    return 1


def _vae_factor(pipe: Any) -> int | None:
    for name in ("vae_scale_factor_spatial", "vae_scale_factor"):
        v = getattr(pipe, name, None)
        if isinstance(v, int):
            return v
    return None


def scheduler_kind(sched: Any) -> str:
    """How the scheduler parameterises noise: "flow", "ddpm", "ve" or "vp" (raises if unknown)."""
    name = type(sched).__name__
    pred = getattr(sched.config, "prediction_type", "epsilon")
    if ("FlowMatch" in name and "Euler" in name) or _is_flow_multistep(sched):
        return "flow"
    if name in DDPM_SCHEDULERS:
        return "ddpm"
    if name in VE_SCHEDULERS and not getattr(sched.config, "use_flow_sigmas", False) and pred != "flow_prediction":
        return "ve"
    if name in MULTISTEP and _predicts_x0(sched):
        return "vp"
    raise UnsupportedModelError(f"bottleneck sampling does not support the {name} scheduler"
                                f"{' in this mode' if name in MULTISTEP else ''}; supported: {SUPPORTED}.")


def _precomputes_rope(cls: type) -> bool:
    """Whether the pipeline builds rotary embeddings itself (once per call, for the full size)."""
    if any("rotary" in a for a in dir(cls) if a.startswith(("_prepare", "prepare"))):
        return True
    try:
        src = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    return re.search(r"\b(image_)?rotary_emb\s*=|\bfreqs_cis\s*=", src) is not None


def check_pipeline(pipe: Any) -> None:
    """Refuse, before any work, what cannot follow a resolution change made from the scheduler."""
    cls = type(pipe)
    name = cls.__name__
    why = None
    if hasattr(cls, "_pack_latents") or hasattr(cls, "_unpack_latents"):
        why = ("it packs its latents into image tokens with position ids computed once per call, which a "
               "resolution change cannot update")
    elif any(getattr(pipe, c, None) is not None for c in getattr(pipe, "components", {}) if "controlnet" in c):
        why = "its ControlNet conditioning is computed at full resolution"
    elif bool(getattr(getattr(pipe, "config", None), "expand_timesteps", False)):
        why = "it gives the denoiser per-token timesteps of the full-resolution latent (expand_timesteps)"
    elif _precomputes_rope(cls):
        why = "it precomputes the denoiser's rotary position embeddings for the full resolution"
    else:
        try:
            params = inspect.signature(cls.__call__).parameters
        except (TypeError, ValueError):
            params = {}
        cond = [a for a in CONDITIONING_ARGS if a in params]
        if not cond and "strength" not in params:
            cond = [a for a in IMAGE_ARGS if a in params]
        if cond:
            why = (f"it takes full-resolution conditioning ({', '.join(cond)}) that would not match the "
                   f"lower-resolution stage")
    if why:
        raise UnsupportedModelError(f"bottleneck sampling does not support {name}: {why}. Supported: {SUPPORTED}.")


class _SignedCall:
    """Calls ``owner.<name>`` while reporting ``like``'s signature to ``inspect`` (diffusers decides its
    call on it). An object, not a closure, so ``copy.deepcopy(pipe)`` gives the copy its own patch."""

    def __init__(self, owner: Any, name: str, like: Any) -> None:
        self.owner, self.name = owner, name
        try:
            self.__signature__ = inspect.signature(like)
        except (TypeError, ValueError):
            pass
        self.__doc__ = getattr(like, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.owner, self.name)(*args, **kwargs)


class BottleneckScheduler:
    """Holds the patched scheduler's run state: the stage plan, the full size, the re-noise seeds."""

    def __init__(self, pipe: Any, config: BottleneckConfig) -> None:
        self.config = config
        self.sched = pipe.scheduler
        self.pipe_name = type(pipe).__name__
        self.kind = scheduler_kind(self.sched)
        self.multistep = type(self.sched).__name__ in MULTISTEP
        self.multiple = _patch_multiple(pipe)
        self.vae_factor = _vae_factor(pipe)
        self.stages: list[Stage] = []
        self.full: tuple[int, int] | None = None
        self.seeds: list[int] = []
        self.transitions: list[dict] = []
        self.steps_run = 0
        self.logged = False
        self.mu: float | None = None
        self._orig_set, self._orig_step = self.sched.set_timesteps, self.sched.step
        self.sched.set_timesteps = _SignedCall(self, "set_timesteps", self._orig_set)
        self.sched.step = _SignedCall(self, "step", self._orig_step)

    def remove(self) -> None:
        for attr in ("set_timesteps", "step"):
            if attr in vars(self.sched):
                delattr(self.sched, attr)

    def _mu_shift(self, mu: float, scale: float) -> float | None:
        """Shift ratio of a stage under dynamic shifting: the scheduler's ``mu`` for the stage's token count
        (``mu`` is linear in the sequence length, which falls with ``scale ** 2``) over the full run's."""
        cfg = self.sched.config
        base_len, max_len = float(cfg.get("base_image_seq_len", 256)), float(cfg.get("max_image_seq_len", 4096))
        base_shift, max_shift = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
        if max_len == base_len or max_shift == base_shift:
            return None
        m = (max_shift - base_shift) / (max_len - base_len)
        b = base_shift - m * base_len
        seq = (mu - b) / m
        if seq <= 0:
            return None
        mu_stage = m * seq * scale * scale + b
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu_stage / mu if mu > 0 and mu_stage > 0 else None
        return math.exp(mu_stage - mu)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig_set(*args, **kwargs)
        n = len(self.sched.timesteps)
        self.stages = plan(self.config, n)
        self.mu = None
        if self.kind == "flow" and self.config.shifts is None and self.sched.config.get("use_dynamic_shifting"):
            try:
                mu = inspect.signature(self._orig_set).bind(*args, **kwargs).arguments.get("mu")
            except TypeError:
                mu = None
            if mu is not None:  # per-resolution mu, as the pipeline would compute it at the stage's size
                self.mu = float(mu)
                for st in self.stages:
                    r = self._mu_shift(self.mu, st.scale)
                    if r is not None:
                        st.shift = r
        self.full, self.seeds, self.transitions, self.steps_run, self.logged = None, [], [], 0, False
        if self.kind == "flow":
            sig = flow_sigmas(self.config, self.sched.sigmas, self.stages)
            self.sched.sigmas = sig
            self.sched.timesteps = (sig[:-1] * self.sched.config.num_train_timesteps).to(
                device=self.sched.timesteps.device, dtype=self.sched.timesteps.dtype)
        return out

    def _stage_of(self, i: int) -> Stage:
        for st in self.stages:
            if st.start <= i < st.end:
                return st
        return self.stages[-1]

    def _index(self, timestep: Any) -> int:
        """Index of the step being taken, from the scheduler (img2img starts part-way)."""
        idx = getattr(self.sched, "step_index", None)
        if idx is None:
            idx = getattr(self.sched, "begin_index", None)
        if idx is not None:
            return int(idx)
        ts = self.sched.timesteps
        t = torch.as_tensor(timestep, device=ts.device).flatten()[0].to(ts.dtype)
        hits = (ts == t).nonzero().flatten()
        if len(hits) == 0:
            hits = (ts - t).abs().argmin().flatten()
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.stages:  # set_timesteps was bypassed: behave as the plain scheduler
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        if sample.ndim not in (4, 5):
            raise UnsupportedModelError(
                f"bottleneck sampling needs 4D image or 5D video latents; {self.pipe_name}'s latents have shape "
                f"{tuple(sample.shape)} (packed tokens?). Supported: {SUPPORTED}.")
        i = self._index(timestep)
        n = len(self.sched.timesteps)
        if self.full is None:  # first step of the run: validate every stage, derive the re-noise seeds
            self.full = (int(sample.shape[-2]), int(sample.shape[-1]))
            for st in self.stages:
                stage_size(self.full, st.scale, self.multiple, self.vae_factor)
            self.seeds = noise_seeds(sample, self.config.seed)
        self.steps_run += 1
        if i + 1 >= n:
            self._log_run()
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        nxt = self._stage_of(i + 1)
        size = stage_size(self.full, nxt.scale, self.multiple, self.vae_factor)
        if tuple(sample.shape[-2:]) == size:
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        x0 = None
        if self.kind == "vp":  # data prediction at this step, before the solver advances its index
            x0 = self.sched.convert_model_output(model_output, sample=sample)
        return_dict = kwargs.pop("return_dict", True)
        res = self._orig_step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        if self.kind == "flow":
            sig = self.sched.sigmas
            new = flow_transition(sample, model_output, float(sig[i]), float(sig[i + 1]), size, self.config,
                                  nxt.index, self.seeds)
        elif self.kind == "ddpm":
            ab = float(self.sched.alphas_cumprod[int(self.sched.timesteps[i + 1])])
            new = ddpm_transition(res.pred_original_sample, ab, size, self.config, nxt.index, self.seeds)
        elif self.kind == "ve":
            new = ve_transition(res.pred_original_sample, float(self.sched.sigmas[i + 1]), size, self.config,
                                nxt.index, self.seeds)
        else:  # vp: x = alpha x0 + sigma_t eps with alpha = 1 / sqrt(1 + sigma^2)
            s = float(self.sched.sigmas[i + 1])
            new = ddpm_transition(x0, 1.0 / (1.0 + s * s), size, self.config, nxt.index, self.seeds)
        if self.multistep:
            _restart_multistep(self.sched)
        self.transitions.append({"step": i, "from": tuple(sample.shape[-2:]), "to": size})
        new = new.to(sample.dtype)
        if not return_dict:
            return (new,)
        return dc_replace(res, prev_sample=new) if hasattr(res, "prev_sample") else (new,)

    def describe(self) -> str:
        full = self.full or (0, 0)
        parts = []
        for st in self.stages:
            h, w = (int(round(full[0] * st.scale)), int(round(full[1] * st.scale)))
            px = f" ({h * self.vae_factor}x{w * self.vae_factor} px)" if self.vae_factor and self.full else ""
            shift = f" shift*{st.shift:g}" if self.kind == "flow" and st.shift != 1.0 else ""
            parts.append(f"{st.scale:g}x latent {h}x{w}{px} steps {st.start}-{st.end - 1}{shift}")
        moves = ", ".join(f"step {t['step']}: {t['from']}->{t['to']}" for t in self.transitions)
        mu = f" (dynamic shift mu={self.mu:.3f}, per-stage mu from its token count)" if self.mu is not None else ""
        return (f"{len(self.stages)} stages{mu} [{'; '.join(parts)}], {self.steps_run} steps run, "
                f"{len(self.transitions)} resolution changes [{moves}]")

    def _log_run(self) -> None:
        if self.logged:
            return
        self.logged = True
        log.info("bottleneck sampling (%s, %s): %s", self.pipe_name, type(self.sched).__name__, self.describe())
        if not self.transitions:
            log.warning("bottleneck sampling did nothing in this run of %s: every step it ran was at full "
                        "resolution (img2img strength too low for the low-resolution stage?)", self.pipe_name)


class BottleneckFeature(Feature):
    name = "bottleneck"

    def __init__(self, pipe: Any, config: BottleneckConfig) -> None:
        if not isinstance(config, BottleneckConfig):
            raise TypeError(f"enable_bottleneck_sampling takes a BottleneckConfig, got {type(config).__name__}")
        self.config = config
        check_pipeline(pipe)
        find_denoisers(pipe)
        if getattr(pipe, "scheduler", None) is None:
            raise UnsupportedModelError(f"{type(pipe).__name__} has no scheduler; supported: {SUPPORTED}.")
        scheduler_kind(pipe.scheduler)
        self.patch = None if config.is_off else BottleneckScheduler(pipe, config)

    def remove(self) -> None:
        if self.patch is not None:
            self.patch.remove()
            self.patch = None

    def stats(self) -> dict[str, Any]:
        if self.patch is None:
            return {"scheduler": "off (all scales 1.0)"}
        return {"scheduler": f"bottleneck {self.patch.describe()}"}


def enable_bottleneck_sampling(pipe: Any, config: BottleneckConfig | None = None, **kwargs: Any) -> Any:
    """Turn on bottleneck sampling (settings as in :class:`BottleneckConfig`). Returns ``pipe``."""
    config = make_config(BottleneckConfig, config, kwargs)
    return install(pipe, "bottleneck", lambda: BottleneckFeature(pipe, config))


def disable_bottleneck_sampling(pipe: Any) -> Any:
    """Remove bottleneck sampling; the scheduler's methods are restored exactly. Returns ``pipe``."""
    return uninstall(pipe, "bottleneck")
