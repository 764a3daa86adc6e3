"""diffusers wiring shared by hasten's features: find the denoiser, hook its forward, split its batch.

Nothing here decides anything about acceleration; it only tells the core which rows of a denoiser
call belong to which branch (cond/uncond x batch item), which step the run is at, and how to run the
model on a subset of rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..errors import UnsupportedModelError
from .compat import compile_below_hooks, restore_compile

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


def _tensor_list(v: Any) -> bool:
    """A list of same-shaped tensors, one per sample (Z-Image passes its latents this way)."""
    return (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(t, torch.Tensor) for t in v)
            and all(t.shape == v[0].shape for t in v))


def split_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The denoiser's main latent input (``hidden_states`` / ``sample`` / first positional), rows stacked."""
    for v in [kwargs.get(n) for n in INPUT_NAMES] + ([args[0]] if args else []):
        if isinstance(v, torch.Tensor):
            return v
        if _tensor_list(v):
            return torch.stack(list(v))
    raise UnsupportedModelError(
        "could not find the denoiser's latent input (expected `hidden_states`, `sample` or a first "
        f"positional tensor or list of tensors); hasten supports {SUPPORTED_TEXT}."
    )


def _listed(args: tuple, kwargs: dict) -> bool:
    """True when the model takes its batch as a list of per-sample tensors."""
    for v in [kwargs.get(n) for n in INPUT_NAMES] + ([args[0]] if args else []):
        if isinstance(v, torch.Tensor):
            return False
        if _tensor_list(v):
            return True
    return False


def _take(value: Any, rows: torch.Tensor, batch: int, name: str | None = None, frames: int = 1,
          listed: bool = False) -> Any:
    if name in NON_BATCH_KWARGS:
        return value
    if listed and isinstance(value, (list, tuple)) and len(value) == batch:
        return type(value)(value[i] for i in rows.tolist())
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        if frames > 1 and value.ndim >= 2 and value.shape[0] == batch * frames:
            # frame-folded conditioning (AnimateDiff repeats each row's text embedding once per frame)
            idx = (rows.unsqueeze(1) * frames + torch.arange(frames)).flatten()
            return value.index_select(0, idx.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: _take(v, rows, batch, k, frames) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_take(v, rows, batch, None, frames) for v in value)
    return value


def slice_batch(args: tuple, kwargs: dict, rows: list[int], batch: int) -> tuple[tuple, dict]:
    """Select ``rows`` of every batched tensor argument (nested dicts such as added_cond_kwargs too).

    A 5-D latent ``(batch, channels, frames, h, w)`` whose conditioning was folded per frame
    (``batch * frames`` rows, AnimateDiff) has those rows selected per frame too.
    """
    idx = torch.tensor(rows, dtype=torch.long)
    try:
        x = split_input(args, kwargs)
        frames = int(x.shape[2]) if x.ndim == 5 else 1
    except UnsupportedModelError:
        frames = 1
    listed = _listed(args, kwargs)
    return (tuple(_take(a, idx, batch, None, frames, listed) for a in args),
            {k: _take(v, idx, batch, k, frames, listed) for k, v in kwargs.items()})


