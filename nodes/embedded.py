"""ComfyUI nodes for hasten's embedded models: the same trained weights as ``hasten.load_embedded()``.

Two models: the digit image model (``"digit N"``, 32x32) and the moving-digit video model
(``"digit N moving DIRECTION"``, 17 frames at 32x32; ``hasten.load_embedded("video")``).
ComfyUI's core loader cannot take them (its Wan detection hard-codes 128-wide heads, a 4096-wide
text embedding and a 256-wide time embedding), so the loader nodes build the ComfyUI Wan 2.1 model from
the diffusers config, with the model's own latent statistics, VAE factors and flow shift. Text
conditioning uses the model's own UMT5 encoder through transformers, decoding the model's own VAE with
diffusers' model class (imported only when a Decode node runs; no diffusers pipeline is ever imported).
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
MAX_SEQUENCE_LENGTH = 512  # what WanPipeline.__call__ pads prompts to (its default); the embedded models were trained with it
log = logging.getLogger("hasten")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODELS = ("image", "video")
DIRECTIONS = ("left", "right", "up", "down")  # the video model's prompts (hasten.embedded.video_data)
VIDEO_FRAMES = 17  # the video model's trained clip length
VIDEO_TRAIN_COMMAND = "hasten train-embedded --video"


def _weights_dir(model: str = "image") -> Path:
    """The diffusers folder of the embedded ``model`` ("image" or "video")."""
    if model not in MODELS:
        raise ValueError(f"embedded model must be one of {MODELS}, got {model!r}")
    if model == "video":
        from ..embedded.video import VIDEO_WEIGHTS_DIR

        return VIDEO_WEIGHTS_DIR
    from ..embedded import WEIGHTS_DIR

    return WEIGHTS_DIR


def _checked_dir(node: str, model: str) -> Path:
    """The weights folder of ``model``; a node error naming the training command when it is missing."""
    root = _weights_dir(model)
    if not (root / "model_index.json").exists():
        cmd = VIDEO_TRAIN_COMMAND if model == "video" else "hasten train-embedded"
        fail(node, f"no embedded {model} model at {root}; create it with `{cmd} --out {root}`", FileNotFoundError)
    return root


def _config(part: str, name: str = "config.json", root: Path | None = None) -> dict:
    return json.loads(((root or _weights_dir()) / part / name).read_text())


@functools.lru_cache(maxsize=2)
def _text_encoder(root: Path | None = None) -> tuple[Any, Any]:
    """The embedded tokenizer and UMT5 text encoder of the model in ``root`` (transformers; loaded once, offline)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = root or _weights_dir()
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), local_files_only=True,
                                           dtype=torch.float32).eval()
    return tok, enc


