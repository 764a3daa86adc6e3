"""hasten tune: the search meets its floor on held-out seeds, presets round-trip, bad files fail clearly,
Ctrl-C keeps the best, the timestep schedule is exact when off, and the ComfyUI preset node matches."""

from __future__ import annotations

import json
import time

import pytest
import torch

import hasten
from hasten import metrics
from hasten.embedded import digit_prompts, generate_digits
from hasten.errors import UnsupportedModelError
from hasten.pipelines import features
from hasten.tune import PresetError, apply, load_preset, save_preset
from hasten.tune.preset import disable_features, find_presets, preset_variant
from hasten.tune.schedule import ScheduleConfig, flow_sigmas

STEPS = 8  # the embedded model at 8 steps: a faithful short run that keeps these tests fast
DIGITS = [1, 4, 7]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    p = hasten.load_embedded()
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, seed: int, digits=DIGITS) -> torch.Tensor:
    return generate_digits(pipe, digits, seed=seed, steps=STEPS)


class _Rows:
    """Rows reaching the first transformer block (real work, below every hook)."""

    def __init__(self, pipe) -> None:
        self.n = 0
        self.h = pipe.transformer.blocks[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, m, a, kw) -> None:
        self.n += (a[0] if a else kw["hidden_states"]).shape[0]

    def __enter__(self) -> _Rows:
        return self

    def __exit__(self, *exc) -> None:
        self.h.remove()


PRESET = {"format": 1, "features": {"timestep_schedule": {"steps": 5, "shift": 1.2},
                                    "easycache": {"threshold": 0.1, "warmup": 0.2},
                                    "adaptive_guidance": {"mode": "truncate", "truncate": 0.6}}}


# -- the search ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(pipe):
    return hasten.tune(pipe, digit_prompts(DIGITS), min_psnr=30.0, targets=DIGITS, seeds=(0,),
                       holdout_seeds=(1000,), features=["timestep_schedule", "easycache"], n_trials=5,
                       call_kwargs={"num_inference_steps": STEPS}, repeats=1, progress=False)


def test_tune_meets_the_floor_on_held_out_seeds(pipe, tuned) -> None:
    """The chosen stack, applied from its saved preset, keeps >= 30 dB on a seed never searched on, does
    less real work than the baseline, and the preset records the held-out figures."""
    assert tuned.best is not None and tuned.held_out and tuned.held_out["met"]
    assert tuned.preset["features"], "the baseline is not a stack"
    assert len(tuned.trials) == 5 and all(t.psnr is not None for t in tuned.trials if t.error is None)
    assert tuned.preset["measured"]["psnr"] >= 30.0 and tuned.preset["measured"]["seeds"] == [1000]
    base = _gen(pipe, 2000)  # a second held-out seed, measured here independently of tune
    apply(pipe, tuned.preset)
    try:
        with _Rows(pipe) as rows:
            img = _gen(pipe, 2000)
    finally:
        disable_features(pipe, list(tuned.preset["features"]))
    assert features(pipe) == {}
    assert metrics.psnr(img, base) >= 30.0
    assert rows.n < 2 * STEPS * len(DIGITS)


def test_pareto_plot_and_cli_json(tuned, tmp_path) -> None:
    from hasten.tune.plot import pareto_front, write_plot

    p = write_plot(tuned, tmp_path / "pareto.png")
    assert p.stat().st_size > 5000
    assert pareto_front([(1, 40), (2, 35), (1.5, 30), (2, 20)]) == [(1, 40), (2, 35)]
    json.dumps(tuned.to_dict(), default=str)


def test_interrupt_keeps_the_best(pipe) -> None:
    seen = []

    def stop_after_two(trial) -> None:
        seen.append(trial)
        if len(seen) == 2:
            raise KeyboardInterrupt

    r = hasten.tune(pipe, digit_prompts([3]), min_psnr=25.0, seeds=(0,), holdout_seeds=(1000,),
                    features=["timestep_schedule"], n_trials=10, call_kwargs={"num_inference_steps": STEPS},
                    progress=False, on_trial=stop_after_two)
    assert r.interrupted and len(r.trials) == 2 and r.held_out is None
    feasible = [t for t in r.trials if t.feasible]
    assert feasible, [(t.features, t.psnr) for t in r.trials]
    assert r.best is max(feasible, key=lambda t: t.speedup)
    assert r.preset["features"] == r.best.features and r.preset["search"]["interrupted"]


