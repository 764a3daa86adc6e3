"""hasten: training-free acceleration for diffusion image and video generation.

Library use (diffusers)::

    import hasten
    pipe = hasten.load_embedded()            # or any diffusers pipeline
    pipe.enable_easycache(threshold=0.2)     # enable_*/disable_* are added to every pipeline on import
    frames = pipe(prompt="digit 3", negative_prompt="", height=32, width=32, num_frames=1).frames
    print(hasten.summary(pipe))

The same folder is a ComfyUI custom-node pack: ComfyUI reads ``NODE_CLASS_MAPPINGS`` below.
"""

from __future__ import annotations

from .caches import EasyCache, EasyCacheConfig, RunStats
from .errors import UnsupportedModelError
from .quant import (
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    W8A8Config,
    calibrate,
    dequantize_,
    load_quantized,
    quantize_,
    save_quantized,
    weight_memory,
)
from .samplers.bottleneck import BottleneckConfig
from .samplers.guidance import GuidanceConfig, LinearAGCoefficients

__version__ = "0.1.0"

__all__ = [
    "BottleneckConfig",
    "EasyCache",
    "EasyCacheConfig",
    "GuidanceConfig",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "LinearAGCoefficients",
    "RunStats",
    "UnsupportedModelError",
    "W8A8Config",
    "__version__",
    "calibrate",
    "dequantize_",
    "load_embedded",
    "load_quantized",
    "quantize_",
    "save_quantized",
    "weight_memory",
]

try:  # diffusers is a base dependency, but a ComfyUI install may lack it: the nodes still load.
    import diffusers as _diffusers  # noqa: F401
except ImportError:  # pragma: no cover - exercised only in ComfyUI-only environments
    pass
else:
    from .pipelines import (
        dequantize_pipeline,
        disable_adaptive_guidance,
        disable_bottleneck_sampling,
        disable_easycache,
        disable_sparse_attention,
        enable_adaptive_guidance,
        enable_bottleneck_sampling,
        enable_easycache,
        enable_sparse_attention,
        features,
        install_pipeline_methods,
        quantize_pipeline,
        stats,
        summary,
    )

    install_pipeline_methods()
    __all__ += [
        "dequantize_pipeline", "disable_adaptive_guidance", "disable_bottleneck_sampling", "disable_easycache",
        "disable_sparse_attention", "enable_adaptive_guidance", "enable_bottleneck_sampling", "enable_easycache",
        "enable_sparse_attention", "features", "quantize_pipeline", "stats", "summary",
    ]


def load_embedded(*args, **kwargs):
    """Load the embedded, trained digit model as a diffusers pipeline (offline)."""
    from .embedded import load_embedded as _load

    return _load(*args, **kwargs)


# ComfyUI node pack entry points (empty when ComfyUI is not importable).
try:
    import comfy  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
