"""The coverage matrix: every hasten feature on every tiny diffusers family either works or says why.

One parametrized test per family x feature (the protocol lives in ``hasten.bench.coverage``, which
also prints the matrix): off is bit-identical to the baseline, the accelerated setting does less real
work (counted by a plain pre-hook at the denoiser's first block, not by hasten), no two CFG branches
receive the same denoiser output, ``disable_*`` restores the baseline bit for bit — or the feature
raises ``hasten.UnsupportedModelError`` and leaves the pipeline untouched. A silent no-op, a wrong
result or a crash fails.
"""

from __future__ import annotations

import logging

import families
import pytest
import torch

from hasten.bench import coverage

CELLS = [(f, x) for f in families.NAMES for x in coverage.FEATURES]


@pytest.mark.parametrize(("family", "feature"), CELLS, ids=[f"{f}-{x}" for f, x in CELLS])
def test_cell(family: str, feature: str) -> None:
    cell = coverage.cell(family, feature)  # memoised: tests/test_check.py reads the same runs
    assert cell.ok, f"{family} x {feature}: {cell.status}: {cell.detail}"


def test_every_family_runs_cfg_and_is_counted() -> None:
    """The harness itself: each family builds, runs CFG (>1 row or call per step) and is deterministic."""
    bad = []
    for name in families.NAMES:
        error, base = coverage.baseline(name)  # memoised by the cells above
        if error is not None:
            bad.append(f"{name}: {error}")
            continue
        if not base.step_rows or min(base.step_rows) < 2:
            bad.append(f"{name}: a step without two CFG branches (rows per step {base.step_rows})")
        if base.merged:
            bad.append(f"{name}: branches already equal at baseline (the merge check would be blind)")
    assert not bad, bad
    assert len(families.NAMES) >= 30


def test_harness_catches_merged_branches() -> None:
    """A 'cache' that answers the second CFG call of a step with the first call's output is caught."""
    fr = coverage.prepare("chroma")  # two sequential denoiser calls per step
    den = fr.pipe.transformer
    seen: dict = {}

    def merge(module, args, kwargs, result):
        t = float(kwargs["timestep"].flatten()[0])
        if t in seen:
            return seen[t]
        seen[t] = result
        return result

    h = den.register_forward_hook(merge, with_kwargs=True)
    try:
        p = coverage.probe(families, fr.pipe, fr.kwargs)
    finally:
        h.remove()
    assert fr.base.merged == 0 and p.merged > 0


def test_harness_catches_silent_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A feature whose enable does nothing is reported as wrong, not as working."""
    fr = coverage.prepare("sd3")
    cls = type(fr.pipe)
    monkeypatch.setattr(cls, "enable_easycache", lambda self, **kw: self, raising=False)
    cell = coverage.run_cell(fr, "easycache")
    assert cell.status == coverage.WRONG and "no-op" in cell.detail


def test_first_block_counter_counts_rows() -> None:
    pipe, kw = families.build("sd15")
    out, rows, calls = families.counted(pipe, kw, steps=3)
    assert rows == 6 and calls == 3 and torch.isfinite(out).all()


NO_CFG = {
    "sd15": {"guidance_scale": 1.0},
    "sd_pag": {"guidance_scale": 1.0},  # PAG alone: rows are [cond, perturbed], not [uncond, cond]
    "flux": {"true_cfg_scale": 1.0, "negative_prompt_embeds": None, "negative_pooled_prompt_embeds": None},
}


@pytest.mark.parametrize("family", list(NO_CFG))
def test_guidance_without_cfg_changes_nothing_and_says_so(family: str, caplog: pytest.LogCaptureFixture) -> None:
    """Adaptive guidance on a run without CFG: the output stays bit-identical and hasten warns (or refuses)."""
    from hasten import UnsupportedModelError

    pipe, kw = families.build(family)
    kw = {k: v for k, v in {**kw, **NO_CFG[family]}.items() if v is not None}
    base = families.call(pipe, kw, steps=4)
    pipe.enable_adaptive_guidance(mode="truncate", truncate=0.25)
    try:
        with caplog.at_level(logging.INFO, logger="hasten"):
            out = families.call(pipe, kw, steps=4)
    except UnsupportedModelError:
        return
    finally:
        pipe.disable_adaptive_guidance()
    assert torch.equal(out, base), "guidance changed a run that has no CFG branch to drop"
    warned = [r for r in caplog.records if r.name.startswith("hasten") and r.levelno >= logging.WARNING]
    assert warned, "adaptive guidance did nothing on a run without CFG and did not warn"
