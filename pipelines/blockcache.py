"""diffusers adapter for the block caches (Δ-DiT, ProfilingDiT): hooks on the denoiser and its blocks.

* The denoiser hook identifies each call (branches from the call pattern, step, run start) and asks the
  policy for the call's :class:`~hasten.caches.blockcache.StepPlan`.
* One hook per transformer block (the denoiser's largest list of repeated blocks, found generically)
  carries the plan out: a reused span's first block returns ``input + cached residual`` without running,
  its other blocks pass their input through; a recorded span keeps its input and hands the residual to
  the policy at its last block. Blocks returning several streams (``(encoder_hidden_states,
  hidden_states)`` of Flux/SD3/HunyuanVideo joint blocks) are handled per stream: each output is matched
  to the input of the same shape (ties: the closest one, as residual blocks keep their output near their
  input), learned on the block's first real forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ..caches.blockcache import (
    BlockCache,
    BlockRunStats,
    DeltaDiT,
    DeltaDiTConfig,
    ProfilingDiT,
    ProfilingDiTConfig,
    Span,
    StepPlan,
)
from ..errors import UnsupportedModelError
from .denoiser import CallInfo, attach, detach, find_denoisers, log, split_input
from .parallel import full_sequence
from .registry import Feature, install, make_config, uninstall
from .runhook import RunHook

HOOK_NAME = "hasten_blockcache"
BLOCK_HOOK_NAME = "hasten_blockcache_block"
PRIORITY = 40  # below EasyCache (50): a step EasyCache reuses never reaches the blocks
SUPPORTED = ("transformer denoisers with a list of repeated blocks whose outputs keep their inputs' shapes "
             "(Wan, Flux, SD3, PixArt, HunyuanVideo, CogVideoX, LTX, Qwen-Image, hasten's embedded model ...)")


def find_blocks(denoiser: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The denoiser's main chain of blocks: its largest direct ``ModuleList`` child of >= 2 blocks of one class.

    UNets have no such list (their down/up blocks differ in class and shape) and are refused.
    """
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, child in denoiser.named_children():
        if not isinstance(child, torch.nn.ModuleList) or len(child) < 2:
            continue
        if len({type(b) for b in child}) != 1:
            continue
        if not any(isinstance(m, torch.nn.Linear) for m in child[0].modules()):
            continue
        if best is None or len(child) > len(best[1]):
            best = (name, child)
    if best is None:
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} has no list of repeated transformer blocks to cache (a UNet?). Block "
            f"caching supports {SUPPORTED}.")
    return best


Slot = tuple[str, Any]  # ("arg", index) or ("kw", name)


@dataclass
class _Layout:
    """How a block's outputs map to its inputs: output j continues input ``slots[j]`` (None: output None)."""

    slots: list[Slot | None]
    tuple_type: type | None  # None: the block returns one tensor

    def build(self, values: list[Any]) -> Any:
        return values[0] if self.tuple_type is None else self.tuple_type(values)

    def outputs(self, out: Any) -> list[Any]:
        return [out] if self.tuple_type is None else list(out)


def _get(slot: Slot | None, args: tuple, kwargs: dict) -> Any:
    if slot is None:
        return None
    return args[slot[1]] if slot[0] == "arg" else kwargs[slot[1]]


