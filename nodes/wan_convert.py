"""Rename a diffusers ``WanTransformer3DModel`` state dict to the original Wan 2.1 layout ComfyUI loads.

ComfyUI 0.3.x detects Wan models from original-format keys only (``head.modulation``, ``blocks.N.self_attn``
...), so hasten's loader node converts the embedded model's diffusers weights with this table. Pure tensor
renaming: no ComfyUI import needed.
"""

from __future__ import annotations

import re

import torch

# (diffusers pattern, original pattern); applied in order, first match wins.
_RULES: list[tuple[str, str]] = [
    (r"^blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"^blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"^blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"^blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"^blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^patch_embedding\.", "patch_embedding."),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def diffusers_wan_to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state dict under original Wan 2.1 key names; unknown keys raise (never silently dropped)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        for pattern, repl in _COMPILED:
            if pattern.search(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            "cannot convert these diffusers Wan keys to the original layout (only text-to-video Wan 2.1 "
            f"transformers without image/added-KV projections are supported): {unknown[:8]}"
        )
    return out
