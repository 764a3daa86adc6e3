"""ComfyUI adapter for the block caches (Δ-DiT, ProfilingDiT); every decision is the core's.

Blocks are reached through ComfyUI's own block-replacement patches (``transformer_options
["patches_replace"]["dit"][("double_block" | "single_block", i)]``), which Wan, Flux, SD3/MMDiT,
HunyuanVideo, Qwen-Image, LTX, Chroma... route each block through: nothing of the model is replaced.
Each patch gets the block's inputs as a dict (``img``, ``txt``, ...) and returns the updated streams,
so a residual is kept per returned stream (``out[k] - args[k]``). An ``APPLY_MODEL`` wrapper tells the
patches which branch each row is (cond/uncond chunk x batch item) and which step the call belongs to;
an ``OUTER_SAMPLE`` wrapper gives each sampling run a fresh policy.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..caches.blockcache import (
    BlockCache,
    BlockRunStats,
    DeltaDiT,
    DeltaDiTConfig,
    ProfilingDiT,
    ProfilingDiTConfig,
    StepPlan,
)
from ..caches.forecast import FORECASTS
from .runs import batch_rows, last_run_stats, num_steps_of, rewrap, scoped_run, step_index
from .schema import CATEGORY, advanced, fail, io

log = logging.getLogger("hasten")
DELTA_NAME = "Δ-DiT Block Cache (hasten)"
PROFILING_NAME = "ProfilingDiT Block Cache (hasten)"
WRAPPER_KEY = "hasten_blockcache"
HOLDER_KEY = "hasten_blockcache"
RUN_KEY = "hasten_blockcache_run"
SUPPORTED = ("ComfyUI models whose blocks go through patches_replace['dit'] (Wan 2.1/2.2, Flux, Chroma, SD3, "
             "HunyuanVideo, Qwen-Image, LTX-Video ...)")

_DD = DeltaDiTConfig()
_PD = ProfilingDiTConfig()
FORECAST_TOOLTIP = ("How a reused span's residual is estimated: 'none' adds the last computed one, 'linear'/"
                    "'quadratic' extrapolate it from the span's last 2/3 computed steps (TaylorSeer/FoCa-style "
                    "forecasting; more faithful at the same work).")


@dataclass
class BlockCacheHolder:
    """One node instance: its method, settings, block list, and the statistics of its last run."""

    name: str
    make: Any  # () -> BlockCache
    num_blocks: int
    kind: str  # "double_block" | "single_block"
    run: _Run | None = None
    last_run: BlockRunStats | None = None
    notes: list[str] = field(default_factory=list)

    def note_once(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s: %s", self.name, message)


@dataclass
class _Run:
    cache: BlockCache
    num_steps: int
    keys: list | None = None  # the current apply_model call's branches
    plan: StepPlan | None = None
    span_inputs: dict = field(default_factory=dict)
    layouts: dict[int, list[str]] = field(default_factory=dict)  # block -> its output stream names
    patch_calls: int = 0
    block_forwards: int = 0  # rows x blocks really run through a cached block patch


def stats(model: Any) -> BlockRunStats | None:
    """Statistics of the last sampling run of a MODEL patched by one of these nodes (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """A fresh policy per sampling run; statistics kept and logged when it ends."""

    def start(holder: BlockCacheHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        cache = holder.make()
        num_steps = num_steps_of(sigmas)
        cache.begin_run(num_steps, holder.num_blocks)
        run = holder.run = _Run(cache, num_steps)

        def finish() -> None:
            holder.run = None
            result = cache.end_run()
            if not result.calls:
                return
            holder.last_run = result
            if run.patch_calls == 0 and not cache.off:
                holder.note_once(f"the model never called its block patches, so nothing was cached; this node "
                                 f"supports {SUPPORTED}")
            elif result.reused == 0 and not cache.off:
                log.warning("%s reused no block in %d steps (run too short for warm-up/profiling, or no block "
                            "stable enough)", holder.name, num_steps)
            else:
                log.info("%s: %d/%d block forwards computed, %d reused (%d branches%s)", holder.name,
                         result.computed, result.block_forwards, result.reused, len(result.branches),
                         f", cached blocks {result.cached_blocks}" if result.cached_blocks is not None else "")

        return run, finish

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def apply_model_wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                        c_crossattn: Any = None, control: Any = None, transformer_options: dict | None = None,
                        **kwargs: Any) -> torch.Tensor:
    """Make this call's plan (branches from the cond/uncond chunks, step from the sigma schedule)."""
    topts = transformer_options if transformer_options is not None else {}
    run: _Run | None = topts.get(RUN_KEY)

    def call() -> torch.Tensor:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    if run is None:
        return call()
    keys = batch_rows(topts, x.shape[0])
    cou = list(topts.get("cond_or_uncond") or [])
    if keys is None or len(cou) != len(topts.get("uuids") or []):
        topts[HOLDER_KEY].note_once(f"cannot tell the CFG branches apart (batch {x.shape[0]}); computing")
        return call()
    per = x.shape[0] // len(cou)
    labels = [f"{'cond' if cou[i // per] == 0 else 'uncond'}[{k[1]}]" for i, k in enumerate(keys)]
    step = step_index(topts.get("sample_sigmas"), t[0], run.num_steps)
    run.keys, run.plan = keys, run.cache.plan(keys, step, x, labels)
    try:
        return call()
    finally:
        run.keys, run.plan, run.span_inputs = None, None, {}


@dataclass
class _BlockPatch:
    """The ``patches_replace['dit']`` entry of block ``index``: carries out the run's plan for that block."""

    holder: BlockCacheHolder
    index: int

    def __call__(self, args: dict, extra: dict) -> dict:
        run = self.holder.run
        original = extra["original_block"]
        plan = run.plan if run is not None else None
        if run is None or plan is None or run.keys is None:
            return original(args)
        run.patch_calls += 1
        role = plan.role(self.index)
        if role is None and not plan.profile:
            return original(args)
        names = run.layouts.get(self.index)
        if role is not None and role[0] == "reuse" and names is not None:
            span = role[1]
            out = {k: args[k] for k in names}
            if self.index == span[0] and span[1] - span[0] > 1:  # a ControlNet adds to the passed-through
                run.span_inputs[span] = _copies(args, names)  # streams in place: keep the span's real input
            if self.index == span[1] - 1:
                start = run.span_inputs.pop(span, out)
                live = [k for k in names if out[k] is not None]
                for k, v in zip(live, run.cache.reuse(run.keys, span, [start[k] for k in live]), strict=True):
                    out[k] = v
            return out
        # Flux/HunyuanVideo blocks update their input streams in place (``img += ...``): copy what is read after
        first = role is not None and self.index == role[1][0]
        before = _copies(args, names) if plan.profile or first else args
        out = original(args)
        run.block_forwards += len(run.keys)
        if names is None:
            names = run.layouts[self.index] = [k for k, v in out.items() if v is None or torch.is_tensor(v)]
            missing = [k for k in names if out[k] is not None and (k not in args or not torch.is_tensor(args[k])
                                                                  or args[k].shape != out[k].shape)]
            if missing:
                fail(self.holder.name, f"block {self.index} returns streams {missing} that are not residual updates "
                                       f"of its inputs; block caching supports {SUPPORTED}")
        live = [k for k in names if out[k] is not None]
        if plan.profile:
            run.cache.observe(run.keys, self.index, [before[k] for k in live], [out[k] for k in live])
        if role is not None:
            span = role[1]
            if self.index == span[0]:
                run.span_inputs[span] = {k: before[k] for k in before if torch.is_tensor(before[k])}
            if self.index == span[1] - 1:
                start = run.span_inputs.pop(span, {})
                if any(k not in start for k in live):
                    fail(self.holder.name, f"blocks {span[0]}..{span[1] - 1} do not pass the same streams along; "
                                           f"block caching supports {SUPPORTED}")
                run.cache.remember(run.keys, span, [start[k] for k in live], [out[k] for k in live])
        return out


def _copies(args: dict, names: list[str] | None) -> dict:
    """Copies of the block's tensor inputs (``names``' streams, or all of them before the layout is known)."""
    return {k: v.clone() for k, v in args.items() if torch.is_tensor(v) and (names is None or k in names)}


def find_blocks(diffusion_model: torch.nn.Module) -> tuple[str, int, str]:
    """(attribute, number of blocks, patch kind) of the model's main block list, if it routes its blocks
    through ``patches_replace['dit']``; raises UnsupportedModelError (as a node error) otherwise."""
    best = None
    for name, child in diffusion_model.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) >= 2 and len({type(b) for b in child}) == 1:
            if best is None or len(child) > len(best[1]):
                best = (name, child)
    try:
        source = inspect.getsource(type(diffusion_model))
    except (OSError, TypeError):
        source = ""
    kind = "single_block" if best is not None and best[0].startswith("single") else "double_block"
    if best is None or f'("{kind}", i)' not in source.replace("'", '"'):
        fail("Block Cache (hasten)", f"{type(diffusion_model).__name__} has no list of repeated blocks routed through "
                                     f"patches_replace['dit']; this node supports {SUPPORTED}")
    assert best is not None
    return best[0], len(best[1]), kind


