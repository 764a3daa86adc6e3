"""ComfyUI adapter for SADA: node "SADA (hasten)" = EasyCache's APPLY_MODEL wrapper (per-branch rows, partial
batches, network-space outputs) driving :class:`hasten.caches.SADA`; every decision is the core's.

It uses EasyCache's wrapper key; on a MODEL that already has EasyCache (hasten) or CacheQuant (hasten) it is a
node error (and vice versa): two step caches never stack.

``tokens`` > 0 adds SADA's token-level sparsity on the Wan family (``comfy.ldm.wan.model.WanModel``), wired like
the diffusers side (:mod:`hasten.pipelines.sada`) through ComfyUI's own extension points on the clone:
- a ``DIFFUSION_MODEL`` wrapper asks the core for the kept tokens of the rows in flight (the branches are named
  by the APPLY_MODEL wrapper's ``uuids`` / partial-batch rows) and fills the pruned tokens' outputs from the
  core's cache afterwards (network-output space, as the core remembers it);
- ``patches_replace["dit"][("double_block", i)]``: block 0 gathers the kept tokens (and slices the rotary table
  ``pe`` and a per-token ``vec``), every block runs on them, the last block scatters them back into the full
  sequence before the output head;
- ``transformer_options["optimized_attention_override"]``: the first attention call of each block is its
  self-attention (Wan: ``self_attn`` runs before ``cross_attn``); a full forward remembers each branch's keys/
  values there, a token-level one puts its kept tokens' fresh ones into them, so kept queries see every token.
  Cross-attention passes through; an override set earlier by another node is chained, not replaced.
Same keys in ComfyUI 0.33 (which adds a ``patches["double_block"]`` post-block hook that would see the kept
tokens only, and attention tensor containers that an override without ``container_function`` receives unpacked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..caches import RunStats
from ..caches.sada import SADA, SADAConfig
from ..caches.sada_tokens import TokenCall, TokenKV, put_tokens, take_tokens
from .easycache import (
    RUN_KEY,
    WRAPPER_KEY,
    _check_hookable,
    _Run,
    apply_model_wrapper,
    refuse_other_step_cache,
    step_cache_outermost,
)
from .runs import batch_rows, last_run_stats, num_steps_of, rewrap, scoped_run
from .schema import CATEGORY, advanced, fail, io
from .sparse_attention import HOLDER_KEY as SPARSE_HOLDER_KEY
from .sparse_attention import OVERRIDE_KEY

log = logging.getLogger("hasten")
NAME = "SADA (hasten)"
HOLDER_KEY = "hasten_sada"
TOKENS_KEY = "hasten_sada_tokens"  # DIFFUSION_MODEL wrapper key of the token-level wiring
TOKEN_MODELS = ("WanModel",)  # comfy.ldm.wan.model.WanModel (Wan 2.1/2.2 T2V/I2V, hasten's embedded models)

_DEFAULTS = SADAConfig()


def run_text(result: RunStats) -> str:
    """A run's statistics as the node reports them."""
    return (f"{NAME}: {result.computed}/{result.calls} branch forwards computed, {result.reused} skipped "
            f"(estimated {result.estimated_speedup:.2f}x, {result.num_steps} steps)")


def token_text(token_calls: int, kept: int, total: int) -> str:
    """The token-level part of a run's statistics."""
    frac = kept / total if total else 0.0
    return f"{token_calls} computed token-level ({frac:.0%} of their tokens)"


@dataclass
class SADAHolder:
    """Settings of one node instance plus the statistics of its most recent sampling run."""

    config: SADAConfig
    last_run: RunStats | None = None
    notes: list[str] = field(default_factory=list)
    patch: tuple[int, int, int] | None = None  # token-level wiring: the model's (pt, ph, pw) patch size
    num_blocks: int = 0
    previous_override: Any = None  # an attention override set before this node (chained)
    last_tokens: tuple[int, int, int] | None = None  # (token-level calls, tokens kept, tokens they had)

    def stats_text(self) -> str | None:
        if self.last_run is None:
            return None
        text = run_text(self.last_run)
        return text if self.last_tokens is None else f"{text}; {token_text(*self.last_tokens)}"

    def note_once(self, message: str) -> None:
        """Log ``message`` as a warning once per sampling run."""
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s: %s", NAME, message)