def main_tensor(result: Any) -> torch.Tensor:
    """The denoiser's prediction out of whatever it returned (tensor, tuple or any ``BaseOutput``)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return torch.stack(list(result)) if isinstance(result, list) and _tensor_list(result) else result[0]
    if isinstance(result, (tuple, list)) and result and _tensor_list(result[0]):
        return torch.stack(list(result[0]))
    name = _output_field(result)
    if name is not None:
        return getattr(result, name)
    raise UnsupportedModelError(
        f"unrecognised denoiser output type {type(result).__name__}: hasten needs a tensor, a tuple whose first "
        f"entry is the prediction, or a diffusers BaseOutput holding it; hasten supports {SUPPORTED_TEXT}.")


def _output_field(result: Any) -> str | None:
    """Name of the prediction field of a dataclass output (``sample``, ``predicted_image_embedding``...)."""
    if hasattr(result, "sample") and isinstance(result.sample, torch.Tensor):
        return "sample"
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        for f in dataclasses.fields(result):
            if isinstance(getattr(result, f.name, None), torch.Tensor):
                return f.name
    return None


class OutputPacker:
    """Rebuilds the denoiser's return type around a tensor, for calls where no forward ran."""

    def __init__(self) -> None:
        self.template: Any = None

    def learn(self, result: Any) -> None:
        self.template = result

    def pack(self, tensor: torch.Tensor, return_dict: bool | None) -> Any:
        t = self.template
        if isinstance(t, list) and _tensor_list(t):  # a list of per-sample outputs
            return list(tensor.unbind(0))
        if isinstance(t, (tuple, list)):
            first = list(tensor.unbind(0)) if _tensor_list(t[0]) else tensor
            return type(t)([first] + [None for _ in t[1:]])
        name = _output_field(t) if t is not None else None
        if name is not None:
            return dc_replace(t, **{name: tensor})
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
ROW_STEP_ATTR = "_hasten_row_step"


class row_keys:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Tell inner hooks which branch each row of the next denoiser call is (and, optionally, its step).

    A hook that drops or reorders rows (adaptive guidance dropping the unconditional pass) wraps its
    inner call in ``with row_keys(module, keys):`` so caches below it keep the right per-branch state.
    A hook that skips whole steps (a step cache above a block cache) also passes ``step``: the inner hook
    never sees the skipped steps, so it could not count them itself.
    """

    def __init__(self, module: torch.nn.Module, keys: list, step: int | None = None) -> None:
        self.module, self.keys, self.step = module, keys, step

    def __enter__(self) -> None:
        self.prev = getattr(self.module, ROW_KEYS_ATTR, None)
        self.prev_step = getattr(self.module, ROW_STEP_ATTR, None)
        setattr(self.module, ROW_KEYS_ATTR, self.keys)
        if self.step is not None:
            setattr(self.module, ROW_STEP_ATTR, self.step)

    def __exit__(self, *exc: object) -> None:
        for attr, prev in ((ROW_KEYS_ATTR, self.prev), (ROW_STEP_ATTR, self.prev_step)):
            if prev is not None:
                setattr(self.module, attr, prev)
            elif hasattr(self.module, attr):
                delattr(self.module, attr)


# -- branch identification from the call pattern ---------------------------------------------------
log = logging.getLogger("hasten")

# Pipeline-local variables that hold the pipeline's own "is CFG on?" decision (read, never written).
CFG_LOCALS = ("do_classifier_free_guidance", "do_true_cfg", "do_cfg", "use_cfg")
# cache_context / guider names -> branch
CONTEXT_BRANCH = {"cond": "cond", "pred_cond": "cond", "uncond": "uncond", "pred_uncond": "uncond"}
BATCHED_CONTEXTS = frozenset({"cond_uncond"})
# Fallback table: pipelines whose batched CFG rows are [cond, uncond] instead of diffusers' usual [uncond, cond].
COND_FIRST = frozenset({"StableCascadePriorPipeline", "WuerstchenPriorPipeline"})
COND_FIRST_PREFIXES = ("ZImage",)  # Z-Image: latents.repeat(2), prompt_embeds + negative_prompt_embeds
MAX_FRAMES = 40


def holds(obj: Any, module: torch.nn.Module) -> bool:
    """True when ``obj`` (a pipeline) has ``module`` as one of its denoiser components."""
    if obj is None:
        return False
    try:
        return any(getattr(obj, a, None) is module or getattr(getattr(obj, a, None), "_orig_mod", None) is module
                   for a in DENOISER_ATTRS)  # _orig_mod: a torch.compile(denoiser) wrapper made after the hooks
    except Exception:  # noqa: BLE001 - an arbitrary object on the stack with an odd __getattr__
        return False


def calling_pipeline(module: torch.nn.Module) -> tuple[Any, dict]:
    """The pipeline whose ``__call__`` is running ``module`` right now, and that call's local variables.

    Found on the call stack (a frame whose ``self`` holds ``module``), so a denoiser shared by two
    pipelines (``from_pipe``) or deep-copied with its pipeline always answers for the caller.
    """
    frame = sys._getframe(1)
    pipe, local_vars = None, {}
    for _ in range(MAX_FRAMES):
        frame = frame.f_back
        if frame is None:
            break
        obj = frame.f_locals.get("self")
        if obj is None or isinstance(obj, torch.nn.Module) or not holds(obj, module):
            if pipe is not None:
                break
            continue
        pipe = obj
        local_vars = {**frame.f_locals, **local_vars}  # inner frames win
        if frame.f_code.co_name == "__call__":
            break
    return pipe, local_vars


def cfg_hint(pipe: Any, local_vars: dict) -> bool | None:
    """The pipeline's own decision whether it runs classifier-free guidance (None: it does not say)."""
    for name in CFG_LOCALS:
        v = local_vars.get(name)
        if isinstance(v, bool):
            return v
    try:
        v = getattr(pipe, "do_classifier_free_guidance", None) if pipe is not None else None
    except Exception:  # noqa: BLE001 - a property reading state the pipeline has not set
        v = None
    return v if isinstance(v, bool) else None


