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


def _num(cell: str) -> float:
    if cell.startswith("inf"):
        return math.inf
    return float(re.sub(r"[^0-9.eE+-]", "", cell))


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
    assert base[6].startswith("100%") and "reads 3" in base[6]
    imgs = page.locator("#images img")
    assert imgs.count() >= 3
    for i in range(3):
        assert imgs.nth(i).evaluate("el => el.naturalWidth") >= 128  # 16 px outputs upscaled for display
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
        page.locator("#cfg-B").get_by_text("configuration B").click()  # open the accordion
        page.locator("#cfg-B-easycache input[type=checkbox]").uncheck()
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
