"""Tiny builds of 30+ diffusers pipeline families (random weights, no downloads) for coverage tests.

``build(name)`` returns ``(pipe, call_kwargs)``: ``call(pipe, call_kwargs)`` runs a short CFG generation
(precomputed prompt embeddings, so no tokenizer or text encoder is needed) with a fresh fixed-seed
generator and returns the output as a tensor (latents: every family is comparable bit for bit, and no
VAE decode is timed). Each build takes well under a second on one CPU thread.

``FirstBlockCounter`` counts the rows that really reach the denoiser's first block (first transformer
block, or first down block of a UNet) with a plain forward pre-hook, independent of hasten's hooks: a
feature that claims to skip work must make this number drop.

The configs follow diffusers' own test fixtures (``get_dummy_components``) as a map of what each family
needs; the builders are our own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)

import tiny_pipes

STEPS = 6
SEED = 0


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded, non-degenerate weights (diffusers zero-inits some output/gate layers)."""
    return tiny_pipes._init(module, seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pair(seq: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(1, seq, dim, seed=seed), _randn(1, seq, dim, seed=seed + 1000)


def _vae(latent: int = 4, blocks: int = 2, **kw: Any) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[8] * blocks, in_channels=3, out_channels=3, latent_channels=latent,
                         norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * blocks,
                         up_block_types=["UpDecoderBlock2D"] * blocks, **kw).eval()


def _image(size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def _sd_unet(seed: int, **kw: Any) -> UNet2DConditionModel:
    cfg: dict[str, Any] = dict(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4)
    cfg.update(kw)
    return _init(UNet2DConditionModel(**cfg), seed)


def _sd_parts(unet: UNet2DConditionModel | None = None) -> dict[str, Any]:
    return dict(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet or _sd_unet(1),
                scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def _sd_embeds() -> dict[str, Any]:
    pe, ne = _pair(7, 16, 11)
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=32, width=32, guidance_scale=5.0)


# ---------------------------------------------------------------- UNet families
def sd15():
    pipe, kw = tiny_pipes.sd15()
    return pipe, {**kw, "guidance_scale": 5.0, "height": 32, "width": 32}


def sdxl():
    pipe, kw = tiny_pipes.sdxl()
    return pipe, {**kw, "guidance_scale": 5.0, "height": 32, "width": 32}


def sd_img2img():
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**_sd_parts())
    return pipe, {**_sd_embeds(), "image": _image(), "strength": 0.8}


def sd_inpaint():
    pipe = diffusers.StableDiffusionInpaintPipeline(**_sd_parts(_sd_unet(7, in_channels=9)))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:12, 4:12] = 1.0
    return pipe, {**_sd_embeds(), "image": _image(), "mask_image": mask, "strength": 1.0}


def _controlnet(seed: int, **kw: Any) -> Any:
    cfg: dict[str, Any] = dict(
        block_out_channels=(16, 32), layers_per_block=1, in_channels=4, down_block_types=(
            "DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4,
        conditioning_embedding_out_channels=(8, 16))
    cfg.update(kw)
    return _init(diffusers.ControlNetModel(**cfg), seed)


def sd_controlnet():
    parts = _sd_parts()
    pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=_controlnet(8))
    return pipe, {**_sd_embeds(), "image": _image()}


def sdxl_controlnet():
    base, kw = tiny_pipes.sdxl()
    cn = _controlnet(9, addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=8 + 6 * 4, use_linear_projection=True,
                     transformer_layers_per_block=(1, 1))
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=base.unet,
        controlnet=cn, scheduler=base.scheduler, force_zeros_for_empty_prompt=False)
    return pipe, {**kw, "image": _image(), "guidance_scale": 5.0, "height": 32, "width": 32}


def sd_pag():
    pipe = diffusers.StableDiffusionPAGPipeline(**_sd_parts(), pag_applied_layers=["mid"])
    return pipe, {**_sd_embeds(), "pag_scale": 3.0}


def animatediff():
    unet = _sd_unet(10, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    adapter = _init(diffusers.MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1,
                                            motion_norm_num_groups=8, motion_num_attention_heads=2,
                                            motion_max_seq_length=8), 11)
    parts = _sd_parts(unet)
    for k in ("safety_checker", "requires_safety_checker"):
        parts.pop(k)
    pipe = diffusers.AnimateDiffPipeline(**parts, motion_adapter=adapter)
    return pipe, {**_sd_embeds(), "num_frames": 2}