def _learn(block: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> _Layout:
    """Match each output tensor of a block to the input it is a residual update of."""
    if isinstance(out, torch.Tensor):
        outs, ttype = [out], None
    elif (isinstance(out, (tuple, list)) and out and all(o is None or isinstance(o, torch.Tensor) for o in out)
          and any(isinstance(o, torch.Tensor) for o in out)):
        outs, ttype = list(out), type(out)
    else:
        raise UnsupportedModelError(
            f"block {type(block).__name__} returns {type(out).__name__}; block caching needs a tensor or a tuple of "
            f"tensors. It supports {SUPPORTED}.")
    cands: list[tuple[Slot, torch.Tensor]] = [(("arg", i), a) for i, a in enumerate(args)
                                              if isinstance(a, torch.Tensor)]
    cands += [(("kw", k), v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    slots: list[Slot | None] = []
    for o in outs:
        if o is None:
            slots.append(None)
            continue
        same = [(s, t) for s, t in cands if t.shape == o.shape and t.dtype == o.dtype and s not in slots]
        if not same:
            raise UnsupportedModelError(
                f"block {type(block).__name__} returns a tensor of shape {tuple(o.shape)} that matches none of its "
                f"inputs, so it has no residual to cache. Block caching supports {SUPPORTED}.")
        slots.append(min(same, key=lambda st: (o.float() - st[1].float()).abs().mean().item())[0])
    return _Layout(slots, ttype)


@dataclass
class _Call:
    """One denoiser call in flight: its branches, plan and the inputs of the spans being recorded."""

    keys: list
    plan: StepPlan
    span_inputs: dict[Span, dict[Slot, torch.Tensor]] = field(default_factory=dict)


class BlockCacheHook(RunHook):
    """Denoiser-level hook: identifies the call and makes the plan the block hooks carry out."""

    cache: BlockCache

    def __init__(self, pipe: Any, cache: BlockCache, num_blocks: int) -> None:
        super().__init__(pipe, cache)
        self.num_blocks = num_blocks
        self.layouts: dict[int, _Layout] = {}
        self.call: _Call | None = None

    def begin_cache(self, num_steps: int | None) -> None:
        self.cache.begin_run(num_steps, self.num_blocks)

    def log_run(self, st: BlockRunStats) -> None:
        """What the cache did; a run that reused no block while caching was asked warns."""
        where = self.pattern.pipe_name
        extra = f", cached blocks {st.cached_blocks}" if st.cached_blocks is not None else ""
        if st.reused or self.cache.off:
            log.info("hasten %s on %s: %d/%d block forwards computed, %d reused (%d branches%s)", st.method, where,
                     st.computed, st.block_forwards, st.reused, len(st.branches), extra)
        else:
            log.warning("hasten %s on %s reused no block in this run (%d block forwards%s): the run is too short "
                        "for its warm-up/profiling window, or no block was stable enough", st.method, where,
                        st.block_forwards, extra)

    def run_call(self, module: torch.nn.Module, info: CallInfo, args: tuple, kwargs: dict) -> Any:
        x = split_input(args, kwargs)
        plan = self.cache.plan(info.keys, info.step, x, info.labels)
        prev, self.call = self.call, (_Call(list(info.keys), plan) if plan.active else None)
        try:
            return self.original()(*args, **kwargs)
        finally:
            self.call = prev

    # -- carried out by the block hooks --------------------------------------------------------
    def run_block(self, index: int, block: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        call = self.call
        role = call.plan.role(index) if call is not None else None
        if call is None or (role is None and not call.plan.profile):
            return forward(*args, **kwargs)
        layout = self.layouts.get(index)
        if role is not None and role[0] == "reuse":
            # a reused span: its blocks pass their input through; the last one adds the cached residual
            if layout is None:  # cannot happen: a span is reused only after a call that ran it
                raise RuntimeError(f"hasten block cache: block {index} reused before it ever ran")
            span = role[1]
            values = [_get(s, args, kwargs) for s in layout.slots]
            if index == span[1] - 1:
                tensors = [v for v in values if v is not None]
                new = iter(self.cache.reuse(call.keys, span, tensors))
                values = [None if v is None else next(new) for v in values]
            return layout.build(values)
        out = forward(*args, **kwargs)
        if layout is None:
            layout = self.layouts[index] = _learn(block, args, kwargs, out)
        outs = layout.outputs(out)
        if call.plan.profile:
            pairs = [(_get(s, args, kwargs), o) for s, o in zip(layout.slots, outs, strict=True) if s is not None]
            self.cache.observe(call.keys, index, *full_sequence(self, [p[0] for p in pairs], [p[1] for p in pairs]))
        if role is not None:  # recording a span: keep its input, hand over the residual at its last block
            span = role[1]
            if index == span[0]:
                call.span_inputs[span] = {s: _get(s, args, kwargs) for s in layout.slots if s is not None}
            if index == span[1] - 1:
                start = call.span_inputs.pop(span)
                pairs = [(start.get(s), o) for s, o in zip(layout.slots, outs, strict=True) if s is not None]
                if any(h is None for h, _ in pairs):
                    raise UnsupportedModelError(
                        f"blocks {span[0]}..{span[1] - 1} of this model do not pass the same streams along, so the "
                        f"span has no residual to cache. Block caching supports {SUPPORTED}.")
                self.cache.remember(call.keys, span, [p[0] for p in pairs], [p[1] for p in pairs])
        return out


class _BlockHook(ModelHook):
    """Per-block hook: defers to the denoiser hook's plan for this call."""

    def __init__(self, owner: BlockCacheHook, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.owner.run_block(self.index, module, self.fn_ref.original_forward, args, kwargs)


class BlockCacheFeature(Feature):
    """A block cache on every denoiser of a pipeline: one denoiser hook plus one hook per block."""

    def __init__(self, pipe: Any, name: str, make_cache: Any) -> None:
        self.name = name
        denoisers = find_denoisers(pipe)
        found = {comp: find_blocks(mod) for comp, mod in denoisers.items()}  # all or nothing: check first
        for comp, mod in denoisers.items():
            if getattr(mod, "_parallel_config", None) is not None:  # diffusers' sequence split sits on the blocks
                raise UnsupportedModelError(
                    f"hasten {name}: {comp}.enable_parallelism() was already called; its context-parallel split "
                    "wraps the transformer blocks, so a block hook added now would see the full sequence in and "
                    "one rank's shard out. Enable the block cache first, then enable_parallelism().")
        self.hooks: dict[str, BlockCacheHook] = {}
        self._attached: list[tuple[torch.nn.Module, str]] = []
        try:
            for comp, mod in denoisers.items():
                _, blocks = found[comp]
                hook = BlockCacheHook(pipe, make_cache(), len(blocks))
                attach(mod, hook, HOOK_NAME, priority=PRIORITY)
                self._attached.append((mod, HOOK_NAME))
                for i, block in enumerate(blocks):
                    attach(block, _BlockHook(hook, i), BLOCK_HOOK_NAME)
                    self._attached.append((block, BLOCK_HOOK_NAME))
                self.hooks[comp] = hook
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for mod, name in reversed(self._attached):
            detach(mod, name)
        self._attached, self.hooks = [], {}

    def stats(self) -> dict[str, BlockRunStats | None]:
        out: dict[str, BlockRunStats | None] = {}
        for comp, hook in self.hooks.items():
            cur, last = hook.run_stats()
            out[comp] = cur if cur is not None else last
        return out


def enable_delta_dit(pipe: Any, config: DeltaDiTConfig | None = None, **kwargs: Any) -> Any:
    """Turn on Δ-DiT block caching (rear blocks early, front blocks late); settings as in :class:`DeltaDiTConfig`.

    Replaces any block cache already on (Δ-DiT and ProfilingDiT never stack). Returns the pipeline.
    """
    config = make_config(DeltaDiTConfig, config, kwargs)
    uninstall(pipe, "profiling_dit")
    return install(pipe, "delta_dit", lambda: BlockCacheFeature(pipe, "delta_dit", lambda: DeltaDiT(config)))


def disable_delta_dit(pipe: Any) -> Any:
    """Remove Δ-DiT: every hook on the denoiser and its blocks is removed. Returns the pipeline."""
    return uninstall(pipe, "delta_dit")


def enable_profiling_dit(pipe: Any, config: ProfilingDiTConfig | None = None, **kwargs: Any) -> Any:
    """Turn on ProfilingDiT block caching (profile per-block residual change, cache the stable blocks);
    settings as in :class:`ProfilingDiTConfig` (a bare number is the threshold). Returns the pipeline."""
    config = make_config(ProfilingDiTConfig, config, kwargs)
    uninstall(pipe, "delta_dit")
    return install(pipe, "profiling_dit",
                   lambda: BlockCacheFeature(pipe, "profiling_dit", lambda: ProfilingDiT(config)))


def disable_profiling_dit(pipe: Any) -> Any:
    """Remove ProfilingDiT: every hook on the denoiser and its blocks is removed. Returns the pipeline."""
    return uninstall(pipe, "profiling_dit")
