"""The demo with the video model: clips side by side as animations, with the same metrics and timeline.

The browser test drives a tiny random Wan pipeline shaped like the video model (5 frames, 16 px); one test
runs the real embedded video model through the comparison logic. Variants are compared with each other,
never with absolute accuracy, so an undertrained snapshot passes as well as the final one.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from web_tiny import tiny_clips

from hasten import metrics
from hasten.web import compare
from hasten.web.compare import GenerationRequest, ModelHandle

import tiny_pipes as tp

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DIRECTIONS = ("left", "right", "up", "down")
TINY_FRAMES = 5

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


class _ReadsThree:
    """Stands in for the digit classifier (fitting the real one takes ~30 s): always reads a 3."""

    def predict(self, images):
        return torch.full((len(images),), 3)

    def features(self, images):
        return metrics._digit_features(images)[:, ::16]


@pytest.fixture
def reads_three(monkeypatch):
    monkeypatch.setattr(compare, "digit_classifier", lambda: _ReadsThree())
    monkeypatch.setattr(metrics, "digit_classifier", lambda: _ReadsThree())


def _tiny_generate(pipe, request: GenerationRequest, prompts: list[str], on_step=None) -> torch.Tensor:
    return tiny_clips(pipe, request, prompts, on_step, frames=TINY_FRAMES)


def tiny_video_handle(name: str = compare.EMBEDDED_VIDEO) -> ModelHandle:
    pipe, _ = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    return ModelHandle(name, pipe, _tiny_generate, digits=True, default_steps=10, default_guidance=4.0,
                       default_size=16, size_fixed=True, directions=DIRECTIONS, frames=TINY_FRAMES)


def _gif_frames(data: bytes) -> list:
    """The frames of an animated GIF as RGB PIL images."""
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "GIF"
        return [f.convert("RGB").copy() for f in ImageSequence.Iterator(im)]


# ------------------------------------------------------------------------------------ without a browser
def test_video_comparison_logic(reads_three):
    """Clips in, per-clip metrics out: same-seed baseline, PSNR over the clip, a motion reading, GIF frames."""
    h = tiny_video_handle()
    req = GenerationRequest(digit=3, direction="up", steps=6, seed=1)
    configs = [compare.hasten_easycache(0.0), compare.hasten_easycache(0.5)]
    comp = compare.run_comparison(h, req, configs)
    base, off, on = comp.runs
    assert base.image.shape == (TINY_FRAMES, 3, 16, 16)
    assert torch.equal(base.image, h.generate(h.validate(req))[0])  # the shown clip is the request's own
    assert math.isinf(off.psnr) and off.forwards == base.forwards  # threshold 0: identical, bit for bit
    assert on.forwards < base.forwards and math.isfinite(on.psnr) and 0 < on.ssim <= 1
    for r in comp.runs:
        assert r.digit_read == 3 and r.motion_read in (*DIRECTIONS, "still")
        assert r.motion_ok == (r.motion_read == "up")
    headers, rows = compare.metrics_table(comp)
    assert headers[-2:] == ["digit read", "moves"]
    assert rows[0][-1].startswith("moves ") and rows[0][-2] == "reads as 3"
    assert len(on.timeline) >= 1 and any(not d for ds in on.timeline.values() for d in ds)
    frames = _gif_frames(open(compare.display_clip(base.image), "rb").read())
    assert len(frames) == TINY_FRAMES and frames[0].size == (256, 256)  # 16 px upscaled (nearest)
    assert compare.filmstrip(base.image).size[0] > 2 * 128
    with pytest.raises(ValueError, match="direction among left, right, up, down"):
        compare.run_comparison(h, GenerationRequest(digit=3, direction="sideways", steps=2), [])


def test_direction_reading():
    """The reading follows score_videos' rule: the larger displacement component, a quarter of the travel."""
    assert compare.direction_of([-6.0, 1.0], 32) == "left"
    assert compare.direction_of([0.5, 7.0], 32) == "down"
    assert compare.direction_of([0.5, -7.0], 32) == "up"
    assert compare.direction_of([1.0, 1.0], 32) == "still"


def test_real_video_model_in_the_comparison(reads_three):
    """The embedded video model itself: 17-frame clips at 32 px, easycache off == baseline, real motion reading."""
    from hasten.embedded.video import VIDEO_DEFAULT_FRAMES, VIDEO_WEIGHTS_DIR

    if not (VIDEO_WEIGHTS_DIR / "model_index.json").exists():
        pytest.skip(f"no embedded video model at {VIDEO_WEIGHTS_DIR}")
    torch.set_num_threads(1)
    h = compare.load_model(compare.EMBEDDED_VIDEO)
    assert h.video and h.directions == DIRECTIONS and h.default_size == 32
    comp = compare.run_comparison(h, GenerationRequest(digit=7, direction="right", steps=3),
                                  [compare.hasten_easycache(0.0)])
    base, off = comp.runs
    assert base.image.shape == (VIDEO_DEFAULT_FRAMES, 3, 32, 32)
    assert math.isinf(off.psnr)
    assert base.motion_read in (*DIRECTIONS, "still") and off.motion_read == base.motion_read
    assert "moves" in compare.metrics_table(comp)[0]


