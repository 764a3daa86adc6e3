"""Bad input caught where it happens, and hooks that follow their module (issue 16).

enable_* argument forms, config type/finiteness checks, ``copy.deepcopy`` and ``from_pipe`` with a
feature on, and two threads calling one pipeline.
"""

from __future__ import annotations

import copy
import logging
import math
import threading

import pytest
import torch
from diffusers import WanPipeline

import hasten
from hasten import EasyCacheConfig, GuidanceConfig, UnsupportedModelError

import tiny_pipes as tp

STEPS = 4


@pytest.fixture()
def wan():
    pipe, kw = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw, tp.run(pipe, kw, steps=STEPS)


# -- argument forms ----------------------------------------------------------------------------------
def test_bare_number_is_the_threshold_and_zero_is_off(wan):
    pipe, kw, base = wan
    counter = tp.RowCounter(pipe.transformer, "proj_out")
    tp.run(pipe, kw, steps=STEPS)
    rows = counter.take()
    pipe.enable_easycache(0)
    assert hasten.features(pipe)["easycache"].config.threshold == 0.0
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base) and counter.take() == rows
    hasten.enable_easycache(pipe, 0.5, warmup=0.25)
    assert hasten.features(pipe)["easycache"].config.threshold == 0.5
    pipe.enable_adaptive_guidance(0.9)
    assert hasten.features(pipe)["guidance"].config.threshold == 0.9
    with pytest.raises(TypeError, match="twice"):
        pipe.enable_easycache(0.1, threshold=0.2)
    with pytest.raises(TypeError, match="BottleneckConfig"):
        pipe.enable_bottleneck_sampling(0.5)
    counter.remove()


@pytest.mark.parametrize("bad", [{"threshold": 0.1}, "0.1", [0.1], True, GuidanceConfig()])
def test_wrong_config_type_fails_at_enable(wan, bad):
    pipe, kw, base = wan
    with pytest.raises(TypeError, match="EasyCacheConfig"):
        pipe.enable_easycache(bad)
    assert "easycache" not in hasten.features(pipe)
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


@pytest.mark.parametrize("obj", [None, object(), "a pipeline", 3])
def test_non_pipelines_get_unsupported_model_error(obj):
    for fn in (hasten.enable_easycache, hasten.enable_adaptive_guidance, hasten.disable_easycache,
               hasten.disable_adaptive_guidance, hasten.features, hasten.stats):
        with pytest.raises(UnsupportedModelError):
            fn(obj)


@pytest.mark.parametrize("cls,field,value,exc", [
    (EasyCacheConfig, "final_steps", math.nan, TypeError),
    (EasyCacheConfig, "max_consecutive_reuse", 2.5, TypeError),
    (EasyCacheConfig, "sync_branches", "no", TypeError),
    (EasyCacheConfig, "threshold", math.nan, ValueError),
    (EasyCacheConfig, "threshold", math.inf, ValueError),
    (EasyCacheConfig, "threshold", "0.2", TypeError),
    (EasyCacheConfig, "warmup", True, TypeError),
    (GuidanceConfig, "threshold", math.nan, ValueError),
    (GuidanceConfig, "min_steps", 1.5, TypeError),
    (GuidanceConfig, "linear_every", 2.0, TypeError),
    (GuidanceConfig, "truncate", math.nan, ValueError),
    (GuidanceConfig, "linear_until", None, TypeError),
    (GuidanceConfig, "coefficients", [[1.0, 0.0, 0.0]], TypeError),
])
def test_config_types_and_finiteness(cls, field, value, exc):
    with pytest.raises(exc, match=field):
        cls(**{field: value})


# -- deepcopy ----------------------------------------------------------------------------------------
def test_deepcopy_runs_its_own_weights_and_both_keep_working(wan):
    pipe, kw, base = wan
    pipe.enable_easycache(threshold=0.0)
    pipe.enable_adaptive_guidance(threshold=1.5)
    clone = copy.deepcopy(pipe)
    with torch.no_grad():
        for p in clone.transformer.parameters():
            p.mul_(0.5)
    ref = copy.deepcopy(clone)
    hasten.disable_easycache(ref)
    hasten.disable_adaptive_guidance(ref)
    expect = tp.run(ref, kw, steps=STEPS)  # the halved model without hooks
    assert not torch.equal(expect, base)
    assert torch.equal(tp.run(clone, kw, steps=STEPS), expect), "the copy ran the original's weights"
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)
    assert list(hasten.features(clone)) == ["easycache", "guidance"]
    assert hasten.stats(clone)["easycache"]["transformer"].calls == 2 * STEPS
    clone.disable_easycache()
    clone.disable_adaptive_guidance()
    assert list(hasten.features(pipe)) == ["easycache", "guidance"]  # the original keeps its features
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)
    pipe.disable_easycache()
    pipe.disable_adaptive_guidance()
    assert not hasattr(pipe.transformer, "_diffusers_hook") and not hasattr(clone.transformer, "_diffusers_hook")


# -- from_pipe ---------------------------------------------------------------------------------------
def test_from_pipe_features_stay_truthful(wan, caplog):
    pipe, kw, base = wan
    pipe.enable_easycache(threshold=0.5)
    other = WanPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    assert other.transformer is pipe.transformer
    assert list(hasten.features(other)) == ["easycache"]  # the shared transformer has it: it runs for both
    tp.run(other, kw, steps=STEPS)
    assert hasten.stats(other)["easycache"]["transformer"].calls == 2 * STEPS
    with caplog.at_level(logging.WARNING, logger="hasten"):
        other.disable_easycache()
    assert any("turns it off for both" in r.message for r in caplog.records)
    assert hasten.features(pipe) == {} and hasten.features(other) == {}
    assert not hasattr(pipe.transformer, "_diffusers_hook")
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)


# -- threads -----------------------------------------------------------------------------------------
def test_second_thread_gets_a_clear_error(wan):
    pipe, kw, base = wan
    pipe.enable_easycache(threshold=0.0)
    started, release = threading.Event(), threading.Event()
    orig = pipe.transformer.blocks[0].forward

    def slow(*a, **k):  # hold the first thread inside its run until the second one has tried
        started.set()
        release.wait(timeout=30)
        return orig(*a, **k)

    pipe.transformer.blocks[0].forward = slow
    errors: dict[str, BaseException] = {}

    def go(name: str) -> None:
        try:
            tp.run(pipe, kw, steps=STEPS)
        except BaseException as e:  # noqa: BLE001
            errors[name] = e

    first = threading.Thread(target=go, args=("first",))
    first.start()
    assert started.wait(timeout=30)
    pipe.transformer.blocks[0].forward = orig
    go("second")
    release.set()
    first.join(timeout=60)
    assert isinstance(errors.get("second"), RuntimeError) and "one call at a time" in str(errors["second"])
    assert "first" not in errors or "another thread" in str(errors["first"])
    # afterwards the pipeline works normally from any thread
    assert torch.equal(tp.run(pipe, kw, steps=STEPS), base)
    out: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: out.append(tp.run(pipe, kw, steps=STEPS)))
    t.start()
    t.join()
    assert torch.equal(out[0], base)
    pipe.disable_easycache()
