"""Tiny diffusers pipelines with random weights, built from configs (no downloads), for wiring tests.

Each builder returns ``(pipe, call_kwargs)``: ``pipe(**call_kwargs)`` runs a short CFG generation from
precomputed prompt embeddings (no tokenizer needed) and returns latents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)

STEPS = 10


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic, non-degenerate random weights (zero-initialised output layers would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return module.eval()


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(steps_offset=1, clip_sample=False)


def _vae4() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    ).eval()


def _embeds(batch: int, seq: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=g), torch.randn(batch, seq, dim, generator=g)


def sd15(batch: int = 1) -> tuple[StableDiffusionPipeline, dict]:
    unet = _init(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4,
    ), 1)
    pipe = StableDiffusionPipeline(vae=_vae4(), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pe, ne = _embeds(batch, 7, 16, 11)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16)


def sdxl(batch: int = 1) -> tuple[StableDiffusionXLPipeline, dict]:
    unet = _init(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
        use_linear_projection=True,
    ), 2)
    pipe = StableDiffusionXLPipeline(vae=_vae4(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=_ddim(), force_zeros_for_empty_prompt=False)
    pe, ne = _embeds(batch, 7, 16, 12)
    g = torch.Generator().manual_seed(5)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g), height=16, width=16)


def sd3(batch: int = 1) -> tuple[StableDiffusion3Pipeline, dict]:
    tr = _init(SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16), 3)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae4(),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pe, ne = _embeds(batch, 7, 16, 13)
    g = torch.Generator().manual_seed(6)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g), height=16, width=16)


def pixart_sigma(batch: int = 1) -> tuple[PixArtSigmaPipeline, dict]:
    tr = _init(PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                        out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                                        num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                        norm_elementwise_affine=False, norm_eps=1e-6), 4)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae4(), transformer=tr, scheduler=_ddim())
    pe, ne = _embeds(batch, 7, 16, 14)
    mask = torch.ones(batch, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask, negative_prompt=None,
                      negative_prompt_attention_mask=mask, height=16, width=16, use_resolution_binning=False)


def flux(batch: int = 1, true_cfg: bool = True) -> tuple[FluxPipeline, dict]:
    tr = _init(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), 5)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pe, ne = _embeds(batch, 7, 16, 15)
    g = torch.Generator().manual_seed(7)
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=torch.randn(batch, 8, generator=g), height=16, width=16,
              guidance_scale=1.0)
    if true_cfg:
        kw.update(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=torch.randn(batch, 8, generator=g),
                  true_cfg_scale=4.0)
    return pipe, kw


def wan(batch: int = 1) -> tuple[WanPipeline, dict]:
    tr = _init(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_max_seq_len=32), 6)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tr, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pe, ne = _embeds(batch, 7, 16, 16)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_frames=1)


OUTPUT_LAYER = {"sd15": "conv_out", "sdxl": "conv_out", "sd3": "proj_out", "pixart_sigma": "proj_out",
                "flux": "proj_out", "wan": "proj_out"}


class RowCounter:
    """Counts denoiser rows really computed (a pre-hook on the output layer, which a skipped call never reaches)."""

    def __init__(self, denoiser: torch.nn.Module, layer: str) -> None:
        self.rows = 0
        self.calls = 0
        self._h = getattr(denoiser, layer).register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.rows += args[0].shape[0]
        self.calls += 1

    def take(self) -> int:
        n, self.rows, self.calls = self.rows, 0, 0
        return n

    def remove(self) -> None:
        self._h.remove()


def denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


BUILDERS: dict[str, Callable[..., tuple]] = {
    "sd15": sd15, "sdxl": sdxl, "sd3": sd3, "pixart_sigma": pixart_sigma, "flux": flux, "wan": wan,
}


def run(pipe, kwargs: dict, seed: int | list[int] = 0, steps: int = STEPS, **extra) -> torch.Tensor:
    """One generation returning latents (same seed -> same noise; a list gives one generator per item)."""
    gen = ([torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list)
           else torch.Generator().manual_seed(seed))
    out = pipe(**kwargs, **extra, num_inference_steps=steps, generator=gen, output_type="latent")
    res = out.frames if hasattr(out, "frames") else out.images
    return res if isinstance(res, torch.Tensor) else torch.as_tensor(res)



def wan_lora_file(out: Path) -> Path:
    """Save a random rank-4 LoRA for the tiny Wan's attention projections in folder ``out`` (returned)."""
    from diffusers import WanPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe, _ = wan()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in get_peft_model_state_dict(pipe.transformer).items()}
    WanPipeline.save_lora_weights(str(out), transformer_lora_layers=sd)
    return out
