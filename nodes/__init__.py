"""hasten's ComfyUI nodes, in ComfyUI's V3 schema (``comfy_api.latest``).

Importing this package is free: it imports no node module, no ComfyUI, no torch and no diffusers.
ComfyUI calls :func:`comfy_entrypoint` (re-exported by the pack's root ``__init__``); only then are the
node modules listed in :data:`NODE_MODULES` imported, each on its own, so one broken module (or a
broken diffusers) takes down only its own nodes, with the reason in the log.

A node module ends with ``NODES = [MyNode, ...]`` (``io.ComfyNode`` subclasses); to add a module, add
its name to :data:`NODE_MODULES`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger("hasten")

# Node modules in the order their nodes appear in ComfyUI's node library.
NODE_MODULES: tuple[str, ...] = (
    "easycache", "blockcache", "guidance", "sparse_attention", "quantize", "cachequant", "sada", "preset", "bottleneck", "stats", "embedded",
)

FAILED: dict[str, str] = {}  # module name -> why it could not be imported (filled by node_list)


def node_list() -> list[type]:
    """Every hasten node class (imports the node modules; call only inside ComfyUI)."""
    out: list[type] = []
    for name in NODE_MODULES:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except Exception as e:  # one module's failure must not take the other nodes down
            FAILED[name] = f"{type(e).__name__}: {e}"
            log.exception("hasten: the nodes of nodes/%s.py could not be loaded (%s)", name, FAILED[name])
            continue
        if not hasattr(mod, "NODES"):
            log.warning("hasten: nodes/%s.py defines no NODES list (not converted to the V3 schema?)", name)
        out.extend(getattr(mod, "NODES", ()))
    return out


async def comfy_entrypoint() -> Any:
    """ComfyUI's V3 entry point: the extension listing hasten's nodes."""
    from comfy_api.latest import ComfyExtension

    class HastenExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return node_list()

    return HastenExtension()


def __getattr__(name: str) -> Any:
    """``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` (node id -> class / name), built on first
    use, for tools and tests. The pack's root must NOT re-export them: ComfyUI's loader prefers
    ``NODE_CLASS_MAPPINGS`` over ``comfy_entrypoint`` when a module has both."""
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        schemas = [(cls, cls.GET_SCHEMA()) for cls in node_list()]
        classes = {s.node_id: cls for cls, s in schemas}
        names = {s.node_id: s.display_name or s.node_id for _, s in schemas}
        globals().update(NODE_CLASS_MAPPINGS=classes, NODE_DISPLAY_NAME_MAPPINGS=names)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NODE_MODULES", "comfy_entrypoint", "node_list"]
