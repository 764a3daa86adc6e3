"""The demo's logic without a UI: load and cache models, validate a request, run the baseline and up to three
accelerated configurations on the same seed, and measure what each cost and gained.

Everything here is plain Python (tensors, matplotlib figures, bench rows) so it is unit-testable without a
browser; ``web/app.py`` only draws it. The sweep reuses ``hasten bench``'s runner and plot.
"""

from __future__ import annotations

import inspect
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from ..bench.report import pareto_figure
from ..bench.runner import BenchRow, ForwardCounter, run_bench
from ..bench.variants import EASYCACHE_SWEEP, Variant, baseline, hasten_easycache

MAX_CONFIGS = 3
EMBEDDED = "embedded"
EMBEDDED_VIDEO = "embedded-video"  # the moving-digit video model (``hasten.load_embedded("video")``)
MODEL_CHOICES = ((f"{EMBEDDED} (image model: digits)", EMBEDDED),
                 (f"{EMBEDDED_VIDEO} (video model: moving digits)", EMBEDDED_VIDEO))
STEPS_RANGE = (1, 150)
GUIDANCE_RANGE = (0.0, 30.0)
SEED_RANGE = (0, 2**31 - 1)
SIZE_RANGE = (64, 2048)

StepCallback = Callable[[int], None]  # called with the index of the denoising step just finished
Progress = Callable[[float, str], None]  # (fraction done, description)


class ModelLoadError(RuntimeError):
    """A model id / directory could not be loaded (the message says why and what is accepted)."""


class OutOfMemory(RuntimeError):
    """A generation ran out of memory (the message says what to lower)."""


class Cancelled(RuntimeError):
    """The user cancelled the run (Cancel button, or the page was closed); raised between denoising steps."""


@dataclass(frozen=True)
class GenerationRequest:
    """What the user asked for; the same request (and seed) is used for the baseline and every config."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 4.0
    size: int | None = None  # square output side in pixels; None = the model's default
    digit: int | None = None  # the embedded model's prompt is "digit N"
    direction: str | None = None  # the embedded video model's prompt is "digit N moving DIRECTION"


GenerateFn = Callable[[Any, GenerationRequest, list[str], StepCallback | None], torch.Tensor]


def _check_int(name: str, value: Any) -> None:
    """Whole numbers only: 2.5 steps is refused, not rounded (2.0 from a number box is fine)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(f"{name} must be a whole number, got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo:{'d' if isinstance(lo, int) else 'g'}}, "
                         f"{hi:{'d' if isinstance(hi, int) else 'g'}}], got {value}")


