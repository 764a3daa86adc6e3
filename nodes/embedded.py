"""ComfyUI nodes for hasten's embedded digit model: the same trained weights as ``hasten.load_embedded()``.

ComfyUI's core loader cannot take this model (its Wan detection hard-codes 128-wide heads, a 4096-wide
text embedding and a 256-wide time embedding), so the loader node builds the ComfyUI Wan 2.1 model from
the diffusers config, with the model's own latent statistics, VAE factors and flow shift. Text
conditioning uses the embedded UMT5 encoder through transformers, decoding the embedded VAE model class
of diffusers (imported only when a Decode node runs; no diffusers pipeline is ever imported).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .schema import advanced, fail, io
from .wan_convert import diffusers_wan_to_original

CATEGORY = "hasten/embedded"


CATEGORY = "hasten/embedded"
MAX_SEQUENCE_LENGTH = 226  # WanPipeline.encode_prompt's default: the embedded model was trained with it
log = logging.getLogger("hasten")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weights_dir() -> Path:
    from ..embedded import WEIGHTS_DIR

    return WEIGHTS_DIR


def _config(part: str, name: str = "config.json", root: Path | None = None) -> dict:
    return json.loads(((root or _weights_dir()) / part / name).read_text())


@functools.lru_cache(maxsize=1)
def _text_encoder() -> tuple[Any, Any]:
    """The embedded tokenizer and UMT5 text encoder (transformers; loaded once, offline)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = _weights_dir()
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), local_files_only=True,
                                           dtype=torch.float32).eval()
    return tok, enc


