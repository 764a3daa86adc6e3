"""diffusers adapter for adaptive block-sparse attention (:class:`hasten.kernels.adaspa.AdaSpa`).

Wiring only, and only on the model it is given. Every attention module of the denoiser whose processor
calls diffusers' attention dispatcher (``dispatch_attention_fn``: Flux, Flux 2, Qwen-Image, Wan, LTX,
HunyuanVideo, Chroma, ...) or ``F.scaled_dot_product_attention`` (the ``AttnProcessor2_0`` family: SD/SDXL
UNets, SD3, PixArt, CogVideoX, Lumina 2, ...) gets a wrapper processor through ``set_processor``. The wrapper
runs the original processor's own code (projections, norms, rotary embeddings untouched) as a copy of
its function whose globals name hasten's router instead of the dispatcher / ``F``: nothing module-level
is swapped, so another model of the same class in the process is never affected. The router sends
self- and joint attention to the policy, which answers with a sparse/search output or None (then the
original dispatcher / SDPA runs, bit-identical); cross-attention passes straight through.

A DenoiserHook on the denoiser tells the policy when a run starts, the step and the branch of each batch
row. Joint attention keeps its text tokens dense; key-padding masks (text padding, e.g. Chroma's and
HunyuanVideo's) are handled (Ulysses context parallelism: pipelines/parallel.py); any other mask, dropout or causal call runs dense and is
counted in the run's statistics, which are logged once per run. ``disable_sparse_attention`` puts the
original processor objects back.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..kernels.adaspa import AdaSpa, AdaSpaConfig, AdaSpaStats, key_padding_mask
from .denoiser import ROW_KEYS_ATTR, DenoiserHook, attach, detach, find_denoisers, in_flight
from .registry import Feature, features, install, make_config, uninstall

log = logging.getLogger("hasten.sparse_attention")

PRIORITY = 75  # hook stacking: below guidance (100), above EasyCache (50) so it sees every step
HOOK_NAME = "hasten_sparse_attention"
SUPPORTED_TEXT = (
    "denoisers whose attention processors call diffusers' attention dispatcher (dispatch_attention_fn: "
    "Flux, Flux 2, Qwen-Image, Wan, LTX, HunyuanVideo, Chroma, ...) or torch's "
    "F.scaled_dot_product_attention (AttnProcessor2_0 / JointAttnProcessor2_0 families: SD 1.x/SDXL UNets, "
    "SD3, PixArt, CogVideoX, Lumina 2, ...)"
)
_CURRENT: contextvars.ContextVar[SparseAttnProcessor | None] = contextvars.ContextVar(
    "hasten_sparse_attention_processor", default=None)


class _Context:
    """What the denoiser hook learned about the current forward (shared by its wrapped processors)."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.module: torch.nn.Module | None = None
        self.step = 0
        self.joint: tuple[int, int] | None = None  # (joint token count, text token count) seen in this forward


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _FunctionalProxy(types.ModuleType):
    """``torch.nn.functional`` whose ``scaled_dot_product_attention`` goes through the router."""

    def __init__(self, sdpa: Callable) -> None:
        super().__init__("torch.nn.functional")
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)


