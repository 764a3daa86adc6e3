"""Add hasten's methods to ``diffusers.DiffusionPipeline`` without importing diffusers at ``import hasten``.

If diffusers' pipeline module is already loaded the methods are added at once; otherwise a finder on
``sys.meta_path`` adds them right after that module executes. Each method imports ``hasten.pipelines``
only when called, so neither step costs import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any

logger = logging.getLogger("hasten")

TARGET = "diffusers.pipelines.pipeline_utils"

# pipeline method name -> function name in hasten.pipelines
METHODS = {
    "enable_easycache": "enable_easycache",
    "disable_easycache": "disable_easycache",
    "enable_sparse_attention": "enable_sparse_attention",
    "disable_sparse_attention": "disable_sparse_attention",
    "quantize": "quantize_pipeline",
    "dequantize": "dequantize_pipeline",
    "enable_adaptive_guidance": "enable_adaptive_guidance",
    "disable_adaptive_guidance": "disable_adaptive_guidance",
    "enable_bottleneck_sampling": "enable_bottleneck_sampling",
    "disable_bottleneck_sampling": "disable_bottleneck_sampling",
    "enable_delta_dit": "enable_delta_dit",
    "disable_delta_dit": "disable_delta_dit",
    "enable_profiling_dit": "enable_profiling_dit",
    "disable_profiling_dit": "disable_profiling_dit",
    "enable_cachequant": "enable_cachequant",
    "disable_cachequant": "disable_cachequant",
    "enable_sada": "enable_sada",
    "disable_sada": "disable_sada",
    "hasten_stats": "stats",
    "hasten_summary": "summary",
}


def _method(target: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("hasten.pipelines"), target)(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = target
    method.__doc__ = f"hasten: see ``hasten.{target}`` (this pipeline is its first argument)."
    return method


def install_methods(pipeline_cls: type) -> None:
    """Give ``pipeline_cls`` (``DiffusionPipeline``) hasten's ``enable_*`` / ``disable_*`` methods."""
    for name, target in METHODS.items():
        setattr(pipeline_cls, name, _method(target))


def _install_from(module: Any) -> None:
    cls = getattr(module, "DiffusionPipeline", None)
    if cls is None:  # a diffusers we do not recognise: the hasten.enable_*(pipe) functions still work
        logger.warning("hasten: %s has no DiffusionPipeline; pipe.enable_*() methods not added", TARGET)
        return
    install_methods(cls)


class _Loader(importlib.abc.Loader):
    """Delegates to diffusers' own loader, then adds the methods."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.inner
        self.inner.exec_module(module)
        try:
            _install_from(module)
        except Exception as exc:  # never let hasten break diffusers' own import
            logger.warning("hasten: could not add pipeline methods: %s", exc)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            # skip every hasten finder, including another copy's (ComfyUI loads the pack a second time
            # under another module name: two finders delegating to each other recurse forever)
            if type(finder).__name__ == "_Finder" or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


@functools.cache
def install_when_diffusers_loads() -> None:
    """Add the methods now if diffusers' pipeline module is loaded, else as soon as it is."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _install_from(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
