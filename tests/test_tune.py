"""hasten tune: the search meets its floor on held-out seeds, presets round-trip, bad files fail clearly,
Ctrl-C keeps the best, the timestep schedule is exact when off, and the ComfyUI preset node matches."""

from __future__ import annotations

import json
import math
import re
import statistics
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
                       call_kwargs={"num_inference_steps": STEPS}, repeats=1, progress=False,
                       slow_factor=3.0)  # its one feasible stack, EasyCache at 8 steps, costs ~1x the baseline's CPU


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
    with pytest.raises(ValueError, match="speed_samples must be >= 1"):
        hasten.tune(pipe, ["digit 1"], min_psnr=30, speed_samples=0)
    with pytest.raises(ValueError, match="retime_tol must be >= 0"):
        hasten.tune(pipe, ["digit 1"], min_psnr=30, retime_tol=-0.1)


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


def test_cli_prints_the_worst_item_and_no_verdict_without_singles(tmp_path, capsys) -> None:
    """The CLI's held-out line carries the worst item's PSNR; without ``--compare singles`` nothing was timed
    to read the stack against, so no "best single" verdict is printed."""
    from hasten.cli import main

    assert main(["tune", "--min-psnr", "30", "--trials", "1", "--digits", "1", "--repeats", "1",
                 "--holdout-seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    held = next(line for line in out.splitlines() if line.startswith("held-out"))
    assert re.search(r"PSNR [\d.]+ dB \(worst [\d.]+ dB\)", held), held
    assert "best single" not in out and "no single" not in out and "fewer-steps run" not in out
    saved = json.loads((tmp_path / "tuned.json").read_text())
    assert saved["measured"]["psnr_worst"] <= saved["measured"]["psnr"]


def test_fewer_steps_reference_and_verdict_keep_it_apart_from_singles(pipe, capsys) -> None:
    """``--compare singles`` times plain fewer steps too: a real shorter run (rows at the first block), and
    read as a reference next to the singles, never as one of them."""
    from hasten.bench.runner import BenchRow
    from hasten.bench.variants import fewer_steps
    from hasten.tune.cli import _singles, _verdict

    v = fewer_steps(3)
    v.apply(pipe)
    try:
        with _Rows(pipe) as rows:
            img = _gen(pipe, 3)
    finally:
        v.remove(pipe)
    assert rows.n == 2 * 3 * len(DIGITS) and "set_timesteps" not in vars(pipe.scheduler)
    assert metrics.psnr(img, _gen(pipe, 3)) < 60  # a different, shorter run
    assert [r.name for r in _singles(20, "video") if r.family == "reference"] == [
        "fewer-steps@5", "fewer-steps@6", "fewer-steps@7"]
    rows_ = [BenchRow("baseline", "baseline", {}, speedup=1.0), BenchRow("hasten-tuned", "hasten", {}, speedup=3.0, psnr=31.0),
             BenchRow("hasten-easycache@0.2", "hasten", {}, speedup=2.5, psnr=32.0),
             BenchRow("hasten-easycache@0.3", "hasten", {}, speedup=2.9, psnr=29.0),
             BenchRow("fewer-steps@6", "reference", {}, speedup=3.3, psnr=30.5)]
    _verdict(rows_, 30.0)
    out = capsys.readouterr().out
    assert "best single reaching 30 dB: hasten-easycache@0.2 2.50x (32.00 dB); tuned stack 3.00x = 1.20x" in out
    assert "best plain fewer-steps run reaching 30 dB: fewer-steps@6 3.30x (30.50 dB); tuned stack 3.00x = 0.91x" in out


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


def test_worst_item_floor_catches_one_spoilt_output(pipe, monkeypatch) -> None:
    """One spoilt image among untouched ones: the mean PSNR is infinite and passes any mean floor, the worst
    item's does not; ``min_worst_psnr`` refuses the stack that ``min_psnr`` alone accepts, and the trial's
    worst-item figure is the one measured here independently."""
    from hasten.tune import SPACE, Entry
    from hasten.tune.search import Objective

    handles: list = []

    def spoil(p, settings, ctx) -> None:
        def hook(m, a, out):
            out = out.clone()
            out[0] += 0.5  # batch row 0: the first prompt's branch, whichever way the pipeline batches CFG
            return out

        handles.append(p.transformer.proj_out.register_forward_hook(hook))

    def unspoil(p) -> None:
        while handles:
            handles.pop().remove()

    monkeypatch.setitem(SPACE, "spoil", Entry("spoil", lambda t: {}, dict, spoil, unspoil))
    kw = {"seeds": (0,), "holdout_seeds": (1000,), "features": ["spoil"], "n_trials": 1, "repeats": 1,
          "call_kwargs": {"num_inference_steps": STEPS}, "progress": False, "slow_factor": 3.0}
    mean_only = hasten.tune(pipe, digit_prompts(DIGITS), min_psnr=30.0, **kw)
    t = mean_only.trials[0]
    assert t.feasible and t.psnr == float("inf") and t.psnr_worst < 30.0 and not handles
    base = _gen(pipe, 0)
    spoil(pipe, {}, None)
    try:
        img = _gen(pipe, 0)
    finally:
        unspoil(pipe)
    items = metrics.psnr_items(img, base)
    assert items[1:] == [float("inf")] * (len(DIGITS) - 1) and t.psnr_worst == pytest.approx(items[0])
    assert metrics.psnr_mean_worst(img, base) == (float("inf"), items[0])
    assert mean_only.held_out["psnr_worst"] < 30.0 and mean_only.preset["measured"]["psnr_worst"] < 30.0
    from hasten.bench.report import table
    from hasten.bench.runner import BenchRow

    head, _, _, row = (re.split(r"\s{2,}", line.strip()) for line in
                       table([BenchRow(**r) for r in mean_only.compared]).splitlines()[:4])
    assert row[0] == "hasten-tuned"  # the stack's row shows the worst item, the mean reads "inf"
    assert row[head.index("PSNR dB")] == "inf"
    assert float(row[head.index("worst dB")]) == pytest.approx(mean_only.held_out["psnr_worst"], abs=0.006)
    both = hasten.tune(pipe, digit_prompts(DIGITS), min_psnr=30.0, min_worst_psnr=30.0, **kw)
    assert not both.trials[0].feasible and both.best is None
    obj = Objective(min_psnr=30.0, min_worst_psnr=25.0)
    assert obj.quality() == obj and obj.violations({"psnr": 40.0, "psnr_worst": 20.0}, margin=1.5) == [-8.5, 5.0]
    assert Objective(min_worst_psnr=25.0).met({"psnr_worst": 26.0})


def test_a_diverging_stack_is_a_failed_trial_not_a_crashed_search(video_pipe, monkeypatch) -> None:
    """A stack whose clips hold NaN (a diverging solver, an overflowing kernel) is a failed trial that names the
    cause, and the search goes on to the next; the same outputs in ``hasten bench`` give an error row, not a
    crash after every variant was timed. Before, scipy's sqrtm raised in the Fréchet distance of the task
    score and took the whole search (and bench) down; a NaN baseline is refused up front."""
    from hasten.bench.runner import run_bench, video_scorer
    from hasten.bench.variants import Variant
    from hasten.embedded.video import video_prompts
    from hasten.tune import SPACE, Entry

    handles: list = []

    def diverge(p, settings, ctx) -> None:
        def hook(m, a, out):
            out = out.clone()
            out[0] = float("nan")  # batch row 0: one clip's branch
            return out

        handles.append(p.transformer.proj_out.register_forward_hook(hook))

    def undo(p) -> None:
        while handles:
            handles.pop().remove()

    prompts = video_prompts([3, 7], ["left", "up"])
    monkeypatch.setitem(SPACE, "diverge", Entry("diverge", lambda t: {}, dict, diverge, undo, order=70))
    r = hasten.tune(video_pipe, prompts, min_psnr=20.0, seeds=(0,), holdout_seeds=(1007,),
                    features=["diverge"], n_trials=2, call_kwargs=VIDEO_CALL, repeats=1, progress=False,
                    slow_factor=10.0)  # the stack costs what the baseline does: never stopped as too slow on a busy box
    assert len(r.trials) == 2 and not handles and r.best is None
    assert all(t.error == "non-finite output: 1 of 2 outputs hold NaN/inf values" and not t.feasible
               for t in r.trials)
    clips = lambda p, seed: _video(p, prompts, seed)  # noqa: E731
    rows = run_bench(video_pipe, [Variant("baseline", "baseline"), Variant("nan", "test", lambda p: diverge(p, {}, None),
                                                                             undo)],
                     clips, [0], repeats=1, progress=False, score=video_scorer([3, 7], ["left", "up"]))
    assert rows[0].error is None and rows[0].accuracy is not None and not handles
    assert rows[1].error == "non-finite output: 1 of 2 outputs hold NaN/inf values" and rows[1].psnr is None
    nan = torch.full((4, 3, 16, 16), float("nan"))
    assert math.isnan(metrics.frechet_distance(nan))
    assert metrics.nonfinite(torch.zeros(2, 3)) is None
    diverge(video_pipe, {}, None)
    try:
        with pytest.raises(ValueError, match="the baseline .* gives a non-finite output: 1 of 2"):
            hasten.tune(video_pipe, prompts, min_psnr=20.0, seeds=(0,), holdout_seeds=(1007,), features=[],
                        n_trials=1, call_kwargs=VIDEO_CALL, progress=False)
    finally:
        undo(video_pipe)
    assert features(video_pipe) == {} and not video_pipe.transformer.proj_out._forward_hooks


def test_screening_runs_the_rest_only_for_trials_near_the_floor(pipe, monkeypatch) -> None:
    """Two-stage calibration: a trial runs the first ``screen`` prompts; near the floor it runs the rest and is
    judged on all of them (figures equal to an independent measurement of the whole set), far below it stops
    there, infeasible, having done the screen prompts' work only (rows counted at the first block); speed is
    timed, and re-timed for a contender, on the screen prompts only."""
    from hasten.tune import SPACE, Entry
    from hasten.tune.preset import enable_features
    from hasten.tune.search import default_generate

    kw = {"num_inference_steps": STEPS}
    prompts = digit_prompts(DIGITS)
    sched = SPACE["timestep_schedule"]
    monkeypatch.setitem(SPACE, "four", Entry("four", lambda t: {"steps": 4, "shift": 1.0}, dict,
                                             sched.enable, sched.disable, order=0))

    def rows_of(feats: dict, chunks: list) -> tuple[list, int]:
        names = enable_features(pipe, feats)
        try:
            with _Rows(pipe) as rows:
                outs = [default_generate(kw)(pipe, prompts[lo:hi], lo) for lo, hi in chunks]
        finally:
            disable_features(pipe, names)
        return outs, rows.n

    chunks = [(0, 1), (1, len(DIGITS))]
    base, base_rows = rows_of({}, chunks)
    four, four_rows = rows_of({"four": {"steps": 4, "shift": 1.0}}, chunks)
    _, screen_rows = rows_of({"four": {"steps": 4, "shift": 1.0}}, chunks[:1])
    _, base_screen_rows = rows_of({}, chunks[:1])  # the baseline's speed re-timed once, warm
    ref = metrics.psnr_mean_worst(torch.cat(four), torch.cat(base))
    seen: list = []
    for floor, confirmed in ((5.0, True), (200.0, False)):
        with _Rows(pipe) as rows:
            r = hasten.tune(pipe, prompts, min_psnr=floor, seeds=(0,), holdout_seeds=(1000,), features=["four"],
                            n_trials=1, call_kwargs=kw, repeats=1, progress=False, screen=1, margin_db=0.0,
                            on_trial=lambda t: seen.append(rows.n))
        t = r.trials[0]
        assert t.confirmed is confirmed and t.error is None and r.preset["search"]["screen_prompts"] == 1
        if confirmed:
            assert t.feasible and t.outputs == len(DIGITS) and (t.psnr, t.psnr_worst) == pytest.approx(ref)
            # a contender: its speed timed twice more on the screen prompt, the rest run once
            assert seen[-1] == base_rows + base_screen_rows + four_rows + 2 * screen_rows
            assert r.preset["search"]["confirmed"] == 1 and len(t.cpu_samples) == 3
        else:  # 200 dB - 3 dB of slack: stopped after the screen prompt, never feasible
            assert not t.feasible and t.outputs == 1 and r.best is None and t.psnr < 197.0
            assert seen[-1] == base_rows + base_screen_rows + screen_rows < base_rows + four_rows + base_screen_rows
            assert t.cpu_samples is None
    assert features(pipe) == {}
    with pytest.raises(ValueError, match="screen must be a positive"):
        hasten.tune(pipe, prompts, min_psnr=30.0, screen=0)


def test_a_family_that_changes_nothing_is_left_out_of_the_preset(pipe, monkeypatch) -> None:
    """The stack a video search chose: 5 steps at shift 1.28 + EasyCache 0.0324. At 5 steps EasyCache reuses no
    step (it warns "did nothing" on every call), so the held-out stage drops it and the preset holds the schedule
    alone, with figures measured on that; the schedule, which does change the output, stays."""
    from hasten.tune import SPACE, Entry

    sched, ec = SPACE["timestep_schedule"], SPACE["easycache"]
    five = {"steps": 5, "shift": 1.28}
    cache = {"threshold": 0.0324, "warmup": 0.076, "max_consecutive_reuse": 6, "forecast": "none"}
    monkeypatch.setitem(SPACE, "five", Entry("five", lambda t: five, dict, sched.enable, sched.disable, order=0))
    monkeypatch.setitem(SPACE, "ec", Entry("ec", lambda t: cache, dict, ec.enable, ec.disable, order=50))
    r = hasten.tune(pipe, digit_prompts(DIGITS), min_psnr=5.0, seeds=(0,), holdout_seeds=(1000,),
                    features=["five", "ec"], n_trials=1, call_kwargs={"num_inference_steps": STEPS}, repeats=1,
                    progress=False)
    assert r.trials[0].features == {"five": five, "ec": cache}
    assert r.held_out["dropped"] == {0: ["ec"]} and r.held_out["met"]
    assert r.preset["features"] == {"five": five} and r.best.features == r.preset["features"]
    assert features(pipe) == {}


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


# -- held-out candidates: diverse, not neighbours of one schedule ----------------------------------------------
def _fake(number: int, speedup: float, psnr: float, **features):
    from hasten.tune.search import Trial

    return Trial(number, features, speedup=speedup, psnr=psnr, feasible=True)


def test_held_out_pool_is_diverse_not_near_duplicates() -> None:
    """The top of a search is often one schedule at several shifts (the run that overfitted one seed: its 3
    candidates were 5-step schedules at shifts 1.70-2.06, and all failed held-out). The pool takes one per
    structure, at most 2 per step count, best first, and fills with repeats only when it must."""
    from hasten.tune.search import Objective, candidate_pool, structure

    sched = lambda n, sh: {"steps": n, "shift": sh}  # noqa: E731
    trials = [
        _fake(0, 3.46, 36.6, timestep_schedule=sched(5, 1.88)),
        _fake(1, 3.43, 36.7, timestep_schedule=sched(5, 1.70)),
        _fake(2, 3.41, 36.8, timestep_schedule=sched(5, 2.06)),
        _fake(3, 3.30, 36.9, timestep_schedule=sched(5, 1.97), easycache={"threshold": 0.1, "warmup": 0.2}),
        _fake(4, 3.27, 37.0, timestep_schedule=sched(5, 1.90), quantize={"method": "int8"}),
        _fake(5, 2.98, 38.6, timestep_schedule=sched(6, 1.3)),
        _fake(6, 2.90, 38.0, timestep_schedule=sched(6, 1.2)),
        _fake(7, 2.63, 39.8, timestep_schedule=sched(7, 1.0)),
        _fake(8, 1.70, 44.8, easycache={"threshold": 0.1, "warmup": 0.2}),
    ]
    infeasible = _fake(9, 9.0, 20.0, timestep_schedule=sched(3, 1.0))
    infeasible.feasible = False
    obj = Objective(min_psnr=35.0)
    pool = candidate_pool([*trials, infeasible], obj, 4)
    assert [t.number for t in pool] == [0, 3, 5, 7]  # fastest first; 2 of 5 steps, then 6 and 7 steps
    assert len({structure(t.features) for t in pool}) == 4
    old = [t.number for t in sorted(trials, key=obj.score, reverse=True)[:3]]  # the previous rule
    assert old == [0, 1, 2] and len({structure(trials[i].features) for i in old}) == 1
    # a search that found only one structure still gets `n` candidates: its next best shifts
    assert [t.number for t in candidate_pool(trials[:3], obj, 4)] == [0, 1, 2]
    assert candidate_pool([infeasible], obj, 4) == []


def test_held_out_takes_the_fastest_that_passes(monkeypatch) -> None:
    """The held-out stage checks the diverse pool fastest first until three pass: here the two 5-step stacks fail
    (as overfitted ones do), the 6- and 7-step ones pass and are timed side by side, and the interleaved timing,
    not the search's one CPU-time sample, picks between them; the other finalist is shown apart from the singles.
    With one finalist the first that passes is kept, untimed against the others."""
    import hasten.bench.runner as runner
    from hasten.tune.cli import _verdict
    from hasten.tune.search import Objective, TuneResult, _held_out

    sched = lambda n, sh: {"steps": n, "shift": sh}  # noqa: E731
    held_psnr = {5: 34.5, 6: 36.4, 7: 37.9}
    wall = {6: 2.0, 7: 2.3}  # the 7-step stack is faster when timed interleaved (the search sampled it slower)
    checked: list = []

    class Row:
        def __init__(self, v) -> None:
            feats = v.settings.get("features") or {}
            steps = feats.get("timestep_schedule", {}).get("steps")
            self.name, self.family, self.settings = v.name, v.family, v.settings
            self.psnr = held_psnr[steps] if steps else (31.0 if v.family == "single" else None)
            self.psnr_worst = self.psnr - 2.0 if self.psnr else None
            self.speedup = wall.get(steps, 1.0) if steps else (1.5 if v.family == "single" else 1.0)
            self.median_s, self.ssim, self.accuracy = 1.0 / self.speedup, 0.99, None
            self.motion_accuracy, self.forwards_per_image, self.error = None, 12.0, None

        def to_dict(self) -> dict:
            return dict(vars(self))

    def fake_bench(pipe, variants, gen, seeds, repeats, progress, score):
        if repeats == 1:
            checked.append(variants[1].settings["features"]["timestep_schedule"]["steps"])
        return [Row(v) for v in variants]

    monkeypatch.setattr(runner, "run_bench", fake_bench)
    from hasten.bench.variants import Variant

    for finalists, want_checked, want in ((2, [5, 5, 6, 7], 4), (1, [5, 5, 6], 3)):
        checked.clear()
        trials = [_fake(0, 3.5, 36.6, timestep_schedule=sched(5, 1.9)),
                  _fake(1, 3.4, 36.7, timestep_schedule=sched(5, 1.7)),
                  _fake(2, 3.3, 36.6, timestep_schedule=sched(5, 1.8), easycache={"threshold": 0.1}),
                  _fake(3, 2.9, 38.6, timestep_schedule=sched(6, 1.3)),
                  _fake(4, 2.6, 39.8, timestep_schedule=sched(7, 1.0))]
        result = TuneResult({"features": trials[0].features}, trials[0], trials, 1.0)
        _held_out(result, None, Objective(min_psnr=35.0), None, ["p"], None, [7], None, 4, 3,
                  (Variant("single-x", "single"),), 1.5, finalists=finalists)
        assert checked == want_checked and result.best is trials[want] and result.held_out["met"]
        assert result.preset["features"] == trials[want].features and result.held_out["trial"] == want
        names = [r["name"] for r in result.compared]
        assert names[:2] == ["baseline", "hasten-tuned"] and names[-1] == "single-x"
        assert result.held_out["speedup_wall"] == wall[want + 3]
    assert names == ["baseline", "hasten-tuned", "single-x"]
    checked.clear()
    _held_out(result := TuneResult({"features": {}}, trials[0], trials, 1.0), None, Objective(min_psnr=35.0), None,
              ["p"], None, [7], None, 4, 3, (Variant("single-x", "single"),), 1.5)
    assert [r["name"] for r in result.compared] == ["baseline", "hasten-tuned", "tune-finalist#3", "single-x"]
    assert [f["trial"] for f in result.held_out["finalists"]] == [3, 4]
    from hasten.bench.runner import BenchRow

    rows = [BenchRow(**{k: v for k, v in r.items() if k in BenchRow.__dataclass_fields__}) for r in result.compared]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _verdict(rows, 30.0)  # the finalist (2.0x) is not read as a single; single-x (1.5x) is
    assert "best single reaching 30 dB: single-x 1.50x" in out.getvalue()
    assert "forwards per output 12.0 vs 12.0: 1.00x fewer" in out.getvalue()  # the steadier figure, shown too


def test_trials_slower_than_the_best_so_far_are_cut(pipe) -> None:
    """Under a quality floor a trial is stopped once it is cut_factor x slower than the best feasible stack (it
    can no longer be chosen); under a speed target once it is too slow for the target."""
    from hasten.tune import Context
    from hasten.tune.search import Objective, Trial, _cap, _Evaluator, default_generate

    ev = _Evaluator(pipe, digit_prompts([2]), [0], default_generate({"num_inference_steps": STEPS}), None, Context())
    try:
        ev.cap = _cap(Objective(min_psnr=30.0), Trial(0, {}, speedup=4.0), ev.base_cpu, 1.25)
        assert ev.cap[0] == pytest.approx(1.25 * ev.base_cpu / 4)
        with _Rows(pipe) as rows:  # all 8 steps at another shift: about the baseline's time, > 1/3.2 of it
            t = ev.trial(1, {"timestep_schedule": {"steps": STEPS, "shift": 1.5}})
        assert t.error == "stopped: slower than 1.25x the best stack so far (trial 0, 4.00x)" and t.psnr is None
        assert t.speedup == pytest.approx(3.2) and rows.n < 2 * STEPS
        assert features(pipe) == {}
    finally:
        ev.close()
    assert _cap(Objective(speedup=2.0), None, 10.0, 1.25)[0] == pytest.approx(5.25)
    assert _cap(Objective(min_psnr=30.0), None, 10.0, 1.25) is None


def test_easycache_search_keeps_its_forecast_and_reuse_cap() -> None:
    """A trial choosing forecast "none" gets "none" (it used to be dropped, leaving the default "linear"), and
    the reuse cap, which bounds EasyCache's saving, is searched."""
    import optuna

    from hasten.caches import EasyCacheConfig
    from hasten.tune import SPACE

    study = optuna.create_study()
    study.enqueue_trial({"easycache.on": True, "easycache.threshold": 0.2, "easycache.warmup": 0.1,
                         "easycache.max_reuse": 6, "easycache.forecast": "none"})
    s = SPACE["easycache"].suggest(study.ask())
    assert s == {"threshold": 0.2, "warmup": 0.1, "max_consecutive_reuse": 6, "forecast": "none"}
    cfg = SPACE["easycache"].validate(s)
    assert isinstance(cfg, EasyCacheConfig) and cfg.forecast == "none" and cfg.max_consecutive_reuse == 6


def test_video_start_points_cover_the_obvious_stacks() -> None:
    """The video search is seeded with the bench's best single (EasyCache 0.2 w0.1 r6), shifted fewer steps,
    and a cache on top of fewer steps, of guidance and of bottleneck stages; every point is in the space."""
    from hasten.tune.search import _start_points
    from hasten.tune.space import default_features

    pts = _start_points(default_features("video"), 20, video=True)
    assert pts[0]["easycache.on"] and pts[0]["easycache.threshold"] == 0.2 and pts[0]["easycache.max_reuse"] == 6
    assert {"schedule.steps": 6, "schedule.shift": 1.6}.items() <= pts[2].items()
    assert any(p["easycache.on"] and p["schedule.steps"] < 20 for p in pts)
    assert any(p["easycache.on"] and p["guidance.mode"] == "ag" for p in pts)
    assert any(p["easycache.on"] and p["bottleneck.on"] for p in pts)
    assert all(5 <= p["schedule.steps"] <= 20 for p in pts)
    plain = {p["schedule.steps"] for p in pts if p["schedule.shift"] == 1.0 and not p["easycache.on"]
             and p["guidance.mode"] == "off"}
    assert {5, 6, 7} <= plain  # the reference rows of --compare singles (fewer-steps@5/6/7) are tried
    # the 16-clip frontier point: 6 steps with CFG on the first 70 % only (11 forwards)
    assert any(p["schedule.steps"] == 6 and p["guidance.mode"] == "truncate" and p["guidance.truncate"] == 0.7
               and not p["easycache.on"] for p in pts)


def test_default_search_leaves_out_what_a_cpu_never_speeds_up() -> None:
    """On a CPU the search drops sparse attention (a GPU kernel: every such trial was stopped as too slow)
    and quantization (never faster there); on a GPU they stay, and naming them searches them anyway."""
    from hasten.tune.space import SPACE, default_features, entries

    assert "sparse_attention" in default_features("video")
    cpu = default_features("video", "cpu")
    assert "sparse_attention" not in cpu and {"timestep_schedule", "easycache", "bottleneck_sampling"} <= set(cpu)
    # quantization too: int8 weights dequantize per call and W8A8 is a reference path there (measured slower)
    assert "quantize" in default_features("image") and "quantize" not in cpu
    assert default_features("image", "cpu") == [n for n in default_features("image") if n != "quantize"]
    assert [e.name for e in entries(["sparse_attention", "quantize"])] == ["quantize", "sparse_attention"]
    assert SPACE["sparse_attention"].why_not_on_cpu and SPACE["quantize"].why_not_on_cpu


def test_one_unlucky_timing_does_not_decide_the_search(pipe, monkeypatch) -> None:
    """A trial that could be the answer is timed three times and ranked by the median, so one unlucky CPU-time
    sample (another job on the box) no longer makes a 6-step stack look faster than a 3-step one; a trial far
    behind keeps its one sample. The baseline's cold first generation is not the speed reference either."""
    import hasten.tune.search as search

    pts = [{"schedule.steps": 3, "schedule.shift": 1.0}, {"schedule.steps": 6, "schedule.shift": 1.0}]
    monkeypatch.setattr(search, "_start_points", lambda names, steps, video=False: pts)
    base = search.default_generate({"num_inference_steps": STEPS})
    calls: list = []

    def noisy(p, prompts, seed):  # the 3-step stack's first run meets a busy box: three times its CPU time
        t0 = time.process_time()
        out = base(p, prompts, seed)
        on = features(p).get("timestep_schedule")
        steps = on.config.steps if on else None
        calls.append(steps)
        if steps == 3 and calls.count(3) == 1:
            spent = time.process_time() - t0
            while time.process_time() - t0 < 3 * spent:
                pass
        return out

    prompts = digit_prompts([3])
    for samples in (1, 3):
        calls.clear()
        r = hasten.tune(pipe, prompts, min_psnr=5.0, seeds=(0,), holdout_seeds=(1000,),
                        features=["timestep_schedule"], n_trials=2, steps=STEPS, generate=noisy, margin_db=0.0,
                        repeats=1, progress=False, speed_samples=samples, candidates=1, cut_factor=3.0)
        fast, slow = r.trials
        assert calls[:2] == [None, None]  # the baseline twice before any trial: the cold run is not kept
        assert slow.cpu_samples is None and slow.error is None  # twice the forwards: far behind, one sample
        if samples == 1:  # one sample each: the unlucky one decides, and the 6-step stack wins the search
            assert fast.cpu_samples is None
            assert slow.speedup > fast.speedup and r.best is slow
        else:
            assert len(fast.cpu_samples) == 3 and fast.cpu_s == statistics.median(fast.cpu_samples)
            assert calls[2:6] == [3, 3, 3, 6]
            assert fast.speedup > slow.speedup * 1.1 and r.best is fast
        assert r.best.features["timestep_schedule"]["steps"] == (6 if samples == 1 else 3)