def _timestep(args: tuple, kwargs: dict) -> Any:
    t = kwargs.get("timestep", kwargs.get("t", kwargs.get("timesteps")))
    if t is None and len(args) > 1:
        t = args[1]
    return t


def _timestep_sig(t: Any) -> tuple | None:
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            return None
        tf = t.detach().float()
        return (round(tf.max().item(), 6), round(tf.min().item(), 6))
    if isinstance(t, (int, float)):
        return (float(t), float(t))
    return None


def batch_layout(pipe: Any, local_vars: dict, x: torch.Tensor, context: str | None) -> list[str]:
    """Branch name of each row of one denoiser call (diffusers' conventions, read from the call pattern).

    * a ``cache_context``/guider name ("cond", "uncond", "pred_cond", "pred_uncond", or any other such
      as "pred_cond_skip", "uncond_stg") names every row, except "cond_uncond" (a batched CFG call);
    * a batched call is recognised by its size against the pipeline's ``latents`` (k rows per latent),
      or by its two identical halves: 2 rows per latent = [uncond, cond] (PAG without CFG: [cond,
      perturbed]), 3 = PAG's [uncond, cond, perturbed]; any other grouping gets one name per part
      ("part0", "part1", ...), so branches are never merged even when their meaning is unknown.
    """
    batch = x.shape[0]
    if context is not None and context not in BATCHED_CONTEXTS:
        return [CONTEXT_BRANCH.get(context, context)] * batch
    cfg = cfg_hint(pipe, local_vars)
    pag = bool(getattr(pipe, "do_perturbed_attention_guidance", False)) if pipe is not None else False
    lat = local_vars.get("latents")
    k = None
    if isinstance(lat, torch.Tensor) and lat.ndim >= 1 and lat.shape[0] and batch % lat.shape[0] == 0 \
            and lat.ndim == x.ndim:
        k = batch // lat.shape[0]
    if k is None:  # no latents to compare with: infer from flags and identical halves
        if pag:
            k = 3 if cfg else 2
        elif batch % 2 == 0 and cfg is not False and torch.equal(x[: batch // 2], x[batch // 2:]):
            k = 2
        elif context in BATCHED_CONTEXTS and cfg and batch % 2 == 0:
            k = 2
        else:
            k = 1
    if k == 1 or batch % k:
        return ["cond"] * batch
    per = batch // k
    if pag and k == (3 if cfg else 2):
        parts = ["uncond", "cond", "perturbed"] if cfg else ["cond", "perturbed"]
    elif k == 2 and cfg is not False:
        cls = type(pipe).__name__
        first = cls in COND_FIRST or cls.startswith(COND_FIRST_PREFIXES)
        parts = ["cond", "uncond"] if first else ["uncond", "cond"]
    else:
        parts = [f"part{j}" for j in range(k)]
    return [p for p in parts for _ in range(per)]


@dataclass
class CallInfo:
    """What one denoiser call is: its run, step, position in the step and the branch of every row."""

    keys: list[tuple[str, int]]
    labels: list[str]
    step: int
    position: int
    num_steps: int | None
    new_run: bool
    pipe_name: str
    cfg: bool | None
    given: bool = False
    pipe: Any = None  # the calling pipeline (not kept after the call)


class CallPattern:
    """Identifies each denoiser call from the call pattern: run start, step boundary, call position.

    * a run starts when the calling pipeline's scheduler got new timesteps (or, with no pipeline on
      the stack, on the first call / once the previous run's step count is used up);
    * a step ends when the timestep value (or the scheduler's ``step_index``) changes;
    * calls within one step are told apart by their position: a second call on the same latent after
      an all-"cond" first call is the sequential CFG "uncond" call (Chroma, Lumina2, Flux ControlNet,
      ...), any other repeat gets its own "callN" branch, so no two calls of one step share a cache.
    """

    def __init__(self, pipe: Any = None) -> None:
        self._fallback = weakref.ref(pipe) if pipe is not None else None
        self.clear()

    def clear(self) -> None:
        self.step = -1
        self.position = 0
        self.num_steps: int | None = None
        self._timesteps: Any = None
        self._sig: Any = None
        self._first_x: torch.Tensor | None = None
        self._first_names: list[str] = []
        self._seen: set = set()
        self.pipe_name = "?"
        self.cfg: bool | None = None
        self.run_thread: int | None = None
        self.prev_positions = 0  # last call position of the previous step
        self.started = False
        self.intruded = False  # another thread was refused during this run

    def _pipe(self, module: torch.nn.Module) -> tuple[Any, dict]:
        pipe, local_vars = calling_pipeline(module)
        if pipe is None and self._fallback is not None:
            fb = self._fallback()
            if fb is not None and holds(fb, module):
                pipe = fb
        return pipe, local_vars

    def identify(self, module: torch.nn.Module, args: tuple, kwargs: dict, context: str | None) -> CallInfo:
        x = split_input(args, kwargs)
        if self.intruded and self.run_thread == threading.get_ident() and (
                self.num_steps is None or self.step + 1 < self.num_steps):
            name = self.pipe_name
            self.clear()
            raise RuntimeError(
                f"hasten: another thread called {name} while this generation was running (refused there); the "
                "shared scheduler state was reset under this run, so it is stopped. A pipeline serves one call at "
                "a time: give each thread its own pipeline (copy.deepcopy(pipe)) or serialise the calls.")
        pipe, local_vars = self._pipe(module)
        sched = getattr(pipe, "scheduler", None)
        timesteps = getattr(sched, "timesteps", None)
        sig = (_timestep_sig(_timestep(args, kwargs)), getattr(sched, "_step_index", None))
        new_run = not self.started or self.run_thread != threading.get_ident()
        if timesteps is not None and timesteps is not self._timesteps:
            new_run = True
        if not new_run and sig != self._sig and self.num_steps is not None and self.step + 1 >= self.num_steps:
            new_run = True
        if new_run:
            self.clear()
            self.started = True
            self._timesteps = timesteps
            n = getattr(pipe, "_num_timesteps", None)
            self.num_steps = n if isinstance(n, int) and n > 0 else (len(timesteps) if timesteps is not None else None)
            self.pipe_name = type(pipe).__name__ if pipe is not None else type(module).__name__
            self.run_thread = threading.get_ident()
        if new_run or sig != self._sig or sig == (None, None):
            self.prev_positions = self.position if not new_run else 0
            self.step += 1
            self.position = 0
            self._sig = sig
            self._seen = set()
        else:
            self.position += 1
        given_step = getattr(module, ROW_STEP_ATTR, None)
        if isinstance(given_step, int) and given_step > self.step:  # an outer hook skipped whole steps
            self.step = given_step
        given = getattr(module, ROW_KEYS_ATTR, None)
        cfg = cfg_hint(pipe, local_vars)
        if self.position == 0:
            self.cfg = cfg
        if given is not None and len(given) == x.shape[0]:
            keys = [tuple(k) for k in given]
            self._remember(keys, x)
            return CallInfo(keys, [f"{n}[{i}]" for n, i in keys], self.step, self.position, self.num_steps,
                            new_run, self.pipe_name, self.cfg, given=True, pipe=pipe)
        names = batch_layout(pipe, local_vars, x, context)
        if self.position == 0:
            self._first_x, self._first_names = x, names
        elif context is None:
            same_x = self._first_x is not None and self._first_x.shape == x.shape and (
                self._first_x is x or torch.equal(self._first_x, x))
            if (self.position == 1 and cfg is not False and same_x and set(self._first_names) == {"cond"}
                    and set(names) == {"cond"}):
                names = ["uncond"] * len(names)
            else:
                names = [f"call{self.position}" if n == "cond" else f"call{self.position}:{n}" for n in names]
        counter: dict[str, int] = {}
        keys = []
        for n in names:
            keys.append((n, counter.get(n, 0)))
            counter[n] = counter.get(n, 0) + 1
        if any(k in self._seen for k in keys):  # the same branch twice in one step: keep them apart
            keys = [(f"{n}@{self.position}", i) for n, i in keys]
        self._remember(keys, x)
        return CallInfo(keys, [f"{n}[{i}]" for n, i in keys], self.step, self.position, self.num_steps,
                        new_run, self.pipe_name, self.cfg, pipe=pipe)

    def last_call(self, info: CallInfo) -> bool:
        """Best guess that ``info`` is the run's last call: last step, as many calls as the step before."""
        return info.num_steps is not None and info.step >= info.num_steps - 1 and (
            info.step == 0 or info.position >= self.prev_positions)

    def _remember(self, keys: list, x: torch.Tensor) -> None:
        self._seen.update(keys)
        if self.position == 0 and self._first_x is None:
            self._first_x = x


class DenoiserHook(ModelHook):
    """A diffusers ModelHook around the denoiser's forward; subclasses say what to do per call.

    ``identify()`` tells a subclass what each call is (:class:`CallInfo`). A pipeline serves one call
    at a time: a call from a second thread while a run is in progress in another raises RuntimeError.
    """

    _is_stateful = True

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.context = ContextProbe()
        self.tracker = RunTracker(pipe)
        self.pattern = CallPattern(pipe)
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self.packer = OutputPacker()
        self._active: dict[int, int] = {}  # thread id -> nesting depth of calls in flight

    def original(self) -> Callable:
        return self.fn_ref.original_forward

    def identify(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        """Identify this call; on a new run, close the previous one (``on_run_end``) and start the next."""
        self.guard_threads(module)
        if getattr(module, "_parallel_config", None) is not None:  # diffusers' context parallelism is on
            from .parallel import check_hook_order

            check_hook_order(module, self)
        info = self.pattern.identify(module, args, kwargs, self.context.name)
        if info.new_run:
            self.on_run_end()
            self.on_run_start(info.num_steps)
        return info

    def guard_threads(self, module: torch.nn.Module) -> None:
        """Refuse a call from another thread while a run of this denoiser is in progress there."""
        me = threading.get_ident()
        busy = [t for t, n in self._active.items() if n and t != me]
        owner = self.pattern.run_thread
        if not busy and owner is not None and owner != me:
            frame = sys._current_frames().get(owner)
            for _ in range(200):  # is the owner thread still inside a pipeline call that runs this module?
                if frame is None:
                    break
                if holds(frame.f_locals.get("self"), module):
                    busy = [owner]
                    break
                frame = frame.f_back
        if busy:
            self.pattern.intruded = True
            raise RuntimeError(
                f"hasten: {self.pattern.pipe_name} is already running a generation in another thread; a pipeline "
                "(and its denoiser) serves one call at a time. Give each thread its own pipeline "
                "(copy.deepcopy(pipe)) or serialise the calls with a lock.")

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.on_run_end()
        self.tracker.clear()
        self.pattern.clear()
        return module

    # subclasses override
    def on_run_start(self, num_steps: int | None) -> None: ...

    def on_run_end(self) -> None: ...


@contextlib.contextmanager
def pag_rows_without_cfg(pipe: Any, module: torch.nn.Module) -> Iterator[None]:
    """Run a PAG batch whose uncond rows were dropped: ``[cond, perturbed]`` needs PAG's non-CFG processors.

    diffusers' PAG pipelines keep the two processor variants in ``_pag_attn_processors`` (CFG, no CFG);
    the CFG one splits its batch in three. For this call only, the layers holding the CFG variant get the
    other one; they are put back afterwards.
    """
    procs = getattr(pipe, "_pag_attn_processors", None) if pipe is not None else None
    if not procs or len(procs) < 2:
        raise UnsupportedModelError(f"{type(pipe).__name__}: cannot run a PAG batch without its uncond rows (no "
                                    "PAG processor pair found)")
    with_cfg, without = procs[0], procs[1]
    mods = [m for m in module.modules() if getattr(m, "processor", None) is with_cfg]
    for m in mods:
        m.processor = without
    try:
        yield
    finally:
        for m in mods:
            m.processor = with_cfg


class in_flight:  # noqa: N801 - a context manager
    """Marks a hook's call as in progress in this thread (for the one-call-at-a-time check)."""

    def __init__(self, hook: DenoiserHook) -> None:
        self.hook = hook

    def __enter__(self) -> None:
        me = threading.get_ident()
        self.hook._active[me] = self.hook._active.get(me, 0) + 1

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        n = self.hook._active.get(me, 1) - 1
        if n <= 0:
            self.hook._active.pop(me, None)
        else:
            self.hook._active[me] = n


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


class _Chain:
    """Picklable stand-in for the closure diffusers' ``HookRegistry`` puts at ``module.forward``.

    diffusers wraps each hook in a local function that ``copy.deepcopy`` cannot copy (functions are
    copied by reference), so a deep-copied model would keep calling the ORIGINAL model's hook chain
    and weights. An object holding the same ``HookFunctionReference`` is copied along with the module,
    so hooks follow their module through ``deepcopy``.
    """

    def __init__(self, fn_ref: Any) -> None:
        self.fn_ref = fn_ref

    @torch.compiler.disable  # hasten's per-call decisions never run inside a compiled region (pipelines/compat.py)
    def __call__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry._fn_refs and registry._fn_refs[-1] is self.fn_ref:  # outermost hook
            compile_below_hooks(module)
        args, kwargs = self.fn_ref.pre_forward(module, *args, **kwargs)
        output = self.fn_ref.forward(*args, **kwargs)
        return self.fn_ref.post_forward(module, output)


def _register(registry: HookRegistry, hook: ModelHook, name: str) -> None:
    """``registry.register_hook`` with a deep-copyable ``forward`` (see :class:`_Chain`)."""
    module = registry._module_ref
    inner = module.forward
    registry.register_hook(hook, name)
    fn_ref = registry._fn_refs[-1]
    module.forward = functools.update_wrapper(functools.partial(_Chain(fn_ref), module), inner)


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
    _register(registry, hook, name)
    for other, h in popped:
        _register(registry, h, other)


def detach(module: torch.nn.Module, name: str) -> bool:
    """Remove hook ``name`` (hooks above it stay, in order); drop an emptied registry. True if removed."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return False
    popped = _pop_above(registry, registry._hook_order.index(name) + 1)
    registry.remove_hook(name, recurse=False)
    for other, h in popped:
        _register(registry, h, other)
    if not registry.hooks:
        restore_compile(module)
    if not registry.hooks and not any(hasattr(m, "_diffusers_hook") for n, m in module.named_modules() if n):
        del module._diffusers_hook
    return True
