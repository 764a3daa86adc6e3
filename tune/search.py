"""``hasten.tune``: search the accelerator stack for the fastest one that keeps a quality floor (or the best
quality at a speed target), with optuna's TPE sampler and constraints.

How a trial is measured (the choice, and why):

* **Quality** against the baseline of the same prompts and seeds (PSNR, SSIM, and digit accuracy when
  ``targets`` are given), the baseline generated once and cached.
* **Speed during the search: process CPU time** of the trial's generation, single-threaded, over the
  baseline's (re-timed every few trials, the median kept; the process's first, cold generation is not
  kept). On a shared box wall-clock swings by 2x with other people's load, which would steer the search by
  noise; CPU time of our own process moves far less, yet unlike a forward count it still sees every real
  cost (a quantized layer's dequantize, the scheduler and VAE, the skipped uncond rows). It still moves by
  8-20 % per sample, more than one forward in twelve, so a trial that could be the answer (meets the floors,
  within ``retime_tol`` of the best) is timed ``speed_samples`` times and ranked by the median.
* **The reported speed-up is wall-clock**: the chosen stack is re-checked on held-out seeds (and
  prompts, if given) not used in the search, then timed against the baseline interleaved with
  ``hasten bench``'s runner (median of repeats), optionally next to hand-set single accelerators.

The search stops at ``budget_minutes`` or ``n_trials``; Ctrl-C (``KeyboardInterrupt``) stops it too and the
best found so far is kept (its held-out check is skipped then, and the result says so).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .. import metrics
from .preset import FORMAT, disable_features, enable_features
from .space import Context, entries, exclusive

logger = logging.getLogger("hasten.tune")


@dataclass
class Trial:
    """One configuration tried in the search (figures on the calibration prompts/seeds)."""

    number: int
    features: dict[str, dict[str, Any]]
    speedup: float | None = None  # baseline CPU time / this CPU time
    cpu_s: float | None = None
    forwards_per_image: float | None = None
    psnr: float | None = None
    psnr_worst: float | None = None  # the lowest per-image (per-clip) PSNR of the calibration set
    ssim: float | None = None
    accuracy: float | None = None  # digit accuracy (per frame on videos)
    motion_accuracy: float | None = None  # videos: clips whose digit moves the prompted way
    feasible: bool = False
    error: str | None = None
    outputs: int | None = None  # images / clips the quality figures cover
    confirmed: bool | None = None  # screening: False = judged on the screen prompts only (not promoted)
    cpu_samples: list[float] | None = None  # a contender's CPU times (cpu_s is their median)


@dataclass
class TuneResult:
    """What :func:`tune` found: the chosen stack, every trial, and the held-out measurement."""

    preset: dict[str, Any]
    best: Trial | None
    trials: list[Trial]
    search_seconds: float
    interrupted: bool = False
    held_out: dict[str, Any] | None = None  # measured figures of the chosen stack on held-out prompts/seeds
    compared: list[dict[str, Any]] = field(default_factory=list)  # bench rows measured next to it

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return self.preset["features"]

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "best": asdict(self.best) if self.best else None,
                "trials": [asdict(t) for t in self.trials], "search_seconds": self.search_seconds,
                "interrupted": self.interrupted, "held_out": self.held_out, "compared": self.compared}


@dataclass(frozen=True)
class Objective:
    """Quality floors (maximise speed) or a speed target (maximise PSNR). ``min_psnr`` bounds the mean over the
    images / clips, ``min_worst_psnr`` every single one (a collapsed output the mean hides)."""

    min_psnr: float | None = None
    min_ssim: float | None = None
    min_digit_accuracy: float | None = None
    speedup: float | None = None
    min_motion_accuracy: float | None = None  # videos: share of clips moving the prompted way
    min_worst_psnr: float | None = None

    def _floors(self) -> tuple[float | None, ...]:
        return self.min_psnr, self.min_ssim, self.min_digit_accuracy, self.min_motion_accuracy, self.min_worst_psnr

    def __post_init__(self) -> None:
        if self.speedup is None and all(f is None for f in self._floors()):
            raise ValueError("tune needs an objective: a quality floor (min_psnr / min_worst_psnr / min_ssim / "
                             "min_digit_accuracy) or a speed target (speedup)")
        if self.speedup is not None and (not math.isfinite(self.speedup) or self.speedup <= 1.0):
            raise ValueError(f"speedup must be a number > 1, got {self.speedup!r}")
        if self.min_ssim is not None and not 0 < self.min_ssim <= 1:
            raise ValueError(f"min_ssim must be in (0, 1], got {self.min_ssim!r}")
        if self.min_digit_accuracy is not None and not 0 < self.min_digit_accuracy <= 1:
            raise ValueError(f"min_digit_accuracy must be in (0, 1], got {self.min_digit_accuracy!r}")
        if self.min_motion_accuracy is not None and not 0 < self.min_motion_accuracy <= 1:
            raise ValueError(f"min_motion_accuracy must be in (0, 1], got {self.min_motion_accuracy!r}")

    def quality(self) -> Objective | None:
        """The quality floors alone (None without any): what a held-out check must meet."""
        if all(f is None for f in self._floors()):
            return None
        return Objective(self.min_psnr, self.min_ssim, self.min_digit_accuracy, None, self.min_motion_accuracy,
                         self.min_worst_psnr)

    def violations(self, t: Trial | dict[str, Any], margin: float = 0.0) -> list[float]:
        """Constraint values (<= 0 means met), optuna's convention. ``margin`` raises the mean PSNR floor only:
        a worst-item floor is already the strictest reading of one set."""
        g = (lambda k: getattr(t, k)) if isinstance(t, Trial) else t.get
        out = []
        if self.min_psnr is not None:
            out.append(self.min_psnr + margin - _num(g("psnr")))
        if self.min_worst_psnr is not None:
            out.append(self.min_worst_psnr - _num(g("psnr_worst")))
        if self.min_ssim is not None:
            out.append(self.min_ssim - _num(g("ssim")))
        if self.min_digit_accuracy is not None:
            out.append(self.min_digit_accuracy - _num(g("accuracy")))
        if self.min_motion_accuracy is not None:
            out.append(self.min_motion_accuracy - _num(g("motion_accuracy")))
        if self.speedup is not None:
            out.append(self.speedup - _num(g("speedup")))
        return out

    def promising(self, t: Trial, margin: float, slack: float) -> bool:
        """Whether a trial measured on the screen prompts may still meet the floors on them all: its mean PSNR
        within ``slack`` dB of the floor (+ ``margin``), as a few prompts' mean can be that far off the set's,
        and its worst item above the worst-item floor (a subset's worst bounds the set's from above)."""
        if self.min_psnr is not None and _num(t.psnr) < self.min_psnr + margin - slack:
            return False
        return self.min_worst_psnr is None or _num(t.psnr_worst) >= self.min_worst_psnr

    def met(self, t: Trial | dict[str, Any], margin: float = 0.0) -> bool:
        return all(v <= 0 for v in self.violations(t, margin))

    def score(self, t: Trial) -> float:
        """What the search maximises among feasible trials."""
        if self.speedup is not None:
            return min(_num(t.psnr), 99.0)
        return _num(t.speedup)


def _num(v: Any) -> float:
    if v is None:
        return -math.inf
    return 1e9 if math.isinf(v) and v > 0 else float(v)


Generate = Callable[[Any, Sequence[str], int], torch.Tensor]


def default_generate(call_kwargs: dict[str, Any] | None = None) -> Generate:
    """``generate(pipe, prompts, seed)`` -> images (N,3,H,W) or clips (N,T,3,H,W) in [0,1]; output i seeded
    ``seed + i`` (a video pipeline's one-frame output is an image)."""
    kwargs = dict(call_kwargs or {})

    def generate(pipe: Any, prompts: Sequence[str], seed: int) -> torch.Tensor:
        gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
        out = pipe(prompt=list(prompts), generator=gens, output_type="pt", **kwargs)
        imgs = getattr(out, "frames", None)
        if imgs is None:
            imgs = out.images
        imgs = torch.as_tensor(imgs).float().cpu()
        return imgs.flatten(0, 1) if imgs.ndim == 5 and imgs.shape[1] == 1 else imgs

    return generate


_VIDEO_PROMPT = re.compile(r"^\s*digit\s+(\d)\s+moving\s+(left|right|up|down)\s*$")


def video_targets(prompts: Sequence[str]) -> tuple[list[int], list[str]] | None:
    """(digits, directions) of embedded-video prompts ``"digit N moving D"``; None unless every prompt is one."""
    found = [_VIDEO_PROMPT.match(p) for p in prompts]
    if not found or not all(found):
        return None
    return [int(m.group(1)) for m in found if m], [m.group(2) for m in found if m]


def task_scorer(prompts: Sequence[str], targets: Sequence[int] | None, n_seeds: int, video: bool
                ) -> Callable[[torch.Tensor], dict[str, Any]] | None:
    """Task metrics of all outputs of ``n_seeds`` batches of ``prompts``: per-frame digit accuracy and motion
    accuracy for embedded-video prompts, digit accuracy for images with ``targets``; None otherwise."""
    from ..bench.runner import digit_scorer, video_scorer

    if video:
        vt = video_targets(prompts)
        if vt is None:
            return None
        if targets is not None and list(targets) != vt[0]:
            raise ValueError(f"targets {list(targets)} differ from the digits the prompts ask for {vt[0]}")
        return video_scorer(vt[0] * n_seeds, vt[1] * n_seeds)
    return digit_scorer(list(targets) * n_seeds) if targets is not None else None


class _TooSlow(Exception):
    """Raised inside a trial's generation once it has used more CPU time than the baseline allows."""


class _Evaluator:
    """Generates calibration outputs (images or clips) for a stack and compares them with the cached baseline.

    A trial is cut short once its CPU time passes ``slow_factor`` x the baseline's: a stack slower than the
    baseline can never be the answer, and reference CPU paths (sparse attention, W8A8) would otherwise eat
    the budget. The search tightens that with :attr:`cap` (CPU seconds and why) once a slower trial cannot
    matter any more (slower than the best feasible stack by a margin, or than a speed target allows).

    With ``screen`` (fewer than all prompts) every trial first runs the first ``screen`` prompts, which give its
    speed; only a trial ``promote`` accepts goes on to the rest, and its quality figures are then those of all
    prompts. Prompt ``i`` is always generated with seed ``seed + i`` (the baseline in the same chunks).
    """

    def __init__(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], generate: Generate,
                 targets: Sequence[int] | None, ctx: Context, slow_factor: float = 1.2,
                 screen: int | None = None) -> None:
        from ..bench.runner import ForwardCounter, _denoiser

        self.pipe, self.prompts, self.seeds, self.generate, self.ctx = pipe, list(prompts), list(seeds), generate, ctx
        n = len(self.prompts)
        self.screen = screen if screen is not None and 0 < screen < n else None
        self.chunks = [(0, self.screen), (self.screen, n)] if self.screen else [(0, n)]
        self.counter = ForwardCounter(_denoiser(pipe))
        self.slow_factor = slow_factor
        self._limit: tuple[float, float] | None = None  # (start, allowed CPU seconds) while a trial runs
        self.cap: tuple[float, str] | None = None  # a tighter CPU limit than slow_factor x baseline, and why
        self._guard = _denoiser(pipe).register_forward_pre_hook(self._check_time)
        self.base_times: list[float] = []
        self.base_parts = [self._run({}, c)[0] for c in range(len(self.chunks))]
        self.base_images = self._join(self.base_parts)
        bad = metrics.nonfinite(self.base_images)
        if bad is not None:
            self.close()
            raise ValueError(f"the baseline (no accelerator) gives a {bad}: nothing to tune against")
        self.base_times.clear()  # the process's first generation runs cold (allocations, lazy set-up): timed again
        self.retime_baseline()
        self.video = self.base_images.ndim == 5
        self.score = task_scorer(self.prompts, targets, len(self.seeds), self.video)
        self.base_scores = self.score(self.base_images) if self.score else {}
        self.base_acc = self.base_scores.get("accuracy")
        if self.screen:
            self.base_screen = self._join(self.base_parts[:1])
            self.score_screen = task_scorer(self.prompts[:self.screen], None if targets is None
                                            else list(targets)[:self.screen], len(self.seeds), self.video)

    def _check_time(self, module: torch.nn.Module, args: tuple) -> None:
        if self._limit is not None and time.process_time() - self._limit[0] > self._limit[1]:
            raise _TooSlow

    def _join(self, parts: list[list[torch.Tensor]]) -> torch.Tensor:
        """Outputs of ``parts[chunk][seed]`` in the set's order: every prompt of the first seed, then the next."""
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(len(self.seeds))])

    def _run(self, feats: dict[str, dict[str, Any]], chunk: int = 0) -> tuple[list[torch.Tensor], float, float]:
        """Outputs (one batch per seed) of the prompts of ``chunk`` with ``feats`` on, their CPU time and the
        denoiser forwards per output; the first chunk's baseline times are the speed reference."""
        lo, hi = self.chunks[chunk]
        names = enable_features(self.pipe, feats, self.ctx)
        try:
            self.counter.take()
            t0 = time.process_time()
            if feats and self.base_times and chunk == 0:
                self._limit = (t0, self.limit()[0])
            try:
                with torch.no_grad():
                    outs = [self.generate(self.pipe, self.prompts[lo:hi], s + lo) for s in self.seeds]
            finally:
                self._limit = None
            cpu = time.process_time() - t0
            fwd = self.counter.take() / sum(o.shape[0] for o in outs)
        finally:
            disable_features(self.pipe, names)
        if not feats and chunk == 0:
            self.base_times.append(cpu)
        return outs, cpu, fwd

    def retime_baseline(self) -> None:
        self._run({})

    def retime(self, t: Trial, samples: int) -> None:
        """Time ``t``'s stack again on the first chunk until it has ``samples`` CPU times, and rank it by their
        median: one sample is too noisy to choose between stacks a forward apart."""
        times = list(t.cpu_samples or [t.cpu_s])
        while len(times) < samples:
            try:
                times.append(self._run(t.features)[1])
            except _TooSlow:  # slower than the cap this time: at least that slow, and no more samples needed
                times.append(self.limit()[0])
                break
        t.cpu_samples, t.cpu_s = times, statistics.median(times)
        t.speedup = self.base_cpu / t.cpu_s

    @property
    def base_cpu(self) -> float:
        return statistics.median(self.base_times)

    def limit(self) -> tuple[float, str]:
        """The CPU seconds a trial may use, and why it is stopped there."""
        own = (self.slow_factor * self.base_cpu, f"slower than {self.slow_factor:g}x the baseline's CPU time")
        return self.cap if self.cap is not None and self.cap[0] < own[0] else own

    def trial(self, number: int, feats: dict[str, dict[str, Any]],
              promote: Callable[[Trial], bool] | None = None) -> Trial:
        """Measure one stack: speed on the first chunk, quality on every chunk it is promoted to."""
        t = Trial(number, feats)
        limit, why = self.limit()
        try:
            parts, cpu, fwd = self._run(feats)
        except _TooSlow:
            t.error = f"stopped: {why}"
            t.speedup = self.base_cpu / limit  # at most this fast
            return t
        except Exception as exc:  # noqa: BLE001 - a failing combination is a failed trial, not a failed search
            t.error = f"{type(exc).__name__}: {exc}"
            return t
        t.cpu_s, t.forwards_per_image = cpu, fwd
        t.speedup = self.base_cpu / cpu if cpu > 0 else None
        if not self.screen:
            self._measure(t, self._join([parts]), self.base_images, self.score)
            return t
        self._measure(t, self._join([parts]), self.base_screen, self.score_screen)
        t.confirmed = False
        if t.error is None and (promote is None or promote(t)):
            try:
                rest, _, _ = self._run(feats, 1)
            except Exception as exc:  # noqa: BLE001
                t.error = f"{type(exc).__name__}: {exc}"
                return t
            self._measure(t, self._join([parts, rest]), self.base_images, self.score)
            t.confirmed = t.error is None
        return t

    def _measure(self, t: Trial, imgs: torch.Tensor, base: torch.Tensor,
                 score: Callable[[torch.Tensor], dict[str, Any]] | None) -> None:
        from ..bench.runner import _as_frames, _as_images

        t.outputs = imgs.shape[0]
        t.error = metrics.nonfinite(imgs)  # a diverged stack is a failed trial, not a crashed search
        if t.error is not None:
            return
        # a clip's PSNR is over all its frames; the mean over the set and its worst item
        t.psnr, t.psnr_worst = metrics.psnr_mean_worst(_as_images(imgs), _as_images(base))
        t.ssim = metrics.ssim(_as_frames(imgs), _as_frames(base))  # per frame
        if score:
            s = score(imgs)
            t.accuracy, t.motion_accuracy = s.get("accuracy"), s.get("motion_accuracy")

    def close(self) -> None:
        self.counter.remove()
        self._guard.remove()


