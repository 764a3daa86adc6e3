"""diffusers adapter for bottleneck sampling (see :mod:`hasten.samplers.bottleneck`).

Approach: the pipeline's own denoising loop is kept; only its scheduler instance is patched (two
instance attributes, removed again by ``disable_bottleneck_sampling``):

* ``set_timesteps`` lets the scheduler build its normal schedule, then (flow matching) replaces the
  sigmas/timesteps with the per-stage shifted ones. It marks the start of a run.
* ``step`` runs the scheduler's normal step, except on the last step of a stage, where it returns the
  latent already moved to the next stage's resolution and noise level. Diffusers pipelines carry
  whatever ``scheduler.step`` returns into the next iteration, and the denoisers accept any size that
  respects their patch size, so no pipeline code is copied or forked.

This keeps the user's call (prompts, CFG, callbacks, other hasten hooks) untouched; caches below see
the resolution change and reset. Multistep flow solvers (UniPC, DPM-Solver++ with flow sigmas) restart
their history at each stage change, since their stored outputs belong to the old resolution.
Packed-latent pipelines (Flux: tokens plus precomputed image ids) and sigma-scaled (Karras/EDM)
schedulers are refused with a clear error.
"""

from __future__ import annotations

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
    plan,
    stage_size,
)
from .denoiser import find_denoisers
from .registry import Feature, install, make_config, uninstall

SUPPORTED = ("pipelines with 4D/5D latents (Wan 2.1 and the embedded model, SD3, SD 1.5, SDXL, PixArt) using "
             "FlowMatchEulerDiscreteScheduler, UniPC / DPM-Solver multistep in flow-prediction mode, "
             "DDIMScheduler or DDPMScheduler")
DDPM_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
FLOW_MULTISTEP = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def _is_flow_multistep(sched: Any) -> bool:
    cfg = sched.config
    return type(sched).__name__ in FLOW_MULTISTEP and (
        bool(getattr(cfg, "use_flow_sigmas", False)) or getattr(cfg, "prediction_type", None) == "flow_prediction")


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


class BottleneckScheduler:
    """Holds the patched scheduler's run state: the stage plan, the step counter, the full size."""

    def __init__(self, pipe: Any, config: BottleneckConfig) -> None:
        self.config = config
        self.sched = pipe.scheduler
        name = type(self.sched).__name__
        self.multistep = _is_flow_multistep(self.sched)
        if ("FlowMatch" in name and "Euler" in name) or self.multistep:
            self.kind = "flow"
        elif name in DDPM_SCHEDULERS:
            self.kind = "ddpm"
        else:
            raise UnsupportedModelError(f"bottleneck sampling does not support the {name} scheduler; supported: "
                                        f"{SUPPORTED}.")
        self.multiple = _patch_multiple(pipe)
        self.vae_factor = _vae_factor(pipe)
        self.stages: list[Stage] = []
        self.i = 0
        self.full: tuple[int, int] | None = None
        self.transitions: list[dict] = []
        self._orig_set, self._orig_step = self.sched.set_timesteps, self.sched.step
        self.sched.set_timesteps = self.set_timesteps
        self.sched.step = self.step

    def remove(self) -> None:
        for attr in ("set_timesteps", "step"):
            if attr in vars(self.sched):
                delattr(self.sched, attr)

    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig_set(*args, **kwargs)
        n = len(self.sched.timesteps)
        self.stages = plan(self.config, n)
        self.i, self.full, self.transitions = 0, None, []
        if self.kind == "flow":
            sig = flow_sigmas(self.config, self.sched.sigmas, self.stages)
            self.sched.sigmas = sig
            self.sched.timesteps = (sig[:-1] * self.sched.config.num_train_timesteps).to(self.sched.timesteps.dtype)
        return out

    def _stage_of(self, i: int) -> Stage:
        for st in self.stages:
            if st.start <= i < st.end:
                return st
        return self.stages[-1]

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.ndim not in (4, 5):
            raise UnsupportedModelError(
                f"bottleneck sampling needs 4D image or 5D video latents; this pipeline's latents have shape "
                f"{tuple(sample.shape)} (packed tokens, e.g. Flux). Supported: {SUPPORTED}.")
        if not self.stages:  # set_timesteps was bypassed: behave as the plain scheduler
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        i = self.i
        self.i += 1
        if self.full is None:
            self.full = (int(sample.shape[-2]), int(sample.shape[-1]))
            for st in self.stages:  # validate every stage up front
                stage_size(self.full, st.scale, self.multiple, self.vae_factor)
        st = self._stage_of(i)
        if i != st.end - 1 or st.index == len(self.stages) - 1:
            return self._orig_step(model_output, timestep, sample, *args, **kwargs)
        nxt = self.stages[st.index + 1]
        size = stage_size(self.full, nxt.scale, self.multiple, self.vae_factor)
        return_dict = kwargs.pop("return_dict", True)
        res = self._orig_step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        if self.kind == "flow":
            sig = self.sched.sigmas
            new = flow_transition(sample, model_output, float(sig[i]), float(sig[i + 1]), size, self.config,
                                  nxt.index)
            if self.multistep:
                _restart_multistep(self.sched)
        else:
            t_next = int(self.sched.timesteps[i + 1])
            ab = float(self.sched.alphas_cumprod[t_next])
            x0 = res.pred_original_sample
            new = ddpm_transition(x0, ab, size, self.config, nxt.index)
        self.transitions.append({"step": i, "from": tuple(sample.shape[-2:]), "to": size})
        if not return_dict:
            return (new,)
        return dc_replace(res, prev_sample=new) if hasattr(res, "prev_sample") else (new,)


class BottleneckFeature(Feature):
    name = "bottleneck"

    def __init__(self, pipe: Any, config: BottleneckConfig) -> None:
        self.config = config
        if type(pipe).__name__.startswith("Flux"):
            raise UnsupportedModelError(
                f"bottleneck sampling does not support {type(pipe).__name__} yet (packed latent tokens with "
                f"precomputed image ids); supported: {SUPPORTED}.")
        find_denoisers(pipe)
        self.patch = None if config.is_off else BottleneckScheduler(pipe, config)

    def remove(self) -> None:
        if self.patch is not None:
            self.patch.remove()
            self.patch = None

    def stats(self) -> dict[str, Any]:
        if self.patch is None:
            return {"scheduler": "off (all scales 1.0)"}
        stages = ", ".join(f"{s.scale:g}x steps {s.start}-{s.end - 1} shift*{s.shift:g}" for s in self.patch.stages)
        moves = "; ".join(f"step {t['step']}: {t['from']}->{t['to']}" for t in self.patch.transitions)
        return {"scheduler": f"bottleneck stages [{stages}] transitions [{moves}]"}


def enable_bottleneck_sampling(pipe: Any, config: BottleneckConfig | None = None, **kwargs: Any) -> Any:
    """Turn on bottleneck sampling (settings as in :class:`BottleneckConfig`). Returns ``pipe``."""
    config = make_config(BottleneckConfig, config, kwargs)
    return install(pipe, "bottleneck", lambda: BottleneckFeature(pipe, config))


def disable_bottleneck_sampling(pipe: Any) -> Any:
    """Remove bottleneck sampling; the scheduler's methods are restored exactly. Returns ``pipe``."""
    return uninstall(pipe, "bottleneck")
