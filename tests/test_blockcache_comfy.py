"""Block caches in the real ComfyUI engine: the nodes on the embedded weights, against the diffusers hooks.

Block forwards are counted at each block's attention (a pre-hook a reused block never reaches), not taken
from the node's own statistics.
"""

from __future__ import annotations

import pytest
import torch
from test_blockcache import BlockCounter

import hasten
from hasten import metrics

import comfy_env as ce

DIGITS = [0, 3, 7]
STEPS, CFG, SEED = 20, 4.0, 0
SETTINGS = {  # node id -> (diffusers feature, mild settings, off settings)
    "HastenDeltaDiT": ("delta_dit", dict(interval=2, num_cached_blocks=1), dict(interval=1)),
    "HastenProfilingDiT": ("profiling_dit", dict(threshold=0.3), dict(threshold=0.0)),
}


@pytest.fixture(scope="module")
def target(comfy):
    from hasten.bench.comfy import ComfyTarget

    return ComfyTarget()


def _comfy(target, node_id: str | None, settings: dict | None = None) -> tuple[torch.Tensor, int, object]:
    from hasten.nodes.blockcache import stats

    node = target.env.nodes.NODE_CLASS_MAPPINGS[node_id] if node_id else None
    target.model = target.base if node is None else node.execute(target.base, **settings).result[0]
    counter = BlockCounter(target.base.model.diffusion_model.blocks)
    try:
        img = target.generate(DIGITS, SEED, STEPS, CFG)
        return img, counter.take(), None if node is None else stats(target.model)
    finally:
        counter.remove()
        target.model = target.base


@pytest.fixture(scope="module")
def comfy_base(target):
    return _comfy(target, None)


@pytest.fixture(scope="module")
def pipe():
    p = hasten.load_embedded()
    p.set_progress_bar_config(disable=True)
    return p


def _diffusers(pipe, feature: str | None, settings: dict | None = None) -> tuple[torch.Tensor, int]:
    from hasten.embedded import generate_digits
    from hasten.pipelines.blockcache import find_blocks

    if feature is not None:
        getattr(pipe, f"enable_{feature}")(**settings)
    counter = BlockCounter(find_blocks(pipe.transformer)[1])
    try:
        img = generate_digits(pipe, DIGITS, seed=SEED, steps=STEPS, guidance=CFG)
        return img, counter.take()
    finally:
        counter.remove()
        if feature is not None:
            getattr(pipe, f"disable_{feature}")()


@pytest.fixture(scope="module")
def diffusers_base(pipe):
    return _diffusers(pipe, None)


@pytest.mark.parametrize("node_id", list(SETTINGS))
def test_off_is_bit_identical(target, comfy_base, node_id) -> None:
    base, n_base, _ = comfy_base
    img, n, st = _comfy(target, node_id, SETTINGS[node_id][2])
    assert n == n_base == 2 * STEPS * len(DIGITS) * 4
    assert st.reused == 0 and torch.equal(img, base)


@pytest.mark.parametrize("node_id", list(SETTINGS))
def test_node_saves_real_block_forwards_like_diffusers(target, comfy_base, pipe, diffusers_base, node_id) -> None:
    """Mild setting: real block forwards saved (counted at the blocks), >= 30 dB, and the same curve as the
    diffusers hook on the same weights (block forwards within 10 %, PSNR within 3 dB or both above 40 dB:
    the two engines' sigma schedules differ slightly, which moves PSNRs this high by a few dB)."""
    feature, mild, _ = SETTINGS[node_id]
    base, n_base, _ = comfy_base
    img, n, st = _comfy(target, node_id, mild)
    assert st.computed == n and n < n_base, (st.computed, n, n_base)
    psnr = metrics.psnr(img, base)
    assert psnr >= 30.0, psnr
    d_base, d_n_base = diffusers_base
    d_img, d_n = _diffusers(pipe, feature, mild)
    assert d_n_base == n_base
    assert abs(n - d_n) <= 0.1 * d_n, (n, d_n)
    d_psnr = metrics.psnr(d_img, d_base)
    assert abs(psnr - d_psnr) < 3.0 or min(psnr, d_psnr) >= 40.0, (psnr, d_psnr)


def test_unsupported_model_is_a_node_error(comfy) -> None:
    node = comfy.nodes.NODE_CLASS_MAPPINGS["HastenDeltaDiT"]
    with pytest.raises(Exception, match="patches_replace") as err:  # the pack's own copy of hasten.errors
        node.execute(ce.tiny_sd15(), interval=2)
    assert type(err.value).__name__ == "UnsupportedModelError"