def test_tune_refuses_a_missing_objective_and_shared_seeds(pipe) -> None:
    with pytest.raises(ValueError, match="needs an objective"):
        hasten.tune(pipe, ["digit 1"])
    with pytest.raises(ValueError, match="held-out seeds must differ"):
        hasten.tune(pipe, ["digit 1"], min_psnr=30, seeds=(0,), holdout_seeds=(0,))
    with pytest.raises(ValueError, match="unknown feature"):
        hasten.tune(pipe, ["digit 1"], min_psnr=30, features=["warp_drive"])


# -- presets ----------------------------------------------------------------------------------------------
def test_apply_round_trips_and_matches_enabling_by_hand(pipe, tmp_path) -> None:
    path = save_preset(dict(PRESET), tmp_path / "tuned.json")
    base = _gen(pipe, 5)
    assert apply(pipe, str(path)) is pipe
    assert set(features(pipe)) == {"timestep_schedule", "easycache", "guidance"}  # the registry's own names
    with _Rows(pipe) as rows:
        img = _gen(pipe, 5)
    disable_features(pipe, list(PRESET["features"]))
    assert features(pipe) == {} and torch.equal(_gen(pipe, 5), base)  # disabled = baseline, bit for bit
    hasten.tune.enable_timestep_schedule(pipe, steps=5, shift=1.2)
    pipe.enable_easycache(threshold=0.1, warmup=0.2)
    pipe.enable_adaptive_guidance(mode="truncate", truncate=0.6)
    try:
        by_hand = _gen(pipe, 5)
    finally:
        pipe.disable_adaptive_guidance()
        pipe.disable_easycache()
        hasten.tune.disable_timestep_schedule(pipe)
    assert torch.equal(img, by_hand)
    assert rows.n < 2 * 5 * len(DIGITS)  # 5 steps, CFG dropped after 60 %, some steps reused
    assert json.loads(path.read_text())["features"] == PRESET["features"]
    v = preset_variant(path)  # the demo's slot: the same stack as a bench variant
    v.apply(pipe)
    try:
        assert torch.equal(_gen(pipe, 5), img)
    finally:
        v.remove(pipe)
    assert features(pipe) == {}
    assert find_presets(tmp_path) == [str(path)]