@functools.lru_cache(maxsize=1)
def _vae() -> Any:
    """The embedded VAE (diffusers' AutoencoderKLWan model class, not a pipeline; loaded once, offline)."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    except Exception as e:  # a broken diffusers takes down only this node, with the reason
        fail("Decode Digits (hasten)", f"needs diffusers' AutoencoderKLWan, which failed to import "
                                       f"({type(e).__name__}: {e}); install diffusers>=0.35", RuntimeError)
    return AutoencoderKLWan.from_pretrained(str(_weights_dir() / "vae"), local_files_only=True).eval()


def _latent_format(mean: list[float], std: list[float], spatial: int, temporal: int):
    import comfy.latent_formats

    class EmbeddedDigitLatent(comfy.latent_formats.LatentFormat):
        latent_channels = len(mean)
        latent_dimensions = 3
        spacial_downscale_ratio = spatial  # ComfyUI >= 0.3.7x sizes built-in empty latents with it
        temporal_downscale_ratio = temporal

        def __init__(self) -> None:
            self.scale_factor = 1.0
            self.latents_mean = torch.tensor(mean).view(1, -1, 1, 1, 1)
            self.latents_std = torch.tensor(std).view(1, -1, 1, 1, 1)

        def process_in(self, latent: torch.Tensor) -> torch.Tensor:
            m = self.latents_mean.to(latent.device, latent.dtype)
            s = self.latents_std.to(latent.device, latent.dtype)
            return (latent - m) * self.scale_factor / s

        def process_out(self, latent: torch.Tensor) -> torch.Tensor:
            m = self.latents_mean.to(latent.device, latent.dtype)
            s = self.latents_std.to(latent.device, latent.dtype)
            return latent * s / self.scale_factor + m

    return EmbeddedDigitLatent


def load_comfy_model(weights_dir: Path | None = None, dtype: torch.dtype = torch.float32):
    """The embedded transformer as a ComfyUI ``ModelPatcher`` (Wan 2.1 T2V, original key layout)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    root = Path(weights_dir) if weights_dir is not None else _weights_dir()
    cfg = _config("transformer", root=root)
    vae_cfg = _config("vae", root=root)
    sched_cfg = _config("scheduler", "scheduler_config.json", root=root)
    sd = diffusers_wan_to_original(load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors")))
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    unet_config = {
        "image_model": "wan2.1", "model_type": "t2v", "dim": heads * head_dim, "num_heads": heads,
        "in_dim": cfg["in_channels"], "out_dim": cfg["out_channels"], "ffn_dim": cfg["ffn_dim"],
        "num_layers": cfg["num_layers"], "patch_size": tuple(cfg["patch_size"]), "freq_dim": cfg["freq_dim"],
        "text_dim": cfg["text_dim"], "window_size": (-1, -1), "qk_norm": cfg.get("qk_norm") is not None,
        "cross_attn_norm": bool(cfg.get("cross_attn_norm", True)), "eps": cfg.get("eps", 1e-6),
    }
    model_config = comfy.supported_models.WAN21_T2V(unet_config)
    model_config.latent_format = _latent_format(vae_cfg["latents_mean"], vae_cfg["latents_std"],
                                                int(vae_cfg.get("scale_factor_spatial", 8)),
                                                int(vae_cfg.get("scale_factor_temporal", 4)))()
    model_config.sampling_settings = {"shift": float(sched_cfg.get("flow_shift") or sched_cfg.get("shift") or 1.0)}
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    model.diffusion_model.to(dtype)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"embedded weights do not fit the ComfyUI Wan model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def _clean(text: str) -> str:
    """WanPipeline's prompt cleaning (HTML unescape, whitespace collapse; ftfy is a no-op on ASCII prompts)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def encode_prompts(prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as the diffusers WanPipeline computes them (padded to its sequence length)."""
    tok, enc = _text_encoder()
    inputs = tok([_clean(p) for p in prompts], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                 truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask
    with torch.no_grad():
        hidden = enc(inputs.input_ids, mask).last_hidden_state.float()
    lens = mask.gt(0).sum(dim=1)
    out = torch.zeros_like(hidden)
    for i, n in enumerate(lens.tolist()):
        out[i, :n] = hidden[i, :n]
    return out


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples (already de-normalised by the latent format) -> IMAGE (B, H, W, 3) in [0, 1]."""
    vae = _vae()
    if latents.ndim == 4:  # a 2-D latent from a generic node: one frame
        latents = latents.unsqueeze(2)
    z_dim = int(vae.config.z_dim)
    if latents.ndim != 5 or latents.shape[1] != z_dim:
        fail("Decode Digits (hasten)", f"expects a LATENT of the embedded model ({z_dim} channels, "
                                       f"B x {z_dim} x frames x H x W), got shape {tuple(latents.shape)}", ValueError)
    with torch.no_grad():
        video = vae.decode(latents[:, :, :1].to(vae.dtype), return_dict=False)[0]
    img = (video[:, :, 0].float().clamp(-1, 1) + 1) / 2
    return img.permute(0, 2, 3, 1).contiguous()


class HastenEmbeddedLoader(io.ComfyNode):
    """Load hasten's embedded, trained digit model (the weights the bench and the demo use)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenEmbeddedLoader",
            display_name="Load Embedded Digit Model (hasten)",
            category=CATEGORY,
            description=("Loads hasten's small trained text-to-image model (a Wan 2.1 transformer, 32x32 "
                         "handwritten digits from prompts \"digit 0\" .. \"digit 9\"). Shipped with the pack, "
                         "no download; try every hasten node on it in seconds on a CPU."),
            inputs=[io.Combo.Input("weight_dtype", options=list(DTYPES), default="float32",
                                   tooltip="Precision of the transformer weights.", **advanced())],
            outputs=[io.Model.Output(tooltip="The embedded model as a ComfyUI MODEL (Wan 2.1 text-to-video, "
                                             "one frame); sample it with any sampler, 20 steps, CFG 4.")],
        )

    @classmethod
    def execute(cls, weight_dtype: str = "float32") -> io.NodeOutput:
        return io.NodeOutput(load_comfy_model(dtype=DTYPES[weight_dtype]))


class HastenDigitPrompt(io.ComfyNode):
    """CONDITIONING for "digit N" (positive) or the empty prompt (negative) from the embedded text encoder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenDigitPrompt",
            display_name="Digit Prompt (hasten)",
            category=CATEGORY,
            description=("Encodes a prompt with the embedded model's own text encoder. The model knows "
                         "\"digit 0\" .. \"digit 9\"; the empty prompt is its negative/unconditional prompt."),
            inputs=[io.String.Input("text", default="digit 7",
                                    tooltip="\"digit N\" with N in 0..9, or empty for the negative prompt.")],
            outputs=[io.Conditioning.Output(tooltip="CONDITIONING for the embedded model's sampler.")],
        )

    @classmethod
    def execute(cls, text: str = "digit 7") -> io.NodeOutput:
        if text.strip() and not re.fullmatch(r"\s*digit\s+[0-9]\s*", text):
            log.warning("Digit Prompt (hasten): %r is not a prompt the embedded model was trained on "
                        "(\"digit 0\" .. \"digit 9\" or empty)", text)
        return io.NodeOutput([[encode_prompts([text]), {}]])


class HastenEmptyDigitLatent(io.ComfyNode):
    """An empty latent of the embedded model's shape (channels, one frame, 1/2 the image size)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenEmptyDigitLatent",
            display_name="Empty Digit Latent (hasten)",
            category=CATEGORY,
            description=("An empty LATENT for the embedded model: its VAE has 4 channels and shrinks images "
                         "by 2 (the built-in Empty Latent Image gives the same size on ComfyUI >= 0.3.7x "
                         "versions that honour a model's latent scale; this node works everywhere)."),
            inputs=[
                io.Int.Input("size", default=32, min=8, max=256, step=8,
                             tooltip="Image width and height in pixels (the model was trained at 32)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per batch."),
            ],
            outputs=[io.Latent.Output(tooltip="Zeros of shape batch x 4 x 1 x size/2 x size/2.")],
        )

    @classmethod
    def execute(cls, size: int = 32, batch_size: int = 1) -> io.NodeOutput:
        cfg = _config("vae")
        factor = int(cfg.get("scale_factor_spatial", 8))
        shape = (batch_size, int(cfg["z_dim"]), 1, size // factor, size // factor)
        return io.NodeOutput({"samples": torch.zeros(shape), "downscale_ratio_spacial": factor})


class HastenDecodeDigits(io.ComfyNode):
    """Decode a LATENT of the embedded model to IMAGE with its own VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenDecodeDigits",
            display_name="Decode Digits (hasten)",
            category=CATEGORY,
            description="Decodes the embedded model's LATENT to images with the model's own VAE.",
            inputs=[io.Latent.Input("samples", tooltip="The sampler's output LATENT (embedded model).")],
            outputs=[io.Image.Output(tooltip="The images (batch x H x W x 3, values 0..1); first frame only.")],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        return io.NodeOutput(decode_latents(samples["samples"]))


NODES = [HastenEmbeddedLoader, HastenDigitPrompt, HastenEmptyDigitLatent, HastenDecodeDigits]
