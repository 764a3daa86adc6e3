"""diffusers wiring shared by hasten's features: find the denoiser, hook its forward, split its batch.

Nothing here decides anything about acceleration; it only tells the core which rows of a denoiser
call belong to which branch (cond/uncond x batch item), which step the run is at, and how to run the
model on a subset of rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import replace as dc_replace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..errors import UnsupportedModelError

DENOISER_ATTRS = ("transformer", "transformer_2", "unet", "prior")
SUPPORTED_TEXT = (
    "diffusers pipelines whose denoiser is a `transformer` or `unet` component (e.g. Flux, SD3, "
    "PixArt-Sigma, Wan 2.1/2.2, HunyuanVideo, SD 1.5, SDXL, and hasten's embedded model)"
)
# Keyword arguments that are never batched even when their first dimension happens to equal the batch.
NON_BATCH_KWARGS = frozenset({"img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "freqs_cis"})
INPUT_NAMES = ("hidden_states", "sample", "x")


def find_denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's denoiser modules by component name; raises if there is none."""
    found = {}
    for name in DENOISER_ATTRS:
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            found[name] = mod
    if not found:
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has no transformer or unet denoiser component. hasten supports "
            f"{SUPPORTED_TEXT}."
        )
    return found


def split_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The denoiser's main latent input (``hidden_states`` / ``sample`` / first positional)."""
    for name in INPUT_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise UnsupportedModelError(
        "could not find the denoiser's latent input (expected `hidden_states`, `sample` or a first "
        f"positional tensor); hasten supports {SUPPORTED_TEXT}."
    )


def _take(value: Any, rows: torch.Tensor, batch: int, name: str | None = None) -> Any:
    if name in NON_BATCH_KWARGS:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: _take(v, rows, batch, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_take(v, rows, batch) for v in value)
    return value


def slice_batch(args: tuple, kwargs: dict, rows: list[int], batch: int) -> tuple[tuple, dict]:
    """Select ``rows`` of every batched tensor argument (nested dicts such as added_cond_kwargs too)."""
    idx = torch.tensor(rows, dtype=torch.long)
    return tuple(_take(a, idx, batch) for a in args), {k: _take(v, idx, batch, k) for k, v in kwargs.items()}


def main_tensor(result: Any) -> torch.Tensor:
    """The denoiser's prediction out of whatever it returned (tensor, tuple or ``BaseOutput``)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, tuple):
        return result[0]
    if hasattr(result, "sample"):
        return result.sample
    raise TypeError(f"unrecognised denoiser output type {type(result).__name__}")


class OutputPacker:
    """Rebuilds the denoiser's return type around a tensor, for calls where no forward ran."""

    def __init__(self) -> None:
        self.template: Any = None

    def learn(self, result: Any) -> None:
        self.template = result

    def pack(self, tensor: torch.Tensor, return_dict: bool | None) -> Any:
        t = self.template
        if isinstance(t, tuple):
            return (tensor,) + tuple(None for _ in t[1:])
        if t is not None and hasattr(t, "sample"):
            return dc_replace(t, sample=tensor)
        if t is None and return_dict is False:
            return (tensor,)
        return tensor


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextProbe(StateManager):
    """Receives diffusers' ``cache_context`` (e.g. "cond"/"uncond" in Wan and Flux true-CFG)."""

    def __init__(self) -> None:
        super().__init__(_NoState)

    @property
    def name(self) -> str | None:
        return self._context.name if self._context is not None else None


class RunTracker:
    """Knows when a pipeline run starts (the scheduler got new timesteps) and each branch's step."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = weakref.ref(pipe) if pipe is not None else None
        self._timesteps: Any = None
        self.num_steps: int | None = None
        self.counts: dict[Any, int] = {}

    def _scheduler_timesteps(self) -> Any:
        pipe = self._pipe() if self._pipe is not None else None
        sched = getattr(pipe, "scheduler", None)
        return getattr(sched, "timesteps", None)

    def new_run_needed(self, keys: list) -> bool:
        ts = self._scheduler_timesteps()
        if ts is not None and ts is not self._timesteps:
            return True
        if self.num_steps is not None and any(self.counts.get(k, 0) >= self.num_steps for k in keys):
            return True
        return self._timesteps is None and not self.counts

    def start(self) -> None:
        ts = self._scheduler_timesteps()
        self._timesteps = ts
        self.num_steps = len(ts) if ts is not None else None
        self.counts = {}

    def steps_for(self, keys: list) -> list[int]:
        steps = [self.counts.get(k, 0) for k in keys]
        for k in keys:
            self.counts[k] = self.counts.get(k, 0) + 1
        return steps

    def clear(self) -> None:
        self._timesteps = None
        self.num_steps = None
        self.counts = {}


ROW_KEYS_ATTR = "_hasten_row_keys"


class row_keys:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Tell inner hooks which branch each row of the next denoiser call is.

    A hook that drops or reorders rows (adaptive guidance dropping the unconditional pass) wraps its
    inner call in ``with row_keys(module, keys):`` so caches below it keep the right per-branch state.
    """

    def __init__(self, module: torch.nn.Module, keys: list) -> None:
        self.module, self.keys = module, keys

    def __enter__(self) -> None:
        self.prev = getattr(self.module, ROW_KEYS_ATTR, None)
        setattr(self.module, ROW_KEYS_ATTR, self.keys)

    def __exit__(self, *exc: object) -> None:
        if self.prev is None:
            delattr(self.module, ROW_KEYS_ATTR)
        else:
            setattr(self.module, ROW_KEYS_ATTR, self.prev)


