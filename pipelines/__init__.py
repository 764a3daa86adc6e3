"""diffusers adapters: attach hasten's core algorithms to any DiffusionPipeline."""

from __future__ import annotations

from .blockcache import disable_delta_dit, disable_profiling_dit, enable_delta_dit, enable_profiling_dit
from .bottleneck import disable_bottleneck_sampling, enable_bottleneck_sampling
from .cachequant import calibrate_cachequant, disable_cachequant, enable_cachequant
from .easycache import disable_easycache, enable_easycache
from .guidance import disable_adaptive_guidance, enable_adaptive_guidance
from .quantize import dequantize_pipeline, quantize_pipeline
from .registry import features, stats, summary
from .sada import disable_sada, enable_sada
from .sparse_attention import disable_sparse_attention, enable_sparse_attention

__all__ = [
    "calibrate_cachequant",
    "disable_cachequant",
    "disable_sada",
    "enable_sada",
    "enable_cachequant",
    "disable_delta_dit",
    "disable_profiling_dit",
    "enable_delta_dit",
    "enable_profiling_dit",
    "disable_adaptive_guidance",
    "disable_bottleneck_sampling",
    "enable_adaptive_guidance",
    "enable_bottleneck_sampling",
    "dequantize_pipeline",
    "disable_easycache",
    "disable_sparse_attention",
    "enable_easycache",
    "enable_sparse_attention",
    "features",
    "install_pipeline_methods",
    "quantize_pipeline",
    "stats",
    "summary",
]


def install_pipeline_methods() -> None:
    """Give every ``diffusers.DiffusionPipeline`` hasten's ``enable_*`` / ``disable_*`` methods (done
    automatically when diffusers' pipeline module loads after ``import hasten``)."""
    from diffusers import DiffusionPipeline

    from .._lazy import install_methods

    install_methods(DiffusionPipeline)
