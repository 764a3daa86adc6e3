"""The search space of ``hasten tune``: a registry of small entries, one per accelerator family.

Each :class:`Entry` knows three things: how a search trial picks its settings (``suggest``: an optuna
trial in, a settings dict or ``None`` = off out), how to check settings read from a preset file
(``validate``: builds the family's own config, so the file gets exactly the checks ``enable_*`` does),
and how to switch them on a diffusers pipeline (``enable``; ``disable`` undoes it). A new family is one
:func:`register` call. The JSON preset stores each family's settings as that family's config keywords,
so the ComfyUI preset node builds the same configs for its own nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Settings = dict[str, Any]


@dataclass
class Context:
    """What ``enable`` may need beyond the settings: calibration prompts and per-tune caches."""

    calibration_prompts: list[str] = field(default_factory=list)
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class Entry:
    """One searchable accelerator family."""

    name: str
    suggest: Callable[[Any], Settings | None]
    validate: Callable[[Settings], Any]
    enable: Callable[[Any, Settings, Context], None]
    disable: Callable[[Any], None]
    default: bool = True  # searched unless the caller names the features
    order: int = 50  # enable order (schedule and weights first, hooks after)
    why_not_default: str = ""
    why_not_on_cpu: str = ""  # set: left out of the default search when the denoiser runs on a CPU (never faster)


SPACE: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    """Add (or replace) a family of the search space."""
    SPACE[entry.name] = entry
    return entry


def _config(module: str, cls: str) -> Callable[[Settings], Any]:
    def build(settings: Settings) -> Any:
        import importlib

        mod = importlib.import_module(f"hasten.{module}")
        return getattr(mod, cls)(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})

    return build


def _method(feature: str) -> tuple[Callable[[Any, Settings, Context], None], Callable[[Any], None]]:
    def enable(pipe: Any, settings: Settings, ctx: Context) -> None:
        import hasten.pipelines as hp

        getattr(hp, f"enable_{feature}")(pipe, **{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in settings.items()})

    def disable(pipe: Any) -> None:
        import hasten.pipelines as hp

        getattr(hp, f"disable_{feature}")(pipe)

    return enable, disable


# --- timestep schedule (AutoDiffusion) ----------------------------------------------------------------------

def _suggest_schedule(trial: Any) -> Settings | None:
    base = int(trial.study.user_attrs.get("steps", 20))
    steps = trial.suggest_int("schedule.steps", max(2, base // 4), base)
    shift = trial.suggest_float("schedule.shift", 0.5, 3.0, log=True)
    if steps == base and abs(shift - 1.0) < 1e-3:
        return None
    return {"steps": steps, "shift": round(shift, 4)}


def _enable_schedule(pipe: Any, settings: Settings, ctx: Context) -> None:
    from .schedule import enable_timestep_schedule

    enable_timestep_schedule(pipe, **settings)


def _disable_schedule(pipe: Any) -> None:
    from .schedule import disable_timestep_schedule

    disable_timestep_schedule(pipe)


register(Entry("timestep_schedule", _suggest_schedule, _config("tune.schedule", "ScheduleConfig"),
               _enable_schedule, _disable_schedule, order=0))


# --- step cache ---------------------------------------------------------------------------------------------

def _suggest_easycache(trial: Any) -> Settings | None:
    if not trial.suggest_categorical("easycache.on", [True, False]):
        return None
    out: Settings = {
        "threshold": round(trial.suggest_float("easycache.threshold", 0.02, 0.5, log=True), 4),
        "warmup": round(trial.suggest_float("easycache.warmup", 0.05, 0.4), 3),
        # the reuse cap bounds the saving (at 20 steps the default 4 in a row caps it at 2.5x)
        "max_consecutive_reuse": trial.suggest_categorical("easycache.max_reuse", [4, 6, 8]),
    }
    from ..caches.easycache import FORECASTS

    # stored always: leaving "none" out would give the config's default forecast ("linear")
    out["forecast"] = trial.suggest_categorical("easycache.forecast", list(FORECASTS))
    return out


register(Entry("easycache", _suggest_easycache, _config("caches", "EasyCacheConfig"), *_method("easycache")))


# --- guidance -----------------------------------------------------------------------------------------------

def _suggest_guidance(trial: Any) -> Settings | None:
    mode = trial.suggest_categorical("guidance.mode", ["off", "ag", "truncate"])
    if mode == "ag":
        return {"mode": "ag", "threshold": round(trial.suggest_float("guidance.threshold", 0.98, 0.9995), 5)}
    if mode == "truncate":
        return {"mode": "truncate", "truncate": round(trial.suggest_float("guidance.truncate", 0.3, 0.95), 3)}
    return None


register(Entry("adaptive_guidance", _suggest_guidance, _config("samplers.guidance", "GuidanceConfig"),
               *_method("adaptive_guidance")))


# --- quantization -------------------------------------------------------------------------------------------

def _suggest_quant(trial: Any) -> Settings | None:
    method = trial.suggest_categorical("quantize.method", ["off", "int8", "w8a8"])
    return None if method == "off" else {"method": method}


def _validate_quant(settings: Settings) -> Any:
    from ..quant import as_config

    if set(settings) - {"method"}:
        raise ValueError(f"quantize: only 'method' is stored in a preset, got {sorted(settings)}")
    return as_config(settings.get("method"))


def _enable_quant(pipe: Any, settings: Settings, ctx: Context) -> None:
    """Quantize with activations recorded once per pipeline and tune run (AWQ / SmoothQuant need them)."""
    import hasten.pipelines as hp

    method = settings["method"]
    key = ("quant-calibration", id(pipe))
    if key not in ctx.cache and ctx.calibration_prompts:
        from ..pipelines.quantize import _denoisers, calibrate_pipeline

        kwargs = {k: v for k, v in ctx.call_kwargs.items() if k != "num_inference_steps"}  # it samples 4 steps
        ctx.cache[key] = dict(calibrate_pipeline(pipe, list(ctx.calibration_prompts), 4, list(_denoisers(pipe, None)),
                                                 256, **kwargs))
    hp.quantize_pipeline(pipe, method, calibration=ctx.cache.get(key))


def _disable_quant(pipe: Any) -> None:
    import hasten.pipelines as hp

    hp.dequantize_pipeline(pipe)


register(Entry("quantize", _suggest_quant, _validate_quant, _enable_quant, _disable_quant, order=10,
               why_not_on_cpu="on a CPU int8 weights are dequantized on every call and W8A8's int8 matmul is a "
                              "reference path: at 7 steps the embedded image model took 1.10x (int8) and 10x (W8A8) "
                              "the CPU time of the unquantized run, the video model at 6 steps 1.16x and 7.3x"))


# --- off by default (no effect on small models; enable with features=[...]) --------------------------------

def _suggest_bottleneck(trial: Any) -> Settings | None:
    if not trial.suggest_categorical("bottleneck.on", [False, True]):
        return None
    # the stages: full resolution -> `scale` from `start` to `end` (fractions of the run's steps) -> full
    scale = trial.suggest_categorical("bottleneck.scale", [0.5, 0.75])
    start = round(trial.suggest_float("bottleneck.start", 0.05, 0.5), 3)
    end = round(trial.suggest_float("bottleneck.end", start + 0.05, 0.95), 3)
    return {"scales": [1.0, scale, 1.0], "boundaries": [start, end]}


register(Entry("bottleneck_sampling", _suggest_bottleneck, _config("samplers.bottleneck", "BottleneckConfig"),
               *_method("bottleneck_sampling"), default=False, order=20,
               why_not_default="patches the scheduler like the timestep schedule; low-resolution stages need a "
                               "model trained at several resolutions"))


def _suggest_sparse(trial: Any) -> Settings | None:
    mass = trial.suggest_categorical("sparse.target_mass", [1.0, 0.98, 0.95, 0.9])
    return None if mass == 1.0 else {"target_mass": mass}


register(Entry("sparse_attention", _suggest_sparse, _config("kernels.adaspa", "AdaSpaConfig"),
               *_method("sparse_attention"), default=False,
               why_not_default="stays dense below its minimum sequence length (1024 tokens)",
               why_not_on_cpu="its block-sparse kernel is a GPU (Triton) kernel; on a CPU every trial with it ran "
                              "slower than the cut and was stopped (9 of 33 trials of a 15-minute video search)"))


# --- the families other hasten modules add (opt-in here until measured in a tune run) --------------------------

def _suggest_delta_dit(trial: Any) -> Settings | None:
    if not trial.suggest_categorical("delta_dit.on", [False, True]):
        return None
    return {"interval": trial.suggest_int("delta_dit.interval", 2, 4),
            "boundary": round(trial.suggest_float("delta_dit.boundary", 0.2, 0.8), 3)}


def _suggest_profiling_dit(trial: Any) -> Settings | None:
    if not trial.suggest_categorical("profiling_dit.on", [False, True]):
        return None
    return {"threshold": round(trial.suggest_float("profiling_dit.threshold", 0.02, 0.3, log=True), 4)}


def _suggest_sada(trial: Any) -> Settings | None:
    if not trial.suggest_categorical("sada.on", [False, True]):
        return None
    return {"max_interval": trial.suggest_int("sada.max_interval", 1, 3),
            "threshold": round(trial.suggest_float("sada.threshold", -0.5, 0.5), 3)}


def _suggest_cachequant(trial: Any) -> Settings | None:
    """CacheQuant's joint component: quantization plus the cache schedule chosen for it (one searched unit)."""
    if not trial.suggest_categorical("cachequant.on", [False, True]):
        return None
    return {"method": trial.suggest_categorical("cachequant.method", ["int8", "w8a8"]),
            "speedup": round(trial.suggest_float("cachequant.speedup", 1.2, 3.0), 3)}


