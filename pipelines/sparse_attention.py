"""diffusers adapter for adaptive block-sparse attention (:class:`hasten.kernels.adaspa.AdaSpa`).

Wiring only: the supported self/joint-attention processors are wrapped through the public
``set_attn_processor`` API. A wrapper runs the original processor unchanged (projections, norms, rotary
embeddings) and only routes its inner attention call (``dispatch_attention_fn`` or
``F.scaled_dot_product_attention`` in the processor's module) to the policy, which answers with a
sparse/search output or None ("run the original attention", bit-identical). A DenoiserHook on the
transformer tells the policy when a run starts, the step, the branch of each batch row and the text
length of joint attention. ``disable_sparse_attention`` puts the original processor objects back.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..kernels.adaspa import AdaSpa, AdaSpaConfig, AdaSpaStats
from .denoiser import ROW_KEYS_ATTR, DenoiserHook, attach, branch_keys, detach, find_denoisers, split_input
from .registry import Feature, features, install, make_config, uninstall

PRIORITY = 75  # hook stacking: below guidance (100), above EasyCache (50) so it sees every step
HOOK_NAME = "hasten_sparse_attention"


@dataclass(frozen=True)
class _Family:
    """How one processor class lays out its attention call."""

    fn_name: str  # global the processor calls for attention
    layout: str  # "BSHD" (dispatch_attention_fn) or "BHSD" (F.scaled_dot_product_attention)
    text: str  # "none", "front" or "back": where text tokens sit in joint attention
    text_from_call: bool  # text length from the processor's encoder_hidden_states (else from the model call)
    only: str | None = None  # wrap only processors whose name contains this ("attn1": Wan self-attention)


FAMILIES: dict[str, _Family] = {
    "WanAttnProcessor": _Family("dispatch_attention_fn", "BSHD", "none", False, only="attn1"),
    "WanAttnProcessor2_0": _Family("dispatch_attention_fn", "BSHD", "none", False, only="attn1"),
    "FluxAttnProcessor": _Family("dispatch_attention_fn", "BSHD", "front", False),
    "HunyuanVideoAttnProcessor2_0": _Family("dispatch_attention_fn", "BSHD", "back", False),
    "JointAttnProcessor2_0": _Family("F", "BHSD", "back", True),
}
SUPPORTED_TEXT = (
    "transformers whose attention processors are WanAttnProcessor (Wan 2.1/2.2), FluxAttnProcessor (Flux), "
    "JointAttnProcessor2_0 (SD3/SD3.5) or HunyuanVideoAttnProcessor2_0 (HunyuanVideo)"
)
_LOCK = threading.RLock()


class _Context:
    """What the transformer hook learned about the current call (shared by its wrapped processors)."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.module: torch.nn.Module | None = None
        self.step = 0
        self.text_len = 0


