"""Preset files: the stack ``hasten tune`` chose, as JSON, and :func:`apply` to switch it on.

Format (``format`` 1)::

    {"format": 1, "hasten_version": "0.1.0", "model": "image" | "video", "model_name": "...",
     "features": {"timestep_schedule": {"steps": 9, "shift": 1.3}, "easycache": {"threshold": 0.1}, ...},
     "calibration_prompts": ["digit 0", ...],          # for quantization, if chosen
     "objective": {...}, "measured": {...}}             # informative: what was measured, on what

Only ``format``, ``features`` and ``model`` drive :func:`apply`; a preset tuned on a video model is refused
on an image pipeline and vice versa (its schedule, cache thresholds and floors were measured on the other
kind of output). Every feature's settings are checked by building
that family's own config before anything is enabled, and an unknown feature is an error naming the
known ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .space import SPACE, Context, entries

FORMAT = 1
logger = logging.getLogger("hasten.tune")


class PresetError(ValueError):
    """A preset file or dict that cannot be applied (the pipeline is left as it was)."""


def load_preset(preset: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Read (a path or JSON text) and validate a preset; returns the dict."""
    if isinstance(preset, dict):
        data = preset
    else:
        text = str(preset)
        if text.lstrip().startswith("{"):
            source = "preset JSON"
        else:
            path = Path(preset)
            if not path.is_file():
                raise FileNotFoundError(f"no preset file at {path}")
            text, source = path.read_text(encoding="utf-8"), str(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PresetError(f"{source} is not valid JSON: {exc}") from None
    validate_preset(data)
    return data


def validate_preset(data: Any) -> None:
    """Raise :class:`PresetError` unless ``data`` is an applicable preset (format, features, settings)."""
    if not isinstance(data, dict):
        raise PresetError(f"a preset is a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise PresetError(f"unsupported preset format {data.get('format')!r} (this hasten reads format {FORMAT})")
    feats = data.get("features")
    if not isinstance(feats, dict):
        raise PresetError("a preset needs a 'features' object (feature name -> settings)")
    unknown = [n for n in feats if n not in SPACE]
    if unknown:
        raise PresetError(f"unknown feature(s) in preset: {', '.join(map(str, unknown))}; known: {', '.join(SPACE)}")
    if "timestep_schedule" in feats and "bottleneck_sampling" in feats:
        raise PresetError("timestep_schedule and bottleneck_sampling both patch the scheduler: use one")
    for name, settings in feats.items():
        if not isinstance(settings, dict):
            raise PresetError(f"settings of {name} must be an object, got {type(settings).__name__}")
        try:
            SPACE[name].validate(settings)
        except (TypeError, ValueError) as exc:
            raise PresetError(f"bad settings for {name}: {exc}") from None
    prompts = data.get("calibration_prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PresetError("calibration_prompts must be a list of strings")
    if "model" in data and not isinstance(data["model"], str):
        raise PresetError(f"model must be a string ('image' or 'video'), got {data['model']!r}")


def enable_features(pipe: Any, features: dict[str, dict[str, Any]], ctx: Context | None = None) -> list[str]:
    """Enable ``features`` on ``pipe`` in the registry's order; all or nothing. Returns the names enabled."""
    ctx = ctx or Context()
    done: list[str] = []
    try:
        for entry in entries(list(features)):
            entry.enable(pipe, dict(features[entry.name]), ctx)
            done.append(entry.name)
    except BaseException:
        disable_features(pipe, done)
        raise
    return done


def disable_features(pipe: Any, names: list[str]) -> None:
    """Disable ``names`` (reverse order); every one is tried, the first error is raised after."""
    errors = []
    for name in reversed(names):
        try:
            SPACE[name].disable(pipe)
        except Exception as exc:  # noqa: BLE001 - keep removing the others
            errors.append(exc)
    if errors:
        raise errors[0]


MODEL_KINDS = ("image", "video")
_VIDEO_PIPELINES = ("Wan", "LTX", "CogVideoX", "HunyuanVideo", "Mochi", "Allegro", "Latte", "AnimateDiff",
                    "SkyReels", "StableVideo", "TextToVideo", "VideoToVideo", "I2VGen", "Cosmos")


def pipeline_kind(pipe: Any) -> str:
    """"video" or "image": what ``pipe`` generates by default (its ``call_defaults``' ``num_frames`` when it has
    them, as the embedded models do, else its class name)."""
    frames = (getattr(pipe, "call_defaults", None) or {}).get("num_frames")
    if frames is not None:
        return "video" if int(frames) > 1 else "image"
    name = type(pipe).__name__
    return "video" if "Video" in name or name.startswith(_VIDEO_PIPELINES) else "image"


def _check_model(pipe: Any, data: dict[str, Any]) -> None:
    """Refuse a preset tuned on the other kind of model (``data["model"]`` "image" / "video"; older presets
    with a free-text ``model`` are not checked)."""
    tuned = data.get("model")
    if tuned not in MODEL_KINDS:
        return
    kind = pipeline_kind(pipe)
    if kind != tuned:
        raise PresetError(
            f"this preset was tuned on a {tuned} model ({data.get('model_name', 'unnamed')}) but "
            f"{type(pipe).__name__} makes {kind}s: its settings (timestep schedule, cache thresholds, stages) and "
            f"measured quality do not carry over; run `hasten tune{' --model video' if kind == 'video' else ''}` "
            f"on this model, or pass check_model=False to apply it anyway")


def apply(pipe: Any, preset: str | Path | dict[str, Any], *, check_model: bool = True) -> Any:
    """Enable the stack of a preset (a ``hasten tune`` JSON file, its text, or its dict) on ``pipe``.

    The file is validated first (format, known features, every setting through its family's config); a
    bad file raises :class:`PresetError` (a ``ValueError``) and a missing one ``FileNotFoundError``, with
    the pipeline untouched; so does a preset tuned on the other kind of model (image vs video) unless
    ``check_model=False``. Features already on are replaced by the preset's. Returns the pipeline.
    """
    data = load_preset(preset)
    from ..pipelines.registry import features as enabled

    enabled(pipe)  # refuses a non-pipeline (UnsupportedModelError) before anything is changed
    if check_model:
        _check_model(pipe, data)
    names = enable_features(pipe, data["features"], Context(list(data.get("calibration_prompts", []))))
    logger.info("hasten preset: enabled %s", ", ".join(names) or "nothing (the preset is the baseline)")
    return pipe


def save_preset(data: dict[str, Any], path: str | Path) -> Path:
    """Validate and write a preset as indented JSON."""
    validate_preset(data)
    p = Path(path)
    p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return p


def find_presets(where: str | Path | None = None) -> list[str]:
    """Preset files the demo can offer: ``HASTEN_PRESETS`` (files or folders, ``os.pathsep``-separated) or,
    without it, ``./tune-results/*.json`` and ``./*.json``; only files that validate are listed."""
    import os

    spec = str(where) if where is not None else os.environ.get("HASTEN_PRESETS")
    roots = [Path(s) for s in spec.split(os.pathsep) if s] if spec else [Path("tune-results"), Path(".")]
    found: list[str] = []
    for root in roots:
        files = [root] if root.is_file() else sorted(root.glob("*.json")) if root.is_dir() else []
        for f in files:
            try:
                load_preset(f)
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            if str(f) not in found:
                found.append(str(f))
    return found


def preset_variant(preset: str | Path | dict[str, Any]) -> Any:
    """A bench/demo ``Variant`` that applies a preset and removes exactly what it enabled."""
    from ..bench.variants import Variant

    data = load_preset(preset)
    label = Path(str(preset)).stem if not isinstance(preset, dict) else "preset"
    enabled: list[str] = []

    def on(pipe: Any) -> None:
        _check_model(pipe, data)
        enabled[:] = enable_features(pipe, data["features"], Context(list(data.get("calibration_prompts", []))))

    def off(pipe: Any) -> None:
        disable_features(pipe, list(enabled))
        enabled.clear()

    return Variant(f"hasten-preset:{label}", "hasten", on, off, {"features": data["features"]})