@functools.cache
def _route(cls: type) -> tuple[Callable, inspect.Signature, str] | None:
    """For a processor class: a copy of its ``__call__`` reading hasten's router instead of the dispatcher
    and/or ``F``, its signature, and what it routes; None when its code calls neither."""
    fn = cls.__dict__.get("__call__") or next((c.__dict__["__call__"] for c in cls.__mro__ if "__call__" in c.__dict__), None)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    names = _code_names(code)
    real = fn.__globals__
    glob = dict(real)
    kinds = []
    if "dispatch_attention_fn" in names and "dispatch_attention_fn" in real:
        glob["dispatch_attention_fn"] = lambda *a, **k: _dispatch_route(real["dispatch_attention_fn"], *a, **k)
        kinds.append("dispatch_attention_fn")
    if "F" in names and "scaled_dot_product_attention" in names and real.get("F") is torch.nn.functional:
        glob["F"] = _FunctionalProxy(  # the real SDPA looked up per call: later patches of it are honoured
            lambda *a, **k: _sdpa_route(torch.nn.functional.scaled_dot_product_attention, *a, **k))
        kinds.append("F.scaled_dot_product_attention")
    if not kinds:
        return None
    copy = types.FunctionType(code, glob, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy, inspect.signature(fn), " and ".join(kinds)


def _dispatch_route(real: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False, attention_kwargs: Any = None, *,
                    backend: Any = None, parallel_config: Any = None, **extra: Any) -> torch.Tensor:
    """``dispatch_attention_fn`` as the wrapped processors see it: (B, S, H, D) tensors."""
    proc = _CURRENT.get()
    out = None
    if proc is not None:
        why = None
        if extra or attention_kwargs:
            why = "attention arguments hasten does not model"
        elif parallel_config is not None:  # diffusers' context parallelism: Ulysses head shards, or refused
            from .parallel import ulysses_sparse_attention
            return ulysses_sparse_attention(proc, real, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa, backend, parallel_config)
        out = proc.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, scale,
                          dropout_p, is_causal, enable_gqa, why)
    if out is None:
        return real(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                    backend=backend, parallel_config=parallel_config, **extra)
    return out.transpose(1, 2)


