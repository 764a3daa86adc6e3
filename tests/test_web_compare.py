"""The demo's comparison logic without a browser, on a tiny random Wan pipeline."""

from __future__ import annotations

import argparse
import math
import threading

import pytest
import torch
from web_tiny import tiny_handle

from hasten import metrics
from hasten.bench.variants import Variant
from hasten.embedded import WEIGHTS_DIR
from hasten.errors import UnsupportedModelError
from hasten.pipelines import features
from hasten.web import compare
from hasten.web.compare import (
    GenerationRequest,
    ModelCache,
    ModelHandle,
    ModelLoadError,
    OutOfMemory,
    display_image,
    load_model,
    metrics_table,
    parse_thresholds,
    run_comparison,
    run_sweep,
    sweep_figure,
    timeline_figure,
)
from hasten.web.panels import PANELS, Control, compose, configuration

REQ = GenerationRequest(digit=3, seed=1, steps=10, guidance=4.0)


class _ReadsThree:
    """Stands in for the digit classifier (fitting the real one takes 10-30 s): reads every image as a 3."""

    def predict(self, images):
        return torch.full((len(images),), 3)

    def features(self, images):
        return metrics._digit_features(images)[:, ::16]


@pytest.fixture(autouse=True)
def _stub_classifier(monkeypatch):
    monkeypatch.setattr(compare, "digit_classifier", lambda: _ReadsThree())
    monkeypatch.setattr(metrics, "digit_classifier", lambda: _ReadsThree())


@pytest.fixture(scope="module")
def handle() -> ModelHandle:
    return tiny_handle()


def _ec(slot: str, threshold: float) -> Variant:
    return configuration(slot, {"easycache": {"threshold": threshold}})


def _restored(h: ModelHandle) -> bool:
    return features(h.pipe) == {} and h.pipe.transformer.forward.__name__ != "new_forward"


def test_comparison_figures(handle):
    progress = []
    comp = run_comparison(handle, REQ, [_ec("A", 0.0), _ec("B", 0.5)], on_progress=lambda f, d: progress.append(f))
    base, off, fast = comp.runs
    assert [r.name for r in comp.runs] == ["baseline", "A: easycache@0", "B: easycache@0.5"]
    assert base.forwards == 20 and base.speedup == pytest.approx(1.0) and base.psnr is None
    # threshold 0 is bit-identical to the baseline; the cache skipped forwards at 0.5
    assert torch.equal(off.image, base.image) and off.forwards == 20 and math.isinf(off.psnr)
    assert off.ssim == pytest.approx(1.0)
    assert fast.forwards < 20 and math.isfinite(fast.psnr) and fast.psnr > 20 and 0 < fast.ssim <= 1
    assert all(r.seconds > 0 and r.error is None for r in comp.runs)
    # the timeline: one row per branch, computed decisions add up to the counted forwards
    assert set(fast.timeline) == {"easycache/cond[0]", "easycache/uncond[0]"}
    assert all(len(d) == 10 for d in fast.timeline.values())
    assert sum(sum(d) for d in fast.timeline.values()) == fast.forwards
    assert all(all(d) for d in off.timeline.values()) and base.timeline == {}
    # the digit column, progress reaching the end, and nothing left on the pipeline
    assert base.digit_read == 3 and base.digit_ok is True
    assert progress[-1] == pytest.approx(1.0) and progress == sorted(progress)
    assert _restored(handle)
    # the baseline is what a plain generation of the same seed gives
    assert torch.equal(base.image, handle.generate(REQ)[0])


def test_interleaved_timing_repeats(handle):
    calls = []
    one = run_comparison(handle, REQ, [_ec("A", 0.5)])
    three = run_comparison(handle, REQ, [_ec("A", 0.5)], repeats=3, on_progress=lambda f, d: calls.append(d))
    assert sum("(repeat 3/3)" in d for d in calls) == 2 * REQ.steps  # baseline and A, third round
    for a, b in zip(one.runs, three.runs):
        assert torch.equal(a.image, b.image) and a.forwards == b.forwards and b.seconds > 0
    with pytest.raises(ValueError, match=r"timing repeats must be in \[1, 10\]"):
        run_comparison(handle, REQ, [], repeats=0)
    assert _restored(handle)