@functools.lru_cache(maxsize=2)
def _vae(root: Path | None = None) -> Any:
    """The embedded VAE in ``root`` (diffusers' AutoencoderKLWan model class, not a pipeline; loaded once, offline)."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    except Exception as e:  # a broken diffusers takes down only this node, with the reason
        fail("Decode Digits (hasten)", f"needs diffusers' AutoencoderKLWan, which failed to import "
                                       f"({type(e).__name__}: {e}); install diffusers>=0.35", RuntimeError)
    return AutoencoderKLWan.from_pretrained(str((root or _weights_dir()) / "vae"), local_files_only=True).eval()


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


def load_comfy_model(weights_dir: Path | None = None, dtype: torch.dtype = torch.float32, model: str = "image"):
    """An embedded transformer as a ComfyUI ``ModelPatcher`` (Wan 2.1 T2V, original key layout).

    ``model``: "image" (the digit model) or "video" (the moving-digit model, frame-wise VAE: its latent
    format has temporal factor 1, so a latent of 17 frames is a 17-frame clip); ``weights_dir`` overrides
    the folder."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    root = Path(weights_dir) if weights_dir is not None else _weights_dir(model)
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
    net = model_config.get_model({})
    net.diffusion_model.to(dtype)
    missing, unexpected = net.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"embedded weights do not fit the ComfyUI Wan model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(net, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def _clean(text: str) -> str:
    """WanPipeline's prompt cleaning (HTML unescape, whitespace collapse; ftfy is a no-op on ASCII prompts)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def encode_prompts(prompts: list[str], model: str = "image") -> torch.Tensor:
    """Text embeddings exactly as the diffusers WanPipeline computes them (padded to its sequence length),
    with the text encoder of the embedded ``model``."""
    tok, enc = _text_encoder(_weights_dir(model))
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


def decode_latents(latents: torch.Tensor, model: str = "image") -> torch.Tensor:
    """ComfyUI LATENT samples (already de-normalised by the latent format) -> IMAGE (N, H, W, 3) in [0, 1].

    "image": one image per batch item (the first frame). "video": every frame of every clip, clip after
    clip (N = batch x frames: ComfyUI's IMAGE batch is the frame sequence Save Animated WEBP/PNG take),
    decoded in one call as the diffusers pipeline does."""
    node = "Decode Digit Video (hasten)" if model == "video" else "Decode Digits (hasten)"
    vae = _vae(_weights_dir(model))
    if latents.ndim == 4:  # a 2-D latent from a generic node: one frame
        latents = latents.unsqueeze(2)
    z_dim = int(vae.config.z_dim)
    if latents.ndim != 5 or latents.shape[1] != z_dim:
        fail(node, f"expects a LATENT of the embedded {model} model ({z_dim} channels, "
                   f"B x {z_dim} x frames x H x W), got shape {tuple(latents.shape)}", ValueError)
    if model == "image":
        latents = latents[:, :, :1]
    with torch.no_grad():
        video = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
    frames = (video.float().clamp(-1, 1) + 1) / 2
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, *frames.shape[3:], 3).contiguous()


# -- node schemas: the image and the video model's nodes differ only in names, texts and the clip inputs ----------
def _schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list) -> io.Schema:
    """The schema of one embedded-model node (all live in :data:`CATEGORY`)."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs)


def _loader_schema(node_id: str, display_name: str, description: str, output_tooltip: str) -> io.Schema:
    """A loader node: the weight precision in, the ComfyUI MODEL out."""
    return _schema(node_id, display_name, description + " Shipped with the pack, no download.",
                   [io.Combo.Input("weight_dtype", options=list(DTYPES), default="float32",
                                   tooltip="Precision of the transformer weights.", **advanced())],
                   [io.Model.Output(tooltip=output_tooltip)])


def _latent_schema(node_id: str, display_name: str, description: str, what: str, extra: list,
                   output_tooltip: str) -> io.Schema:
    """An empty-latent node: ``extra`` inputs (the clip length), then size and batch size."""
    return _schema(node_id, display_name, description, [
        *extra,
        io.Int.Input("size", default=32, min=8, max=256, step=8,
                     tooltip=f"{what.capitalize()} width and height in pixels (the model was trained at 32)."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=f"{'Clips' if extra else 'Images'} per batch."),
    ], [io.Latent.Output(tooltip=output_tooltip)])


def _decode_schema(node_id: str, display_name: str, description: str, input_tooltip: str,
                   output_tooltip: str) -> io.Schema:
    """A decode node: the sampler's LATENT in, IMAGE out."""
    return _schema(node_id, display_name, description, [io.Latent.Input("samples", tooltip=input_tooltip)],
                   [io.Image.Output(tooltip=output_tooltip)])


def _load(node: str, model: str, weight_dtype: str) -> io.NodeOutput:
    return io.NodeOutput(load_comfy_model(_checked_dir(node, model), dtype=DTYPES[weight_dtype], model=model))


def _empty_latent(node: str, model: str, frames: int, size: int, batch_size: int) -> io.NodeOutput:
    """Zeros of shape batch x channels x frames x size/f x size/f (f: the VAE's spatial factor)."""
    cfg = _config("vae", root=_checked_dir(node, model))
    factor = int(cfg.get("scale_factor_spatial", 8))
    if size % (2 * factor):
        fail(node, f"size must be a multiple of {2 * factor} (VAE factor {factor} x patch 2), got {size}", ValueError)
    shape = (batch_size, int(cfg["z_dim"]), frames, size // factor, size // factor)
    return io.NodeOutput({"samples": torch.zeros(shape), "downscale_ratio_spacial": factor})


def _decode(node: str, model: str, samples: dict) -> io.NodeOutput:
    _checked_dir(node, model)
    return io.NodeOutput(decode_latents(samples["samples"], model=model))


LOADER_NAME = "Load Embedded Digit Model (hasten)"
LATENT_NAME = "Empty Digit Latent (hasten)"
DECODE_NAME = "Decode Digits (hasten)"
VIDEO_LOADER_NAME = "Load Embedded Digit Video Model (hasten)"
VIDEO_LATENT_NAME = "Empty Digit Video Latent (hasten)"
VIDEO_DECODE_NAME = "Decode Digit Video (hasten)"


class HastenEmbeddedLoader(io.ComfyNode):
    """Load hasten's embedded, trained digit model (the weights the bench and the demo use)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _loader_schema(
            "HastenEmbeddedLoader", LOADER_NAME,
            "Loads hasten's small trained text-to-image model (a Wan 2.1 transformer, 32x32 handwritten digits "
            "from prompts \"digit 0\" .. \"digit 9\"); try every hasten node on it in seconds on a CPU.",
            "The embedded model as a ComfyUI MODEL (Wan 2.1 text-to-video, one frame); sample it with any "
            "sampler, 20 steps, CFG 4.")

    @classmethod
    def execute(cls, weight_dtype: str = "float32") -> io.NodeOutput:
        return _load(LOADER_NAME, "image", weight_dtype)


class HastenDigitPrompt(io.ComfyNode):
    """CONDITIONING for "digit N" (positive) or the empty prompt (negative) from the embedded text encoder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "HastenDigitPrompt", "Digit Prompt (hasten)",
            "Encodes a prompt with the embedded model's own text encoder. The model knows \"digit 0\" .. "
            "\"digit 9\"; the empty prompt is its negative/unconditional prompt.",
            [io.String.Input("text", default="digit 7",
                             tooltip="\"digit N\" with N in 0..9, or empty for the negative prompt.")],
            [io.Conditioning.Output(tooltip="CONDITIONING for the embedded model's sampler.")])

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
        return _latent_schema(
            "HastenEmptyDigitLatent", LATENT_NAME,
            "An empty LATENT for the embedded model: its VAE has 4 channels and shrinks images by 2 (the built-in "
            "Empty Latent Image gives the same size on ComfyUI >= 0.3.7x versions that honour a model's latent "
            "scale; this node works everywhere).",
            "image", [], "Zeros of shape batch x 4 x 1 x size/2 x size/2.")

    @classmethod
    def execute(cls, size: int = 32, batch_size: int = 1) -> io.NodeOutput:
        return _empty_latent(LATENT_NAME, "image", 1, size, batch_size)


class HastenDecodeDigits(io.ComfyNode):
    """Decode a LATENT of the embedded model to IMAGE with its own VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _decode_schema(
            "HastenDecodeDigits", DECODE_NAME, "Decodes the embedded model's LATENT to images with the model's own VAE.",
            "The sampler's output LATENT (embedded model).",
            "The images (batch x H x W x 3, values 0..1); first frame only.")

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        return _decode(DECODE_NAME, "image", samples)


class HastenEmbeddedVideoLoader(io.ComfyNode):
    """Load hasten's embedded, trained moving-digit video model (the weights of ``load_embedded("video")``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _loader_schema(
            "HastenEmbeddedVideoLoader", VIDEO_LOADER_NAME,
            "Loads hasten's small trained text-to-video model (a Wan 2.1 transformer: a handwritten digit moving "
            "left/right/up/down, 17 frames at 32x32 = 1088 tokens, also 16x16); a video model every hasten node "
            "runs on in seconds on a CPU. Use Moving Digit Prompt, Empty Digit Video Latent and Decode Digit "
            "Video (hasten) with it.",
            "The embedded video model as a ComfyUI MODEL (Wan 2.1 text-to-video, frame-wise latent); sample it "
            "with any sampler, 20 steps, CFG 4.")

    @classmethod
    def execute(cls, weight_dtype: str = "float32") -> io.NodeOutput:
        return _load(VIDEO_LOADER_NAME, "video", weight_dtype)