def _sdpa_route(real: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False, **extra: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as the wrapped processors see it: (B, H, S, D) tensors."""
    proc = _CURRENT.get()
    out = None
    if proc is not None and query.ndim == 4:
        why = "attention arguments hasten does not model" if extra else None
        out = proc.attend(query, key, value, attn_mask, scale, dropout_p, is_causal, enable_gqa, why)
    if out is None:
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kw, **extra)
    return out


def _tokens(x: Any) -> int | None:
    if not isinstance(x, torch.Tensor):
        return None
    if x.ndim == 4:  # UNet processors take (B, C, H, W)
        return x.shape[2] * x.shape[3]
    return x.shape[1] if x.ndim == 3 else None


class SparseAttnProcessor:
    """Wraps one attention processor of one model; routes its self/joint attention through the policy.

    ``inner`` is the original processor object (its attributes, e.g. ``_attention_backend``, keep working).
    Instances are made by :func:`wrap_processor`, which gives each processor class a subclass whose
    ``__call__`` has the original's signature (diffusers filters keyword arguments by it).
    """

    def __init__(self, inner: Any, name: str, policy: AdaSpa, ctx: _Context) -> None:
        self.inner, self.name, self.policy, self.ctx = inner, name, policy, ctx
        self._shape: tuple[int | None, int | None] = (None, None)
        self._calls = 0

    def __getattr__(self, name: str) -> Any:  # attributes of the original processor (e.g. _attention_backend)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # attributes the original processor has go to it: diffusers' enable_parallelism sets _parallel_config
        # on every processor, and the wrapped code reads it from the original (else attention stays rank-local)
        if name not in ("inner", "name", "policy", "ctx", "_shape", "_calls") and hasattr(self.inner, name):
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    @torch.compiler.disable  # per-step search/reuse decisions run eagerly, never recompiling a compiled model
    def _run(self, *args: Any, **kwargs: Any) -> Any:
        route = _route(type(self.inner))
        assert route is not None
        fn, sig, _ = route
        if self.policy.config.off:
            return self.inner(*args, **kwargs)
        try:
            bound = sig.bind_partial(self.inner, *args, **kwargs).arguments
        except TypeError:
            bound = {}
        hs, ehs = bound.get("hidden_states"), bound.get("encoder_hidden_states")
        if ehs is hs:  # self-attention written as attention to itself (Lumina 2)
            ehs = None
        self._shape = (_tokens(hs), _tokens(ehs))
        self._calls = 0
        token = _CURRENT.set(self)
        try:
            out = fn(self.inner, *args, **kwargs)
        finally:
            _CURRENT.reset(token)
        if self._calls == 0 and self._shape[1] is None:  # self-attention that never reached the router
            self.policy.fallback(f"{type(self.inner).__name__} attention not reachable")
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | None, dropout_p: float, is_causal: bool, enable_gqa: bool,
               why: str | None) -> torch.Tensor | None:
        """(B, H, S, D) attention by the policy, or None for the original dense path."""
        n = self._calls
        self._calls += 1
        hs_len, ehs_len = self._shape
        S = q.shape[2]
        added_kv = bool(ehs_len) and S == hs_len and k.shape[2] == S + ehs_len  # text keys first (AttnAddedKV)
        if not added_kv and (S != k.shape[2] or (ehs_len is not None and S == hs_len and S != (hs_len or 0) + ehs_len)):
            return None  # cross-attention: not a target of sparse attention
        # self- or joint attention from here on: every dense answer is counted
        if why is None and (dropout_p or is_causal or enable_gqa or q.shape[1] != k.shape[1]):
            why = "dropout/causal/grouped-query attention"
        if why is not None:
            self.policy.fallback(why)
            return None
        text_len = 0
        if ehs_len and hs_len is not None and S == hs_len + ehs_len:  # joint text + image attention
            text_len = ehs_len
            self.ctx.joint = (S, ehs_len)
        elif ehs_len is None and self.ctx.joint is not None and S == self.ctx.joint[0]:  # single-stream block
            text_len = self.ctx.joint[1]
        kv_mask = q_valid = None
        if attn_mask is not None:
            split = key_padding_mask(attn_mask, (q.shape[0], q.shape[1], S, k.shape[2]))
            if split is None:
                self.policy.fallback("attention mask other than key padding")
                return None
            kv_mask, q_valid = split
        # text tokens stay dense; where they sit (front or back) differs per model, so both ends are kept
        ranges = ((0, text_len), (S - text_len, S)) if text_len else ()
        if added_kv:
            ranges = ((0, ehs_len),)
        B = q.shape[0]
        rows = self.ctx.rows
        layer = self.name if n == 0 else f"{self.name}#{n}"
        if len(rows) != B:
            given = getattr(self.ctx.module, ROW_KEYS_ATTR, None)  # set by that hook through `row_keys`
            if given is not None and len(given) == B:  # a hook below runs a subset of the rows (a cache)
                rows = list(given)
            elif B == 1 and n < len(rows):  # a processor that loops over the batch one row at a time (Mochi)
                rows, layer = [rows[n]], self.name
            else:
                rows = [("row", B, i) for i in range(B)]
        out = self.policy.attend(layer, rows, self.ctx.step, q, k, v, scale, ranges, kv_mask=kv_mask)
        if out is not None and q_valid is not None:
            out = out * q_valid[..., None].to(out.dtype)
        return out


@functools.cache
def _wrapper_class(cls: type) -> type:
    sig = inspect.signature(cls.__call__)

    def __call__(self: SparseAttnProcessor, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        return self._run(*args, **kwargs)

    __call__.__signature__ = sig  # type: ignore[attr-defined]
    return type("SparseAttnProcessor", (SparseAttnProcessor,), {"__call__": __call__, "__module__": __name__})


def wrap_processor(inner: Any, name: str, policy: AdaSpa, ctx: _Context) -> SparseAttnProcessor:
    """A wrapper of ``inner`` (whose class must be routable, see :func:`_route`)."""
    return _wrapper_class(type(inner))(inner, name, policy, ctx)


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every submodule with an attention ``processor`` (diffusers' Attention, AttentionModuleMixin, and
    modules such as MochiAttention that hold a processor without ``set_processor``)."""
    return {name: m for name, m in model.named_modules() if callable(getattr(m, "processor", None))}


def _cross_only(attn: torch.nn.Module) -> bool:
    """True for a module that only attends from image tokens to text (cross-attention, never sparsified)."""
    return getattr(attn, "is_cross_attention", False) is True and getattr(attn, "add_k_proj", None) is None


def _set_processor(attn: torch.nn.Module, proc: Any) -> None:
    if callable(getattr(attn, "set_processor", None)):
        attn.set_processor(proc)
    else:
        attn.processor = proc


class SparseAttentionHook(DenoiserHook):
    """Tells the policy about runs, steps and branches (the shared call pattern); the forward is untouched."""

    def __init__(self, pipe: Any, policy: AdaSpa, ctx: _Context, label: str) -> None:
        super().__init__(pipe)
        self.policy, self.ctx, self.label = policy, ctx, label
        self.active = False  # a run is in progress and its report is still due

    def on_run_start(self, num_steps: int | None) -> None:
        self.policy.begin_run(num_steps)
        self.active = True

    def on_run_end(self) -> None:
        self.report()
        self.policy.end_run()

    def report(self) -> None:
        """Log once per run what sparse attention did (a run where nothing went sparse is a warning)."""
        if self.active:
            self.active = False
            st = self.policy.stats
            _report(st if st.calls else None, self.policy.config, self.label)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with in_flight(self):
            info = None
            try:
                info = self.identify(module, args, kwargs)
                keys, step = list(info.keys), info.step
            except UnsupportedModelError:  # no recognisable latent input (Z-Image takes a list): count calls
                keys = [("call", 0)]
                if self.tracker.new_run_needed(keys):
                    self.on_run_end()
                    self.tracker.start()
                    self.on_run_start(self.tracker.num_steps)
                step = self.tracker.steps_for(keys)[0]
            self.ctx.rows, self.ctx.step, self.ctx.module, self.ctx.joint = keys, step, module, None
            out = self.original()(*args, **kwargs)
            if info is not None and self.pattern.last_call(info):
                self.report()
            return out


def _report(st: AdaSpaStats | None, config: AdaSpaConfig, label: str) -> None:
    """Log once per run what sparse attention did; a run where nothing went sparse is a warning."""
    if config.off:
        return
    if st is None:
        log.warning("hasten sparse attention had no effect on %s in this run: no self-attention call reached it "
                    "(supported: %s)", label, SUPPORTED_TEXT)
        return
    reason = st.no_effect_reason(config)
    if reason is None:
        log.info("hasten %s (%s)", st.summary(), label)
    else:
        log.warning("hasten sparse attention had no effect on %s in this run (%s)", label, reason)


class SparseAttentionFeature(Feature):
    name = "sparse_attention"

    def __init__(self, pipe: Any, config: AdaSpaConfig) -> None:
        self.config = config
        self.modules = find_denoisers(pipe)
        plans: dict[str, tuple[dict[str, tuple[torch.nn.Module, Any, Any]], AdaSpa, _Context]] = {}
        self.unreached: dict[str, list[str]] = {}
        for comp, module in self.modules.items():
            attns = attention_modules(module)
            policy, ctx = AdaSpa(config), _Context()
            swaps, skipped = {}, set()
            for name, attn in attns.items():
                proc = attn.processor
                if isinstance(proc, SparseAttnProcessor):
                    proc = proc.inner
                if isinstance(proc, torch.nn.Module) or _route(type(proc)) is None:
                    skipped.add(type(proc).__name__)
                    continue
                swaps[name] = (attn, attn.processor, wrap_processor(proc, name, policy, ctx))
            self_swaps = [n for n, (a, _, _) in swaps.items() if not _cross_only(a)]
            if not self_swaps:
                kinds = sorted({type(a.processor).__name__ for a in attns.values()})
                what = f"attention processors {kinds}" if kinds else "no diffusers attention modules"
                if swaps:
                    what += (f" ({', '.join(sorted(skipped))} for self-attention, which calls no softmax attention "
                             "hasten can route; the routable ones are cross-attention only)")
                raise UnsupportedModelError(f"{type(module).__name__} has {what}; hasten's sparse attention supports "
                                            f"{SUPPORTED_TEXT}.")
            self.unreached[comp] = sorted(skipped)
            if skipped:
                log.warning("hasten sparse attention: %s keeps processors %s dense (they call no attention "
                            "function hasten can route)", type(module).__name__, sorted(skipped))
            plans[comp] = (swaps, policy, ctx)
        self.originals: dict[str, dict[str, tuple[torch.nn.Module, Any]]] = {}
        self.policies: dict[str, AdaSpa] = {}
        try:
            for comp, (swaps, policy, ctx) in plans.items():
                module = self.modules[comp]
                self.policies[comp] = policy
                self.originals[comp] = {n: (a, orig) for n, (a, orig, _) in swaps.items()}
                attach(module, SparseAttentionHook(pipe, policy, ctx, f"{comp} {type(module).__name__}"), HOOK_NAME,
                       priority=PRIORITY)
                for attn, _, wrapper in swaps.values():
                    _set_processor(attn, wrapper)
        except Exception:
            self.remove()  # leave the model exactly as it was
            raise

    def remove(self) -> None:
        for comp, module in self.modules.items():
            detach(module, HOOK_NAME)
            for attn, orig in self.originals.get(comp, {}).values():
                _set_processor(attn, orig)
        self.originals, self.policies = {}, {}

    def stats(self) -> dict[str, AdaSpaStats | None]:
        out: dict[str, AdaSpaStats | None] = {}
        for comp, policy in self.policies.items():
            cur = policy.stats
            out[comp] = cur if cur.calls else policy.last_run
        return out


def enable_sparse_attention(pipe: Any, config: AdaSpaConfig | None = None, **kwargs: Any) -> Any:
    """Route the denoiser's self/joint attention through AdaSpa sparse attention; settings as in
    :class:`hasten.kernels.adaspa.AdaSpaConfig`. Calling it again replaces the settings. Returns the pipeline."""
    if config is not None and not isinstance(config, AdaSpaConfig):
        raise TypeError(f"config must be a hasten AdaSpaConfig (or pass keyword settings), got "
                        f"{type(config).__name__} {config!r}")
    config = make_config(AdaSpaConfig, config, kwargs)
    return install(pipe, "sparse_attention", lambda: SparseAttentionFeature(pipe, config))


def disable_sparse_attention(pipe: Any) -> Any:
    """Remove sparse attention: the original processor objects and forward are restored. Returns the pipeline."""
    return uninstall(pipe, "sparse_attention")


def measure_sparse_attention(pipe: Any, generate: Callable[[Any], torch.Tensor], **settings: Any) -> dict[str, Any]:
    """Run ``generate(pipe)`` dense, then with sparse attention; quality and per-layer attention error.

    ``generate`` must be deterministic (seeded generators) and return the output tensor.
    Returns PSNR of the sparse output against the dense one (``data_range`` from the dense output), the
    max abs difference, wall-clock seconds of both runs, the policy's statistics and the relative error of
    every sparse attention output against dense attention on the same inputs.
    """
    import time

    from torchmetrics.functional.image import peak_signal_noise_ratio

    def call() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = generate(pipe)
        return out, time.perf_counter() - t0

    disable_sparse_attention(pipe)
    dense, t_dense = call()
    enable_sparse_attention(pipe, **{**settings, "measure_error": True})
    try:
        sparse, _ = call()
        stats = {comp: st for comp, st in features(pipe)["sparse_attention"].stats().items()}
        enable_sparse_attention(pipe, **{**settings, "measure_error": False})
        _, t_sparse = call()
    finally:
        disable_sparse_attention(pipe)
    d, s = dense.float(), sparse.float()
    rng = float((d.max() - d.min()).item()) or 1.0
    return {
        "psnr": float(peak_signal_noise_ratio(s, d, data_range=rng).item()),
        "max_abs": float((s - d).abs().max().item()),
        "seconds_dense": t_dense,
        "seconds_sparse": t_sparse,
        "stats": stats,
        "layer_errors": {comp: dict(st.errors) for comp, st in stats.items() if st is not None},
    }


def tiny_wan_pipeline(seed: int = 0) -> Any:
    """A small random-weight WanPipeline for measurements (no text encoder: call it with prompt embeddings)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )


    torch.manual_seed(seed)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4,
                               out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=4,
                               rope_max_seq_len=256).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tr, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe
