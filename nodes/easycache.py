"""ComfyUI adapter for EasyCache: keyed wrappers on a cloned ModelPatcher; every decision is the core's.

The wrapper sits at ``WrappersMP.APPLY_MODEL`` (``BaseModel.apply_model``), which every ComfyUI model
passes through, so MMDiT/SD3 is covered too (the built-in EasyCache hooks ``DIFFUSION_MODEL``, which
MMDiT never calls in ComfyUI 0.3.x). ``apply_model`` returns the *denoised* estimate; the cache works in
the network's own space instead (network input ``calculate_input(sigma, x)`` and raw network output),
which is what the paper measures. ``calculate_denoised`` is affine in the network output for every
ModelSampling, so ``denoised = a + b * raw`` with ``a``/``b`` probed per call.

ComfyUI sends all CFG chunks and all images of a KSampler call as one batch; each row is its own branch,
and only the rows that need a forward go through the network (a sub-batch that keeps ComfyUI's
even chunk layout), so a reuse really saves work even when the rows of the batch decide differently.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..caches import EasyCache, EasyCacheConfig, RunStats, run_cached
from ..caches.easycache import FORECASTS
from .runs import ROWS_KEY, batch_rows, last_run_stats, num_steps_of, rewrap, scoped_run, step_index
from .schema import CATEGORY, advanced, fail, io

log = logging.getLogger("hasten")
NAME = "EasyCache (hasten)"

WRAPPER_KEY = "hasten_easycache"
HOLDER_KEY = "hasten_easycache"  # transformer_options entry: the node's settings and last stats
RUN_KEY = "hasten_easycache_run"  # transformer_options entry, present only during a sampling run

_DEFAULTS = EasyCacheConfig()


@dataclass
class EasyCacheHolder:
    """Settings of one node instance plus the statistics of its most recent sampling run."""

    config: EasyCacheConfig
    verbose: bool = False
    last_run: RunStats | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks taken (logged once each)

    def stats_text(self) -> str | None:
        """The last run's statistics as one line (None before the first run)."""
        return None if self.last_run is None else run_text(self.last_run)

    def note_once(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("EasyCache (hasten): %s", message)


@dataclass
class _Run:
    """State of one sampling run: the core policy and the run's sigma schedule."""

    holder: EasyCacheHolder
    cache: EasyCache
    num_steps: int


def run_text(result: RunStats, verbose: bool = False) -> str:
    """A run's statistics as the node reports them (log line and Run Stats node)."""
    text = (f"{NAME}: {result.computed}/{result.calls} branch forwards computed, {result.reused} reused "
            f"(estimated {result.estimated_speedup:.2f}x, {result.num_steps} steps)")
    if verbose:
        text += "\n" + "\n".join(result.summary().splitlines()[1:])
    return text


def stats(model: Any) -> RunStats | None:
    """Statistics of the last sampling run of a MODEL patched by the node (None if never run)."""
    return last_run_stats(model, HOLDER_KEY)


# -- wrappers ------------------------------------------------------------------------------------
def outer_sample_wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """Give every sampling run a fresh cache (begin_run) and keep its stats when it ends."""

    def start(holder: EasyCacheHolder, sigmas: torch.Tensor) -> tuple[_Run, Any]:
        num_steps = num_steps_of(sigmas)
        cache = EasyCache(holder.config)
        cache.begin_run(num_steps)

        def finish() -> None:
            result = cache.end_run()
            if result.calls:
                holder.last_run = result
                log.info("%s", run_text(result, holder.verbose))
                if result.reused == 0 and holder.config.threshold > 0:
                    log.warning("%s: nothing reused at reuse_threshold %g over %s steps (raise the threshold, "
                                "lower start_percent or use more steps)", NAME, holder.config.threshold,
                                result.num_steps)

        return _Run(holder, cache, num_steps), finish

    return scoped_run(executor, args, kwargs, HOLDER_KEY, RUN_KEY, start)


def _affine(model_sampling: Any, sigma: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) with calculate_denoised(sigma, raw, x) == a + b * raw, or None if not affine/invertible."""
    xf = x.float()
    zero = torch.zeros_like(xf)
    a = model_sampling.calculate_denoised(sigma, zero, xf)
    b = model_sampling.calculate_denoised(sigma, torch.ones_like(xf), xf) - a
    two = model_sampling.calculate_denoised(sigma, torch.full_like(xf, 2.0), xf)
    a, b = torch.broadcast_to(a, xf.shape), torch.broadcast_to(b, xf.shape)
    if not torch.allclose(two, a + 2 * b, rtol=1e-4, atol=1e-5) or bool((b == 0).any()):
        return None
    return a, b


def _slice_rows(v: Any, rows: list[int], batch: int) -> tuple[bool, Any]:
    """(ok, v restricted to ``rows``) for a batched argument; ok=False if it cannot be sliced safely."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True, v
    if torch.is_tensor(v):
        if v.ndim >= 1 and v.shape[0] == batch:
            return True, v[rows]
        return True, v
    return False, v


def apply_model_wrapper(executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                        c_crossattn: Any = None, control: Any = None, transformer_options: dict | None = None,
                        **kwargs: Any) -> torch.Tensor:
    """One ``apply_model`` call through :func:`run_cached`: one branch per (chunk uuid, row in chunk)."""
    topts = transformer_options if transformer_options is not None else {}
    run: _Run | None = topts.get(RUN_KEY)

    def call_all() -> torch.Tensor:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    if run is None:  # apply_model outside a sampling run (e.g. a preview): nothing to cache
        return call_all()
    holder = run.holder
    base_model = executor.class_obj
    batch = x.shape[0]
    uuids = list(topts.get("uuids") or [])
    cond_or_uncond = list(topts.get("cond_or_uncond") or [])
    if not uuids or batch % len(uuids) != 0 or len(cond_or_uncond) != len(uuids):
        holder.note_once(f"cannot tell the CFG branches apart (batch {batch}, chunks {len(uuids)}); computing")
        return call_all()
    per = batch // len(uuids)
    ms = base_model.model_sampling
    affine = _affine(ms, t, x)
    if affine is None:
        holder.note_once(f"{type(ms).__name__}.calculate_denoised is not affine/invertible here; computing")
        return call_all()
    a, b = affine
    xc = ms.calculate_input(t, x)
    keys = batch_rows(topts, batch)
    labels = [f"{'cond' if cond_or_uncond[i // per] == 0 else 'uncond'}[{k[1]}]" for i, k in enumerate(keys)]
    step = step_index(topts.get("sample_sigmas"), t[0], run.num_steps)
    denoised_parts: dict[int, torch.Tensor] = {}
    full: list[torch.Tensor] = []

    def compute(rows: list[int] | None) -> torch.Tensor:
        if rows is None:
            out = call_all()
            full.append(out)
            return (out - a) / b
        # ComfyUI batches [chunk 0 rows | chunk 1 rows | ...] (one chunk per cond/uncond entry), each chunk
        # the same size: keep the chunks with a row to compute and, inside each, the same row positions (the
        # union over chunks), so the sub-batch is still evenly chunked and only those rows go through.
        chunks = sorted({r // per for r in rows})
        inner = sorted({r % per for r in rows})
        sub_rows = [c * per + j for c in chunks for j in inner]
        sliced: dict[str, Any] = {}
        ok = control is None
        for name, v in (("c_concat", c_concat), ("c_crossattn", c_crossattn), *kwargs.items()):
            if not ok:
                break
            ok, sliced[name] = _slice_rows(v, sub_rows, batch)
        if not ok:
            holder.note_once("an input of this model cannot be split by batch row; computing the whole batch "
                             f"when any row needs it (inputs: {sorted(kwargs)}, control: {control is not None})")
        if ok and len(sub_rows) < batch:
            sub_opts = dict(topts)
            sub_opts["uuids"] = [uuids[c] for c in chunks]
            sub_opts["cond_or_uncond"] = [cond_or_uncond[c] for c in chunks]
            # the original in-chunk row of each sub-batch row, for per-row state below
            sub_opts[ROWS_KEY] = [keys[j][1] for j in inner]
            c_cat, c_cross = sliced.pop("c_concat"), sliced.pop("c_crossattn")
            out = executor(x[sub_rows], t[sub_rows], c_cat, c_cross, control, sub_opts, **sliced)
        else:
            out, sub_rows = call_all(), list(range(batch))
        pos = {r: i for i, r in enumerate(sub_rows)}
        idx = [pos[r] for r in rows]
        picked = out[idx]
        for j, r in enumerate(rows):
            denoised_parts[r] = picked[j : j + 1]
        return (picked - a[rows]) / b[rows]

    raw = run_cached(run.cache, keys, xc, [step] * batch, run.num_steps, compute, labels,
                     groups=[k[1] for k in keys])
    if full:  # every row computed: the model's own output, untouched (threshold 0 is bit-identical)
        return full[0]
    denoised = a + b * raw.to(a.dtype)
    for r, part in denoised_parts.items():
        denoised[r : r + 1] = part
    return denoised


# -- the node ------------------------------------------------------------------------------------
def _check_hookable(model: Any) -> None:
    inner = getattr(model, "model", None)
    missing = [n for n in ("apply_model", "_apply_model", "model_sampling") if not hasattr(inner, n)]
    if missing or not hasattr(model, "add_wrapper_with_key"):
        from ..errors import UnsupportedModelError

        msg = (f"{NAME} cannot hook {type(inner).__name__}: it needs a ComfyUI diffusion MODEL "
               f"(comfy.model_base.BaseModel with model_sampling: SD1.x/SDXL/SD3/Flux/Wan/Qwen-Image/"
               f"HunyuanVideo/LTX ...); missing {missing or ['add_wrapper_with_key']}")
        log.error(msg)
        raise UnsupportedModelError(msg)


BLOCK_CACHE_KEY = "hasten_blockcache"  # nodes/blockcache.py's wrapper key (imported lazily there: no cycle)


def refuse_other_step_cache(model: Any, name: str, own_wrapper: Any) -> None:
    """Node error when ``model`` already carries another hasten step cache (EasyCache, SADA, CacheQuant).

    They share one wrapper key, so the new node would silently replace the other; and stacked, one would
    treat the other's estimates as real forwards. One step cache per MODEL (a block cache may join it).
    """
    import comfy.patcher_extension as pe

    getter = getattr(model, "get_wrappers", None)
    fns = list(getter(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)) if getter is not None else []
    others = [f for f in fns if f is not own_wrapper]
    if others:
        mod = sys.modules.get(getattr(others[0], "__module__", ""), None)
        other = getattr(mod, "NAME", "another hasten step cache")
        fail(name, f"the MODEL already goes through {other}; two step-level caches never stack (each decides per "
                   f"step whether the model runs, and one would take the other's estimates for real forwards). "
                   f"Use one of them; a block cache node (Δ-DiT / ProfilingDiT) can be combined with either.")


def step_cache_outermost(m: Any) -> Any:
    """Put a block cache's wrappers (if any) inside the step cache's: a step that the step cache skips then
    never reaches the blocks, and the block cache sees the step cache's partial batches with their rows named."""
    import comfy.patcher_extension as pe

    for kind in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.APPLY_MODEL):
        fns = list(m.get_wrappers(kind, BLOCK_CACHE_KEY))
        if fns:
            m.remove_wrappers_with_key(kind, BLOCK_CACHE_KEY)
            for fn in fns:
                m.add_wrapper_with_key(kind, BLOCK_CACHE_KEY, fn)
    return m


def patch_model(model: Any, config: EasyCacheConfig, verbose: bool = False) -> Any:
    """A clone of ``model`` with EasyCache wrappers under one key (re-patching replaces, never stacks)."""
    _check_hookable(model)
    import comfy.patcher_extension as pe

    refuse_other_step_cache(model, NAME, outer_sample_wrapper)
    m = step_cache_outermost(rewrap(model, WRAPPER_KEY, {pe.WrappersMP.OUTER_SAMPLE: outer_sample_wrapper,
                                                         pe.WrappersMP.APPLY_MODEL: apply_model_wrapper}))
    m.model_options.setdefault("transformer_options", {})[HOLDER_KEY] = EasyCacheHolder(config, verbose)
    return m


class HastenEasyCache(io.ComfyNode):
    """Node "EasyCache (hasten)": reuse the denoiser's transformation on steps where it barely changes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HastenEasyCache",
            display_name=NAME,
            category=CATEGORY,
            description=("EasyCache (Zhou et al. 2025), training-free: skips denoiser forwards whose output "
                         "is predicted from the cached input-output transformation, per CFG branch. Works "
                         "on every ComfyUI diffusion model (SD1.x, SDXL, SD3, Flux, Wan 2.1/2.2, Qwen-Image, "
                         "HunyuanVideo, LTX...). Statistics: log line and the Run Stats (hasten) node."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion MODEL to accelerate (it is cloned, not changed)."),
                io.Float.Input("reuse_threshold", default=_DEFAULTS.threshold, min=0.0, max=3.0, step=0.01,
                               tooltip="Accumulated predicted change that forces a real forward. 0 = off "
                                       "(bit-identical to no cache); higher = faster, lower quality."),
                io.Float.Input("start_percent", default=_DEFAULTS.warmup, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps always computed at the start (the layout "
                                       "forms there)."),
                io.Float.Input("end_percent", default=_DEFAULTS.end, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which every step is computed again."),
                io.Combo.Input("forecast", options=list(FORECASTS), default=_DEFAULTS.forecast,
                               tooltip="How a skipped step's transformation is estimated: 'none' reuses the last "
                                       "one, 'linear'/'quadratic' extrapolate it from the last 2/3 computed steps "
                                       "(TaylorSeer/FoCa-style forecasting; more faithful at equal speed).",
                               optional=True, **advanced()),
                io.Int.Input("max_consecutive_reuse", default=_DEFAULTS.max_consecutive_reuse, min=0,
                             max=100, tooltip="Cap on reused steps in a row per branch (0 = no cap).",
                             **advanced()),
                io.Boolean.Input("verbose", default=False,
                                 tooltip="Log each branch's compute/reuse timeline after every run.",
                                 **advanced()),
            ],
            outputs=[io.Model.Output(tooltip="The MODEL with EasyCache; connect it to any sampler.")],
        )

    @classmethod
    def execute(cls, model: Any, reuse_threshold: float, start_percent: float = _DEFAULTS.warmup,
                end_percent: float = _DEFAULTS.end, max_consecutive_reuse: int = _DEFAULTS.max_consecutive_reuse,
                verbose: bool = False, forecast: str = _DEFAULTS.forecast) -> io.NodeOutput:
        config = EasyCacheConfig(threshold=reuse_threshold, warmup=start_percent, end=end_percent,
                                 max_consecutive_reuse=max_consecutive_reuse, forecast=forecast)
        return io.NodeOutput(patch_model(model, config, verbose))


NODES = [HastenEasyCache]
