"""diffusers adapters: attach hasten's core algorithms to any DiffusionPipeline."""

from __future__ import annotations

from .easycache import disable_easycache, enable_easycache
from .registry import features, stats, summary
from .sparse_attention import disable_sparse_attention, enable_sparse_attention

__all__ = [
    "disable_easycache",
    "disable_sparse_attention",
    "enable_easycache",
    "enable_sparse_attention",
    "features",
    "install_pipeline_methods",
    "stats",
    "summary",
]


def install_pipeline_methods() -> None:
    """Give every ``diffusers.DiffusionPipeline`` hasten's ``enable_*`` / ``disable_*`` methods."""
    from diffusers import DiffusionPipeline

    methods = {
        "enable_easycache": enable_easycache,
        "disable_easycache": disable_easycache,
        "enable_sparse_attention": enable_sparse_attention,
        "disable_sparse_attention": disable_sparse_attention,
        "hasten_stats": stats,
        "hasten_summary": summary,
    }
    for name, fn in methods.items():
        setattr(DiffusionPipeline, name, fn)