@dataclass
class _SADARun(_Run):
    """One sampling run, plus the token-level wiring's state (per run: nothing leaks into the next)."""

    patch: tuple[int, int, int] | None = None
    num_blocks: int = 0
    rows: list[Any] | None = None  # branch keys of the forward in flight
    active: TokenCall | None = None  # set during a token-level forward
    block: int = -1  # the block running now
    expect_self: bool = False  # the block's next attention call is its self-attention
    kv: TokenKV = field(default_factory=TokenKV)

    def has_kv(self, keys: list[Any], num_tokens: int) -> bool:
        """Every branch holds every block's self-attention keys/values for this token count."""
        return self.kv.ready(keys, self.num_blocks, num_tokens)

    def complete_kv(self, k: torch.Tensor, v: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention keys/values of the running block, completed for a token-level forward (core)."""
        assert self.rows is not None
        return self.kv.complete(self.rows, self.block, None if self.active is None else self.active.idx, k, v, dim)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh SADA policy per sampling run (EasyCache's APPLY_MODEL wrapper reads it under RUN_KEY)."""

    def start(holder: SADAHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        num_steps = num_steps_of(sigmas)
        holder.notes.clear()  # a note is logged once per run, so every run that falls back says so
        cache = SADA(holder.config)
        cache.begin_run(num_steps)

        def finish() -> None:
            result = cache.end_run()
            if not result.calls:
                return
            holder.last_run = result
            wired = holder.patch is not None
            holder.last_tokens = (cache.token_calls, cache.tokens_kept, cache.tokens_total) if wired else None
            log.info("%s", holder.stats_text())
            if wired and result.reused == 0 and cache.token_calls == 0:
                log.warning("%s: neither a step nor a token was pruned over %s steps (the run is too short for the "
                            "acceleration range, or every step was forced)", NAME, result.num_steps)
            elif not wired and result.reused == 0 and not holder.config.is_off:
                log.warning("%s: nothing skipped over %s steps (the trajectory was never stable by SADA's "
                            "criterion in the acceleration range; raise threshold or use more steps)", NAME,
                            result.num_steps)

        run = _SADARun(holder, cache, num_steps, patch=holder.patch, num_blocks=holder.num_blocks)  # type: ignore[arg-type]
        return run, finish

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


# -- token level ---------------------------------------------------------------------------------
def _per_token(vec: torch.Tensor, n: int) -> torch.Tensor:
    """A Wan modulation ``(B, L, 6, C)`` with one entry per frame (or token) spread to ``n`` tokens, as the block
    spreads it over its input (``repeat_e``: each entry repeated over consecutive tokens)."""
    m = vec.shape[1]
    if m == n:
        return vec
    r = n // m
    return vec.repeat_interleave(r if r * m == n else r + 1, dim=1)[:, :n]


def diffusion_model_wrapper(executor: Any, x: torch.Tensor, timestep: Any, context: Any, clip_fea: Any = None,
                            time_dim_concat: Any = None, transformer_options: dict | None = None,
                            **kwargs: Any) -> torch.Tensor:
    """One WanModel forward: the core's kept-token plan for its rows, then the pruned tokens' outputs filled."""
    topts = transformer_options if transformer_options is not None else {}
    run = topts.get(RUN_KEY)

    def call() -> torch.Tensor:
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    if not isinstance(run, _SADARun) or run.patch is None:
        return call()
    keys = batch_rows(topts, x.shape[0])
    extra = [n for n in ("reference_latent", "context_latents") if kwargs.get(n) is not None]
    if time_dim_concat is not None:
        extra.append("time_dim_concat")
    whole = x.ndim == 5 and all(s % p == 0 for s, p in zip(x.shape[2:], run.patch, strict=True))
    if keys is None or extra or not whole:
        run.holder.note_once(f"token-level sparsity skipped a forward it cannot prune (tokens beyond the latent "
                             f"grid: {extra}, or a latent {tuple(x.shape)} that is not whole {run.patch} patches); "
                             "computing it in full")
        return call()
    dit = topts.get("patches_replace", {}).get("dit", {})
    mine = topts.get(OVERRIDE_KEY) is attention_override and all(
        isinstance(dit.get(("double_block", i)), _TokenBlock) for i in range(run.num_blocks))
    if not mine:
        run.holder.note_once("another node applied after this one replaced the Wan block patches or the attention "
                             "override that token-level sparsity needs; this run is step-level SADA only (token-level "
                             "SADA does not combine with block caches or sparse attention: set tokens = 0)")
        return call()
    cache: SADA = run.cache  # type: ignore[assignment]
    out_dim = int(getattr(executor.class_obj, "out_dim", x.shape[1]))
    like = [x[i : i + 1, :out_dim] for i in range(x.shape[0])]  # the latent rows the core remembers (no c_concat)
    num_tokens = (x.shape[2] // run.patch[0]) * (x.shape[3] // run.patch[1]) * (x.shape[4] // run.patch[2])
    plans = cache.token_plan(keys, like, run.patch, allowed=run.has_kv(keys, num_tokens))
    run.active = None if plans is None else TokenCall(torch.stack(plans).to(x.device))
    run.rows = keys
    active = run.active
    try:
        out = call()
    finally:
        run.rows, run.active, run.block, run.expect_self = None, None, -1, False
    if plans is None:
        return out
    if active is None or active.full is None:
        raise RuntimeError(f"{NAME} tokens: the forward never reached the first Wan block's patch; token-level "
                           "SADA supports comfy.ldm.wan.model.WanModel")
    with torch.no_grad():
        return torch.cat([cache.fill(key, out[j : j + 1]) for j, key in enumerate(keys)])


class _TokenBlock:
    """``patches_replace["dit"][("double_block", index)]``: runs the Wan block on the kept tokens during a
    token-level forward (block 0 gathers, the last block scatters); marks the block for the attention override."""

    def __init__(self, index: int, last: bool) -> None:
        self.index, self.last = index, last

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        run = args["transformer_options"].get(RUN_KEY)
        if not isinstance(run, _SADARun) or run.rows is None:
            return original(args)
        run.block, run.expect_self = self.index, True
        call = run.active
        if call is None:
            return original(args)
        img, idx = args["img"], call.idx
        if self.index == 0:
            if img.shape[0] != idx.shape[0]:
                raise RuntimeError(f"{NAME} tokens: block input has {img.shape[0]} rows, the plan {idx.shape[0]}")
            call.full = img
            img = take_tokens(img, idx, 1)
        assert call.full is not None
        n = call.full.shape[1]
        new = dict(args, img=img)
        vec = args.get("vec")
        if torch.is_tensor(vec) and vec.ndim == 4 and vec.shape[1] > 1:  # Wan 2.2: per-frame/-token modulation
            if id(vec) not in call.memo:
                call.memo[id(vec)] = take_tokens(_per_token(vec, n), idx, 1)
            new["vec"] = call.memo[id(vec)]
        pe = args.get("pe")
        if torch.is_tensor(pe) and pe.ndim >= 2 and pe.shape[1] == n:  # rotary table (1 or B, L, ...)
            new["pe"] = call.memo.setdefault(id(pe), take_tokens(pe, idx, 1))
        out = original(new)
        if not self.last:
            return out
        return {**out, "img": put_tokens(call.full, idx, out["img"])}


def attention_override(func: Any, *args: Any, **kwargs: Any) -> Any:
    """ComfyUI's ``optimized_attention_override``: a block's self-attention gets its keys/values completed (full
    forward: remembered) by the run; every other call (cross-attention, other models) passes through."""
    topts = kwargs.get("transformer_options") or {}
    run = topts.get(RUN_KEY)
    if isinstance(run, _SADARun) and run.rows is not None and run.expect_self:
        run.expect_self = False
        dim = 2 if kwargs.get("skip_reshape") else 1
        if len(args) < 3 or args[1].shape[dim] != args[0].shape[dim]:
            raise RuntimeError(f"{NAME} tokens: block {run.block}'s first attention call is not a self-attention "
                               "with positional (q, k, v); token-level SADA supports comfy.ldm.wan.model.WanModel")
        k, v = run.complete_kv(args[1], args[2], dim)
        args = (args[0], k, v, *args[3:])
    holder = topts.get(HOLDER_KEY)
    previous = getattr(holder, "previous_override", None)
    return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)


def _token_model(model: Any) -> tuple[tuple[int, int, int], int]:
    """(patch size, number of blocks) of a Wan model; a node error naming what is supported otherwise."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    name = type(dm).__name__
    blocks = getattr(dm, "blocks", None)
    patch = tuple(int(p) for p in getattr(dm, "patch_size", ()) or ())
    if name not in TOKEN_MODELS or not isinstance(blocks, torch.nn.ModuleList) or len(patch) != 3:
        fail(NAME, f"token-level sparsity (tokens > 0) does not support {name}: pruning tokens inside the blocks "
                   f"needs the model's per-token side inputs sliced to match. Supported: the Wan family "
                   f"(comfy.ldm.wan.model.{', '.join(TOKEN_MODELS)}: Wan 2.1/2.2, hasten's embedded models). "
                   f"tokens = 0 (step-level SADA) works on every model.")
    return patch, len(blocks)  # type: ignore[return-value]


def _unwire_tokens(m: Any) -> None:
    """Remove an earlier SADA node's token wiring from the clone ``m`` (re-patching replaces, never stacks)."""
    import comfy.patcher_extension as pe

    m.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, TOKENS_KEY)
    topts = m.model_options.get("transformer_options", {})
    old = topts.get(HOLDER_KEY)
    if isinstance(getattr(old, "patch", None), tuple):
        if topts.get(OVERRIDE_KEY) is attention_override:
            if old.previous_override is None:
                topts.pop(OVERRIDE_KEY, None)
            else:
                topts[OVERRIDE_KEY] = old.previous_override
        dit = topts.get("patches_replace", {}).get("dit")
        if dit:
            topts["patches_replace"] = dict(topts["patches_replace"])
            topts["patches_replace"]["dit"] = {k: v for k, v in dit.items() if not isinstance(v, _TokenBlock)}


def _wire_tokens(m: Any, holder: SADAHolder) -> None:
    """Token-level wiring on the clone ``m`` (a node error, ``m`` discarded, when the model is not supported or
    another node already replaced its blocks / runs sparse attention)."""
    import comfy.patcher_extension as pe

    patch, num_blocks = _token_model(m)
    topts = m.model_options.setdefault("transformer_options", {})
    taken = [k for k in topts.get("patches_replace", {}).get("dit", {}) if k[0] == "double_block"]
    if taken:
        fail(NAME, f"token-level sparsity needs the Wan blocks, but another node already replaced {len(taken)} of "
                   "them (a block cache such as Δ-DiT / ProfilingDiT?). Use tokens = 0 (step-level SADA) with it.")
    if SPARSE_HOLDER_KEY in topts:
        fail(NAME, "token-level sparsity shortens the query sequence that Sparse Attention (hasten) works on; use "
                   "tokens = 0 (step-level SADA) with it.")
    holder.patch, holder.num_blocks, holder.previous_override = patch, num_blocks, topts.get(OVERRIDE_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, TOKENS_KEY, diffusion_model_wrapper)
    for i in range(num_blocks):
        m.set_model_patch_replace(_TokenBlock(i, i == num_blocks - 1), "dit", "double_block", i)
    m.model_options["transformer_options"][OVERRIDE_KEY] = attention_override


def patch_model(model: Any, config: SADAConfig) -> Any:
    """A clone of ``model`` with SADA (a node error on a MODEL that already has EasyCache / CacheQuant, or with
    tokens on a model that is not Wan)."""
    _check_hookable(model)
    import comfy.patcher_extension as pe

    refuse_other_step_cache(model, NAME, outer_sample_wrapper)
    if config.token_level:
        _token_model(model)  # refuse before anything is built
    m = step_cache_outermost(rewrap(model, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                                         pe.WrappersMP.APPLY_MODEL: apply_model_wrapper}))
    _unwire_tokens(m)
    holder = SADAHolder(config)
    if config.token_level:
        _wire_tokens(m, holder)
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = holder
    return m


