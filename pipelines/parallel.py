"""hasten's features under diffusers' context parallelism (``transformer.enable_parallelism``).

diffusers is the engine: it splits the sequence over the ranks before the first block, runs attention
as Ulysses (all-to-all: every rank attends over the full sequence for ``heads / degree`` heads) or Ring
(every rank keeps its query shard and passes key/value shards around), and gathers the output at
``proj_out``. hasten's denoiser hooks (EasyCache, adaptive guidance) sit on the denoiser's forward, outside
that split, so their value-reading decisions see the same full tensors on every rank.

Sparse attention is the exception: it replaces the attention computation itself. Under Ulysses it runs
the same all-to-all exchange as diffusers and searches / applies the block patterns of the rank's own
heads over the full sequence; patterns are per head, so every head gets the pattern it gets in one
process. Ring shards the keys by sequence, so no rank can measure a head's attention mass over all
key blocks: that (and uneven "anything" sharding, and joint text+image attention, whose text tokens
end up interleaved with image shards) is refused with :class:`~hasten.errors.UnsupportedModelError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsupportedModelError

SUPPORTED_TEXT = ("sparse attention under diffusers' context parallelism supports Ulysses "
                  "(ContextParallelConfig(ulysses_degree=N), ring_degree 1, even head and token counts) on "
                  "self-attention-only denoisers (Wan); use no sparse attention with Ring / unified / "
                  "'anything' context parallelism or joint text+image attention")


def _cp(parallel_config: Any) -> Any:
    return getattr(parallel_config, "context_parallel_config", parallel_config)


def check_sparse_supported(parallel_config: Any, joint: bool = False) -> None:
    """Raise UnsupportedModelError when sparse attention cannot respect this context-parallel sharding."""
    cp = _cp(parallel_config)
    ring = getattr(cp, "ring_degree", 1) or 1
    ulysses = getattr(cp, "ulysses_degree", 1) or 1
    what = None
    if ring > 1:
        what = f"Ring context parallelism (ring_degree={ring}) shards keys by sequence"
    elif getattr(cp, "ulysses_anything", False):
        what = "ulysses_anything (uneven shards)"
    elif ulysses <= 1:
        what = "a context-parallel config without a Ulysses degree"
    elif joint:
        what = "joint text+image attention (its text tokens are split across ranks)"
    if what is not None:
        raise UnsupportedModelError(f"hasten sparse attention cannot run with {what}: {SUPPORTED_TEXT}.")


def _exchange(x: torch.Tensor, degree: int, group: Any, to_heads: bool) -> torch.Tensor:
    """Ulysses all-to-all. ``to_heads``: (B, S/n, H, D) sequence shard -> (B, S, H/n, D) head shard; else back."""
    if to_heads:
        B, s, H, D = x.shape
        send = x.reshape(B, s, degree, H // degree, D).permute(2, 0, 1, 3, 4).contiguous()
    else:
        B, S, h, D = x.shape
        send = x.reshape(B, degree, S // degree, h, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send, group=group)  # chunk i goes to rank i, chunk j came from j
    if to_heads:  # recv[j]: rank j's sequence shard of this rank's heads
        return recv.permute(1, 0, 2, 3, 4).reshape(B, degree * s, H // degree, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // degree, degree * h, D)  # recv[j]: head block j


def ulysses_sparse_attention(proc: Any, real: Callable, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
                             is_causal: bool, scale: float | None, enable_gqa: bool, backend: Any,
                             parallel_config: Any) -> torch.Tensor:
    """``dispatch_attention_fn`` for a sparse-attention processor under Ulysses: (B, S/n, H, D) in and out.

    Exchanges q/k/v to head shards over the full sequence, lets ``proc`` (a SparseAttnProcessor) answer
    with sparse/search attention or None (then the original dispatcher runs on the head shard, as
    diffusers' Ulysses does), and exchanges the output back.
    """
    cp = _cp(parallel_config)
    check_sparse_supported(cp, joint=proc._shape[1] is not None)
    degree = cp.ulysses_degree
    B, s, H, D = query.shape
    if (attn_mask is not None or dropout_p or is_causal or enable_gqa or key.shape[1] != s
            or key.shape[2] != H or H % degree):
        proc.policy.fallback("context-parallel attention with a mask, dropout, causal, grouped-query or "
                             "cross attention, or heads not divisible by the Ulysses degree")
        return real(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, None,
                    backend=backend, parallel_config=parallel_config)
    group = cp._ulysses_mesh.get_group()
    q, k, v = (_exchange(x, degree, group, True) for x in (query, key, value))
    hs_len, ehs_len = proc._shape
    proc._shape = (hs_len * degree if hs_len else hs_len, ehs_len)  # the full sequence this rank now sees
    try:
        out = proc.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, scale, 0.0, False,
                          False, None)
    finally:
        proc._shape = (hs_len, ehs_len)
    out = real(q, k, v, None, 0.0, False, scale, False, None, backend=backend) if out is None else out.transpose(1, 2)
    return _exchange(out.contiguous(), degree, group, False)


def check_hook_order(module: torch.nn.Module, hook: Any) -> None:
    """Refuse a hasten hook that sits inside diffusers' context-parallel input split of ``module``.

    ``enable_parallelism`` registers its split hook outermost. For plans that split the denoiser's own
    inputs at the root (Flux, SD3, ...; not Wan, whose root plan splits only a per-token ``timestep``), a
    hasten hook registered earlier would then read each rank's sequence shard: value-based decisions and
    cached residuals would be rank-local and the image wrong (or the ranks would deadlock). hasten's
    ``attach`` places its hooks outside diffusers' hooks, so enabling the features after
    ``enable_parallelism`` is the supported order.
    """
    if getattr(module, "_parallel_config", None) is None:
        return
    registry = getattr(module, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", ()))
    mine = next((i for i, name in enumerate(order) if registry.hooks.get(name) is hook), None)
    if mine is None:
        return
    for name in order[mine + 1:]:  # later in the order = outer
        split = set(getattr(registry.hooks[name], "metadata", None) or ()) if name.startswith("cp_input---") else set()
        if split - {"timestep"}:
            raise UnsupportedModelError(
                f"hasten: {type(module).__name__}.enable_parallelism() was called after a hasten feature was "
                f"enabled, so its context-parallel split of {sorted(split)} runs before hasten's hooks, which "
                "would decide on one rank's shard. Enable hasten's features after enable_parallelism() (or "
                "disable and re-enable them), so every rank decides on the full input.")


def full_sequence(hook: Any, inputs: list[torch.Tensor], outputs: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Block tensors for a value-reading decision made *inside* diffusers' sequence split (ProfilingDiT's
    per-block residual change): each rank's shard all-gathered along the sequence (dim 1), so every rank
    profiles the full tensors one process sees and picks the same blocks to cache (a rank caching another
    block would skip that block's attention all-to-all and deadlock the others). Unchanged without context
    parallelism. A stream diffusers did not split is gathered as copies, which leaves a mean change as it is.
    """
    pipe = hook.pipe_ref() if getattr(hook, "pipe_ref", None) is not None else None
    config = None
    if pipe is not None:
        from .denoiser import find_denoisers

        config = next((c for m in find_denoisers(pipe).values()
                       if (c := getattr(m, "_parallel_config", None)) is not None), None)
    if config is None or not torch.distributed.is_initialized():
        return inputs, outputs
    cp = _cp(config)
    if getattr(cp, "ulysses_anything", False):
        raise UnsupportedModelError("hasten ProfilingDiT profiles full block tensors across context-parallel ranks and "
                                    "needs even shards: ulysses_anything (uneven shards) is not supported; use "
                                    "Δ-DiT (a fixed schedule) or even Ulysses / Ring degrees")
    group = cp._flattened_mesh.get_group()
    world = torch.distributed.get_world_size(group)

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts, dim=1)

    return [gather(t) for t in inputs], [gather(t) for t in outputs]