def test_table_timeline_and_display(handle):
    comp = run_comparison(handle, REQ, [_ec("A", 0.0), _ec("B", 0.5)])
    headers, rows = metrics_table(comp)
    assert headers[-1] == "digit read" and len(rows) == 3
    assert rows[0][:4] == ["baseline", rows[0][1], "1.00x", "20"] and rows[1][4] == "inf (identical)"
    assert rows[2][6] == "reads as 3" and float(rows[2][4]) > 20  # one image: a reading, not an accuracy
    assert not any("%" in r[6] for r in rows)
    fig = timeline_figure(comp)
    assert len(fig.axes[0].get_yticklabels()) == 1 + 2 + 2  # baseline + two branches per config
    img = display_image(comp.baseline.image)
    assert img.size == (256, 256)  # 16 px upscaled by whole pixels
    px = torch.from_numpy(__import__("numpy").array(img))[::16, ::16]
    assert torch.equal(px, (comp.baseline.image.permute(1, 2, 0) * 255).round().to(torch.uint8))


def test_failing_config_is_isolated(handle):
    def boom(pipe):
        raise UnsupportedModelError("this family supports only X")

    removed = []
    bad = Variant("A: broken", "hasten", boom, lambda p: removed.append(1))
    comp = run_comparison(handle, REQ, [bad, _ec("B", 0.5)])
    assert comp.runs[1].error == "UnsupportedModelError: this family supports only X" and comp.runs[1].image is None
    assert comp.runs[2].error is None and comp.runs[2].forwards < 20
    assert removed == [1] and _restored(handle)  # removed even though apply failed
    _, rows = metrics_table(comp)
    assert rows[1][1].startswith("failed: UnsupportedModelError")


def test_out_of_memory_is_reported(handle):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    h = ModelHandle("oom", handle.pipe, oom, digits=True, default_size=16, size_fixed=True, warm=True)
    with pytest.raises(OutOfMemory, match="out of memory at 16 px, 10 steps: lower the size"):
        run_comparison(h, REQ, [_ec("A", 0.3)])
    assert _restored(h)


def test_validation_messages(handle):
    text = ModelHandle("text", handle.pipe, handle.generate_fn, default_size=512)
    cases = [
        (handle, GenerationRequest(digit=None), "pick a digit in 0..9"),
        (handle, GenerationRequest(digit=12), "pick a digit in 0..9"),
        (text, GenerationRequest(prompt="   "), "the prompt is empty"),
        (handle, GenerationRequest(digit=1, steps=0), r"steps must be in \[1, 150\]"),
        (handle, GenerationRequest(digit=1, guidance=-1), r"guidance scale must be in \[0, 30\]"),
        (handle, GenerationRequest(digit=1, seed=-5), r"seed must be in \[0, 2147483647\], got -5"),
        (text, GenerationRequest(prompt="a cat", size=8), r"size must be in \[64, 2048\]"),
        (text, GenerationRequest(prompt="a cat", size=100), "multiple of 16"),
    ]
    for h, req, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run_comparison(h, req, [])
    with pytest.raises(ValueError, match="at most 3"):
        run_comparison(handle, REQ, [_ec(s, 0.1) for s in "ABCD"])
    ok = text.validate(GenerationRequest(prompt="a cat", size=None))
    assert ok.size == 512  # the model's default size
    assert handle.validate(GenerationRequest(digit=2, size=999)).size == 16  # fixed-size model ignores size


