"""hasten's features on ControlNet pipelines (tiny SD 1.5 and Flux, from diffusers' fixtures): the control
signal must still steer the image.

Control effect = output with control - output with ``controlnet_conditioning_scale=0`` (same seed). Under each
feature it is compared with the same difference at baseline (relative error and cosine), and the feature must
still do its work (rows reaching the denoiser's first block). Bottleneck sampling refuses ControlNet up front.
"""

from __future__ import annotations

import families as F
import pytest
import torch

import hasten
from hasten.errors import UnsupportedModelError

STEPS = 12
SPARSE = dict(target_mass=0.9, block_size=16, warmup_steps=2, refresh_every=3, min_seq_len=0, backend="torch")
FEATURES = {
    "easycache": lambda p: p.enable_easycache(threshold=0.2),
    "ag": lambda p: p.enable_adaptive_guidance(mode="ag", threshold=0.993),
    "sparse": lambda p: p.enable_sparse_attention(**SPARSE),
    "int8": lambda p: hasten.quantize_(F.denoisers(p)["transformer" if hasattr(p, "transformer") else "unet"], "int8"),
}
TOL = 0.35  # relative error of the control effect under a feature vs. at baseline


def _effect(family: str, feature: str | None, **extra) -> tuple[torch.Tensor, int, torch.Tensor]:
    pipe, kw = F.build(family)
    if feature is not None:
        FEATURES[feature](pipe)
    with F.FirstBlockCounter(pipe) as c:
        on = F.call(pipe, kw, steps=STEPS, **extra)
        rows, _ = c.take()
    off = F.call(pipe, {**kw, "controlnet_conditioning_scale": 0.0}, steps=STEPS, **extra)
    return on - off, rows, on


@pytest.fixture(scope="module", params=["sd_controlnet", "flux_controlnet"])
def baseline(request: pytest.FixtureRequest) -> dict:
    torch.set_num_threads(1)
    delta, rows, on = _effect(request.param, None)
    assert delta.norm() > 0.01 * on.norm(), "the control signal must change the tiny model's output"
    return {"family": request.param, "delta": delta, "rows": rows, "out": on}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("feature", list(FEATURES))
def test_control_still_steers_under_feature(baseline: dict, feature: str) -> None:
    delta, rows, _ = _effect(baseline["family"], feature)
    err = float((delta - baseline["delta"]).norm() / baseline["delta"].norm())
    print(f"{baseline['family']} {feature}: control effect rel err {err:.3f} cos {_cos(delta, baseline['delta']):.3f} "
          f"rows {rows}/{baseline['rows']}")
    assert err <= TOL and _cos(delta, baseline["delta"]) > 0.9
    if feature == "easycache":
        assert rows < baseline["rows"]


def test_bottleneck_refuses_controlnet(baseline: dict) -> None:
    pipe, kw = F.build(baseline["family"])
    with pytest.raises(UnsupportedModelError):
        pipe.enable_bottleneck_sampling()
        F.call(pipe, kw, steps=STEPS)


def test_easycache_follows_control_guidance_end(baseline: dict) -> None:
    """Control stops half-way (control_guidance_end=0.5): the cache must not carry the controlled output on."""
    if baseline["family"] != "sd_controlnet":
        pytest.skip("control_guidance_end exercised on SD 1.5")
    ref, _, _ = _effect("sd_controlnet", None, control_guidance_end=0.5)
    delta, rows, _ = _effect("sd_controlnet", "easycache", control_guidance_end=0.5)
    err = float((delta - ref).norm() / ref.norm())
    print(f"control_guidance_end=0.5 easycache: control effect rel err {err:.3f} rows {rows}")
    assert err <= TOL