@pytest.mark.parametrize("text, match", [
    ('{"format": 1, "features": {"warp_drive": {}}}', "unknown feature.*warp_drive.*known: timestep_schedule"),
    ('{"format": 1, "features": {"easycache": {"threshold": -1}}}', "bad settings for easycache"),
    ('{"format": 1, "features": {"easycache": {"treshold": 0.1}}}', "bad settings for easycache"),
    ('{"format": 1, "features": {"timestep_schedule": {"steps": 0}}}', "bad settings for timestep_schedule"),
    ('{"format": 1, "features": {"quantize": {"method": "int3"}}}', "bad settings for quantize"),
    ('{"format": 2, "features": {}}', "unsupported preset format 2"),
    ('{"format": 1}', "needs a 'features' object"),
    ('{"format": 1, "features": {"easycache": {}, "timestep_schedule": {}, "bottleneck_sampling": {}}}',
     "both patch the scheduler"),
    ("[1, 2]", "a preset is a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_preset_is_refused_with_the_pipeline_untouched(pipe, tmp_path, text, match) -> None:
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(PresetError, match=match):
        apply(pipe, f)
    assert features(pipe) == {}


def test_missing_file_and_non_pipeline(pipe, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no preset file"):
        apply(pipe, tmp_path / "nope.json")
    with pytest.raises(UnsupportedModelError):
        apply("not a pipeline", dict(PRESET))
    assert load_preset(json.dumps(PRESET))["features"] == PRESET["features"]


def test_failing_feature_leaves_nothing_on(pipe, monkeypatch) -> None:
    from hasten.tune import SPACE

    def boom(p, s, c):
        raise RuntimeError("boom")

    monkeypatch.setattr(SPACE["adaptive_guidance"], "enable", boom)
    with pytest.raises(RuntimeError, match="boom"):
        apply(pipe, PRESET)
    assert features(pipe) == {} and "set_timesteps" not in vars(pipe.scheduler)


# -- the timestep schedule ----------------------------------------------------------------------------------
def test_schedule_off_is_bit_identical_and_fewer_steps_do_less(pipe) -> None:
    base = _gen(pipe, 3)
    hasten.tune.enable_timestep_schedule(pipe, steps=STEPS, shift=1.0)
    try:
        assert torch.equal(_gen(pipe, 3), base)
    finally:
        hasten.tune.disable_timestep_schedule(pipe)
    hasten.tune.enable_timestep_schedule(pipe, ScheduleConfig(steps=4, shift=2.0))
    try:
        with _Rows(pipe) as rows:
            img = _gen(pipe, 3)
        assert len(pipe.scheduler.timesteps) == 4
    finally:
        hasten.tune.disable_timestep_schedule(pipe)
    assert rows.n == 2 * 4 * len(DIGITS) and not torch.equal(img, base)
    assert "set_timesteps" not in vars(pipe.scheduler) and torch.equal(_gen(pipe, 3), base)
    s = flow_sigmas(4, 2.0)
    assert len(s) == 4 and s[0] == pytest.approx(1.0) and all(a > b for a, b in zip(s, s[1:]))


def test_schedule_refuses_non_flow_scheduler() -> None:
    import tiny_pipes

    p, _ = tiny_pipes.sd15()
    with pytest.raises(UnsupportedModelError, match="does not take flow-matching sigmas"):
        hasten.tune.enable_timestep_schedule(p, steps=4)
    with pytest.raises(ValueError, match="steps"):
        ScheduleConfig(steps=0)


# -- command line ------------------------------------------------------------------------------------------
def test_cli_needs_an_objective_and_lists_features(capsys) -> None:
    from hasten.cli import main

    assert main(["tune"]) == 2
    assert "give an objective" in capsys.readouterr().err
    assert main(["tune", "--list-features"]) == 0
    out = capsys.readouterr().out
    assert "timestep_schedule" in out and "easycache" in out
    assert main(["tune", "--min-psnr", "30", "--features", "nope"]) == 2
    assert "unknown feature" in capsys.readouterr().err


def test_import_hasten_tune_is_callable() -> None:
    import hasten.tune.search  # noqa: F401 - importing a submodule rebinds hasten.tune to the package

    assert callable(hasten.tune) and callable(hasten.apply)


# -- the video model (issue 14 at 30 dB) -------------------------------------------------------------------
VIDEO_CALL = {"num_inference_steps": 4, "num_frames": 5, "height": 16, "width": 16}  # a faithful miniature run


@pytest.fixture(scope="module")
def video_pipe():
    torch.set_num_threads(1)
    return hasten.load_embedded("video")


def _video(pipe, prompts, seed: int) -> torch.Tensor:
    from hasten.tune.search import default_generate

    return default_generate(VIDEO_CALL)(pipe, prompts, seed)


def test_video_tune_preset_reproduces_the_best_trial(video_pipe, pipe, tmp_path) -> None:
    """A tiny video search: clips scored per frame and per clip, the preset is marked "video", and applying the
    saved tuned.json to a freshly loaded pipeline reproduces the best trial exactly (same PSNR against the
    baseline clips, same denoiser rows), while an image pipeline refuses it."""
    from hasten.bench.runner import _as_images
    from hasten.embedded.video import video_prompts

    prompts, held = video_prompts([3, 7], ["left", "up"]), video_prompts([5], ["right"])
    r = hasten.tune(video_pipe, prompts, min_psnr=20.0, seeds=(0,), holdout_seeds=(1007,), holdout_prompts=held,
                    features=["timestep_schedule", "easycache", "bottleneck_sampling"], n_trials=3,
                    call_kwargs=VIDEO_CALL, repeats=1, progress=False)
    assert r.preset["model"] == "video" and r.best is not None and r.best.features
    assert all(t.motion_accuracy is not None and t.accuracy is not None for t in r.trials if t.error is None)
    assert r.held_out["met"] and r.held_out["psnr"] >= 20.0 and r.held_out["motion_accuracy"] is not None
    path = save_preset(r.preset, tmp_path / "tuned.json")
    fresh = hasten.load_embedded("video")
    base = _video(fresh, prompts, 0)
    apply(fresh, str(path))
    try:
        with _Rows(fresh) as rows:
            clips = _video(fresh, prompts, 0)
    finally:
        disable_features(fresh, list(r.preset["features"]))
    assert clips.shape == base.shape == (2, 5, 3, 16, 16)
    assert metrics.psnr(_as_images(clips), _as_images(base)) == pytest.approx(r.best.psnr, abs=1e-4)
    assert rows.n / 2 == pytest.approx(r.best.forwards_per_image)  # rows per clip at the first block
    with pytest.raises(PresetError, match="tuned on a video model.*makes images"):
        apply(pipe, str(path))
    assert features(pipe) == {}
    image_preset = {**PRESET, "model": "image"}
    with pytest.raises(PresetError, match="tuned on a image model.*makes videos"):
        apply(fresh, image_preset)
    assert features(fresh) == {}
    apply(fresh, image_preset, check_model=False)  # explicitly allowed: the settings themselves apply
    disable_features(fresh, list(PRESET["features"]))


def test_video_floors_need_video_prompts(pipe) -> None:
    with pytest.raises(ValueError, match="min_motion_accuracy needs embedded-video prompts"):
        hasten.tune(pipe, ["digit 1"], min_motion_accuracy=0.5)
    from hasten.tune.search import video_targets

    assert video_targets(["digit 3 moving left", " digit 0 moving up "]) == ([3, 0], ["left", "up"])
    assert video_targets(["digit 3 moving sideways"]) is None and video_targets([]) is None


def test_slower_than_baseline_trials_are_cut_short(pipe, monkeypatch) -> None:
    """A stack slower than the baseline is stopped at slow_factor x its CPU time, not run to the end."""
    from hasten.tune import SPACE, Entry

    def slow(p, settings, ctx) -> None:
        def pre(m, a) -> None:
            t = time.process_time()
            while time.process_time() - t < 0.05:
                pass

        handles.append(p.transformer.blocks[0].register_forward_pre_hook(pre))

    def unslow(p) -> None:
        while handles:
            handles.pop().remove()

    handles: list = []
    monkeypatch.setitem(SPACE, "slowpoke", Entry("slowpoke", lambda t: {}, dict, slow, unslow))
    r = hasten.tune(pipe, digit_prompts([2]), min_psnr=20.0, seeds=(0,), holdout_seeds=(1000,),
                    features=["slowpoke"], n_trials=1, call_kwargs={"num_inference_steps": STEPS}, progress=False)
    t = r.trials[0]
    assert t.features == {"slowpoke": {}} and not handles
    assert t.error and "slower than 1.2x" in t.error and not t.feasible and r.best is None
    assert t.speedup == pytest.approx(1 / 1.2)


# -- CacheQuant: one calibration per (method, sampling) in a search ------------------------------------------
def test_cachequant_calibrates_once_per_method_and_schedule(pipe, monkeypatch) -> None:
    """Trials that only move CacheQuant's speed-up re-plan from the memoised calibration (one calibration per
    method and schedule), and give exactly what a fresh calibration gives."""
    import hasten.pipelines as hp
    from hasten.tune import SPACE, Context

    calls = []
    orig = hp.calibrate_cachequant
    monkeypatch.setattr(hp, "calibrate_cachequant", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ctx = Context(digit_prompts(DIGITS), call_kwargs={"num_inference_steps": STEPS})
    entry = SPACE["cachequant"]
    outs = {}
    for speedup in (1.5, 2.0, 1.5):
        entry.enable(pipe, {"method": "int8", "speedup": speedup}, ctx)
        try:
            outs.setdefault(speedup, []).append(_gen(pipe, 11))
        finally:
            entry.disable(pipe)
    assert len(calls) == 1 and torch.equal(*outs[1.5])
    hasten.tune.enable_timestep_schedule(pipe, steps=6)  # another schedule: another calibration
    try:
        entry.enable(pipe, {"method": "int8", "speedup": 1.5}, ctx)
        entry.disable(pipe)
    finally:
        hasten.tune.disable_timestep_schedule(pipe)
    assert len(calls) == 2 and ctx.cache["cachequant-calibrations"] == 2
    pipe.enable_cachequant(method="int8", speedup=2.0, calibration_prompts=tuple(digit_prompts(DIGITS)),
                           num_inference_steps=STEPS)  # calibrating afresh, no memo
    try:
        fresh = _gen(pipe, 11)
    finally:
        pipe.disable_cachequant()
    assert torch.equal(fresh, outs[2.0][0]) and features(pipe) == {}