def stats(model: Any) -> RunStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


class HastenSADA(io.ComfyNode):
    """Node "SADA (hasten)": skip denoiser steps where the sampling trajectory is stable."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenSADA",
            display_name=NAME,
            category=CATEGORY,
            description=("SADA (Jiang et al., ICML 2025), training-free: skips a step when the second-order "
                         "difference of the denoiser's recent outputs says the ODE trajectory is stable, and "
                         "extrapolates the skipped output from them (Adams-Bashforth-like / Lagrange). Per CFG "
                         "branch, every ComfyUI diffusion model. With tokens > 0 (Wan family) computed steps also "
                         "run only the fastest-changing tokens through the blocks; the others reuse their "
                         "cached output."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to accelerate (it is cloned, not changed)."),
                io.Int.Input("max_interval", default=_DEFAULTS.max_interval, min=0, max=10,
                             tooltip="Most skipped steps in a row. 0 = off (bit-identical to no cache)."),
                io.Float.Input("threshold", default=_DEFAULTS.threshold, min=-2.0, max=2.0, step=0.05,
                               tooltip="Stability test: skip while mean(-second difference) <= threshold x "
                                       "mean|first difference|. 0 = the paper's sign test; higher skips more."),
                io.Float.Input("start_percent", default=_DEFAULTS.start, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps always computed at the start."),
                io.Float.Input("end_percent", default=_DEFAULTS.end, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which every step is computed."),
                io.Int.Input("order", default=_DEFAULTS.order, min=1, max=2,
                             tooltip="Extrapolation order of a skipped step (1 = linear, 2 = Lagrange).",
                             **advanced()),
                io.Float.Input("tokens", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Token-level sparsity (Wan family only): fraction of tokens a computed step "
                                       "in the acceleration range runs through the blocks (the fastest-changing "
                                       "ones plus a spread grid); the rest reuse their cached output. 0 or 1 = "
                                       "off (step-level SADA only)."),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with SADA; connect it to any sampler.")],
        )

    @classmethod
    def execute(cls, model: Any, max_interval: int = _DEFAULTS.max_interval, threshold: float = _DEFAULTS.threshold,
                start_percent: float = _DEFAULTS.start, end_percent: float = _DEFAULTS.end,
                order: int = _DEFAULTS.order, tokens: float = 0.0) -> io.NodeOutput:
        config = SADAConfig(max_interval=max_interval, threshold=threshold, start=start_percent, end=end_percent,
                            order=order, tokens=tokens if tokens and tokens > 0 else None)
        return io.NodeOutput(patch_model(model, config))


NODES = [HastenSADA]