def _start_points(names: list[str], steps: int, video: bool = False) -> list[dict[str, Any]]:
    """Hand-set starting points (enqueued first, best guesses first), so a short budget still tries the obvious
    stacks: the best single cache of ``hasten bench``, fewer steps (plain and shifted), and a cache on top of
    fewer / shifted steps, of guidance and of bottleneck stages. On the video model (CFG 4, trained at flow
    shift 3) a shifted 6-8 step schedule and EasyCache with a long reuse cap are where the fast stacks are."""
    base: dict[str, Any] = {}
    if "easycache" in names:
        base["easycache.on"] = False
    if "adaptive_guidance" in names:
        base["guidance.mode"] = "off"
    if "quantize" in names:
        base["quantize.method"] = "off"
    if "sparse_attention" in names:
        base["sparse.target_mass"] = 1.0
    if "bottleneck_sampling" in names:
        base["bottleneck.on"] = False
    sched = "timestep_schedule" in names
    if sched:
        base.update({"schedule.steps": steps, "schedule.shift": 1.0})

    def n(frac: float) -> int:
        return max(2, round(steps * frac))

    # the bench's best single cache at its floor: video EasyCache 0.2 w0.1 r6 (2.66x at 31.1 dB), image 0.15
    cache = ({"easycache.on": True, "easycache.threshold": 0.2, "easycache.warmup": 0.1,
              "easycache.max_reuse": 6, "easycache.forecast": "linear"} if video else
             {"easycache.on": True, "easycache.threshold": 0.15, "easycache.warmup": 0.2,
              "easycache.max_reuse": 4, "easycache.forecast": "linear"})
    light = {**cache, "easycache.threshold": 0.1, "easycache.warmup": 0.2}  # on top of fewer steps
    pts: list[dict[str, Any]] = []
    ec, ag = "easycache" in names, "adaptive_guidance" in names
    if ec:
        pts.append({**base, **cache})
    if sched:
        pts += [{**base, "schedule.steps": n(0.4), "schedule.shift": 1.5},
                {**base, "schedule.steps": n(0.3), "schedule.shift": 1.6},
                {**base, "schedule.steps": n(0.5), "schedule.shift": 1.0},
                {**base, "schedule.steps": n(0.35), "schedule.shift": 1.0},
                # plain fewer steps, the reference rows of `--compare singles`: the search tries what it is read against
                {**base, "schedule.steps": n(0.3), "schedule.shift": 1.0},
                {**base, "schedule.steps": n(0.25), "schedule.shift": 1.0}]
    if sched and ec:
        pts += [{**base, **light, "schedule.steps": n(0.5)},
                {**base, **cache, "schedule.steps": n(0.6), "schedule.shift": 1.5}]
        if video:  # measured neighbours of the point above (12 steps, shift 1.5: 12 forwards, 31.8 dB calibration,
            # 33.0 dB held-out): shift 2.0 gave 13 forwards at 34.0 dB, 14 steps / EasyCache 0.3 r8 12 at 31.8 dB
            pts += [{**base, **cache, "schedule.steps": n(0.6), "schedule.shift": 2.0},
                    {**base, **cache, "schedule.steps": n(0.7), "schedule.shift": 2.0, "easycache.threshold": 0.3,
                     "easycache.max_reuse": 8}]
    if ec and ag:
        pts.append({**base, **cache, "guidance.mode": "ag", "guidance.threshold": 0.998})
    if ag and sched:
        pts.append({**base, "schedule.steps": n(0.5), "guidance.mode": "truncate", "guidance.truncate": 0.6})
        if video:  # over 16 clips the fastest stack at >= 30 dB mean: 6 steps, CFG on the first 5 (11 forwards,
            # 31.7 dB, worst clip 27.2) vs plain 5 steps (10 forwards, 31.3 dB) and EasyCache 0.2 (14, 32.2, worst 19.0)
            pts.append({**base, "schedule.steps": n(0.3), "schedule.shift": 1.5, "guidance.mode": "truncate",
                        "guidance.truncate": 0.7})
    if "bottleneck_sampling" in names:
        bn = {"bottleneck.on": True, "bottleneck.scale": 0.75, "bottleneck.start": 0.2, "bottleneck.end": 0.6}
        pts.append({**base, **bn})
        if ec:
            pts.append({**base, **bn, **cache})
    return pts


