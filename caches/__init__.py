"""Step caches: decide per denoiser call and per branch whether to compute or reuse."""

from .base import BranchStats, RunStats, StepCache, run_cached
from .easycache import EasyCache, EasyCacheConfig

__all__ = ["BranchStats", "EasyCache", "EasyCacheConfig", "RunStats", "StepCache", "run_cached"]