def test_new_cache_panels_on_clips(reads_three):
    """Issue 13's panels on the video model's shape: Δ-DiT, ProfilingDiT, SADA skip work on clips; CacheQuant
    calibrates on the clip prompts (one per direction) once and follows its schedule; nothing stays on."""
    from hasten.pipelines import features
    from hasten.web.panels import PANELS, CalibrationStore, PanelContext, configuration

    h = tiny_video_handle()
    req = h.validate(GenerationRequest(digit=3, direction="left", steps=8, seed=1))
    prompts = []
    inner = h.generate_fn

    def counting(pipe, request, ps, on_step=None):
        prompts.append(list(ps))
        return inner(pipe, request, ps, on_step)

    h.generate_fn = counting
    ctx = PanelContext(h, req, CalibrationStore())
    chosen = {"delta_dit": {"interval": 2}, "profiling_dit": {"threshold": 0.5}, "sada": {"max_interval": 2,
              "threshold": 0.5}, "cachequant": {"speedup": 2.0}}
    configs = [configuration(f, {f: {**PANELS[f].defaults(0), **v}}, ctx) for f, v in chosen.items()]
    comp = compare.run_comparison(h, req, configs[:3])
    comp_cq = compare.run_comparison(h, req, configs[3:])
    base = comp.runs[0]
    assert torch.equal(base.image, comp_cq.runs[0].image)
    for r in comp.runs[1:] + comp_cq.runs[1:]:
        assert r.error is None, r.name
        assert r.image.shape == (TINY_FRAMES, 3, 16, 16) and r.forwards < base.forwards == 16
        assert math.isfinite(r.psnr) and r.motion_read in (*DIRECTIONS, "still")
    assert comp_cq.runs[1].forwards == 8  # 4 of 8 steps computed, cond + uncond
    calib = [p for p in prompts if len(p) == 4]
    assert len(calib) == 2 and calib[0] == [f"digit {d} moving {w}" for d, w in zip((0, 3, 5, 8), DIRECTIONS)]
    assert features(h.pipe) == {}


# ------------------------------------------------------------------------------------ in the browser
def _table(page) -> list[list[str]]:
    """The metrics table's body rows (gradio's Dataframe is a virtual table of div rows)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('#metrics div[role=row]'))
        .map(r => Array.from(r.children).map(c => c.innerText.trim()))""")


def _set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _num(cell: str) -> float:
    if cell.startswith("inf"):
        return math.inf
    return float(re.search(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?", cell).group())  # the first number


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")
def test_video_in_the_browser(reads_three, tmp_path):
    """Pick the video model, run baseline + A + B: three animated clips side by side, the metrics with the
    digit and motion readings, the timeline; the clips shown are the server's frames."""
    pytest.importorskip("gradio")
    playwright_sync = pytest.importorskip("playwright.sync_api")
    from web_tiny import tiny_handle

    from hasten.web.app import build_app

    handles = {}

    def factory(name):
        handles[name] = tiny_video_handle(name) if name == compare.EMBEDDED_VIDEO else tiny_handle(name)
        return handles[name]

    demo = build_app(factory)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with playwright_sync.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#model-status").get_by_text("loaded").wait_for(timeout=30_000)
            assert not page.locator("#direction").is_visible()
            page.locator("#model input").click()
            page.get_by_role("option", name="embedded-video").click()
            page.locator("#load").click()
            page.locator("#model-status").get_by_text("moving").wait_for(timeout=30_000)
            assert page.locator("#direction").is_visible()
            page.locator("#direction").get_by_text("down").click()
            _set_slider(page, "steps", 8)
            page.locator("#run").click()
            page.locator("#images img").nth(2).wait_for(state="visible", timeout=60_000)
            page.wait_for_function("() => document.querySelectorAll('#metrics div[role=row]').length >= 3 && "
                                   "document.querySelector('#metrics').innerText.includes('moves')", timeout=60_000)
            page.wait_for_timeout(500)
            shots = Path(os.environ.get("HASTEN_ARTIFACTS") or tmp_path)
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "web_video.png"), full_page=True)
            rows = _table(page)
            imgs = page.locator("#images img")
            clips = []
            for i in range(3):
                src = imgs.nth(i).get_attribute("src")
                assert ".gif" in src
                clips.append(_gif_frames(page.request.get(src).body()))
                assert imgs.nth(i).evaluate("el => el.naturalWidth") >= 128
            notes = page.locator("#notes").inner_text()
            timeline = page.locator("#timeline img, #timeline svg, #timeline canvas").count()
            slider = page.locator("#slider img").count()
            browser.close()
    finally:
        demo.close()
    body = [r for r in rows if r and r[0] in ("baseline", "A: easycache@0.1", "B: easycache@0.3")]
    assert [r[0] for r in body] == ["baseline", "A: easycache@0.1", "B: easycache@0.3"]
    base, a, b = body
    assert _num(base[3]) == 16 and 0 < _num(b[3]) <= _num(a[3]) < 16  # 8 steps x 2 branches; caches skipped
    assert math.isfinite(_num(a[4])) and 0 < _num(a[5]) <= 1
    assert base[6] == "reads as 3" and base[7].startswith("moves ")
    assert "moving down" in notes and f"{TINY_FRAMES} frames" in notes
    assert timeline >= 1 and slider >= 1
    # two animations that play (several distinct frames), and the baseline's frames are the server's clip
    for frames in clips:
        assert len(frames) == TINY_FRAMES
    h = handles[compare.EMBEDDED_VIDEO]
    direct = h.generate(GenerationRequest(digit=3, direction="down", seed=0, steps=8))[0]
    k = clips[0][0].size[0] // 16
    shown = torch.stack([torch.from_numpy(np.asarray(f)[k // 2::k, k // 2::k].copy()) for f in clips[0]])
    want = (direct.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    # the same pixels up to the GIF palette (256 colours per frame)
    assert metrics.psnr(shown.permute(0, 3, 1, 2).float() / 255, want.permute(0, 3, 1, 2).float() / 255) > 25
    assert not torch.equal(shown[0], shown[-1])
