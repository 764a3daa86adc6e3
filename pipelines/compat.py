"""torch.compile and hasten's denoiser hooks: keep the hooks *outside* the compiled region.

hasten's hooks replace the denoiser's ``forward`` and make per-call Python decisions (which step, which
branch, compute or reuse) that read tensor values. Traced by dynamo, each of them is a graph break and
their changing Python state a recompile on every step (measured on the embedded model with
``transformer.compile()`` and EasyCache: 30 graphs, 28 graph breaks, 7x slower than eager). So:

* the hook chain is never traced (``torch.compiler.disable`` on it: dynamo stops once at its entry);
* whatever compilation the user asked for — ``transformer.compile(...)`` (``_compiled_call_impl``) or a
  ``torch.compile(transformer)`` wrapper (``OptimizedModule``) made after the hooks — is moved onto the
  innermost, hook-free ``forward`` with the user's own compile settings, the first time a hook runs;
* when the last hasten hook is removed the module gets its own ``forward`` and compiled call back.

A ``torch.compile(transformer)`` wrapper made *before* enabling a feature needs nothing: the hooks are
attached to the wrapper, around its compiled forward.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

log = logging.getLogger("hasten.compile")
MOVED_ATTR = "_hasten_moved_compile"
_FRAMES = 12


def _dynamo_context(compiled: Any) -> Any:
    """The dynamo context (backend, mode, options) inside a ``torch.compile``-d function, or None."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    return None


def _wrapper_context(module: torch.nn.Module) -> Any:
    """The dynamo context of a ``torch.compile(module)`` wrapper currently calling ``module`` (stack walk)."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, OptimizedModule) and obj._orig_mod is module:
            return obj.dynamo_ctx
        frame = frame.f_back
    return None


def compile_below_hooks(module: torch.nn.Module) -> None:
    """Move a compilation that would trace hasten's hooks onto the hook-free innermost ``forward``.

    Called (outside dynamo) on every hooked denoiser call; a cheap attribute check when nothing changed.
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or not registry._fn_refs:
        return
    compiled = module.__dict__.get("_compiled_call_impl")
    ctx = _dynamo_context(compiled) if compiled is not None else None
    if ctx is None:
        ctx = _wrapper_context(module)
        if ctx is None:
            if compiled is not None:
                log.warning("hasten: %s was compiled with transformer.compile() but its compile settings could not "
                            "be read; it runs uncompiled below hasten's hooks", type(module).__name__)
                module._compiled_call_impl = None
            return
    inner = registry._fn_refs[0]
    attr = "original_forward" if inner.original_forward is not None else "forward"
    fn = getattr(inner, attr)
    moved = module.__dict__.get(MOVED_ATTR)
    if moved is not None and moved["compiled_inner"] is fn:
        if compiled is not None:  # compiled again after the move: the new settings win
            moved["compiled_inner"] = ctx(moved["inner"])
            setattr(inner, attr, moved["compiled_inner"])
            moved["call_impl"] = compiled
            module._compiled_call_impl = None
        return
    compiled_inner = ctx(fn)
    setattr(inner, attr, compiled_inner)
    module.__dict__[MOVED_ATTR] = {"inner": fn, "compiled_inner": compiled_inner, "call_impl": compiled}
    if compiled is not None:
        module._compiled_call_impl = None
    log.info("hasten: %s is compiled below hasten's hooks (the hooks' per-step decisions run eagerly, the model's "
             "forward compiled with the settings you gave)", type(module).__name__)


def restore_compile(module: torch.nn.Module) -> None:
    """After the last hook is removed: the module's own ``forward`` and ``transformer.compile()`` state back."""
    moved = module.__dict__.pop(MOVED_ATTR, None)
    if moved is None:
        return
    fwd = module.__dict__.get("forward")
    if fwd is moved["compiled_inner"]:
        if getattr(moved["inner"], "__self__", None) is module and getattr(moved["inner"], "__func__", None) is \
                getattr(type(module).forward, "__func__", type(module).forward):
            del module.forward  # the class's own forward, as before any hook
        else:
            module.forward = moved["inner"]
    if moved["call_impl"] is not None and module.__dict__.get("_compiled_call_impl") is None:
        module._compiled_call_impl = moved["call_impl"]