def tune(
    pipe: Any,
    prompts: Sequence[str],
    *,
    min_psnr: float | None = None,
    min_ssim: float | None = None,
    min_digit_accuracy: float | None = None,
    speedup: float | None = None,
    min_motion_accuracy: float | None = None,
    min_worst_psnr: float | None = None,
    targets: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    holdout_seeds: Sequence[int] = (1000, 2000),
    holdout_prompts: Sequence[str] | None = None,
    holdout_targets: Sequence[int] | None = None,
    features: Sequence[str] | None = None,
    budget_minutes: float = 15.0,
    budget_clock: str = "wall",
    n_trials: int | None = None,
    steps: int | None = None,
    call_kwargs: dict[str, Any] | None = None,
    generate: Generate | None = None,
    margin_db: float = 1.5,
    candidates: int = 4,
    repeats: int = 3,
    compare: Sequence[Any] = (),
    model: str = "",
    seed: int = 0,
    progress: bool = True,
    on_trial: Callable[[Trial], None] | None = None,
    slow_factor: float = 1.2,
    cut_factor: float = 1.25,
    screen: int | None = None,
    screen_slack_db: float = 3.0,
    speed_samples: int = 3,
    retime_tol: float = 0.1,
) -> TuneResult:
    """Search hasten's accelerator stack for ``pipe`` on ``prompts`` x ``seeds`` against the baseline.

    Objective: a quality floor (``min_psnr`` dB on average / ``min_worst_psnr`` dB for every image or clip /
    ``min_ssim`` / ``min_digit_accuracy``, the latter needing ``targets`` = the digit of each prompt) maximising speed, or a ``speedup`` target maximising PSNR. The
    search (optuna TPE with constraints, seeded) runs until ``budget_minutes`` (of wall-clock time, or with ``budget_clock="cpu"`` of
    this process's CPU time, for a shared and overloaded box) or ``n_trials``; Ctrl-C keeps
    the best found. A PSNR floor is searched ``margin_db`` higher, and up to ``candidates`` of the best
    feasible stacks, of distinct structure (:func:`candidate_pool`), are checked fastest first on
    ``holdout_seeds`` (and ``holdout_prompts``) until one meets the objective there; that one is timed wall-clock against the baseline, interleaved, ``repeats`` times (next to the
    bench variants in ``compare``, e.g. hand-set single accelerators). ``features`` names the searched families
    (see ``hasten.tune.SPACE``; default: those on by default). ``steps`` is the call's step count (default:
    the pipeline's ``call_defaults`` or 50). Returns a :class:`TuneResult` whose ``preset`` is ready for
    :func:`hasten.tune.save_preset` / :func:`hasten.apply`.

    Video pipelines (outputs of several frames) are tuned the same way: PSNR over all frames of a clip, SSIM
    per frame, and for the embedded video model's prompts ("digit N moving D") per-frame digit accuracy and
    ``min_motion_accuracy`` (clips moving the prompted way); the preset records ``"model": "video"`` so
    :func:`hasten.apply` refuses it on an image pipeline (and an image preset on a video one). A trial whose
    CPU time passes ``slow_factor`` x the baseline's is stopped there (it can never be the fastest), and so
    is, under a quality floor, one passing ``cut_factor`` x the CPU time of the best feasible stack so far
    (kept that long only as a held-out fallback), or one too slow for a ``speedup`` target.

    ``screen`` (fewer than ``len(prompts)``) makes the calibration two-stage: every trial runs the first
    ``screen`` prompts (its speed is measured there), and only one whose mean PSNR there is within
    ``screen_slack_db`` of the floor (+ margin), and whose worst item meets ``min_worst_psnr``, runs the rest;
    feasibility is judged on all prompts. A large calibration set then costs little more than a small one, and
    a few hard or easy prompts no longer decide the search (``Trial.confirmed`` False: screened out).

    A trial that could be the answer (it meets the quality floors and is within ``retime_tol`` of the best
    speed so far, or of a ``speedup`` target) is timed ``speed_samples`` times in all; its speed is the median
    (``Trial.cpu_samples``).
    """
    try:
        import optuna
    except ImportError as exc:
        raise ImportError("hasten.tune needs optuna: pip install 'hasten[tune]'") from exc
    from tqdm.auto import tqdm

    from .. import __version__

    objective = Objective(min_psnr, min_ssim, min_digit_accuracy, speedup, min_motion_accuracy, min_worst_psnr)
    if not prompts:
        raise ValueError("tune needs at least one calibration prompt")
    vt = video_targets(prompts)
    if min_digit_accuracy is not None and targets is None and vt is None:
        raise ValueError("min_digit_accuracy needs targets (the digit each prompt asks for) or embedded-video "
                         "prompts ('digit N moving D')")
    if min_motion_accuracy is not None and vt is None:
        raise ValueError("min_motion_accuracy needs embedded-video prompts ('digit N moving left/right/up/down')")
    if not slow_factor > 1:
        raise ValueError(f"slow_factor must be > 1, got {slow_factor!r}")
    if not cut_factor > 1:
        raise ValueError(f"cut_factor must be > 1, got {cut_factor!r}")
    if budget_minutes <= 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes!r}")
    if screen is not None and screen < 1:
        raise ValueError(f"screen must be a positive number of prompts, got {screen!r}")
    if not screen_slack_db >= 0:
        raise ValueError(f"screen_slack_db must be >= 0, got {screen_slack_db!r}")
    if speed_samples < 1:
        raise ValueError(f"speed_samples must be >= 1, got {speed_samples!r}")
    if not retime_tol >= 0:
        raise ValueError(f"retime_tol must be >= 0, got {retime_tol!r}")
    if budget_clock not in ("wall", "cpu"):
        raise ValueError(f"budget_clock must be 'wall' or 'cpu', got {budget_clock!r}")
    clock = time.process_time if budget_clock == "cpu" else time.perf_counter
    overlap = set(seeds) & set(holdout_seeds)
    if overlap and holdout_prompts is None:
        raise ValueError(f"held-out seeds must differ from the calibration seeds (both have {sorted(overlap)})")
    chosen_entries = entries(list(features) if features is not None else None)
    names = [e.name for e in chosen_entries]
    call_kwargs = dict(call_kwargs or {})
    steps = int(steps or call_kwargs.get("num_inference_steps")
                or getattr(pipe, "call_defaults", {}).get("num_inference_steps") or 50)
    generate = generate or default_generate(call_kwargs)
    # the calibration runs of quantization / CacheQuant sample like the search does (steps, frames, size)
    ctx = Context(calibration_prompts=list(prompts), call_kwargs=call_kwargs)
    t_start, c_start = time.perf_counter(), clock()
    deadline = c_start + budget_minutes * 60
    cpu_start = time.process_time()
    ev = _Evaluator(pipe, prompts, seeds, generate, targets, ctx, slow_factor, screen)
    if (min_digit_accuracy is not None or min_motion_accuracy is not None) and ev.score is None:
        ev.close()
        raise ValueError("a digit / motion accuracy floor needs outputs the embedded models' scorer reads: images "
                         "with targets, or clips of 'digit N moving D' prompts")
    trials: list[Trial] = []
    interrupted = False

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # optuna >= 5 takes constraints from Trial.set_constraint; older versions from constraints_func
    native = hasattr(optuna.trial.Trial, "set_constraint")
    extra = {} if native else {"constraints_func": lambda ft: ft.user_attrs["constraints"]}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True, group=True, **extra)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.set_user_attr("steps", steps)
    for pt in _start_points(names, steps, ev.video):
        study.enqueue_trial(pt, skip_if_exists=True)
    best: Trial | None = None
    bar = tqdm(total=n_trials, desc="hasten tune", disable=not progress, unit="trial")
    margin = margin_db if min_psnr is not None else 0.0

    def promote(t: Trial) -> bool:
        return objective.promising(t, margin, screen_slack_db)

    quality = objective.quality()

    def contender(t: Trial) -> bool:
        """Whether ``t``'s one speed sample decides anything: it meets the floors and is near the best / target."""
        if t.error is not None or t.confirmed is False or not t.speedup:
            return False
        if quality is not None and not quality.met(t, margin):
            return False
        if objective.speedup is not None:
            return abs(t.speedup / objective.speedup - 1) <= retime_tol
        return best is None or t.speedup * (1 + retime_tol) >= _num(best.speedup)

    try:
        while (n_trials is None or len(trials) < n_trials) and clock() < deadline:
            ot = study.ask()
            feats = exclusive({e.name: s for e in chosen_entries if (s := e.suggest(ot)) is not None})
            if len(trials) and len(trials) % 8 == 0:
                ev.retime_baseline()
            ev.cap = _cap(objective, best, ev.base_cpu, cut_factor)
            t = ev.trial(ot.number, feats, promote)
            if speed_samples > 1 and contender(t):
                ev.retime(t, speed_samples)
            t.feasible = t.error is None and t.confirmed is not False and objective.met(t, margin)
            trials.append(t)
            cons = [1e6] if t.error else [min(v, 1e6) for v in objective.violations(t, margin)]
            ot.set_user_attr("constraints", cons)
            if native:
                for i, c in enumerate(cons):
                    ot.set_constraint(f"c{i}", c)
            value = 0.0 if t.error else max(-1e6, min(objective.score(t), 1e6))
            study.tell(ot, value)
            if t.feasible and (best is None or objective.score(t) > objective.score(best)):
                best = t
            bar.update(1)
            bar.set_postfix_str(_postfix(best, min_psnr is not None or speedup is None))
            if on_trial is not None:
                on_trial(t)
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("hasten tune: interrupted after %d trial(s); keeping the best found", len(trials))
    finally:
        bar.close()
    search_seconds = time.perf_counter() - t_start
    search_cpu = time.process_time() - cpu_start

    preset: dict[str, Any] = {
        "format": FORMAT, "hasten_version": __version__, "model": "video" if ev.video else "image",
        "model_name": model or type(pipe).__name__,
        "features": dict(best.features) if best else {},
        "objective": {k: v for k, v in asdict(objective).items() if v is not None},
        "search": {"trials": len(trials), "seconds": round(search_seconds, 1),
                   "cpu_seconds": round(search_cpu, 1), "budget": f"{budget_minutes:g} min {budget_clock}",
                   "calibration_prompts": len(prompts), "screen_prompts": ev.screen,
                   "confirmed": sum(1 for t in trials if t.confirmed) if ev.screen else None,
                   "calibration_seeds": list(seeds), "steps": steps,
                   "baseline": {k: ev.base_scores[k] for k in ("accuracy", "motion_accuracy", "clip_accuracy")
                                if ev.base_scores.get(k) is not None},
                   "speed_measure": f"process CPU time, 1 thread, median of {speed_samples} for contenders",
                   "interrupted": interrupted},
    }
    if best is not None and "quantize" in best.features:
        preset["calibration_prompts"] = list(prompts)
    if best is not None:
        preset["search"]["best"] = {"speedup_cpu": best.speedup, "psnr": best.psnr, "psnr_worst": best.psnr_worst,
                                    "ssim": best.ssim,
                                    "accuracy": best.accuracy, "forwards_per_image": best.forwards_per_image}
    result = TuneResult(preset, best, trials, search_seconds, interrupted)
    try:
        if best is None:
            logger.warning("hasten tune: no configuration met the objective in %d trial(s)", len(trials))
        elif not interrupted:
            _held_out(result, pipe, objective, generate, holdout_prompts or prompts,
                      holdout_targets if holdout_prompts is not None else targets, holdout_seeds, ctx,
                      candidates, repeats, compare, margin, ev.video,
                      simplify=lambda t: drop_no_ops(ev, t))
    except KeyboardInterrupt:
        result.interrupted = True
        logger.warning("hasten tune: held-out check interrupted; the preset keeps the search's best")
    finally:
        ev.close()
    return result