class HastenMovingDigitPrompt(io.ComfyNode):
    """CONDITIONING for "digit N moving DIRECTION" and the empty negative prompt, from the video model's encoder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "HastenMovingDigitPrompt", "Moving Digit Prompt (hasten)",
            "Encodes \"digit N moving DIRECTION\" (the prompts the embedded video model knows) and its negative, "
            "the empty prompt, with the video model's own text encoder.",
            [io.Int.Input("digit", default=3, min=0, max=9, tooltip="The digit to draw (0..9)."),
             io.Combo.Input("direction", options=list(DIRECTIONS), default="left",
                            tooltip="Which way the digit moves over the clip.")],
            [io.Conditioning.Output("positive", display_name="positive",
                                    tooltip="\"digit N moving DIRECTION\": the sampler's positive input."),
             io.Conditioning.Output("negative", display_name="negative",
                                    tooltip="The empty prompt: the sampler's negative input (CFG).")])

    @classmethod
    def execute(cls, digit: int = 3, direction: str = "left") -> io.NodeOutput:
        if not 0 <= int(digit) <= 9 or direction not in DIRECTIONS:
            fail("Moving Digit Prompt (hasten)", f"digit must be 0..9 and direction one of {DIRECTIONS}, got "
                                                 f"{digit!r}, {direction!r}", ValueError)
        _checked_dir("Moving Digit Prompt (hasten)", "video")
        emb = encode_prompts([f"digit {int(digit)} moving {direction}", ""], model="video")
        return io.NodeOutput([[emb[:1], {}]], [[emb[1:], {}]])


class HastenEmptyDigitVideoLatent(io.ComfyNode):
    """An empty latent of the video model's shape (4 channels, one latent frame per frame, 1/2 the size)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _latent_schema(
            "HastenEmptyDigitVideoLatent", VIDEO_LATENT_NAME,
            "An empty LATENT for the embedded video model: its VAE has 4 channels, shrinks frames by 2 and keeps "
            "every frame (no temporal compression, unlike Wan's 4x; the built-in Empty video latents assume 4x).",
            "frame", [io.Int.Input("frames", default=VIDEO_FRAMES, min=1, max=128,
                                   tooltip=f"Frames of the clip (the model was trained on {VIDEO_FRAMES}).")],
            "Zeros of shape batch x 4 x frames x size/2 x size/2.")

    @classmethod
    def execute(cls, frames: int = VIDEO_FRAMES, size: int = 32, batch_size: int = 1) -> io.NodeOutput:
        return _empty_latent(VIDEO_LATENT_NAME, "video", frames, size, batch_size)


class HastenDecodeDigitVideo(io.ComfyNode):
    """Decode a LATENT of the video model to its frames (IMAGE batch) with the model's own VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _decode_schema(
            "HastenDecodeDigitVideo", VIDEO_DECODE_NAME,
            "Decodes the embedded video model's LATENT to frames with the model's own VAE; connect the IMAGE to "
            "Save Animated WEBP / PNG (frame rate 8) or Preview Image.",
            "The sampler's output LATENT (embedded video model).",
            "Every frame (batch x frames, H, W, 3; values 0..1), clip after clip.")

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        return _decode(VIDEO_DECODE_NAME, "video", samples)


NODES = [HastenEmbeddedLoader, HastenDigitPrompt, HastenEmptyDigitLatent, HastenDecodeDigits,
         HastenEmbeddedVideoLoader, HastenMovingDigitPrompt, HastenEmptyDigitVideoLatent, HastenDecodeDigitVideo]
