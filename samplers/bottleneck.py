"""Bottleneck sampling: denoise high -> low -> high resolution (Tian et al., "Training-free Diffusion
Acceleration with Bottleneck Sampling").

The first stage runs at full resolution (it fixes the layout), the middle stage(s) at a lower one (cheap:
attention cost falls with the square of the token count), the last stage at full resolution again
(restores detail). At each stage transition the latent is brought to the new resolution through the
model's clean estimate ``x0_hat`` and re-noised with fresh noise to the level the next stage starts at,
so the sampler always sees a latent on its expected noise level:

* flow matching (``x = (1 - s) x0 + s eps``): ``x0_hat = x - s_i v``; the next stage starts at
  ``(1 - s') resize(x0_hat) + s' eps``. Each stage uses its own timestep shift
  ``s -> r s / (1 + (r - 1) s)`` with ``r`` = ``shifts[k]`` (default: the stage's scale, the
  resolution-dependent shift of SD3, sqrt of the token ratio). A low-resolution stage therefore ends
  at a lower noise level than the full-resolution one resumes at: going back up re-injects noise.
* DDPM-style (``x = sqrt(a) x0 + sqrt(1 - a) eps``): the scheduler's ``x0`` prediction is resized and
  re-noised with ``a = alpha_bar`` of the next timestep (no timestep shift for these schedules);
  sigma-scaled samplers (Euler, ``x = x0 + sigma eps``) likewise with ``a = 1 / (1 + sigma^2)``.

The re-injected noise of each image is drawn from a seed derived from that image's own starting noise
(:func:`noise_seeds`): it follows the user's seed and does not depend on the rest of the batch.

Image latents (B, C, H, W) and video latents (B, C, F, H, W) are resized in H and W only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validation import check_choice, check_float, check_float_tuple, check_seed


@dataclass
class BottleneckConfig:
    """Settings for bottleneck sampling.

    Attributes:
        scales: resolution factor of each stage; the first and last must be 1.0, the others in (0, 1].
            All 1.0 turns the feature off (bit-identical to plain sampling).
        boundaries: fraction of the run's steps at which each stage ends (one fewer than ``scales``,
            strictly increasing, in (0, 1)).
        shifts: per-stage timestep-shift multiplier for flow-matching schedules (None = the stage's scale).
        renoise: extra noise at each up-sampling, as a fraction of the remaining gap to pure noise, in [0, 1).
        upsample: interpolation mode for going up ("nearest", "bilinear", "bicubic").
        seed: salt mixed into the re-injected noise. The noise itself follows each image's own starting
            noise (so the user's seed/generator decides it, and an image does not depend on its place in
            the batch); change ``seed`` only to draw a different re-noising for the same images.
    """

    scales: tuple[float, ...] = (1.0, 0.5, 1.0)
    boundaries: tuple[float, ...] = (0.2, 0.7)
    shifts: tuple[float, ...] | None = None
    renoise: float = 0.0
    upsample: str = "bicubic"
    seed: int = 0

    def __post_init__(self) -> None:
        own = "BottleneckConfig"
        self.scales = check_float_tuple(own, "scales", self.scales, lo=0.0, hi=1.0, lo_open=True)
        if len(self.scales) < 1:
            raise ValueError("BottleneckConfig.scales needs at least one stage")
        if self.scales[0] != 1.0 or self.scales[-1] != 1.0:
            raise ValueError(f"BottleneckConfig.scales must start and end at 1.0 (full resolution), got {self.scales}")
        self.boundaries = check_float_tuple(own, "boundaries", self.boundaries, lo=0.0, hi=1.0, lo_open=True)
        if len(self.boundaries) != len(self.scales) - 1:
            raise ValueError(f"BottleneckConfig.boundaries needs {len(self.scales) - 1} values (one per stage "
                             f"transition), got {len(self.boundaries)}")
        if any(b >= 1.0 for b in self.boundaries) or list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"BottleneckConfig.boundaries must be strictly increasing in (0, 1), got {self.boundaries}")
        if self.shifts is not None:
            self.shifts = check_float_tuple(own, "shifts", self.shifts, length=len(self.scales), lo=0.0,
                                            lo_open=True)
            if any(s > 1e3 for s in self.shifts):
                raise ValueError(f"BottleneckConfig.shifts must each be in (0, 1000], got {self.shifts}")
        self.renoise = check_float(own, "renoise", self.renoise, lo=0.0, hi=1.0, hi_open=True)
        self.upsample = check_choice(own, "upsample", self.upsample, ("nearest", "bilinear", "bicubic"))
        self.seed = check_seed(own, "seed", self.seed)

    @property
    def is_off(self) -> bool:
        return all(s == 1.0 for s in self.scales)

    def stage_shift(self, k: int) -> float:
        return self.shifts[k] if self.shifts is not None else self.scales[k]


@dataclass
class Stage:
    """One resolution stage: steps ``[start, end)`` of the run at ``scale`` of the full resolution."""

    index: int
    scale: float
    start: int
    end: int
    shift: float


def plan(config: BottleneckConfig, num_steps: int) -> list[Stage]:
    """Split a ``num_steps`` run into stages (each gets at least one step)."""
    n = len(config.scales)
    if num_steps < n:
        raise ValueError(f"bottleneck sampling with {n} stages needs at least {n} steps, got {num_steps}")
    ends = []
    for k, b in enumerate(config.boundaries):
        e = round(b * num_steps)
        lo = (ends[-1] if ends else 0) + 1
        ends.append(min(max(e, lo), num_steps - (n - 1 - k)))
    ends.append(num_steps)
    starts = [0] + ends[:-1]
    return [Stage(k, config.scales[k], starts[k], ends[k], config.stage_shift(k)) for k in range(n)]


def shift_sigma(sigma: torch.Tensor, r: float) -> torch.Tensor:
    """The flow-matching timestep shift ``r s / (1 + (r - 1) s)`` (composes multiplicatively in r)."""
    return r * sigma / (1 + (r - 1) * sigma)


def flow_sigmas(config: BottleneckConfig, base: torch.Tensor, stages: list[Stage]) -> torch.Tensor:
    """Per-step sigmas (``len(base)`` values, last one the terminal 0) with each stage's own shift.

    ``base`` is the scheduler's own schedule (N steps + terminal). A stage keeps the base sigmas of its
    steps, shifted by its multiplier; the terminal sigma is kept.
    """
    out = base.clone().double()
    for st in stages:
        if st.shift != 1.0:
            out[st.start : st.end] = shift_sigma(base[st.start : st.end].double(), st.shift)
    out[-1] = base[-1]
    return out.to(base.dtype)


def stage_size(full: tuple[int, int], scale: float, multiple: int, vae_factor: int | None = None) -> tuple[int, int]:
    """Latent (H, W) of a stage; raises a clear error if it is not a whole multiple of the patch size."""
    out = []
    for n in full:
        m = n * scale
        if abs(m - round(m)) > 1e-6 or round(m) % multiple or round(m) < multiple:
            px = f" ({vae_factor * n} px)" if vae_factor else ""
            need = math.ceil(multiple / scale)
            raise ValueError(
                f"bottleneck stage scale {scale} turns a latent side of {n}{px} into {m:g}, but the denoiser needs a "
                f"whole multiple of {multiple} (its patch size / down-sampling factor). Use sizes whose latent side "
                f"is a multiple of {need}" + (f" (images: multiples of {need * vae_factor} px)" if vae_factor else "")
                + " or another scale."
            )
        out.append(int(round(m)))
    return out[0], out[1]


def resize_latent(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize the last two (spatial) dims of a 4D image or 5D video latent; area for down-sampling."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] <= x.shape[-2] and size[1] <= x.shape[-1]
    kw = {"mode": "area"} if down else {"mode": mode, **({} if mode == "nearest" else {"align_corners": False})}
    if x.ndim == 4:
        return F.interpolate(x.float(), size=size, **kw).to(x.dtype)
    if x.ndim == 5:
        b, c, f, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        y = F.interpolate(y.float(), size=size, **kw).to(x.dtype)
        return y.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4).contiguous()
    raise ValueError(f"bottleneck sampling handles 4D image or 5D video latents, got shape {tuple(x.shape)}")


def noise_seeds(initial: torch.Tensor, salt: int = 0) -> list[int]:
    """One re-noising seed per batch row, derived from that row's starting latent (and ``salt``).

    The starting latent is the noise the user's seed/generator drew, so the re-injected noise follows
    the user's seed (different seeds stay as diverse as without bottleneck sampling), and a row's noise
    does not depend on the other rows of the batch or on its position in it.
    """
    seeds = []
    for row in initial.detach().to("cpu", torch.float32).contiguous():
        h = hashlib.blake2b(row.numpy().tobytes(), digest_size=8, key=str(int(salt)).encode())
        seeds.append(int.from_bytes(h.digest(), "little") & (2**63 - 1))
    return seeds


def fresh_noise(like: torch.Tensor, seeds: Sequence[int], stage: int) -> torch.Tensor:
    """Standard normal noise shaped like ``like``: row ``i`` from ``seeds[i]`` and the stage index."""
    if len(seeds) != like.shape[0]:
        raise ValueError(f"fresh_noise needs one seed per batch row ({like.shape[0]}), got {len(seeds)}")
    rows = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed((int(s) * 1_000_003 + stage * 10_007) % (2**63 - 1))
        rows.append(torch.randn(like.shape[1:], generator=g, dtype=torch.float32))
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def flow_transition(x: torch.Tensor, v: torch.Tensor, sigma: float, next_sigma: float, size: tuple[int, int],
                    config: BottleneckConfig, stage: int, seeds: Sequence[int]) -> torch.Tensor:
    """Flow matching: move latent ``x`` (at ``sigma``, velocity ``v``) to ``size`` at ``next_sigma``."""
    x0 = x.float() - sigma * v.float()
    x0 = resize_latent(x0, size, config.upsample)
    s = next_sigma + config.renoise * (1.0 - next_sigma) if size[0] > x.shape[-2] else next_sigma
    noise = fresh_noise(x0, seeds, stage)
    return ((1.0 - s) * x0 + s * noise).to(x.dtype)


def ddpm_transition(x0: torch.Tensor, alpha_bar: float, size: tuple[int, int], config: BottleneckConfig,
                    stage: int, seeds: Sequence[int]) -> torch.Tensor:
    """DDPM-style (``x = sqrt(a) x0 + sqrt(1 - a) eps``): re-noise the resized clean estimate to ``a``."""
    up = size[0] > x0.shape[-2]
    y = resize_latent(x0.float(), size, config.upsample)
    if up and config.renoise > 0:
        alpha_bar = alpha_bar * (1.0 - config.renoise)
    noise = fresh_noise(y, seeds, stage)
    return (math.sqrt(alpha_bar) * y + math.sqrt(1.0 - alpha_bar) * noise).to(x0.dtype)


def ve_transition(x0: torch.Tensor, sigma: float, size: tuple[int, int], config: BottleneckConfig,
                  stage: int, seeds: Sequence[int]) -> torch.Tensor:
    """Sigma-scaled (k-diffusion / Euler, ``x = x0 + sigma eps``): the same re-noising as DDPM with
    ``a = 1 / (1 + sigma^2)``, expressed in the scheduler's unnormalised latent."""
    up = size[0] > x0.shape[-2]
    y = resize_latent(x0.float(), size, config.upsample)
    if up and config.renoise > 0:
        alpha_bar = (1.0 - config.renoise) / (1.0 + sigma * sigma)
        sigma = math.sqrt(1.0 / alpha_bar - 1.0)
    noise = fresh_noise(y, seeds, stage)
    return (y + sigma * noise).to(x0.dtype)


def flops_fraction(config: BottleneckConfig, num_steps: int, attention_weight: float = 0.0) -> float:
    """Estimated denoiser cost relative to full resolution (token-linear, plus a quadratic attention part)."""
    total = 0.0
    for st in plan(config, num_steps):
        t = st.scale**2
        total += (st.end - st.start) * ((1 - attention_weight) * t + attention_weight * t * t)
    return total / num_steps