def _enable_cachequant(pipe: Any, settings: Settings, ctx: Context) -> None:
    """Enable CacheQuant from a calibration recorded once per (pipeline, method, sampling) and reused.

    The calibration (full-precision and quantized traces of every step, plus the activations for the
    quantization) depends on the method, on how the pipeline samples (the call's arguments and whatever
    already patches it: the timestep schedule / bottleneck stages enabled before, in registry order) and on
    the prompts, never on the settings a trial moves (``speedup``, ``num_computed_steps``, ``reuse``,
    ``correction``): so a search calibrates each combination once, and every later trial only re-plans.
    """
    import hasten.pipelines as hp
    from hasten.caches.cachequant import CacheQuantConfig

    prompts = tuple(settings.pop("calibration_prompts", ()) or ctx.calibration_prompts)
    config = CacheQuantConfig(calibration_prompts=prompts, **{k: tuple(v) if isinstance(v, list) else v
                                                              for k, v in settings.items()})
    kwargs = dict(ctx.call_kwargs)
    steps = kwargs.pop("num_inference_steps", None)
    key = ("cachequant-calibration", id(pipe), config.method, prompts, config.calibration_seeds, steps,
           repr(sorted(kwargs.items())), _sampling_state(pipe))
    cal = ctx.cache.get(key)
    if cal is None:
        cal = hp.calibrate_cachequant(pipe, config, num_inference_steps=steps, call_kwargs=kwargs)
        ctx.cache[key] = cal
        ctx.cache["cachequant-calibrations"] = ctx.cache.get("cachequant-calibrations", 0) + 1
    hp.enable_cachequant(pipe, config, calibration=cal, num_inference_steps=steps, call_kwargs=kwargs)


