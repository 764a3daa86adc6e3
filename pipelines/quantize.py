"""diffusers adapter for hasten's quantization: calibrate on real sampling of the user's pipeline, then
hand the denoiser(s) and the recorded statistics to :func:`hasten.quant.quantize_`.

    pipe.quantize(Int8WeightOnlyConfig(), calibration_prompts=["a cat"], steps=4)
    pipe.dequantize()   # the original linear layers are back
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..quant import (
    CalibrationData,
    Int8WeightOnlyConfig,
    QuantConfig,
    QuantReport,
    as_config,
    dequantize_,
    quant_state,
    quantize_,
    record_activations,
)
from ..validation import check_int
from .denoiser import find_denoisers
from .registry import Feature, features

FEATURE = "quant"
log = logging.getLogger("hasten.quant")


class QuantFeature(Feature):
    """Quantized denoiser(s) of one pipeline; removing the feature restores the original layers."""

    name = FEATURE

    def __init__(self, modules: dict[str, torch.nn.Module], reports: dict[str, QuantReport]) -> None:
        self.modules = modules
        self.reports = reports

    def remove(self) -> None:
        for module in self.modules.values():
            dequantize_(module)
        self.reports = {}

    def stats(self) -> dict[str, QuantReport]:
        return dict(self.reports)


# output types tried in turn for calibration runs: no decode first; pipelines that refuse "latent"
# (Kandinsky 2.1, Marigold) get the cheapest they accept, then their default
OUTPUT_TYPES: tuple[str | None, ...] = ("latent", "pt", "np", None)


def _items(calibration_prompts: Any) -> list[str | dict[str, Any]]:
    """The calibration items as a list: one string or dict is ONE item (never split into characters)."""
    if isinstance(calibration_prompts, (str, dict)):
        return [calibration_prompts]
    try:
        items = list(calibration_prompts)
    except TypeError:
        raise TypeError("calibration_prompts must be a prompt string, a dict of call arguments, or a list of "
                        f"them; got {type(calibration_prompts).__name__}") from None
    bad = [i for i in items if not isinstance(i, (str, dict))]
    if bad:
        raise TypeError(f"calibration_prompts items must be prompt strings or dicts of call arguments; got {bad[0]!r}")
    if not items:
        raise ValueError("calibration_prompts must name at least one prompt (or dict of call arguments)")
    return items


def _refuses_output_type(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "output_type" in text or "output type" in text


def calibrate_pipeline(pipe: Any, calibration_prompts: Any, steps: int = 4,
                       components: Sequence[str] | None = None, max_samples: int = 256,
                       **call_kwargs: Any) -> dict[str, CalibrationData]:
    """Run the pipeline on each calibration prompt for ``steps`` steps while recording every denoiser
    linear layer's inputs. An item may be a prompt string or a dict of call arguments (e.g.
    ``{"prompt_embeds": ...}``); ``call_kwargs`` are passed to every call. The runs ask for latent output
    (no decode); a pipeline that refuses it gets "pt", then "np", then its default output type."""
    steps = check_int("calibrate_pipeline", "steps", steps, lo=1)
    items = _items(calibration_prompts)
    mods = _denoisers(pipe, components)
    try:
        params = inspect.signature(pipe.__call__).parameters
        accepts_output_type = "output_type" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        accepts_output_type = True
    explicit = "output_type" in call_kwargs or any(isinstance(i, dict) and "output_type" in i for i in items)
    choices: list[str | None] = [None] if explicit or not accepts_output_type else list(OUTPUT_TYPES)
    with torch.no_grad():
        while True:
            output_type = choices[0]
            with ExitStack() as stack:
                results = {comp: stack.enter_context(record_activations(module, max_samples=max_samples))
                           for comp, module in mods.items()}
                try:
                    for i, item in enumerate(items):
                        kwargs = {"prompt": item} if isinstance(item, str) else dict(item)
                        kwargs.update(call_kwargs)
                        if output_type is not None:
                            kwargs.setdefault("output_type", output_type)
                        kwargs.setdefault("generator", torch.Generator().manual_seed(i))
                        pipe(num_inference_steps=steps, **kwargs)
                except (ValueError, TypeError, NotImplementedError) as exc:
                    if len(choices) == 1 or not _refuses_output_type(exc):
                        raise
                    log.info("hasten.quant: %s refuses output_type=%r for calibration (%s); trying %r",
                             type(pipe).__name__, output_type, exc, choices[1])
                    choices.pop(0)
                    continue  # the recorder of the failed attempt is discarded
            data = {comp: get() for comp, get in results.items()}
            break
    for comp in [c for c, d in data.items() if not len(d)]:
        log.warning("hasten.quant: calibration of %s never ran pipe.%s in %d step(s) (e.g. the low-noise expert "
                    "of a two-expert model, or img2img strength < 1): it is quantized without calibration; "
                    "raise steps to calibrate it", type(pipe).__name__, comp, steps)
        del data[comp]
    log.info("hasten.quant: calibrated %s on %d item(s) x %d steps (output_type=%r)", type(pipe).__name__,
             len(items), steps, output_type)
    return data


def _denoisers(pipe: Any, components: Sequence[str] | None) -> dict[str, torch.nn.Module]:
    mods = find_denoisers(pipe)
    if components is not None:
        unknown = [c for c in components if c not in mods]
        if unknown:
            raise ValueError(f"unknown denoiser component(s) {unknown}; this pipeline has {sorted(mods)}")
        mods = {c: mods[c] for c in components}
    return mods


def quantize_pipeline(pipe: Any, config: QuantConfig | str | None = None,
                      calibration_prompts: Any = None, steps: int = 4,
                      calibration: CalibrationData | dict[str, CalibrationData] | None = None,
                      components: Sequence[str] | None = None, **call_kwargs: Any) -> Any:
    """Quantize ``pipe``'s denoiser(s) with ``config`` (default :class:`Int8WeightOnlyConfig`; a method name
    ``"int8"``, ``"int4"`` or ``"w8a8"`` means that method's default config).

    With ``calibration_prompts``, the pipeline first samples each for ``steps`` steps and the recorded
    activations drive AWQ / smoothing scales and the sensitive-layer selection; ``calibration`` passes
    statistics recorded earlier instead. Calling it again re-quantizes from the original weights.
    Returns the pipeline; reports are in ``pipe.hasten_stats()["quant"]``. If no layer can be quantized
    it raises :class:`~hasten.errors.UnsupportedModelError` and the pipeline is left as it was.
    While quantized, ``save_pretrained`` refuses (use :func:`hasten.save_quantized`).
    """
    config = as_config(config if config is not None else Int8WeightOnlyConfig())
    steps = check_int("quantize", "steps", steps, lo=1)
    if calibration_prompts is not None and calibration is not None:
        raise TypeError("pass either calibration_prompts or calibration, not both")
    if calibration_prompts is not None:
        calibration_prompts = _items(calibration_prompts)
    reg = features(pipe)
    if FEATURE in reg:
        reg.pop(FEATURE).remove()
    mods = _denoisers(pipe, components)
    for comp, module in mods.items():
        if quant_state(module) is not None:
            raise ValueError(f"pipe.{comp} is already quantized outside this pipeline; dequantize_ it first")
    if calibration_prompts is not None:
        calib: dict[str, CalibrationData | None] = dict(
            calibrate_pipeline(pipe, calibration_prompts, steps, list(mods), config.sample_rows, **call_kwargs))
    elif isinstance(calibration, CalibrationData):
        if len(mods) != 1:
            raise ValueError(f"this pipeline has {len(mods)} denoisers {sorted(mods)}: pass calibration as a "
                             "dict by component name")
        calib = {next(iter(mods)): calibration}
    else:
        calib = dict(calibration or {})
    reports = {}
    try:
        for comp, module in mods.items():
            reports[comp] = quantize_(module, config, calibration=calib.get(comp))
    except Exception:
        for module in mods.values():
            dequantize_(module)
        raise
    reg[FEATURE] = QuantFeature(mods, reports)
    return pipe


def dequantize_pipeline(pipe: Any) -> Any:
    """Restore the original (unquantized) denoiser layers of ``pipe`` — also of denoisers quantized
    directly with :func:`hasten.quantize_` or loaded with :func:`hasten.load_quantized`. Returns the pipeline."""
    feat = features(pipe).pop(FEATURE, None)
    done = 0
    if feat is not None:
        feat.remove()
        done += 1
    try:
        mods = find_denoisers(pipe)
    except UnsupportedModelError:
        mods = {}
    for comp, module in mods.items():
        if quant_state(module) is not None:
            dequantize_(module)
            log.info("hasten.quant: pipe.%s dequantized (original layers restored)", comp)
            done += 1
    if not done:
        log.warning("hasten.quant: %s is not quantized; dequantize() did nothing", type(pipe).__name__)
    return pipe
