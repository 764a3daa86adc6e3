"""A tiny random Wan pipeline wrapped as a demo ``ModelHandle`` (prompts hashed to fixed embeddings)."""

from __future__ import annotations

import zlib

import torch

from hasten.web.compare import GenerationRequest, ModelHandle

import tiny_pipes as tp


def _embed(text: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(1, 7, 16, generator=g)


def tiny_clips(pipe, request: GenerationRequest, prompts: list[str], on_step=None, frames: int = 1) -> torch.Tensor:
    """(B, frames, C, H, W) in [0, 1] from the tiny pipeline, one seeded generator per prompt."""

    def cb(_p, step, _t, kw):
        if on_step is not None:
            on_step(step)
        return kw

    out = pipe(prompt_embeds=torch.cat([_embed(p) for p in prompts]),
               negative_prompt_embeds=torch.cat([_embed(request.negative_prompt)] * len(prompts)),
               height=16, width=16, num_frames=frames, num_inference_steps=request.steps,
               guidance_scale=request.guidance, output_type="pt", callback_on_step_end=cb,
               generator=[torch.Generator().manual_seed(request.seed + i) for i in range(len(prompts))]).frames
    return out.float().clamp(0, 1)


def _generate(pipe, request: GenerationRequest, prompts: list[str], on_step=None) -> torch.Tensor:
    return tiny_clips(pipe, request, prompts, on_step)[:, 0]


def tiny_handle(name: str = "embedded", digits: bool = True) -> ModelHandle:
    pipe, _ = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    return ModelHandle(name, pipe, _generate, digits=digits, default_steps=10, default_guidance=4.0,
                       default_size=16, size_fixed=True)