def _sampling_state(pipe: Any) -> str:
    """The hasten features already on ``pipe`` with their configs (what else changes how it samples)."""
    from ..pipelines.registry import features

    return repr(sorted((name, repr(getattr(f, "config", None))) for name, f in features(pipe).items()))


for _name, _suggest, _module, _cls in (
    ("delta_dit", _suggest_delta_dit, "caches.blockcache", "DeltaDiTConfig"),
    ("profiling_dit", _suggest_profiling_dit, "caches.blockcache", "ProfilingDiTConfig"),
    ("sada", _suggest_sada, "caches.sada", "SADAConfig"),
):
    register(Entry(_name, _suggest, _config(_module, _cls), *_method(_name), default=False, order=60,
                   why_not_default="added to hasten alongside tune; not yet measured in a tune run"))
register(Entry("cachequant", _suggest_cachequant, _config("caches.cachequant", "CacheQuantConfig"),
               _enable_cachequant, _method("cachequant")[1], default=False, order=10,
               why_not_default="calibrates a cache schedule per trial (slow); the quantize + easycache "
                               "entries cover the stacked alternative"))


# families the video model also searches by default (issue 14: the same search as on images, plus the
# bottleneck's stages and sparse attention, which engage at its 1088 tokens)
VIDEO_DEFAULTS = ("bottleneck_sampling", "sparse_attention")


def default_features(model: str = "image", device: str = "cuda") -> list[str]:
    """The families searched unless named: the registry's defaults, plus :data:`VIDEO_DEFAULTS` for videos,
    less those that are never faster on ``device`` "cpu" (``why_not_on_cpu``; name them to search them anyway)."""
    out = [n for n, e in SPACE.items() if e.default]
    out += [n for n in VIDEO_DEFAULTS if n in SPACE and n not in out] if model == "video" else []
    return [n for n in out if not (device == "cpu" and SPACE[n].why_not_on_cpu)]


def exclusive(feats: dict[str, Settings]) -> dict[str, Settings]:
    """Drop the families a trial's other choices exclude (each pair patches the same thing): bottleneck
    stages replace the timestep schedule (both patch the scheduler), and CacheQuant (its own quantization
    and step cache) replaces quantize and EasyCache."""
    out = dict(feats)
    if "bottleneck_sampling" in out:
        out.pop("timestep_schedule", None)
    if "cachequant" in out:
        out.pop("quantize", None)
        out.pop("easycache", None)
    return out


def entries(names: list[str] | None = None) -> list[Entry]:
    """The entries named (all default ones if ``names`` is None), in enable order; unknown names raise."""
    names = default_features() if names is None else list(names)
    unknown = [n for n in names if n not in SPACE]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {', '.join(SPACE)}")
    return sorted((SPACE[n] for n in names), key=lambda e: e.order)
