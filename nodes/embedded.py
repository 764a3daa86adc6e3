"""ComfyUI nodes for hasten's embedded digit model: the same trained weights as ``hasten.load_embedded()``.

ComfyUI's core loader cannot take this model (its Wan detection hard-codes 128-wide heads, a 4096-wide
text embedding and a 256-wide time embedding), so the loader node builds the ComfyUI Wan 2.1 model from
the diffusers config, with the model's own latent statistics and flow shift. Text conditioning and
decoding use the embedded text encoder and VAE through diffusers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from .wan_convert import diffusers_wan_to_original

CATEGORY = "hasten/embedded"


def _weights_dir() -> Path:
    from ..embedded import WEIGHTS_DIR

    return WEIGHTS_DIR


@functools.lru_cache(maxsize=1)
def _pipeline():
    """The diffusers pipeline, loaded once, for its text encoder and VAE."""
    from ..embedded import load_embedded

    return load_embedded()


def _latent_format(mean: list[float], std: list[float]):
    import comfy.latent_formats

    class EmbeddedDigitLatent(comfy.latent_formats.LatentFormat):
        latent_channels = len(mean)
        latent_dimensions = 3

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
    cfg = json.loads((root / "transformer" / "config.json").read_text())
    vae_cfg = json.loads((root / "vae" / "config.json").read_text())
    sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
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
    model_config.latent_format = _latent_format(vae_cfg["latents_mean"], vae_cfg["latents_std"])()
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


def encode_prompts(prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as the diffusers WanPipeline computes them (padded to its sequence length)."""
    pipe = _pipeline()
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=torch.device("cpu"))
    return embeds.float()


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples (already de-normalised by the latent format) -> IMAGE (B, H, W, 3) in [0, 1]."""
    pipe = _pipeline()
    with torch.no_grad():
        video = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    img = (video[:, :, 0].float().clamp(-1, 1) + 1) / 2
    return img.permute(0, 2, 3, 1).contiguous()


class HastenEmbeddedLoader:
    """Load hasten's embedded, trained digit model (the weights the bench and the demo use)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI API
        return {"required": {}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self) -> tuple[Any]:
        return (load_comfy_model(),)


class HastenDigitPrompt:
    """CONDITIONING for "digit N" (positive) or the empty prompt (negative) from the embedded text encoder."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"text": ("STRING", {"default": "digit 7", "multiline": False})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, text: str) -> tuple[list]:
        return ([[encode_prompts([text]), {}]],)


class HastenEmptyDigitLatent:
    """An empty latent of the embedded model's shape (channels, one frame, 1/2 the image size)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"size": ("INT", {"default": 32, "min": 8, "max": 256, "step": 8}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 64})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, size: int, batch_size: int) -> tuple[dict]:
        cfg = json.loads((_weights_dir() / "vae" / "config.json").read_text())
        factor = int(cfg.get("scale_factor_spatial", 8))
        shape = (batch_size, int(cfg["z_dim"]), 1, size // factor, size // factor)
        return ({"samples": torch.zeros(shape)},)


class HastenDecodeDigits:
    """Decode a LATENT of the embedded model to IMAGE with its own VAE."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples: dict) -> tuple[torch.Tensor]:
        return (decode_latents(samples["samples"]),)


NODE_CLASS_MAPPINGS = {
    "HastenEmbeddedLoader": HastenEmbeddedLoader,
    "HastenDigitPrompt": HastenDigitPrompt,
    "HastenEmptyDigitLatent": HastenEmptyDigitLatent,
    "HastenDecodeDigits": HastenDecodeDigits,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HastenEmbeddedLoader": "Load Embedded Digit Model (hasten)",
    "HastenDigitPrompt": "Digit Prompt (hasten)",
    "HastenEmptyDigitLatent": "Empty Digit Latent (hasten)",
    "HastenDecodeDigits": "Decode Digits (hasten)",
}
