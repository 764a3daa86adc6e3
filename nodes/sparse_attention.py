"""ComfyUI adapter for adaptive block-sparse attention (:class:`hasten.kernels.adaspa.AdaSpa`).

Wiring only, through ComfyUI's own extension points on a cloned ModelPatcher:
- ``transformer_options["optimized_attention_override"]``: every ``optimized_attention`` call of the model
  reaches it; self-attention (same token count for queries and keys, no mask) goes to the policy, which
  answers with a sparse/search output or None (then ComfyUI's own attention runs, bit-identical);
- an ``OUTER_SAMPLE`` wrapper gives each sampling run a fresh policy;
- an ``APPLY_MODEL`` wrapper tells the policy the step (sigma's position in the run's schedule) and the
  branch of each batch row (ComfyUI's uuids / cond_or_uncond), and numbers the attention calls of one
  forward so each layer keeps its own pattern.
Wan 2.1/2.2 is supported (its self-attention holds only video tokens); joint-attention models would need
the text token range and are refused with a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..kernels.adaspa import AdaSpa, AdaSpaConfig, AdaSpaStats
from .runs import last_run_stats, rewrap, scoped_run, step_index

log = logging.getLogger("hasten")

WRAPPER_KEY = "hasten_sparse_attention"
HOLDER_KEY = "hasten_sparse_attention"  # transformer_options: the node's settings and last stats
RUN_KEY = "hasten_sparse_attention_run"  # transformer_options: present only during a sampling run
CALL_KEY = "hasten_sparse_attention_call"  # transformer_options: present only inside one model call
OVERRIDE_KEY = "optimized_attention_override"
SUPPORTED = ("WanModel", "VaceWanModel", "CameraWanModel", "HumoWanModel", "WanModel_S2V")
_DEFAULTS = AdaSpaConfig()


@dataclass
class SparseHolder:
    """Settings of one node instance, the override it replaced (if any), and the last run's stats."""

    config: AdaSpaConfig
    previous_override: Any = None
    last_run: AdaSpaStats | None = None


@dataclass
class _Run:
    holder: SparseHolder
    policy: AdaSpa
    sample_sigmas: torch.Tensor


@dataclass
class _Call:
    run: _Run
    step: int
    rows: list[Any]
    counter: list[int] = field(default_factory=lambda: [0])


def stats(model: Any) -> AdaSpaStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh policy (patterns, stats) for every sampling run; stats kept on the holder afterwards."""

    def start(holder: SparseHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        policy = AdaSpa(holder.config)
        policy.begin_run()

        def finish() -> None:
            policy.end_run()
            if policy.last_run is not None:
                holder.last_run = policy.last_run
                log.info("Sparse attention (hasten): %s", policy.last_run.summary())

        return _Run(holder, policy, sigmas), finish

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def apply_model_wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                        c_crossattn: Any = None, control: Any = None, transformer_options: dict | None = None,
                        **kwargs: Any) -> torch.Tensor:
    """Tell the attention override which step and branches this model call is."""
    topts = transformer_options if transformer_options is not None else {}
    run: _Run | None = topts.get(RUN_KEY)
    if run is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    batch = x.shape[0]
    uuids = list(topts.get("uuids") or [])
    if uuids and batch % len(uuids) == 0:
        per = batch // len(uuids)
        rows = [(uuids[i // per], i % per) for i in range(batch)]
    else:
        rows = [("row", batch, i) for i in range(batch)]
    call_opts = dict(topts)
    call_opts[CALL_KEY] = _Call(run, step_index(run.sample_sigmas, t[0]), rows)
    return executor(x, t, c_concat, c_crossattn, control, call_opts, **kwargs)


def attention_override(func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       mask: Any = None, attn_precision: Any = None, skip_reshape: bool = False,
                       skip_output_reshape: bool = False, **kwargs: Any) -> torch.Tensor:
    """ComfyUI attention override: self-attention through the policy, everything else unchanged."""
    topts = kwargs.get("transformer_options") or {}
    call: _Call | None = topts.get(CALL_KEY)
    holder: SparseHolder | None = topts.get(HOLDER_KEY)
    previous = holder.previous_override if holder is not None else None

    def original() -> torch.Tensor:
        args = (q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    if call is None:
        return original()
    layer = call.counter[0]
    call.counter[0] += 1
    if mask is not None or q.shape != k.shape or k.shape != v.shape:  # cross-attention or masked: dense
        return original()
    if skip_reshape:
        b, _, _, d = q.shape
        qh, kh, vh = q, k, v
    else:
        b, s, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.view(b, s, heads, d).transpose(1, 2) for t in (q, k, v))
    out = call.run.policy.attend(layer, call.rows, call.step, qh, kh, vh)
    if out is None:
        return original()
    out = out.to(q.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def patch_model(model: Any, config: AdaSpaConfig) -> Any:
    """A clone of ``model`` whose self-attention goes through AdaSpa (re-patching replaces, never stacks)."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    name = type(dm).__name__
    if name not in SUPPORTED or not hasattr(model, "add_wrapper_with_key"):
        msg = (f"Sparse attention (hasten) does not support {name}: it supports Wan 2.1/2.2 video models "
               f"({', '.join(SUPPORTED)}); joint-attention models need the diffusers adapter.")
        log.error(msg)
        raise UnsupportedModelError(msg)
    import comfy.patcher_extension as pe

    m = rewrap(model, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                     pe.WrappersMP.APPLY_MODEL: apply_model_wrapper})
    topts = m.model_options.setdefault("transformer_options", {})
    old = topts.get(HOLDER_KEY)
    previous = old.previous_override if old is not None else topts.get(OVERRIDE_KEY)
    topts[HOLDER_KEY] = SparseHolder(config, previous_override=previous)
    topts[OVERRIDE_KEY] = attention_override
    return m


class HastenSparseAttention:
    """Node "Sparse Attention (hasten)": AdaSpa adaptive block-sparse self-attention for Wan."""

    CATEGORY = "hasten"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = ("AdaSpa-style sparse attention: after warm-up, each head keeps only the key blocks that hold "
                   "the target share of attention mass; the pattern is reused across steps. 1.0 = off.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "model": ("MODEL",),
                "target_mass": ("FLOAT", {"default": _DEFAULTS.target_mass, "min": 0.5, "max": 1.0, "step": 0.01,
                                          "tooltip": "share of attention mass kept per head (1.0 = off)"}),
                "block_size": ("INT", {"default": _DEFAULTS.block_size, "min": 16, "max": 256, "step": 16}),
                "warmup_steps": ("INT", {"default": _DEFAULTS.warmup_steps, "min": 0, "max": 1000,
                                         "tooltip": "first steps stay dense; the pattern is searched after"}),
                "refresh_every": ("INT", {"default": _DEFAULTS.refresh_every, "min": 0, "max": 1000,
                                          "tooltip": "re-search the pattern every N steps (0 = never)"}),
                "min_seq_len": ("INT", {"default": _DEFAULTS.min_seq_len, "min": 0, "max": 1 << 20,
                                        "tooltip": "shorter sequences stay dense"}),
            }
        }

    def patch(self, model: Any, target_mass: float, block_size: int, warmup_steps: int, refresh_every: int,
              min_seq_len: int) -> tuple:
        config = AdaSpaConfig(target_mass=target_mass, block_size=block_size, warmup_steps=warmup_steps,
                              refresh_every=refresh_every, min_seq_len=min_seq_len)
        return (patch_model(model, config),)


NODE_CLASS_MAPPINGS = {"HastenSparseAttention": HastenSparseAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"HastenSparseAttention": "Sparse Attention (hasten)"}