def patch_model(model: Any, name: str, make: Any) -> Any:
    """A clone of ``model`` with the block cache's wrappers and block patches (re-patching replaces)."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or not hasattr(model, "add_wrapper_with_key"):
        fail(name, f"needs a ComfyUI diffusion MODEL; this node supports {SUPPORTED}")
    _, num_blocks, kind = find_blocks(dm)
    import comfy.patcher_extension as pe

    m = rewrap(model, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                     pe.WrappersMP.APPLY_MODEL: apply_model_wrapper})
    holder = BlockCacheHolder(name, make, num_blocks, kind)
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = holder
    for i in range(num_blocks):
        m.set_model_patch_replace(_BlockPatch(holder, i), "dit", kind, i)
    return m


class HastenDeltaDiT(io.ComfyNode):
    """Node "Δ-DiT Block Cache (hasten)": rear blocks cached early, front blocks late (Δ-Cache)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenDeltaDiT",
            display_name=DELTA_NAME,
            category=CATEGORY,
            description=("Δ-DiT (Chen et al. 2024), training-free: reuses the residual of a span of transformer "
                         "blocks, added to this step's input (Δ-Cache): the rear blocks in the early steps, the "
                         "front blocks after the boundary, recomputed every `interval` steps. Per CFG branch. "
                         f"Supports {SUPPORTED}."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to accelerate (it is cloned, not changed)."),
                io.Int.Input("interval", default=_DD.interval, min=1, max=20,
                             tooltip="The cached span runs once every `interval` steps. 1 = off (bit-identical)."),
                io.Int.Input("num_cached_blocks", default=0, min=0, max=200,
                             tooltip="Blocks in the cached span; 0 = half of the model's blocks."),
                io.Float.Input("boundary", default=_DD.boundary, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps where caching moves from the rear to the front "
                                       "blocks."),
                io.Float.Input("warmup", default=_DD.warmup, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps always computed at the start.", **advanced()),
                io.Combo.Input("forecast", options=list(FORECASTS), default=_DD.forecast, tooltip=FORECAST_TOOLTIP,
                               optional=True, **advanced()),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with Δ-DiT; connect it to any sampler.")],
        )

    @classmethod
    def execute(cls, model: Any, interval: int = _DD.interval, num_cached_blocks: int = 0,
                boundary: float = _DD.boundary, warmup: float = _DD.warmup,
                forecast: str = _DD.forecast) -> io.NodeOutput:
        config = DeltaDiTConfig(num_cached_blocks=num_cached_blocks or None, boundary=boundary, interval=interval,
                                warmup=warmup, forecast=forecast)
        return io.NodeOutput(patch_model(model, DELTA_NAME, lambda: DeltaDiT(config)))


class HastenProfilingDiT(io.ComfyNode):
    """Node "ProfilingDiT Block Cache (hasten)": profile each block, cache the stable ones."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenProfilingDiT",
            display_name=PROFILING_NAME,
            category=CATEGORY,
            description=("ProfilingDiT (Ma et al. 2025), training-free: the first steps of each run profile how much "
                         "each block's residual changes per step; blocks below the threshold are reused for up to "
                         "`max_reuse` steps, the others run every step. Per CFG branch. "
                         f"Supports {SUPPORTED}."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to accelerate (it is cloned, not changed)."),
                io.Float.Input("threshold", default=_PD.threshold, min=0.0, max=10.0, step=0.01,
                               tooltip="Blocks whose mean relative residual change per step is below this are "
                                       "cached. 0 = off (bit-identical)."),
                io.Float.Input("profile", default=_PD.profile, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the first steps computed and profiled."),
                io.Int.Input("max_reuse", default=_PD.max_reuse, min=1, max=20,
                             tooltip="A cached block is reused at most this many steps in a row.", **advanced()),
                io.Combo.Input("forecast", options=list(FORECASTS), default=_PD.forecast, tooltip=FORECAST_TOOLTIP,
                               optional=True, **advanced()),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with ProfilingDiT; connect it to any sampler.")],
        )

    @classmethod
    def execute(cls, model: Any, threshold: float = _PD.threshold, profile: float = _PD.profile,
                max_reuse: int = _PD.max_reuse, forecast: str = _PD.forecast) -> io.NodeOutput:
        config = ProfilingDiTConfig(threshold=threshold, profile=profile, max_reuse=max_reuse, forecast=forecast)
        return io.NodeOutput(patch_model(model, PROFILING_NAME, lambda: ProfilingDiT(config)))


NODES = [HastenDeltaDiT, HastenProfilingDiT]
