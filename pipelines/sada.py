"""diffusers adapter for SADA: EasyCache's denoiser hook (branch split, partial batches, output packing)
driving :class:`hasten.caches.SADA`; every decision is the core's.

With ``tokens`` (token-level sparsity) one hook per transformer block carries a token-level call out: the first
block gathers the kept tokens of each row (and the per-token side inputs: rotary tables, Wan 2.2's per-token
timestep modulation), every block runs on them only, the last block scatters them back into the full sequence,
and the output head runs as usual; the pruned tokens' outputs are then replaced by the core's extrapolation.
"""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ..caches import EasyCacheConfig, RunStats, run_cached
from ..caches.sada import SADA, SADAConfig
from ..caches.sada_tokens import TokenCall, TokenKV, put_tokens, take_tokens
from ..errors import UnsupportedModelError
from .denoiser import (
    CallInfo,
    attach,
    detach,
    find_denoisers,
    log,
    main_tensor,
    row_keys,
    slice_batch,
    split_input,
)
from .easycache import PRIORITY, EasyCacheHook
from .registry import install, make_config, uninstall
from .runhook import RunHookFeature, refuse_fresh_noise_scheduler, refuse_stacked_step_cache

HOOK_NAME = "hasten_sada"
BLOCK_HOOK_NAME = "hasten_sada_tokens"
ATTN_HOOK_NAME = "hasten_sada_tokens_kv"
TOKEN_MODELS = ("WanTransformer3DModel",)  # block signature (hidden_states, encoder_hidden_states, temb, rotary_emb)
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")


_KV: contextvars.ContextVar[tuple[SADAHook, int] | None] = contextvars.ContextVar("hasten_sada_kv", default=None)