def kandinsky22():
    unet = _init(UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=16, encoder_hid_dim_type="image_proj",
        cross_attention_dim=16, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type=None), 12)
    torch.manual_seed(0)
    movq = diffusers.VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2, in_channels=3,
                             latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                             num_vq_embeddings=12, out_channels=3, up_block_types=["UpDecoderBlock2D"] * 2,
                             vq_embed_dim=4).eval()
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=sched, movq=movq)
    return pipe, dict(image_embeds=_randn(1, 16, seed=13), negative_image_embeds=_randn(1, 16, seed=14),
                      height=32, width=32, guidance_scale=4.0)


def deepfloyd_if():
    unet = _init(UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D",
                                                                          "ResnetUpsampleBlock2D"],
        in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu"), 15)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                          sample_max_value=1.0, prediction_type="epsilon", variance_type="learned_range")
    pipe = diffusers.IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=sched, safety_checker=None,
                                feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pe, ne = _pair(7, 32, 16)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, guidance_scale=5.0,
                      output_type="pt")


# ---------------------------------------------------------------- image transformers
def sd3():
    pipe, kw = tiny_pipes.sd3()
    return pipe, {**kw, "guidance_scale": 5.0}


def pixart_sigma():
    pipe, kw = tiny_pipes.pixart_sigma()
    return pipe, {**kw, "guidance_scale": 4.5, "height": 32, "width": 32}


def _tiny_flux() -> tuple[Any, dict]:
    pipe, kw = tiny_pipes.flux()
    return pipe, {**kw, "height": 32, "width": 32}


def flux():
    return _tiny_flux()


def _flux_vae() -> AutoencoderKL:
    return _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)


def flux_img2img():
    base, kw = _tiny_flux()
    pipe = diffusers.FluxImg2ImgPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                         text_encoder_2=None, tokenizer_2=None, transformer=base.transformer)
    return pipe, {**kw, "image": _image(), "strength": 0.8}


def flux_controlnet():
    base, kw = _tiny_flux()
    cn = _init(diffusers.FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)), 17)
    pipe = diffusers.FluxControlNetPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                            text_encoder_2=None, tokenizer_2=None, transformer=base.transformer,
                                            controlnet=cn)
    return pipe, {**kw, "control_image": _image(), "controlnet_conditioning_scale": 0.5}


def chroma():
    tr = _init(diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_hidden_dim=16, approximator_layers=1,
        approximator_num_channels=16), 18)
    pipe = diffusers.ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(), text_encoder=None,
                                    tokenizer=None, transformer=tr)
    pe, ne = _pair(7, 16, 19)
    mask = torch.ones(1, 7, dtype=torch.bool)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=32, width=32, guidance_scale=5.0)


def lumina2():
    tr = _init(diffusers.Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_attention_heads=2,
        num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8), 20)
    pipe = diffusers.Lumina2Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                                     text_encoder=None, tokenizer=None)
    pe, ne = _pair(7, 8, 21)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=128, width=128, guidance_scale=5.0)


def sana():
    tr = _init(diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8), 22)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pe, ne = _pair(7, 8, 23)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=32, width=32, guidance_scale=4.5,
                      use_resolution_binning=False, complex_human_instruction=None, negative_prompt=None)


def auraflow():
    tr = _init(diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        out_channels=4, pos_embed_max_size=64), 24)
    pipe = diffusers.AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=tr,
                                      scheduler=FlowMatchEulerDiscreteScheduler())
    pe, ne = _pair(7, 16, 25)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=32, width=32, guidance_scale=5.0)


def qwen_image():
    tr = _init(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)), 26)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                           temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4).eval()
    pipe = diffusers.QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                       tokenizer=None, transformer=tr)
    pe, ne = _pair(7, 16, 27)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_embeds_mask=mask,
                      negative_prompt_embeds_mask=mask, height=64, width=64, true_cfg_scale=4.0)


def hunyuan_dit():
    tr = _init(diffusers.HunyuanDiT2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, in_channels=4,
        cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16, hidden_size=24,
        activation_fn="gelu-approximate", text_len=7, text_len_t5=7), 28)
    pipe = diffusers.HunyuanDiTPipeline(vae=_vae(blocks=4), text_encoder=None, tokenizer=None, transformer=tr,
                                        scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
    pe, ne = _pair(7, 16, 29)
    pe2, ne2 = _pair(7, 16, 30)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_embeds_2=pe2, negative_prompt_embeds_2=ne2,
                      prompt_attention_mask=mask, negative_prompt_attention_mask=mask, prompt_attention_mask_2=mask,
                      negative_prompt_attention_mask_2=mask, height=128, width=128, guidance_scale=5.0,
                      use_resolution_binning=False)


