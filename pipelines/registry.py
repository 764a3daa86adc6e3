"""Which hasten features are on for a pipeline, and their statistics."""

from __future__ import annotations

from typing import Any

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


def features(pipe: Any) -> dict[str, Feature]:
    """The pipeline's enabled features, by name (created empty on first use)."""
    reg = getattr(pipe, _ATTR, None)
    if reg is None:
        reg = {}
        setattr(pipe, _ATTR, reg)
    return reg


def make_config(cls: type, config: Any, kwargs: dict[str, Any]) -> Any:
    """``config`` as given, or ``cls(**kwargs)``; both at once is an error (which settings would win?)."""
    if config is None:
        return cls(**kwargs)
    if kwargs:
        raise TypeError(f"pass either a {cls.__name__} or keyword settings, not both")
    return config


def install(pipe: Any, name: str, make: Any) -> Any:
    """Replace feature ``name`` on ``pipe`` by ``make()`` (the old one is removed first: nothing stacks)."""
    reg = features(pipe)
    if name in reg:
        reg.pop(name).remove()
    reg[name] = make()
    return pipe


def uninstall(pipe: Any, name: str) -> Any:
    """Remove feature ``name`` from ``pipe`` if it is on; returns the pipeline."""
    feat = features(pipe).pop(name, None)
    if feat is not None:
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