@functools.cache
def _routed(cls: type) -> Callable | None:
    """A copy of processor class ``cls``'s ``__call__`` whose ``dispatch_attention_fn`` is :func:`_kv_route` (nothing
    module-level is patched), or None when its code does not call diffusers' attention dispatcher."""
    fn = next((c.__dict__["__call__"] for c in cls.__mro__ if "__call__" in c.__dict__), None)
    code = getattr(fn, "__code__", None)
    if code is None or "dispatch_attention_fn" not in code.co_names or "dispatch_attention_fn" not in fn.__globals__:
        return None
    real = fn.__globals__["dispatch_attention_fn"]
    glob = dict(fn.__globals__)
    glob["dispatch_attention_fn"] = lambda *a, **k: _kv_route(real, *a, **k)
    copy = types.FunctionType(code, glob, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _kv_route(real: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
              **kwargs: Any) -> torch.Tensor:
    """The dispatcher as a routed self-attention sees it ((B, S, H, D) tensors): keys/values completed by the hook."""
    ctx = _KV.get()
    if ctx is not None:
        key, value = ctx[0].complete_kv(ctx[1], key, value)
    return real(query, key, value, *args, **kwargs)


class SADAHook(EasyCacheHook):
    """Runs each denoiser call through :func:`hasten.caches.run_cached` with a SADA policy (and, token-level,
    gathers/scatters the kept tokens around the block chain)."""

    label = "SADA"

    def __init__(self, pipe: Any, config: SADAConfig) -> None:
        super().__init__(pipe, EasyCacheConfig(threshold=0.0))
        self.cache = SADA(config)  # type: ignore[assignment]
        self.patch: tuple[int, int, int] | None = None  # set when token-level sparsity is wired
        self.num_blocks = 0
        self.active: TokenCall | None = None
        self.rows: list[Any] | None = None  # branch keys of the forward in flight (token wiring only)
        self.kv = TokenKV()  # each branch's self-attention keys/values per block

    def reuses_outputs(self) -> bool:
        return True  # SADA's config has no threshold: every run may reuse

    def begin_cache(self, num_steps: int | None) -> None:
        super().begin_cache(num_steps)
        self.kv.clear()

    def on_run_end(self) -> None:
        super().on_run_end()
        self.kv.clear()

    def complete_kv(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention keys/values of block ``index``: a full forward remembers each row's; a token-level one
        puts its kept tokens' fresh ones into the remembered full sequence, so the kept queries see every token."""
        if self.rows is None:
            return k, v
        return self.kv.complete(self.rows, index, None if self.active is None else self.active.idx, k, v)

    def _has_kv(self, keys: list[Any], x: torch.Tensor) -> bool:
        """Every branch has every block's keys/values for this input's token count."""
        return self.kv.ready(keys, self.num_blocks, self.num_tokens(x))

    def num_tokens(self, x: torch.Tensor) -> int:
        from ..caches.sada_tokens import token_grid

        gf, gh, gw = token_grid(tuple(x.shape), self.patch or (1, 1, 1))
        return gf * gh * gw

    def log_run(self, st: RunStats) -> None:
        """What SADA did (skipping nothing while on is a warning, with the reason)."""
        cfg = self.cache.config
        cache: SADA = self.cache  # type: ignore[assignment]
        if cfg.token_level:
            frac = cache.tokens_kept / cache.tokens_total if cache.tokens_total else 0.0
            msg = (f"hasten SADA on {self.pattern.pipe_name}: {st.computed}/{st.calls} branch forwards computed, "
                   f"{st.reused} skipped; {cache.token_calls} computed token-level ({frac:.0%} of tokens)")
            if cache.token_calls or st.reused:
                log.info("%s", msg)
            else:
                log.warning("%s: neither a step nor a token was pruned (the run is too short for the acceleration "
                            "range, or every step was forced)", msg)
        elif st.reused or cfg.is_off:
            log.info("hasten SADA on %s: %d/%d branch forwards computed, %d skipped (%d branches)",
                     self.pattern.pipe_name, st.computed, st.calls, st.reused, len(st.branches))
        else:
            log.warning("hasten SADA on %s skipped nothing in this run (%d branch forwards): the trajectory was "
                        "never stable by its criterion (threshold %g) inside the acceleration range, or the run "
                        "is too short", self.pattern.pipe_name, st.calls, cfg.threshold)

    def run_call(self, module: torch.nn.Module, info: CallInfo, args: tuple, kwargs: dict) -> Any:
        if self.patch is None:
            return super().run_call(module, info, args, kwargs)
        x = split_input(args, kwargs)
        batch = x.shape[0]
        keys, labels = info.keys, info.labels
        forward = self.original()
        full: list[Any] = []
        cache: SADA = self.cache  # type: ignore[assignment]

        def compute(rows: list[int] | None) -> torch.Tensor:
            todo = list(range(batch)) if rows is None else rows
            a, kw = (args, kwargs) if rows is None else slice_batch(args, kwargs, rows, batch)
            row_keys_ = [keys[i] for i in todo]
            plans = cache.token_plan(row_keys_, [x[i : i + 1] for i in todo], self.patch,  # type: ignore[arg-type]
                                     allowed=self._has_kv(row_keys_, x))
            self.active = None if plans is None else TokenCall(torch.stack(plans).to(x.device))
            self.rows = row_keys_
            try:
                with row_keys(module, row_keys_, info.step):
                    result = forward(*a, **kw)
            finally:
                self.active, self.rows = None, None
            out = main_tensor(result)
            if plans is not None:
                with torch.no_grad():
                    for j, key in enumerate(row_keys_):
                        out[j : j + 1].copy_(cache.fill(key, out[j : j + 1]))
            if rows is None:
                full.append(result)
            self.packer.learn(result)
            return out

        out = run_cached(self.cache, keys, x, [info.step] * batch, info.num_steps, compute, labels,
                         groups=[item for _, item in keys])
        if full:
            return full[0]
        return self.packer.pack(out, kwargs.get("return_dict"))

    # -- carried out by the block hooks --------------------------------------------------------
    def run_block(self, index: int, forward: Any, args: tuple, kwargs: dict) -> Any:
        call = self.active
        if call is None:
            return forward(*args, **kwargs)
        bound = dict(zip(_BLOCK_ARGS, args, strict=False))
        bound.update(kwargs)
        h = bound["hidden_states"]
        idx = call.idx
        if index == 0:
            if h.shape[0] != idx.shape[0]:
                raise RuntimeError(f"hasten SADA tokens: block input has {h.shape[0]} rows, plan has {idx.shape[0]}")
            call.full = h
            bound["hidden_states"] = take_tokens(h, idx, 1)
        num_tokens = call.full.shape[1] if call.full is not None else -1
        temb = bound.get("temb")
        if isinstance(temb, torch.Tensor) and temb.ndim == 4 and temb.shape[1] == num_tokens:  # Wan 2.2 per-token
            bound["temb"] = call.memo.setdefault(id(temb), take_tokens(temb, idx, 1))
        rope = bound.get("rotary_emb")
        if rope is not None:
            key = id(rope)
            if key not in call.memo:
                parts = rope if isinstance(rope, (tuple, list)) else (rope,)
                cut = [take_tokens(p, idx, 1) if p.shape[1] == num_tokens else
                       take_tokens(p, idx, 2) if p.ndim > 2 and p.shape[2] == num_tokens else p for p in parts]
                call.memo[key] = type(rope)(cut) if isinstance(rope, (tuple, list)) else cut[0]
            bound["rotary_emb"] = call.memo[key]
        out = forward(**bound)
        if index == self.num_blocks - 1:
            assert call.full is not None
            return put_tokens(call.full, idx, out)
        return out


class _SelfAttnHook(ModelHook):
    """On a block's self-attention module: runs its processor's code with the dispatcher routed through
    :meth:`SADAHook.complete_kv` while a forward of a token-wired run is in flight."""

    def __init__(self, owner: SADAHook, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        fn = _routed(type(module.processor))
        if self.owner.rows is None or fn is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        token = _KV.set((self.owner, self.index))
        try:
            return fn(module.processor, module, *args, **kwargs)
        finally:
            _KV.reset(token)


class _TokenBlockHook(ModelHook):
    """Per-block hook: runs the block on the kept tokens during a token-level call."""

    def __init__(self, owner: SADAHook, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.owner.run_block(self.index, self.fn_ref.original_forward, args, kwargs)


def _self_attention(block: torch.nn.Module) -> torch.nn.Module:
    """The block's self-attention module (Wan: ``attn1``) whose processor calls diffusers' attention dispatcher."""
    attn = getattr(block, "attn1", None)
    if attn is None or _routed(type(getattr(attn, "processor", None))) is None:
        raise UnsupportedModelError(
            f"SADA tokens: the self-attention of {type(block).__name__} does not run through diffusers' attention "
            "dispatcher (another attention feature such as sparse attention replaced its processor?), so the kept "
            "tokens' keys/values cannot be completed. Enable token-level SADA on the plain Wan model.")
    return attn


def _token_blocks(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The Wan block list, or :class:`UnsupportedModelError` naming what token-level SADA supports."""
    name = type(getattr(module, "_orig_mod", module)).__name__
    blocks = getattr(module, "blocks", None)
    patch = getattr(getattr(module, "config", None), "patch_size", None)
    if name not in TOKEN_MODELS or not isinstance(blocks, torch.nn.ModuleList) or not patch or len(patch) != 3:
        raise UnsupportedModelError(
            f"SADA's token-level sparsity (tokens=...) does not support {name}: pruning tokens inside the blocks "
            f"needs the model's per-token side inputs sliced to match. Supported: the Wan family "
            f"({', '.join(TOKEN_MODELS)}, e.g. hasten's embedded image and video models). Step-level SADA "
            f"(tokens=None) works on every denoiser.")
    for block in blocks:
        _self_attention(block)
    return blocks


class SADAFeature(RunHookFeature):
    name = "sada"
    hook_name = HOOK_NAME
    priority = PRIORITY
    hook_class = SADAHook

    def __init__(self, pipe: Any, config: SADAConfig) -> None:
        found = {}
        if config.token_level:  # all or nothing: check every denoiser before attaching anything
            from .registry import features

            blockwise = [n for n in features(pipe) if n in ("delta_dit", "profiling_dit", "sparse_attention")]
            if blockwise:
                raise UnsupportedModelError(
                    f"SADA tokens: {blockwise[0]} is on; it works on the full token sequence inside the blocks that "
                    "token-level SADA shortens. Use step-level SADA (tokens=None) with it, or disable it first.")
            for comp, mod in find_denoisers(pipe).items():
                if getattr(mod, "_parallel_config", None) is not None:
                    raise UnsupportedModelError(
                        f"SADA tokens: {comp}.enable_parallelism() splits the sequence the token pruning gathers "
                        "from; token-level SADA supports single-device denoisers.")
                found[comp] = (mod, _token_blocks(mod))
        super().__init__(pipe, config)
        self._blocks: list[tuple[torch.nn.Module, str]] = []
        try:
            for comp, (mod, blocks) in found.items():
                hook: SADAHook = self.hooks[comp]
                hook.patch = tuple(int(p) for p in mod.config.patch_size)  # type: ignore[assignment]
                hook.num_blocks = len(blocks)
                for i, block in enumerate(blocks):
                    attach(block, _TokenBlockHook(hook, i), BLOCK_HOOK_NAME)
                    self._blocks.append((block, BLOCK_HOOK_NAME))
                    attn = _self_attention(block)
                    attach(attn, _SelfAttnHook(hook, i), ATTN_HOOK_NAME)
                    self._blocks.append((attn, ATTN_HOOK_NAME))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for mod, name in reversed(getattr(self, "_blocks", [])):
            detach(mod, name)
        self._blocks = []
        super().remove()


def enable_sada(pipe: Any, config: SADAConfig | None = None, **kwargs: Any) -> Any:
    """Turn on SADA step skipping for ``pipe``'s denoiser(s); settings as in :class:`SADAConfig`.

    ``tokens=<fraction>`` adds the paper's token-level sparsity (Wan family): computed steps inside the
    acceleration range run only that fraction of tokens through the blocks. Calling it again replaces the
    previous settings. Returns the pipeline.
    """
    config = make_config(SADAConfig, config, kwargs)
    refuse_stacked_step_cache(pipe, "sada")
    refuse_fresh_noise_scheduler(pipe, "SADA")
    return install(pipe, "sada", lambda: SADAFeature(pipe, config))


def disable_sada(pipe: Any) -> Any:
    """Remove SADA from ``pipe``; the denoiser's forward (and its blocks') is restored exactly. Returns the pipeline."""
    return uninstall(pipe, "sada")
