"""Shared pieces of hasten's ComfyUI nodes in ComfyUI's V3 schema (``comfy_api.latest``).

One code path serves ComfyUI 0.3.75 (the CI engine) and 0.33.x: the only difference we rely on is the
``advanced`` flag of inputs (0.33 folds such inputs away in the UI; 0.3.75 has no such argument), which
:func:`advanced` passes only where the installed ComfyUI accepts it. Imported only inside ComfyUI.
See /work/helpers/comfy_v3.md (in the repo: the module docstring of ``nodes/__init__.py``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, NoReturn

from comfy_api.latest import io, ui

from ..errors import UnsupportedModelError

log = logging.getLogger("hasten")

CATEGORY = "hasten"
STATS_TOOLTIP = "What the node did (also shown on the node and in the log); connect to a text preview node."


@functools.lru_cache(maxsize=1)
def _accepts_advanced() -> bool:
    return "advanced" in inspect.signature(io.Float.Input.__init__).parameters


def advanced() -> dict[str, Any]:
    """Keyword arguments that mark an input as *advanced* (hidden behind "show advanced" where supported).

    Usage: ``io.Float.Input("start_percent", default=0.2, tooltip="...", **advanced())``.
    """
    return {"advanced": True} if _accepts_advanced() else {}


def stats_output(tooltip: str = STATS_TOOLTIP) -> io.String.Output:
    """The STRING ``stats`` output every hasten node that does work at execute time ends its outputs with."""
    return io.String.Output("stats", display_name="stats", tooltip=tooltip)


def output(*values: Any, stats: str) -> io.NodeOutput:
    """``io.NodeOutput(*values, stats)`` that also shows ``stats`` as text on the node in the UI."""
    return io.NodeOutput(*values, stats, ui=ui.PreviewText(stats))


def fail(node: str, message: str, exc: type[Exception] = UnsupportedModelError) -> NoReturn:
    """Raise a node error: ComfyUI shows "<node>: <message>" on the node and aborts the prompt.

    ``message`` must name what is wrong and what is supported. Logged too (the server log is where
    API users look).
    """
    text = f"{node}: {message}"
    log.error(text)
    raise exc(text)


__all__ = ["CATEGORY", "STATS_TOOLTIP", "advanced", "fail", "io", "output", "stats_output", "ui"]