@dataclass
class ModelHandle:
    """A loaded pipeline plus how to prompt it; one lock per pipeline so requests never interleave on it."""

    name: str
    pipe: Any
    generate_fn: GenerateFn
    digits: bool = False  # prompts are digits 0..9 (the embedded model): digit accuracy is measured
    default_steps: int = 20
    default_guidance: float = 4.0
    default_size: int | None = None
    size_fixed: bool = False  # the model only makes one size (the embedded model: 32 px)
    size_multiple: int = 16
    directions: tuple[str, ...] = ()  # the video model: prompts "digit N moving DIRECTION" for these
    frames: int | None = None  # outputs are clips of this many frames (B, T, 3, H, W); None: images
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    warm: bool = False  # a first, untimed generation was done (keeps one-off costs out of the timings)

    @property
    def video(self) -> bool:
        return self.frames is not None

    def prompts(self, request: GenerationRequest) -> list[str]:
        if self.directions:
            return [f"digit {int(request.digit)} moving {request.direction}"]
        return [f"digit {int(request.digit)}"] if self.digits else [request.prompt]

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """The request with defaults filled in; ValueError naming the valid range for anything invalid."""
        if self.digits:
            if request.digit is None or not 0 <= int(request.digit) <= 9:
                raise ValueError(f"pick a digit in 0..9 for the embedded model, got {request.digit!r}")
            if self.directions and request.direction not in self.directions:
                raise ValueError(f"pick a direction among {', '.join(self.directions)} for the video model, "
                                 f"got {request.direction!r}")
        elif not (request.prompt or "").strip():
            raise ValueError("the prompt is empty: type what to generate")
        _check_int("steps", request.steps)
        _check_range("steps", request.steps, *STEPS_RANGE)
        _check_range("guidance scale", request.guidance, *GUIDANCE_RANGE)
        _check_int("seed", request.seed)
        _check_range("seed", request.seed, *SEED_RANGE)
        size = request.size
        if self.size_fixed or size is None:
            size = self.default_size
        else:
            _check_range("size", size, *SIZE_RANGE)
            if int(size) % self.size_multiple:
                raise ValueError(f"size must be a multiple of {self.size_multiple} for this model, got {size}")
        return replace(request, steps=int(request.steps), seed=int(request.seed), guidance=float(request.guidance),
                       size=None if size is None else int(size))

    def generate(self, request: GenerationRequest, prompts: list[str] | None = None,
                 on_step: StepCallback | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], clips (B, T, 3, H, W) for a video model; item ``i`` of ``prompts``
        uses seed ``request.seed + i``."""
        if request.size is None and self.default_size is not None:
            request = replace(request, size=self.default_size)
        return self.generate_fn(self.pipe, request, prompts or self.prompts(request), on_step)


# ------------------------------------------------------------------------------------ generation
def _to_images(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        x = result.detach().float().cpu()
        if x.ndim == 5:  # video pipelines: (B, frames, C, H, W); the demo shows the first frame
            x = x[:, 0]
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        return x.clamp(0, 1)
    if isinstance(result, list) and result and isinstance(result[0], list):  # lists of frames
        result = [frames[0] for frames in result]
    return metrics.to_tensor(result).clamp(0, 1)


def diffusers_generate(pipe: Any, request: GenerationRequest, prompts: list[str],
                       on_step: StepCallback | None = None) -> torch.Tensor:
    """Call any diffusers text-to-image / text-to-video pipeline with the request (one frame for video)."""
    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = dict(
        prompt=prompts,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=[torch.Generator("cpu").manual_seed(request.seed + i) for i in range(len(prompts))],
        output_type="pt",
    )
    if "negative_prompt" in params:
        kw["negative_prompt"] = [request.negative_prompt] * len(prompts)
    if request.size is not None:
        kw["height"] = kw["width"] = request.size
    if "num_frames" in params:
        kw["num_frames"] = 1
    if on_step is not None and "callback_on_step_end" in params:
        def callback(_pipe: Any, step: int, _t: Any, callback_kwargs: dict) -> dict:
            on_step(step)
            return callback_kwargs

        kw["callback_on_step_end"] = callback
    out = pipe(**kw)
    frames = getattr(out, "frames", None)
    return _to_images(frames if frames is not None else out.images)


def video_generate(pipe: Any, request: GenerationRequest, prompts: list[str],
                   on_step: StepCallback | None = None) -> torch.Tensor:
    """The embedded video model: clips (B, T, 3, H, W) in [0, 1] of its trained frame count."""
    from ..embedded.video import VIDEO_DEFAULT_FRAMES

    kw: dict[str, Any] = {}
    if on_step is not None:
        def callback(_pipe: Any, step: int, _t: Any, callback_kwargs: dict) -> dict:
            on_step(step)
            return callback_kwargs

        kw["callback_on_step_end"] = callback
    out = pipe(prompt=prompts, negative_prompt=[request.negative_prompt] * len(prompts),
               num_inference_steps=request.steps, guidance_scale=request.guidance, num_frames=VIDEO_DEFAULT_FRAMES,
               height=request.size, width=request.size, output_type="pt",
               generator=[torch.Generator("cpu").manual_seed(request.seed + i) for i in range(len(prompts))], **kw)
    return out.frames.detach().float().cpu().clamp(0, 1)


def embedded_video_handle(pipe: Any = None) -> ModelHandle:
    """The embedded moving-digit video model (loaded from the package when ``pipe`` is None)."""
    from ..embedded.video import (
        DIRECTIONS,
        VIDEO_DEFAULT_FRAMES,
        VIDEO_DEFAULT_GUIDANCE,
        VIDEO_DEFAULT_SIZE,
        VIDEO_DEFAULT_STEPS,
        load_video_embedded,
    )

    if pipe is None:
        pipe = load_video_embedded()
    return ModelHandle(EMBEDDED_VIDEO, pipe, video_generate, digits=True, default_steps=VIDEO_DEFAULT_STEPS,
                       default_guidance=VIDEO_DEFAULT_GUIDANCE, default_size=VIDEO_DEFAULT_SIZE, size_fixed=True,
                       directions=tuple(DIRECTIONS), frames=VIDEO_DEFAULT_FRAMES)


def embedded_handle(pipe: Any = None) -> ModelHandle:
    """The embedded digit model (loaded from the package when ``pipe`` is None)."""
    from ..embedded import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS, load_embedded

    if pipe is None:
        pipe = load_embedded()
    return ModelHandle(EMBEDDED, pipe, diffusers_generate, digits=True, default_steps=DEFAULT_STEPS,
                       default_guidance=DEFAULT_GUIDANCE, default_size=DEFAULT_SIZE, size_fixed=True)


def diffusers_handle(name: str, pipe: Any) -> ModelHandle:
    """A handle for any diffusers pipeline (free prompt, default size from the pipeline's config)."""
    pipe.set_progress_bar_config(disable=True)
    den = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    sample = getattr(getattr(den, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 8
    size = int(sample * scale) if isinstance(sample, int) else 512
    return ModelHandle(name, pipe, diffusers_generate, default_steps=28, default_guidance=4.5,
                       default_size=size, size_multiple=16)


def load_model(name: str, device: str = "cpu") -> ModelHandle:
    """``"embedded"``, ``"embedded-video"``, a local diffusers pipeline directory, or a hub id (needs network / the
    local cache)."""
    name = (name or "").strip()
    if not name:
        raise ModelLoadError("no model given: choose 'embedded', a local diffusers folder or a hub id")
    if name not in (EMBEDDED, EMBEDDED_VIDEO) and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        if not Path(name).expanduser().exists():
            raise ModelLoadError(f"no such folder: {name} (give an existing diffusers pipeline folder, 'embedded' "
                                 "or a hub id such as org/model)")
    try:
        if name == EMBEDDED:
            from ..embedded import load_embedded

            return embedded_handle(load_embedded(device=device))
        if name == EMBEDDED_VIDEO:
            from ..embedded import load_embedded

            return embedded_video_handle(load_embedded("video", device=device))
        from diffusers import DiffusionPipeline

        local = Path(name).expanduser()
        if local.exists() and not (local / "model_index.json").exists():
            raise ModelLoadError(f"{local} has no model_index.json: it is not a diffusers pipeline folder")
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; both accept torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(str(local) if local.exists() else name, torch_dtype=dtype,
                                                     local_files_only=local.exists())
        return diffusers_handle(name, pipe.to(device))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one readable message
        if name not in (EMBEDDED, EMBEDDED_VIDEO) and not Path(name).expanduser().exists():
            raise ModelLoadError(_not_available(name, exc)) from exc
        raise ModelLoadError(f"could not load {name!r}: {type(exc).__name__}: {exc}".strip()) from exc


def _not_available(name: str, exc: BaseException) -> str:
    """The message for a hub id that is neither a local folder nor in the local cache (the demo never downloads:
    diffusers' own hint, ``local_files_only=False``, is something the page cannot do)."""
    detail = str(exc).split("\n")[0]
    if "local_files_only" in detail or "offline" in detail.lower() or "connect" in detail.lower():
        detail = type(exc).__name__
    return (f"{name!r} is not available offline: it is not a local folder and not in the local Hugging Face cache. "
            f"On a machine with network, run `huggingface-cli download {name} --local-dir <folder>` (or "
            f"DiffusionPipeline.from_pretrained(...).save_pretrained(<folder>)), then enter that folder's path here "
            f"({detail}).")


class ModelCache:
    """Pipelines are loaded once per name and kept; ``factory(name)`` returns a ModelHandle or a pipeline."""

    def __init__(self, factory: Callable[[str], Any] | None = None, device: str = "cpu") -> None:
        self._factory = factory if factory is not None else (lambda name: load_model(name, device))
        self._models: dict[str, ModelHandle] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ModelHandle:
        name = (name or "").strip() or EMBEDDED
        with self._lock:
            if name not in self._models:
                try:
                    made = self._factory(name)
                except ModelLoadError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise ModelLoadError(f"could not load {name!r}: {type(exc).__name__}: {exc}") from exc
                self._models[name] = made if isinstance(made, ModelHandle) else diffusers_handle(name, made)
            return self._models[name]

    def loaded(self) -> list[str]:
        return list(self._models)


# ------------------------------------------------------------------------------------ comparison
@dataclass
class RunResult:
    """One configuration's output and figures (quality against the same-seed baseline)."""

    name: str
    image: torch.Tensor | None = None  # (3, H, W) in [0, 1]; a video model's clip: (T, 3, H, W)
    seconds: float | None = None
    forwards: float | None = None  # denoiser forwards (full-forward equivalents, cond + uncond)
    speedup: float | None = None  # median over repeats of baseline time / this time (same round)
    speedup_range: tuple[float, float] | None = None  # (min, max) of those per-round ratios
    speedups: list[float] = field(default_factory=list)  # every round's ratio
    psnr: float | None = None
    ssim: float | None = None
    digit_read: int | None = None  # what the digit classifier reads (embedded model only)
    digit_ok: bool | None = None
    motion_read: str | None = None  # video: the way the digit's centroid moved ("left" .. "down", or "still")
    motion_ok: bool | None = None
    # branch -> share of the denoiser computed per step: 1 computed, 0 reused (step caches), blocks ran / blocks
    timeline: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Comparison:
    model: str
    request: GenerationRequest
    runs: list[RunResult]

    @property
    def baseline(self) -> RunResult:
        return self.runs[0]


def _denoiser(pipe: Any) -> torch.nn.Module | None:
    for attr in ("transformer", "unet"):
        mod = getattr(pipe, attr, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def _timeline(pipe: Any) -> dict[str, list[float]]:
    """Per-branch, per-call share of the denoiser that ran, for every enabled feature that records it: step
    caches' decisions (``RunStats.branches``: 1 computed, 0 reused) and block caches' share of blocks computed
    (``BlockRunStats.branches``: 1 - reused / blocks)."""
    from ..pipelines import stats

    out: dict[str, list[float]] = {}
    for feature, comps in stats(pipe).items():
        if not isinstance(comps, dict):
            continue
        many = len(comps) > 1
        for comp, st in comps.items():
            for label, branch in (getattr(st, "branches", None) or {}).items():
                key = f"{feature}/{comp}/{label}" if many else f"{feature}/{label}"
                if hasattr(branch, "decisions"):
                    out[key] = [float(bool(d)) for d in branch.decisions]
                elif hasattr(branch, "reused_per_call") and getattr(branch, "num_blocks", 0):
                    out[key] = [1.0 - r / branch.num_blocks for r in branch.reused_per_call]
    return out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def _oom(request: GenerationRequest) -> OutOfMemory:
    size = f"{request.size} px, " if request.size else ""
    return OutOfMemory(f"out of memory at {size}{request.steps} steps: lower the size, use fewer "
                       "configurations, or pick a smaller model")


def run_comparison(handle: ModelHandle, request: GenerationRequest, configs: Sequence[Variant],
                   on_progress: Progress | None = None, repeats: int = 1,
                   should_stop: Callable[[], bool] | None = None) -> Comparison:
    """Generate the baseline and each config on the same seed; every config is removed again afterwards.

    With ``repeats`` > 1 the runs are interleaved (base A B base A B ...) and the median wall time is shown;
    images, forwards and timelines come from the first round. The speed-up is the median of the per-round
    ratios (baseline / config in the same round) with their min-max: on a shared machine one number misleads.
    A config that fails (unsupported model, bad setting) gets its error in its row; the others still run. Out
    of memory raises :class:`OutOfMemory`; invalid input raises ValueError. ``should_stop()`` is asked after
    every denoising step: when it says True the run stops there (:class:`Cancelled`), the configuration is
    removed and the pipeline's lock released.
    """
    request = handle.validate(request)
    if len(configs) > MAX_CONFIGS:
        raise ValueError(f"at most {MAX_CONFIGS} accelerated configurations, got {len(configs)}")
    _check_range("timing repeats", repeats, 1, 10)
    variants = [baseline(), *configs]
    total = int(repeats) * len(variants) * request.steps
    runs = [RunResult(v.name, error=v.unavailable) for v in variants]
    times: list[list[float]] = [[] for _ in variants]
    with handle.lock:
        pipe = handle.pipe
        den = _denoiser(pipe)
        try:
            if not handle.warm:  # one short untimed run: lazy inits must not be billed to the baseline
                if on_progress:
                    on_progress(0.0, "warming up the model")
                handle.generate(replace(request, steps=min(2, request.steps)))
                handle.warm = True
        except Exception as exc:
            if _is_oom(exc):
                raise _oom(request) from exc
            raise
        for v, res in zip(variants, runs):  # one-off calibration (e.g. quantization), outside the timing
            if v.prepare is not None and not res.error:
                if on_progress:
                    on_progress(0.0, f"preparing {v.name} (one-off calibration, not timed)")
                try:
                    v.prepare(pipe, lambda: handle.generate(request))
                except Exception as exc:  # noqa: BLE001
                    res.error = f"calibration failed: {type(exc).__name__}: {exc}"
        counter = ForwardCounter(den) if den is not None else None
        try:
            for rep in range(int(repeats)):
                for k, (v, res) in enumerate(zip(variants, runs)):
                    if res.error:
                        continue
                    done = (rep * len(variants) + k) * request.steps
                    tag = f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""

                    def on_step(step: int, done: int = done, name: str = v.name, tag: str = tag) -> None:
                        if should_stop is not None and should_stop():
                            raise Cancelled(f"cancelled at {name}, step {step + 1}/{request.steps}{tag}")
                        if on_progress:
                            on_progress((done + step + 1) / total, f"{name}: step {step + 1}/{request.steps}{tag}")

                    try:
                        v.apply(pipe)
                        if counter is not None:
                            counter.take()
                        t0 = time.perf_counter()
                        img = handle.generate(request, on_step=on_step)
                        times[k].append(time.perf_counter() - t0)
                        if rep == 0:
                            res.image = img[0]
                            res.forwards = counter.take() if counter is not None else None
                            res.timeline = _timeline(pipe)
                    except Exception as exc:  # noqa: BLE001 - one config failing must not sink the others
                        if isinstance(exc, Cancelled):
                            raise
                        if _is_oom(exc):
                            raise _oom(request) from exc
                        if k == 0:
                            raise
                        res.error = f"{type(exc).__name__}: {exc}"
                    finally:
                        try:
                            v.remove(pipe)
                        except Exception as exc:  # noqa: BLE001
                            res.error = res.error or f"could not remove {v.name}: {exc}"
        finally:
            if counter is not None:
                counter.remove()
    for res, ts in zip(runs, times):
        res.seconds = statistics.median(ts) if ts and res.image is not None else None
        if res.image is not None and times[0] and len(ts) == len(times[0]):
            res.speedups = [b / t for b, t in zip(times[0], ts) if t > 0]
    if on_progress:
        on_progress(1.0, "measuring quality (the first run also fits the digit classifier)" if handle.digits
                    else "measuring quality")
    _score(handle, request, runs)
    return Comparison(handle.name, request, runs)


_CLASSIFIER_LOCK = threading.Lock()


def digit_classifier() -> metrics.DigitClassifier:
    """The metrics module's digit classifier, fitted once even when requests (or a warm-up thread) race."""
    with _CLASSIFIER_LOCK:
        return metrics.digit_classifier()


def _clip_as_image(x: torch.Tensor) -> torch.Tensor:
    """A clip (T, C, H, W) as one image (1, C, T*H, W): PSNR over the whole clip, as ``hasten bench`` reports it."""
    t, c, h, w = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, c, t * h, w)


def direction_of(displacement: Sequence[float], size: int) -> str:
    """Which way a clip's digit moved: the larger component of its centroid's (dx, dy) displacement in pixels,
    or "still" below a quarter of the trained travel (the rule of ``score_videos``' motion accuracy)."""
    from ..embedded.video_data import TRAVEL

    dx, dy = float(displacement[0]), float(displacement[1])
    if max(abs(dx), abs(dy)) <= 0.25 * TRAVEL * size:
        return "still"
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _score_clips(request: GenerationRequest, runs: list[RunResult]) -> None:
    """Per clip: the digit the classifier reads (majority over frames) and the way the digit moved."""
    from ..embedded.video import score_videos

    clips = torch.stack([r.image for r in runs])
    n = len(runs)
    scores = score_videos(clips, [int(request.digit)] * n, [str(request.direction)] * n)
    for r, pred, disp in zip(runs, scores["clip_predictions"], scores["displacement_px"]):
        r.digit_read = int(pred)
        r.digit_ok = r.digit_read == int(request.digit)
        r.motion_read = direction_of(disp, int(clips.shape[-1]))
        r.motion_ok = r.motion_read == request.direction


def _score(handle: ModelHandle, request: GenerationRequest, runs: list[RunResult]) -> None:
    """Speed-up, PSNR and SSIM against the baseline; the digit the classifier reads (embedded models) and, for
    clips, the way the digit moves. Clips: PSNR over the whole clip, SSIM per frame (as ``hasten bench``)."""
    base = runs[0]
    for r in runs:
        if r.image is None:
            continue
        if r.speedups:
            r.speedup = statistics.median(r.speedups)
            r.speedup_range = (min(r.speedups), max(r.speedups))
        elif base.seconds and r.seconds:
            r.speedup = base.seconds / r.seconds
        if r is not base and base.image is not None:
            clip = r.image.ndim == 4
            r.psnr = metrics.psnr(_clip_as_image(r.image) if clip else r.image,
                                  _clip_as_image(base.image) if clip else base.image)
            r.ssim = metrics.ssim(r.image, base.image)
    if handle.digits:
        ok = [r for r in runs if r.image is not None]
        if ok and handle.video:
            _score_clips(request, ok)
        elif ok:
            preds = digit_classifier().predict(torch.stack([r.image for r in ok]))
            for r, p in zip(ok, preds.tolist()):
                r.digit_read = int(p)
                r.digit_ok = r.digit_read == int(request.digit) if request.digit is not None else None


TABLE_HEADERS = ["configuration", "wall s (median)", "speed-up (median, min-max)", "denoiser forwards", "PSNR dB",
                 "SSIM", "digit read"]
MOTION_HEADER = "moves"  # the video model's extra column


def _fmt(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf (identical)"
    return fmt.format(value)


def metrics_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (strings) for the metrics table; the digit column only for the embedded models, the
    motion column ("moves left") only for the video model. Clips: PSNR over the clip, SSIM per frame."""
    digits = any(r.digit_read is not None for r in comparison.runs)
    motion = any(r.motion_read is not None for r in comparison.runs)
    headers = (TABLE_HEADERS if digits else TABLE_HEADERS[:-1]) + ([MOTION_HEADER] if motion else [])
    rows = []
    for r in comparison.runs:
        if r.error and r.image is None:
            rows.append([r.name, f"failed: {r.error}"] + ["-"] * (len(headers) - 2))
            continue
        row = [r.name, _fmt(r.seconds, "{:.3f}"), _speedup_text(r), _fmt(r.forwards, "{:g}"),
               _fmt(r.psnr, "{:.2f}"), _fmt(r.ssim, "{:.4f}")]
        if digits:
            # one image: what it reads as, never a 0%/100% "accuracy" (accuracy is for sets: the Sweep tab)
            row.append("-" if r.digit_read is None else f"reads as {r.digit_read}")
        if motion:
            row.append("-" if r.motion_read is None else f"moves {r.motion_read}")
        rows.append(row)
    return headers, rows


def _speedup_text(r: RunResult) -> str:
    """``1.52x (1.39-2.15)``: the median and the min-max of the per-round ratios (the note gives the rounds)."""
    if r.speedup is None:
        return "-"
    if r.speedup_range is None or len(r.speedups) < 2 or r.speedup_range[0] == r.speedup_range[1]:
        return f"{r.speedup:.2f}x"
    lo, hi = r.speedup_range
    return f"{r.speedup:.2f}x ({lo:.2f}-{hi:.2f})"


def timeline_figure(comparison: Comparison):
    """Per-step plot: one row per configuration branch, a filled cell where the denoiser computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch

    steps = comparison.request.steps
    labels: list[str] = ["baseline (every branch)"]
    grid: list[list[float]] = [[1.0] * steps]
    for r in comparison.runs[1:]:
        if r.image is None:
            continue
        if not r.timeline:
            labels.append(f"{r.name} (no per-step record)")
            grid.append([math.nan] * steps)
            continue
        for branch, decisions in r.timeline.items():
            row = [float(d) for d in decisions[:steps]] + [math.nan] * max(0, steps - len(decisions))
            feature = branch.split("/")[0]
            labels.append(f"{r.name.split(':')[0]} {feature} {branch.split('/')[-1]}  "
                          f"{sum(decisions):.3g}/{len(decisions)}")
            grid.append(row)
    data = torch.tensor(grid).numpy()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.3))
    # 1 = computed, 0 = reused; block caches colour a step by the share of its blocks that ran
    cmap = LinearSegmentedColormap.from_list("hasten", ["#f4c7a1", "#2e7d32"]).with_extremes(bad="white")
    ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(steps), [str(i + 1) for i in range(steps)], fontsize=7)
    ax.set_xticks([x - 0.5 for x in range(1, steps)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(labels))], minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("denoising step")
    ax.set_title("which steps ran the denoiser (per branch)", fontsize=10, loc="left")
    ax.legend(handles=[Patch(color="#2e7d32", label="computed"), Patch(color="#91a86a", label="some blocks reused"),
                       Patch(color="#f4c7a1", label="reused (cached)")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def display_image(image: torch.Tensor, min_side: int = 256):
    """A PIL image, nearest-neighbour upscaled so tiny outputs (32 px digits) are visible."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if arr.shape[0] == 1:
        arr = arr.repeat(3, 1, 1)
    pil = Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    scale = max(1, math.ceil(min_side / max(1, min(pil.size))))
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def _frames_pil(clip: torch.Tensor, min_side: int) -> list:
    return [display_image(frame, min_side) for frame in clip]


CLIP_FPS = 8  # the clips play at 8 frames per second (17 frames: about 2 s, looping)


def display_clip(clip: torch.Tensor, min_side: int = 256, folder: str | Path | None = None) -> str:
    """A clip (T, 3, H, W) in [0, 1] as a looping animated GIF file, nearest-neighbour upscaled like
    :func:`display_image` so 32 px frames are visible; returns its path (in the temp folder gradio serves)."""
    import tempfile

    frames = _frames_pil(clip, min_side)
    fd, path = tempfile.mkstemp(prefix="hasten-clip-", suffix=".gif", dir=folder)
    with open(fd, "wb") as fh:
        frames[0].save(fh, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // CLIP_FPS, loop=0,
                       optimize=False, disposal=1)
    return path


def filmstrip(clip: torch.Tensor, every: int = 4, min_side: int = 128):
    """Every ``every``-th frame of a clip (and the last) side by side, upscaled: a still for the before/after slider."""
    from PIL import Image

    idx = sorted(set(range(0, len(clip), every)) | {len(clip) - 1})
    frames = _frames_pil(clip[idx], min_side)
    w, h = frames[0].size
    strip = Image.new("RGB", (len(frames) * w + (len(frames) - 1) * 4, h), (255, 255, 255))
    for i, f in enumerate(frames):
        strip.paste(f, (i * (w + 4), 0))
    return strip


# ----------------------------------------------------------------------------------------- sweep
def parse_thresholds(text: str) -> list[float]:
    """``"0.05, 0.1 0.2"`` -> [0.05, 0.1, 0.2]; ValueError for anything that is not 1-8 numbers in (0, 1]."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"thresholds must be numbers separated by commas, got {text!r}") from None
    if not 1 <= len(vals) <= 8:
        raise ValueError(f"give between 1 and 8 thresholds, got {len(vals)}")
    for v in vals:
        _check_range("each threshold", v, 1e-6, 1.0)
    return sorted(set(vals))


DEFAULT_SWEEP = ", ".join(f"{t:g}" for t in EASYCACHE_SWEEP)


def run_sweep(handle: ModelHandle, request: GenerationRequest, thresholds: Sequence[float], repeats: int = 1,
              on_progress: Progress | None = None) -> list[BenchRow]:
    """EasyCache threshold sweep through ``hasten bench``'s runner (interleaved timing, same metrics).

    The embedded model generates all ten digits per run (digit accuracy and Fréchet distance too); the video
    model the chosen digit moving each way (digit, clip and motion accuracy); other models the prompt once.
    """
    request = handle.validate(request)
    _check_range("repeats", repeats, 1, 10)
    variants = [baseline(), *[hasten_easycache(float(t)) for t in thresholds]]
    score = None
    if handle.directions:
        from ..bench.runner import video_scorer

        digits = None
        prompts = [f"digit {int(request.digit)} moving {d}" for d in handle.directions]
        score = video_scorer([int(request.digit)] * len(prompts), list(handle.directions))
    else:
        digits = list(range(10)) if handle.digits else None
        prompts = [f"digit {d}" for d in digits] if digits else handle.prompts(request)

    def generate(_pipe: Any, seed: int) -> torch.Tensor:
        return handle.generate(replace(request, seed=seed), prompts)

    with handle.lock:
        try:
            if not handle.warm:
                handle.generate(replace(request, steps=min(2, request.steps)))
                handle.warm = True
            return run_bench(handle.pipe, variants, generate, seeds=[request.seed], targets=digits,
                             repeats=int(repeats), progress=False, on_progress=on_progress, score=score)
        except Exception as exc:
            if _is_oom(exc):
                raise _oom(request) from exc
            raise


def sweep_figure(rows: Sequence[BenchRow], handle: ModelHandle, request: GenerationRequest):
    return pareto_figure(rows, f"{handle.name}: EasyCache sweep, {request.steps} steps, CFG {request.guidance:g}")