def branch_keys(pipe: Any, context: str | None, batch: int,
                module: torch.nn.Module | None = None) -> tuple[list, list[str]]:
    """Key and label for every row: which branch (cond/uncond) and which batch item it is."""
    given = getattr(module, ROW_KEYS_ATTR, None) if module is not None else None
    if given is not None and len(given) == batch:
        keys = list(given)
        return keys, [f"{n}[{i}]" for n, i in keys]
    if context is None:
        pipe_obj = pipe() if isinstance(pipe, weakref.ref) else pipe
        cfg = bool(getattr(pipe_obj, "do_classifier_free_guidance", False)) if pipe_obj is not None else False
        if cfg and batch % 2 == 0:
            half = batch // 2
            names = ["uncond"] * half + ["cond"] * half  # diffusers concatenates [uncond, cond]
            items = list(range(half)) * 2
        else:
            names = ["cond"] * batch
            items = list(range(batch))
    else:
        names = [context] * batch
        items = list(range(batch))
    keys = [(n, i) for n, i in zip(names, items)]
    return keys, [f"{n}[{i}]" for n, i in keys]


class DenoiserHook(ModelHook):
    """A diffusers ModelHook around the denoiser's forward; subclasses say what to do per call."""

    _is_stateful = True

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.context = ContextProbe()
        self.tracker = RunTracker(pipe)
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self.packer = OutputPacker()

    def original(self) -> Callable:
        return self.fn_ref.original_forward

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.on_run_end()
        self.tracker.clear()
        return module

    # subclasses override
    def on_run_start(self, num_steps: int | None) -> None: ...

    def on_run_end(self) -> None: ...


def _pop_above(registry: HookRegistry, index: int) -> list[tuple[str, ModelHook]]:
    """Take off the hooks at positions >= ``index`` (outermost first); returns them innermost first.

    diffusers can only unhook the outermost of stacked ``new_forward`` hooks correctly (removing an inner
    one rewires the outer hook past its own ``new_forward``), so every reordering goes through here.
    """
    popped = []
    for other in list(registry._hook_order[index:])[::-1]:
        popped.insert(0, (other, registry.get_hook(other)))
        registry.remove_hook(other, recurse=False)
    return popped


def attach(module: torch.nn.Module, hook: ModelHook, name: str, priority: int = 0) -> None:
    """Register ``hook`` on ``module`` under ``name`` (replacing a previous hook of that name).

    hasten hooks are stacked by ``priority`` (higher = outer): guidance, which drops rows, sits above
    caches, which key state by row, whatever order the user enables them in.
    """
    hook._hasten_priority = priority  # type: ignore[attr-defined]
    detach(module, name)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    order = registry._hook_order
    index = len(order)
    while index > 0 and getattr(registry.hooks[order[index - 1]], "_hasten_priority", -1) > priority:
        index -= 1
    popped = _pop_above(registry, index)
    registry.register_hook(hook, name)
    for other, h in popped:
        registry.register_hook(h, other)


def detach(module: torch.nn.Module, name: str) -> bool:
    """Remove hook ``name`` (hooks above it stay, in order); drop an emptied registry. True if removed."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return False
    popped = _pop_above(registry, registry._hook_order.index(name) + 1)
    registry.remove_hook(name, recurse=False)
    for other, h in popped:
        registry.register_hook(h, other)
    if not registry.hooks and not any(hasattr(m, "_diffusers_hook") for n, m in module.named_modules() if n):
        del module._diffusers_hook
    return True
