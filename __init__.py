"""hasten: training-free acceleration for diffusion image and video generation.

Library use (diffusers)::

    import hasten
    pipe.enable_easycache(threshold=0.2)   # added to every diffusers pipeline on import
    image = pipe("digit 3").images[0]
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
    "GuidanceConfig",
    "LinearAGCoefficients",
    "EasyCache",
    "EasyCacheConfig",
    "RunStats",
    "UnsupportedModelError",
    "__version__",
]
__all__ += [
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "W8A8Config",
    "calibrate",
    "dequantize_",
    "load_quantized",
    "quantize_",
    "save_quantized",
    "weight_memory",
]

try:  # diffusers is a base dependency, but a ComfyUI install may lack it: the nodes still load.
    import diffusers as _diffusers  # noqa: F401
except ImportError:  # pragma: no cover - exercised only in ComfyUI-only environments
    _HAS_DIFFUSERS = False
else:
    _HAS_DIFFUSERS = True
    from .pipelines import (
        disable_easycache,
        enable_easycache,
        features,
        install_pipeline_methods,
        stats,
        summary,
    )

    install_pipeline_methods()
    from .pipelines import dequantize_pipeline, quantize_pipeline

    __all__ += ["dequantize_pipeline", "quantize_pipeline"]
    __all__ += ["disable_easycache", "enable_easycache", "features", "stats", "summary"]
    from .pipelines import (
        disable_adaptive_guidance,
        disable_bottleneck_sampling,
        enable_adaptive_guidance,
        enable_bottleneck_sampling,
    )

    __all__ += ["disable_adaptive_guidance", "disable_bottleneck_sampling", "enable_adaptive_guidance",
                "enable_bottleneck_sampling"]


def load_embedded(*args, **kwargs):
    """Load the embedded, trained digit model as a diffusers pipeline (offline)."""
    from .embedded import load_embedded as _load

    return _load(*args, **kwargs)


__all__ += ["load_embedded"]

# ComfyUI node pack entry points (empty when ComfyUI is not importable).
try:
    import comfy  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
