"""diffusers adapter for CacheQuant: quantize the denoiser through hasten's quant path, then install the
cache schedule chosen for it (:mod:`hasten.caches.cachequant`) through EasyCache's step-cache hook.

    pipe.enable_cachequant(method="int8", num_computed_steps=8, calibration_prompts=["digit 3", ...])
    pipe.disable_cachequant()   # hook removed and the original linear layers back

Calibration samples each prompt x seed twice with every step computed — full precision, then quantized —
recording the denoiser's per-step input and output per branch (and, in the FP pass, the linear layers'
activations for the quantization), so it costs two generations per calibration item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from ..caches import EasyCacheConfig, RunStats
from ..caches.cachequant import (
    CacheQuantCache,
    CacheQuantCalibration,
    CacheQuantConfig,
    CacheQuantPlan,
    TraceRecorder,
)
from ..errors import UnsupportedModelError
from ..quant import as_config, quant_state, record_activations
from .denoiser import find_denoisers
from .easycache import EasyCacheHook
from .quantize import _refuses_output_type, dequantize_pipeline, quantize_pipeline
from .registry import HookFeature, features, install, make_config, uninstall
from .runhook import refuse_fresh_noise_scheduler

log = logging.getLogger("hasten.cachequant")

FEATURE = "cachequant"
HOOK_NAME = "hasten_cachequant"
PRIORITY = 50  # the step-cache slot, like EasyCache (below guidance and sparse attention)


class CacheQuantHook(EasyCacheHook):
    """EasyCache's hook (branch split, partial batches, output packing) driving a CacheQuant policy."""

    def __init__(self, pipe: Any, policy: CacheQuantCache | TraceRecorder) -> None:
        super().__init__(pipe, EasyCacheConfig(threshold=0.0))
        self.cache = policy  # type: ignore[assignment]

    label = "CacheQuant"

    def reuses_outputs(self) -> bool:
        plan = getattr(self.cache, "plan", None)  # a calibration recorder computes every step: nothing reused
        return plan is not None and plan.num_computed < plan.num_steps

    def report(self) -> None:
        """Log once per run what the schedule did."""
        st = self.cache.current_stats()
        if self._reported or not st.calls or isinstance(self.cache, TraceRecorder):
            return
        self._reported = True
        plan = self.cache.plan
        log.info("hasten CacheQuant on %s: %d/%d branch forwards computed, %d reused (schedule %s, reuse=%s, "
                 "correction %s)", self.pattern.pipe_name, st.computed, st.calls, st.reused, plan.timeline(),
                 plan.reuse, "on" if plan.correction is not None else "off")


class _Hooks(HookFeature):
    name = FEATURE
    hook_name = HOOK_NAME
    priority = PRIORITY

    def run_stats(self, hook: CacheQuantHook) -> tuple[RunStats | None, RunStats | None]:
        cur = hook.cache.current_stats()
        return (cur if cur.calls else None), hook.cache.last_run


class CacheQuantFeature(_Hooks):
    """The schedule hook on the denoiser plus the quantization it was chosen for; removed together."""

    def __init__(self, pipe: Any, plan: CacheQuantPlan, quant_feature: Any) -> None:
        self.plan = plan
        self._quant = quant_feature
        self._registry = features(pipe)
        super().__init__(pipe, lambda: CacheQuantHook(pipe, CacheQuantCache(plan)))

    def remove(self) -> None:
        super().remove()
        if self._quant is not None and self._registry.get("quant") is self._quant:
            self._registry.pop("quant").remove()
        self._quant = None


def _single_denoiser(pipe: Any) -> torch.nn.Module:
    mods = find_denoisers(pipe)
    if len(mods) != 1:
        raise UnsupportedModelError(
            f"CacheQuant supports pipelines with one denoiser; {type(pipe).__name__} has {sorted(mods)} (a "
            "two-expert model's experts see different steps: use int8 + enable_easycache there)")
    return next(iter(mods.values()))


def _sample(pipe: Any, prompts: tuple[str, ...], seeds: tuple[int, ...], steps: int | None,
            call_kwargs: dict[str, Any]) -> None:
    """One call per seed with every prompt in the batch (image i of seed s uses generator s + i)."""
    output_types: list[str | None] = [None] if "output_type" in call_kwargs else ["latent", None]
    for seed in seeds:
        kwargs = dict(call_kwargs)
        kwargs.update(prompt=list(prompts),
                      generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))])
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        while True:
            if output_types[0] is not None:
                kwargs["output_type"] = output_types[0]
            try:
                pipe(**kwargs)
                break
            except (ValueError, TypeError, NotImplementedError) as exc:
                if len(output_types) == 1 or not _refuses_output_type(exc):
                    raise
                output_types.pop(0)
                kwargs.pop("output_type", None)


