"""hasten's features on few-step sampling: the embedded model at 4 and 8 steps and an LCM scheduler (tiny
SD 1.5, 4 steps). A feature must not add work (rows reaching the first block) nor cost more than a bounded
quality loss (PSNR vs. the same-seed baseline), and where it cannot help it says so.

Decision: EasyCache is not refused on short runs, it simply has no step to reuse (warm-up and final steps
cover a 4-step run) and runs bit-identical, with a warning naming the reason; adaptive guidance keeps
working (it drops the unconditional pass once cond and uncond agree, which a distilled run reaches as well).
"""

from __future__ import annotations

import logging

import families as F
import pytest
import torch

import hasten
from hasten.metrics import psnr

FEATURES = {
    "easycache": lambda p: p.enable_easycache(threshold=0.2),
    "ag": lambda p: p.enable_adaptive_guidance(mode="ag", threshold=0.993),
}
# measured PSNR (dB) vs. the same-seed baseline: embedded 4 steps AG 32.3; 8 steps EasyCache 32.1, AG 29.7
MIN_PSNR = 27.0


def _embedded(steps: int, feature: str | None) -> tuple[torch.Tensor, int]:
    pipe = hasten.load_embedded()
    if feature is not None:
        FEATURES[feature](pipe)
    with F.FirstBlockCounter(pipe) as c:
        out = pipe(prompt="digit 3", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                   output_type="pt").frames
        rows, _ = c.take()
    return out[0].float(), rows


def _lcm(feature: str | None) -> tuple[torch.Tensor, int]:
    from diffusers import LCMScheduler

    pipe, kw = F.build("sd15")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if feature is not None:
        FEATURES[feature](pipe)
    with F.FirstBlockCounter(pipe) as c:
        out = F.call(pipe, kw, steps=4)
        rows, _ = c.take()
    return out, rows


@pytest.fixture(scope="module")
def embedded_base() -> dict[int, tuple[torch.Tensor, int]]:
    torch.set_num_threads(1)
    return {steps: _embedded(steps, None) for steps in (4, 8)}


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_embedded_few_steps(embedded_base: dict, feature: str, steps: int, caplog: pytest.LogCaptureFixture) -> None:
    base, base_rows = embedded_base[steps]
    assert base_rows == 2 * steps
    with caplog.at_level(logging.WARNING, logger="hasten"):
        out, rows = _embedded(steps, feature)
    assert rows <= base_rows
    if feature == "easycache" and steps == 4:  # nothing to reuse: identical, and the user is told why
        assert rows == base_rows and torch.equal(out, base)
        assert any("too short" in r.getMessage() for r in caplog.records), caplog.text
        return
    assert rows < base_rows, "the feature skipped nothing"
    assert psnr(out, base) >= MIN_PSNR


def test_lcm_scheduler() -> None:
    base, base_rows = _lcm(None)
    out, rows = _lcm("easycache")
    assert rows == base_rows and torch.equal(out, base)
    out, rows = _lcm("ag")
    assert rows < base_rows and psnr(out, base) >= 35.0  # measured 43.3 dB, 5 of 8 rows