def cogview4():
    tr = _init(diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4), 31)
    sched = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                            use_dynamic_shifting=True, time_shift_type="linear")
    pipe = diffusers.CogView4Pipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=tr, scheduler=sched)
    pe, ne = _pair(16, 16, 32)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=32, width=32, guidance_scale=5.0)


def z_image():
    tr = _init(diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]), 33)
    pipe = diffusers.ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(16), text_encoder=None,
                                    tokenizer=None, transformer=tr)
    pe, ne = _pair(7, 16, 34)
    return pipe, dict(prompt_embeds=[pe[0]], negative_prompt_embeds=[ne[0]], height=32, width=32,
                      guidance_scale=4.0, cfg_normalization=False, cfg_truncation=1.0)


def dit():
    tr = _init(diffusers.DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False), 35)
    pipe = diffusers.DiTPipeline(transformer=tr, vae=_vae(), scheduler=DDIMScheduler())
    return pipe, dict(class_labels=[1], guidance_scale=4.0)


def hunyuan_image21():
    """HunyuanImage 2.1: CFG through a ``guider`` component (branches labelled by the guider)."""
    tr = _init(diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=16,
        text_embed_2_dim=16, rope_axes_dim=(4, 4)), 54)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4,
                                              block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                              scaling_factor=0.476986, spatial_compression_ratio=8,
                                              sample_size=64).eval()
    guider = diffusers.ClassifierFreeGuidance(guidance_scale=5.0)
    pipe = diffusers.HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae,
                                          text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                          transformer=tr, guider=guider, ocr_guider=None)
    pe, ne = _pair(7, 16, 55)
    pe2, ne2 = _pair(5, 16, 56)
    m, m2 = torch.ones(1, 7, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, prompt_embeds_mask=m, negative_prompt_embeds=ne, negative_prompt_embeds_mask=m,
                      prompt_embeds_2=pe2, prompt_embeds_mask_2=m2, negative_prompt_embeds_2=ne2,
                      negative_prompt_embeds_mask_2=m2, height=64, width=64)


# ---------------------------------------------------------------- video transformers
def wan21():
    pipe, kw = tiny_pipes.wan()
    return pipe, {**kw, "height": 128, "width": 128, "guidance_scale": 5.0}


def _wan_tr(seed: int) -> Any:
    return _init(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32), seed)


def wan22():
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=_wan_tr(36), transformer_2=_wan_tr(37),
                                 vae=_wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 boundary_ratio=0.5)
    pe, ne = _pair(7, 16, 38)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=128, num_frames=1,
                      guidance_scale=5.0)


def wan_v2v():
    pipe = diffusers.WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, transformer=_wan_tr(39),
                                             vae=_wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    from PIL import Image

    g = torch.Generator().manual_seed(40)
    frames = [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(5)]
    pe, ne = _pair(7, 16, 41)
    return pipe, dict(video=frames, prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64,
                      guidance_scale=5.0, strength=0.8)


def cogvideox():
    tr = _init(diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=7), 42)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                       scheduler=DDIMScheduler())
    pe, ne = _pair(7, 16, 43)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                      guidance_scale=6.0)


def ltx():
    tr = _init(diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16), 44)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    pipe = diffusers.LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, transformer=tr)
    pe, ne = _pair(7, 16, 45)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=32, width=32, num_frames=9, guidance_scale=3.0)


def mochi():
    tr = _init(diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=7), 46)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32,) * 4,
                                       decoder_block_out_channels=(32,) * 4,
                                       layers_per_block=(1, 1, 1, 1, 1)).eval()
    pipe = diffusers.MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   tokenizer=None, transformer=tr)
    pe, ne = _pair(7, 16, 47)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=64, width=64, num_frames=7, guidance_scale=4.5)


def hunyuan_video():
    tr = _init(diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)), 48)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                          scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                          tokenizer_2=None)
    pe, ne = _pair(7, 16, 49)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=_randn(1, 8, seed=50),
                      negative_pooled_prompt_embeds=_randn(1, 8, seed=51), prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=64, width=64, num_frames=5, guidance_scale=1.0,
                      true_cfg_scale=4.0)