def calibrate_cachequant(pipe: Any, config: CacheQuantConfig | None = None, *, num_inference_steps: int | None = None,
                         call_kwargs: dict[str, Any] | None = None, sample: Callable[[], Any] | None = None,
                         **settings: Any) -> CacheQuantCalibration:
    """Record FP and quantized traces of the calibration runs; the pipeline is left exactly as it was.

    The result makes a plan for any number of computed steps (``calibration.plan(K)``) without sampling
    again, and ``enable_cachequant(pipe, calibration=...)`` re-applies the quantization from the recorded
    activations. ``num_inference_steps`` must be the step count you will sample with (default: the
    pipeline's own). ``sample()``, when given, runs the calibration generations itself (e.g. a front end's
    own call of a pipeline that takes no ``prompt``); it is called once per pass instead of sampling
    ``calibration_prompts`` x ``calibration_seeds``.
    """
    config = make_config(CacheQuantConfig, config, settings)
    if not config.calibration_prompts:
        raise ValueError("CacheQuant needs calibration_prompts (a few prompts like the ones you will generate)")
    module = _single_denoiser(pipe)
    reg = features(pipe)
    for other in ("easycache", FEATURE):
        if other in reg:
            raise ValueError(f"CacheQuant calibration needs every step computed: disable {other} first "
                             f"(pipe.disable_{other}())")
    if "quant" in reg or quant_state(module) is not None:
        raise ValueError("CacheQuant calibrates against the full-precision model: dequantize the pipeline first "
                         "(pipe.dequantize()); enable_cachequant quantizes it itself")
    qconfig = as_config(config.method)
    kwargs = dict(call_kwargs or {})
    fp, q = TraceRecorder(), TraceRecorder()
    run = sample or (lambda: _sample(pipe, config.calibration_prompts, config.calibration_seeds, num_inference_steps,
                                     kwargs))
    recorder = _Hooks(pipe, lambda: CacheQuantHook(pipe, fp))
    try:
        with torch.no_grad():
            with ExitStack() as stack:
                get = stack.enter_context(record_activations(module, max_samples=qconfig.sample_rows))
                run()
            activations = get()
            for hook in recorder.hooks.values():
                hook.cache = q
            quantize_pipeline(pipe, qconfig, calibration=activations)
            try:
                run()
            finally:
                dequantize_pipeline(pipe)
    finally:
        recorder.remove()
    if not fp.runs or len(fp.runs) != len(q.runs):
        raise UnsupportedModelError(f"CacheQuant calibration recorded no denoiser steps on {type(pipe).__name__}")
    cal = CacheQuantCalibration(reference=fp.runs, quantized=q.runs, method=config.method,
                                extra={"activations": activations, "num_inference_steps": num_inference_steps})
    log.info("hasten CacheQuant: calibrated %s (%s) on %d prompt(s) x %d seed(s), %d steps", type(pipe).__name__,
             config.method, len(config.calibration_prompts), len(config.calibration_seeds), cal.num_steps)
    return cal


def enable_cachequant(pipe: Any, config: CacheQuantConfig | None = None, *, plan: CacheQuantPlan | None = None,
                      calibration: CacheQuantCalibration | None = None, num_inference_steps: int | None = None,
                      call_kwargs: dict[str, Any] | None = None, **settings: Any) -> Any:
    """Quantize ``pipe``'s denoiser (``method``) and cache with the schedule chosen for it (CacheQuant).

    Settings as in :class:`~hasten.caches.cachequant.CacheQuantConfig` (``method``, ``num_computed_steps``
    or ``speedup``, ``calibration_prompts``, ``calibration_seeds``, ``reuse``, ``correction``). Pass
    ``calibration`` (from :func:`calibrate_cachequant`) or a ready ``plan`` (both: that plan, and the
    calibration's recorded activations for the quantization) to skip calibrating. Calling it again replaces
    the previous CacheQuant. Returns the pipeline.
    """
    config = make_config(CacheQuantConfig, config, settings)
    _single_denoiser(pipe)
    reg = features(pipe)
    if "easycache" in reg:
        raise ValueError("CacheQuant is a step cache: disable EasyCache first (pipe.disable_easycache()); two step "
                         "caches never stack")
    if FEATURE in reg:
        uninstall(pipe, FEATURE)
    if plan is None:
        if calibration is None:
            calibration = calibrate_cachequant(pipe, config, num_inference_steps=num_inference_steps,
                                               call_kwargs=call_kwargs)
        plan = calibration.plan(config.computed_for(calibration.num_steps), config.reuse, config.correction,
                                config.forced_steps)
    if not isinstance(plan, CacheQuantPlan):
        raise TypeError(f"plan must be a CacheQuantPlan, got {type(plan).__name__}")
    if plan.num_computed < plan.num_steps:
        refuse_fresh_noise_scheduler(pipe, "CacheQuant")
    activations = calibration.extra.get("activations") if calibration is not None else None
    if activations is None and config.calibration_prompts:
        quantize_pipeline(pipe, config.method, calibration_prompts=list(config.calibration_prompts),
                          **dict(call_kwargs or {}))
    else:
        quantize_pipeline(pipe, config.method, calibration=activations)
    quant = features(pipe).get("quant")
    try:
        install(pipe, FEATURE, lambda: CacheQuantFeature(pipe, plan, quant))
    except Exception:
        dequantize_pipeline(pipe)
        raise
    log.info("hasten CacheQuant: %s + schedule %s (%d/%d steps computed, reuse=%s, correction %s, predicted "
             "relative error %.3g)", config.method, plan.timeline(), plan.num_computed, plan.num_steps, plan.reuse,
             "on" if plan.correction is not None else "off", plan.predicted_error)
    return pipe


def disable_cachequant(pipe: Any) -> Any:
    """Remove CacheQuant: the hook goes and the original (unquantized) layers come back. Returns the pipeline."""
    if FEATURE not in features(pipe):
        log.warning("hasten CacheQuant is not enabled on %s; disable_cachequant() did nothing", type(pipe).__name__)
    return uninstall(pipe, FEATURE)


def cachequant_plan(pipe: Any) -> CacheQuantPlan | None:
    """The plan in use on ``pipe`` (None when CacheQuant is off)."""
    feat = features(pipe).get(FEATURE)
    return feat.plan if feat is not None else None
