"""hasten: training-free acceleration for diffusion image and video generation.

Library use (diffusers)::

    import hasten
    pipe = hasten.load_embedded()            # or any diffusers pipeline
    pipe.enable_easycache(threshold=0.2)     # enable_*/disable_* are added to every pipeline
    frames = pipe(prompt="digit 3").frames
    print(hasten.summary(pipe))

``import hasten`` imports nothing heavy: each public name loads its submodule on first use, diffusers
only when you use it (the pipeline methods are added the moment diffusers' pipeline module loads). The same folder
is a ComfyUI custom-node pack: ComfyUI calls ``comfy_entrypoint`` below.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _lazy
from .errors import UnsupportedModelError  # noqa: F401 (public; listed in __all__)

__version__ = "0.1.0"

# Public names -> the submodule defining them; imported on first attribute access, so `import hasten`
# (and the `hasten` command's --help) costs almost nothing, and diffusers loads only when used.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("EasyCache", "EasyCacheConfig", "RunStats"), "caches"),
    **dict.fromkeys(("Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "W8A8Config", "calibrate", "dequantize_",
                     "load_quantized", "quantize_", "save_quantized", "weight_memory"), "quant"),
    "BottleneckConfig": "samplers.bottleneck",
    **dict.fromkeys(("CacheQuantConfig", "CacheQuantPlan"), "caches.cachequant"),
    **dict.fromkeys(("enable_cachequant", "disable_cachequant", "calibrate_cachequant"), "pipelines"),
    **dict.fromkeys(("SADA", "SADAConfig"), "caches.sada"),
    **dict.fromkeys(("enable_sada", "disable_sada"), "pipelines"),
    **dict.fromkeys(("DeltaDiTConfig", "ProfilingDiTConfig"), "caches.blockcache"),
    **dict.fromkeys(("enable_delta_dit", "disable_delta_dit", "enable_profiling_dit", "disable_profiling_dit"),
                    "pipelines"),
    **dict.fromkeys(("GuidanceConfig", "LinearAGCoefficients"), "samplers.guidance"),
    **dict.fromkeys((
        "dequantize_pipeline", "disable_adaptive_guidance", "disable_bottleneck_sampling", "disable_easycache",
        "disable_sparse_attention", "enable_adaptive_guidance", "enable_bottleneck_sampling", "enable_easycache",
        "enable_sparse_attention", "features", "install_pipeline_methods", "quantize_pipeline", "stats", "summary",
    ), "pipelines"),
    **dict.fromkeys(("check", "check_path"), "pipelines.check"),
    **dict.fromkeys(("tune", "apply"), "tune"),
}

__all__ = sorted([*_EXPORTS, "UnsupportedModelError", "__version__", "load_embedded"])


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def load_embedded(*args: Any, **kwargs: Any) -> Any:
    """Load an embedded, trained model as a diffusers pipeline, offline, with its trained call defaults:
    ``load_embedded()`` the digit image model, ``load_embedded("video")`` the moving-digit video model."""
    from .embedded import load_embedded as _load

    return _load(*args, **kwargs)


# pipe.enable_easycache() & co. on every diffusers.DiffusionPipeline: now if diffusers' pipeline module is
# loaded, else the moment it loads. Nothing of diffusers is imported here.
_lazy.install_when_diffusers_loads()


async def comfy_entrypoint() -> Any:
    """ComfyUI's V3 entry point for this folder as a custom-node pack (imports the nodes only when called)."""
    from .nodes import comfy_entrypoint as entry

    return await entry()