def _cap(objective: Objective, best: Trial | None, base_cpu: float, cut_factor: float) -> tuple[float, str] | None:
    """The CPU time after which a trial cannot matter: ``cut_factor`` x the best feasible stack's under a quality
    floor, the time a ``speedup`` target allows (with 5 % slack) under a speed target."""
    if objective.speedup is not None:
        return base_cpu / objective.speedup * 1.05, f"too slow for the {objective.speedup:g}x target"
    if best is None or not best.speedup:
        return None
    return (cut_factor * base_cpu / best.speedup,
            f"slower than {cut_factor:g}x the best stack so far (trial {best.number}, {best.speedup:.2f}x)")


def _postfix(best: Trial | None, speed: bool) -> str:
    if best is None:
        return "best: none feasible yet"
    return (f"best {best.speedup:.2f}x @ {best.psnr:.1f} dB" if speed or best.psnr is not None
            else f"best {best.speedup:.2f}x")


def structure(features: dict[str, dict[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """What a stack *is*, ignoring its continuous knobs: the enabled families, with the schedule's step count,
    the guidance mode, the quantization method and the bottleneck's scale. Two stacks of one structure differ
    only in thresholds / shifts, so they tend to pass or fail a held-out check together."""
    def kind(name: str, s: dict[str, Any]) -> Any:
        if name == "timestep_schedule":
            return s.get("steps")
        if name == "bottleneck_sampling":
            return min(s.get("scales", [1.0]))
        return s.get("mode") or s.get("method") or True

    return tuple(sorted((name, kind(name, s)) for name, s in features.items()))


def _steps_of(features: dict[str, dict[str, Any]]) -> Any:
    return features.get("timestep_schedule", {}).get("steps")


def candidate_pool(trials: Sequence[Trial], objective: Objective, n: int, per_steps: int = 2) -> list[Trial]:
    """Up to ``n`` feasible trials for the held-out check, best score first, chosen for diversity: each of a
    distinct :func:`structure`, at most ``per_steps`` of one step count. The top of a search is typically many
    near-copies of one stack (one schedule at slightly different shifts) that overfit the calibration seeds
    together; distinct structures fail independently, so the fastest that passes held-out is worth having.
    Only when fewer distinct structures exist are the next best of a repeated one added."""
    ranked = sorted((t for t in trials if t.feasible), key=objective.score, reverse=True)
    unique: list[Trial] = []
    for t in ranked:
        if all(t.features != u.features for u in unique):
            unique.append(t)
    n = max(1, n)
    pool: list[Trial] = []
    structures: set[tuple[tuple[str, Any], ...]] = set()
    per: dict[Any, int] = {}
    for t in unique:
        key, steps = structure(t.features), _steps_of(t.features)
        if len(pool) < n and key not in structures and per.get(steps, 0) < per_steps:
            pool.append(t)
            structures.add(key)
            per[steps] = per.get(steps, 0) + 1
    for t in unique:  # too few distinct structures: the next best of the same ones
        if len(pool) >= n:
            break
        if all(t is not q for q in pool):
            pool.append(t)
    return sorted(pool, key=objective.score, reverse=True)


def drop_no_ops(ev: _Evaluator, t: Trial) -> tuple[Trial, list[str]]:
    """``t`` without the families that changed nothing, and their names: a family whose removal leaves the
    calibration's first chunk bit-identical is not needed (EasyCache on a 5-step run reuses no step and would
    only warn on every call of the preset)."""
    if len(t.features) < 2:
        return t, []
    try:
        full = ev._run(t.features)[0]
    except Exception:  # noqa: BLE001 - cannot tell: keep the stack as searched
        return t, []
    feats, dropped = dict(t.features), []
    for name in list(feats):
        if len(feats) < 2:
            break
        rest = {k: v for k, v in feats.items() if k != name}
        try:
            out = ev._run(rest)[0]
        except Exception:  # noqa: BLE001 - e.g. too slow without it: it does something
            continue
        if all(torch.equal(a, b) for a, b in zip(out, full)):
            feats, dropped = rest, [*dropped, name]
    return (replace(t, features=feats), dropped) if dropped else (t, [])


def _held_out(result: TuneResult, pipe: Any, objective: Objective, generate: Generate, prompts: Sequence[str],
              targets: Sequence[int] | None, seeds: Sequence[int], ctx: Context, candidates: int, repeats: int,
              compare: Sequence[Any], margin: float, video: bool = False, finalists: int = 3,
              simplify: Callable[[Trial], tuple[Trial, list[str]]] | None = None) -> None:
    """Check the best feasible stacks of distinct structure (:func:`candidate_pool`) on held-out prompts/seeds,
    fastest first, until ``finalists`` pass; time those side by side (wall-clock, interleaved, next to
    ``compare``) and keep the fastest. The search's CPU times, even a contender's median of back-to-back samples,
    drift with the box over minutes; the interleaved median decides between the finalists."""
    from ..bench.runner import run_bench
    from ..bench.variants import Variant

    pool = candidate_pool(result.trials, objective, candidates)
    dropped: dict[int, list[str]] = {}
    if simplify is not None:  # families that changed nothing leave the candidates (and the preset)
        for i, t in enumerate(pool):
            pool[i], names = simplify(t)
            if names:
                dropped[t.number] = names
                logger.info("hasten tune: trial %d's %s changed nothing; left out", t.number, ", ".join(names))

    def gen(p: Any, seed: int) -> torch.Tensor:
        return generate(p, prompts, seed)

    def variant(name: str, feats: dict[str, Any]) -> Variant:
        names: list[str] = []

        def on(p: Any) -> None:
            names[:] = enable_features(p, feats, ctx)

        return Variant(name, "hasten", on, lambda p: disable_features(p, list(names)), {"features": feats})

    base = Variant("baseline", "baseline")
    score = task_scorer(prompts, targets, len(seeds), video)
    quality = objective.quality()
    passed: list[Trial] = []
    checks = []
    for t in pool:  # quality check only (one generation per seed), cheapest first
        rows = run_bench(pipe, [base, variant("hasten-tuned", t.features)], gen, list(seeds), repeats=1,
                         progress=False, score=score)
        row = rows[1].to_dict()
        checks.append({"trial": t.number, "psnr": row["psnr"], "psnr_worst": row["psnr_worst"], "ssim": row["ssim"],
                       "accuracy": row["accuracy"],
                       "motion_accuracy": row["motion_accuracy"]})
        if row["error"] is None and (quality is None or quality.met(row)):
            passed.append(t)
            if len(passed) >= max(1, finalists):
                break
    if not passed:
        logger.warning("hasten tune: none of the %d best stacks met the objective on the held-out seeds", len(pool))
        result.held_out = {"checks": checks, "met": False, "dropped": dropped}
        return
    rows = run_bench(pipe, [base, *(variant(f"hasten-tuned#{t.number}", t.features) for t in passed), *compare],
                     gen, list(seeds), repeats=repeats, progress=False, score=score)
    timed = rows[1:1 + len(passed)]
    pick = max(range(len(passed)), key=lambda i: (timed[i].error is None, timed[i].speedup or 0.0, -i))
    chosen, tuned = passed[pick], timed[pick]
    if chosen is not result.best:
        if chosen.number != result.best.number:
            logger.info("hasten tune: trial %d failed on held-out seeds or was slower; taking trial %d",
                        result.best.number, chosen.number)
        result.best = chosen
        result.preset["features"] = dict(chosen.features)
    tuned.name = "hasten-tuned"
    others = [r for i, r in enumerate(timed) if i != pick]
    for r in others:  # the finalists not chosen: shown, never read as hand-set singles
        r.name, r.family = r.name.replace("hasten-tuned", "tune-finalist"), "candidate"
    rows = [rows[0], tuned, *others, *rows[1 + len(passed):]]
    result.held_out = {
        "trial": chosen.number, "seeds": list(seeds), "prompts": len(prompts), "repeats": repeats,
        "speedup_wall": tuned.speedup, "median_s": tuned.median_s, "baseline_median_s": rows[0].median_s,
        "psnr": tuned.psnr, "psnr_worst": tuned.psnr_worst, "ssim": tuned.ssim, "accuracy": tuned.accuracy,
        "baseline_accuracy": rows[0].accuracy,
        "motion_accuracy": tuned.motion_accuracy, "baseline_motion_accuracy": rows[0].motion_accuracy,
        "forwards_per_image": tuned.forwards_per_image, "checks": checks, "dropped": dropped,
        "finalists": [{"trial": t.number, "speedup_wall": r.speedup, "forwards_per_image": r.forwards_per_image}
                      for t, r in zip(passed, timed)],
        "met": objective.met({"psnr": tuned.psnr, "psnr_worst": tuned.psnr_worst, "ssim": tuned.ssim,
                              "accuracy": tuned.accuracy,
                              "motion_accuracy": tuned.motion_accuracy, "speedup": tuned.speedup}),
    }
    result.preset["measured"] = {k: result.held_out[k] for k in
                                 ("speedup_wall", "psnr", "psnr_worst", "ssim", "accuracy", "motion_accuracy", "seeds",
                                  "prompts",
                                  "repeats") if result.held_out[k] is not None}
    result.compared = [r.to_dict() for r in rows]
