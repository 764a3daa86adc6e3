"""hasten's features on few-step sampling: the embedded model at 4 and 8 steps and an LCM scheduler (tiny
SD 1.5, 4 steps). A feature must not add work (rows reaching the first block) nor cost more than a bounded
quality loss (PSNR vs. the same-seed baseline), and where it cannot help it says so.

Sparse attention and int8 / int4 / W8A8 quantization skip no step: on few-step runs they keep the forward count
and cost the PSNR measured below; sparse attention's dense search warm-up (default 5 steps) covers a 4-step run,
which then runs dense and warns.

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
from hasten.errors import UnsupportedModelError
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
    """EasyCache refuses LCM (its fresh noise each step makes a reused output wrong: see test_compat_fewstep2);
    adaptive guidance works there."""
    with pytest.raises(UnsupportedModelError, match="LCMScheduler"):
        _lcm("easycache")
    base, base_rows = _lcm(None)
    out, rows = _lcm("ag")
    assert rows < base_rows and psnr(out, base) >= 35.0  # measured 43.3 dB, 5 of 8 rows


# -- sparse attention and quantization on few-step runs -------------------------------------------------------
# They do not skip steps, so they never add or remove forwards; what they cost is quality, measured against the
# same-seed few-step baseline. Sparse attention searches its patterns densely for ``warmup_steps`` steps: with its
# default warm-up (5) a 4-step run never goes sparse, and it says so (a warning naming the reason).
SPARSE_FEW = dict(target_mass=0.9, block_size=16, warmup_steps=1, refresh_every=3, min_seq_len=0, backend="torch")
KERNELS = {
    "sparse": lambda p: p.enable_sparse_attention(**SPARSE_FEW),
    "int8": lambda p: hasten.quantize_pipeline(p, "int8"),
    "int4": lambda p: hasten.quantize_pipeline(p, "int4"),
    "w8a8": lambda p: hasten.quantize_pipeline(p, "w8a8"),
}
FEATURES.update(KERNELS)
# PSNR (dB) vs. the same-seed few-step baseline, measured on the embedded model at 4 / 8 steps: sparse 37.5 / 41.1,
# int8 51.2 / 49.7, int4 31.0 / 29.5, w8a8 44.0 / 45.9; tiny SD 1.5 + LCM, 4 steps: int8 66.1, int4 55.3, w8a8 57.6
KERNEL_MIN_PSNR = {"sparse": 33.0, "int8": 45.0, "int4": 26.0, "w8a8": 40.0}


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("feature", list(KERNELS))
def test_embedded_few_steps_kernels(embedded_base: dict, feature: str, steps: int) -> None:
    base, base_rows = embedded_base[steps]
    pipe = hasten.load_embedded()
    FEATURES[feature](pipe)
    with F.FirstBlockCounter(pipe) as c:
        out = pipe(prompt="digit 3", generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                   output_type="pt").frames[0].float()
        rows, _ = c.take()
    value = psnr(out, base)
    print(f"embedded {steps} steps {feature}: {rows}/{base_rows} rows, PSNR {value:.1f} dB\n{hasten.summary(pipe)}")
    assert rows == base_rows  # no added (or skipped) work
    assert not torch.equal(out, base), f"{feature} had no effect"
    assert value >= KERNEL_MIN_PSNR[feature], value
    if feature == "sparse":
        assert " 0 sparse" not in hasten.summary(pipe), hasten.summary(pipe)


def test_sparse_default_warmup_covers_a_4_step_run(caplog: pytest.LogCaptureFixture) -> None:
    """Default warm-up (5 dense search steps) > 4 steps: nothing goes sparse, identical output, and a warning."""
    pipe = hasten.load_embedded()
    pipe.enable_sparse_attention(min_seq_len=0, backend="torch", block_size=16)
    with caplog.at_level(logging.WARNING, logger="hasten"):
        out = pipe(prompt="digit 3", generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                   output_type="pt").frames[0].float()
    base = hasten.load_embedded()(prompt="digit 3", generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                                  output_type="pt").frames[0].float()
    assert torch.equal(out, base)
    assert any(r.levelno >= logging.WARNING for r in caplog.records), "a sparse run that never went sparse must warn"


@pytest.mark.parametrize("feature", ["int8", "int4", "w8a8"])
def test_lcm_scheduler_quantized(feature: str) -> None:
    base, base_rows = _lcm(None)
    out, rows = _lcm(feature)
    value = psnr(out, base)
    print(f"LCM 4 steps {feature}: PSNR {value:.1f} dB")
    assert rows == base_rows and not torch.equal(out, base) and value >= KERNEL_MIN_PSNR[feature]