def allegro():
    tr = _init(diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=24), 52)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLAllegro(
        in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    pipe = diffusers.AllegroPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                     scheduler=DDIMScheduler())
    pe, ne = _pair(7, 24, 53)
    mask = torch.ones(1, 7, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, prompt_attention_mask=mask,
                      negative_prompt_attention_mask=mask, height=64, width=64, num_frames=8, guidance_scale=6.0,
                      negative_prompt=None)


BUILDERS: dict[str, Callable[[], tuple[Any, dict]]] = {
    "sd15": sd15, "sdxl": sdxl, "sd_img2img": sd_img2img, "sd_inpaint": sd_inpaint, "sd_controlnet": sd_controlnet,
    "sdxl_controlnet": sdxl_controlnet, "sd_pag": sd_pag, "animatediff": animatediff, "kandinsky22": kandinsky22,
    "deepfloyd_if": deepfloyd_if, "sd3": sd3, "pixart_sigma": pixart_sigma, "flux": flux,
    "flux_img2img": flux_img2img, "flux_controlnet": flux_controlnet, "chroma": chroma, "lumina2": lumina2,
    "sana": sana, "auraflow": auraflow, "qwen_image": qwen_image, "hunyuan_dit": hunyuan_dit, "cogview4": cogview4,
    "z_image": z_image, "dit": dit, "hunyuan_image21": hunyuan_image21, "wan21": wan21, "wan22": wan22, "wan_v2v": wan_v2v, "cogvideox": cogvideox,
    "ltx": ltx, "mochi": mochi, "hunyuan_video": hunyuan_video, "allegro": allegro,
}
NAMES = list(BUILDERS)


def build(name: str) -> tuple[Any, dict]:
    """A fresh tiny pipeline of family ``name`` and its call arguments (CFG on, no generator)."""
    torch.manual_seed(0)
    pipe, kwargs = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("output_type", "latent")
    return pipe, kwargs


def call(pipe: Any, kwargs: dict, steps: int = STEPS, seed: int = SEED, **extra: Any) -> torch.Tensor:
    """One generation with a fresh fixed-seed generator; the output as a float tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(**{**kwargs, **extra}, num_inference_steps=steps, generator=gen)
    for attr in ("frames", "images", "image"):
        res = getattr(out, attr, None)
        if res is not None:
            break
    else:
        res = out[0]
    if isinstance(res, list):
        res = res[0] if len(res) == 1 and isinstance(res[0], torch.Tensor) else torch.as_tensor(res)
    return torch.as_tensor(res).float()


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The denoiser components (transformer / transformer_2 / unet / prior) that exist."""
    out = {}
    for name in ("transformer", "transformer_2", "unet", "prior"):
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            out[name] = mod
    return out


BLOCK_LISTS = ("transformer_blocks", "joint_transformer_blocks", "double_stream_blocks", "blocks", "layers",
               "down_blocks")


def first_block(denoiser: torch.nn.Module) -> torch.nn.Module:
    """The denoiser's first main block (first transformer block, or the UNet's first down block)."""
    for attr in BLOCK_LISTS:
        blocks = getattr(denoiser, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks[0]
    for child in denoiser.children():
        if isinstance(child, torch.nn.ModuleList) and len(child):
            return child[0]
    raise LookupError(f"no block list found in {type(denoiser).__name__}")


def _rows(args: tuple, kwargs: dict) -> int:
    for v in (kwargs.get("hidden_states"), *args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return 0


class FirstBlockCounter:
    """Rows and calls that really reach the first block of every denoiser of ``pipe`` (a forward pre-hook)."""

    def __init__(self, pipe: Any) -> None:
        self.rows = 0
        self.calls = 0
        self._handles = [first_block(m).register_forward_pre_hook(self._hook, with_kwargs=True)
                         for m in denoisers(pipe).values()]

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.rows += _rows(args, kwargs)
        self.calls += 1

    def take(self) -> tuple[int, int]:
        """(rows, calls) since the last take, and reset."""
        out = (self.rows, self.calls)
        self.rows = self.calls = 0
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FirstBlockCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def counted(pipe: Any, kwargs: dict, **extra: Any) -> tuple[torch.Tensor, int, int]:
    """(output, rows, calls) at the first block for one generation."""
    with FirstBlockCounter(pipe) as c:
        out = call(pipe, kwargs, **extra)
        rows, calls = c.take()
    return out, rows, calls
