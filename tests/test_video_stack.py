"""The whole stack (EasyCache + adaptive guidance + bottleneck sampling) composes: EasyCache keeps reusing once
adaptive guidance stops calling the unconditional branch (issue 12's H7 finding: inside the stack the
conditional branch never reused again, because the dropped uncond branch's stale state voted "compute" at
every later step of the batch item's shared decision)."""

from __future__ import annotations

import pytest
import torch

import hasten
from hasten.bench.runner import ForwardCounter
from hasten.caches import EasyCache, EasyCacheConfig
from hasten.caches.sada import SADA, SADAConfig
from hasten.metrics import psnr

STEPS = 20


def _trajectory(step: int) -> torch.Tensor:
    """A smooth latent path: every step moves x a little, the output is a smooth function of x."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 8, 8, generator=g)
    return base * (1.0 - step / STEPS) + 0.3 * torch.ones(1, 4, 8, 8) * step / STEPS


def _drive(cache, drop_uncond_after: int, curved_uncond: bool = False) -> dict[str, list[bool]]:
    """cond then uncond per step (Wan's separate CFG calls); the uncond call stops after ``drop_uncond_after``.
    ``curved_uncond``: the uncond output decelerates (SADA's criterion then always asks it to compute)."""
    cache.begin_run(STEPS)
    for step in range(STEPS):
        x = _trajectory(step)
        for name in ("cond", "uncond"):
            if name == "uncond" and step > drop_uncond_after:
                continue
            key = (name, 0)
            if cache.should_compute(key, x, step, STEPS, f"{name}[0]", 0):
                out = x * 0.9 + (0.1 if name == "cond" else -0.1)
                if curved_uncond and name == "uncond":
                    out = out - 0.01 * step**2
                cache.remember(key, x, out)
            else:
                cache.reuse(key, x)
    stats = cache.end_run()
    return {label: b.decisions for label, b in stats.branches.items()}


def test_easycache_core_reuses_after_uncond_stops():
    cache = EasyCache(EasyCacheConfig(threshold=0.3, warmup=0.1, max_consecutive_reuse=6))
    both = _drive(cache, STEPS)["cond[0]"]
    cond = _drive(cache, 4)["cond[0]"]
    assert sum(not d for d in both) >= 8  # the path is easy: plenty of reuse with both branches running
    # after the uncond branch is gone the cond branch must still reuse about as often (before the fix: never)
    assert sum(not d for d in cond[6:]) >= sum(not d for d in both[6:]) - 1


def test_sada_core_reuses_after_uncond_stops():
    cache = SADA(SADAConfig(max_interval=2))
    alone = _drive(cache, -1)["cond[0]"]  # no uncond branch at all
    cond = _drive(cache, 4, curved_uncond=True)["cond[0]"]
    assert alone.count(False) >= 4
    # the stale uncond branch (unstable when last seen) must not keep the cond branch computing (before: 0 skips)
    assert cond[6:].count(False) >= alone[6:].count(False) - 1


@pytest.fixture(scope="module")
def image_pipe():
    pipe = hasten.load_embedded("image")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe) -> torch.Tensor:
    return hasten.embedded.generate_digits(pipe, [3], seed=0, steps=STEPS)


def test_easycache_under_truncated_guidance_keeps_reusing(image_pipe):
    """Embedded model, CFG truncated at 25 %: the cond branch's forwards below the hooks (first transformer
    block) stay low after the cut, and the image stays close to the guidance-only run."""
    pipe = image_pipe
    counter = ForwardCounter(pipe.transformer)
    try:
        pipe.enable_adaptive_guidance(mode="truncate", truncate=0.25)
        ref = _gen(pipe)
        ref_rows = counter.take()
        assert ref_rows == STEPS + 5  # cond every step, uncond for the first 5
        pipe.enable_easycache(threshold=0.3, warmup=0.1, max_consecutive_reuse=6)
        out = _gen(pipe)
        rows = counter.take()
        ec = next(iter(hasten.stats(pipe)["easycache"].values()))
        cond = ec.branches["cond[0]"].decisions
        assert len(cond) == STEPS and ec.branches["uncond[0]"].calls == 5
        assert cond[6:].count(False) >= 8, "".join("C" if d else "." for d in cond)  # before the fix: 0
        assert rows == ec.computed and rows <= ref_rows - 8
        assert psnr(out, ref) > 25
    finally:
        pipe.disable_easycache()
        pipe.disable_adaptive_guidance()
        counter.remove()


def test_easycache_keeps_its_rate_across_a_resolution_change():
    """Bottleneck sampling changes the latent's size mid-run: the cached tensors are dropped (the first call at
    the new size computes), but the transformation rate k is kept, so the very next call may reuse again."""
    cache = EasyCache(EasyCacheConfig(threshold=0.3, warmup=0.1, max_consecutive_reuse=6, sync_branches=False))
    cache.begin_run(STEPS)
    decisions = []
    for step in range(STEPS):
        x = _trajectory(step)
        if 8 <= step < 14:  # the low-resolution stage
            x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear")
        compute = cache.should_compute(("cond", 0), x, step, STEPS, "cond[0]")
        if compute:
            cache.remember(("cond", 0), x, x * 0.9 + 0.1)
        else:
            assert cache.reuse(("cond", 0), x).shape == x.shape
        decisions.append(compute)
    cache.end_run()
    assert decisions[8] and decisions[14]  # the first call at a new size computes
    assert not decisions[9] and not decisions[15], "".join("C" if d else "." for d in decisions)