def test_panels_registry():
    spec = PANELS["easycache"]
    assert spec.defaults(0)["threshold"] == 0.1 and spec.enabled_by_default(0) and not spec.enabled_by_default(2)
    v = spec.variant({"threshold": 0.25})
    assert v.settings["threshold"] == 0.25 and v.settings["max_consecutive_reuse"] == 4
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2"):
        spec.variant({"threshold": 2})
    with pytest.raises(ValueError, match="expected a number"):
        spec.variant({"threshold": "x"})
    assert configuration("A", {"easycache": None}) is None
    with pytest.raises(ValueError, match="unknown acceleration family 'nope'; available: easycache"):
        configuration("A", {"nope": {}})
    assert Control("n", "n", "dropdown", "a", choices=("a", "b")).check("b") == "b"
    assert Control("k", "k", default=4, minimum=0, maximum=9).check(3.0) == 3  # int default -> int


def test_compose_removes_in_reverse_and_after_failed_apply():
    log = []

    def part(name, fail=False):
        def apply(p):
            if fail:
                raise RuntimeError(name)
            log.append(f"+{name}")

        return Variant(name, "hasten", apply, lambda p: log.append(f"-{name}"))

    both = compose("A", [part("x"), part("y")])
    both.apply(None)
    both.remove(None)
    assert log == ["+x", "+y", "-y", "-x"]
    log.clear()
    broken = compose("B", [part("x"), part("y", fail=True)])
    with pytest.raises(RuntimeError):
        broken.apply(None)
    assert log == ["+x", "-x"]