class _FunctionalProxy(types.ModuleType):
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` replaced (for SD3's processor)."""

    def __init__(self, sdpa: Callable) -> None:
        super().__init__("torch.nn.functional")
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)


def suffix_padding_lengths(mask: torch.Tensor, batch: int, seq_k: int) -> torch.Tensor | None:
    """Per-row key counts when ``mask`` is a boolean key-padding mask (real keys first, padding last,
    the same for every head and query, as HunyuanVideo's text padding); None for any other mask."""
    if mask.dtype != torch.bool or mask.shape[-1] != seq_k or mask.numel() != batch * seq_k:
        return None
    m = mask.reshape(batch, seq_k)
    lens = m.sum(-1)
    if not torch.equal(m, torch.arange(seq_k, device=m.device) < lens.view(-1, 1)) or bool((lens == 0).any()):
        return None
    return lens.to(torch.int32)


class SparseAttnProcessor:
    """Wraps an original attention processor; routes its attention call through the AdaSpa policy."""

    def __init__(self, inner: Any, name: str, family: _Family, policy: AdaSpa, ctx: _Context) -> None:
        self.inner, self.name, self.family, self.policy, self.ctx = inner, name, family, policy, ctx
        self._globals = type(inner).__call__.__globals__

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        args: tuple = (attn, hidden_states, encoder_hidden_states, attention_mask)
        if image_rotary_emb is not None:  # Wan/Flux pass it 4th positionally; SD3/Hunyuan-style by keyword
            args += (image_rotary_emb,)
        if self.policy.config.off:
            return self.inner(*args, **kwargs)
        fam = self.family
        if fam.text == "none":
            text_len = 0
        elif fam.text_from_call:
            text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        else:
            text_len = self.ctx.text_len
        original = self._globals[fam.fn_name]
        replacement = self._sdpa(torch.nn.functional.scaled_dot_product_attention, text_len) \
            if fam.fn_name == "F" else self._dispatch(original, text_len)
        with _LOCK:
            self._globals[fam.fn_name] = _FunctionalProxy(replacement) if fam.fn_name == "F" else replacement
            try:
                return self.inner(*args, **kwargs)
            finally:
                self._globals[fam.fn_name] = original

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                text_len: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, H, S, D) attention by the policy, or None for the original dense path."""
        S = k.shape[2]
        if text_len >= S:
            return None
        kv_lens = None
        if attn_mask is not None:
            kv_lens = suffix_padding_lengths(attn_mask, q.shape[0], S)
            if kv_lens is None:  # a general mask: the original attention handles it
                return None
        if self.family.text == "front":
            ranges: tuple[tuple[int, int], ...] = ((0, text_len),) if text_len else ()
        elif self.family.text == "back":
            ranges = ((S - text_len, S),) if text_len else ()
        else:
            ranges = ()
        B = q.shape[0]
        rows = self.ctx.rows
        if len(rows) != B:  # a hook below this one runs a subset of the rows (a cache computing some branches)
            given = getattr(self.ctx.module, ROW_KEYS_ATTR, None)  # set by that hook through `row_keys`
            rows = list(given) if given is not None and len(given) == B else [("row", B, i) for i in range(B)]
        return self.policy.attend(self.name, rows, self.ctx.step, q, k, v, scale, ranges, kv_lens)

    def _dispatch(self, original: Callable, text_len: int) -> Callable:
        def dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, *args, **kwargs):
            plain = not dropout_p and not is_causal and not enable_gqa and not args \
                and kwargs.get("parallel_config") is None and query.shape[1] == key.shape[1]  # (B, S, H, D)
            out = None
            if plain:
                out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale,
                                   text_len, attn_mask)
            if out is None:
                return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, *args,
                                **kwargs)
            return out.transpose(1, 2)

        return dispatch

    def _sdpa(self, original: Callable, text_len: int) -> Callable:
        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            out = None
            if not dropout_p and not is_causal and not kwargs.get("enable_gqa"):
                out = self._attend(query, key, value, scale, text_len, attn_mask)
            if out is None:
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, **kwargs)
            return out

        return sdpa


class SparseAttentionHook(DenoiserHook):
    """Tells the policy about runs, steps, branches and text length; the forward itself is untouched."""

    def __init__(self, pipe: Any, policy: AdaSpa, ctx: _Context) -> None:
        super().__init__(pipe)
        self.policy, self.ctx = policy, ctx

    def on_run_end(self) -> None:
        self.policy.end_run()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = split_input(args, kwargs)
        keys, _ = branch_keys(self.pipe_ref, self.context.name, x.shape[0], module)
        if self.tracker.new_run_needed(keys):
            self.policy.end_run()
            self.tracker.start()
            self.policy.begin_run()
        steps = self.tracker.steps_for(keys)
        ehs = kwargs.get("encoder_hidden_states")
        self.ctx.rows, self.ctx.step, self.ctx.module = keys, max(steps), module
        self.ctx.text_len = ehs.shape[1] if isinstance(ehs, torch.Tensor) and ehs.ndim == 3 else 0
        return self.original()(*args, **kwargs)


class SparseAttentionFeature(Feature):
    name = "sparse_attention"

    def __init__(self, pipe: Any, config: AdaSpaConfig) -> None:
        self.config = config
        self.modules = find_denoisers(pipe)
        plans: dict[str, tuple[dict[str, Any], dict[str, Any], AdaSpa, _Context]] = {}
        for comp, module in self.modules.items():
            if not hasattr(module, "attn_processors") or not hasattr(module, "set_attn_processor"):
                raise UnsupportedModelError(f"{type(module).__name__} has no attention processors; hasten's "
                                            f"sparse attention supports {SUPPORTED_TEXT}.")
            original = dict(module.attn_processors)
            policy, ctx = AdaSpa(config), _Context()
            wrapped = {}
            for name, proc in original.items():
                fam = FAMILIES.get(type(proc).__name__)
                if fam is not None and (fam.only is None or fam.only in name):
                    wrapped[name] = SparseAttnProcessor(proc, name, fam, policy, ctx)
            if not wrapped:
                kinds = sorted({type(p).__name__ for p in original.values()})
                raise UnsupportedModelError(f"{type(module).__name__} uses attention processors {kinds}; hasten's "
                                            f"sparse attention supports {SUPPORTED_TEXT}.")
            plans[comp] = (original, {**original, **wrapped}, policy, ctx)
        self.originals: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, AdaSpa] = {}
        try:
            for comp, (original, new, policy, ctx) in plans.items():
                module = self.modules[comp]
                self.originals[comp], self.policies[comp] = original, policy
                attach(module, SparseAttentionHook(pipe, policy, ctx), HOOK_NAME, priority=PRIORITY)
                module.set_attn_processor(dict(new))
        except Exception:
            self.remove()  # leave the model exactly as it was
            raise

    def remove(self) -> None:
        for comp, module in self.modules.items():
            detach(module, HOOK_NAME)
            if comp in self.originals:
                module.set_attn_processor(dict(self.originals[comp]))
        self.originals, self.policies = {}, {}

    def stats(self) -> dict[str, AdaSpaStats | None]:
        out: dict[str, AdaSpaStats | None] = {}
        for comp, policy in self.policies.items():
            cur = policy.stats
            out[comp] = cur if (cur.dense_calls or cur.search_calls or cur.sparse_calls) else policy.last_run
        return out


def enable_sparse_attention(pipe: Any, config: AdaSpaConfig | None = None, **kwargs: Any) -> Any:
    """Route the denoiser's self/joint attention through AdaSpa sparse attention; settings as in
    :class:`hasten.kernels.adaspa.AdaSpaConfig`. Calling it again replaces the settings. Returns the pipeline."""
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
