"""End-to-end: the demo app in real headless Chromium (Debian's /usr/bin/chromium) on a tiny Wan pipeline."""

from __future__ import annotations

import math
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),  # gradio's pandas use
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install -y chromium)"),
]
gr = pytest.importorskip("gradio")
playwright_sync = pytest.importorskip("playwright.sync_api")

from web_tiny import tiny_handle  # noqa: E402

from hasten import metrics  # noqa: E402
from hasten.web import compare  # noqa: E402
from hasten.web.app import build_app  # noqa: E402


class _ReadsThree:
    """Stands in for the digit classifier (fitting the real one takes ~30 s): always reads a 3."""

    def predict(self, images):
        return torch.full((len(images),), 3)

    def features(self, images):
        return metrics._digit_features(images)[:, ::16]


SLOW_STEPS: list[int] = []  # every denoising step the "slow" model ran, server side


def _slow_handle():
    """The tiny model at 50 ms per step, counting its steps: a run long enough to cancel."""
    h = tiny_handle("slow")
    inner = h.generate_fn

    def generate(pipe, request, prompts, on_step=None):
        def step(i):
            SLOW_STEPS.append(i)
            time.sleep(0.05)
            if on_step is not None:
                on_step(i)

        return inner(pipe, request, prompts, step)

    h.generate_fn = generate
    return h


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    mp = pytest.MonkeyPatch()
    mp.setattr(compare, "digit_classifier", lambda: _ReadsThree())
    mp.setattr(metrics, "digit_classifier", lambda: _ReadsThree())
    handles = {}
    loads = []

    def factory(name):
        loads.append(name)
        if name in ("embedded", "tiny-text"):
            handles[name] = tiny_handle(name, digits=name == "embedded")
            return handles[name]
        if name == "slow":
            handles[name] = _slow_handle()
            return handles[name]
        raise FileNotFoundError(f"{name} does not exist")

    demo = build_app(factory)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", handles, loads
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _artifact_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("HASTEN_ARTIFACTS", "")) if os.environ.get("HASTEN_ARTIFACTS") else None
    d = d or tmp_path_factory.mktemp("web")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _table(page) -> list[list[str]]:
    """The metrics table's body rows (gradio's Dataframe is a virtual table of div rows)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('#metrics div[role=row]'))
        .map(r => Array.from(r.children).map(c => c.innerText.trim()))""")


def _wait_results(page, n_rows: int, timeout: float = 60_000) -> list[list[str]]:
    page.locator("#images img").nth(n_rows - 1).wait_for(state="visible", timeout=timeout)
    page.wait_for_function(
        "n => document.querySelectorAll('#metrics div[role=row]').length >= n && "
        "document.querySelector('#metrics div[role=row]').innerText.includes('baseline')", arg=n_rows,
        timeout=timeout)
    return _table(page)


