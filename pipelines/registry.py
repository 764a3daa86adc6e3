"""Which hasten features are on for a pipeline, and their statistics."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import weakref
from typing import Any

from ..errors import UnsupportedModelError

_ATTR = "_hasten_features"


class Feature:
    """One enabled accelerator on one pipeline: knows how to remove itself and report stats."""

    name = "feature"

    def remove(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}


class HookFeature(Feature):
    """A feature made of one denoiser hook per denoiser component (EasyCache, adaptive guidance)."""

    hook_name = "hasten_hook"
    priority = 0

    def __init__(self, pipe: Any, make_hook: Any) -> None:
        from .denoiser import attach, find_denoisers

        self._modules = find_denoisers(pipe)
        self.hooks: dict[str, Any] = {}
        for comp, module in self._modules.items():
            hook = make_hook()
            attach(module, hook, self.hook_name, priority=self.priority)
            self.hooks[comp] = hook

    def remove(self) -> None:
        from .denoiser import detach

        for module in self._modules.values():
            detach(module, self.hook_name)
        self.hooks = {}

    def run_stats(self, hook: Any) -> tuple[Any, Any]:
        """(stats of the run in progress, stats of the last finished run) of one hook."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Per component: the run in progress if it has begun, else the last finished run (None if none)."""
        out = {}
        for comp, hook in self.hooks.items():
            current, last = self.run_stats(hook)
            out[comp] = current if current else last
        return out


def _home(pipe: Any) -> Any:
    """Where ``pipe``'s feature registry lives: on its (first) denoiser module.

    Features belong to the model they patch, not to one pipeline object: pipelines sharing a denoiser
    (``from_pipe``) see the same, truthful list, and ``copy.deepcopy(pipe)`` copies it with the module.
    """
    from .denoiser import find_denoisers

    if pipe is None or isinstance(pipe, (str, bytes, int, float, bool, dict, list, tuple)):
        raise UnsupportedModelError(f"hasten expects a diffusers pipeline, got {type(pipe).__name__} {pipe!r:.60}")
    home = next(iter(find_denoisers(pipe).values()))
    return getattr(home, "_orig_mod", home)  # a torch.compile(denoiser) wrapper: the registry stays on the model


def features(pipe: Any) -> dict[str, Feature]:
    """The pipeline's enabled features, by name (created empty on first use).

    Raises :class:`UnsupportedModelError` for anything that is not a pipeline with a denoiser.
    """
    home = _home(pipe)
    reg = home.__dict__.get(_ATTR)
    if reg is None:
        reg = {}
        home.__dict__[_ATTR] = reg
    return reg


def make_config(cls: type, config: Any, kwargs: dict[str, Any]) -> Any:
    """``config`` as given, or ``cls(**kwargs)``; both at once is an error (which settings would win?).

    A bare number is the ``threshold`` of configs that have one (``enable_easycache(0)`` = threshold 0,
    i.e. off); any other type is refused here, at the call that passed it.
    """
    if config is None:
        return cls(**kwargs)
    if isinstance(config, numbers.Real) and not isinstance(config, bool):
        if "threshold" not in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"expected a {cls.__name__} or keyword settings, got the number {config!r} "
                            f"({cls.__name__} has no threshold)")
        if "threshold" in kwargs:
            raise TypeError("threshold given twice (as the first argument and as threshold=)")
        return cls(threshold=config, **kwargs)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__} (or a number as its threshold, or keyword settings), got "
                        f"{type(config).__name__} {config!r:.80}")
    if kwargs:
        raise TypeError(f"pass either a {cls.__name__} or keyword settings, not both")
    return config


def install(pipe: Any, name: str, make: Any) -> Any:
    """Replace feature ``name`` on ``pipe`` by ``make()`` (the old one is removed first: nothing stacks)."""
    reg = features(pipe)
    if name in reg:
        reg.pop(name).remove()
    feat = make()
    feat._hasten_owner = weakref.ref(pipe)
    reg[name] = feat
    return pipe


def _shares_home(a: Any, b: Any) -> bool:
    try:
        return _home(a) is _home(b)
    except UnsupportedModelError:
        return False


def uninstall(pipe: Any, name: str) -> Any:
    """Remove feature ``name`` from ``pipe`` if it is on; returns the pipeline.

    The feature lives on the denoiser: if another pipeline sharing it (``from_pipe``) enabled it, it is
    off for that pipeline too, and a warning says so.
    """
    feat = features(pipe).pop(name, None)
    if feat is not None:
        owner = getattr(feat, "_hasten_owner", None)
        other = owner() if owner is not None else None
        if other is not None and other is not pipe and _shares_home(other, pipe):
            logging.getLogger("hasten").warning(
                "hasten: %s was enabled through another %s that shares this denoiser (from_pipe); disabling it "
                "here turns it off for both", name, type(other).__name__)
        feat.remove()
    return pipe


def stats(pipe: Any) -> dict[str, Any]:
    """Statistics of every enabled feature after (or during) the last pipeline call."""
    return {name: feat.stats() for name, feat in features(pipe).items()}


def summary(pipe: Any) -> str:
    """Human-readable report of what each enabled feature did in the last call."""
    lines = []
    for name, feat in features(pipe).items():
        for comp, st in feat.stats().items():
            if st is None:
                lines.append(f"[{name}] {comp}: no run yet")
            elif hasattr(st, "summary"):
                lines.append(f"[{name}] {comp}: " + st.summary())
            else:
                lines.append(f"[{name}] {comp}: {st}")
    return "\n".join(lines) if lines else "hasten: no accelerator enabled on this pipeline"