def test_two_requests_at_once_match_serial(handle):
    """Two threads on one pipeline (the per-pipeline lock): each result equals the same request run alone."""
    jobs = [(GenerationRequest(digit=1, seed=5, steps=10), 0.0), (GenerationRequest(digit=7, seed=9, steps=10), 0.5)]
    serial = [run_comparison(handle, r, [_ec("A", t)]) for r, t in jobs]
    out: dict[int, compare.Comparison] = {}

    def work(i):
        r, t = jobs[i]
        out[i] = run_comparison(handle, r, [_ec("A", t)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(2):
        for a, b in zip(out[i].runs, serial[i].runs):
            assert torch.equal(a.image, b.image) and a.forwards == b.forwards and a.timeline == b.timeline
    assert out[0].runs[1].forwards == 20 and out[1].runs[1].forwards < 20
    assert _restored(handle)


def test_sweep_uses_bench_runner(handle):
    rows = run_sweep(handle, REQ, parse_thresholds("0.5, 0.1"), repeats=1)
    assert [r.name for r in rows] == ["baseline", "hasten-easycache@0.1", "hasten-easycache@0.5"]
    assert rows[0].forwards_per_image == 20 and rows[2].forwards_per_image < 20
    assert rows[0].accuracy == pytest.approx(0.1)  # ten digits generated, the stub reads every one as a 3
    assert all(r.speedup and r.error is None for r in rows) and rows[1].psnr is not None
    assert all(math.isfinite(r.frechet) for r in rows)
    fig = sweep_figure(rows, handle, REQ)
    assert "EasyCache sweep" in fig.axes[0].get_title()
    assert _restored(handle)
    for bad, msg in (("", "between 1 and 8"), ("0.1, x", "numbers separated"), ("0, 0.2", "each threshold")):
        with pytest.raises(ValueError, match=msg):
            parse_thresholds(bad)


def test_model_cache_and_loading_errors(tmp_path, handle):
    calls = []

    def factory(name):
        calls.append(name)
        if name == "tiny":
            return handle
        if name == "plain":
            return handle.pipe  # a bare pipeline gets a generic diffusers handle
        raise OSError("not found")

    cache = ModelCache(factory)
    assert cache.get("tiny") is cache.get("tiny") and calls == ["tiny"]
    plain = cache.get("plain")
    assert plain.pipe is handle.pipe and not plain.digits and plain.default_size % 16 == 0
    with pytest.raises(ModelLoadError, match="could not load 'missing': OSError: not found"):
        cache.get("missing")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model(" ")


def test_cli_arguments():
    from hasten.web.app import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.model == "embedded"
    assert p.parse_args(["--share", "--port", "9000"]).port == 9000


def test_build_app_wires_events(handle):
    pytest.importorskip("gradio")
    from hasten.web.app import build_app

    demo = build_app(lambda name: handle)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    assert {"compare", "sweep", "load"} <= names


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(),
                    reason="embedded weights not trained yet (hasten train-embedded)")
def test_embedded_model_end_to_end():
    h = ModelCache().get("embedded")
    comp = run_comparison(h, GenerationRequest(digit=4, seed=0, steps=6), [_ec("A", 0.0)])
    assert comp.baseline.image.shape == (3, 32, 32) and torch.equal(comp.runs[1].image, comp.baseline.image)
    assert comp.baseline.forwards == 12 and _restored(h)


def test_prompted_path_on_untrained_embedded_architecture():
    """``diffusers_generate`` through a real tokenizer + text encoder: the embedded model's architecture at
    random init (the trained weights may not exist yet), with the embedded handle's digit prompts."""
    from diffusers import WanPipeline

    from hasten.embedded.train import build_components
    from hasten.web.compare import embedded_handle

    comp = build_components(argparse.Namespace(seed=0, heads=2, head_dim=16, ffn=32, layers=1))
    pipe = WanPipeline(**comp)
    pipe.set_progress_bar_config(disable=True)
    h = embedded_handle(pipe)
    steps = []
    img = h.generate(GenerationRequest(digit=5, seed=2, steps=3), on_step=steps.append)
    assert img.shape == (1, 3, 32, 32) and 0 <= img.min() and img.max() <= 1 and steps == [0, 1, 2]
    cmp = run_comparison(h, GenerationRequest(digit=5, seed=2, steps=4), [_ec("A", 0.0)])
    assert torch.equal(cmp.runs[1].image, cmp.baseline.image) and cmp.baseline.forwards == 8
    assert torch.equal(cmp.baseline.image, h.generate(GenerationRequest(digit=5, seed=2, steps=4))[0])
    two = h.generate(GenerationRequest(digit=5, seed=2, steps=4), prompts=["digit 5", "digit 1"])
    assert torch.allclose(two[0], cmp.baseline.image, atol=1e-4)  # item i uses seed + i, whatever the batch


def test_load_model_from_local_folder(tmp_path):
    """A local diffusers folder loads through the generic path (free prompt, size from the config)."""
    from diffusers import WanPipeline

    from hasten.embedded.train import build_components

    WanPipeline(**build_components(argparse.Namespace(seed=0, heads=2, head_dim=16, ffn=32, layers=1))).save_pretrained(
        tmp_path / "pipe")
    h = ModelCache().get(str(tmp_path / "pipe"))
    assert not h.digits and not h.size_fixed and h.default_size % 16 == 0
    comp = run_comparison(h, GenerationRequest(prompt="digit 3", seed=0, steps=3, size=64), [_ec("A", 0.5)])
    assert comp.baseline.image.shape == (3, 64, 64) and comp.baseline.forwards == 6
    headers, _ = metrics_table(comp)
    assert "digit read" not in headers  # only the embedded model is scored as digits


@pytest.mark.parametrize("family", ["guidance", "bottleneck", "sparse", "quant"])
def test_every_family_panel_runs_and_restores(handle, family):
    """Each family's panel, at its defaults, runs a comparison on the tiny Wan pipeline and leaves nothing on."""
    spec = PANELS[family]
    variant = configuration("A", {family: spec.defaults(0)})
    before = [p.detach().clone() for p in handle.pipe.transformer.parameters()]
    result = run_comparison(handle, REQ, [variant])
    assert result.runs[0].error is None
    if family == "bottleneck":  # 16 px -> a 2x2 latent: halving it breaks the patch size, said in the row
        assert "multiple" in result.runs[1].error and "patch" in result.runs[1].error
    else:
        assert result.runs[1].error is None and result.runs[1].image is not None
    assert features(handle.pipe) == {}
    after = list(handle.pipe.transformer.parameters())
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


def test_whole_numbers_and_ranges_are_refused_not_rounded(handle):
    """2.5 steps through the API is refused (not rounded); 0 and 100000 are refused (not clamped)."""
    for steps, msg in ((2.5, "steps must be a whole number, got 2.5"), (0, r"steps must be in \[1, 150\], got 0"),
                       (100000, r"steps must be in \[1, 150\], got 100000"), (float("nan"), "whole number")):
        with pytest.raises(ValueError, match=msg):
            run_comparison(handle, GenerationRequest(digit=3, steps=steps), [])
    with pytest.raises(ValueError, match="seed must be a whole number"):
        run_comparison(handle, GenerationRequest(digit=3, seed=1.5), [])
    assert handle.validate(GenerationRequest(digit=3, steps=20.0, seed=2.0)).steps == 20  # a number box's 20.0


def test_speedup_spread_over_interleaved_rounds(handle):
    comp = run_comparison(handle, REQ, [_ec("A", 0.5)], repeats=3)
    base, fast = comp.runs
    assert len(fast.speedups) == 3 and base.speedups == pytest.approx([1.0] * 3)
    lo, hi = fast.speedup_range
    assert lo <= fast.speedup <= hi and fast.speedup == pytest.approx(sorted(fast.speedups)[1])
    _, rows = metrics_table(comp)
    assert rows[1][2] == f"{fast.speedup:.2f}x ({lo:.2f}-{hi:.2f})" and rows[0][2] == "1.00x"


def test_should_stop_cancels_between_steps_and_releases(handle):
    steps = []

    def stop() -> bool:
        return len(steps) >= 3

    with pytest.raises(compare.Cancelled, match="cancelled at"):
        run_comparison(handle, GenerationRequest(digit=3, seed=1, steps=40), [_ec("A", 0.3)],
                       on_progress=lambda f, d: steps.append(d), should_stop=stop)
    assert len(steps) == 3  # three steps of the baseline ran, then it stopped
    assert handle.lock.acquire(blocking=False)  # the pipeline is free again
    handle.lock.release()
    assert _restored(handle)


def test_hub_id_offline_message(monkeypatch):
    """A hub id that is not cached offline: say so and how to get it, never 'pass local_files_only=False'."""
    import diffusers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' ... pass `local_files_only=False` ...")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model")
    msg = str(info.value)
    assert "not available offline" in msg and "local_files_only" not in msg and "folder" in msg
    with pytest.raises(ModelLoadError, match="no such folder: /nowhere/model"):
        load_model("/nowhere/model")


# ----------------------------------------------------- issue 13's panels: Δ-DiT, ProfilingDiT, SADA, CacheQuant
NEW = {  # family -> (settings that skip work, settings that are off, the pipeline method)
    "delta_dit": ({"interval": 2}, {"interval": 1}, "delta_dit"),
    "profiling_dit": ({"threshold": 0.5}, {"threshold": 0.0}, "profiling_dit"),
    "sada": ({"max_interval": 2, "threshold": 0.5}, {"max_interval": 0}, "sada"),
    "easycache": ({"threshold": 0.3, "forecast": "quadratic"}, {"threshold": 0.0, "forecast": "quadratic"},
                  "easycache"),
}


def _direct(h: ModelHandle, method: str, settings: dict, req: GenerationRequest = REQ) -> torch.Tensor:
    """The image the library gives with ``pipe.enable_<method>(**settings)`` (then disabled again)."""
    getattr(h.pipe, f"enable_{method}")(**settings)
    try:
        return h.generate(h.validate(req))[0]
    finally:
        getattr(h.pipe, f"disable_{method}")()


@pytest.mark.parametrize("family", list(NEW))
def test_new_panels_match_the_library_and_off_is_identical(handle, family):
    """Each new panel gives the image of enable_* called directly with the same settings (mapped 1:1), skips
    real work (forwards counted at the blocks), is bit-identical to the baseline when off, and restores."""
    on, off, method = NEW[family]
    spec = PANELS[family]
    before = [p.detach().clone() for p in handle.pipe.transformer.parameters()]
    comp = run_comparison(handle, REQ, [configuration("A", {family: {**spec.defaults(2), **on}}),
                                        configuration("B", {family: {**spec.defaults(2), **off}})])
    base, fast, same = comp.runs
    assert fast.error is None and same.error is None
    settings = spec.variant({**spec.defaults(2), **on}).settings
    assert all(settings[k] == v for k, v in on.items())  # each control is the enable_* argument of that name
    assert torch.equal(fast.image, _direct(handle, method, settings))
    assert fast.forwards < base.forwards == 20 and math.isfinite(fast.psnr)
    assert torch.equal(same.image, base.image) and same.forwards == 20 and math.isinf(same.psnr)
    # the timeline: one row per branch; block caches record the share of blocks computed per step
    assert fast.timeline and sum(sum(d) for d in fast.timeline.values()) == pytest.approx(fast.forwards)
    assert len(timeline_figure(comp).axes[0].get_yticklabels()) == 1 + len(fast.timeline) + len(same.timeline)
    assert _restored(handle)
    assert all(torch.equal(a, b) for a, b in zip(handle.pipe.transformer.parameters(), before))


def test_panel_defaults_are_the_librarys():
    from hasten.caches import EasyCacheConfig
    from hasten.caches.blockcache import DeltaDiTConfig, ProfilingDiTConfig
    from hasten.caches.cachequant import CacheQuantConfig
    from hasten.caches.sada import SADAConfig

    for family, cls in (("delta_dit", DeltaDiTConfig), ("profiling_dit", ProfilingDiTConfig), ("sada", SADAConfig),
                        ("cachequant", CacheQuantConfig), ("easycache", EasyCacheConfig)):
        lib = cls()
        for name, value in PANELS[family].defaults(2).items():
            if family == "easycache" and name == "threshold":
                continue  # slots start at their own thresholds (0.1 / 0.3 / 0.5)
            want = getattr(lib, name, None)
            if name == "num_cached_blocks" and want is None:
                want = "half"  # None: half of the model's blocks
            if name == "speedup" and want is None:
                want = 2.0  # None: the library's default schedule, speed-up 2
            assert value == want, (family, name)
    assert CacheQuantConfig().computed_for(10) == 5  # speed-up 2 is the library's default schedule


def _context(h: ModelHandle, req: GenerationRequest = REQ, store=None):
    from hasten.web.panels import CalibrationStore, PanelContext

    return PanelContext(h, h.validate(req), store if store is not None else CalibrationStore())


def test_cachequant_panel_calibrates_once_and_matches_the_library(handle):
    """CacheQuant calibrates once per (model, method, steps) in the app's store, with progress, and gives the
    image of calibrate_cachequant + enable_cachequant called directly."""
    from dataclasses import replace

    import hasten

    seeds = []
    inner = handle.generate_fn

    def counting(pipe, request, prompts, on_step=None):
        seeds.append(request.seed)
        return inner(pipe, request, prompts, on_step)

    handle.generate_fn = counting
    try:
        progress = []
        ctx = _context(handle)
        ctx.progress = lambda f, d: progress.append((f, d))
        values = {**PANELS["cachequant"].defaults(0), "speedup": 2.0}
        comp = run_comparison(handle, REQ, [configuration("A", {"cachequant": values}, ctx)])
        base, cq = comp.runs
        assert cq.error is None and cq.forwards == 10 < base.forwards  # 5 of 10 steps computed, both branches
        assert seeds.count(7) == 2 and len(ctx.calibrations) == 1  # full precision + quantized, on seed 7
        assert any("calibrating CacheQuant" in d for _, d in progress) and progress[-1][0] == pytest.approx(1.0)
        # the same key again (another request, same model/method/steps): no new calibration
        run_comparison(handle, replace(REQ, digit=5, seed=4), [configuration("A", {"cachequant": values}, ctx)])
        assert seeds.count(7) == 2 and len(ctx.calibrations) == 1
        # other steps: a new calibration
        run_comparison(handle, replace(REQ, steps=8), [configuration("A", {"cachequant": values},
                                                                     _context(handle, replace(REQ, steps=8),
                                                                              ctx.calibrations))])
        assert seeds.count(7) == 4 and len(ctx.calibrations) == 2
        # the library called directly with the same calibration runs
        prompts = [f"digit {d}" for d in range(10)]
        req = handle.validate(REQ)
        cal = hasten.calibrate_cachequant(handle.pipe, method="int8", calibration_prompts=tuple(prompts),
                                          calibration_seeds=(7,), num_inference_steps=10,
                                          sample=lambda: handle.generate(replace(req, seed=7), prompts))
        handle.pipe.enable_cachequant(method="int8", speedup=2.0, calibration=cal)
        try:
            direct = handle.generate(req)[0]
        finally:
            handle.pipe.disable_cachequant()
        assert torch.equal(cq.image, direct)
    finally:
        handle.generate_fn = inner
    assert _restored(handle)
    with pytest.raises(ValueError, match="needs the model and request"):
        configuration("A", {"cachequant": values})


def test_combinations_the_pipeline_refuses_are_said_in_the_row(handle):
    """What does not stack is the pipeline's rule: the row says why, nothing stays on, the others still run."""
    ctx = _context(handle)
    d = {f: PANELS[f].defaults(0) for f in PANELS if f != "preset"}
    comp = run_comparison(handle, REQ, [
        configuration("A", {"delta_dit": d["delta_dit"], "profiling_dit": d["profiling_dit"]}, ctx),
        configuration("B", {"easycache": d["easycache"], "cachequant": d["cachequant"]}, ctx),
        configuration("C", {"quant": d["quant"], "cachequant": d["cachequant"]}, ctx),
    ])
    a, b, c = comp.runs[1:]
    assert "replaced delta_dit" in a.error and "do not combine" in a.error and a.image is None
    assert "disable EasyCache first" in b.error and b.image is None
    assert "replaced quant" in c.error and c.image is None
    assert _restored(handle)
    _, rows = metrics_table(comp)
    assert all(r[1].startswith("failed: ") for r in rows[1:])
    # settings the library refuses are refused before anything runs, with its message
    with pytest.raises(ValueError, match=r"SADAConfig.end \(0.1\) must be >= start \(0.2\)"):
        configuration("A", {"sada": {**d["sada"], "end": 0.1}})
    with pytest.raises(ValueError, match="not one of"):
        configuration("A", {"delta_dit": {**d["delta_dit"], "num_cached_blocks": "all"}})


def test_block_cache_on_a_unet_says_what_is_supported():
    import tiny_pipes as tp

    pipe, kw = tp.sd15()
    pipe.set_progress_bar_config(disable=True)

    def gen(p, request, prompts, on_step=None):
        out = p(**kw, num_inference_steps=request.steps, guidance_scale=request.guidance, output_type="pt",
                generator=torch.Generator().manual_seed(request.seed)).images
        return torch.as_tensor(out).float().clamp(0, 1)

    h = ModelHandle("unet", pipe, gen, digits=True, default_steps=4, default_size=16, size_fixed=True)
    comp = run_comparison(h, GenerationRequest(digit=3, steps=4), [configuration("A", {"delta_dit": {}})])
    assert "UnsupportedModelError" in comp.runs[1].error and "UNet" in comp.runs[1].error
    assert comp.runs[0].image is not None and features(pipe) == {}