def _set_slider(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _load(page, url: str, model: str = "embedded") -> None:
    page.goto(url)
    page.locator("#model-status").get_by_text("loaded").wait_for(timeout=30_000)
    if model != "embedded":
        box = page.locator("#model input")
        box.fill(model)
        box.press("Enter")
        page.locator("#load").click()
        page.locator("#model-status").get_by_text(f"loaded {model}").wait_for(timeout=30_000)


def _num(cell: str) -> float:
    if cell.startswith("inf"):
        return math.inf
    return float(re.search(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?", cell).group())  # the first number


def test_run_defaults_in_browser(app_url, browser, tmp_path_factory):
    url, handles, _ = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url)
    page.locator("#model-status").get_by_text("loaded").wait_for(timeout=30_000)
    _set_slider(page, "steps", 10)
    page.locator("#run").click()
    rows = _wait_results(page, 3)
    shot = _artifact_dir(tmp_path_factory) / "web_compare.png"
    page.wait_for_timeout(500)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

    names = [r[0] for r in rows]
    assert names == ["baseline", "A: easycache@0.1", "B: easycache@0.3"]
    base, a, b = rows
    assert _num(base[2]) == pytest.approx(1.0) and _num(base[3]) == 20  # 10 steps x (cond + uncond)
    assert 0 < _num(a[3]) < 20 and 0 < _num(b[3]) <= _num(a[3])  # caches skipped forwards
    assert _num(base[1]) > 0 and _num(a[1]) > 0
    assert 20 < _num(a[4]) and 0.5 < _num(a[5]) <= 1.0  # PSNR dB and SSIM against the baseline
    assert base[6] == "reads as 3" and "%" not in a[6]  # one image: a reading, never a 0%/100% accuracy
    imgs = page.locator("#images img")
    assert imgs.count() >= 3
    for i in range(3):
        assert imgs.nth(i).evaluate("el => el.naturalWidth") >= 128  # 16 px outputs upscaled for display
        assert imgs.nth(i).evaluate("el => getComputedStyle(el).imageRendering") == "pixelated"
    # fixed-size cells: one image does not stretch across the results column
    assert imgs.nth(0).bounding_box()["width"] <= 400
    assert page.locator("#timeline img, #timeline svg, #timeline canvas").count() >= 1
    assert page.locator("#slider img").count() >= 1
    # nothing leaked onto the pipeline after the request
    pipe = handles["embedded"].pipe
    assert getattr(pipe, "_hasten_features", {}) == {}
    assert not hasattr(pipe.transformer, "_diffusers_hook") or "hasten_easycache" not in str(
        pipe.transformer._diffusers_hook.hooks)
    page.close()


def test_bad_input_and_bad_model_messages(app_url, browser):
    url, _, loads = app_url
    page = browser.new_page()
    page.goto(url)
    page.locator("#model-status").get_by_text("loaded").wait_for(timeout=30_000)
    model = page.locator("#model input")
    model.fill("/nowhere/model")
    model.press("Enter")
    page.locator("#load").click()
    page.locator("#model-status").get_by_text("could not load").wait_for(timeout=20_000)
    assert "/nowhere/model" in loads
    model.fill("tiny-text")  # a free-prompt model: the prompt box replaces the digit picker
    model.press("Enter")
    page.locator("#load").click()
    page.locator("#model-status").get_by_text("loaded tiny-text").wait_for(timeout=20_000)
    assert page.locator("#prompt textarea").is_visible() and not page.locator("#digit").is_visible()
    page.locator("#run").click()
    page.get_by_text("the prompt is empty").first.wait_for(timeout=20_000)
    page.locator("#prompt textarea").fill("a red fox")
    page.locator("#seed input").fill("-5")
    page.locator("#run").click()
    page.get_by_text("seed must be in [0, 2147483647], got -5").first.wait_for(timeout=20_000)
    page.close()


def test_two_users_at_once(app_url, browser):
    """Two pages submit at once with different seeds and caches; each gets its own, correct result."""
    url, handles, _ = app_url
    pages = []
    for seed, threshold in ((1, 0.0), (2, 0.5)):
        page = browser.new_page()
        page.goto(url)
        page.locator("#model-status").get_by_text("loaded").wait_for(timeout=30_000)
        _set_slider(page, "steps", 10)
        page.locator("#seed input").fill(str(seed))
        _set_slider(page, "cfg-A-easycache-threshold", threshold)
        page.locator("#cfg-B-on input[type=checkbox]").uncheck()  # configuration B off
        pages.append(page)
    t0 = time.perf_counter()
    for p in pages:
        p.locator("#run").click()
    results = [_wait_results(p, 2) for p in pages]
    assert time.perf_counter() - t0 < 60
    (base1, off), (base2, on) = results
    assert off[0] == "A: easycache@0" and on[0] == "A: easycache@0.5"
    assert _num(off[3]) == 20 and off[4].startswith("inf")  # threshold 0 == baseline, bit for bit
    assert _num(on[3]) < 20 and math.isfinite(_num(on[4]))
    # the two requests' images are their own seeds' (compare with direct generations)
    h = handles["embedded"]
    direct = {s: h.generate(compare.GenerationRequest(digit=3, seed=s, steps=10))[0] for s in (1, 2)}
    assert not torch.equal(direct[1], direct[2])
    for p, s in zip(pages, (1, 2)):
        assert f"seed {s}," in p.locator("#notes").inner_text()
        shown = _shown_pixels(p, 0)
        want = (direct[s].permute(1, 2, 0) * 255).round().to(torch.uint8)
        assert torch.equal(shown, want), f"page with seed {s} shows another request's baseline"
        p.close()


def _shown_pixels(page, index: int) -> torch.Tensor:
    """The gallery image ``index`` as served (PNG, nearest-upscaled), sampled back to the model's pixels."""
    import io

    import numpy as np
    from PIL import Image

    src = page.locator("#images img").nth(index).get_attribute("src")
    data = page.request.get(src).body()
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    k = img.shape[0] // 16
    return torch.from_numpy(img[k // 2::k, k // 2::k].copy())


def test_sweep_tab(app_url, browser, tmp_path_factory):
    url, handles, _ = app_url
    page = browser.new_page(viewport={"width": 1300, "height": 1200})
    page.goto(url)
    page.locator("#model-status").get_by_text("loaded").wait_for(timeout=30_000)
    _set_slider(page, "steps", 10)
    page.get_by_role("tab", name="Sweep").click()
    page.locator("#thresholds textarea, #thresholds input").first.fill("0.1, 0.5")
    page.locator("#run-sweep").click()
    page.wait_for_function("() => (document.querySelector('#sweep-table')?.innerText || '').includes('fwd/img')",
                           timeout=60_000)
    text = page.locator("#sweep-table").inner_text()
    assert "baseline" in text and "hasten-easycache@0.1" in text and "1.00x" in text and "10%" in text
    assert page.locator("#pareto img, #pareto svg").count() >= 1
    page.screenshot(path=str(_artifact_dir(tmp_path_factory) / "web_sweep.png"), full_page=True)
    assert getattr(handles["embedded"].pipe, "_hasten_features", {}) == {}
    page.close()


def _in_viewport(page, selector: str) -> bool:
    box = page.locator(selector).bounding_box()
    vp = page.viewport_size
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= vp["height"] and box["x"] >= 0 \
        and box["x"] + box["width"] <= vp["width"]


def _shown(page, sel: str) -> bool:
    """Whether any element matching ``sel`` is rendered (gradio gives a group's id to two nested elements)."""
    return page.evaluate("s => Array.from(document.querySelectorAll(s)).some(e => e.getClientRects().length > 0 "
                         "&& e.getBoundingClientRect().height > 0)", sel)


def _wait_shown(page, sel: str, shown: bool = True) -> None:
    page.wait_for_function("([s, want]) => Array.from(document.querySelectorAll(s)).some(e => "
                           "e.getClientRects().length > 0 && e.getBoundingClientRect().height > 0) === want",
                           arg=[sel, shown], timeout=10_000)


def test_first_screen_layout(app_url, browser):
    """At 1400x900: model, the configurations' on/off, Run and Cancel without scrolling; a family's
    details only once it is ticked; configuration B on means B visible; C off means C hidden."""
    url, _, _ = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    _load(page, url)
    page.wait_for_timeout(500)
    page.screenshot(path="/tmp/demo-first-screen.png")
    assert page.evaluate("() => window.scrollY") == 0
    for sel in ("#model", "#digit", "#steps", "#cfg-A-on", "#cfg-B-on", "#cfg-C-on", "#run", "#cancel"):
        assert _in_viewport(page, sel), f"{sel} is not on the first screen"
    assert not page.locator("#cancel").is_enabled()  # nothing to cancel yet
    # A and B on (visible with their EasyCache settings), C off (hidden)
    assert _shown(page, "#cfg-A") and _shown(page, "#cfg-B") and not _shown(page, "#cfg-C")
    assert _shown(page, "#cfg-B-easycache-details")
    for fam in ("guidance", "bottleneck", "sparse", "quant"):
        assert not _shown(page, f"#cfg-A-{fam}-details"), fam
    page.locator("#cfg-A-guidance input[type=checkbox]").check()
    _wait_shown(page, "#cfg-A-guidance-details")
    page.locator("#cfg-A-guidance input[type=checkbox]").uncheck()
    _wait_shown(page, "#cfg-A-guidance-details", False)
    page.locator("#cfg-C-on input[type=checkbox]").check()
    _wait_shown(page, "#cfg-C")
    page.locator("#cfg-B-on input[type=checkbox]").uncheck()
    _wait_shown(page, "#cfg-B", False)
    page.close()


def test_out_of_range_steps_are_refused_not_clamped(app_url, browser, capfd):
    """Refused with a message next to Run (and a toast), the typed value kept; no traceback in the server log."""
    url, _, _ = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    _load(page, url)
    for value, msg in (("0", "steps must be in [1, 150], got 0"), ("100000", "steps must be in [1, 150], got 100000"),
                       ("2.5", "steps must be a whole number, got 2.5")):
        _set_slider(page, "steps", value)
        page.locator("#run").click()
        page.get_by_text(msg).first.wait_for(timeout=20_000)
        assert page.locator("#steps input").input_value() == value  # what the user typed, not clamped
        page.wait_for_function("() => document.querySelector('#run').textContent.includes('Run comparison')",
                               timeout=20_000)
        page.locator("#run-status").get_by_text(f"refused: {msg}").wait_for(timeout=10_000)
    page.close()
    assert "Traceback" not in capfd.readouterr().err


def _start_slow_run(page, url: str) -> int:
    _load(page, url, "slow")
    _set_slider(page, "steps", 100)
    before = len(SLOW_STEPS)
    page.locator("#run").click()
    page.wait_for_function("() => !document.querySelector('#run').disabled || "
                           "document.querySelector('#run').textContent.includes('Running')", timeout=10_000)
    deadline = time.time() + 60
    while len(SLOW_STEPS) < before + 15 and time.time() < deadline:  # the run is under way (after warm-up)
        time.sleep(0.1)
    assert len(SLOW_STEPS) >= before + 15
    # the progress shows next to Run (where the user clicked), not only in the result boxes
    page.wait_for_function("() => /step \\d+\\/100/.test(document.querySelector('#run-status').innerText)",
                           timeout=10_000)
    return before


def _wait_released(handle, timeout: float = 15.0) -> float:
    t0 = time.perf_counter()
    assert handle.lock.acquire(timeout=timeout), "the run kept the pipeline after it was stopped"
    handle.lock.release()
    return time.perf_counter() - t0


def test_cancel_stops_the_run(app_url, browser):
    """Run, then Cancel: the server stops within a step or two, the page is usable again."""
    url, handles, _ = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    before = _start_slow_run(page, url)
    assert "Running" in page.locator("#run").inner_text() and page.locator("#cancel").is_enabled()
    page.locator("#cancel").click()
    _wait_released(handles["slow"])
    ran = len(SLOW_STEPS) - before
    time.sleep(0.5)
    assert len(SLOW_STEPS) - before == ran  # nothing runs after the cancel
    assert ran < 3 * 3 * 100 / 2  # far from the full 3 configurations x 3 repeats x 100 steps
    page.get_by_text("cancelled").first.wait_for(timeout=10_000)
    page.wait_for_function("() => !document.querySelector('#run').disabled", timeout=10_000)
    # usable again: a short run completes
    _set_slider(page, "steps", 3)
    page.locator("#timing-repeats input").fill("1")
    page.locator("#run").click()
    rows = _wait_results(page, 3)
    assert rows[0][0] == "baseline"
    page.close()


def test_closing_the_page_stops_the_run(app_url, browser):
    """Start a run and close the tab: the server-side run stops early and frees the pipeline."""
    url, handles, _ = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    before = _start_slow_run(page, url)
    page.close()
    waited = _wait_released(handles["slow"], timeout=30.0)
    ran = len(SLOW_STEPS) - before
    print(f"closed the page: run stopped {waited:.1f} s later after {ran} of 900 steps")
    assert ran < 900 / 2


def test_new_cache_panel_in_the_browser(app_url, browser):
    """Pick Δ-DiT in configuration A (EasyCache off, B off), run, and read its row back: fewer forwards (the
    block cache skipped blocks), PSNR against the baseline; the per-step timeline is drawn."""
    url, handles, _ = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    _load(page, url)
    _set_slider(page, "steps", 10)
    page.locator("#timing-repeats input").fill("1")
    page.locator("#cfg-B-on input[type=checkbox]").uncheck()
    page.locator("#cfg-A-easycache input[type=checkbox]").uncheck()
    page.locator("#cfg-A-delta_dit input[type=checkbox]").check()
    _wait_shown(page, "#cfg-A-delta_dit-details")
    _set_slider(page, "cfg-A-delta_dit-interval", 3)
    page.locator("#run").click()
    base, a = _wait_results(page, 2)
    assert a[0] == "A: delta-dit@3"
    assert _num(base[3]) == 20 and 0 < _num(a[3]) < 20  # blocks reused: fractional forwards below 20
    assert math.isfinite(_num(a[4])) and 0 < _num(a[5]) <= 1 and _num(a[2]) > 0
    assert page.locator("#timeline img, #timeline svg, #timeline canvas").count() >= 1
    assert getattr(handles["embedded"].pipe, "_hasten_features", {}) == {}
    page.close()
